"""P18 — Visual Attention Network (VAN): Large Kernel Attention (LKA).

``LKA(u) = u * Conv1x1(DWDConv_{7x7, dilation 3}(DWConv_{5x5}(u)))``: a 21x21 convolution decomposed
into a depthwise 5x5, a depthwise dilated 7x7 (dilation 3) and a pointwise conv, used as a gate. There
is no token-token attention; the cost is linear in the pixel count. The receptive field of the gate is
23x23 (4 + 18 + 1). Layout ``[B, H, W, C]``. ``padding="circular"`` wraps the image (exact translation
equivariance); the paper's default is zero padding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.core import checks

PADDINGS = ("zeros", "circular")
RECEPTIVE_FIELD = 23


def _depthwise(x, kernel, bias, *, dilation: int, padding: str):
    """Depthwise 'same' convolution; ``kernel [k, k, C]``."""
    reach = dilation * (kernel.shape[0] - 1) // 2
    if padding == "circular":
        x = jnp.pad(x, ((0, 0), (reach, reach), (reach, reach), (0, 0)), mode="wrap")
        pad = "VALID"
    else:
        pad = [(reach, reach), (reach, reach)]
    out = jax.lax.conv_general_dilated(x, kernel[:, :, None, :], (1, 1), pad, rhs_dilation=(dilation, dilation),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=x.shape[-1])
    return out + bias


def init_lka_params(key, channels: int):
    """``{dw5 [5,5,C], dw5_bias, dw7 [7,7,C], dw7_bias, pw [C,C], pw_bias}`` (fan-in scaled normals)."""
    k1, k2, k3 = jax.random.split(key, 3)
    return {"dw5": jax.random.normal(k1, (5, 5, channels)) / 5.0, "dw5_bias": jnp.zeros((channels,)),
            "dw7": jax.random.normal(k2, (7, 7, channels)) / 7.0, "dw7_bias": jnp.zeros((channels,)),
            "pw": jax.random.normal(k3, (channels, channels)) * channels ** -0.5, "pw_bias": jnp.zeros((channels,))}


def lka_gate(u, params, *, padding: str = "zeros"):
    """The attention map ``Conv1x1(DWDConv7x7_d3(DWConv5x5(u)))`` of ``u [B, H, W, C]``."""
    checks.check_float_array("u", u, 4)
    checks.check_choice("padding", padding, PADDINGS)
    C = u.shape[-1]
    expected = {"dw5": (5, 5, C), "dw5_bias": (C,), "dw7": (7, 7, C), "dw7_bias": (C,), "pw": (C, C), "pw_bias": (C,)}
    if not isinstance(params, dict) or set(params) != set(expected):
        raise TypeError(f"params must be a dict with keys {sorted(expected)}, got {params!r:.200}")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"params[{name!r}] must have shape {shape} for C={C}, got {checks.describe(params[name])}")
    x = u.astype(jnp.float32)
    x = _depthwise(x, params["dw5"], params["dw5_bias"], dilation=1, padding=padding)
    x = _depthwise(x, params["dw7"], params["dw7_bias"], dilation=3, padding=padding)
    return x @ params["pw"] + params["pw_bias"]


def lka(u, params, *, padding: str = "zeros"):
    """``u * LKA-gate(u)`` for ``u [B, H, W, C]``."""
    return (u.astype(jnp.float32) * lka_gate(u, params, padding=padding)).astype(u.dtype)


class LKA(nnx.Module):
    """Large Kernel Attention with its own parameters (see ``lka``)."""

    def __init__(self, channels: int, *, padding: str = "zeros", rngs: nnx.Rngs):
        checks.check_choice("padding", padding, PADDINGS)
        self.padding = padding
        for name, value in init_lka_params(rngs.params(), channels).items():
            setattr(self, name, nnx.Param(value))

    def params(self):
        return {name: getattr(self, name)[...] for name in ("dw5", "dw5_bias", "dw7", "dw7_bias", "pw", "pw_bias")}

    def __call__(self, u):
        return lka(u, self.params(), padding=self.padding)


class VANAttention(nnx.Module):
    """VAN's attention sub-block: ``x + proj2(LKA(GELU(proj1(x))))`` with 1x1 projections and exact (erf)
    GELU, as the official ``nn.GELU()``."""

    def __init__(self, channels: int, *, padding: str = "zeros", rngs: nnx.Rngs):
        self.proj1 = nnx.Linear(channels, channels, rngs=rngs)
        self.lka = LKA(channels, padding=padding, rngs=rngs)
        self.proj2 = nnx.Linear(channels, channels, rngs=rngs)

    def __call__(self, x):
        return x + self.proj2(self.lka(jax.nn.gelu(self.proj1(x), approximate=False)))
