"""P36 BAM: Branch-Attend-Mix, simple and efficient parameter upcycling for Mixture of Experts (Zhang et al.,
2024, arXiv 2408.08274; no official code found).

BAM turns ``N`` dense models, branched from one seed and trained on different domains, into one MoE:

* **Attention experts, soft-routed** (``soft_mixture_of_attention``): ``g(x) = softmax(x W_r)`` over all N
  experts (no top-k) and ``MoA(x) = sum_e g_e(x) MHA_e(x)`` with ``MHA_e(x) = W_O^e concat_h(attn(q^e_h, k^e, v^e))``;
  every expert runs for every token.

  - variant (a), ``kv_shared=False``: every expert has its own ``W_Q, W_K, W_V, W_O``. All N experts run in **one**
    ``jattn.attention`` call with ``N*H`` query heads over ``N*Hkv`` kv heads (expert-major head order, so GQA's
    grouping ``kv = head // (H/Hkv)`` pairs each query head with its own expert's kv head).
  - variant (b), ``kv_shared=True``: the experts share ``W_K, W_V`` (the average of the dense models') and keep
    their own ``W_Q, W_O``: one K/V (one KV cache). The N experts' queries run as ``H*N`` heads over the shared
    ``Hkv`` kv heads in one GQA call (head-major order ``h*N + e``, so query head ``h`` of every expert reads kv
    head ``h // (H/Hkv)``), followed by the weighted head-group combine ``sum_e g_e W_O^e o^e``.

* **FFN experts** (``moe_ffn``): the dense models' SwiGLU FFNs with a freshly initialised token-choice router:
  ``p = softmax(x W_f)``, top-k of p, weights renormalised over the chosen experts (Mixtral/BTX style, so
  identical experts equal one expert); the load-balance loss is MoH's ``load_balance_loss`` (``E sum_i f_i P_i``).
  All experts are computed densely and masked: static shapes, no Python loop over experts.
* **Parallel block** (``ParallelMoEBlock``): ``y = x + MoA(LN(x)) + MoE_FFN(LN(x))`` with one shared RMSNorm
  (``shared_norm=True``; ``False`` gives each branch its own norm - the paper leaves this unverified).
* **Upcycling** (``upcycle``): expert leaves (``wq, wk, wv, wo`` of attention, ``w_gate, w_up, w_down`` of the
  FFN) are the dense models' leaves stacked along the expert axis; with ``kv_shared`` ``wk, wv`` are their average;
  routers keep the fresh initialisation of the target model; every other parameter (embedding, norms, head) is
  the average of the dense models.

``ParallelMoELM`` is the byte LM made of these blocks (embedding tied to the output head, RoPE, causal). With
``num_experts=1`` it is a dense parallel-block transformer: that is the dense model the experiment branches.

Defaults and deliberate deviations: the FFN router is top-2 renormalised (k unverified in the paper; with N=2
that is a soft mixture of both FFNs); router weights start at zero-mean LeCun normal; no biases; RoPE on q and k;
``impl`` is ``jattn.attention``'s.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.core import checks
from jattn.methods.routing.moh import load_balance_loss
from jattn.nn.attention import apply_rope
from jattn.ops.attention import attention

__all__ = ["soft_mixture_of_attention", "moe_ffn", "upcycle", "SoftMoA", "MoEFFN", "ParallelMoEBlock",
           "ParallelMoELM", "EXPERT_KEYS", "KV_KEYS", "ROUTER_KEYS"]

EXPERT_KEYS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
KV_KEYS = ("wk", "wv")
ROUTER_KEYS = ("router", "ffn_router")


# ------------------------------------------------------------------------------------------------
# pure functions


def _check_attn_params(expert_params, dim, num_heads, num_kv_heads, kv_shared):
    if not isinstance(expert_params, dict):
        raise TypeError(f"expert_params must be a dict with wq, wk, wv, wo, got {type(expert_params).__name__}")
    if set(expert_params) != {"wq", "wk", "wv", "wo"}:
        raise ValueError(f"expert_params must hold exactly ['wk', 'wo', 'wq', 'wv'], got {sorted(expert_params)}")
    wq, wk, wv, wo = (expert_params[n] for n in ("wq", "wk", "wv", "wo"))
    for name, w in expert_params.items():
        checks.check_float_array(f"expert_params[{name!r}]", w, 3)
    N = wq.shape[0]
    H = checks.check_int("num_heads", num_heads, 1)
    if wq.shape[1] != dim or wq.shape[2] % H:
        raise ValueError(f"expert_params['wq'] must be [N, dim={dim}, H*D] with H={H}, got {checks.describe(wq)}")
    D = wq.shape[2] // H
    Hkv = H if num_kv_heads is None else checks.check_int("num_kv_heads", num_kv_heads, 1)
    if H % Hkv:
        raise ValueError(f"num_heads={H} must be a multiple of num_kv_heads={Hkv}")
    n_kv = 1 if kv_shared else N
    for name, w in (("wk", wk), ("wv", wv)):
        if tuple(w.shape) != (n_kv, dim, Hkv * D):
            raise ValueError(f"expert_params[{name!r}] must be [{n_kv}, dim={dim}, Hkv*D={Hkv * D}] "
                             f"(kv_shared={kv_shared}), got {checks.describe(w)}")
    if tuple(wo.shape) != (N, H * D, dim):
        raise ValueError(f"expert_params['wo'] must be [N={N}, H*D={H * D}, dim={dim}], got {checks.describe(wo)}")
    return N, H, Hkv, D


def soft_mixture_of_attention(x, expert_params: dict, router_w, *, num_heads: int, num_kv_heads: int | None = None,
                              kv_shared: bool = False, causal: bool = True, rope: bool = False,
                              rope_theta: float = 10000.0, positions=None, scale: float | None = None,
                              impl: str = "auto", return_gates: bool = False):
    """BAM's soft mixture of attention experts ``sum_e softmax(x W_r)_e MHA_e(x)``.

    Args:
      x: ``[B, T, dim]``.
      expert_params: ``{"wq": [N, dim, H*D], "wk", "wv": [N | 1, dim, Hkv*D], "wo": [N, H*D, dim]}`` (the kv
        leading axis is 1 with ``kv_shared``).
      router_w: ``[dim, N]``.
      num_heads, num_kv_heads: H and Hkv of every expert (Hkv defaults to H).
      kv_shared: BAM's variant (b): one K/V shared by the experts (GQA-style single call).
      causal, rope, rope_theta, positions (``[B|1, T]``, default ``arange(T)``), scale, impl: as ``jattn.attention``
        and ``jattn.nn.Attention``.
      return_gates: also return ``g [B, T, N]`` (float32).

    Returns:
      ``[B, T, dim]`` in x's dtype (and the gates).
    """
    checks.check_float_array("x", x, 3)
    checks.check_choice("impl", impl, checks.IMPLS)
    B, T, dim = x.shape
    N, H, Hkv, D = _check_attn_params(expert_params, dim, num_heads, num_kv_heads, kv_shared)
    checks.check_float_array("router_w", router_w, 2)
    if tuple(router_w.shape) != (dim, N):
        raise ValueError(f"router_w must be [dim={dim}, N={N}], got {checks.describe(router_w)}")
    if positions is None:
        positions = jnp.arange(T)[None]
    x32 = x.astype(jnp.float32)
    g = jax.nn.softmax(x32 @ router_w.astype(jnp.float32), axis=-1)                          # [B, T, N]
    q = jnp.einsum("btc,ncf->btnf", x, expert_params["wq"]).reshape(B, T, N, H, D)
    if kv_shared:
        k = jnp.einsum("btc,cf->btf", x, expert_params["wk"][0]).reshape(B, T, Hkv, D)
        v = jnp.einsum("btc,cf->btf", x, expert_params["wv"][0]).reshape(B, T, Hkv, D)
        q = jnp.swapaxes(q, 2, 3).reshape(B, T, H * N, D)                                   # head-major: h*N + e
    else:
        k = jnp.einsum("btc,ncf->btnf", x, expert_params["wk"]).reshape(B, T, N * Hkv, D)   # expert-major
        v = jnp.einsum("btc,ncf->btnf", x, expert_params["wv"]).reshape(B, T, N * Hkv, D)
        q = q.reshape(B, T, N * H, D)
    if rope:
        q = apply_rope(q, positions, theta=rope_theta)
        k = apply_rope(k, positions, theta=rope_theta)
    o = attention(q, k, v, causal=causal, scale=scale, impl=impl)
    if kv_shared:
        o = jnp.swapaxes(o.reshape(B, T, H, N, D), 2, 3)                                    # [B, T, N, H, D]
    o = o.reshape(B, T, N, H * D).astype(jnp.float32)
    y = jnp.einsum("btn,btnf,nfc->btc", g, o, expert_params["wo"].astype(jnp.float32)).astype(x.dtype)
    return (y, g) if return_gates else y


def moe_ffn(x, expert_params: dict, router_w, *, top_k: int):
    """Token-choice top-k SwiGLU MoE: ``sum_{e in topk} w_e W_down^e (silu(x W_gate^e) * x W_up^e)`` with
    ``w = p m / sum(p m)``, ``p = softmax(x W_f)``, ``m`` the top-k indicator.

    ``expert_params``: ``{"w_gate", "w_up": [N, dim, F], "w_down": [N, F, dim]}``; ``router_w [dim, N]``.
    Returns ``(y [B, T, dim], aux)``: aux is MoH's ``load_balance_loss(p, m)`` (``top_k`` when balanced)."""
    checks.check_float_array("x", x)
    if not isinstance(expert_params, dict) or set(expert_params) != {"w_gate", "w_up", "w_down"}:
        got = sorted(expert_params) if isinstance(expert_params, dict) else type(expert_params).__name__
        raise ValueError(f"expert_params must be a dict holding exactly ['w_down', 'w_gate', 'w_up'], got {got}")
    dim = x.shape[-1]
    N, _, F = jnp.shape(expert_params["w_gate"])
    for name, shape in (("w_gate", (N, dim, F)), ("w_up", (N, dim, F)), ("w_down", (N, F, dim))):
        if tuple(jnp.shape(expert_params[name])) != shape:
            raise ValueError(f"expert_params[{name!r}] must be {shape}, got {checks.describe(expert_params[name])}")
    if tuple(jnp.shape(router_w)) != (dim, N):
        raise ValueError(f"router_w must be [dim={dim}, N={N}], got {checks.describe(router_w)}")
    k = checks.check_int("top_k", top_k, 1)
    if k > N:
        raise ValueError(f"top_k must be <= the {N} experts, got {top_k}")
    p = jax.nn.softmax(x.astype(jnp.float32) @ router_w.astype(jnp.float32), axis=-1)
    _, idx = jax.lax.top_k(p, k)
    m = jnp.sum(jax.nn.one_hot(idx, N, dtype=jnp.float32), axis=-2)
    w = p * m
    w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), jnp.finfo(jnp.float32).eps)
    h = jax.nn.silu(jnp.einsum("...c,ncf->...nf", x, expert_params["w_gate"])) * \
        jnp.einsum("...c,ncf->...nf", x, expert_params["w_up"])
    y = jnp.einsum("...n,...nf,nfc->...c", w, h.astype(jnp.float32), expert_params["w_down"].astype(jnp.float32))
    return y.astype(x.dtype), load_balance_loss(p, m)


