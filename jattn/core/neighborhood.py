"""The neighborhood-attention rule (NATTEN's, P48 GNA / P60 FNA) and its geometry: pure functions every
neighborhood impl shares.

Tokens lie on a grid, layout ``[B, *spatial, H, D]``. On a spatial axis of length ``L`` with kernel
``w``, stride ``s``, dilation ``δ`` and a causal flag, query ``i`` may see key ``j`` iff

* both are in the same dilation group, ``i mod δ == j mod δ``, and on the in-group coordinates
  ``i' = i // δ``, ``j' = j // δ`` (group length ``L_g = ceil((L - i mod δ) / δ)``):
* non-causal: leader ``ℓ = min(⌊i'/s⌋·s + ⌊s/2⌋, L_g − 1)``, centre ``c = clamp(ℓ, ⌊w/2⌋, L_g − 1 − r)``
  with ``r = ⌊w/2⌋ + (w mod 2) − 1``; visible iff ``c − ⌊w/2⌋ ≤ j' ≤ c + r``. Windows shift at the
  borders, so every query sees exactly ``w`` keys; all queries of a stride group share the leader's window.
* causal: ``ℓ = min(⌊i'/s⌋·s + s − 1, L_g − 1)``; visible iff ``j' ≤ i'`` and ``ℓ − j' < w``.

In several dimensions a key is visible iff it is visible on every axis. Special cases: ``s = 1`` is
sliding-window NA, ``s = w`` (``L`` divisible) is blocked (Swin-style window) attention, ``w = L`` is
full attention. Either rule makes an axis's visible set an interval ``[lo(i'), hi(i')]``; every impl
works with those intervals (``axis_window_bounds``).

Here: the rule (``axis_window_bounds``, ``neighborhood_mask``), the validated static pattern
(``NAGeometry``, with its dilation groups), and the tile-major token permutation with its tile maps and
``BlockMask`` (``na_block_mask``), which turn an undilated pattern into a block-sparse one (GNA).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from jattn.core.block_mask import BlockMask
from jattn.core.masks import index_div, index_mod


# ---------------------------------------------------------------------------------- the rule

def axis_window_bounds(index, length: int, kernel: int, stride: int, causal: bool, xp=np):
    """``(lo, hi)``: the visible in-group key interval of in-group query coordinate(s) ``index``.

    Pure integer arithmetic on ``xp`` (numpy for static tables, ``jax.numpy`` inside kernels).
    """
    first_of_stride = index_div(index, stride) * stride
    if causal:
        leader = xp.minimum(first_of_stride + stride - 1, length - 1)
        return xp.maximum(leader - kernel + 1, 0), index
    left = kernel // 2
    right = kernel // 2 + kernel % 2 - 1
    leader = xp.minimum(first_of_stride + stride // 2, length - 1)
    centre = xp.clip(leader, left, length - 1 - right)
    return centre - left, centre + right


def neighborhood_mask(shape: Sequence[int], kernel_size, *, stride=1, dilation=1,
                      causal=False) -> Bool[np.ndarray, "T T"]:
    """The dense neighborhood-attention mask over row-major flattened grid tokens.

    Args:
      shape: the spatial grid shape (1 to 3 axes).
      kernel_size: an int or one int per axis (``1 <= kernel_size * dilation <= size``).
      stride: an int or one int per axis (``1 <= stride <= kernel_size``).
      dilation: an int or one int per axis (``>= 1``).
      causal: a bool or one bool per axis.

    Returns:
      ``[T, T]`` bool (``T = ∏ shape``), True where query (row) may see key (column).

    Raises:
      ValueError: a size out of range, or a tuple of the wrong length.
      TypeError: a size that is not an int, or a causal flag that is not a bool.
    """
    geometry = NAGeometry.create(tuple(shape), kernel_size, stride, dilation, causal)
    per_axis_masks = [geometry.axis_mask(a) for a in range(geometry.ndim)]
    mask = np.ones((1, 1), bool)
    for m in per_axis_masks:  # Kronecker AND: flattened index = row-major over the axes
        mask = (mask[:, None, :, None] & m[None, :, None, :]).reshape(mask.shape[0] * m.shape[0], -1)
    return mask


# ---------------------------------------------------------------------------------- arguments

def per_axis(name: str, value, ndim: int, *, kind=int):
    """An int (or bool) or a tuple of ``ndim`` of them -> a tuple of ``ndim``."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim
    if len(values) != ndim:
        raise ValueError(f"{name} must be one {kind.__name__} or a tuple of {ndim} (one per spatial axis), "
                         f"got {value!r}")
    for x in values:
        ok = isinstance(x, (bool, np.bool_)) if kind is bool else (
            isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)))
        if not ok:
            raise TypeError(f"{name} must hold {kind.__name__}s, got {value!r}")
    return tuple(kind(x) for x in values)


