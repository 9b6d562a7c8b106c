"""P42 PSA: Polarized Self-Attention, as an NNX layer on ``[B, H, W, C]`` (parallel and sequential layouts).

Paper form (``variant="paper"``, the default), with ``Ci = C // 2`` and all projections 1x1 convs without bias:

* channel-only branch: ``q = softmax_HW(x W_q)`` (``W_q: C -> 1``), ``ctx = sum_HW q * (x W_v)`` (``W_v: C -> Ci``),
  ``A_ch = sigmoid(LN(ctx W_z))`` (``W_z: Ci -> C``; LayerNorm over the C channels, affine, eps 1e-5) -> [B,1,1,C];
  ``Z_ch = A_ch * x``.
* spatial-only branch: ``g = softmax_Ci(GAP(x W_q'))`` (``W_q': C -> Ci``), ``A_sp = sigmoid(sum_Ci g * (x W_v'))``
  (``W_v': C -> Ci``) -> [B,H,W,1]; ``Z_sp = A_sp * x``.
* ``layout="parallel"``: ``Z = Z_ch + Z_sp``; ``layout="sequential"``: ``Z = Z_sp(Z_ch(x))`` (the spatial branch
  runs on the channel branch's output).

Official code (DeLightCMU/PSA ``semantic-segmentation/network/PSA.py``) differs; both forms are exposed:

* ``variant="code_p"`` (``PSA_p``): channel branch without LN (``sigmoid(ctx W_z)``); spatial branch
  ``A_sp = sigmoid(softmax_HW(sum_Ci GAP(x W_q') * (x W_v')))`` -- no softmax over Ci, a softmax over HW instead.
* ``variant="code_s"`` (``PSA_s``): channel branch bottleneck ``ctx -> 1x1 conv Ci -> Ci/4 (bias) -> LN(Ci/4) -> ReLU
  -> 1x1 conv Ci/4 -> C (bias) -> sigmoid``; spatial branch ``A_sp = sigmoid(sum_Ci GAP(x W_q') * softmax_HW(x W_v'))``.

The official modules are ``PSA_p = (variant="code_p", layout="parallel")`` and ``PSA_s = (variant="code_s",
layout="sequential")``; ``layout`` and ``variant`` are independent switches here. Init: kaiming normal, fan_in,
gain 2 (mmcv ``kaiming_init(mode="fan_in")``) for every weight, biases 0, LN scale 1 / bias 0.
Deliberate deviations: the code's ``planes`` (output channels) equals ``inplanes`` here, as in every official use;
the ``code_s`` bottleneck convs get the same kaiming init (the code leaves them at PyTorch's default).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["PolarizedSelfAttention", "psa_channel", "psa_channel_bottleneck", "psa_spatial", "layer_norm"]

_VARIANTS = ("paper", "code_p", "code_s")
_LAYOUTS = ("parallel", "sequential")


def _check_image(x, channels=None):
    if x.ndim != 4:
        raise ValueError(f"x must be [B, H, W, C] (channels-last), got shape {x.shape}")
    if channels is not None and x.shape[-1] != channels:
        raise ValueError(f"x must have {channels} channels in its last axis ([B, H, W, C]), got shape {x.shape}")


def _check_weight(w, name, shape):
    if jnp.shape(w) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {jnp.shape(w)}")


def layer_norm(z, scale, bias, eps=1e-5):
    """LayerNorm over the last axis with a per-channel affine."""
    mu = jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.var(z, axis=-1, keepdims=True)
    return (z - mu) / jnp.sqrt(var + eps) * scale + bias


def _hw_softmax(z):
    b, h, w, c = z.shape
    return jax.nn.softmax(z.reshape(b, h * w, c), axis=1).reshape(b, h, w, c)


def _channel_context(x, wq, wv):
    c = x.shape[-1]
    _check_weight(wq, "wq", (c, 1))
    if jnp.ndim(wv) != 2 or jnp.shape(wv)[0] != c:
        raise ValueError(f"wv must have shape ({c}, Ci), got {jnp.shape(wv)}")
    xf = x.astype(jnp.float32)
    q = _hw_softmax(xf @ wq)                               # [B, H, W, 1]
    return jnp.sum(q * (xf @ wv), axis=(1, 2))             # [B, Ci]


@functools.partial(jax.jit, static_argnames=("eps",))
def psa_channel(x, wq, wv, wz, ln_scale=None, ln_bias=None, *, eps=1e-5):
    """Channel-only branch; returns ``(A_ch * x, A_ch [B, 1, 1, C])``. LN (paper) iff ``ln_scale`` is given."""
    _check_image(x)
    c = x.shape[-1]
    ctx = _channel_context(x, wq, wv)
    _check_weight(wz, "wz", (ctx.shape[-1], c))
    z = ctx @ wz
    if (ln_scale is None) != (ln_bias is None):
        raise ValueError("ln_scale and ln_bias must both be given (paper LN) or both be None (code_p)")
    if ln_scale is not None:
        z = layer_norm(z, ln_scale, ln_bias, eps)
    a = jax.nn.sigmoid(z)[:, None, None, :]
    return (x.astype(jnp.float32) * a).astype(x.dtype), a


@functools.partial(jax.jit, static_argnames=("eps",))
def psa_channel_bottleneck(x, wq, wv, w1, b1, ln_scale, ln_bias, w2, b2, *, eps=1e-5):
    """``PSA_s`` channel branch: ``sigmoid(W2 relu(LN(W1 ctx + b1)) + b2)``; returns ``(A_ch * x, A_ch)``."""
    _check_image(x)
    ctx = _channel_context(x, wq, wv)
    z = jax.nn.relu(layer_norm(ctx @ w1 + b1, ln_scale, ln_bias, eps)) @ w2 + b2
    if z.shape[-1] != x.shape[-1]:
        raise ValueError(f"w2 must map to C={x.shape[-1]} channels, got w2 of shape {jnp.shape(w2)}")
    a = jax.nn.sigmoid(z)[:, None, None, :]
    return (x.astype(jnp.float32) * a).astype(x.dtype), a


@functools.partial(jax.jit, static_argnames=("variant",))
def psa_spatial(x, wq, wv, *, variant="paper"):
    """Spatial-only branch; returns ``(A_sp * x, A_sp [B, H, W, 1])``. ``variant`` as in the module docstring."""
    _check_image(x)
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
    c = x.shape[-1]
    if jnp.ndim(wq) != 2 or jnp.shape(wq)[0] != c or jnp.shape(wv) != jnp.shape(wq):
        raise ValueError(f"wq and wv must both have shape ({c}, Ci), got {jnp.shape(wq)} and {jnp.shape(wv)}")
    xf = x.astype(jnp.float32)
    g = jnp.mean(xf @ wq, axis=(1, 2))[:, None, None, :]   # GAP -> [B, 1, 1, Ci]
    v = xf @ wv                                            # [B, H, W, Ci]
    if variant == "paper":
        s = jnp.sum(jax.nn.softmax(g, axis=-1) * v, axis=-1, keepdims=True)
    elif variant == "code_p":
        s = _hw_softmax(jnp.sum(g * v, axis=-1, keepdims=True))
    else:
        s = jnp.sum(g * _hw_softmax(v), axis=-1, keepdims=True)
    a = jax.nn.sigmoid(s)
    return (x.astype(jnp.float32) * a).astype(x.dtype), a


class PolarizedSelfAttention(nnx.Module):
    """``PolarizedSelfAttention(channels, layout=..., variant=...)``: ``__call__(x)``; ``gates(x) -> (A_ch, A_sp)``."""

    def __init__(self, channels: int, *, layout: str = "parallel", variant: str = "paper", rngs: nnx.Rngs):
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 2 or channels % 2:
            raise ValueError(f"channels must be an even int >= 2 (inner channels C/2), got {channels!r}")
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        ci = channels // 2
        if variant == "code_s" and ci % 4:
            raise ValueError(f"variant='code_s' needs channels divisible by 8 (bottleneck C/8), got {channels}")
        self.channels, self.layout, self.variant = channels, layout, variant
        init = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")

        def w(shape):
            return nnx.Param(init(rngs.params(), shape, jnp.float32))

        self.ch_wq, self.ch_wv = w((channels, 1)), w((channels, ci))
        self.sp_wq, self.sp_wv = w((channels, ci)), w((channels, ci))
        if variant == "code_s":
            r = ci // 4
            self.up_w1, self.up_b1 = w((ci, r)), nnx.Param(jnp.zeros((r,), jnp.float32))
            self.ln_scale, self.ln_bias = nnx.Param(jnp.ones((r,), jnp.float32)), nnx.Param(jnp.zeros((r,)))
            self.up_w2, self.up_b2 = w((r, channels)), nnx.Param(jnp.zeros((channels,), jnp.float32))
        else:
            self.ch_wz = w((ci, channels))
            if variant == "paper":
                self.ln_scale = nnx.Param(jnp.ones((channels,), jnp.float32))
                self.ln_bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def _channel(self, x):
        if self.variant == "code_s":
            return psa_channel_bottleneck(x, self.ch_wq[...], self.ch_wv[...], self.up_w1[...], self.up_b1[...],
                                          self.ln_scale[...], self.ln_bias[...], self.up_w2[...], self.up_b2[...])
        if self.variant == "paper":
            return psa_channel(x, self.ch_wq[...], self.ch_wv[...], self.ch_wz[...], self.ln_scale[...],
                               self.ln_bias[...])
        return psa_channel(x, self.ch_wq[...], self.ch_wv[...], self.ch_wz[...])

    def _spatial(self, x):
        return psa_spatial(x, self.sp_wq[...], self.sp_wv[...], variant=self.variant)

    def gates(self, x):
        """``(A_ch, A_sp)``; in the sequential layout ``A_sp`` is computed on ``Z_ch``."""
        _check_image(x, self.channels)
        z_ch, a_ch = self._channel(x)
        _, a_sp = self._spatial(z_ch if self.layout == "sequential" else x)
        return a_ch, a_sp

    def __call__(self, x):
        _check_image(x, self.channels)
        z_ch, _ = self._channel(x)
        if self.layout == "sequential":
            return self._spatial(z_ch)[0]
        return (z_ch.astype(jnp.float32) + self._spatial(x)[0].astype(jnp.float32)).astype(x.dtype)
