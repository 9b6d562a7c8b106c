"""Split-K decode attention in Pallas: a few new query tokens against a (paged) KV cache.

Kernels only, no policy: ``jattn.ops.decode`` validates user input, lays a contiguous cache out as pages,
merges the per-split partials (``merge_partials``) and the sinks; this module runs the tiles.

Layout: head-major caches. The kernel sees the cache as ``[Bc, Hkv, pages, page_size, D]``: a contiguous
``[B, Hkv, S, D]`` cache is that (a free reshape, ``Bc = B``) with ``page_table[b, t] = t``; a page pool
``[Hkv, num_pages, page_size, D]`` is that with ``Bc = 1`` and ``page_table[b, t]`` the pool page holding
logical tile ``t`` of sequence ``b``. So one kernel, whose K/V index map reads the page table, serves both;
one tile is one page. Every block's last two dims are ``(page_size, D)``: legal on TPU for every D.

Queries are GQA-packed (P22 Duplex): ``q [B, Hkv, R, D]`` holds, for kv head ``g``, the rows
``(member, t)`` of its ``G = H / Hkv`` query heads and ``Tq`` new tokens (``R = G * Tq``, padded), so
each K/V tile is loaded once for the whole group. Row ``r`` is token ``t = r % Tq`` at position
``length - Tq + t``; it sees keys ``length - Tq + t - window <= kv <= length - Tq + t`` (causal within the
new tokens). Padding rows see nothing.

Split-K (P65 Lean Attention's stream-K decomposition): the tiles a sequence needs are cut into
``num_splits`` contiguous ranges on the grid; each program returns a partial ``(out, lse)`` over its range
(``lse = -inf`` when it saw nothing), and the caller merges them exactly.

Two structures over the same tile math (``dispatch`` picks one when the program is lowered):

* ``"triton"`` (GPU, and the CPU interpreter): grid ``(B, Hkv, splits)``; a program reads its length and
  page-table row (kernel inputs: Triton has no scalar prefetch) and loops over its needed tiles with
  ``lax.fori_loop``, loading each page by index from the pool.
* ``"mosaic"`` (TPU): grid ``(B, Hkv, splits, tiles per split)``; the lengths and the page table are
  scalar-prefetched into SMEM and drive the K/V ``index_map``, so each step DMAs one page; steps outside
  the needed range repeat the nearest needed page (no new DMA) and skip compute. The online-softmax state
  lives in VMEM scratch. Mosaic's lane rule needs ``D % 128 == 0`` unless ``Hkv == 1``.

Backward (``decode_partials_grad``), the same two structures over the same trace and the same visibility rule
(``_visibility``, one function for both directions): from the merged forward's per-row ``lse`` and
``delta = rowsum(dout * out) - dlse`` (XLA), each program recomputes ``p = exp(s - lse)`` on its split's
tiles, with K and V rows past the length zeroed, and writes ``dk, dv`` per logical tile
(``[B, Hkv, splits * tiles_per_split, page, D]``, zeros on tiles the split does not need) and a dq partial
per split (``[B, Hkv, splits, R, D]``). "triton" loops over its split's tiles and stores each tile's dk/dv
by index into its ``(tiles_per_split, page, D)`` block; "mosaic" puts the tile on the grid (one dk/dv block
per step, the K/V pages DMA'd through the same scalar-prefetched index map) and accumulates dq in VMEM
scratch. The caller sums dq over the splits and reshapes dk/dv into a contiguous cache or scatter-adds them
into a pool through the page table (a page shared by two sequences gets both contributions). Writing dk/dv
per logical tile rather than per pool page keeps every program's writes disjoint (no atomics, no
ordering between sequences that share a page); the price is one float32 cache-sized buffer per operand.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.common import MASK_VALUE


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    new_tokens: int          # Tq
    group: int               # G = H / Hkv
    rows: int                # R: G * Tq padded to a hardware-legal size
    page_size: int           # tile = page
    num_splits: int
    tiles_per_split: int
    scale: float
    softcap: Optional[float]
    window: Optional[int]    # keys back from each query's position; None: all
    per_sequence: bool       # the cache's leading axis is the batch (contiguous) rather than one shared pool
    target: str
    interpret: bool
    poison_outputs: bool


def _needed_tiles(cfg: DecodeConfig, length):
    """``[first, end)`` of the tiles any row of a sequence of ``length`` keys can see."""
    end = lax.div(length + cfg.page_size - 1, cfg.page_size)
    if cfg.window is None:
        return jnp.zeros_like(end), end
    first_position = jnp.maximum(length - cfg.new_tokens - cfg.window, 0)
    return jnp.minimum(lax.div(first_position, cfg.page_size), end), end


def _split_range(cfg: DecodeConfig, split, length, end=None):
    """The needed tiles of split ``split``: ``[lo, hi)``, empty when the split has none.

    ``end`` (traced) overrides the sequence's last needed tile + 1: the quantised kernel stops at its last
    complete key group."""
    first, needed_end = _needed_tiles(cfg, length)
    end = needed_end if end is None else end
    lo = jnp.maximum(split * cfg.tiles_per_split, first)
    hi = jnp.minimum((split + 1) * cfg.tiles_per_split, end)
    return lo, jnp.maximum(hi, lo)


def _visibility(cfg: DecodeConfig, length, kv_start):
    """Which (packed row, key) pairs of the page at ``kv_start`` are visible, and which keys are in the sequence.

    The one home of the decode rule, for the forward and the backward: row ``r`` is token ``r % Tq`` at
    position ``q_pos = length - Tq + r % Tq``; it sees ``kv <= q_pos``, ``kv < length`` and, with a window,
    ``kv >= q_pos - window``; padding rows (``r >= G * Tq``) see nothing. Returns ``(visible [rows, page],
    in_sequence [page, 1])``: cache rows past the length are stale (a recycled page may hold NaN), and a
    probability of 0 does not hide them (0 * NaN is NaN), so tiles are zeroed there with ``in_sequence``.
    """
    rows, page = cfg.rows, cfg.page_size
    row = lax.broadcasted_iota(jnp.int32, (rows, page), 0)
    kv_pos = kv_start + lax.broadcasted_iota(jnp.int32, (rows, page), 1)
    q_pos = length - cfg.new_tokens + lax.rem(row, cfg.new_tokens)
    visible = (kv_pos <= q_pos) & (kv_pos < length) & (row < cfg.group * cfg.new_tokens)
    if cfg.window is not None:
        visible = visible & (kv_pos >= q_pos - cfg.window)
    in_sequence = kv_start + lax.broadcasted_iota(jnp.int32, (page, 1), 0) < length
    return visible, in_sequence


def _attend_tile(cfg: DecodeConfig, state, q, k_tile, v_tile, length, kv_start):
    """One online-softmax update of the packed rows' ``(m, l, acc)`` with one page of keys."""
    visible, in_sequence = _visibility(cfg, length, kv_start)
    s, _ = common.scaled_logits(q, k_tile, cfg.scale, cfg.softcap)
    v_tile = jnp.where(in_sequence, v_tile, jnp.zeros_like(v_tile))
    return common.online_softmax_step(*state, jnp.where(visible, s, MASK_VALUE), v_tile)