def _leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, prefix + (key,))
    else:
        yield prefix, tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def upcycle(dense_param_list: Sequence[dict], init_params: dict, *, kv_shared: bool = False) -> dict:
    """BAM's upcycling: the parameters of an N-expert model built from N dense models.

    Args:
      dense_param_list: N pure parameter dicts of dense models (``ParallelMoELM`` with one expert:
        ``nnx.state(model, nnx.Param).to_pure_dict()``); expert leaves have a leading expert axis of 1.
      init_params: the pure parameter dict of the freshly initialised N-expert target (its routers are kept).
      kv_shared: the target shares K/V: its ``wk, wv`` are the dense models' average (leading axis 1).

    Returns:
      A pure dict shaped like ``init_params``: expert leaves (``EXPERT_KEYS``) stacked along axis 0 (``wk, wv``
      averaged with ``kv_shared``), router leaves (``ROUTER_KEYS``) from ``init_params``, the rest averaged.
    """
    if not isinstance(dense_param_list, (list, tuple)) or not dense_param_list:
        raise ValueError(f"dense_param_list must be a non-empty list of parameter dicts, got {dense_param_list!r:.80}")
    if not all(isinstance(d, dict) for d in dense_param_list) or not isinstance(init_params, dict):
        raise TypeError("dense_param_list entries and init_params must be pure dicts (State.to_pure_dict())")
    paths = [p for p, _ in _leaves(init_params)]
    for i, dense in enumerate(dense_param_list):
        dense_paths = sorted(map(str, (p for p, _ in _leaves(dense))))
        if dense_paths != sorted(map(str, paths)):
            raise ValueError(f"dense_param_list[{i}] has other parameters than init_params: "
                             f"{sorted(set(dense_paths) ^ set(map(str, paths)))[:4]}")
    out: dict = {}
    for path in paths:
        name, target = path[-1], _get(init_params, path)
        stack = [jnp.asarray(_get(d, path)) for d in dense_param_list]
        if name in ROUTER_KEYS:
            value = target
        elif name in EXPERT_KEYS and not (kv_shared and name in KV_KEYS):
            value = jnp.concatenate(stack, axis=0)
        else:
            value = jnp.mean(jnp.stack(stack), axis=0)
        if tuple(jnp.shape(value)) != tuple(jnp.shape(target)):
            raise ValueError(f"upcycled {'/'.join(map(str, path))} has shape {tuple(jnp.shape(value))}, the target "
                             f"expects {tuple(jnp.shape(target))} (N experts = len(dense_param_list)?)")
        _set(out, path, value.astype(jnp.asarray(target).dtype))
    return out


