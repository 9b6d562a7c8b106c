"""P12 ELA: Efficient Local Attention, as an NNX layer on ``[B, H, W, C]``.

No official code (the paper gives pseudocode; third-party copies agree). With ``x`` of ``C`` channels:

    z_h = mean_W(x) [B, H, C],  z_w = mean_H(x) [B, W, C]
    y_h = sigmoid(GN(Conv1d_k(z_h))),  y_w = sigmoid(GN(Conv1d_k(z_w)))     (the SAME conv and GN for both)
    out = x * y_h[:, :, None, :] * y_w[:, None, :, :]

Conv1d: kernel ``k``, zero padding ``k // 2`` ("same"), ``conv_groups`` groups (``C`` = depthwise, or ``C/8``), no
bias. GroupNorm: ``gn_groups`` groups over (channels of the group, length), ``eps = 1e-5``, affine. No channel
reduction. ``nnx.Conv`` only stores the kernel; ``ela_apply`` (pure, jitted) does the math. Parameters: ``C * (C / conv_groups) * k + 2C``.

Variants (``ela_variant``; from reimplementations, GN group count unverified): ELA-T k=5 conv_groups=C; ELA-B k=7
conv_groups=C; ELA-S k=5 conv_groups=C/8; ELA-L k=7 conv_groups=C/8; GN 16 groups in all (the paper may use 32 for T).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ELA", "ela_apply", "ela_variant", "strip_pool", "group_norm_1d"]


def strip_pool(x):
    """``(z_h, z_w)``: means of ``[B, H, W, C]`` over W (-> [B, H, C]) and over H (-> [B, W, C])."""
    if x.ndim != 4:
        raise ValueError(f"x must be [B, H, W, C] (channels-last), got shape {x.shape}")
    xf = x.astype(jnp.float32)
    return jnp.mean(xf, axis=2), jnp.mean(xf, axis=1)


def group_norm_1d(z, scale, bias, groups, eps=1e-5):
    """GroupNorm of ``[B, L, C]``: statistics over (L, C/groups) per group, then per-channel affine."""
    b, l, c = z.shape
    zg = z.reshape(b, l, groups, c // groups)
    mu = jnp.mean(zg, axis=(1, 3), keepdims=True)
    var = jnp.var(zg, axis=(1, 3), keepdims=True)
    return ((zg - mu) / jnp.sqrt(var + eps)).reshape(b, l, c) * scale + bias


@functools.partial(jax.jit, static_argnames=("conv_groups", "gn_groups", "eps"))
def _ela_core(x, kernel, gn_scale, gn_bias, *, conv_groups, gn_groups, eps):
    k = kernel.shape[0]

    def gate(z):                                            # z [B, L, C]
        y = jax.lax.conv_general_dilated(z, kernel.astype(jnp.float32), (1,), [(k // 2, k // 2)],
                                         dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=conv_groups,
                                         precision=jax.lax.Precision.HIGHEST)
        return jax.nn.sigmoid(group_norm_1d(y, gn_scale, gn_bias, gn_groups, eps))

    z_h, z_w = strip_pool(x)
    y_h, y_w = gate(z_h), gate(z_w)
    out = x.astype(jnp.float32) * y_h[:, :, None, :] * y_w[:, None, :, :]
    return out.astype(x.dtype), y_h, y_w


def ela_apply(x, kernel, gn_scale, gn_bias, *, conv_groups, gn_groups, eps=1e-5):
    """Pure ELA: ``kernel`` ``[k, C / conv_groups, C]`` (no bias), GN affine ``[C]``; returns ``(out, y_h, y_w)``."""
    if x.ndim != 4:
        raise ValueError(f"x must be [B, H, W, C] (channels-last), got shape {x.shape}")
    c = x.shape[-1]
    if jnp.ndim(kernel) != 3 or jnp.shape(kernel)[1:] != (c // conv_groups, c) or c % conv_groups:
        raise ValueError(f"kernel must be [k, C/conv_groups, C] = [k, {c // max(conv_groups, 1)}, {c}] for x {x.shape}"
                         f" and conv_groups={conv_groups}, got {jnp.shape(kernel)}")
    if c % gn_groups:
        raise ValueError(f"gn_groups={gn_groups} must divide the channels of x {x.shape}")
    if jnp.shape(gn_scale) != (c,) or jnp.shape(gn_bias) != (c,):
        raise ValueError(f"gn_scale and gn_bias must be [{c}], got {jnp.shape(gn_scale)} and {jnp.shape(gn_bias)}")
    return _ela_core(x, kernel, gn_scale, gn_bias, conv_groups=conv_groups, gn_groups=gn_groups, eps=float(eps))


class ELA(nnx.Module):
    """``ELA(channels, kernel, conv_groups, gn_groups)``: ``__call__(x)``; ``gates(x) -> (y_h, y_w)``."""

    def __init__(self, channels: int, kernel: int = 7, conv_groups: int | None = None, gn_groups: int = 16, *,
                 eps: float = 1e-5, rngs: nnx.Rngs):
        conv_groups = channels if conv_groups is None else conv_groups
        for name, val in (("channels", channels), ("kernel", kernel), ("conv_groups", conv_groups),
                          ("gn_groups", gn_groups)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (same-length padding kernel // 2), got {kernel}")
        if channels % conv_groups:
            raise ValueError(f"conv_groups={conv_groups} must divide channels={channels}")
        if channels % gn_groups:
            raise ValueError(f"gn_groups={gn_groups} must divide channels={channels}")
        self.channels, self.kernel, self.conv_groups, self.gn_groups, self.eps = (channels, kernel, conv_groups,
                                                                                  gn_groups, eps)
        self.conv = nnx.Conv(channels, channels, (kernel,), padding=[(kernel // 2, kernel // 2)],
                             feature_group_count=conv_groups, use_bias=False, rngs=rngs)
        self.gn_scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.gn_bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def _apply(self, x):
        if x.ndim != 4 or x.shape[-1] != self.channels:
            raise ValueError(f"x must be [B, H, W, {self.channels}] (channels-last), got shape {x.shape}")
        return ela_apply(x, self.conv.kernel[...], self.gn_scale[...], self.gn_bias[...],
                         conv_groups=self.conv_groups, gn_groups=self.gn_groups, eps=self.eps)

    def gates(self, x):
        """``(y_h [B, H, C], y_w [B, W, C])``."""
        return self._apply(x)[1:]

    def __call__(self, x):
        return self._apply(x)[0]


_VARIANTS = {"T": (5, 1), "B": (7, 1), "S": (5, 8), "L": (7, 8)}


def ela_variant(name: str, channels: int, *, gn_groups: int = 16, rngs: nnx.Rngs) -> ELA:
    """ELA-T/B/S/L: T, B depthwise conv (groups=C); S, L groups=C/8 (8 channels per group)."""
    if name not in _VARIANTS:
        raise ValueError(f"name must be one of {sorted(_VARIANTS)}, got {name!r}")
    k, per = _VARIANTS[name]
    if channels % per:
        raise ValueError(f"channels={channels} must be a multiple of 8 for ELA-{name}")
    return ELA(channels, k, channels // per, gn_groups, rngs=rngs)