def _tile_grads(cfg: DecodeConfig, q, do, lse, delta, k_tile, v_tile, length, kv_start):
    """One page's share of the backward: ``(dq [rows, D] unscaled, dk [page, D], dv [page, Dv])`` float32.

    ``p = exp(s - lse)`` with the merged forward's ``lse`` (``+inf`` on rows that saw nothing, so p = 0),
    ``ds = p * (dp - delta)`` with ``delta = rowsum(dout * out) - dlse`` (an lse cotangent shifts delta),
    chained through the softcap's tanh; ``dk = scale * ds^T q`` here, ``dq = scale * sum ds K`` by the caller.
    K and V rows past the length are zeroed first, so stale NaN never reaches dq and dk/dv there are 0.
    """
    visible, in_sequence = _visibility(cfg, length, kv_start)
    k_tile = jnp.where(in_sequence, k_tile, jnp.zeros_like(k_tile))
    v_tile = jnp.where(in_sequence, v_tile, jnp.zeros_like(v_tile))
    s, tanh = common.scaled_logits(q, k_tile, cfg.scale, cfg.softcap)
    p = jnp.where(visible, jnp.exp(s - lse), 0.0)
    dv = common.dot_tn(p.astype(do.dtype), do)
    ds = p * (common.dot_nt(do, v_tile) - delta)
    if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
    dk = common.dot_tn(ds.astype(q.dtype), q) * cfg.scale
    dq = common.dot_nn(ds.astype(k_tile.dtype), k_tile)
    return dq, dk, dv


