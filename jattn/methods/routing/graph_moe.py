"""P53 Graph-of-tokens MoE routing: "Improving Routing in Sparse Mixture of Experts with Graph of Tokens"
(Nguyen et al., 2025; no official code found; the formulas below follow the spec, which marks them unverified).

A sparse MoE routes token i with its own gate ``p_i = softmax(W_g x_i)`` (``[E]``) and top-k. P53 lets similar
tokens share routing evidence by mixing the gate probabilities over a row-stochastic token graph ``A [N, N]``:

    p~_i = sum_j A_ij p_j                       (mix="prob", the default)
    p~_i = softmax(sum_j A_ij r_j)              (mix="logit": the logits are mixed instead)

then top-k on ``p~``; the chosen experts are weighted by ``p~`` (Switch style: top-1 weight ``p~_e``, so the router
still gets a gradient). Two graphs:

* **attention-aware** (``attention_aware_gate``): ``A`` = the preceding attention layer's probabilities averaged
  over heads; no new parameters. With flash kernels the dense ``A`` never exists: ``A P = mean_h softmax(q_h k_h^T) P``
  is attention with ``v = P`` (``attention_aware_gate_flash``: one ``jattn.attention`` call, P zero-padded to the
  head width, the mean over heads taken after). It equals the explicit ``A @ P``.
* **similarity-aware** (``similarity_aware_gate``): ``S = softmax_row(x W_s x^T / tau)`` (causal for an LM, so a
  token's route never sees the future) - again attention, with ``q = x W_s``, ``k = x``, ``v = P``, ``scale = 1/tau``,
  one head.

Entropy (a correction to the spec): mixing with a row-stochastic ``A`` is a convex combination, so rows of ``p~``
sum to 1 and, entropy being concave, ``H(p~_i) >= sum_j A_ij H(p_j)`` for every token (Jensen). For a doubly
stochastic ``A`` (e.g. a symmetric similarity graph normalised both ways) this gives mean ``H(p~)`` >= mean
``H(p)``: mixing *raises* the per-token gate entropy, it does not lower it. The spec's "mean entropy does not
increase under a row-stochastic A" is false in general; the tests assert the Jensen bound and show a counterexample.
What mixing lowers is the routing *fluctuation*: neighbours' evidence makes a token's top-1 choice less sensitive
to its own logits (measured in ``train.graph_moe``).

``AttentionAwareMoE`` is the NNX top-k SwiGLU MoE with ``gate="standard" | "attention" | "similarity"``; it takes
the attention layer's ``(q, k)`` (flash path) or dense probabilities ``[B, H, T, S]``. With ``A = I`` (or
``gate="standard"``) it is the standard softmax-gated MoE. Experts are computed densely and masked (static
shapes, no Python loop over experts). Deviations: ``W_s`` is ``dim x dim`` (LeCun normal) and ``tau`` defaults to
``sqrt(dim)``; gradients flow through ``A`` into the attention projections; load balance is MoH's
``load_balance_loss`` computed on ``p~``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.core import checks
from jattn.methods.routing.moh import load_balance_loss
from jattn.ops.attention import attention

__all__ = ["attention_aware_gate", "attention_aware_gate_flash", "similarity_aware_gate", "similarity_matrix",
           "gate_entropy", "route_top_k", "expert_ffn", "AttentionAwareMoE", "GATES", "MIXES"]

GATES = ("standard", "attention", "similarity")
MIXES = ("prob", "logit")


def gate_entropy(p, eps: float = 1e-12):
    """Per-token entropy (nats) ``-sum_e p_e log p_e`` of gate distributions ``p [..., E]``."""
    checks.check_float_array("p", p)
    p = p.astype(jnp.float32)
    return -jnp.sum(p * jnp.log(jnp.maximum(p, eps)), axis=-1)


def _check_logits(router_logits):
    checks.check_float_array("router_logits", router_logits, 3)
    return router_logits.astype(jnp.float32)


def _mix(A, logits, mix):
    """``A [B, T, S]`` applied to ``softmax(logits)`` (prob) or to ``logits`` then softmax (logit)."""
    checks.check_choice("mix", mix, MIXES)
    if mix == "prob":
        return jnp.einsum("bts,bse->bte", A, jax.nn.softmax(logits, axis=-1))
    return jax.nn.softmax(jnp.einsum("bts,bse->bte", A, logits), axis=-1)


def attention_aware_gate(router_logits, attn_probs, mix: str = "prob"):
    """``p~ [B, T, E]`` from ``router_logits [B, S, E]`` and the attention probabilities ``[B, H, T, S]`` (averaged
    over heads) or ``[B, T, S]``. ``mix="prob"``: ``A softmax(r)``; ``"logit"``: ``softmax(A r)``."""
    r = _check_logits(router_logits)
    checks.check_float_array("attn_probs", attn_probs)
    A = attn_probs.astype(jnp.float32)
    if A.ndim == 4:
        A = jnp.mean(A, axis=1)
    B, S, _ = r.shape
    if A.ndim != 3 or A.shape[0] != B or A.shape[2] != S:
        raise ValueError(f"attn_probs must be [B={B}, H, T, S={S}] or [B, T, S] like router_logits [B, S, E], "
                         f"got {checks.describe(attn_probs)}")
    return _mix(A, r, mix)


def _attend_values(q, k, values, *, causal, scale, impl):
    """``mean_h softmax(q_h k_h^T * scale) values`` through ``jattn.attention`` with ``v = values`` broadcast to the
    kv heads; q/k/values zero-padded to one common width (zeros change no logit, the scale is explicit)."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    E = values.shape[-1]
    W = max(D, E)
    pad = lambda a, w: jnp.pad(a, [(0, 0)] * 3 + [(0, W - w)]) if W > w else a   # noqa: E731
    v = jnp.broadcast_to(values[:, :, None, :].astype(q.dtype), (B, values.shape[1], Hkv, E))
    out = attention(pad(q, D), pad(k, D), pad(v, E), causal=causal, scale=scale, impl=impl)
    return jnp.mean(out[..., :E].astype(jnp.float32), axis=2)


