"""The decode family's oracle: the dense float32 reference over the cache laid out contiguously.

Caches are head-major: ``[B, Hkv, S, D]``, or a page pool ``[Hkv, num_pages, page_size, D]`` gathered into
``[B, Hkv, W * page_size, D]`` through its page table. The decode rule
(see ``jattn.ops.decode``) becomes an explicit mask, rows past each length are zeroed (never read, whatever
they hold), and ``jattn.core.reference.reference_attention``
(the library's semantics) does the rest.
"""
from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jattn.core.reference import reference_attention


def contiguous_cache(cache, page_table):
    """``cache`` as ``[B, Hkv, S, D]``: itself, or the pool's pages gathered in ``page_table`` order."""
    if page_table is None:
        return cache
    B, W = page_table.shape
    Hkv, num_pages, page_size, D = cache.shape
    pages = cache[:, jnp.clip(page_table, 0, num_pages - 1)]        # [Hkv, B, W, P, D]
    return jnp.moveaxis(pages, 1, 0).reshape(B, Hkv, W * page_size, D)


def zero_past_lengths(cache, lengths, kv_offset=0):
    """A contiguous ``[B, Hkv, S, D]`` cache (its first row at position ``kv_offset``) with every row at a
    position ``>= lengths[b]`` set to 0, so stale, even non-finite, rows past a sequence's length cannot
    reach its result through ``0 * NaN``."""
    live = kv_offset + jnp.arange(cache.shape[2])[None, :] < lengths[:, None]   # [B, S]
    return jnp.where(live[:, None, :, None], cache, 0)


def decode_visibility(lengths, new_tokens: int, capacity: int, window_left: int | None, kv_offset=0):
    """``[B, Tq, S]`` bool: query ``t`` (at position ``length - Tq + t``) sees key ``kv`` iff
    ``kv <= position``, ``kv < length`` and, with a window, ``kv >= position - window_left``.

    ``kv_offset`` is the position of the cache's first key (a shard of a longer cache; may be traced)."""
    q_pos = lengths[:, None] - new_tokens + jnp.arange(new_tokens)[None, :]
    kv = kv_offset + jnp.arange(capacity)[None, None, :]
    visible = (kv <= q_pos[..., None]) & (kv < lengths[:, None, None])
    if window_left is not None:
        visible = visible & (kv >= q_pos[..., None] - window_left)
    return visible


def decode_attention_reference(q: Float[Array, "B Tq H D"], k_cache: Float[Array, "..."],
                               v_cache: Float[Array, "..."], lengths: Int[Array, "B"], *, page_table=None,
                               window_left: int | None = None, sinks=None, softcap=None, scale: float):
    """Dense fp32 decode attention (arguments already validated by ``jattn.decode_attention``).

    Args:
      q: ``[B, Tq, H, D]`` new-token queries.
      k_cache: ``[B, Hkv, S, D]``, or a page pool ``[Hkv, num_pages, page_size, D]`` with ``page_table``.
      v_cache: like ``k_cache`` with value dim ``Dv``.
      lengths: ``[B]`` valid keys per sequence, the new tokens included.
      page_table: ``[B, W]`` pool page of each logical page, or None.
      window_left: keys back from each query's position it may see, or None.
      sinks: ``[H]`` value-less softmax terms, or None.
      softcap: logit soft cap, or None.
      scale: logit scale.

    Returns:
      ``(out [B, Tq, H, Dv] float32, lse [B, Tq, H] float32)``.
    """
    k, v = (jnp.swapaxes(zero_past_lengths(contiguous_cache(cache, page_table), lengths), 1, 2)
            for cache in (k_cache, v_cache))
    visible = decode_visibility(lengths, q.shape[1], k.shape[1], window_left)
    out, lse = reference_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                   mask=visible[:, None], scale=scale, softcap=softcap, sinks=sinks,
                                   return_lse=True)
    return out, lse