def _initial_state(rows: int, dv: int):
    return (jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, dv), jnp.float32))


def attend_split(cfg: DecodeConfig, q, lo, hi, length, load_tile, dv: int):
    """The triton structure's program: the online softmax over tiles ``[lo, hi)``, finalised to ``(out, lse)``.

    ``load_tile(t) -> (k_tile, v_tile)`` reads logical tile ``t`` in q's dtype (a page by index, or a
    quantised group dequantised); everything after the load is shared by the float and quantised kernels."""
    def visit(t, state):
        k_tile, v_tile = load_tile(t)
        return _attend_tile(cfg, state, q, k_tile, v_tile, length, t * cfg.page_size)

    return common.finalize_rows(*lax.fori_loop(lo, hi, visit, _initial_state(cfg.rows, dv)))


def attend_grid_step(cfg: DecodeConfig, lo, hi, length, q_ref, load_tile, out_ref, lse_ref, m_scratch, l_scratch,
                     acc_scratch):
    """The mosaic structure's step ``(split, t)``: reset the VMEM state at ``t == 0``, attend the step's tile
    (``load_tile() -> (k_tile, v_tile)``, the block the index map DMA'd) when it is in ``[lo, hi)``, write the
    finalised ``(out, lse)`` at the last step."""
    split, t = pl.program_id(2), pl.program_id(3)
    tile = split * cfg.tiles_per_split + t

    @pl.when(t == 0)
    def _init():
        m_scratch[...], l_scratch[...], acc_scratch[...] = _initial_state(cfg.rows, acc_scratch.shape[-1])

    @pl.when((tile >= lo) & (tile < hi))
    def _visit():
        k_tile, v_tile = load_tile()
        state = (m_scratch[...], l_scratch[...], acc_scratch[...])
        m, l, acc = _attend_tile(cfg, state, q_ref[...], k_tile, v_tile, length, tile * cfg.page_size)
        m_scratch[...], l_scratch[...], acc_scratch[...] = m, l, acc

    @pl.when(t == pl.num_programs(3) - 1)
    def _write():
        out_ref[...], lse_ref[...] = common.finalize_rows(m_scratch[...], l_scratch[...], acc_scratch[...])


# ------------------------------------------------------------------- GPU structure: loop inside a program

def _gpu_kernel(length_ref, table_ref, q_ref, k_ref, v_ref, *rest, cfg: DecodeConfig):
    out_ref, lse_ref = rest[-2:]  # leading entries are the (unread) NaN buffers aliased to the outputs
    length = length_ref[0]
    lo, hi = _split_range(cfg, pl.program_id(2), length)

    def load_tile(t):
        page = table_ref[t]
        return k_ref[page], v_ref[page]

    out_ref[...], lse_ref[...] = attend_split(cfg, q_ref[...], lo, hi, length, load_tile, out_ref.shape[-1])


def _cache_batch(cfg: DecodeConfig, b):
    return b if cfg.per_sequence else 0


