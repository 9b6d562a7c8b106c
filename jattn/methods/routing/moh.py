"""P02 MoH: Multi-Head Attention as Mixture-of-Head Attention (Jin et al., 2024; code ``SkyworkAI/MoH``).

Every head ``h`` computes its usual attention output ``o_h [B, T, D]``; MoH weights it per token by a gate
``g_h(x_t)`` before the output projection: ``out = W_o concat_h(g_h(x_t) o_h)``. Heads ``[0, h_s)`` are
*shared* (always active), heads ``[h_s, H)`` are *routed* (``E = H - h_s`` of them, ``k`` active per token).

The gates (``moh_gates``, as ``MoH-DiT/models.py::MoHAttention``; ``x`` is the attention layer's input):

* routed: ``p = softmax(x W_r)`` over the E routed heads; ``m = top-k mask of p``;
  ``g_routed = p m / max(sum(p m), eps) * k`` (a token's routed gates sum to k).
* shared: ``s = softmax(x W_s) * h_s`` (a constant 1 when ``h_s == 1``: the official code has no ``W_s``
  then, and a softmax over one logit is 1).
* both present: ``[a1, a2] = 2 softmax(x W_h)``; ``g = [a1 s, a2 g_routed]``.
* no routed heads (``h_s == H``): ``g = softmax(x W_s) * H`` (a dense reweighting, no sparsity).
* load balance (training, ``load_balance_loss``): over all ``N = B T`` tokens, ``f_i = mean_t m_ti``
  (the fraction of tokens routed to head i; sums to k) and ``P_i = mean_t p_ti``;
  ``L_b = E^2 mean_i(f_i P_i) = E sum_i f_i P_i``. Uniform probabilities give ``L_b = k``, its minimum.
  No gradient flows through ``m`` (it is a top-k indicator). The paper weights it 0.01, averaged over layers.

The parameter-free router (``moh_llama_router``, ``MoH-LLaMA3/Inference_code/modeling_llama.py``) that turns a
pretrained MHA into MoH without new parameters: routed logits ``l_h = ||q_h||_2`` (q before RoPE) for
``h >= h_s``, divided by their (unbiased) std across the routed heads, softmax, top-k; gates are the binary
mask (1 on the shared heads and the k chosen routed heads, 0 elsewhere). LLaMA3 defaults: ``h_s = H/2``,
``k = H/4`` (75 % of heads active).

Two ways to run the attention core, both jit-able with static shapes and no Python loop over heads:

* ``moh_attention`` (the reference, as the official code): all heads computed, then gated.
* ``moh_capacity_attention``: shared heads dense; each routed head gathers at most ``capacity`` query rows (the
  tokens routed to it, by descending gate, ``capacity = ceil(capacity_factor * T * k / E)`` capped at T),
  attends them against that head's full K/V through ``jattn.attention`` (a causal mask built from the gathered
  positions) and scatters the gated rows back. Tokens past a head's capacity are dropped for that head
  (gate 0): MoE token dropping. With ``capacity == T`` it equals ``moh_attention`` exactly. Routed-head
  attention FLOPs scale as ``capacity / T`` (``capacity_flop_fraction``).

``MoHAttention`` is an :class:`jattn.nn.Attention` (same projections, RoPE, ``project``/``finish``) with a router; it
drops into ``jattn.nn.DecoderLM``'s blocks (``use_moh``) and keeps its last load-balance loss in
``aux_loss`` (``moh_aux_loss(model)`` averages it over layers).

Deliberate deviations: the router weights use the ``nnx.Linear`` default init (LeCun normal) instead of
torch's; the parameter-free router divides by ``std`` only where it is > 0 (the official code gives NaN when all
routed norms are equal or ``E == 1``); a token's routed gates are treated as "selected" where nonzero (the
capacity path's selection); decoding with a KV cache is not supported (``init_cache`` raises).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.core import checks
from jattn.nn.attention import Attention, apply_rope
from jattn.ops.attention import attention

__all__ = ["moh_route", "load_balance_loss", "moh_gates", "moh_llama_router", "moh_attention",
           "moh_capacity_attention", "moh_capacity", "capacity_flop_fraction", "MoHAttention", "MoHAuxLoss",
           "use_moh", "moh_aux_loss", "ROUTERS"]

ROUTERS = ("learned", "norm")
LOAD_BALANCE_WEIGHT = 0.01  # the paper's coefficient (MoH-DiT/train.py)


# ------------------------------------------------------------------------------------------------
# argument checks


def _check_heads(num_heads, num_shared, top_k) -> tuple[int, int, int]:
    """``(H, h_s, k)`` validated: ``0 <= h_s <= H``; ``1 <= k <= E`` when there are routed heads, else ``k == 0``."""
    H = checks.check_int("num_heads", num_heads, 1)
    h_s = checks.check_int("num_shared", num_shared, 0)
    if h_s > H:
        raise ValueError(f"num_shared must be in [0, num_heads={H}], got {num_shared}")
    E = H - h_s
    k = checks.check_int("top_k", top_k, 0)
    if E == 0 and k != 0:
        raise ValueError(f"top_k must be 0 when every head is shared (num_shared == num_heads == {H}), got {top_k}")
    if E > 0 and not 1 <= k <= E:
        raise ValueError(f"top_k must be in [1, num_heads - num_shared = {E}], got {top_k}")
    return H, h_s, k


def _check_gates(gates, B, T, H):
    checks.check_float_array("gates", gates, 3)
    if tuple(gates.shape) != (B, T, H):
        raise ValueError(f"gates must be [B, T, H] = {(B, T, H)} like q, got shape {tuple(gates.shape)}")


# ------------------------------------------------------------------------------------------------
# routing and gates (pure)


def moh_route(logits, top_k: int):
    """``logits [..., E]`` -> ``(p, m, g)``: ``p = softmax(logits)`` (float32), ``m`` the top-k indicator of ``p``
    (float32, exactly ``top_k`` ones per token), ``g = p m / max(sum(p m), eps) * top_k``."""
    checks.check_float_array("logits", logits)
    E = logits.shape[-1]
    k = checks.check_int("top_k", top_k, 1)
    if k > E:
        raise ValueError(f"top_k must be <= the {E} routed heads (logits' last axis), got {top_k}")
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    _, idx = jax.lax.top_k(p, k)
    m = jnp.sum(jax.nn.one_hot(idx, E, dtype=jnp.float32), axis=-2)
    kept = p * m
    denom = jnp.maximum(jnp.sum(kept, axis=-1, keepdims=True), jnp.finfo(jnp.float32).eps)
    return p, m, kept / denom * k


def load_balance_loss(p, m):
    """``E^2 mean_i(f_i P_i)`` over all tokens: ``p, m [..., E]`` (router probabilities, top-k indicator)."""
    checks.check_float_array("p", p)
    if jnp.shape(m) != p.shape:
        raise ValueError(f"m must have p's shape {p.shape}, got {checks.describe(m)}")
    E = p.shape[-1]
    P = jnp.mean(p.reshape(-1, E).astype(jnp.float32), axis=0)
    f = jnp.mean(jax.lax.stop_gradient(m).reshape(-1, E).astype(jnp.float32), axis=0)
    return jnp.mean(f * P) * E * E


def moh_gates(x, params: dict, *, num_shared: int, top_k: int):
    """MoH's per-token head gates from the learned router.

    Args:
      x: ``[..., dim]`` the attention layer's input.
      params: ``{"routed": W_r [dim, E], "shared": W_s [dim, h_s], "mix": W_h [dim, 2]}``; only the keys that
        apply: ``routed`` when E > 0, ``shared`` when h_s > 1, ``mix`` when both E > 0 and h_s > 0.
      num_shared: ``h_s``, the always-active heads ``[0, h_s)``.
      top_k: routed heads active per token (0 when every head is shared).

    Returns:
      ``(gates [..., H] float32, aux_loss)``: ``aux_loss`` is ``load_balance_loss`` (0.0 without routed heads).
    """
    checks.check_float_array("x", x)
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of router weights, got {type(params).__name__}")
    h_s = checks.check_int("num_shared", num_shared, 0)
    dim = x.shape[-1]
    E = int(jnp.shape(params["routed"])[-1]) if "routed" in params and jnp.ndim(params["routed"]) else 0
    H, h_s, k = _check_heads(h_s + E, h_s, top_k)
    needed = {name for name, on in (("routed", E > 0), ("shared", h_s > 1), ("mix", E > 0 and h_s > 0)) if on}
    if set(params) != needed:
        raise ValueError(f"params must hold exactly {sorted(needed)} for num_shared={h_s}, E={E}; got {sorted(params)}")
    for name, cols in (("routed", E), ("shared", h_s), ("mix", 2)):
        if name in params and tuple(jnp.shape(params[name])) != (dim, cols):
            raise ValueError(f"params[{name!r}] must be [dim={dim}, {cols}], got {checks.describe(params[name])}")
    x32 = x.astype(jnp.float32)
    batch_shape = x.shape[:-1]
    if h_s > 1:
        shared = jax.nn.softmax(x32 @ params["shared"].astype(jnp.float32), axis=-1) * h_s
    else:
        shared = jnp.ones(batch_shape + (h_s,), jnp.float32)
    if E == 0:
        return shared, jnp.zeros((), jnp.float32)
    p, m, routed = moh_route(x32 @ params["routed"].astype(jnp.float32), k)
    aux = load_balance_loss(p, m)
    if h_s == 0:
        return routed, aux
    alpha = 2.0 * jax.nn.softmax(x32 @ params["mix"].astype(jnp.float32), axis=-1)
    return jnp.concatenate([alpha[..., :1] * shared, alpha[..., 1:] * routed], axis=-1), aux


def moh_llama_router(q, num_shared: int, top_k: int):
    """The parameter-free router of MoH-LLaMA3: ``q [B, T, H, D]`` (before RoPE) -> binary gates ``[B, T, H]``
    (float32): 1 on the shared heads and on the ``top_k`` routed heads of largest ``||q_h|| / std``."""
    checks.check_float_array("q", q, 4)
    H, h_s, k = _check_heads(q.shape[2], num_shared, top_k)
    E = H - h_s
    shared = jnp.ones(q.shape[:2] + (h_s,), jnp.float32)
    if E == 0:
        return shared
    norms = jnp.linalg.norm(q[:, :, h_s:].astype(jnp.float32), axis=-1)            # [B, T, E]
    std = jnp.std(norms, axis=-1, keepdims=True, ddof=1) if E > 1 else jnp.zeros(norms.shape[:-1] + (1,))
    logits = norms / jnp.where(std > 0, std, 1.0)
    _, m, _ = moh_route(jax.lax.stop_gradient(logits), k)
    return jnp.concatenate([shared, m], axis=-1)


# ------------------------------------------------------------------------------------------------
# the attention core (pure)


def moh_attention(q, k, v, gates, *, causal: bool = False, mask=None, scale: float | None = None,
                  impl: str = "auto"):
    """Reference MoH core: every head's attention (``jattn.attention``) times its gate.
    ``q [B, T, H, D]``, ``k, v [B, S, Hkv, D]``, ``gates [B, T, H]`` -> ``[B, T, H, D]`` in q's dtype."""
    checks.check_float_array("q", q, 4)
    _check_gates(gates, *q.shape[:3])
    out = attention(q, k, v, causal=causal, mask=mask, scale=scale, impl=impl)
    return (out.astype(jnp.float32) * gates.astype(jnp.float32)[..., None]).astype(q.dtype)


