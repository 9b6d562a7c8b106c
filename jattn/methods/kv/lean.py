"""P65 — Lean Attention: Hardware-Aware Scalable Attention Mechanism for the Decode-Phase of Transformers.

The stream-K schedule for decode attention (as in ONNX Runtime's ``lean_attention``: ``lean_api.cc``
scheduling, ``lean_fwd_kernel.h``). All work is flattened into one list of LeanTiles, ordered
``(b, kv head, tile)``; each of ``G`` workers gets one contiguous range of it, so loads differ by at most one
tile and ranges cross head and batch boundaries. ORT's formulas (``lean_schedule``):

* ``num_m = ceil(groups * Lq / block_m)`` (GQA folds a kv head's query heads into the query axis; block_m 64),
  ``num_n = ceil(Lk / block_n)`` (block_n 256 if d <= 64, 128 if d <= 128, else 64),
  ``total = num_m * num_n * B * Hkv``;
* ``G = min(floor((total + 1) / 2), ceil(32 * total / num_n))`` if ``total <= 4 * SMs`` else
  ``min(2 * SMs, 32 * Hkv * B * num_m)``, clamped to ``[1, total]``;
* ``max_t = ceil(total / G)``, ``high = total - (max_t - 1) * G``; worker ``c < high`` covers
  ``[c * max_t, (c + 1) * max_t)``, the others ``[high * max_t + (c - high)(max_t - 1), ... + max_t - 1)``;
* ORT's scratch count ``num_splits = 1 + (num_n + max_t - 2) // max_t`` if ``total % G == 0`` else
  ``1 + (num_n + max_t - 3) // (max_t - 1)``.

``ragged_schedule`` is the same split over the tiles each (b, kv head) actually *needs* (``ceil(length /
page)``, fewer with a window), so ragged batches stay balanced; ``lean_decode_attention`` computes that
schedule in XLA from (possibly traced) lengths with static shapes.

How it runs here (deliberate deviations):

* Phase 1 (``pallas_kernels/lean_decode.py``): a 1-D grid of ``G`` workers (GPU; on TPU ``(G, max_steps)``
  with the per-step pages scalar-prefetched, the step axis sequential); worker ``c`` walks its range as
  at most ``K`` segments (one contiguous run of one output ``(b, kv head)``), keeps ``(m, l, acc)`` per
  segment in float32 (natural-log domain, not ORT's exp2: the same numbers) and writes every segment's
  ``(out, lse)`` with its ``(b, kv head)`` id.
* Phase 2 (XLA, ``merge_segments``): a segment-wise log-sum-exp merge per ``(b, kv head)``. ORT's host CTA
  spin-waits on flags of the CTAs sharing its output tile; Pallas has no inter-program synchronisation, so
  every segment (the host's included) goes through the merge. The schedule and the balance are what is
  reproduced.
* Bound on segments per worker (static shapes): a segment holds at least one tile and a worker at most
  ``max_t`` tiles, so it touches at most ``max_t`` non-empty outputs (heads with no needed tile are skipped:
  they get no segment and merge to ``out = 0, lse = -inf``), and never more than ``B * Hkv``. With traced
  lengths ``max_t <= ceil(B * Hkv * W / G)`` (``W`` tiles per sequence), so
  ``K = min(B * Hkv, ceil(B * Hkv * W / G))`` (``max_segments``). (Counting ORT-style, a uniform range of
  ``max_t`` tiles over heads of ``T`` tiles touches ``ceil((max_t - 1) / T) + 1 <= max_t`` heads.)
* Tile = page (the contiguous cache cut into pages of ``page_size``), not ORT's block_n; one tile covers
  all packed rows (``G * Tq <= R``), so ``num_m = 1``.
* No gradient: ``lean_decode_attention`` is forward only (``jattn.decode_attention`` has the backward).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core import checks
from jattn.core.softmax import merge_sinks
from jattn.ops import decode as decode_op
from pallas_kernels.lean_decode import lean_decode_partials

BLOCK_M = 64
DEFAULT_SMS = 132          # an H200's SMs: the ORT grid formula's default machine


# ------------------------------------------------------------------------------------- the schedule

def block_n_for(head_dim: int) -> int:
    """ORT's key block: 256 if d <= 64, 128 if d <= 128, else 64."""
    return 256 if head_dim <= 64 else 128 if head_dim <= 128 else 64


