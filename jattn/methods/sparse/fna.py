"""P60 FasterNA — Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the
Threadblock Level.

Neighborhood attention (NA) over a 1-D, 2-D or 3-D grid, layout ``[B, *spatial, H, D]``: on every axis
each query attends the ``K`` nearest in-group keys, the window shifted (not truncated) at the borders so
that every query sees exactly ``∏K`` keys; dilation ``δ`` splits each axis into ``δ`` interleaved groups
and runs NA inside each; a causal axis keeps the keys with ``0 <= i' - j' < K``. The exact rule (with
GNA's stride, P48) is in ``jattn.core.neighborhood``.

The paper's fused kernel (FNA) tiles queries in the multi-dimensional space and, per query tile, visits
only the key range its windows span. jattn's ``neighborhood_attention`` does the same: the xla impl
slices a key box per query tile, the pallas impl permutes tokens tile-major and runs the shared
block-sparse kernel over the visited tiles, masking only partial ones. Relative positional bias (RPB)
is not implemented.
"""
from __future__ import annotations

import numpy as np
from jaxtyping import Array, Bool, Float

from jattn.core.checks import causal_alias
from jattn.core.neighborhood import neighborhood_mask as _neighborhood_mask
from jattn.ops.neighborhood import neighborhood_attention

__all__ = ["na_attention", "neighborhood_mask"]


def neighborhood_mask(shape, kernel_size, dilation=1, causal=False) -> Bool[np.ndarray, "T T"]:
    """The dense NA mask over row-major flattened grid tokens (stride 1).

    Args:
      shape: the spatial grid shape (1 to 3 axes).
      kernel_size: an int or one int per axis.
      dilation: an int or one int per axis.
      causal: a bool or one bool per axis.

    Returns:
      ``[T, T]`` bool (``T = ∏ shape``), True = attend.
    """
    return _neighborhood_mask(shape, kernel_size, dilation=dilation, causal=causal)


def na_attention(q: Float[Array, "B *grid H D"], k: Float[Array, "B *grid Hkv D"], v: Float[Array, "B *grid Hkv D"],
                 kernel_size, dilation=1, causal=False, *, scale: float | None = None, impl: str = "auto",
                 is_causal=None) -> Float[Array, "B *grid H D"]:
    """NA in 1-D, 2-D or 3-D (chosen by q's rank), on ``jattn.neighborhood_attention``.

    Args:
      q: queries ``[B, *spatial, H, D]``.
      k: keys ``[B, *spatial, Hkv, D]`` (H a multiple of Hkv).
      v: values ``[B, *spatial, Hkv, D]``.
      kernel_size: an int or one int per axis.
      dilation: an int or one int per axis.
      causal: a bool or one bool per axis (the flag's name in every jattn op).
      scale: logit scale (default ``D ** -0.5``).
      impl: "auto" | "xla" | "pallas" | "reference".
      is_causal: deprecated alias of ``causal`` (NATTEN's name); warns.

    Returns:
      ``[B, *spatial, H, D]`` in q's dtype.
    """
    causal = causal_alias(causal, is_causal, "na_attention")
    return neighborhood_attention(q, k, v, kernel_size, dilation=dilation, causal=causal, scale=scale,
                                  impl=impl)