def _gpu_call(cfg: DecodeConfig, lengths, table, q, k_pages, v_pages):
    B, Hkv, R, D = q.shape
    num_pages, P = k_pages.shape[2:4]
    Dv = v_pages.shape[-1]
    W = table.shape[1]
    row_block = pl.BlockSpec((None, None, None, R, Dv), lambda b, g, s: (b, g, s, 0, 0))
    return common.pallas_call(
        functools.partial(_gpu_kernel, cfg=cfg), out_shape=_out_shapes(cfg, B, Hkv, R, Dv),
        target=cfg.target, interpret=cfg.interpret, name="jattn_decode", grid=(B, Hkv, cfg.num_splits),
        in_specs=[pl.BlockSpec((None, 1), lambda b, g, s: (b, 0)),
                  pl.BlockSpec((None, W), lambda b, g, s: (b, 0)),
                  pl.BlockSpec((None, None, R, D), lambda b, g, s: (b, g, 0, 0)),
                  pl.BlockSpec((None, None, num_pages, P, D), lambda b, g, s: (_cache_batch(cfg, b), g, 0, 0, 0)),
                  pl.BlockSpec((None, None, num_pages, P, Dv), lambda b, g, s: (_cache_batch(cfg, b), g, 0, 0, 0))],
        out_specs=[row_block, pl.BlockSpec((None, None, None, R, 1), lambda b, g, s: (b, g, s, 0, 0))],
        poison_outputs=cfg.poison_outputs)(lengths[:, None], table, q, k_pages, v_pages)


# ------------------------------------------------------------- TPU structure: needed pages on the grid

def _tpu_page(cfg: DecodeConfig, lengths_ref, table_ref, b, split, t):
    """Pool page of step ``t`` of a split, clamped into the needed range (no re-fetch outside it).

    A split that needs no tile points at the sequence's last needed tile: the page the split before it ended
    on, so the pipeline (which DMAs only when the block index changes) fetches nothing for it."""
    length = lengths_ref[b]
    lo, hi = _split_range(cfg, split, length)
    _, end = _needed_tiles(cfg, length)
    tile = jnp.where(hi > lo, jnp.clip(split * cfg.tiles_per_split + t, lo, hi - 1), jnp.maximum(end - 1, 0))
    return table_ref[b, jnp.minimum(tile, table_ref.shape[1] - 1)]


def _tpu_kernel(lengths_ref, table_ref, q_ref, k_ref, v_ref, *rest, cfg: DecodeConfig):
    length = lengths_ref[pl.program_id(0)]
    lo, hi = _split_range(cfg, pl.program_id(2), length)
    attend_grid_step(cfg, lo, hi, length, q_ref, lambda: (k_ref[...], v_ref[...]), *rest[-5:])


def _tpu_call(cfg: DecodeConfig, lengths, table, q, k_pages, v_pages):
    B, Hkv, R, D = q.shape
    P, Dv = k_pages.shape[3], v_pages.shape[-1]

    def page_spec(dim):
        return pl.BlockSpec((None, None, None, P, dim), lambda b, g, s, t, lens, tab: (
            _cache_batch(cfg, b), g, _tpu_page(cfg, lens, tab, b, s, t), 0, 0))

    def row_spec(dim):
        return pl.BlockSpec((None, None, None, R, dim), lambda b, g, s, t, lens, tab: (b, g, s, 0, 0))

    return common.pallas_call(
        functools.partial(_tpu_kernel, cfg=cfg), out_shape=_out_shapes(cfg, B, Hkv, R, Dv),
        target=cfg.target, interpret=cfg.interpret, name="jattn_decode",
        grid=(B, Hkv, cfg.num_splits, cfg.tiles_per_split),
        in_specs=[pl.BlockSpec((None, None, R, D), lambda b, g, s, t, lens, tab: (b, g, 0, 0)),
                  page_spec(D), page_spec(Dv)],
        out_specs=[row_spec(Dv), row_spec(1)], poison_outputs=cfg.poison_outputs, num_scalar_prefetch=2,
        scratch_shapes=[common.vmem_scratch((R, 1), jnp.float32), common.vmem_scratch((R, 1), jnp.float32),
                        common.vmem_scratch((R, Dv), jnp.float32)],
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))(lengths, table, q, k_pages, v_pages)


def _out_shapes(cfg: DecodeConfig, B: int, Hkv: int, R: int, Dv: int):
    return [jax.ShapeDtypeStruct((B, Hkv, cfg.num_splits, R, Dv), jnp.float32),
            jax.ShapeDtypeStruct((B, Hkv, cfg.num_splits, R, 1), jnp.float32)]


