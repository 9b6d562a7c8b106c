"""P26 vAttention (Prabhu et al., "vAttention: Dynamic Memory Management for Serving LLMs without
PagedAttention"): a virtually contiguous KV cache whose physical pages are mapped on demand, so unmodified
non-paged attention kernels read it with only ``cache_seqlens``.

vAttention changes no attention math. Per layer it reserves a *virtual* K and a V tensor
``[B_max, L_max, Hkv, d]``; slot ``r``'s region starts page aligned (``ROUND_UP(L_max * bpt, P)`` bytes per
slot, ``bpt = Hkv * d * bytes_per_elem`` the bytes of one token of one layer's K or V). Each iteration
``step(seq_lens)`` makes sure that, for every slot ``r`` and every (layer, K/V),

    pages(r) = ceil(seq_lens[r] * bpt / P)

physical pages of ``P`` bytes (2 MB, or 64-256 KB with the authors' modified UVM driver) are mapped. The
official allocator (microsoft/vattention ``vattention/vattention.cu``) maps one page of every (layer, K/V)
at once (a "KV block" of ``2 * num_layers`` pages), and adds: (i) the next step's pages are mapped in a
background thread (``step_async``); (ii) *deferred reclamation*: ``free_batch_idx`` only marks a slot idle,
its pages stay mapped and the next request given that slot (``alloc_new_batch_idx``, best fit) reuses them;
pages are unmapped only on demand when the free pool runs short (highest slot first, down to each slot's
need); (iii) *eager allocation* of a few steps ahead (``EAGER_NUM_STEPS``).

JAX cannot demand-page device memory, so this module is two things:

* ``VirtualKVAllocator(page_bytes, deferred_reclaim, eager_steps, ...)``: a pure-Python *accounting*
  simulator of that allocator. It reports mapped bytes, used bytes, internal fragmentation (the unused
  tail of the pages live requests need: under one page per (request, layer, K/V)), over-commit (pages
  mapped beyond that need: eager pages and the surplus a reused slot kept, which vAttention counts as
  free and reclaims on demand), idle bytes (slots whose pages deferred reclamation keeps) and page-map /
  page-unmap calls (one per physical page, i.e. per cuMemMap). ``PagedBlockAllocator`` (vLLM-style
  16-token blocks, freed at once) and ``static_reservation_bytes`` (every slot backed to ``L_max``) are
  the baselines ``benchmarks/vattention_trace.py`` compares it with.
* thin attention entry points over the one decode op (``jattn.decode_attention``; no new kernel: its
  Pallas kernel already reads scalar-prefetched lengths and visits kv tiles only up to each length):
  ``contiguous_decode_attention`` (the vAttention path: a contiguous ``[B, L_max, Hkv, d]`` cache plus
  ``seq_lens``), ``contiguous_prefill_attention`` (new tokens at ``cache_offsets``) and the
  ``paged_decode_attention`` baseline (page pool + block table).

Stale data beyond ``seq_len``. Deferred reclamation hands a slot's pages, with the previous request's K/V
still in them, to the next request, so whatever lies past ``seq_lens[r]`` must not reach the output. The
shared decode op guarantees it on every impl (keys and values past each length are never read, even NaN or
Inf: the Pallas kernel zeroes the V rows past the length in its tile, the xla path recomputes on a zeroed
cache only when its output is not finite), so these entry points pass the caches through untouched.

Layouts. ``layout="bshd"`` (default) is the spec's and vAttention's/FlashAttention's: contiguous caches
``[B, L_max, Hkv, d]``, page pools ``[num_pages, page_size, Hkv, d]``; they are transposed to jattn's
head-major layout (a copy). ``layout="bhsd"`` is jattn's own (``jattn.cache``): ``[B, Hkv, L_max, d]`` and
``[Hkv, num_pages, page_size, d]``, passed through without a copy.

Deliberate deviations from the official code: (a) pages per slot use the exact byte formula above; the
code uses ``tokens_per_page = P // bpt`` (identical whenever ``bpt`` divides ``P``, as for every real
model); (b) ``alloc_slot`` is a true best fit (the idle slot with the fewest mapped pages that still covers
the prompt, else the one with the most), where the code's loop never prefers a mapped slot over an empty
one listed before it; (c) eager pages come only from the free pool (the code may also reclaim for the next
step's page); (d) mapping is counted, not timed: the background thread is a separate "async" counter.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jattn.core import checks
from jattn.ops.decode import decode_attention

KB = 1024
MB = 1024 * KB
LAYOUTS = ("bshd", "bhsd")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_nonneg_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


# ----------------------------------------------------------------------------------------------------------
# Allocator accounting
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepStats:
    """Accounting after one ``step``. Bytes are summed over every layer and over K and V."""
    mapped_bytes: int          # physical bytes mapped (live and idle slots)
    used_bytes: int            # bytes the live requests' tokens occupy
    slack_bytes: int           # internal fragmentation: the unused tail of the pages live requests need
    overcommit_bytes: int      # mapped on live slots beyond their need (eager pages, a reused slot's surplus)
    idle_bytes: int            # bytes still mapped on idle slots (deferred reclamation)
    map_calls: int             # page-map calls since the last step (one per physical page; sync + async)
    sync_map_calls: int        # of which on the critical path (this step's own need)
    unmap_calls: int           # page-unmap calls since the last step (``free_slot`` calls included)
    active: int                # live requests


class VirtualKVAllocator:
    """Accounting simulator of vAttention's allocator (see the module docstring).

    Args:
      page_bytes: physical page size ``P`` in bytes (2 MB default in vAttention; 64/128/256 KB with UVM).
      deferred_reclaim: keep a finished slot's pages mapped for the next request in that slot (default True,
        as the official code); False unmaps them when the slot frees.
      eager_steps: map ahead so that ``seq_len + eager_steps`` tokens fit (the background-thread pages);
        0 maps only what this step needs.
      num_layers: transformer layers (each has one K and one V reservation).
      kv_heads: ``Hkv``.
      head_dim: ``d``.
      bytes_per_elem: bytes of one cache element (2 for fp16/bf16).
      max_batch: ``B_max``, slots of the per-layer reservations ``[B_max, L_max, Hkv, d]``.
      max_len: ``L_max``, tokens per slot.
      pool_pages: physical pages available in all (every layer, K and V); None = unlimited. When a step needs
        more than are free, idle and over-mapped pages are unmapped on demand (highest slot first).
    """

    def __init__(self, page_bytes: int, deferred_reclaim: bool = True, eager_steps: int = 0, *,
                 num_layers: int, kv_heads: int, head_dim: int, bytes_per_elem: int = 2, max_batch: int,
                 max_len: int, pool_pages: Optional[int] = None):
        self.page_bytes = checks.check_int("page_bytes", page_bytes)
        self.deferred_reclaim = checks.check_bool("deferred_reclaim", deferred_reclaim)
        self.eager_steps = _check_nonneg_int("eager_steps", eager_steps)
        self.num_layers = checks.check_int("num_layers", num_layers)
        self.kv_heads = checks.check_int("kv_heads", kv_heads)
        self.head_dim = checks.check_int("head_dim", head_dim)
        self.bytes_per_elem = checks.check_int("bytes_per_elem", bytes_per_elem)
        self.max_batch = checks.check_int("max_batch", max_batch)
        self.max_len = checks.check_int("max_len", max_len)
        self.pool_pages = None if pool_pages is None else _check_nonneg_int("pool_pages", pool_pages)
        self.seq_lens = [0] * self.max_batch
        self.mapped = [0] * self.max_batch          # pages per (layer, K/V) of each slot
        self.total_map_calls = 0
        self.total_unmap_calls = 0
        self.reused_pages = 0                       # pages a new request found already mapped in its slot
        self._step_map = self._step_sync = self._step_unmap = 0

    # geometry -------------------------------------------------------------------------------------------
    @property
    def bytes_per_token_layer(self) -> int:
        """Bytes of one token in one layer's K (or V): ``Hkv * d * bytes_per_elem``."""
        return self.kv_heads * self.head_dim * self.bytes_per_elem

    @property
    def tensors(self) -> int:
        """Virtual tensors: one K and one V per layer."""
        return 2 * self.num_layers

    @property
    def max_pages_per_slot(self) -> int:
        """Pages of one slot's page-aligned region of one tensor: ``ceil(L_max * bpt / P)``."""
        return _ceil_div(self.max_len * self.bytes_per_token_layer, self.page_bytes)

    @property
    def reservations(self) -> dict:
        """The virtual tensors, ``(layer, "k" | "v") -> shape [B_max, L_max, Hkv, d]``."""
        shape = (self.max_batch, self.max_len, self.kv_heads, self.head_dim)
        return {(layer, kv): shape for layer in range(self.num_layers) for kv in ("k", "v")}

    @property
    def virtual_bytes(self) -> int:
        """Virtual address space reserved: every slot's page-aligned region in every tensor."""
        return self.tensors * self.max_batch * self.max_pages_per_slot * self.page_bytes

    def pages_for(self, tokens: int) -> int:
        """``ceil(tokens * bpt / P)`` pages per (slot, layer, K/V), capped at the slot's region."""
        return min(_ceil_div(tokens * self.bytes_per_token_layer, self.page_bytes), self.max_pages_per_slot)

    # state ----------------------------------------------------------------------------------------------
    def pages(self, slot: int, layer: int = 0, kv: str = "k") -> int:
        """Pages mapped for ``slot`` in tensor ``(layer, kv)`` (every tensor of a slot maps alike)."""
        self._check_slot("slot", slot)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must lie in [0, {self.num_layers}), got {layer}")
        checks.check_choice("kv", kv, ("k", "v"))
        return self.mapped[slot]

    @property
    def mapped_pages(self) -> int:
        """Physical pages mapped in all (every tensor)."""
        return self.tensors * sum(self.mapped)

    @property
    def free_pages(self) -> Optional[int]:
        return None if self.pool_pages is None else self.pool_pages - self.mapped_pages

    def fragmentation_pages(self, slot: int) -> float:
        """Internal fragmentation of a live slot per (layer, K/V): the unused part of the pages its length
        needs, ``ceil(len * bpt / P) - len * bpt / P`` (< 1 page)."""
        self._check_slot("slot", slot)
        n = self.seq_lens[slot]
        return self.pages_for(n) - n * self.bytes_per_token_layer / self.page_bytes if n else 0.0

    def overcommit_pages(self, slot: int) -> int:
        """Pages mapped on ``slot`` beyond what its length needs, per (layer, K/V): eager pages, the surplus
        a reused slot kept from its previous request, or all of an idle slot's pages. vAttention counts
        them as free (reclaimable on demand)."""
        self._check_slot("slot", slot)
        return self.mapped[slot] - self.pages_for(self.seq_lens[slot])

    def stats(self) -> StepStats:
        P, bpt, T = self.page_bytes, self.bytes_per_token_layer, self.tensors
        live = [r for r in range(self.max_batch) if self.seq_lens[r]]
        used = T * bpt * sum(self.seq_lens[r] for r in live)
        needed = T * P * sum(self.pages_for(self.seq_lens[r]) for r in live)
        live_mapped = T * P * sum(self.mapped[r] for r in live)
        return StepStats(mapped_bytes=T * P * sum(self.mapped), used_bytes=used, slack_bytes=needed - used,
                         overcommit_bytes=live_mapped - needed, idle_bytes=T * P * sum(self.mapped) - live_mapped,
                         map_calls=self._step_map,
                         sync_map_calls=self._step_sync, unmap_calls=self._step_unmap, active=len(live))

    # requests -------------------------------------------------------------------------------------------
    def alloc_slot(self, seq_len: int) -> int:
        """A slot for a new request of ``seq_len`` prompt tokens (``alloc_new_batch_idx``): among idle slots,
        the one with the fewest mapped pages that still covers the prompt, else the one with the most.
        Its length is set; its pages are mapped by the next ``step``."""
        self._check_len("seq_len", seq_len)
        if seq_len == 0:
            raise ValueError("seq_len must be >= 1 for a new request, got 0")
        idle = [r for r in range(self.max_batch) if not self.seq_lens[r]]
        if not idle:
            raise RuntimeError(f"no idle slot: all max_batch={self.max_batch} slots hold live requests")
        need = self.pages_for(seq_len)
        covering = [r for r in idle if self.mapped[r] >= need]
        slot = min(covering, key=lambda r: (self.mapped[r], r)) if covering else \
            max(idle, key=lambda r: (self.mapped[r], -r))
        self.reused_pages += self.tensors * min(self.mapped[slot], need)
        self.seq_lens[slot] = seq_len
        return slot

    def free_slot(self, slot: int) -> None:
        """The request in ``slot`` finished (``free_batch_idx``); without deferred reclamation its pages
        are unmapped now, with it they stay mapped for the slot's next request."""
        self._check_slot("slot", slot)
        self.seq_lens[slot] = 0
        if not self.deferred_reclaim:
            self._unmap(slot, 0)

    def step(self, seq_lens: Sequence[int]) -> StepStats:
        """One iteration: ``seq_lens[r]`` tokens in slot ``r`` (0 = idle). Maps what every live slot needs
        now (sync), reclaiming on demand, then ``eager_steps`` ahead from free pages (async).

        Raises:
          ValueError: ``seq_lens`` has the wrong length or a length outside ``[0, max_len]``.
          RuntimeError: the pool cannot hold this step's pages even after reclaiming.
        """
        seq_lens = list(seq_lens) if not isinstance(seq_lens, (list, tuple)) else seq_lens
        if len(seq_lens) != self.max_batch:
            raise ValueError(f"seq_lens must have max_batch={self.max_batch} entries, got {len(seq_lens)}")
        for r, n in enumerate(seq_lens):
            self._check_len(f"seq_lens[{r}]", n)
        for r, n in enumerate(seq_lens):
            if self.seq_lens[r] and not n:
                self.free_slot(r)
            elif n and not self.seq_lens[r]:       # a request placed without alloc_slot: count its reuse
                self.reused_pages += self.tensors * min(self.mapped[r], self.pages_for(int(n)))
            self.seq_lens[r] = int(n)
        for r in range(self.max_batch):
            need = self.pages_for(self.seq_lens[r]) - self.mapped[r]
            if self.seq_lens[r] and need > 0:
                self._ensure_free(need)
                self._map(r, need, sync=True)
        for r in range(self.max_batch):
            if self.seq_lens[r] and self.eager_steps:
                want = self.pages_for(min(self.seq_lens[r] + self.eager_steps, self.max_len)) - self.mapped[r]
                free = self.free_pages
                if free is not None:
                    want = min(want, free // self.tensors)
                if want > 0:
                    self._map(r, want, sync=False)
        stats = self.stats()
        self._step_map = self._step_sync = self._step_unmap = 0
        return stats

    # internals ------------------------------------------------------------------------------------------
    def _map(self, slot: int, pages: int, *, sync: bool):
        calls = self.tensors * pages
        self.mapped[slot] += pages
        self._step_map += calls
        self.total_map_calls += calls
        if sync:
            self._step_sync += calls

    def _unmap(self, slot: int, keep: int):
        drop = max(self.mapped[slot] - keep, 0)
        self.mapped[slot] -= drop
        self._step_unmap += self.tensors * drop
        self.total_unmap_calls += self.tensors * drop

    def _ensure_free(self, pages: int):
        """``pages`` per tensor must be free: unmap idle and over-mapped pages, highest slot first."""
        if self.pool_pages is None:
            return
        for r in reversed(range(self.max_batch)):
            if self.free_pages >= self.tensors * pages:
                return
            self._unmap(r, self.pages_for(self.seq_lens[r]) if self.seq_lens[r] else 0)
        if self.free_pages < self.tensors * pages:
            raise RuntimeError(f"out of physical pages: need {self.tensors * pages}, {self.free_pages} free of "
                               f"pool_pages={self.pool_pages} after reclaiming")

    def _check_slot(self, name: str, slot):
        _check_nonneg_int(name, slot)
        if slot >= self.max_batch:
            raise ValueError(f"{name} must lie in [0, max_batch={self.max_batch}), got {slot}")

    def _check_len(self, name: str, n):
        _check_nonneg_int(name, n)
        if n > self.max_len:
            raise ValueError(f"{name} must lie in [0, max_len={self.max_len}], got {n}")


class PagedBlockAllocator:
    """The PagedAttention baseline's accounting (vLLM): each live request holds ``ceil(len / block_tokens)``
    blocks of ``block_tokens`` tokens in every (layer, K/V); a finished request's blocks return at once.
    ``block_allocs`` counts block-table entries written (the analogue of page-map calls)."""

    def __init__(self, block_tokens: int = 16, *, num_layers: int, kv_heads: int, head_dim: int,
                 bytes_per_elem: int = 2, max_batch: int):
        self.block_tokens = checks.check_int("block_tokens", block_tokens)
        self.num_layers = checks.check_int("num_layers", num_layers)
        self.bytes_per_token_layer = (checks.check_int("kv_heads", kv_heads) * checks.check_int("head_dim", head_dim)
                                      * checks.check_int("bytes_per_elem", bytes_per_elem))
        self.max_batch = checks.check_int("max_batch", max_batch)
        self.blocks = [0] * self.max_batch
        self.seq_lens = [0] * self.max_batch
        self.block_allocs = 0

    def step(self, seq_lens: Sequence[int]) -> StepStats:
        if len(seq_lens) != self.max_batch:
            raise ValueError(f"seq_lens must have max_batch={self.max_batch} entries, got {len(seq_lens)}")
        before = self.block_allocs
        for r, n in enumerate(seq_lens):
            _check_nonneg_int(f"seq_lens[{r}]", n)
            need = _ceil_div(int(n), self.block_tokens)
            if need > self.blocks[r]:
                self.block_allocs += need - self.blocks[r]
            self.blocks[r], self.seq_lens[r] = need, int(n)
        T = 2 * self.num_layers
        mapped = T * self.block_tokens * self.bytes_per_token_layer * sum(self.blocks)
        used = T * self.bytes_per_token_layer * sum(self.seq_lens)
        return StepStats(mapped_bytes=mapped, used_bytes=used, slack_bytes=mapped - used, overcommit_bytes=0,
                         idle_bytes=0,
                         map_calls=self.block_allocs - before, sync_map_calls=self.block_allocs - before,
                         unmap_calls=0, active=sum(1 for n in self.seq_lens if n))


def static_reservation_bytes(*, num_layers: int, kv_heads: int, head_dim: int, bytes_per_elem: int = 2,
                             max_batch: int, max_len: int) -> int:
    """Bytes of a static cache that backs every slot to ``L_max`` (no demand paging)."""
    return 2 * num_layers * max_batch * max_len * kv_heads * head_dim * bytes_per_elem


# ----------------------------------------------------------------------------------------------------------
# Attention entry points (thin: the one decode op does the work)
# ----------------------------------------------------------------------------------------------------------

def _check_layout(layout):
    checks.check_choice("layout", layout, LAYOUTS)


def _check_seq_lens(name: str, lengths, B: int):
    if not hasattr(lengths, "dtype") or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array [B], got {checks.describe(lengths)}")
    if tuple(lengths.shape) != (B,):
        raise ValueError(f"{name} must have shape [B] = ({B},), got {checks.describe(lengths)}")


def _head_major(name: str, cache, layout: str):
    checks.check_float_array(name, cache, 4)
    return jnp.swapaxes(cache, 1, 2) if layout == "bshd" else cache


def contiguous_decode_attention(q: Float[Array, "B *Tq H D"], k_cache: Float[Array, "B S Hkv D"],
                                v_cache: Float[Array, "B S Hkv Dv"], seq_lens: Int[Array, "B"], *,
                                layout: str = "bshd", **kwargs):
    """vAttention's decode: new tokens against a contiguous per-slot cache and its lengths.

    Args:
      q: ``[B, H, d]`` (one new token per sequence) or ``[B, Tq, H, d]``.
      k_cache: ``[B, L_max, Hkv, d]`` (``layout="bshd"``) or ``[B, Hkv, L_max, d]`` (``"bhsd"``).
      v_cache: like ``k_cache``, value dim ``Dv``.
      seq_lens: ``[B]`` int valid tokens per slot, the new ones included (vAttention's ``cache_seqlens``
        after the append).
      layout: see the module docstring.
      **kwargs: passed to ``jattn.decode_attention`` (``impl``, ``window``, ``sinks``, ``softcap``, ``scale``,
        ``return_lse``, ``page_size``, ``num_splits``, ``interpret``).
    """
    _check_layout(layout)
    k, v = _head_major("k_cache", k_cache, layout), _head_major("v_cache", v_cache, layout)
    checks.check_float_array("q", q)
    _check_seq_lens("seq_lens", seq_lens, q.shape[0])
    return decode_attention(q, k, v, seq_lens, **kwargs)


def contiguous_prefill_attention(q: Float[Array, "B T H D"], k_cache: Float[Array, "B S Hkv D"],
                                 v_cache: Float[Array, "B S Hkv Dv"], cache_offsets: Int[Array, "B"], *,
                                 layout: str = "bshd", **kwargs):
    """Chunked prefill on a contiguous cache: ``q``'s ``T`` tokens were written at
    ``cache_offsets[b] .. cache_offsets[b] + T - 1`` and attend causally to everything before them.
    Equals ``contiguous_decode_attention`` with ``seq_lens = cache_offsets + T``."""
    checks.check_float_array("q", q, 4)
    _check_seq_lens("cache_offsets", cache_offsets, q.shape[0])
    if not checks.is_traced(cache_offsets) and np.asarray(cache_offsets).min(initial=0) < 0:
        raise ValueError(f"cache_offsets must be >= 0, got {np.asarray(cache_offsets).tolist()}")
    lengths = cache_offsets.astype(jnp.int32) + q.shape[1]
    return contiguous_decode_attention(q, k_cache, v_cache, lengths, layout=layout, **kwargs)


def paged_decode_attention(q: Float[Array, "B *Tq H D"], k_pages: Float[Array, "..."],
                           v_pages: Float[Array, "..."], block_table: Int[Array, "B W"],
                           seq_lens: Int[Array, "B"], *, layout: str = "bshd", **kwargs):
    """The PagedAttention baseline: new tokens against a page pool through a block table.

    Args:
      q: ``[B, H, d]`` or ``[B, Tq, H, d]``.
      k_pages: ``[num_pages, page_size, Hkv, d]`` (``layout="bshd"``, vLLM/FlashAttention) or
        ``[Hkv, num_pages, page_size, d]`` (``"bhsd"``, ``jattn.cache.PagedKVCache``'s pool).
      v_pages: like ``k_pages``, value dim ``Dv``.
      block_table: ``[B, max_pages]`` int: the pool page holding logical page ``i`` of sequence ``b``.
      seq_lens: ``[B]`` int valid tokens, the new ones included.
      **kwargs: passed to ``jattn.decode_attention``.
    """
    _check_layout(layout)
    for name, pool in (("k_pages", k_pages), ("v_pages", v_pages)):
        checks.check_float_array(name, pool, 4)
    if layout == "bshd":
        k_pages, v_pages = (jnp.transpose(p, (2, 0, 1, 3)) for p in (k_pages, v_pages))
    checks.check_float_array("q", q)
    _check_seq_lens("seq_lens", seq_lens, q.shape[0])
    if not hasattr(block_table, "dtype") or not jnp.issubdtype(block_table.dtype, jnp.integer):
        raise TypeError(f"block_table must be an integer array [B, max_pages], got {checks.describe(block_table)}")
    return decode_attention(q, k_pages, v_pages, seq_lens, page_table=block_table, **kwargs)