def attention_aware_gate_flash(router_logits, q, k, *, causal: bool = True, scale: float | None = None,
                               mix: str = "prob", impl: str = "auto"):
    """:func:`attention_aware_gate` without materialising ``A``: ``q [B, T, H, D]``, ``k [B, S, Hkv, D]`` are the
    attention layer's (post-RoPE) queries and keys; ``A P`` runs as attention with ``v = P`` (or ``v = r`` for
    ``mix="logit"``). ``scale`` defaults to ``D ** -0.5`` like ``jattn.attention``."""
    r = _check_logits(router_logits)
    checks.check_float_array("q", q, 4)
    checks.check_float_array("k", k, 4)
    checks.check_choice("mix", mix, MIXES)
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"k must be [B, S, Hkv, D] matching q {checks.describe(q)}, got {checks.describe(k)}")
    if r.shape[:2] != (k.shape[0], k.shape[1]):
        raise ValueError(f"router_logits must be [B, S={k.shape[1]}, E] like k, got {checks.describe(router_logits)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if mix == "prob":
        return _attend_values(q, k, jax.nn.softmax(r, axis=-1), causal=causal, scale=scale, impl=impl)
    return jax.nn.softmax(_attend_values(q, k, r, causal=causal, scale=scale, impl=impl), axis=-1)


def _check_similarity(x, w_s, tau):
    checks.check_float_array("x", x, 3)
    checks.check_float_array("w_s", w_s, 2)
    dim = x.shape[-1]
    if w_s.shape[0] != dim or w_s.shape[1] != dim:
        raise ValueError(f"w_s must be [dim={dim}, dim={dim}], got {checks.describe(w_s)}")
    return checks.check_positive_float("tau", tau, allow_none=False)


def similarity_matrix(x, w_s, tau: float, *, causal: bool = False):
    """The explicit token graph ``S = softmax_row(x W_s x^T / tau)`` ``[B, T, T]`` (causal: ``j <= i`` only)."""
    tau = _check_similarity(x, w_s, tau)
    x32 = x.astype(jnp.float32)
    logits = jnp.einsum("btc,cd,bsd->bts", x32, w_s.astype(jnp.float32), x32) / tau
    if causal:
        T = x.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


def similarity_aware_gate(x, router_logits, w_s, tau: float, *, causal: bool = False, mix: str = "prob",
                          impl: str = "auto"):
    """``p~ = S softmax(r)`` (or ``softmax(S r)``) with ``S = softmax_row(x W_s x^T / tau)``, computed as one-head
    attention ``q = x W_s``, ``k = v`` -> ``x``, ``P`` through ``jattn.attention`` (no ``[T, T]`` matrix on the
    flash path). ``x [B, T, dim]``, ``router_logits [B, T, E]``, ``w_s [dim, dim]``."""
    tau = _check_similarity(x, w_s, tau)
    r = _check_logits(router_logits)
    if r.shape[:2] != x.shape[:2]:
        raise ValueError(f"router_logits must be [B, T, E] with [B, T] = {x.shape[:2]} like x, got "
                         f"{checks.describe(router_logits)}")
    checks.check_choice("mix", mix, MIXES)
    q = (x.astype(jnp.float32) @ w_s.astype(jnp.float32))[:, :, None, :]
    k = x.astype(jnp.float32)[:, :, None, :]
    values = jax.nn.softmax(r, axis=-1) if mix == "prob" else r
    out = _attend_values(q, k, values, causal=causal, scale=1.0 / tau, impl=impl)
    return out if mix == "prob" else jax.nn.softmax(out, axis=-1)


def route_top_k(p_tilde, top_k: int):
    """``(weights, mask)``: the top-k indicator ``m`` of ``p~ [..., E]`` and Switch-style weights ``p~ m``."""
    checks.check_float_array("p_tilde", p_tilde)
    k = checks.check_int("top_k", top_k, 1)
    E = p_tilde.shape[-1]
    if k > E:
        raise ValueError(f"top_k must be <= the {E} experts, got {top_k}")
    _, idx = jax.lax.top_k(p_tilde, k)
    m = jnp.sum(jax.nn.one_hot(idx, E, dtype=jnp.float32), axis=-2)
    return p_tilde * m, m


def expert_ffn(x, params: dict, weights):
    """``sum_e weights_e W_down^e (silu(x W_gate^e) * x W_up^e)``: all experts computed, zero weights masked.
    ``params``: ``w_gate, w_up [E, dim, F]``, ``w_down [E, F, dim]``; ``weights [..., E]``."""
    h = jax.nn.silu(jnp.einsum("...c,ecf->...ef", x, params["w_gate"])) * \
        jnp.einsum("...c,ecf->...ef", x, params["w_up"])
    return jnp.einsum("...e,...ef,efc->...c", weights.astype(jnp.float32), h.astype(jnp.float32),
                      params["w_down"].astype(jnp.float32)).astype(x.dtype)


def _param(rngs, shape, fan_in):
    return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32) / np.sqrt(fan_in))