@dataclasses.dataclass(frozen=True)
class NAGeometry:
    """Static description of one neighborhood-attention pattern (hashable: a jit static argument).

    Build it with ``NAGeometry.create``, which validates; every field holds one value per spatial axis.

    Attributes:
      shape: the spatial grid shape.
      kernel: the neighborhood size (``kernel_size``).
      stride: the query stride.
      dilation: the dilation.
      causal: the causal flags.
    """
    shape: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]

    @classmethod
    def create(cls, shape, kernel_size, stride=1, dilation=1, causal=False) -> "NAGeometry":
        """Validates a pattern and expands its per-axis arguments.

        Args:
          shape: the spatial grid shape (1 to 3 axes).
          kernel_size: an int or one int per axis (``1 <= kernel_size * dilation <= size``).
          stride: an int or one int per axis (``1 <= stride <= kernel_size``).
          dilation: an int or one int per axis (``>= 1``).
          causal: a bool or one bool per axis.

        Returns:
          The ``NAGeometry``.

        Raises:
          ValueError: a size out of range, a tuple of the wrong length or a grid of other than 1-3 axes.
          TypeError: a size that is not an int, or a causal flag that is not a bool.
        """
        ndim = len(shape)
        if ndim not in (1, 2, 3):
            raise ValueError(f"neighborhood attention works on 1, 2 or 3 spatial axes, got spatial shape {shape}")
        kernel = per_axis("kernel_size", kernel_size, ndim)
        stride = per_axis("stride", stride, ndim)
        dilation = per_axis("dilation", dilation, ndim)
        causal = per_axis("causal", causal, ndim, kind=bool)
        for a, (L, w, s, d) in enumerate(zip(shape, kernel, stride, dilation)):
            if d < 1:
                raise ValueError(f"dilation must be >= 1 on every axis, got {dilation}")
            if w < 1 or w * d > L:
                raise ValueError(f"kernel_size must satisfy 1 <= kernel_size * dilation <= input size on every "
                                 f"axis; axis {a} has size {L}, kernel_size {w}, dilation {d}")
            if not 1 <= s <= w:
                raise ValueError(f"stride must satisfy 1 <= stride <= kernel_size on every axis; axis {a} has "
                                 f"stride {s}, kernel_size {w}")
        return cls(tuple(int(x) for x in shape), kernel, stride, dilation, causal)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def axis_mask(self, axis: int) -> np.ndarray:
        """``[L, L]`` bool: visibility on one axis, dilation included."""
        L, w, s, d, c = (self.shape[axis], self.kernel[axis], self.stride[axis], self.dilation[axis],
                         self.causal[axis])
        i = np.arange(L)
        group = i % d
        group_len = -(-(L - group) // d)
        lo, hi = axis_window_bounds(i // d, group_len, w, s, c)
        j = (i // d)[None, :]
        return (group[:, None] == group[None, :]) & (lo[:, None] <= j) & (j <= hi[:, None])

    def dilation_classes(self):
        """``[(sub_shape, [offsets...])]``: dilation groups batched by their (undilated) sub-grid shape."""
        by_axis = []
        for L, d in zip(self.shape, self.dilation):
            by_length: dict[int, list[int]] = {}
            for g in range(d):
                by_length.setdefault(-(-(L - g) // d), []).append(g)
            by_axis.append(list(by_length.items()))
        return [(tuple(n for n, _ in combo), list(itertools.product(*(gs for _, gs in combo))))
                for combo in itertools.product(*by_axis)]

    def undilated(self, sub_shape) -> "NAGeometry":
        """The same pattern without dilation on a dilation group's sub-grid ``sub_shape``."""
        return NAGeometry(tuple(sub_shape), self.kernel, self.stride, (1,) * self.ndim, self.causal)


# ---------------------------------------------------------------------------------- token permutation

def pallas_tiles(shape, tile):
    """Tile per axis shrunk to the grid (powers of two), keeping at least 16 tokens per block."""
    tiles = [min(t, 1 << max(0, math.ceil(math.log2(L)))) for t, L in zip(tile, shape)]
    while math.prod(tiles) < 16:
        tiles[-1] *= 2
    return tuple(tiles)


def token_permute(x: Float[Array, "B *grid H D"], tile) -> Float[Array, "B N H D"]:
    """``[B, *grid, H, D]`` -> ``[B, N, H, D]``: zero-pad every axis to a multiple of its tile, then order
    tokens tile-major (tiles row-major, tokens row-major inside a tile), so each tile is one block."""
    ndim = len(tile)
    grid = x.shape[1:1 + ndim]
    counts = [-(-L // t) for L, t in zip(grid, tile)]
    x = jnp.pad(x, [(0, 0)] + [(0, n * t - L) for n, t, L in zip(counts, tile, grid)] + [(0, 0), (0, 0)])
    split = x.reshape(x.shape[0], *itertools.chain(*zip(counts, tile)), *x.shape[-2:])
    order = [0] + [1 + 2 * a for a in range(ndim)] + [2 + 2 * a for a in range(ndim)] + [1 + 2 * ndim, 2 + 2 * ndim]
    return split.transpose(order).reshape(x.shape[0], -1, *x.shape[-2:])


def token_unpermute(x: Float[Array, "B N H D"], tile, grid) -> Float[Array, "B *grid H D"]:
    """Inverse of ``token_permute``: ``[B, N, H, D]`` -> ``[B, *grid, H, D]`` (padding dropped)."""
    ndim = len(tile)
    counts = [-(-L // t) for L, t in zip(grid, tile)]
    split = x.reshape(x.shape[0], *counts, *tile, *x.shape[-2:])
    order = [0] + list(itertools.chain(*((1 + a, 1 + ndim + a) for a in range(ndim)))) + [1 + 2 * ndim, 2 + 2 * ndim]
    full = split.transpose(order).reshape(x.shape[0], *(n * t for n, t in zip(counts, tile)), *x.shape[-2:])
    return full[(slice(None),) + tuple(slice(0, L) for L in grid)]


# ---------------------------------------------------------------------------------- tile maps

def axis_tile_maps(geometry: NAGeometry, axis: int, q_tile: int, kv_tile: int):
    """``(any, all)`` ``[nq, nk]``: per-axis (q tile, kv tile) pairs with some / only visible entries;
    padded coordinates (past the axis end) count as invisible."""
    L = geometry.shape[axis]
    nq, nk = -(-L // q_tile), -(-L // kv_tile)
    padded = np.zeros((nq * q_tile, nk * kv_tile), bool)
    padded[:L, :L] = geometry.axis_mask(axis)
    tiles = padded.reshape(nq, q_tile, nk, kv_tile)
    return tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))


def na_tile_maps(geometry: NAGeometry, q_tile, kv_tile=None):
    """``(block_map, full_map)`` ``[Nq, Nk]`` over tile-major permuted tokens. The NA mask is an AND over
    axes, so a tile pair has a visible entry iff it has one on every axis, and is full iff every axis is."""
    kv_tile = q_tile if kv_tile is None else kv_tile
    block_map, full_map = np.ones((1, 1), bool), np.ones((1, 1), bool)
    for a in range(geometry.ndim):
        any_a, all_a = axis_tile_maps(geometry, a, q_tile[a], kv_tile[a])
        block_map = np.kron(block_map, any_a).astype(bool)
        full_map = np.kron(full_map, all_a).astype(bool)
    return block_map, full_map


def _grid_coordinates(index, shape, tile):
    """Grid coordinates (one per axis) of tile-major permuted token ``index`` (index arithmetic only)."""
    counts = [-(-L // t) for L, t in zip(shape, tile)]
    tile_id, offset = index_div(index, math.prod(tile)), index_mod(index, math.prod(tile))
    coords = []
    for a in reversed(range(len(shape))):
        coords.append(index_mod(tile_id, counts[a]) * tile[a] + index_mod(offset, tile[a]))
        tile_id, offset = index_div(tile_id, counts[a]), index_div(offset, tile[a])
    return coords[::-1]


def permuted_mask_fn(geometry: NAGeometry, q_tile, kv_tile):
    """``mask_fn(b, h, q_idx, kv_idx)``: the NA rule on permuted token indices, padding invisible."""
    def mask_fn(b, h, q_idx, kv_idx):
        visible = True
        for a, (qi, kj) in enumerate(zip(_grid_coordinates(q_idx, geometry.shape, q_tile),
                                         _grid_coordinates(kv_idx, geometry.shape, kv_tile))):
            L = geometry.shape[a]
            lo, hi = axis_window_bounds(qi, L, geometry.kernel[a], geometry.stride[a], geometry.causal[a], xp=jnp)
            visible = visible & (qi < L) & (kj < L) & (lo <= kj) & (kj <= hi)
        return visible

    return mask_fn


def na_block_mask(geometry: NAGeometry, q_tile, kv_tile=None) -> BlockMask:
    """The ``BlockMask`` of an undilated NA pattern over tile-major permuted tokens (one block per tile)."""
    kv_tile = q_tile if kv_tile is None else kv_tile
    block_map, full_map = na_tile_maps(geometry, q_tile, kv_tile)
    return BlockMask.from_dense_block_map(
        jnp.asarray(block_map)[None, None], full_map=jnp.asarray(full_map)[None, None],
        block_q=math.prod(q_tile), block_k=math.prod(kv_tile),
        seq_q=block_map.shape[0] * math.prod(q_tile), seq_k=block_map.shape[1] * math.prod(kv_tile))
