"""P50 — When Attention Sink Emerges in Language Models: An Empirical View (the attention variants).

The similarity variants the paper trains (``lit_gpt/model_attn_sim.py`` and ``model_attn_kernel.py`` of
sail-sg/Attention-Sink), with ``S = q k^T * scale`` and the causal 0/1 mask ``C``:

* ``sigmoid_attention``: ``W = sigmoid(S) * C`` (or ``(elu(S) + 1) * C``); normalised
  ``W / (rowsum(W) + 1e-8)`` or used as is; ``out = W v``. Quadratic: no row max, no softmax.
* ``kernel_attention``: ``W = phi(q) phi(k)^T * scale * C`` (``scale = 1/sqrt(d_h)`` as in the official
  ``model_attn_kernel.py``) with ``phi`` identity, elu+1 or a 2-layer ReLU MLP shared by q and k (``d_h -> d_h
  -> d_h``, no biases by default: the official layers use ``bias=config.bias`` and every released config sets
  ``bias=False``); normalised by ``max(|rowsum|, 1)`` (identity, mlp) or ``rowsum + 1e-8`` (elu), row sums of
  the scaled W. This one is a linear attention: numerator and row sums come from one chunked
  ``linear_attention`` over ``[v, 1]``.
* ``kv_bias_attention``: the learnable key/value "sink slot": a key ``k*`` and value ``v*`` (or 0)
  prepended at position 0 of every sequence, visible to every query; the slot's own query row is dropped.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jattn.core import checks
from jattn.core.reference import HIGHEST, attention_logits, reference_attention
from jattn.ops.linear import linear_attention

SIMILARITIES = ("sigmoid", "elu")
KERNEL_FEATURES = ("identity", "elu", "mlp")


def _check_same_heads(q, k, v):
    B, T, S, H, Hkv, D = checks.check_qkv(q, k, v)
    if Hkv != H:
        raise ValueError(f"expected as many k/v heads as q heads H={H}, got k {checks.describe(k)}")
    return B, T, S, H, D


def sigmoid_attention(q: Float[Array, "B T H D"], k: Float[Array, "B S Hkv D"], v: Float[Array, "B S Hkv D"], *,
                      causal: bool = True, normalize: bool = False, sim: str = "sigmoid", mask=None, scale=None,
                      bias=None, return_probs: bool = False):
    """``out = W v`` with ``W = f(q k^T * scale + bias)`` masked (``f`` sigmoid or elu+1), optionally
    row-normalised by ``rowsum(W) + 1e-8`` (the official code's epsilon). Quadratic: no row max, no softmax.

    The one sigmoid attention of jattn (``jattn.nn.sigmoid_attention`` and ``Attention(method="sigmoid")``).

    Args:
      q: queries ``[B, T, H, D]``.
      k: keys ``[B, S, Hkv, D]``, ``H`` a multiple of ``Hkv`` (GQA: query head ``h`` reads kv head
        ``h // (H // Hkv)``).
      v: values ``[B, S, Hkv, D]``.
      causal: keep only keys ``j <= i``.
      normalize: divide each row of ``W`` by its sum + 1e-8.
      sim: ``"sigmoid"`` or ``"elu"`` (``elu(s) + 1``).
      mask: a bool array broadcastable to ``[B, H, T, S]`` (True = attend), or None.
      scale: the logit scale (default ``D ** -0.5``).
      bias: added to the logits before ``f``: None, a Python float (one shift for every logit) or a float
        array broadcastable to ``[B, H, T, S]``.
      return_probs: also return the weights ``W`` actually used, ``[B, H, T, S]`` float32 (normalised only
        when ``normalize``).

    Returns:
      ``out [B, T, H, D]`` in q's dtype, or ``(out, W)`` with ``return_probs``.

    Raises:
      ValueError: a shape or a choice is invalid.
      TypeError: a dtype or a flag is invalid.
    """
    array_bias = bias if hasattr(bias, "shape") else None
    (B, T, S, H, Hkv, D), _, _, scale = checks.check_attention_args(q, k, v, mask=mask, bias=array_bias,
                                                                    scale=scale)
    checks.check_choice("sim", sim, SIMILARITIES)
    checks.check_bool("normalize", normalize)
    shift = 0.0 if bias is None or array_bias is not None else checks.check_finite_float("bias", bias)
    s = attention_logits(q, k, scale=scale, bias=array_bias) + shift
    w = jax.nn.sigmoid(s) if sim == "sigmoid" else jax.nn.elu(s) + 1.0
    visible = jnp.ones((1, 1, T, S), bool)
    if causal:
        visible = visible & jnp.tril(jnp.ones((T, S), bool))[None, None]
    if mask is not None:
        visible = visible & jnp.reshape(mask, (1,) * (4 - mask.ndim) + tuple(mask.shape))
    w = jnp.where(visible, w, 0.0)
    if normalize:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-8)
    wg = w.reshape(B, Hkv, H // Hkv, T, S)
    out = jnp.einsum("bkgts,bskd->btkgd", wg, v.astype(jnp.float32), precision=HIGHEST)
    out = out.reshape(B, T, H, v.shape[-1]).astype(q.dtype)
    return (out, w) if return_probs else out


MLP_KEYS = ({"w1", "w2"}, {"w1", "b1", "w2", "b2"})


def init_kernel_mlp(key, dim: int, hidden: int | None = None, *, bias: bool = False):
    """Parameters of the shared 2-layer ReLU MLP feature map ``relu(x W1) W2`` (``{w1, w2}``), or with
    ``bias=True`` ``relu(x W1 + b1) W2 + b2`` (``{w1, b1, w2, b2}``, biases zero). The official layers are
    ``nn.Linear(d_h, d_h, bias=config.bias)`` and the released configs all use ``bias=False``."""
    hidden = hidden or dim
    k1, k2 = jax.random.split(key)
    params = {"w1": jax.random.normal(k1, (dim, hidden)) * dim ** -0.5,
              "w2": jax.random.normal(k2, (hidden, dim)) * hidden ** -0.5}
    if bias:
        params.update(b1=jnp.zeros((hidden,)), b2=jnp.zeros((dim,)))
    return params


def kernel_features(x, feature: str, mlp_params=None):
    """``phi(x)`` for one of ``KERNEL_FEATURES`` (float32)."""
    x = x.astype(jnp.float32)
    if feature == "identity":
        return x
    if feature == "elu":
        return jax.nn.elu(x) + 1.0
    hidden = x @ mlp_params["w1"] + mlp_params.get("b1", 0.0)
    return jax.nn.relu(hidden) @ mlp_params["w2"] + mlp_params.get("b2", 0.0)


def kernel_attention(q, k, v, *, feature: str = "elu", mlp_params=None, causal: bool = True,
                     normalize: bool = True, scale: float | None = None, chunk_size: int = 64,
                     impl: str = "auto"):
    """``W = phi(q) phi(k)^T * scale`` (masked; ``scale`` default ``D ** -0.5``, the official
    ``1/sqrt(head_size)``), normalised as in the paper's code; O(T) through linear_attention."""
    D = _check_same_heads(q, k, v)[-1]
    checks.check_choice("feature", feature, KERNEL_FEATURES)
    scale = D ** -0.5 if scale is None else checks.check_positive_float("scale", scale)
    if feature == "mlp":
        if not isinstance(mlp_params, dict) or set(mlp_params) not in MLP_KEYS:
            raise TypeError(f"feature='mlp' needs mlp_params with keys w1, w2 (and optionally b1, b2; "
                            f"init_kernel_mlp), got {mlp_params!r}")
        if mlp_params["w1"].shape[0] != q.shape[-1]:
            raise ValueError(f"mlp_params['w1'] must have {q.shape[-1]} input rows, got {mlp_params['w1'].shape}")
    phi_q, phi_k = kernel_features(q, feature, mlp_params), kernel_features(k, feature, mlp_params)
    v32 = v.astype(jnp.float32)
    if not normalize:
        return linear_attention(phi_q, phi_k, v32, causal=causal, scale=scale, chunk_size=chunk_size,
                                impl=impl).astype(q.dtype)
    v_and_one = jnp.concatenate([v32, jnp.ones(v.shape[:3] + (1,), jnp.float32)], axis=-1)
    both = linear_attention(phi_q, phi_k, v_and_one, causal=causal, scale=scale, chunk_size=chunk_size, impl=impl)
    rowsum = both[..., -1:]
    denominator = rowsum + 1e-8 if feature == "elu" else jnp.maximum(jnp.abs(rowsum), 1.0)
    return (both[..., :-1] / denominator).astype(q.dtype)


def kv_bias_attention(q, k, v, k_bias, v_bias=None, *, causal: bool = True, scale=None):
    """Softmax attention with a learnable sink slot ``(k_bias, v_bias)`` (``[H, D]`` per head or ``[D]``
    shared; ``v_bias=None`` is the fixed zero value) prepended to the keys and values."""
    B, T, S, H, D = _check_same_heads(q, k, v)
    checks.check_float_array("k_bias", k_bias)
    if tuple(k_bias.shape) not in ((H, D), (D,)):
        raise ValueError(f"k_bias must have shape [H, D] = {(H, D)} or [D] = {(D,)}, got {checks.describe(k_bias)}")
    E = v.shape[-1]
    if v_bias is None:
        v_bias = jnp.zeros((H, E), v.dtype)
    checks.check_float_array("v_bias", v_bias)
    if tuple(v_bias.shape) not in ((H, E), (E,)):
        raise ValueError(f"v_bias must have shape [H, E] = {(H, E)} or [E] = {(E,)}, got {checks.describe(v_bias)}")
    slot_k = jnp.broadcast_to(k_bias.astype(k.dtype), (B, 1, H, D))
    slot_v = jnp.broadcast_to(v_bias.astype(v.dtype), (B, 1, H, E))
    keys, values = jnp.concatenate([slot_k, k], axis=1), jnp.concatenate([slot_v, v], axis=1)
    visible = jnp.ones((T, S), bool)
    if causal:
        visible = jnp.tril(visible)
    visible = jnp.concatenate([jnp.ones((T, 1), bool), visible], axis=1)
    return reference_attention(q, keys, values, mask=visible, scale=scale)
