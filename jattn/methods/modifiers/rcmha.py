"""P31 RCMHA: relative convolutional multi-head attention (arXiv 2308.03429).

Per head, after the Q/K/V projections:

1. a depthwise causal 1-D convolution along the sequence on each of Q, K and V (Primer's Multi-DConv-Head
   Attention: one kernel of width 3 per channel, left zero padding, so position t sees t-2..t);
2. Transformer-XL relative scores ``A_ij = (q_i + u) . k_j + (q_i + v) . R_{i-j}``, ``R = W_R r`` with ``r``
   the sinusoidal encoding of the distance ``i - j`` and ``u, v`` learned per head;
3. scale ``1/sqrt(d)``, causal mask, softmax, times V. The ``R`` term is laid out with XL's ``rel_shift`` trick
   (one ``[T, T]`` product against the ``T`` distances, then a pad-reshape that slides row ``i`` by ``T-1-i``).

The paper gives no code and few details (spec P31: kernel 3 assumed). Deliberate choices: the convolution
kernels start as the identity (a delta at the current position) and ``u, v`` at zero, so an untrained RCMHA
differs from causal MHA only by the relative term; the reference computation is dense (the relative term goes to
``jattn.attention`` as a bias), so this layer is for modelling, not long sequences, and it has no decoding cache.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.core import checks
from jattn.ops.attention import attention


def _check_qkv_like(name: str, x, ndim: int = 4):
    if not hasattr(x, "ndim") or x.ndim != ndim:
        raise ValueError(f"{name} must be a float array with {ndim} axes [B, T, H, D], got {checks.describe(x)}")


def causal_depthwise_conv(x, kernel):
    """``out[b, t, c] = sum_j kernel[j, c] * x[b, t - (K-1) + j, c]`` with zeros before the start.

    x: ``[B, T, *C]``; kernel: ``[K, *C]`` (one width-K filter per channel; ``kernel[K-1]`` weighs the current
    position)."""
    width = kernel.shape[0]
    padded = jnp.pad(x, [(0, 0), (width - 1, 0)] + [(0, 0)] * (x.ndim - 2))
    length = x.shape[1]
    return sum(kernel[j] * jax.lax.dynamic_slice_in_dim(padded, j, length, axis=1) for j in range(width))


def dconv_qkv(q, k, v, kernels, causal: bool = True):
    """Primer's depthwise convolution on each of q, k, v ``[B, T, H, D]``; ``kernels`` ``[3, K, H, D]``.

    ``causal=False`` centres the filter (odd K): position t sees ``t - K//2 .. t + K//2``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_qkv_like(name, x)
    if kernels.ndim != 4 or kernels.shape[0] != 3 or kernels.shape[2:] != q.shape[2:]:
        raise ValueError(f"kernels must be [3, K, H, D] = [3, K, {q.shape[2]}, {q.shape[3]}], got "
                         f"{checks.describe(kernels)}")
    width = kernels.shape[1]
    if not causal and width % 2 == 0:
        raise ValueError(f"a centred (causal=False) convolution needs an odd kernel width, got K={width}")

    def conv(x, kernel):
        if causal:
            return causal_depthwise_conv(x, kernel)
        shifted = causal_depthwise_conv(jnp.pad(x, [(0, 0), (0, width // 2), (0, 0), (0, 0)]), kernel)
        return shifted[:, width // 2:]

    return conv(q, kernels[0]), conv(k, kernels[1]), conv(v, kernels[2])


def sinusoid_encoding(distances, dim: int):
    """Transformer-XL's encoding of (float) distances: ``[sin(d * f), cos(d * f)]``, ``f_i = 10000^(-2i/dim)``."""
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = jnp.asarray(distances, jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def rel_shift(x):
    """XL's shift: ``x[..., i, m]`` scored against distance ``T-1-m`` becomes ``out[..., i, j]`` at distance
    ``i - j`` for every ``j <= i`` (the entries above the diagonal are leftovers that a causal mask drops)."""
    *lead, t, s = x.shape
    padded = jnp.concatenate([jnp.zeros((*lead, t, 1), x.dtype), x], axis=-1)
    return padded.reshape(*lead, s + 1, t)[..., 1:, :].reshape(*lead, t, s)


def relative_gather(x):
    """The explicit form of :func:`rel_shift`: ``out[..., i, j] = x[..., i, T-1-(i-j)]`` (0 where ``j > i``)."""
    t = x.shape[-2]
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    index = jnp.clip(t - 1 - (i - j), 0, t - 1)
    gathered = jnp.take_along_axis(x, jnp.broadcast_to(index, x.shape), axis=-1)
    return jnp.where(j <= i, gathered, 0)


def relative_attention_xl(q, k, v, rel, u, v_bias, *, causal: bool = True, scale: float | None = None,
                          return_probs: bool = False):
    """Transformer-XL attention on ``q, k, v [B, T, H, D]``.

    rel: ``[T, H, D]`` projected encodings ``W_R r`` of the distances ``T-1, ..., 1, 0`` (XL's order);
    u, v_bias: ``[H, D]``. Causal only (the rel-shift layout covers the distances ``0..T-1``).
    Returns ``[B, T, H, D]`` (and the probabilities ``[B, H, T, T]`` with ``return_probs``)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_qkv_like(name, x)
    b, t, h, d = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape [B, T, H, D], got {q.shape}, {k.shape}, {v.shape}")
    if rel.shape != (t, h, d):
        raise ValueError(f"rel must be [T, H, D] = {(t, h, d)}, got {checks.describe(rel)}")
    for name, bias in (("u", u), ("v_bias", v_bias)):
        if bias.shape != (h, d):
            raise ValueError(f"{name} must be [H, D] = {(h, d)}, got {checks.describe(bias)}")
    if not causal:
        raise ValueError("relative_attention_xl is causal only (causal=True), got causal=False")
    scale = d ** -0.5 if scale is None else scale
    position_scores = rel_shift(jnp.einsum("bthd,mhd->bhtm", q + v_bias, rel))
    result = attention(q + u, k, v, bias=position_scores * scale, causal=True, scale=scale, impl="reference")
    if not return_probs:
        return result
    logits = (jnp.einsum("bthd,bshd->bhts", q + u, k) + position_scores) * scale
    visible = jnp.tril(jnp.ones((t, t), bool))
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    return result, probs


class RCMHA(nnx.Module):
    """Relative convolutional MHA as a drop-in for a causal :class:`jattn.nn.Attention` (``x [B, T, dim]``).

    Same call signature as ``Attention`` (``mask``/``positions`` must be None; no decoding cache)."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, kernel_size: int = 3, use_bias: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim={dim} must split into num_heads={num_heads} heads of an even size")
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.num_heads, self.head_dim, self.dim = num_heads, dim // num_heads, dim
        linear = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = (nnx.Linear(dim, dim, **linear) for _ in range(3))
        self.out_proj = nnx.Linear(dim, dim, **linear)
        self.rel_proj = nnx.Linear(dim, dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        delta = jnp.zeros((3, kernel_size, num_heads, self.head_dim), param_dtype).at[:, -1].set(1.0)
        self.conv_kernels = nnx.Param(delta)
        self.u = nnx.Param(jnp.zeros((num_heads, self.head_dim), param_dtype))
        self.v_bias = nnx.Param(jnp.zeros((num_heads, self.head_dim), param_dtype))

    def __call__(self, x, *, mask=None, positions=None, return_probs: bool = False, decode: bool = False,
                 prefill: bool = False):
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, dim={self.dim}], got {checks.describe(x)}")
        if mask is not None or positions is not None:
            raise ValueError("RCMHA is causal with relative positions of its own: mask and positions must be None")
        if decode or prefill:
            raise ValueError("RCMHA has no decoding cache (decode=False, prefill=False); generate with full "
                             "forward passes")
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
        q, k, v = dconv_qkv(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                            self.conv_kernels[...], causal=True)
        encodings = sinusoid_encoding(jnp.arange(t - 1, -1, -1), self.dim)
        rel = self.rel_proj(encodings).reshape(t, self.num_heads, self.head_dim)
        result = relative_attention_xl(q, k, v, rel, self.u[...], self.v_bias[...], return_probs=return_probs)
        out, probs = result if return_probs else (result, None)
        out = self.out_proj(out.reshape(b, t, self.dim))
        return (out, probs) if return_probs else out


def rcmha_lm(vocab_size: int, dim: int, num_layers: int, num_heads: int, *, rngs: nnx.Rngs, kernel_size: int = 3,
             **lm_kwargs):
    """A :class:`jattn.nn.DecoderLM` whose every attention is :class:`RCMHA` (no RoPE: RCMHA's positions are its
    relative term)."""
    from jattn.nn.models import DecoderLM

    model = DecoderLM(vocab_size, dim, num_layers, num_heads, rngs=rngs, rope=False, **lm_kwargs)
    for block in model.blocks:
        block.attention = RCMHA(dim, num_heads, rngs=rngs, kernel_size=kernel_size)
    return model
