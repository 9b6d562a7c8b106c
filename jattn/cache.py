"""KV caches for ``jattn.decode_attention``: contiguous (P26 vAttention's idea) and paged, as JAX pytrees.

Both are immutable pytrees: every operation returns a new cache, and every operation is ``jit``-able, so a
generation step (append the new token's K/V, then attend) compiles once. Layout is head-major, as the
decode kernel reads it.

* ``ContiguousKVCache``: one preallocated ``[B, Hkv, capacity, D]`` buffer per K and V plus ``lengths``.
  Appending writes in place (no re-layout). When an append would pass the capacity the policy decides:
  ``"raise"`` (a ``ValueError`` naming the sequence) or ``"grow"`` (a new buffer, doubled and rounded to
  ``page_size``: the one copy). Both act on concrete lengths, before anything is written; under ``jit``
  the lengths are traced, so an overflowing append writes nothing past the buffer and marks the sequence
  overflowed (``lengths = capacity + 1``), which ``decode_attention`` turns into NaN rows: never a silent
  overwrite.
* ``PagedKVCache``: a page pool ``[Hkv, num_pages, page_size, D]``, ``page_table [B, max_pages]``
  (-1 = no page) and a per-page reference count (0 = free). Appending takes free pages as a sequence
  grows; ``fork`` shares a prefix (reference counts up); writing into a shared page first copies it
  (copy-on-write); ``free`` returns a sequence's pages. With no free page left, an append raises
  (concrete) or marks the sequence overflowed (traced).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn.core import checks
from jattn.ops.decode import decode_attention
from jattn.ops.decode_reference import contiguous_cache

NO_PAGE = -1


def _check_new(name: str, x, B: int, Hkv: int, D: int, dtype):
    checks.check_float_array(name, x, 4)
    if x.shape[0] != B or x.shape[2] != Hkv or x.shape[3] != D:
        raise ValueError(f"{name} must be [B={B}, T_new, Hkv={Hkv}, {D}], got {checks.describe(x)}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must have the cache's dtype {dtype}, got {checks.describe(x)}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ContiguousKVCache:
    k: jax.Array            # [B, Hkv, capacity, D]
    v: jax.Array            # [B, Hkv, capacity, Dv]
    lengths: jax.Array      # [B] int32
    policy: str = dataclasses.field(default="raise", metadata=dict(static=True))
    page_size: int = dataclasses.field(default=128, metadata=dict(static=True))

    @classmethod
    def create(cls, batch: int, kv_heads: int, capacity: int, head_dim: int, *, value_dim: Optional[int] = None,
               dtype=jnp.float32, policy: str = "raise", page_size: int = 128) -> "ContiguousKVCache":
        """An empty cache; ``capacity`` is rounded up to a multiple of ``page_size`` (the kernel's tile)."""
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("capacity", capacity),
                            ("head_dim", head_dim), ("page_size", page_size)):
            checks.check_int(name, value)
        checks.check_choice("policy", policy, ("raise", "grow"))
        capacity = -(-capacity // page_size) * page_size
        shape = (batch, kv_heads, capacity)
        return cls(jnp.zeros(shape + (head_dim,), dtype), jnp.zeros(shape + (value_dim or head_dim,), dtype),
                   jnp.zeros((batch,), jnp.int32), policy, page_size)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def dtype(self):
        return self.k.dtype

    def contiguous(self):
        """``(k, v)`` as ``[B, Hkv, capacity, D]``: the buffers themselves."""
        return self.k, self.v

    def grow(self, capacity: int) -> "ContiguousKVCache":
        """The same cache in a larger buffer (a copy), ``capacity`` rounded up to ``page_size``."""
        capacity = -(-capacity // self.page_size) * self.page_size
        extra = capacity - self.capacity
        if extra <= 0:
            return self
        pad = ((0, 0), (0, 0), (0, extra), (0, 0))
        return dataclasses.replace(self, k=jnp.pad(self.k, pad), v=jnp.pad(self.v, pad))

    def append(self, k_new, v_new) -> "ContiguousKVCache":
        """Writes ``k_new, v_new [B, T_new, Hkv, D]`` after each sequence's current length."""
        B, Hkv, _, D = self.k.shape
        _check_new("k_new", k_new, B, Hkv, D, self.k.dtype)
        _check_new("v_new", v_new, B, Hkv, self.v.shape[3], self.v.dtype)
        if k_new.shape[1] != v_new.shape[1]:
            raise ValueError(f"k_new and v_new must hold the same tokens, got {k_new.shape[1]} and {v_new.shape[1]}")
        T_new = k_new.shape[1]
        cache = self
        if not checks.is_traced(self.lengths):
            needed = int(np.max(np.asarray(self.lengths))) + T_new
            if needed > self.capacity:
                if self.policy == "raise":
                    worst = int(np.argmax(np.asarray(self.lengths)))
                    raise ValueError(f"appending {T_new} tokens to sequence {worst} (length "
                                     f"{int(self.lengths[worst])}) passes the capacity {self.capacity} "
                                     f"(policy='raise'; use policy='grow' or a larger capacity)")
                cache = self.grow(max(2 * self.capacity, needed))
        fits = cache.lengths + T_new <= cache.capacity

        def write(buffer, new, start, ok):
            new = jnp.swapaxes(new, 0, 1).astype(buffer.dtype)        # [Hkv, T_new, D]
            at = (0, jnp.minimum(start, cache.capacity - T_new), 0)
            # an overflowing write rewrites what is there (in place: no copy of the buffer)
            return lax.dynamic_update_slice(buffer, jnp.where(ok, new, lax.dynamic_slice(buffer, at, new.shape)), at)

        k = jax.vmap(write)(cache.k, k_new, cache.lengths, fits)
        v = jax.vmap(write)(cache.v, v_new, cache.lengths, fits)
        lengths = jnp.where(fits, cache.lengths + T_new, cache.capacity + 1).astype(jnp.int32)
        return dataclasses.replace(cache, k=k, v=v, lengths=lengths)

    def attend(self, q, **kwargs):
        """``decode_attention`` of ``q`` (the last ``Tq`` tokens already appended) over this cache."""
        return decode_attention(q, self.k, self.v, self.lengths, **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    k_pool: jax.Array       # [Hkv, num_pages, page_size, D]
    v_pool: jax.Array       # [Hkv, num_pages, page_size, Dv]
    page_table: jax.Array   # [B, max_pages] int32, NO_PAGE where unassigned
    lengths: jax.Array      # [B] int32
    refcount: jax.Array     # [num_pages] int32; 0 = free

    @classmethod
    def create(cls, batch: int, kv_heads: int, num_pages: int, page_size: int, max_pages: int, head_dim: int, *,
               value_dim: Optional[int] = None, dtype=jnp.float32) -> "PagedKVCache":
        """An empty cache: a pool of ``num_pages`` pages, each sequence up to ``max_pages`` of them."""
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("num_pages", num_pages),
                            ("page_size", page_size), ("max_pages", max_pages), ("head_dim", head_dim)):
            checks.check_int(name, value)
        pool = (kv_heads, num_pages, page_size)
        return cls(jnp.zeros(pool + (head_dim,), dtype), jnp.zeros(pool + (value_dim or head_dim,), dtype),
                   jnp.full((batch, max_pages), NO_PAGE, jnp.int32), jnp.zeros((batch,), jnp.int32),
                   jnp.zeros((num_pages,), jnp.int32))

    @property
    def page_size(self) -> int:
        return self.k_pool.shape[2]

    @property
    def capacity(self) -> int:
        return self.page_table.shape[1] * self.page_size

    @property
    def dtype(self):
        return self.k_pool.dtype

    def table(self):
        """The page table with unassigned entries pointing at page 0 (never read: beyond every length)."""
        return jnp.where(self.page_table == NO_PAGE, 0, self.page_table)

    def contiguous(self):
        """``(k, v)`` as ``[B, Hkv, capacity, D]``: the pages gathered in table order (a copy)."""
        return contiguous_cache(self.k_pool, self.table()), contiguous_cache(self.v_pool, self.table())

    def free_pages(self) -> jax.Array:
        return jnp.sum(self.refcount == 0)

    def append(self, k_new, v_new) -> "PagedKVCache":
        """Writes ``k_new, v_new [B, T_new, Hkv, D]`` after each sequence's length, taking free pages as
        needed and copying a shared page before writing into it."""
        Hkv, _, P, D = self.k_pool.shape
        B = self.page_table.shape[0]
        _check_new("k_new", k_new, B, Hkv, D, self.k_pool.dtype)
        _check_new("v_new", v_new, B, Hkv, self.v_pool.shape[3], self.v_pool.dtype)
        cache = _append_tokens(self, k_new, v_new)
        if not checks.is_traced(cache.lengths) and np.any(np.asarray(cache.lengths) > cache.capacity):
            bad = np.flatnonzero(np.asarray(cache.lengths) > cache.capacity).tolist()
            raise ValueError(f"appending {k_new.shape[1]} tokens overflowed sequences {bad}: the page pool has no "
                             f"free page or a sequence passed max_pages * page_size = {cache.capacity}")
        return cache

    def append_token(self, k_tok, v_tok) -> "PagedKVCache":
        """One token per sequence (``[B, Hkv, D]``): the step ``append`` scans over."""
        def one(b, cache):
            return cache._append_one(b, k_tok[b], v_tok[b])
        return lax.fori_loop(0, self.page_table.shape[0], one, self)

    def _append_one(self, b, k_tok, v_tok) -> "PagedKVCache":
        P = self.page_size
        length = self.lengths[b]
        slot = jnp.minimum(length // P, self.page_table.shape[1] - 1)
        current = self.page_table[b, slot]
        overflowed = length >= self.capacity
        opens = current == NO_PAGE
        shared = (~opens) & (self.refcount[jnp.maximum(current, 0)] > 1)
        needs_page = opens | shared
        free = self.refcount == 0
        fresh = jnp.argmax(free)
        ok = ~overflowed & (~needs_page | jnp.any(free))
        page = jnp.where(needs_page, fresh, current)
        refcount = self.refcount
        refcount = jnp.where(ok & needs_page, refcount.at[fresh].add(1), refcount)
        refcount = jnp.where(ok & shared, refcount.at[jnp.maximum(current, 0)].add(-1), refcount)
        copy = ok & shared   # copy-on-write: the shared page's contents move to the fresh page first
        offset = length % P

        def write(pool, token):  # in place: a skipped write rewrites what is there
            source = pool[:, jnp.maximum(current, 0)]
            pool = pool.at[:, fresh].set(jnp.where(copy, source, pool[:, fresh]))
            return pool.at[:, page, offset].set(jnp.where(ok, token.astype(pool.dtype), pool[:, page, offset]))
        k_pool, v_pool = write(self.k_pool, k_tok), write(self.v_pool, v_tok)
        table = jnp.where(ok, self.page_table.at[b, slot].set(page), self.page_table)
        lengths = self.lengths.at[b].set(jnp.where(ok, length + 1, self.capacity + 1))
        return PagedKVCache(k_pool, v_pool, table, lengths, refcount)

    def fork(self, source: int, target: int) -> "PagedKVCache":
        """Sequence ``target`` becomes a copy of ``source`` that shares its pages (copy-on-write); ``target``'s
        own pages are freed first."""
        cache = self.free(target)
        pages = cache.page_table[source]
        held = pages != NO_PAGE
        refcount = cache.refcount.at[jnp.where(held, pages, 0)].add(held.astype(jnp.int32))
        return dataclasses.replace(cache, page_table=cache.page_table.at[target].set(pages),
                                   lengths=cache.lengths.at[target].set(cache.lengths[source]), refcount=refcount)

    def free(self, sequence: int) -> "PagedKVCache":
        """Returns sequence ``sequence``'s pages to the pool (shared pages stay with their other owners)."""
        pages = self.page_table[sequence]
        held = pages != NO_PAGE
        refcount = self.refcount.at[jnp.where(held, pages, 0)].add(-held.astype(jnp.int32))
        return dataclasses.replace(self, page_table=self.page_table.at[sequence].set(NO_PAGE),
                                   lengths=self.lengths.at[sequence].set(0), refcount=refcount)

    def attend(self, q, **kwargs):
        """``decode_attention`` of ``q`` (the last ``Tq`` tokens already appended) over this cache."""
        return decode_attention(q, self.k_pool, self.v_pool, self.lengths, page_table=self.table(), **kwargs)


@jax.jit
def _append_tokens(cache: PagedKVCache, k_new, v_new) -> PagedKVCache:
    """``append``'s work: a scan of ``append_token`` over the new tokens (one compile per shape)."""
    def step(cache, token):
        return cache.append_token(*token), None
    cache, _ = lax.scan(step, cache, (jnp.swapaxes(k_new, 0, 1), jnp.swapaxes(v_new, 0, 1)))
    return cache
