"""P60 FasterNA — Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the
Threadblock Level.

Neighborhood attention (NA) over a 1-D, 2-D or 3-D grid, layout ``[B, *spatial, H, D]``: on every axis
each query attends the ``K`` nearest in-group keys, the window shifted (not truncated) at the borders so
that every query sees exactly ``∏K`` keys; dilation ``δ`` splits each axis into ``δ`` interleaved groups
and runs NA inside each; a causal axis keeps the keys with ``0 <= i' - j' < K``. The exact rule (with
GNA's stride, P48) is in ``jattn.ops.neighborhood``.

The paper's fused kernel (FNA) tiles queries in the multi-dimensional space and, per query tile, visits
only the key range its windows span. jattn's ``neighborhood_attention`` does the same: the xla impl
slices a key box per query tile, the pallas impl permutes tokens tile-major and runs the shared
block-sparse kernel over the visited tiles, masking only partial ones. Relative positional bias (RPB)
is not implemented.
"""
from __future__ import annotations

import numpy as np

from jattn.ops.neighborhood import neighborhood_attention, neighborhood_mask as _neighborhood_mask

__all__ = ["na_attention", "neighborhood_mask"]


def neighborhood_mask(shape, kernel_size, dilation=1, causal=False) -> np.ndarray:
    """The dense ``[T, T]`` NA mask over row-major flattened grid tokens (stride 1)."""
    return _neighborhood_mask(shape, kernel_size, dilation=dilation, is_causal=causal)


def na_attention(q, k, v, kernel_size, dilation=1, causal=False, *, scale=None, impl: str = "auto",
                 is_causal=None):
    """NA in 1-D, 2-D or 3-D (chosen by q's rank): ``q [B, *spatial, H, D]``, ``k, v [B, *spatial, Hkv, D]``.

    ``causal`` is the flag's name in every jattn op; ``is_causal`` (NATTEN's name) is a deprecated alias."""
    from jattn.core.checks import causal_alias
    causal = causal_alias(causal, is_causal, "na_attention")
    return neighborhood_attention(q, k, v, kernel_size, dilation=dilation, causal=causal, scale=scale,
                                  impl=impl)