# ------------------------------------------------------------------------------------------------
# NNX modules


def _param(rngs, shape, fan_in, dtype):
    return nnx.Param(jax.random.normal(rngs.params(), shape, dtype) / np.sqrt(fan_in))


class SoftMoA(nnx.Module):
    """BAM's soft mixture of attention experts (``soft_mixture_of_attention``) as an NNX layer:
    ``x [B, T, dim] -> [B, T, dim]``; ``num_experts=1`` is plain multi-head attention."""

    def __init__(self, dim: int, num_heads: int, num_experts: int, *, rngs: nnx.Rngs, num_kv_heads: int | None = None,
                 head_dim: int | None = None, kv_shared: bool = False, causal: bool = True, rope: bool = True,
                 rope_theta: float = 10000.0, impl: str = "auto", param_dtype=jnp.float32):
        self.dim = checks.check_int("dim", dim, 1)
        self.num_heads = checks.check_int("num_heads", num_heads, 1)
        self.num_experts = checks.check_int("num_experts", num_experts, 1)
        self.num_kv_heads = self.num_heads if num_kv_heads is None else checks.check_int("num_kv_heads", num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if head_dim is None and dim % num_heads:
            raise ValueError(f"dim={dim} must be a multiple of num_heads={num_heads} (or pass head_dim)")
        self.head_dim = dim // num_heads if head_dim is None else checks.check_int("head_dim", head_dim, 1)
        checks.check_choice("impl", impl, checks.IMPLS)
        self.kv_shared, self.causal, self.rope = bool(kv_shared), causal, rope
        self.rope_theta, self.impl = rope_theta, impl
        N, H, Hkv, D = self.num_experts, self.num_heads, self.num_kv_heads, self.head_dim
        n_kv = 1 if kv_shared else N
        self.wq = _param(rngs, (N, dim, H * D), dim, param_dtype)
        self.wk = _param(rngs, (n_kv, dim, Hkv * D), dim, param_dtype)
        self.wv = _param(rngs, (n_kv, dim, Hkv * D), dim, param_dtype)
        self.wo = _param(rngs, (N, H * D, dim), H * D, param_dtype)
        self.router = _param(rngs, (dim, N), dim, param_dtype)

    def expert_params(self) -> dict:
        return {"wq": self.wq[...], "wk": self.wk[...], "wv": self.wv[...], "wo": self.wo[...]}

    def __call__(self, x, *, positions=None, return_gates: bool = False):
        return soft_mixture_of_attention(x, self.expert_params(), self.router[...], num_heads=self.num_heads,
                                         num_kv_heads=self.num_kv_heads, kv_shared=self.kv_shared, causal=self.causal,
                                         rope=self.rope, rope_theta=self.rope_theta, positions=positions,
                                         impl=self.impl, return_gates=return_gates)


class MoEFFN(nnx.Module):
    """Token-choice top-k SwiGLU experts (``moe_ffn``); ``num_experts=1`` is a dense SwiGLU MLP.
    ``__call__(x) -> (y, load_balance_loss)``."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, *, rngs: nnx.Rngs, top_k: int = 2,
                 param_dtype=jnp.float32):
        N = checks.check_int("num_experts", num_experts, 1)
        F = checks.check_int("hidden_dim", hidden_dim, 1)
        self.top_k = min(checks.check_int("top_k", top_k, 1), N)
        self.w_gate = _param(rngs, (N, dim, F), dim, param_dtype)
        self.w_up = _param(rngs, (N, dim, F), dim, param_dtype)
        self.w_down = _param(rngs, (N, F, dim), F, param_dtype)
        self.ffn_router = _param(rngs, (dim, N), dim, param_dtype)

    def __call__(self, x):
        params = {"w_gate": self.w_gate[...], "w_up": self.w_up[...], "w_down": self.w_down[...]}
        return moe_ffn(x, params, self.ffn_router[...], top_k=self.top_k)


class ParallelMoEBlock(nnx.Module):
    """BAM's parallel block ``y = x + MoA(LN(x)) + MoE_FFN(LN(x))``; ``__call__(x) -> (y, aux)`` (aux: the FFN
    router's load-balance loss). ``shared_norm=False`` gives the FFN branch its own RMSNorm."""

    def __init__(self, dim: int, num_heads: int, num_experts: int, *, rngs: nnx.Rngs, mlp_dim: int | None = None,
                 ffn_top_k: int = 2, kv_shared: bool = False, shared_norm: bool = True, num_kv_heads: int | None = None,
                 rope: bool = True, causal: bool = True, impl: str = "auto", param_dtype=jnp.float32):
        self.attn_norm = nnx.RMSNorm(dim, rngs=rngs, param_dtype=param_dtype)
        self.ffn_norm = None if shared_norm else nnx.RMSNorm(dim, rngs=rngs, param_dtype=param_dtype)
        self.moa = SoftMoA(dim, num_heads, num_experts, rngs=rngs, num_kv_heads=num_kv_heads, kv_shared=kv_shared,
                           causal=causal, rope=rope, impl=impl, param_dtype=param_dtype)
        self.ffn = MoEFFN(dim, 4 * dim if mlp_dim is None else mlp_dim, num_experts, rngs=rngs, top_k=ffn_top_k,
                          param_dtype=param_dtype)

    def __call__(self, x, *, positions=None):
        checks.check_float_array("x", x, 3)
        h = self.attn_norm(x)
        f, aux = self.ffn(h if self.ffn_norm is None else self.ffn_norm(x))
        return x + self.moa(h, positions=positions) + f, aux


class ParallelMoELM(nnx.Module):
    """Byte LM of ``ParallelMoEBlock`` s: ``tokens [B, T] -> (logits [B, T, V] float32, mean aux loss)``; tied
    embedding, final RMSNorm. ``num_experts=1`` is the dense model BAM branches and upcycles."""

    def __init__(self, vocab_size: int, dim: int, num_layers: int, num_heads: int, num_experts: int = 1, *,
                 rngs: nnx.Rngs, **block_kwargs):
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.blocks = nnx.List([ParallelMoEBlock(dim, num_heads, num_experts, rngs=rngs, **block_kwargs)
                                for _ in range(checks.check_int("num_layers", num_layers, 1))])
        self.final_norm = nnx.RMSNorm(dim, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        aux = []
        for block in self.blocks:
            x, a = block(x)
            aux.append(a)
        logits = self.embed.attend(self.final_norm(x)).astype(jnp.float32)
        return logits, jnp.mean(jnp.stack(aux))