def _build(target: str, interpret: bool, *, cfg: DecodeConfig):
    cfg = dataclasses.replace(cfg, target=target, interpret=interpret)
    if target == "mosaic":
        return functools.partial(_tpu_call, cfg)
    return functools.partial(_gpu_call, cfg)


def _config(q, k_pages, *, new_tokens, group, num_splits, tiles_per_split, scale, softcap, window,
            poison_outputs) -> DecodeConfig:
    return DecodeConfig(new_tokens=int(new_tokens), group=int(group), rows=int(q.shape[2]),
                        page_size=int(k_pages.shape[3]), num_splits=int(num_splits),
                        tiles_per_split=int(tiles_per_split), scale=float(scale),
                        softcap=None if softcap is None else float(softcap),
                        window=None if window is None else int(window),
                        per_sequence=k_pages.shape[0] > 1, target="", interpret=False,
                        poison_outputs=bool(poison_outputs))


def decode_partials(q, k_pages, v_pages, lengths, page_table, *, new_tokens: int, group: int, num_splits: int,
                    tiles_per_split: int, scale: float, softcap: float | None = None, window: int | None = None,
                    interpret=None, poison_outputs: bool = False):
    """Per-split partial attention of packed decode rows over a paged KV pool.

    Args:
      q: ``[B, Hkv, R, D]`` packed query rows (``R >= group * new_tokens``, a power of two >= 16).
      k_pages: ``[Bc, Hkv, pages, page_size, D]`` key pages: ``Bc = B`` (a contiguous cache, one set of
        pages per sequence) or ``Bc = 1`` (one pool shared by every sequence).
      v_pages: ``[Bc, Hkv, pages, page_size, Dv]`` value pages.
      lengths: ``[B]`` int32 valid keys per sequence (the new tokens included).
      page_table: ``[B, W]`` int32 pool page of each logical tile (``W >= num_splits * tiles_per_split``).
      new_tokens: ``Tq``, the new tokens per sequence (the last ``Tq`` positions).
      group: query heads per kv head.
      num_splits: tile ranges per sequence on the grid (split-K).
      tiles_per_split: tiles in each range.
      scale: logit scale.
      softcap: ``softcap * tanh(s / softcap)`` on the logits, or None.
      window: keys back from each query's position that it sees (itself included counts 0), or None.
      interpret: None (decided at lowering), True/"triton" or "mosaic" (forced, interpreted).
      poison_outputs: NaN-fill every output buffer first (tests: unwritten tiles show).

    Returns:
      ``(out [B, Hkv, num_splits, R, Dv], lse [B, Hkv, num_splits, R, 1])`` float32 partials; a split
      that saw nothing has ``out = 0, lse = -inf``.
    """
    cfg = _config(q, k_pages, new_tokens=new_tokens, group=group, num_splits=num_splits,
                  tiles_per_split=tiles_per_split, scale=scale, softcap=softcap, window=window,
                  poison_outputs=poison_outputs)
    return common.dispatch(functools.partial(_build, cfg=cfg), lengths.astype(jnp.int32),
                           page_table.astype(jnp.int32), q, k_pages, v_pages, interpret=interpret)


# ------------------------------------------------- backward: the forward's grids, dk/dv per tile, dq per split

def _local_range(cfg: DecodeConfig, split, length):
    """The split's needed tiles ``[lo, hi)`` as offsets into its own ``tiles_per_split`` (clamped to them)."""
    lo, hi = _split_range(cfg, split, length)
    first = split * cfg.tiles_per_split
    a = jnp.clip(lo - first, 0, cfg.tiles_per_split)
    return a, jnp.clip(hi - first, a, cfg.tiles_per_split)


