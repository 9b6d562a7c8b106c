"""``neighborhood_attention(impl="reference")``: the dense oracle form of neighborhood attention.

The explicit ``[T, T]`` mask of the NA rule (``jattn.core.neighborhood.neighborhood_mask``) over the
row-major flattened grid, then the float32 dense reference (``jattn.core.reference``).
"""
from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from jattn.core.neighborhood import NAGeometry, neighborhood_mask
from jattn.core.reference import reference_attention


def flatten_grid(x: Float[Array, "B *grid H D"]) -> Float[Array, "B T H D"]:
    """``[B, *grid, H, D]`` -> ``[B, T, H, D]`` (row-major over the grid)."""
    return x.reshape(x.shape[0], -1, *x.shape[-2:])


def neighborhood_reference(geometry: NAGeometry, q: Float[Array, "B *grid H D"], k: Float[Array, "B *grid Hkv D"],
                           v: Float[Array, "B *grid Hkv D"], scale: float) -> Float[Array, "B *grid H D"]:
    """Dense masked float32 attention with the pattern's explicit mask (the oracle).

    Args:
      geometry: the validated pattern; its shape is q's spatial shape.
      q: queries.
      k: keys.
      v: values.
      scale: the logit scale.

    Returns:
      ``[B, *grid, H, D]`` in q's dtype (computed in float32).
    """
    mask = jnp.asarray(neighborhood_mask(geometry.shape, geometry.kernel, stride=geometry.stride,
                                         dilation=geometry.dilation, causal=geometry.causal))
    out = reference_attention(flatten_grid(q), flatten_grid(k), flatten_grid(v), mask=mask, scale=scale)
    return out.reshape(q.shape[:-1] + v.shape[-1:])
