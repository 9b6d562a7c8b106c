"""P51: the attention modules of the meningioma segmentation U-Nets — DAUNet's position and channel attention (PAM,
CAM) bottleneck and AGUNet's additive attention gates — on channels-last feature maps ``[B, *spatial, C]``.

Facts from the official code (dbouget/mri_brain_tumor_segmentation, ``DualAttentionUNet.py``, after DANet-keras),
which is 3-D; these functions take any number of spatial axes (2-D images, 3-D volumes):

- PAM: ``B = x W_b``, ``Cq = x W_c`` (``C/8`` channels), ``D = x W_d`` (``C``), all 1x1 convs without bias;
  ``S = softmax_row(Cq B^T)`` over the ``N`` positions, no ``1/sqrt(d)`` scale; ``out = gamma_p (S D) + x``.
- CAM: ``A = x`` as ``[N, C]``; ``S_c = softmax_row(A^T A)`` (``C x C``); ``out = gamma_c (A S_c) + x``. This is
  the official order, ``A S_c``, not DANet's ``S_c A^T`` (with a row-softmax, output channel ``c`` weights the
  input channels by the column ``S_c[:, c]``, which need not sum to one), and without DANet's "max - energy" trick.
- Both ``gamma`` start at 0, so each module starts as the identity.
- The bottleneck: each of PAM and CAM -> conv3-BN-ReLU-SpatialDropout(0.5)-conv3; their sum; SpatialDropout(0.5);
  conv1; BN.
- AGUNet's gate (Oktay et al.; the AGUNet code is not public): ``alpha = sigmoid(psi^T ReLU(W_x x + W_g g + b))``,
  ``skip' = alpha * x``, with ``g`` the coarser decoder signal resized to ``x``'s grid (bilinear).

PAM is dense softmax attention over the positions with a value width (``C``) unlike the query's (``C/8``), which
``jattn.attention`` (one head dim for q, k and v) does not take; it is two einsums here, fine for the bottleneck's
few positions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.core import checks

__all__ = ["position_attention", "channel_attention", "channel_attention_weights", "additive_attention_gate",
           "PositionAttention", "ChannelAttention", "DualAttentionBottleneck", "AttentionGate"]


def _check_feature_map(name: str, x, min_spatial: int = 1):
    if not hasattr(x, "ndim") or x.ndim < 2 + min_spatial:
        raise ValueError(f"{name} must be a channels-last feature map [B, *spatial, C] with at least {min_spatial} "
                         f"spatial axis, got {checks.describe(x)}")


def position_attention(x, query, key, value, gamma):
    """PAM: ``gamma * softmax(query key^T) value + x`` over the flattened positions (no scale).

    x, value: ``[B, *spatial, C]``; query, key: ``[B, *spatial, C']``; gamma: a scalar."""
    for name, arr in (("x", x), ("query", query), ("key", key), ("value", value)):
        _check_feature_map(name, arr)
    if query.shape != key.shape or query.shape[:-1] != x.shape[:-1] or value.shape != x.shape:
        raise ValueError(f"query and key must share x's grid and one channel count, value must match x: got x "
                         f"{x.shape}, query {query.shape}, key {key.shape}, value {value.shape}")
    flat = lambda y: y.reshape(y.shape[0], -1, y.shape[-1]).astype(jnp.float32)
    weights = jax.nn.softmax(jnp.einsum("bnc,bmc->bnm", flat(query), flat(key)), axis=-1)
    mixed = jnp.einsum("bnm,bmc->bnc", weights, flat(value))
    return (gamma * mixed.reshape(x.shape) + x).astype(x.dtype)


def channel_attention_weights(x):
    """``S_c = softmax_row(A^T A)`` ``[B, C, C]`` with ``A = x`` as ``[B, N, C]`` (float32)."""
    _check_feature_map("x", x)
    a = x.reshape(x.shape[0], -1, x.shape[-1]).astype(jnp.float32)
    return jax.nn.softmax(jnp.einsum("bnc,bnd->bcd", a, a), axis=-1)


def channel_attention(x, gamma):
    """CAM: ``gamma * (A S_c) + x`` with ``S_c`` from :func:`channel_attention_weights` (the official order)."""
    a = x.reshape(x.shape[0], -1, x.shape[-1]).astype(jnp.float32)
    mixed = jnp.einsum("bnc,bcd->bnd", a, channel_attention_weights(x))
    return (gamma * mixed.reshape(x.shape) + x).astype(x.dtype)


def _resize_like(g, spatial):
    return jax.image.resize(g, (g.shape[0], *spatial, g.shape[-1]), method="bilinear")


def additive_attention_gate(x, g, w_x, w_g, bias, psi, psi_bias):
    """``alpha = sigmoid(ReLU(x W_x + resize(g) W_g + bias) psi + psi_bias)``; returns ``(alpha * x, alpha)``.

    x: ``[B, *spatial, Cx]`` (the skip connection); g: ``[B, *coarser, Cg]`` (the gating signal), resized to x's
    grid; w_x ``[Cx, Ci]``, w_g ``[Cg, Ci]``, bias ``[Ci]``, psi ``[Ci, 1]``, psi_bias ``[1]``. alpha is
    ``[B, *spatial, 1]`` in (0, 1)."""
    _check_feature_map("x", x)
    _check_feature_map("g", g)
    if g.ndim != x.ndim or g.shape[0] != x.shape[0]:
        raise ValueError(f"g must have x's batch and number of spatial axes, got x {x.shape}, g {g.shape}")
    g = _resize_like(g, x.shape[1:-1])
    hidden = jax.nn.relu(x @ w_x + g @ w_g + bias)
    alpha = jax.nn.sigmoid(hidden @ psi + psi_bias)
    return alpha * x, alpha


def _spatial_conv(channels_in, channels_out, kernel, ndim, rngs, use_bias=True):
    return nnx.Conv(channels_in, channels_out, kernel_size=(kernel,) * ndim, padding="SAME", use_bias=use_bias,
                    rngs=rngs)


class PositionAttention(nnx.Module):
    """PAM as a layer (``gamma`` starts at 0: the identity)."""

    def __init__(self, channels: int, *, spatial_dims: int = 2, reduction: int = 8, rngs: nnx.Rngs):
        if channels % reduction or channels < reduction:
            raise ValueError(f"channels={channels} must be a positive multiple of reduction={reduction}")
        inner = channels // reduction
        self.query = _spatial_conv(channels, inner, 1, spatial_dims, rngs, use_bias=False)
        self.key = _spatial_conv(channels, inner, 1, spatial_dims, rngs, use_bias=False)
        self.value = _spatial_conv(channels, channels, 1, spatial_dims, rngs, use_bias=False)
        self.gamma = nnx.Param(jnp.zeros(()))
        self.channels = channels

    def __call__(self, x):
        if x.shape[-1] != self.channels:
            raise ValueError(f"x must have {self.channels} channels (last axis), got {checks.describe(x)}")
        return position_attention(x, self.query(x), self.key(x), self.value(x), self.gamma[...])


class ChannelAttention(nnx.Module):
    """CAM as a layer (no projections; ``gamma`` starts at 0)."""

    def __init__(self):
        self.gamma = nnx.Param(jnp.zeros(()))

    def __call__(self, x):
        return channel_attention(x, self.gamma[...])


class DualAttentionBottleneck(nnx.Module):
    """DAUNet's bottleneck: PAM and CAM branches (conv3-BN-ReLU-SpatialDropout-conv3 each), summed, spatial
    dropout, conv1, BN. Call ``model.eval()`` for inference (running BN statistics, no dropout)."""

    def __init__(self, channels: int, *, spatial_dims: int = 2, dropout: float = 0.5, rngs: nnx.Rngs):
        self.pam = PositionAttention(channels, spatial_dims=spatial_dims, rngs=rngs)
        self.cam = ChannelAttention()
        broadcast = tuple(range(1, spatial_dims + 1))  # spatial dropout: one draw per (sample, channel)

        def branch():
            return nnx.Sequential(_spatial_conv(channels, channels, 3, spatial_dims, rngs),
                                  nnx.BatchNorm(channels, rngs=rngs), jax.nn.relu,
                                  nnx.Dropout(dropout, broadcast_dims=broadcast, rngs=rngs),
                                  _spatial_conv(channels, channels, 3, spatial_dims, rngs))

        self.pam_branch, self.cam_branch = branch(), branch()
        self.dropout = nnx.Dropout(dropout, broadcast_dims=broadcast, rngs=rngs)
        self.project = _spatial_conv(channels, channels, 1, spatial_dims, rngs)
        self.norm = nnx.BatchNorm(channels, rngs=rngs)

    def __call__(self, x):
        _check_feature_map("x", x)
        mixed = self.pam_branch(self.pam(x)) + self.cam_branch(self.cam(x))
        return self.norm(self.project(self.dropout(mixed)))


class AttentionGate(nnx.Module):
    """AGUNet's additive gate on a skip connection; ``__call__(x, g)`` returns ``(gated x, alpha)``."""

    def __init__(self, skip_channels: int, gate_channels: int, inner_channels: int | None = None, *,
                 rngs: nnx.Rngs):
        inner = inner_channels or max(1, skip_channels // 2)
        init = nnx.initializers.lecun_normal()
        self.w_x = nnx.Param(init(rngs.params(), (skip_channels, inner)))
        self.w_g = nnx.Param(init(rngs.params(), (gate_channels, inner)))
        self.bias = nnx.Param(jnp.zeros((inner,)))
        self.psi = nnx.Param(init(rngs.params(), (inner, 1)))
        self.psi_bias = nnx.Param(jnp.zeros((1,)))
        self.skip_channels, self.gate_channels = skip_channels, gate_channels

    def __call__(self, x, g):
        if x.shape[-1] != self.skip_channels or g.shape[-1] != self.gate_channels:
            raise ValueError(f"x must have {self.skip_channels} channels and g {self.gate_channels}, got x "
                             f"{checks.describe(x)}, g {checks.describe(g)}")
        return additive_attention_gate(x, g, self.w_x[...], self.w_g[...], self.bias[...], self.psi[...],
                                       self.psi_bias[...])
