"""P69 DDRNet's DAPPM (Deep Aggregation Pyramid Pooling Module) on ``[B, H, W, C]``: a context-aggregation
baseline that contains no attention (the paper has none), for ablations against attention context modules such as
P51's PAM.

From the official code (ydhongHIT/DDRNet, ``DAPPM``); every conv is pre-activated (BN, ReLU, conv), no conv bias:

    y0 = conv1x1(x)
    y_i = conv3x3(upsample(conv1x1(pool_i(x))) + y_{i-1})          i = 1..4
    out = conv1x1(concat(y0, ..., y4)) + conv1x1(x)                   (compression + shortcut)

with ``pool_1..3 = AvgPool(5, s2, p2), AvgPool(9, s4, p4), AvgPool(17, s8, p8)`` (zero padding counted in the
mean, PyTorch's default) and ``pool_4`` the global mean; upsampling is bilinear to ``x``'s grid. DDRNet-23-slim
uses ``branch_channels`` (spp_planes) 128 and ``out_channels`` 128 on its 1/64 feature.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.core import checks

__all__ = ["DAPPM", "avg_pool_count_pad", "POOLS"]

# (kernel, stride, padding) of the three local pooling branches; the fourth is the global mean.
POOLS = ((5, 2, 2), (9, 4, 4), (17, 8, 8))


def avg_pool_count_pad(x, kernel: int, stride: int, padding: int):
    """Average pooling of ``[B, H, W, C]`` with zero padding counted in every window (divisor ``kernel**2``) and
    PyTorch's floor output size ``(H + 2p - k) // s + 1``."""
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, kernel, kernel, 1), (1, stride, stride, 1),
                                   [(0, 0), (padding, padding), (padding, padding), (0, 0)])
    return summed / (kernel * kernel)


class _PreActConv(nnx.Module):
    """BN -> ReLU -> conv (no bias), the unit every DAPPM branch is made of."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int, *, rngs: nnx.Rngs):
        self.norm = nnx.BatchNorm(channels_in, rngs=rngs)
        self.conv = nnx.Conv(channels_in, channels_out, kernel_size=(kernel, kernel), padding="SAME",
                             use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.conv(jax.nn.relu(self.norm(x)))


class DAPPM(nnx.Module):
    """DAPPM as a layer: ``[B, H, W, in_channels] -> [B, H, W, out_channels]``. ``model.eval()`` for inference."""

    def __init__(self, in_channels: int, branch_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        for name, value in (("in_channels", in_channels), ("branch_channels", branch_channels),
                            ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.scale0 = _PreActConv(in_channels, branch_channels, 1, rngs=rngs)
        self.scales = nnx.List([_PreActConv(in_channels, branch_channels, 1, rngs=rngs) for _ in range(4)])
        self.process = nnx.List([_PreActConv(branch_channels, branch_channels, 3, rngs=rngs) for _ in range(4)])
        self.compression = _PreActConv(5 * branch_channels, out_channels, 1, rngs=rngs)
        self.shortcut = _PreActConv(in_channels, out_channels, 1, rngs=rngs)
        self.in_channels = in_channels

    def pooled(self, x):
        """The four pooled inputs (before their 1x1 convs): three local averages and the global mean."""
        return [avg_pool_count_pad(x, *pool) for pool in POOLS] + [jnp.mean(x, axis=(1, 2), keepdims=True)]

    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must be [B, H, W, {self.in_channels}] (channels-last), got {checks.describe(x)}")
        b, h, w, _ = x.shape
        branches = [self.scale0(x)]
        for scale, process, pooled in zip(self.scales, self.process, self.pooled(x)):
            context = scale(pooled)
            up = jax.image.resize(context, (b, h, w, context.shape[-1]), method="bilinear")
            branches.append(process(up + branches[-1]))
        return self.compression(jnp.concatenate(branches, axis=-1)) + self.shortcut(x)
