"""``NeighborhoodAttention``: a NATTEN-style layer (P48/P60) over a 1-D, 2-D or 3-D token grid.

``x [B, *spatial, dim] -> [B, *spatial, dim]``: linear q/k/v projections, ``jattn.neighborhood_attention``
with the layer's kernel/stride/dilation/causal, and an output projection. GQA with ``num_kv_heads``.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jattn.core import checks
from jattn.core.neighborhood import NAGeometry
from jattn.ops.neighborhood import neighborhood_attention


class NeighborhoodAttention(nnx.Module):
    """Multi-head neighborhood attention; the pattern is checked against every input's grid.

    ``causal`` (a bool or one per axis) is the flag's name in every jattn op and layer; ``is_causal``
    (NATTEN's and jax.nn's name) is a deprecated alias that warns."""

    def __init__(self, dim: int, num_heads: int, kernel_size, *, rngs: nnx.Rngs, stride=1, dilation=1,
                 causal=False, num_kv_heads: int | None = None, qkv_bias: bool = True, scale: float | None = None,
                 impl: str = "auto", dtype=jnp.float32, param_dtype=jnp.float32, is_causal=None):
        causal = checks.causal_alias(causal, is_causal, "NeighborhoodAttention")
        self.dim = checks.check_int("dim", dim)
        self.num_heads = checks.check_int("num_heads", num_heads)
        self.num_kv_heads = checks.check_int("num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        checks.check_choice("impl", impl, checks.IMPLS)
        self.head_dim = dim // num_heads
        self.kernel_size, self.stride, self.dilation, self.causal = kernel_size, stride, dilation, causal
        self.scale = checks.check_positive_float("scale", scale)
        self.impl, self.dtype = impl, dtype
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim

        def linear(din, dout, bias):
            return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.query, self.key, self.value = linear(dim, H * D, qkv_bias), linear(dim, Hkv * D, qkv_bias), \
            linear(dim, Hkv * D, qkv_bias)
        self.out = linear(H * D, dim, True)

    def __call__(self, x):
        checks.check_float_array("x", x)
        if x.ndim not in (3, 4, 5) or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, *spatial, dim={self.dim}] with 1 to 3 spatial axes, got {checks.describe(x)}")
        grid = x.shape[:-1]
        NAGeometry.create(grid[1:], self.kernel_size, self.stride, self.dilation, self.causal)  # clear errors
        q = self.query(x).reshape(*grid, self.num_heads, self.head_dim)
        k = self.key(x).reshape(*grid, self.num_kv_heads, self.head_dim)
        v = self.value(x).reshape(*grid, self.num_kv_heads, self.head_dim)
        out = neighborhood_attention(q, k, v, self.kernel_size, stride=self.stride, dilation=self.dilation,
                                     causal=self.causal, scale=self.scale, impl=self.impl)
        return self.out(out.reshape(*grid, self.num_heads * self.head_dim).astype(self.dtype))