def ort_grid(total: int, num_n: int, batch: int, kv_heads: int, num_m: int = 1, num_sms: int = DEFAULT_SMS) -> int:
    """ORT's number of workers (CTAs) for ``total`` LeanTiles."""
    if total <= 0:
        return 1
    if total <= 4 * num_sms:
        grid = min((total + 1) // 2, -(-32 * total // num_n))
    else:
        grid = min(2 * num_sms, 32 * kv_heads * batch * num_m)
    return max(1, min(grid, total))


def worker_ranges(total: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)`` int64 ``[workers]``: ORT's contiguous ranges (the first ``high`` get ``max_t``)."""
    checks.check_int("workers", workers)
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    max_t = -(-total // workers)
    high = total - (max_t - 1) * workers
    c = np.arange(workers)
    starts = np.where(c < high, c * max_t, high * max_t + (c - high) * (max_t - 1))
    ends = starts + np.where(c < high, max_t, max_t - 1)
    return starts.astype(np.int64), ends.astype(np.int64)


class LeanSchedule(NamedTuple):
    total: int          # LeanTiles: num_m * num_n * B * Hkv
    tiles_per_head: int
    num_m: int
    num_n: int
    block_n: int
    grid: int           # G workers
    max_t: int
    high: int           # workers [0, high) get max_t tiles, the rest max_t - 1
    num_splits: int     # ORT's scratch sizing
    starts: np.ndarray  # [G] first global tile of each worker
    ends: np.ndarray    # [G] one past its last


def lean_schedule(batch: int, kv_heads: int, groups: int, seq_k: int, *, block_n: int | None = None,
                  head_dim: int = 128, n_workers: int | None = None, num_sms: int = DEFAULT_SMS,
                  seq_q: int = 1, block_m: int = BLOCK_M) -> LeanSchedule:
    """ORT's decode schedule (pure Python/NumPy).

    Args:
      batch, kv_heads: B and Hkv.
      groups: query heads per kv head (folded into the query axis: ``num_m = ceil(groups * seq_q / block_m)``).
      seq_k: keys Lk.
      block_n: keys per LeanTile (default ORT's, from ``head_dim``).
      head_dim: d (only picks the default block_n).
      n_workers: G (default ORT's grid formula with ``num_sms``).
      num_sms: streaming multiprocessors of the machine the default G is for.
      seq_q, block_m: new tokens per sequence and the query block (decode: 1 and 64).

    Returns:
      ``LeanSchedule`` with ``starts/ends`` over the flattened ``(b, kv head, m block, n tile)`` list.
    """
    for name, value in (("batch", batch), ("kv_heads", kv_heads), ("groups", groups), ("seq_k", seq_k),
                        ("head_dim", head_dim), ("num_sms", num_sms), ("seq_q", seq_q), ("block_m", block_m)):
        checks.check_int(name, value)
    block_n = block_n_for(head_dim) if block_n is None else checks.check_int("block_n", block_n)
    num_m = -(-groups * seq_q // block_m)
    num_n = -(-seq_k // block_n)
    tiles_per_head = num_m * num_n
    total = tiles_per_head * batch * kv_heads
    if n_workers is None:
        grid = ort_grid(total, num_n, batch, kv_heads, num_m, num_sms)
    else:
        grid = max(1, min(checks.check_int("n_workers", n_workers), total))
    max_t = -(-total // grid)
    high = total - (max_t - 1) * grid
    if total % grid == 0:
        num_splits = 1 + (num_n + max_t - 2) // max_t
    else:
        num_splits = 1 + (num_n + max_t - 3) // (max_t - 1)
    starts, ends = worker_ranges(total, grid)
    return LeanSchedule(total, tiles_per_head, num_m, num_n, block_n, grid, max_t, high, num_splits, starts, ends)


def ragged_schedule(tile_counts, n_workers: int):
    """The stream-K split over the tiles each head needs (concrete counts, pure NumPy).

    Args:
      tile_counts: ``[Bh]`` needed tiles of each flattened ``(b, kv head)`` (``ceil(length / page)``).
      n_workers: G.

    Returns:
      ``(starts [G], ends [G], segments)``: ``segments[c]`` lists worker ``c``'s ``(head, lo, hi)`` runs,
      ``lo, hi`` local tile indices of that head (heads with no tile never appear).
    """
    counts = np.asarray(tile_counts, np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError(f"tile_counts must be a 1-D array of counts >= 0, got {counts.tolist()}")
    cum = np.cumsum(counts)
    head_start = cum - counts
    starts, ends = worker_ranges(int(cum[-1]) if counts.size else 0, n_workers)
    segments = []
    for s, e in zip(starts, ends):
        runs = []
        for h in np.nonzero(counts)[0]:
            lo, hi = max(s, head_start[h]), min(e, cum[h])
            if hi > lo:
                runs.append((int(h), int(lo - head_start[h]), int(hi - head_start[h])))
        segments.append(runs)
    return starts, ends, segments


def max_segments(heads: int, tiles_per_head: int, workers: int) -> int:
    """Static bound ``K`` on one worker's segments: ``min(Bh, ceil(Bh * W / G))`` (see the module docstring)."""
    return max(1, min(heads, -(-heads * tiles_per_head // workers)))


def schedule_segments(counts, firsts, workers: int, slots: int):
    """The ragged schedule in XLA (traced counts, static shapes).

    Args:
      counts: ``[Bh]`` int32 needed tiles per flattened head; ``firsts``: ``[Bh]`` its first needed tile.
      workers: G; slots: K (``max_segments``).

    Returns:
      ``(head [G, K], lo [G, K], hi [G, K], starts [G], ends [G])`` int32: slot ``k`` of worker ``c`` runs
      over logical tiles ``[lo, hi)`` of ``head`` (``lo == hi``: empty, ``head = Bh``, a dropped bucket).
    """
    counts = counts.astype(jnp.int32)
    Bh = counts.shape[0]
    total = jnp.sum(counts)
    max_t = (total + workers - 1) // workers
    high = total - (max_t - 1) * workers
    c = jnp.arange(workers, dtype=jnp.int32)
    starts = jnp.where(c < high, c * max_t, high * max_t + (c - high) * (max_t - 1))
    ends = starts + jnp.where(c < high, max_t, max_t - 1)
    # non-empty heads in order (zero-tile heads take no slot)
    ids = jnp.nonzero(counts > 0, size=Bh, fill_value=Bh)[0].astype(jnp.int32)
    counts_pad = jnp.concatenate([counts, jnp.zeros((1,), jnp.int32)])
    cum_all = jnp.cumsum(counts_pad)
    big = jnp.iinfo(jnp.int32).max
    head_end = jnp.where(ids < Bh, cum_all[ids], big)          # [Bh] compacted, increasing
    head_start = jnp.where(ids < Bh, head_end - counts_pad[ids], big)
    j = jnp.searchsorted(head_end, starts, side="right")[:, None] + jnp.arange(slots, dtype=jnp.int32)[None]
    in_list = j < Bh
    j = jnp.minimum(j, Bh - 1)
    lo_flat = jnp.maximum(starts[:, None], head_start[j])
    hi_flat = jnp.minimum(ends[:, None], head_end[j])
    live = in_list & (hi_flat > lo_flat) & (ids[j] < Bh)
    head = jnp.where(live, ids[j], Bh)
    firsts_pad = jnp.concatenate([firsts.astype(jnp.int32), jnp.zeros((1,), jnp.int32)])
    lo = jnp.where(live, firsts_pad[head] + lo_flat - head_start[j], 0)
    hi = jnp.where(live, firsts_pad[head] + hi_flat - head_start[j], 0)
    return head, lo, hi, starts, ends


# -------------------------------------------------------------------------------------- the merge

def lean_merge(a, b):
    """ORT's merge of two partial states ``(m, l, acc)`` (natural-log domain); identity ``(-inf, 0, 0)``.

    ``m = max(m_a, m_b)``, ``l = e^{m_a - m} l_a + e^{m_b - m} l_b``, ``acc = e^{m_a - m} acc_a + e^{m_b - m} acc_b``.
    """
    (m_a, l_a, acc_a), (m_b, l_b, acc_b) = a, b
    m = jnp.maximum(m_a, m_b)
    safe = jnp.where(jnp.isneginf(m), 0.0, m)
    w_a = jnp.where(jnp.isneginf(m_a), 0.0, jnp.exp(m_a - safe))
    w_b = jnp.where(jnp.isneginf(m_b), 0.0, jnp.exp(m_b - safe))
    return m, w_a * l_a + w_b * l_b, w_a[..., None] * acc_a + w_b[..., None] * acc_b


def merge_segments(out, lse, ids, num_segments: int):
    """Phase 2: exact log-sum-exp merge of partials ``(out [N, ..., E], lse [N, ...])`` by segment id.

    Ids ``>= num_segments`` are dropped; a segment with no partial gets ``out = 0, lse = -inf``.
    Returns ``(out [num_segments, ..., E], lse [num_segments, ...])`` float32.
    """
    n = num_segments + 1
    ids = jnp.minimum(ids, num_segments)
    lse = lse.astype(jnp.float32)
    m = jax.ops.segment_max(lse, ids, num_segments=n)
    safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(jnp.isneginf(lse), 0.0, jnp.exp(lse - safe[ids]))
    l = jax.ops.segment_sum(w, ids, num_segments=n)
    acc = jax.ops.segment_sum(w[..., None] * out.astype(jnp.float32), ids, num_segments=n)
    empty = l == 0
    merged = jnp.where(empty[..., None], 0.0, acc / jnp.where(empty, 1.0, l)[..., None])
    merged_lse = jnp.where(empty, -jnp.inf, safe + jnp.log(jnp.where(empty, 1.0, l)))
    return merged[:num_segments], merged_lse[:num_segments]


# ----------------------------------------------------------------------------------------- the op

def lean_decode_attention(q, k_cache, v_cache, lengths, *, page_table=None, num_workers: int | None = None,
                          window=None, sinks=None, softcap: float | None = None, scale: float | None = None,
                          return_lse: bool = False, page_size: int | None = None, num_sms: int = DEFAULT_SMS,
                          interpret=None, poison_outputs: bool = False):
    """``jattn.decode_attention``'s contract, run with the stream-K (Lean Attention) schedule. Forward only.

    Args:
      q, k_cache, v_cache, lengths, page_table, window, sinks, softcap, scale, return_lse, page_size: as
        ``jattn.decode_attention`` (the same checks).
      num_workers: G, the 1-D grid (default: ORT's grid formula for the static bound of
        ``B * Hkv * W`` tiles on ``num_sms`` SMs).
      num_sms: the machine the default G is sized for.
      interpret: None (decided at lowering), True/"triton" or "mosaic" (forced, interpreted).
      poison_outputs: NaN-fill the kernel's partial buffers first (tests).

    Returns:
      ``out`` (q's shape with Dv, q's dtype), and with ``return_lse`` the float32 ``lse``.
    """
    checks.check_static("lean_decode_attention", window=window, softcap=softcap, scale=scale,
                        return_lse=return_lse, page_size=page_size, num_workers=num_workers, num_sms=num_sms)
    B, Tq, H, D, Hkv, Dv, capacity, pool_page = decode_op._check_caches(q, k_cache, v_cache, page_table)
    decode_op._check_lengths(lengths, B, capacity)
    num_pages = k_cache.shape[1] if page_table is not None else B * capacity
    decode_op._check_page_table(page_table, lengths, num_pages, pool_page or 1)
    window = checks.check_window(window)
    window_left = None if window is None else window[0]
    checks.check_sinks(sinks, H)
    softcap = checks.check_positive_float("softcap", softcap)
    scale = D ** -0.5 if scale is None else checks.check_positive_float("scale", scale, allow_none=False)
    page_size = checks.check_block_size("page_size", page_size, minimum=decode_op.MIN_PAGE)
    if num_workers is not None:
        num_workers = checks.check_int("num_workers", num_workers)
    num_sms = checks.check_int("num_sms", num_sms)
    tile = pool_page or decode_op._contiguous_page(capacity, page_size, "pallas")
    problem = decode_op._kernel_problem(D, Dv, tile)
    if problem is not None:
        raise ValueError(problem)

    q4 = q[:, None] if q.ndim == 3 else q
    safe_lengths = jnp.clip(lengths, 0, capacity).astype(jnp.int32)
    safe_table = None if page_table is None else jnp.clip(page_table, 0, num_pages - 1).astype(jnp.int32)
    plan = dict(tile=tile, num_splits=1, interpret=interpret, poison_outputs=bool(poison_outputs),
                scale=scale, softcap=softcap, window_left=window_left)
    k_pages, v_pages, table, kwargs = decode_op._layout(plan, q4, k_cache, v_cache, safe_table)
    W = capacity // tile
    Bh = B * Hkv
    workers = num_workers or ort_grid(Bh * W, W, B, Hkv, 1, num_sms)
    slots = max_segments(Bh, W, workers)

    # needed tiles per (b, kv head): [first, end) as the split-K kernel's _needed_tiles
    end = (safe_lengths + tile - 1) // tile
    first = jnp.zeros_like(end) if window_left is None else jnp.minimum(
        jnp.maximum(safe_lengths - Tq - window_left, 0) // tile, end)
    counts = jnp.repeat(end - first, Hkv)
    firsts = jnp.repeat(first, Hkv)
    head, lo, hi, _, _ = schedule_segments(counts, firsts, workers, slots)
    seg_b = jnp.where(head < Bh, head // Hkv, 0)
    seg_g = jnp.where(head < Bh, head % Hkv, 0)
    segments = (seg_b, seg_g, safe_lengths[seg_b], lo, hi)
    out, lse = lean_decode_partials(decode_op._pack_rows(q4, Hkv), k_pages, v_pages, table, segments,
                                    new_tokens=Tq, group=H // Hkv, scale=scale, softcap=softcap,
                                    max_steps=max(1, -(-Bh * W // workers)),
                                    window=window_left, interpret=interpret, poison_outputs=poison_outputs)
    R = out.shape[2]
    out, lse = merge_segments(out.reshape(workers * slots, R, Dv), lse.reshape(workers * slots, R),
                              head.reshape(-1), Bh)
    out = decode_op._unpack_rows(out.reshape(B, Hkv, R, Dv), Tq, H)
    lse = decode_op._unpack_rows(lse.reshape(B, Hkv, R), Tq, H)
    if sinks is not None:
        out, lse = merge_sinks(out, lse, sinks)
    bad = decode_op._invalid_rows(lengths, page_table, capacity, num_pages, pool_page or 1)
    out = jnp.where(bad[:, None, None, None], jnp.nan, out).astype(q.dtype)
    lse = jnp.where(bad[:, None, None], jnp.nan, lse)
    if q.ndim == 3:
        out, lse = out[:, 0], lse[:, 0]
    return (out, lse) if return_lse else out


__all__ = ["lean_schedule", "ragged_schedule", "worker_ranges", "ort_grid", "max_segments", "schedule_segments",
           "lean_merge", "merge_segments", "lean_decode_attention", "LeanSchedule", "block_n_for"]