def _gpu_bwd_kernel(length_ref, table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest,
                    cfg: DecodeConfig):
    dq_ref, dk_ref, dv_ref = rest[-3:]
    length, split = length_ref[0], pl.program_id(2)
    first = split * cfg.tiles_per_split
    a, b = _local_range(cfg, split, length)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def clear(t, carry):
        dk_ref[t] = jnp.zeros(dk_ref.shape[1:], dk_ref.dtype)
        dv_ref[t] = jnp.zeros(dv_ref.shape[1:], dv_ref.dtype)
        return carry

    lax.fori_loop(0, a, clear, 0)
    lax.fori_loop(b, cfg.tiles_per_split, clear, 0)

    def visit(t, dq):
        tile = first + t
        page = table_ref[tile]
        dq_tile, dk, dv = _tile_grads(cfg, q, do, lse, delta, k_ref[page], v_ref[page], length,
                                      tile * cfg.page_size)
        dk_ref[t] = dk.astype(dk_ref.dtype)
        dv_ref[t] = dv.astype(dv_ref.dtype)
        return dq + dq_tile

    dq = lax.fori_loop(a, b, visit, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _gpu_bwd_call(cfg: DecodeConfig, lengths, table, q, k_pages, v_pages, do, lse, delta):
    B, Hkv, R, D = q.shape
    num_pages, P = k_pages.shape[2:4]
    Dv, W, T = v_pages.shape[-1], table.shape[1], cfg.tiles_per_split

    def rows(dim):
        return pl.BlockSpec((None, None, R, dim), lambda b, g, s: (b, g, 0, 0))

    def pool(dim):
        return pl.BlockSpec((None, None, num_pages, P, dim), lambda b, g, s: (_cache_batch(cfg, b), g, 0, 0, 0))

    def tiles(dim):
        return pl.BlockSpec((None, None, T, P, dim), lambda b, g, s: (b, g, s, 0, 0))

    return common.pallas_call(
        functools.partial(_gpu_bwd_kernel, cfg=cfg), out_shape=_grad_shapes(cfg, B, Hkv, R, D, P, Dv),
        target=cfg.target, interpret=cfg.interpret, name="jattn_decode_bwd", grid=(B, Hkv, cfg.num_splits),
        in_specs=[pl.BlockSpec((None, 1), lambda b, g, s: (b, 0)), pl.BlockSpec((None, W), lambda b, g, s: (b, 0)),
                  rows(D), pool(D), pool(Dv), rows(Dv), rows(1), rows(1)],
        out_specs=[pl.BlockSpec((None, None, None, R, D), lambda b, g, s: (b, g, s, 0, 0)), tiles(D), tiles(Dv)],
        poison_outputs=cfg.poison_outputs)(lengths[:, None], table, q, k_pages, v_pages, do, lse, delta)


def _tpu_bwd_kernel(lengths_ref, table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest,
                    cfg: DecodeConfig):
    dq_ref, dk_ref, dv_ref, dq_scratch = rest[-4:]
    b, split, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    length = lengths_ref[b]
    lo, hi = _split_range(cfg, split, length)
    tile = split * cfg.tiles_per_split + t
    needed = (tile >= lo) & (tile < hi)

    @pl.when(t == 0)
    def _init():
        dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

    @pl.when(needed)
    def _visit():
        dq, dk, dv = _tile_grads(cfg, q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], k_ref[...],
                                 v_ref[...], length, tile * cfg.page_size)
        dq_scratch[...] += dq
        dk_ref[...] = dk.astype(dk_ref.dtype)
        dv_ref[...] = dv.astype(dv_ref.dtype)

    @pl.when(jnp.logical_not(needed))
    def _clear():
        dk_ref[...] = jnp.zeros(dk_ref.shape, dk_ref.dtype)
        dv_ref[...] = jnp.zeros(dv_ref.shape, dv_ref.dtype)

    @pl.when(t == pl.num_programs(3) - 1)
    def _write():
        dq_ref[...] = (dq_scratch[...] * cfg.scale).astype(dq_ref.dtype)