def moh_capacity(T: int, num_routed: int, top_k: int, capacity_factor: float) -> int:
    """Rows each routed head computes: ``min(T, ceil(capacity_factor * T * top_k / num_routed))`` (>= 1)."""
    T = checks.check_int("T", T, 1)
    E = checks.check_int("num_routed", num_routed, 1)
    k = checks.check_int("top_k", top_k, 1)
    cf = checks.check_positive_float("capacity_factor", capacity_factor, allow_none=False)
    return max(1, min(T, math.ceil(cf * T * k / E)))


def capacity_flop_fraction(T: int, num_heads: int, num_shared: int, capacity: int) -> float:
    """Attention-core FLOPs of ``moh_capacity_attention`` relative to MHA (all heads, all rows):
    ``(h_s T + E capacity) / (H T)``."""
    H, h_s = checks.check_int("num_heads", num_heads, 1), checks.check_int("num_shared", num_shared, 0)
    C = checks.check_int("capacity", capacity, 1)
    return (h_s * T + (H - h_s) * min(C, T)) / (H * T)


def _expand_kv(x, H):
    """``[B, S, Hkv, D]`` -> ``[B, S, H, D]`` (query head h reads kv head ``h // (H / Hkv)``)."""
    return jnp.repeat(x, H // x.shape[2], axis=2) if x.shape[2] != H else x


def moh_capacity_attention(q, k, v, gates, *, num_shared: int, capacity: int, causal: bool = False,
                           scale: float | None = None, impl: str = "auto"):
    """MoH core computing, per routed head, only the query rows routed to it (at most ``capacity``).

    Shared heads ``[0, num_shared)`` run dense. For routed head e the tokens with a nonzero gate are ranked by
    gate (ties: earlier position first), the first ``capacity`` are gathered (``[B, capacity, E, D]``, static),
    attended against the head's full K/V (``jattn.attention``, causal through the gathered positions), gated and
    scattered back; other rows of that head are 0. Equals :func:`moh_attention` when ``capacity`` holds every
    routed token (e.g. ``capacity == T``). ``q [B, T, H, D]``, ``k, v [B, S, Hkv, D]``, ``gates [B, T, H]``.
    """
    checks.check_float_array("q", q, 4)
    B, T, H, D = q.shape
    _check_gates(gates, B, T, H)
    h_s = checks.check_int("num_shared", num_shared, 0)
    if h_s > H:
        raise ValueError(f"num_shared must be in [0, H={H}], got {num_shared}")
    C = checks.check_int("capacity", capacity, 1)
    if C > T:
        raise ValueError(f"capacity must be <= T={T} (rows per routed head), got {capacity}")
    checks.check_qkv(q, k, v)
    S = k.shape[1]
    if causal and S != T:
        raise ValueError(f"causal=True needs k's length S == T={T}, got S={S}")
    kf, vf = _expand_kv(k, H), _expand_kv(v, H)
    g32 = gates.astype(jnp.float32)
    parts = []
    if h_s:
        shared = attention(q[:, :, :h_s], kf[:, :, :h_s], vf[:, :, :h_s], causal=causal, scale=scale, impl=impl)
        parts.append(shared.astype(jnp.float32) * g32[:, :, :h_s, None])
    E = H - h_s
    if E:
        g_r = jnp.swapaxes(g32[:, :, h_s:], 1, 2)                                   # [B, E, T]
        rank = jnp.where(g_r != 0, jax.lax.stop_gradient(jnp.abs(g_r)), -1.0)
        top, idx = jax.lax.top_k(rank, C)                                           # [B, E, C]
        valid = top >= 0
        q_r = jnp.swapaxes(q[:, :, h_s:], 1, 2)                                     # [B, E, T, D]
        q_sel = jnp.take_along_axis(q_r, idx[..., None], axis=2)                     # [B, E, C, D]
        visible = None
        if causal:
            visible = idx[..., None] >= jnp.arange(S)[None, None, None, :]           # [B, E, C, S]
        o_sel = attention(jnp.swapaxes(q_sel, 1, 2), kf[:, :, h_s:], vf[:, :, h_s:], mask=visible,
                          scale=scale, impl=impl)                                   # [B, C, E, D]
        w = jnp.where(valid, jnp.take_along_axis(g_r, idx, axis=2), 0.0)            # [B, E, C]
        rows = jnp.swapaxes(o_sel, 1, 2).astype(jnp.float32) * w[..., None]          # [B, E, C, D]
        b_ix = jnp.arange(B)[:, None, None]
        e_ix = jnp.arange(E)[None, :, None]
        routed = jnp.zeros((B, E, T, D), jnp.float32).at[b_ix, e_ix, idx].add(rows)
        parts.append(jnp.swapaxes(routed, 1, 2))
    return jnp.concatenate(parts, axis=2).astype(q.dtype)


# ------------------------------------------------------------------------------------------------
# the NNX module


class MoHAuxLoss(nnx.Variable):
    """The layer's load-balance loss from its last call (a scalar; 0 for the ``norm`` router)."""


class MoHAttention(Attention):
    """Mixture-of-Head attention: :class:`jattn.nn.Attention`'s projections (q/k/v/out, RoPE, GQA, output gate)
    with MoH's per-token head gates before the output projection.

    Args (beyond ``Attention``'s ``dim, num_heads, rngs, num_kv_heads, head_dim, causal, rope, rope_theta,
    use_bias, output_gate, scale, dtype, param_dtype``; the core is always softmax attention):
      num_shared: always-active heads ``[0, num_shared)``.
      top_k: routed heads active per token (``0`` when ``num_shared == num_heads``).
      router: ``"learned"`` (``moh_gates``: W_r, W_s, W_h) or ``"norm"`` (``moh_llama_router``: no parameters,
        binary gates: converts a pretrained MHA).
      capacity_factor: ``None`` computes every head and gates it (``moh_attention``, as the official code);
        a float runs ``moh_capacity_attention`` with ``moh_capacity(T, E, top_k, capacity_factor)`` rows per
        routed head.
      impl: the attention impl (``jattn.attention``'s).

    ``__call__(x, mask=None, positions=None, return_probs=False)`` -> ``[B, T, dim]`` (and the gated heads'
    probability maps ``[B, H, T, S]`` before gating with ``return_probs``; ``return_gates=True`` returns the
    gates ``[B, T, H]`` instead). The load-balance loss of the call is left in ``self.aux_loss``.
    """

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, num_shared: int, top_k: int,
                 router: str = "learned", capacity_factor: float | None = None, impl: str = "auto",
                 **attention_kwargs):
        if "method" in attention_kwargs and attention_kwargs["method"] != "softmax":
            raise ValueError(f"MoHAttention runs softmax heads; method must be 'softmax', got "
                             f"{attention_kwargs['method']!r}")
        attention_kwargs.pop("method", None)
        checks.check_choice("impl", impl, checks.IMPLS)
        super().__init__(dim, num_heads, rngs=rngs, method="softmax", impl=impl, **attention_kwargs)
        self.num_heads, self.num_shared, self.top_k = _check_heads(num_heads, num_shared, top_k)
        checks.check_choice("router", router, ROUTERS)
        self.router = router
        self.capacity_factor = checks.check_positive_float("capacity_factor", capacity_factor)
        if self.capacity_factor is not None and self.num_shared == self.num_heads:
            raise ValueError("capacity_factor needs routed heads (num_shared < num_heads); got "
                             f"num_shared == num_heads == {num_heads}")
        self.impl = impl
        E, h_s = self.num_heads - self.num_shared, self.num_shared
        init = nnx.initializers.lecun_normal()
        param_dtype = attention_kwargs.get("param_dtype", jnp.float32)

        def weight(cols):
            return nnx.Param(init(rngs.params(), (dim, cols), param_dtype))
        learned = router == "learned"
        self.w_routed = weight(E) if learned and E > 0 else None
        self.w_shared = weight(h_s) if learned and h_s > 1 else None
        self.w_mix = weight(2) if learned and E > 0 and h_s > 0 else None
        if router == "norm" and E == 0:
            raise ValueError("router='norm' needs routed heads (num_shared < num_heads)")
        self.aux_loss = MoHAuxLoss(jnp.zeros((), jnp.float32))

    @classmethod
    def from_attention(cls, attn: Attention, *, num_shared: int, top_k: int, router: str = "norm",
                       rngs: nnx.Rngs | None = None, capacity_factor: float | None = None,
                       impl: str | None = None) -> "MoHAttention":
        """An MoH layer with ``attn``'s projection weights copied (a softmax ``Attention``). ``router="norm"`` adds
        no parameters (MoH-LLaMA3's conversion); ``"learned"`` draws a new router from ``rngs``."""
        if not isinstance(attn, Attention):
            raise TypeError(f"attn must be a jattn.nn.Attention, got {type(attn).__name__}")
        if attn.method != "softmax":
            raise ValueError(f"attn must run method 'softmax', got {attn.method!r}")
        impl = attn.method_config.get("impl", "auto") if impl is None else impl
        if router == "learned" and rngs is None:
            raise ValueError("router='learned' draws new router weights: pass rngs")
        layer = cls(attn.dim, attn.num_heads, rngs=nnx.Rngs(0) if rngs is None else rngs, num_shared=num_shared,
                    top_k=top_k, router=router, capacity_factor=capacity_factor, impl=impl,
                    num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim, causal=attn.causal, rope=attn.rope,
                    rope_theta=attn.rope_theta, use_bias=attn.query.use_bias, output_gate=attn.gate is not None,
                    scale=attn.scale, dtype=attn.dtype, param_dtype=attn.query.kernel[...].dtype)
        for name in ("query", "key", "value", "out") + (("gate",) if attn.gate is not None else ()):
            nnx.update(getattr(layer, name), nnx.state(getattr(attn, name)))
        return layer

    def router_params(self) -> dict:
        """The learned router's weights as ``moh_gates`` takes them."""
        named = (("routed", self.w_routed), ("shared", self.w_shared), ("mix", self.w_mix))
        return {name: w[...] for name, w in named if w is not None}

    def init_cache(self, *args, **kwargs):
        raise ValueError("MoHAttention does not support decoding with a KV cache (decode=True)")

    def gates(self, x, q_raw=None):
        """``(gates [B, T, H], aux_loss)`` of ``x [B, T, dim]`` (``q_raw``: pre-RoPE q for the norm router)."""
        if self.router == "norm":
            if q_raw is None:
                B, T, _ = x.shape
                q_raw = self.query(x).reshape(B, T, self.num_heads, self.head_dim)
            return moh_llama_router(q_raw, self.num_shared, self.top_k), jnp.zeros((), jnp.float32)
        return moh_gates(x, self.router_params(), num_shared=self.num_shared, top_k=self.top_k)

    def __call__(self, x, *, mask=None, positions=None, return_probs: bool = False, decode: bool = False,
                 prefill: bool = False, return_gates: bool = False):
        checks.check_float_array("x", x, 3)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, dim={self.dim}], got shape {x.shape}")
        if decode or prefill:
            raise ValueError("MoHAttention does not support decode=True / prefill=True")
        if return_probs and return_gates:
            raise ValueError("return_probs and return_gates are exclusive: pass one")
        B, T, _ = x.shape
        if positions is None:
            positions = jnp.arange(T)[None]
        q = self.query(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.key(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.value(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        gates, aux = self.gates(x, q)
        if self.rope:
            q = apply_rope(q, positions, theta=self.rope_theta)
            k = apply_rope(k, positions, theta=self.rope_theta)
        self.aux_loss = MoHAuxLoss(aux)  # a new variable: writing into the old one fails across traces
        probs = None
        if self.capacity_factor is not None:
            if mask is not None or return_probs:
                raise ValueError("capacity_factor runs the gathered path: mask and return_probs must be None/False")
            C = moh_capacity(T, self.num_heads - self.num_shared, self.top_k, self.capacity_factor)
            out = moh_capacity_attention(q, k, v, gates, num_shared=self.num_shared, capacity=C, causal=self.causal,
                                         scale=self.scale, impl=self.impl)
        else:
            result = self.spec.apply(q, k, v, causal=self.causal, mask=mask, scale=self.scale,
                                     return_probs=return_probs, **self.method_config)
            heads, probs = result if return_probs else (result, None)
            out = (heads.astype(jnp.float32) * gates[..., None]).astype(heads.dtype)
        out = self.finish(x, out)
        if return_gates:
            return out, gates
        return (out, probs) if return_probs else out


def use_moh(model, *, num_shared: int, top_k: int, router: str = "learned", rngs: nnx.Rngs | None = None,
            capacity_factor: float | None = None, impl: str | None = None):
    """Replaces the ``attention`` of every block of ``model`` (``jattn.nn.DecoderLM`` / ``ViT`` / ``BertEncoder``)
    by :meth:`MoHAttention.from_attention` of it, in place (projection weights kept). Returns ``model``."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"model must have transformer blocks (.blocks), got {type(model).__name__}")
    for block in blocks:
        block.attention = MoHAttention.from_attention(block.attention, num_shared=num_shared, top_k=top_k,
                                                      router=router, rngs=rngs, capacity_factor=capacity_factor,
                                                      impl=impl)
    return model


def moh_aux_loss(model):
    """The mean over ``model``'s MoH layers of their last load-balance loss (0.0 if it has none)."""
    losses = [layer.aux_loss[...] for _, layer in nnx.iter_graph(model) if isinstance(layer, MoHAttention)]
    return jnp.mean(jnp.stack(losses)) if losses else jnp.zeros((), jnp.float32)
