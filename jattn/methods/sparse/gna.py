"""P48 GNA — Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light.

Neighborhood attention with a per-axis kernel size ``w``, stride ``s``, dilation ``δ`` and causal flag on a
1-D to 3-D token grid (the rule is spelled out in ``jattn.core.neighborhood``). GNA's observations,
implemented here:

* **Token permutation.** Reordering tokens tile-major (each multi-dimensional tile of the grid becomes a
  contiguous run) turns the pattern into a block-sparse mask, so the one block-sparse kernel runs it:
  ``gna_attention`` = permute, ``block_sparse_attention`` over ``gna_tile_map``'s tiles with the NA rule
  on partial tiles only, unpermute.
* **Cost model.** ``gna_cost_model`` counts the (q tile, kv tile) pairs a kernel visits and how many of
  them need the fine mask; ``total / visited`` bounds the speedup over dense attention. The mask is
  *perfectly block-sparse* (no partial tiles) e.g. when the stride equals the query tile and windows
  align with kv tiles.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from jaxtyping import Array, Bool, Float

from jattn.core import checks
from jattn.core.neighborhood import (NAGeometry, axis_tile_maps, na_tile_maps, neighborhood_mask, per_axis,
                                     token_permute, token_unpermute)
from jattn.ops.neighborhood import check_tile_shape, neighborhood_attention, permuted_attention
from jattn.ops.neighborhood_xla import over_dilation_groups

__all__ = ["GNATileMap", "gna_attention", "gna_attention_reference", "gna_cost_model", "gna_mask", "gna_tile_map",
           "token_permute", "token_unpermute"]


def gna_mask(shape, kernel_size, stride=1, dilation=1, causal=False) -> Bool[np.ndarray, "T T"]:
    """The dense GNA mask over row-major flattened grid tokens (``jattn.neighborhood_mask``).

    Args:
      shape: the spatial grid shape (1 to 3 axes).
      kernel_size: an int or one int per axis.
      stride: an int or one int per axis (``1 <= stride <= kernel_size``).
      dilation: an int or one int per axis.
      causal: a bool or one bool per axis.

    Returns:
      ``[T, T]`` bool (``T = ∏ shape``), True = attend.
    """
    return neighborhood_mask(shape, kernel_size, stride=stride, dilation=dilation, causal=causal)


def gna_attention_reference(q: Float[Array, "B *grid H D"], k: Float[Array, "B *grid Hkv D"],
                            v: Float[Array, "B *grid Hkv D"], kernel_size, stride=1, dilation=1, causal=False,
                            scale: float | None = None) -> Float[Array, "B *grid H D"]:
    """Dense masked fp32 attention with ``gna_mask`` (the oracle).

    Args:
      q: queries ``[B, *shape, H, D]``.
      k: keys ``[B, *shape, Hkv, D]``.
      v: values ``[B, *shape, Hkv, D]``.
      kernel_size: an int or one int per axis.
      stride: an int or one int per axis.
      dilation: an int or one int per axis.
      causal: a bool or one bool per axis.
      scale: logit scale (default ``D ** -0.5``).

    Returns:
      ``[B, *shape, H, D]`` in q's dtype.
    """
    return neighborhood_attention(q, k, v, kernel_size, stride=stride, dilation=dilation, causal=causal,
                                  scale=scale, impl="reference")


def gna_attention(q: Float[Array, "B *grid H D"], k: Float[Array, "B *grid Hkv D"], v: Float[Array, "B *grid Hkv D"],
                  kernel_size, stride=1, dilation=1, causal=False, *, scale: float | None = None, q_tile=None,
                  kv_tile=None, impl: str = "auto") -> Float[Array, "B *grid H D"]:
    """GNA through token permutation on the shared block-sparse kernel.

    Dilation groups are split off first (each runs undilated).

    Args:
      q: queries ``[B, *shape, H, D]``.
      k: keys ``[B, *shape, Hkv, D]`` (H a multiple of Hkv).
      v: values ``[B, *shape, Hkv, D]``.
      kernel_size: an int or one int per axis.
      stride: an int or one int per axis (``1 <= stride <= kernel_size``).
      dilation: an int or one int per axis.
      causal: a bool or one bool per axis.
      scale: logit scale (default ``D ** -0.5``).
      q_tile: query tile shape per axis (powers of two, at least 16 tokens per tile; default
        ``jattn.ops.neighborhood.DEFAULT_PALLAS_TILES``).
      kv_tile: key tile shape per axis (default ``q_tile``).
      impl: the block-sparse kernel: "pallas", "xla" (its CPU gather path) or "auto".

    Returns:
      ``[B, *shape, H, D]`` in q's dtype.

    Raises:
      ValueError: a size out of range, mismatched shapes, or an unknown impl.
      TypeError: a non-float array, or a size that is not an int.
    """
    spatial = checks.check_grid_qkv(q, k, v)
    geometry = NAGeometry.create(spatial, kernel_size, stride, dilation, causal)
    checks.check_choice("impl", impl, ("auto", "pallas", "xla"))
    scale = checks.check_positive_float("scale", scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_tile = check_tile_shape(q_tile, geometry.ndim, "pallas")
    kv_tile = q_tile if kv_tile is None else check_tile_shape(kv_tile, geometry.ndim, "pallas")

    def core(g, q, k, v):
        return permuted_attention(g, q, k, v, tile=q_tile, kv_tile=kv_tile, scale=scale, sparse_impl=impl)

    return over_dilation_groups(geometry, core, q, k, v).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class GNATileMap:
    """Tiles of one undilated GNA pattern over tile-major permuted tokens.

    ``block_map`` / ``full_map`` ``[Nq, Nk]``: visited / fully visible tile pairs. ``kv_ranges[a]``:
    ``[nq_a, 2]`` first and last kv tile (inclusive) that q tile row ``i`` visits along axis ``a``;
    along each axis the visited kv tiles are one contiguous range.
    """
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    block_map: np.ndarray
    full_map: np.ndarray
    kv_ranges: tuple[np.ndarray, ...]


def gna_tile_map(shape, kernel_size, stride=1, dilation=1, causal=False, *, q_tile, kv_tile=None) -> GNATileMap:
    """The visited kv tiles of every q tile. Dilation must be 1: dilated GNA runs per dilation group,
    each on its own sub-grid (``NAGeometry.dilation_classes``), so call this on a group's shape."""
    geometry = NAGeometry.create(tuple(shape), kernel_size, stride, dilation, causal)
    if any(d != 1 for d in geometry.dilation):
        raise ValueError(f"gna_tile_map takes dilation 1 (tile maps are per dilation group); got dilation "
                         f"{geometry.dilation}: call it on each group's sub-grid shape")
    q_tile = per_axis("q_tile", q_tile, geometry.ndim)
    kv_tile = q_tile if kv_tile is None else per_axis("kv_tile", kv_tile, geometry.ndim)
    block_map, full_map = na_tile_maps(geometry, q_tile, kv_tile)
    ranges = []
    for a in range(geometry.ndim):
        visited, _ = axis_tile_maps(geometry, a, q_tile[a], kv_tile[a])
        first = visited.argmax(axis=1)
        last = visited.shape[1] - 1 - visited[:, ::-1].argmax(axis=1)
        ranges.append(np.stack([first, last], axis=1))
    return GNATileMap(q_tile, kv_tile, block_map, full_map, tuple(ranges))


