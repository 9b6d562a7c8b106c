"""Multi-scale deformable attention (Deformable DETR), the encoder cross-attention of P41 Focus-DETR.

Deformable DETR (Zhu et al., 2021) as used by DINO / Focus-DETR (detrex ``MultiScaleDeformableAttention``;
the op is ``ms_deform_attn_core_pytorch``). For each query ``q``, head ``h``, level ``l`` and point ``p``:

    out[b, q, h] = sum_{l, p} A[b, q, h, l, p] * bilinear(value_l[b, :, h], loc[b, q, h, l, p])

``loc = (x, y)`` is normalised to ``[0, 1]`` over level ``l``'s map ``(H_l, W_l)``; bilinear sampling follows
``torch.nn.functional.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`` on the grid
``2 loc - 1``: the pixel coordinate is ``x W_l - 0.5`` (pixel centres at ``i + 0.5``), each of the four
neighbour pixels contributes its bilinear weight, and a neighbour outside the map contributes 0 (zero padding:
a point half a pixel outside the border still gets half the border value).

``ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights)`` is that op in pure ``jnp``
(one gather per corner and level; no ``[Q, S]`` array is formed): static ``spatial_shapes`` (a tuple of
``(H_l, W_l)``), so it is jit-able with static shapes. ``MSDeformAttn`` is the NNX module (detrex defaults:
``num_points=4``; ``sampling_offsets`` Linear(d, H L P 2), ``attention_weights`` Linear(d, H L P) softmaxed
over ``L P`` per head, ``value_proj``, ``output_proj``; ``loc = ref + offset / (W_l, H_l)``; the query gets its
position embedding before the offset/weight projections; ``value`` rows under ``key_padding_mask`` are zeroed;
the residual ``identity + out`` is inside, as detrex's). Its offset bias is the detrex "rays" init (head ``h``
points along angle ``2 pi h / H``, point ``p`` at distance ``p + 1``) and the offset weight, attention-weight
weight and bias are zero, as ``init_weights``; value/output projections are Xavier-uniform.

Deliberate deviations: no dropout; reference points are ``[B, Q, L, 2]`` (the 2-d form; the 4-d box form of
the decoder is not needed in the encoder).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.core import checks

__all__ = ["ms_deform_attn", "MSDeformAttn", "level_start_index", "check_spatial_shapes"]

HIGHEST = jax.lax.Precision.HIGHEST


def check_spatial_shapes(spatial_shapes) -> tuple[tuple[int, int], ...]:
    """Validate a static tuple of ``(H_l, W_l)`` pairs (positive ints)."""
    if not isinstance(spatial_shapes, (tuple, list)) or len(spatial_shapes) == 0:
        raise TypeError(f"spatial_shapes must be a non-empty static tuple of (H, W) int pairs, got {spatial_shapes!r}")
    out = []
    for hw in spatial_shapes:
        if (not isinstance(hw, (tuple, list)) or len(hw) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in hw)):
            raise TypeError(f"spatial_shapes must hold (H, W) pairs of positive python ints, got {spatial_shapes!r}")
        out.append((int(hw[0]), int(hw[1])))
    return tuple(out)


def level_start_index(spatial_shapes) -> tuple[int, ...]:
    """Offsets of each level in the flattened token axis (static ints)."""
    shapes = check_spatial_shapes(spatial_shapes)
    starts, s = [], 0
    for h, w in shapes:
        starts.append(s)
        s += h * w
    return tuple(starts)


def _bilinear_level(value_l, h_l: int, w_l: int, loc):
    """value_l ``[B, H, HW, Dh]``, loc ``[B, H, QP, 2]`` normalised -> ``[B, H, QP, Dh]`` (float32)."""
    x = loc[..., 0] * w_l - 0.5
    y = loc[..., 1] * h_l - 0.5
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = x - x0
    fy = y - y0
    x0 = x0.astype(jnp.int32)
    y0 = y0.astype(jnp.int32)
    out = 0.0
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            xi = x0 + dx
            yi = y0 + dy
            inside = (xi >= 0) & (xi < w_l) & (yi >= 0) & (yi < h_l)
            idx = jnp.clip(yi, 0, h_l - 1) * w_l + jnp.clip(xi, 0, w_l - 1)
            got = jnp.take_along_axis(value_l, idx[..., None], axis=2)
            out = out + got * jnp.where(inside, wx * wy, 0.0)[..., None]
    return out


def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """Multi-scale deformable attention core.

    Args:
      value: ``[B, S, H, Dh]`` with ``S = sum_l H_l W_l`` (levels flattened row-major, in order).
      spatial_shapes: static tuple of ``(H_l, W_l)``.
      sampling_locations: ``[B, Q, H, L, P, 2]`` normalised ``(x, y)`` in ``[0, 1]`` (may lie outside: zeros).
      attention_weights: ``[B, Q, H, L, P]`` (normally softmaxed over ``L P``; not renormalised here).

    Returns:
      ``[B, Q, H * Dh]`` in ``value``'s dtype, accumulated in float32.
    """
    shapes = check_spatial_shapes(spatial_shapes)
    checks.check_float_array("value", value, 4)
    checks.check_float_array("sampling_locations", sampling_locations, 6)
    checks.check_float_array("attention_weights", attention_weights, 5)
    B, S, H, Dh = value.shape
    L = len(shapes)
    if S != sum(h * w for h, w in shapes):
        raise ValueError(f"value must have S = sum(H_l W_l) = {sum(h * w for h, w in shapes)} tokens for "
                         f"spatial_shapes={shapes}, got {checks.describe(value)}")
    sl = sampling_locations
    if sl.shape[0] != B or sl.shape[2] != H or sl.shape[3] != L or sl.shape[5] != 2:
        raise ValueError(f"sampling_locations must be [B={B}, Q, H={H}, L={L}, P, 2], got {checks.describe(sl)}")
    Q, P = sl.shape[1], sl.shape[4]
    if attention_weights.shape != (B, Q, H, L, P):
        raise ValueError(f"attention_weights must be [B, Q, H, L, P] = {(B, Q, H, L, P)}, got "
                         f"{checks.describe(attention_weights)}")
    v = jnp.moveaxis(value.astype(jnp.float32), 2, 1)  # [B, H, S, Dh]
    loc = jnp.moveaxis(sl.astype(jnp.float32), 2, 1)  # [B, H, Q, L, P, 2]
    aw = jnp.moveaxis(attention_weights.astype(jnp.float32), 2, 1)  # [B, H, Q, L, P]
    out = jnp.zeros((B, H, Q, Dh), jnp.float32)
    starts = level_start_index(shapes)
    for lvl, (h_l, w_l) in enumerate(shapes):
        v_l = v[:, :, starts[lvl]:starts[lvl] + h_l * w_l]
        loc_l = loc[:, :, :, lvl].reshape(B, H, Q * P, 2)
        sampled = _bilinear_level(v_l, h_l, w_l, loc_l).reshape(B, H, Q, P, Dh)
        out = out + jnp.einsum("bhqp,bhqpd->bhqd", aw[:, :, :, lvl], sampled, precision=HIGHEST)
    return jnp.moveaxis(out, 1, 2).reshape(B, Q, H * Dh).astype(value.dtype)


def _xavier():
    return nnx.initializers.xavier_uniform()


class MSDeformAttn(nnx.Module):
    """Multi-scale deformable attention with residual (detrex ``MultiScaleDeformableAttention``, batch first)."""

    def __init__(self, dim: int, num_heads: int = 8, num_levels: int = 4, num_points: int = 4, *,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        for name, val in (("dim", dim), ("num_heads", num_heads), ("num_levels", num_levels),
                          ("num_points", num_points)):
            checks.check_int(name, val)
        if dim % num_heads:
            raise ValueError(f"dim must be a multiple of num_heads={num_heads}, got dim={dim}")
        self.dim, self.num_heads, self.num_levels, self.num_points = dim, num_heads, num_levels, num_points
        H, L, P = num_heads, num_levels, num_points
        zeros = nnx.initializers.zeros
        self.sampling_offsets = nnx.Linear(dim, H * L * P * 2, kernel_init=zeros, rngs=rngs, param_dtype=param_dtype)
        thetas = jnp.arange(H, dtype=jnp.float32) * (2.0 * math.pi / H)
        grid = jnp.stack([jnp.cos(thetas), jnp.sin(thetas)], -1)
        grid = grid / jnp.abs(grid).max(-1, keepdims=True)
        dist = jnp.arange(1, P + 1, dtype=jnp.float32)[None, None, :, None]
        grid = jnp.tile(grid[:, None, None, :], (1, L, P, 1)) * dist
        self.sampling_offsets.bias.value = grid.reshape(-1).astype(param_dtype)
        self.attention_weights = nnx.Linear(dim, H * L * P, kernel_init=zeros, rngs=rngs, param_dtype=param_dtype)
        self.value_proj = nnx.Linear(dim, dim, kernel_init=_xavier(), rngs=rngs, param_dtype=param_dtype)
        self.output_proj = nnx.Linear(dim, dim, kernel_init=_xavier(), rngs=rngs, param_dtype=param_dtype)

    def __call__(self, query, value, reference_points, spatial_shapes, *, query_pos=None, key_padding_mask=None,
                 identity=None):
        """query ``[B, Q, d]``, value ``[B, S, d]``, reference_points ``[B, Q, L, 2]`` -> ``[B, Q, d]``.

        Returns ``identity + output_proj(ms_deform_attn(...))`` with ``identity = query`` by default.
        ``key_padding_mask`` ``[B, S]`` bool, True = padding (detrex convention): those value rows are zeroed.
        """
        shapes = check_spatial_shapes(spatial_shapes)
        checks.check_float_array("query", query, 3)
        checks.check_float_array("value", value, 3)
        checks.check_float_array("reference_points", reference_points, 4)
        B, Q, d = query.shape
        H, L, P = self.num_heads, self.num_levels, self.num_points
        if d != self.dim or value.shape[0] != B or value.shape[2] != d:
            raise ValueError(f"query must be [B, Q, dim={self.dim}] and value [B, S, dim], got query "
                             f"{checks.describe(query)}, value {checks.describe(value)}")
        if len(shapes) != L:
            raise ValueError(f"spatial_shapes must have num_levels={L} levels, got {shapes}")
        if reference_points.shape != (B, Q, L, 2):
            raise ValueError(f"reference_points must be [B, Q, L, 2] = {(B, Q, L, 2)}, got "
                             f"{checks.describe(reference_points)}")
        if query_pos is not None and query_pos.shape != query.shape:
            raise ValueError(f"query_pos must match query {query.shape}, got {checks.describe(query_pos)}")
        identity = query if identity is None else identity
        q = query if query_pos is None else query + query_pos
        v = self.value_proj(value)
        if key_padding_mask is not None:
            if key_padding_mask.shape != value.shape[:2] or key_padding_mask.dtype != jnp.bool_:
                raise ValueError(f"key_padding_mask must be bool {value.shape[:2]}, got "
                                 f"{checks.describe(key_padding_mask)}")
            v = jnp.where(key_padding_mask[..., None], 0.0, v)
        v = v.reshape(B, value.shape[1], H, d // H)
        off = self.sampling_offsets(q).reshape(B, Q, H, L, P, 2)
        aw = jax.nn.softmax(self.attention_weights(q).reshape(B, Q, H, L * P), -1).reshape(B, Q, H, L, P)
        normalizer = jnp.asarray([[w, h] for h, w in shapes], jnp.float32)  # (x, y) = (W, H)
        loc = reference_points[:, :, None, :, None, :] + off / normalizer[None, None, None, :, None, :]
        out = ms_deform_attn(v, shapes, loc, aw)
        return identity + self.output_proj(out)