class AttentionAwareMoE(nnx.Module):
    """Top-k SwiGLU mixture of experts with standard, attention-aware or similarity-aware gating.

    Args:
      dim, hidden_dim, num_experts: sizes; ``top_k`` experts per token (default 1).
      gate: ``"standard"`` (``softmax(W_g x)``), ``"attention"`` (mixed by the attention layer's head-averaged
        probabilities) or ``"similarity"`` (mixed by ``softmax(x W_s x^T / tau)``; adds ``W_s``).
      mix: ``"prob"`` or ``"logit"``. causal: the similarity graph's causal mask (and the flash A's).
      tau: similarity temperature (default ``sqrt(dim)``). impl: ``jattn.attention``'s.

    ``__call__(x, *, qk=None, attn_probs=None)``: ``x [B, T, dim]``; the attention gate needs either ``qk = (q, k)``
    (post-RoPE, flash path) or ``attn_probs [B, H, T, S]``. Returns ``(y, info)`` with ``info`` holding ``p`` (own
    gates), ``p_tilde``, ``expert`` (top-1 index ``[B, T]``) and ``aux`` (the load-balance loss on ``p~``).
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, *, rngs: nnx.Rngs, top_k: int = 1,
                 gate: str = "standard", mix: str = "prob", causal: bool = True, tau: float | None = None,
                 impl: str = "auto"):
        self.dim = checks.check_int("dim", dim, 1)
        E = checks.check_int("num_experts", num_experts, 1)
        F = checks.check_int("hidden_dim", hidden_dim, 1)
        self.top_k = checks.check_int("top_k", top_k, 1)
        if self.top_k > E:
            raise ValueError(f"top_k must be <= num_experts={E}, got {top_k}")
        checks.check_choice("gate", gate, GATES)
        checks.check_choice("mix", mix, MIXES)
        checks.check_choice("impl", impl, checks.IMPLS)
        self.gate, self.mix, self.causal, self.impl = gate, mix, causal, impl
        self.tau = float(np.sqrt(dim)) if tau is None else checks.check_positive_float("tau", tau, allow_none=False)
        self.w_router = _param(rngs, (dim, E), dim)
        self.w_gate = _param(rngs, (E, dim, F), dim)
        self.w_up = _param(rngs, (E, dim, F), dim)
        self.w_down = _param(rngs, (E, F, dim), F)
        # drawn last, so the other weights of a seed are the same for every gate (paired comparisons)
        self.w_s = _param(rngs, (dim, dim), dim) if gate == "similarity" else None

    def gates(self, x, *, qk=None, attn_probs=None):
        """``(p, p~)`` of ``x``."""
        logits = x.astype(jnp.float32) @ self.w_router[...]
        p = jax.nn.softmax(logits, axis=-1)
        if self.gate == "standard":
            return p, p
        if self.gate == "similarity":
            return p, similarity_aware_gate(x, logits, self.w_s[...], self.tau, causal=self.causal, mix=self.mix,
                                            impl=self.impl)
        if (qk is None) == (attn_probs is None):
            raise ValueError("gate='attention' needs exactly one of qk=(q, k) or attn_probs=[B, H, T, S]")
        if attn_probs is not None:
            return p, attention_aware_gate(logits, attn_probs, mix=self.mix)
        q, k = qk
        return p, attention_aware_gate_flash(logits, q, k, causal=self.causal, mix=self.mix, impl=self.impl)

    def __call__(self, x, *, qk=None, attn_probs=None):
        checks.check_float_array("x", x, 3)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, dim={self.dim}], got {checks.describe(x)}")
        p, p_tilde = self.gates(x, qk=qk, attn_probs=attn_probs)
        weights, m = route_top_k(p_tilde, self.top_k)
        params = {"w_gate": self.w_gate[...], "w_up": self.w_up[...], "w_down": self.w_down[...]}
        y = expert_ffn(x, params, weights)
        info = {"p": p, "p_tilde": p_tilde, "expert": jnp.argmax(p_tilde, axis=-1),
                "aux": load_balance_loss(p_tilde, m)}
        return y, info