def gna_cost_model(shape, kernel_size, stride=1, dilation=1, causal=False, *, q_tile, kv_tile=None) -> dict:
    """Tile-pair counts of a GNA pattern summed over its dilation groups.

    Returns ``total_pairs`` (dense), ``visited_pairs`` (≥ 1 visible entry), ``full_pairs``,
    ``partial_pairs`` (need the fine mask), ``speedup_bound = total / visited`` and
    ``perfectly_block_sparse`` (no partial pairs).
    """
    geometry = NAGeometry.create(tuple(shape), kernel_size, stride, dilation, causal)
    q_tile = per_axis("q_tile", q_tile, geometry.ndim)
    kv_tile = q_tile if kv_tile is None else per_axis("kv_tile", kv_tile, geometry.ndim)
    totals = {"total_pairs": 0, "visited_pairs": 0, "full_pairs": 0}
    for sub_shape, offsets in geometry.dilation_classes():
        block_map, full_map = na_tile_maps(geometry.undilated(sub_shape), q_tile, kv_tile)
        totals["total_pairs"] += len(offsets) * block_map.size
        totals["visited_pairs"] += len(offsets) * int(block_map.sum())
        totals["full_pairs"] += len(offsets) * int(full_map.sum())
    totals["partial_pairs"] = totals["visited_pairs"] - totals["full_pairs"]
    totals["speedup_bound"] = totals["total_pairs"] / totals["visited_pairs"]
    totals["perfectly_block_sparse"] = totals["partial_pairs"] == 0
    return totals