def _tpu_bwd_call(cfg: DecodeConfig, lengths, table, q, k_pages, v_pages, do, lse, delta):
    B, Hkv, R, D = q.shape
    P, Dv, T = k_pages.shape[3], v_pages.shape[-1], cfg.tiles_per_split

    def page_spec(dim):
        return pl.BlockSpec((None, None, None, P, dim), lambda b, g, s, t, lens, tab: (
            _cache_batch(cfg, b), g, _tpu_page(cfg, lens, tab, b, s, t), 0, 0))

    def rows(dim):
        return pl.BlockSpec((None, None, R, dim), lambda b, g, s, t, lens, tab: (b, g, 0, 0))

    def tile_spec(dim):
        return pl.BlockSpec((None, None, None, P, dim), lambda b, g, s, t, lens, tab: (b, g, s * T + t, 0, 0))

    return common.pallas_call(
        functools.partial(_tpu_bwd_kernel, cfg=cfg), out_shape=_grad_shapes(cfg, B, Hkv, R, D, P, Dv),
        target=cfg.target, interpret=cfg.interpret, name="jattn_decode_bwd",
        grid=(B, Hkv, cfg.num_splits, T),
        in_specs=[rows(D), page_spec(D), page_spec(Dv), rows(Dv), rows(1), rows(1)],
        out_specs=[pl.BlockSpec((None, None, None, R, D), lambda b, g, s, t, lens, tab: (b, g, s, 0, 0)),
                   tile_spec(D), tile_spec(Dv)],
        poison_outputs=cfg.poison_outputs, num_scalar_prefetch=2,
        scratch_shapes=[common.vmem_scratch((R, D), jnp.float32)],
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))(
            lengths, table, q, k_pages, v_pages, do, lse, delta)


def _grad_shapes(cfg: DecodeConfig, B: int, Hkv: int, R: int, D: int, P: int, Dv: int):
    tiles = cfg.num_splits * cfg.tiles_per_split
    return [jax.ShapeDtypeStruct((B, Hkv, cfg.num_splits, R, D), jnp.float32),
            jax.ShapeDtypeStruct((B, Hkv, tiles, P, D), jnp.float32),
            jax.ShapeDtypeStruct((B, Hkv, tiles, P, Dv), jnp.float32)]


def _build_bwd(target: str, interpret: bool, *, cfg: DecodeConfig):
    cfg = dataclasses.replace(cfg, target=target, interpret=interpret)
    if target == "mosaic":
        return functools.partial(_tpu_bwd_call, cfg)
    return functools.partial(_gpu_bwd_call, cfg)


def decode_partials_grad(q, k_pages, v_pages, lengths, page_table, d_out, lse, delta, *, new_tokens: int,
                         group: int, num_splits: int, tiles_per_split: int, scale: float,
                         softcap: float | None = None, window: int | None = None, interpret=None,
                         poison_outputs: bool = False):
    """The backward of ``decode_partials`` merged over its splits: per-split dq and per-tile dk/dv.

    Args:
      q, k_pages, v_pages, lengths, page_table: as ``decode_partials`` (the same call's arguments).
      d_out: ``[B, Hkv, R, Dv]`` cotangent of the merged output rows (q's dtype: it meets V and P in dots).
      lse: ``[B, Hkv, R, 1]`` float32 merged log-sum-exp of each row, ``+inf`` where the row saw nothing.
      delta: ``[B, Hkv, R, 1]`` float32 ``rowsum(d_out * out) - d_lse``.
      (the rest): as ``decode_partials``.

    Returns:
      ``(dq [B, Hkv, num_splits, R, D], dk [B, Hkv, T, page_size, D], dv [B, Hkv, T, page_size, Dv])``
      float32, ``T = num_splits * tiles_per_split`` logical tiles of each sequence (zeros where a tile
      is not needed); sum dq over the splits, and take dk/dv to the cache's layout through the page table.
    """
    cfg = _config(q, k_pages, new_tokens=new_tokens, group=group, num_splits=num_splits,
                  tiles_per_split=tiles_per_split, scale=scale, softcap=softcap, window=window,
                  poison_outputs=poison_outputs)
    return common.dispatch(functools.partial(_build_bwd, cfg=cfg), lengths.astype(jnp.int32),
                           page_table.astype(jnp.int32), q, k_pages, v_pages, d_out, lse, delta,
                           interpret=interpret)
