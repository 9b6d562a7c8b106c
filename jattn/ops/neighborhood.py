"""``neighborhood_attention``: NATTEN's neighborhood attention (P60 FNA, P48 GNA) in 1-D, 2-D and 3-D.

Tokens lie on a grid, layout ``[B, *spatial, H, D]``; query ``i`` sees the keys of its neighborhood on
every axis (kernel size, stride, dilation, causal flag per axis). The exact rule, the static pattern
(``NAGeometry``) and the token permutation live in ``jattn.core.neighborhood``.

This module is the API: argument validation, the impl dispatch (``jattn.ops.dispatch.run_impl``) and
the glue of the Pallas path. Impls:

* ``"reference"``: the dense mask and ``reference_attention`` (``jattn.ops.neighborhood_reference``).
* ``"xla"``: the CPU fast path (``jattn.ops.neighborhood_xla``): dilation groups split off, query tiles
  attending to the key box their windows span, a custom VJP that recomputes each tile's probabilities.
* ``"pallas"``: GNA's token permutation. Tokens are permuted tile-major, so every multi-dimensional tile
  is one contiguous block; the (q tile, kv tile) pairs with a visible entry become a ``BlockMask`` and
  the shared block-sparse kernel visits only those, evaluating the NA rule only on partial tiles.
  Neighborhood attention has no kernel file of its own: the kernel is ``pallas_kernels/block_sparse.py``
  (through ``jattn.block_sparse_attention``).
* ``"auto"``: xla on CPU, pallas elsewhere.
"""
from __future__ import annotations

import functools
import math

import jax
from jaxtyping import Array, Float

from jattn.core import checks
from jattn.core.neighborhood import (NAGeometry, na_block_mask, neighborhood_mask, pallas_tiles, per_axis,
                                     permuted_mask_fn, token_permute, token_unpermute)
from jattn.ops.dispatch import resolve_impl, run_impl
from jattn.ops.neighborhood_reference import neighborhood_reference
from jattn.ops.neighborhood_xla import DEFAULT_XLA_TILES, over_dilation_groups, tiled_attention

__all__ = ["DEFAULT_PALLAS_TILES", "DEFAULT_XLA_TILES", "NAGeometry", "check_tile_shape", "neighborhood_attention",
           "neighborhood_mask", "permuted_attention"]

DEFAULT_PALLAS_TILES = {1: (128,), 2: (8, 16), 3: (4, 4, 8)}


def neighborhood_attention(q: Float[Array, "B *grid H D"], k: Float[Array, "B *grid Hkv D"],
                           v: Float[Array, "B *grid Hkv D"], kernel_size, *, stride=1, dilation=1, causal=False,
                           scale: float | None = None, impl: str = "auto", tile_shape=None,
                           is_causal=None) -> Float[Array, "B *grid H D"]:
    """Neighborhood attention over a 1-D, 2-D or 3-D token grid, exactly as NATTEN defines it.

    Args:
      q: queries ``[B, *spatial, H, D]``.
      k: keys ``[B, *spatial, Hkv, D]`` (H a multiple of Hkv: GQA/MQA).
      v: values ``[B, *spatial, Hkv, D]``.
      kernel_size: an int or one int per spatial axis (``kernel_size * dilation <= size``).
      stride: an int or one int per spatial axis (``1 <= stride <= kernel_size``).
      dilation: an int or one int per spatial axis (``>= 1``).
      causal: a bool or one bool per spatial axis.
      scale: logit scale (default ``D ** -0.5``).
      impl: "auto" | "xla" | "pallas" | "reference".
      tile_shape: query tile per axis (xla: any ints; pallas: powers of two whose product is >= 16).
      is_causal: deprecated alias of ``causal`` (NATTEN's and jax.nn's name); warns.

    Returns:
      ``[B, *spatial, H, D]`` in q's dtype.

    Raises:
      ValueError: a size out of range, mismatched shapes, or an unknown impl.
      TypeError: a non-float array, a size that is not an int, a flag that is not a bool, or a traced
        static argument.
    """
    causal = checks.causal_alias(causal, is_causal, "jattn.neighborhood_attention")
    checks.check_static("neighborhood_attention", kernel_size=kernel_size, stride=stride, dilation=dilation,
                        causal=causal, scale=scale, impl=impl, tile_shape=tile_shape)
    spatial = checks.check_grid_qkv(q, k, v)
    geometry = NAGeometry.create(spatial, kernel_size, stride, dilation, causal)
    scale = checks.check_positive_float("scale", scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    checks.check_choice("impl", impl, checks.IMPLS)
    # "auto" is decided at lowering time (xla on CPU, pallas elsewhere): its tiles must suit both paths.
    pallas_tile = check_tile_shape(tile_shape, geometry.ndim, "pallas") if resolve_impl(impl) == "pallas" else None
    xla_tile = pallas_tile if tile_shape is not None and pallas_tile is not None else \
        check_tile_shape(tile_shape, geometry.ndim, "xla")
    return _compiled(geometry, impl, (xla_tile, pallas_tile), float(scale), q, k, v)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _compiled(geometry: NAGeometry, impl: str, tiles, scale: float, q, k, v):
    """One compiled program per pattern (eager dispatch of the per-group slicing is slow)."""
    xla_tile, pallas_tile = tiles

    def xla(q, k, v):
        core = functools.partial(tiled_attention, tile=xla_tile, scale=scale)
        return over_dilation_groups(geometry, core, q, k, v).astype(q.dtype)

    def pallas(q, k, v):
        core = functools.partial(permuted_attention, tile=pallas_tile, scale=scale, sparse_impl="pallas")
        return over_dilation_groups(geometry, core, q, k, v).astype(q.dtype)

    def reference(q, k, v):
        return neighborhood_reference(geometry, q, k, v, scale).astype(q.dtype)

    return run_impl(impl, (q, k, v), xla=xla, pallas=pallas, reference=reference)


def check_tile_shape(tile_shape, ndim: int, impl: str):
    """``tile_shape`` (None: the impl's default) as a tuple of ``ndim`` ints, legal for ``impl``."""
    defaults = DEFAULT_PALLAS_TILES if impl == "pallas" else DEFAULT_XLA_TILES
    if tile_shape is None:
        return defaults[ndim]
    tiles = per_axis("tile_shape", tile_shape, ndim)
    if any(t < 1 for t in tiles):
        raise ValueError(f"tile_shape must hold ints >= 1, got {tile_shape!r}")
    if impl == "pallas" and (any(t & (t - 1) for t in tiles) or math.prod(tiles) < 16):
        raise ValueError(f"tile_shape for impl='pallas' must hold powers of two whose product is >= 16 (one "
                         f"kernel block), got {tile_shape!r}")
    return tiles


def permuted_attention(geometry: NAGeometry, q, k, v, *, tile, scale: float, kv_tile=None,
                       sparse_impl: str = "pallas"):
    """Undilated NA through token permutation and ``block_sparse_attention`` (GNA's formulation)."""
    from jattn.ops.block_sparse import block_sparse_attention
    q_tile = pallas_tiles(geometry.shape, tile)
    kv_tile = q_tile if kv_tile is None else pallas_tiles(geometry.shape, kv_tile)
    out = block_sparse_attention(token_permute(q, q_tile), token_permute(k, kv_tile), token_permute(v, kv_tile),
                                 na_block_mask(geometry, q_tile, kv_tile),
                                 mask_fn=permuted_mask_fn(geometry, q_tile, kv_tile), scale=scale, impl=sparse_impl)
    return token_unpermute(out, q_tile, geometry.shape)
