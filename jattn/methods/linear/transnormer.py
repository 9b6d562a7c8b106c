"""P58 — Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention
(Lightning Attention-1 / TransNormerLLM).

The TransNormerLLM block, pre-norm with two sublayers (following the HF ``modeling_transnormer.py`` that
the P58 spec calls authoritative):

    x <- x + GatedLinearAttention(SRMSNorm(x))      (the code's NormLinearAttention)
    x <- x + SGLU(SRMSNorm(x))

GatedLinearAttention: ``[Q, K, V, U] = X W_qkvu``; ``Q, K = SiLU(.)``; optional LRPE on Q, K (the paper
uses it in the first layer only); per-head causal lightning attention with the non-learnable decay
``alibi_log_decay(H, layer, L)``; SRMSNorm over the concatenated heads; gate ``* U``; output projection.
SGLU: ``(X W_v * X W_u) W_o`` (no activation). SRMSNorm: ``x / (||x||_2 / sqrt(d))`` (no gain).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtyping import Array, Float

from jattn.core import checks
from jattn.core.decay import alibi_log_decay, linear_log_decay
from jattn.ops.linear import linear_attention

tnl_log_decay = alibi_log_decay  # TransNormerLLM's decay: -2^(-8(h+1)/H) * (1 - l/(L-1) + 1e-5)
DECAYS = ("alibi", "paper_linear", "none")


def srms_norm(x: Float[Array, "*batch d"], eps: float = 1e-6) -> Float[Array, "*batch d"]:
    """Simple RMSNorm over the last axis, no learnable gain: ``x / sqrt(mean(x^2) + eps)``.

    The one SRMSNorm of jattn (``jattn.nn.srms_norm`` and the ``norm="srms"`` blocks use it).

    Args:
      x: a floating array; normalised over its last axis in float32.
      eps: added to the mean square.

    Returns:
      The normalised array, in x's dtype.
    """
    checks.check_float_array("x", x)
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def tnl_decay(kind: str, num_heads: int, *, layer: int | None = None, num_layers: int = 1):
    """The per-head log-decay ``[H]`` of a TransNormerLLM layer, or None for ``kind="none"``.

    Args:
      kind: ``"alibi"`` (the official code's ``alibi_log_decay``, the default of the model), ``"paper_linear"``
        (the paper text's ``linear_log_decay``) or ``"none"``.
      num_heads: H.
      layer: the layer index (None: no per-layer factor for ``"alibi"``, layer 0 for ``"paper_linear"``).
      num_layers: the number of layers.

    Returns:
      float32 ``[H]`` log-decays, or None.
    """
    checks.check_choice("decay", kind, DECAYS)
    if kind == "alibi":
        return alibi_log_decay(num_heads, layer=layer, num_layers=num_layers)
    if kind == "paper_linear":
        return linear_log_decay(num_heads, layer=layer or 0, num_layers=num_layers)
    return None


def norm_linear_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv E"], *,
                          log_decay: Float[Array, "H"] | None = None, causal: bool = True, scale: float = 1.0,
                          output_norm: bool = True, initial_state: Float[Array, "B H D E"] | None = None,
                          return_final_state: bool = False, chunk_size: int = 64, impl: str = "auto"):
    """TransNormerLLM's NormAttention on features: decayed linear attention, then SRMSNorm over all heads.

    The attention core of ``TNLGatedLinearAttention`` and of ``jattn.nn.Attention(method="lightning")``;
    ``q, k`` are already feature-mapped (SiLU in the paper).

    Args:
      q: query features ``[B, T, H, D]``.
      k: key features ``[B, T, Hkv, D]`` (GQA as ``jattn.linear_attention``).
      v: values ``[B, T, Hkv, E]``.
      log_decay: ``[H]`` per-head log-decays (``tnl_decay``) or None.
      causal: False: the non-causal form (needs ``log_decay=None``).
      scale: multiplies the attention output (1.0 in the paper).
      output_norm: apply SRMSNorm over the heads' concatenated output.
      initial_state: ``[B, H, D, E]`` state to start from (decoding).
      return_final_state: also return the final state.
      chunk_size: chunk length of the chunked forms.
      impl: the ``jattn.linear_attention`` impl.

    Returns:
      ``out [B, T, H, E]`` in q's dtype, or ``(out, final state [B, H, D, E])`` with ``return_final_state``.
    """
    out, state = linear_attention(q, k, v, log_decay=log_decay, causal=causal, scale=scale,
                                  initial_state=initial_state, return_final_state=True, chunk_size=chunk_size,
                                  impl=impl)
    if output_norm:
        B, T, H, E = out.shape
        out = srms_norm(out.reshape(B, T, H * E)).reshape(B, T, H, E)
    return (out, state) if return_final_state else out


def lrpe_init_theta(num_heads: int, head_dim: int) -> jnp.ndarray:
    """LRPE angles ``theta_i = 10000^(-2i / (H d))`` over all ``H d`` features, shaped ``[H, d]``."""
    index = jnp.arange(num_heads * head_dim, dtype=jnp.float32)
    return (10000.0 ** (-2.0 * index / (num_heads * head_dim))).reshape(num_heads, head_dim)


def lrpe(x, theta, offset: int = 0):
    """LRPE-d: ``x [B, T, H, d] -> [x cos(theta t), x sin(theta t)]`` of width ``2d`` (t = offset + index),
    so that ``lrpe(q)_t . lrpe(k)_s = sum_f q_f k_f cos(theta_f (t - s))``."""
    checks.check_float_array("x", x, 4)
    checks.check_float_array("theta", theta, 2)
    if tuple(theta.shape) != tuple(x.shape[2:]):
        raise ValueError(f"theta must have shape [H, d] = {tuple(x.shape[2:])}, got {checks.describe(theta)}")
    positions = offset + jnp.arange(x.shape[1], dtype=jnp.float32)
    angle = positions[:, None, None] * theta.astype(jnp.float32)[None]
    x32 = x.astype(jnp.float32)
    return jnp.concatenate([x32 * jnp.cos(angle), x32 * jnp.sin(angle)], axis=-1).astype(x.dtype)


class TNLGatedLinearAttention(nnx.Module):
    """TransNormerLLM's gated linear attention (``NormLinearAttention``) on ``x [B, T, dim]``."""

    def __init__(self, dim: int, num_heads: int, *, layer: int = 0, num_layers: int = 1, use_lrpe: bool = False,
                 chunk_size: int = 64, impl: str = "auto", rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be a multiple of num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.chunk_size, self.impl = chunk_size, impl
        self.qkvu = nnx.Linear(dim, 4 * dim, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.log_decay = nnx.Variable(alibi_log_decay(num_heads, layer=layer, num_layers=num_layers))
        self.theta = nnx.Param(lrpe_init_theta(num_heads, self.head_dim)) if use_lrpe else None

    def __call__(self, x):
        B, T, dim = x.shape
        q, k, v, u = jnp.split(self.qkvu(x), 4, axis=-1)
        heads = (B, T, self.num_heads, self.head_dim)
        q, k, v = jax.nn.silu(q).reshape(heads), jax.nn.silu(k).reshape(heads), v.reshape(heads)
        if self.theta is not None:
            q, k = lrpe(q, self.theta[...]), lrpe(k, self.theta[...])
        o = norm_linear_attention(q, k, v, log_decay=self.log_decay[...], causal=True, chunk_size=self.chunk_size,
                                  impl=self.impl)
        return self.out(o.reshape(B, T, dim) * u)


class SGLU(nnx.Module):
    """Simple GLU: ``(x W_v * x W_u) W_o``, no activation."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.wv = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
        self.wu = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
        self.wo = nnx.Linear(hidden, dim, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.wo(self.wv(x) * self.wu(x))


class TNLBlock(nnx.Module):
    """``x + GLA(SRMSNorm(x))`` then ``x + SGLU(SRMSNorm(x))``."""

    def __init__(self, dim: int, num_heads: int, hidden: int, *, layer: int = 0, num_layers: int = 1,
                 use_lrpe: bool = False, chunk_size: int = 64, impl: str = "auto", rngs: nnx.Rngs):
        self.attention = TNLGatedLinearAttention(dim, num_heads, layer=layer, num_layers=num_layers,
                                                 use_lrpe=use_lrpe, chunk_size=chunk_size, impl=impl, rngs=rngs)
        self.glu = SGLU(dim, hidden, rngs=rngs)

    def __call__(self, x):
        x = x + self.attention(srms_norm(x))
        return x + self.glu(srms_norm(x))
