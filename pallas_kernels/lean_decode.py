"""Lean Attention's phase 1 in Pallas (P65): a 1-D grid of workers, each streaming its own tile range.

Kernels only, no policy: ``jattn.methods.kv.lean`` computes the stream-K schedule (which worker covers
which flattened ``(b, kv head, needed tile)`` range), turns each worker's range into at most ``K`` segments
(one contiguous run of tiles of one output ``(b, kv head)``) and merges the per-segment partials exactly
(phase 2, XLA). This module runs the tiles, with the tile math of ``pallas_kernels/decode.py``
(``_attend_tile``: ``_visibility`` + ``common.scaled_logits`` + the online-softmax step, ``_initial_state``,
``common.finalize_rows``) and its cache layout: the kernel sees the cache as ``[Bc, Hkv, pages, page, D]``
(``Bc = B``: a contiguous cache with ``page_table[b, t] = t``; ``Bc = 1``: one shared pool) and GQA-packed
query rows ``q [B, Hkv, R, D]`` (see that module's docstring for the row rule).

Structure ``"triton"`` (GPU, and the CPU interpreter): grid ``(G,)``; worker ``c`` reads its segment list
(kernel inputs ``[K]`` each: batch, kv head, length, first and end logical tile; Triton has no scalar
prefetch), and for each of its ``K`` slots loops the slot's tiles with ``lax.fori_loop`` keeping
``(m, l, acc)`` in float32, then writes that slot's ``(out, lse)``. An empty slot (``lo == hi``) writes
``out = 0, lse = -inf`` (the merge identity), so every output element is written (NaN poisoning shows a
missed one). No spin-waits, no flags: phase 2 merges (the honest Pallas adaptation of ORT's host-CTA
reduction, as the P65 spec asks).

Structure ``"mosaic"`` (TPU): grid ``(G, max_steps)``, ``max_steps`` a static bound on a worker's tiles
(``ceil(B * Hkv * W / G)``); the per-(worker, step) scalars (``_steps``: cache batch, kv head, pool page,
tile, slot, length, active, first/last-of-segment flags, batch), computed in XLA from the segment list, are
scalar-prefetched into SMEM and drive the q, K/V and output ``index_map``s, so each step DMAs one page and the
q block and output slot change when a worker crosses into the next (b, kv head). ``(m, l, acc)`` live in
VMEM scratch, reset at a segment's first step and finalised into its output slot at its last. Steps past a
worker's load repeat its last page and slot (no DMA, no compute). Slots a worker never reaches are not
written (on TPU they hold whatever the buffer held); their id is the dropped bucket, so phase 2 ignores them.
Untested on TPU hardware: checked in Mosaic interpret mode and by ``jax.export(platforms=["tpu"])``. The
step table is ``9 * G * max_steps`` int32 in SMEM, which bounds G * max_steps (a long context on few
workers would need the table chunked).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.decode import DecodeConfig, _attend_tile, _initial_state, attend_split



def _gpu_kernel(seg_b_ref, seg_g_ref, seg_len_ref, seg_lo_ref, seg_hi_ref, table_ref, q_ref, k_ref, v_ref,
                *rest, cfg: DecodeConfig, slots: int):
    out_ref, lse_ref = rest[-2:]  # leading entries are the (unread) NaN buffers aliased to the outputs
    dv = out_ref.shape[-1]

    def segment(k, carry):
        b, g, length = seg_b_ref[k], seg_g_ref[k], seg_len_ref[k]
        lo, hi = seg_lo_ref[k], seg_hi_ref[k]
        cache_b = b if cfg.per_sequence else 0
        q = q_ref[b, g]

        def load_tile(t):
            page = table_ref[b, t]
            return k_ref[cache_b, g, page], v_ref[cache_b, g, page]

        out_ref[k], lse_ref[k] = attend_split(cfg, q, lo, hi, length, load_tile, dv)
        return carry

    lax.fori_loop(0, slots, segment, 0)


def _gpu_call(cfg: DecodeConfig, segments, table, q, k_pages, v_pages):
    seg_b, seg_g, seg_len, seg_lo, seg_hi = segments
    G, K = seg_b.shape
    B, Hkv, R, D = q.shape
    Bc, _, num_pages, P, _ = k_pages.shape
    Dv = v_pages.shape[-1]
    W = table.shape[1]
    seg_spec = pl.BlockSpec((None, K), lambda c: (c, 0))
    whole = lambda shape: pl.BlockSpec(shape, lambda c: (0,) * len(shape))  # noqa: E731
    out_shape = [jax.ShapeDtypeStruct((G, K, R, Dv), jnp.float32), jax.ShapeDtypeStruct((G, K, R, 1), jnp.float32)]
    return common.pallas_call(
        functools.partial(_gpu_kernel, cfg=cfg, slots=K), out_shape=out_shape, target=cfg.target,
        interpret=cfg.interpret, name="jattn_lean_decode", grid=(G,),
        in_specs=[seg_spec] * 5 + [whole((B, W)), whole((B, Hkv, R, D)), whole((Bc, Hkv, num_pages, P, D)),
                                   whole((Bc, Hkv, num_pages, P, Dv))],
        out_specs=[pl.BlockSpec((None, K, R, Dv), lambda c: (c, 0, 0, 0)),
                   pl.BlockSpec((None, K, R, 1), lambda c: (c, 0, 0, 0))],
        poison_outputs=cfg.poison_outputs)(seg_b, seg_g, seg_len, seg_lo, seg_hi, table, q, k_pages, v_pages)


# ------------------------------------------------------- TPU structure: (worker, step) on the grid

def _steps(segments, max_steps: int, table, per_sequence: bool):
    """Per (worker, step) scalars of the TPU structure: ``[9, G, max_steps]`` int32 rows ``(cache batch, kv head,
    pool page, tile, slot, length, active, first + 2 * last, batch)`` (XLA, before the kernel). Step ``s`` of
    worker ``c`` visits the ``s``-th tile of its concatenated segments; steps past its load repeat its last
    step's page and slot (no new DMA, no compute)."""
    seg_b, seg_g, seg_len, seg_lo, seg_hi = segments
    G, K = seg_b.shape
    lens = seg_hi - seg_lo
    cum = jnp.cumsum(lens, axis=1)                                    # [G, K]
    load = cum[:, -1:]
    s = jnp.arange(max_steps, dtype=jnp.int32)[None, :]
    active = s < load
    s_eff = jnp.where(active, s, jnp.maximum(load - 1, 0))
    slot = jnp.sum(cum[:, None, :] <= s_eff[:, :, None], axis=-1).astype(jnp.int32)
    slot = jnp.minimum(slot, K - 1)
    take = lambda x: jnp.take_along_axis(x, slot, axis=1)  # noqa: E731
    tile = take(seg_lo) + s_eff - (take(cum) - take(lens))
    tile = jnp.where(load > 0, tile, 0)
    b, g = take(seg_b), take(seg_g)
    page = table[b, jnp.clip(tile, 0, table.shape[1] - 1)]
    prev_slot = jnp.concatenate([jnp.full((G, 1), -1, jnp.int32), slot[:, :-1]], axis=1)
    next_active = jnp.concatenate([active[:, 1:], jnp.zeros((G, 1), bool)], axis=1)
    next_slot = jnp.concatenate([slot[:, 1:], jnp.full((G, 1), -1, jnp.int32)], axis=1)
    first = active & (slot != prev_slot)
    last = active & (~next_active | (next_slot != slot))
    cache_b = b if per_sequence else jnp.zeros_like(b)
    return jnp.stack([cache_b, g, page, tile, slot, take(seg_len), active.astype(jnp.int32),
                      first.astype(jnp.int32) + 2 * last.astype(jnp.int32), b]).astype(jnp.int32)


def _tpu_kernel(steps_ref, q_ref, k_ref, v_ref, *rest, cfg: DecodeConfig):
    out_ref, lse_ref, m_scratch, l_scratch, acc_scratch = rest[-5:]
    c, s = pl.program_id(0), pl.program_id(1)
    tile, length = steps_ref[3, c, s], steps_ref[5, c, s]
    active, flags = steps_ref[6, c, s], steps_ref[7, c, s]

    @pl.when((active == 1) & (lax.rem(flags, 2) == 1))
    def _init():
        m_scratch[...], l_scratch[...], acc_scratch[...] = _initial_state(cfg.rows, acc_scratch.shape[-1])

    @pl.when(active == 1)
    def _visit():
        state = (m_scratch[...], l_scratch[...], acc_scratch[...])
        m, l, acc = _attend_tile(cfg, state, q_ref[...], k_ref[...], v_ref[...], length, tile * cfg.page_size)
        m_scratch[...], l_scratch[...], acc_scratch[...] = m, l, acc

    @pl.when((active == 1) & (flags >= 2))
    def _write():
        out, lse = common.finalize_rows(m_scratch[...], l_scratch[...], acc_scratch[...])
        out_ref[...] = out
        lse_ref[...] = lse


def _tpu_call(cfg: DecodeConfig, segments, table, q, k_pages, v_pages, *, max_steps: int):
    G, K = segments[0].shape
    B, Hkv, R, D = q.shape
    P, Dv = k_pages.shape[3], v_pages.shape[-1]
    steps = _steps(segments, max_steps, table, cfg.per_sequence)

    def page_spec(dim):
        return pl.BlockSpec((None, None, None, P, dim), lambda c, s, st: (st[0, c, s], st[1, c, s], st[2, c, s], 0, 0))

    def slot_spec(dim):
        return pl.BlockSpec((None, None, R, dim), lambda c, s, st: (c, st[4, c, s], 0, 0))

    out_shape = [jax.ShapeDtypeStruct((G, K, R, Dv), jnp.float32), jax.ShapeDtypeStruct((G, K, R, 1), jnp.float32)]
    return common.pallas_call(
        functools.partial(_tpu_kernel, cfg=cfg), out_shape=out_shape, target=cfg.target, interpret=cfg.interpret,
        name="jattn_lean_decode", grid=(G, max_steps),
        in_specs=[pl.BlockSpec((None, None, R, D), lambda c, s, st: (st[8, c, s], st[1, c, s], 0, 0)),
                  page_spec(D), page_spec(Dv)],
        out_specs=[slot_spec(Dv), slot_spec(1)], poison_outputs=cfg.poison_outputs, num_scalar_prefetch=1,
        scratch_shapes=[common.vmem_scratch((R, 1), jnp.float32), common.vmem_scratch((R, 1), jnp.float32),
                        common.vmem_scratch((R, Dv), jnp.float32)],
        dimension_semantics=("parallel", "arbitrary"))(steps, q, k_pages, v_pages)


def _build(target: str, interpret: bool, *, cfg: DecodeConfig, max_steps: int):
    cfg = dataclasses.replace(cfg, target=target, interpret=interpret)
    if target == "mosaic":
        return functools.partial(_tpu_call, cfg, max_steps=max_steps)
    return functools.partial(_gpu_call, cfg)


def lean_decode_partials(q, k_pages, v_pages, page_table, segments, *, new_tokens: int, group: int, scale: float,
                         max_steps: int, softcap: float | None = None, window: int | None = None,
                         interpret=None, poison_outputs: bool = False):
    """Per-segment partial attention of packed decode rows, one program per stream-K worker.

    Args:
      q: ``[B, Hkv, R, D]`` packed query rows (``R >= group * new_tokens``, a power of two >= 16).
      k_pages: ``[Bc, Hkv, pages, page_size, D]`` key pages (``Bc = B`` contiguous, ``Bc = 1`` a pool).
      v_pages: ``[Bc, Hkv, pages, page_size, Dv]`` value pages.
      page_table: ``[B, W]`` int32 pool page of each logical tile.
      segments: five int32 ``[G, K]`` arrays ``(b, kv_head, length, lo, hi)``: slot ``k`` of worker ``c``
        covers logical tiles ``[lo, hi)`` of sequence ``b``'s kv head (``lo == hi``: an empty slot).
      new_tokens, group, scale, softcap, window: as ``pallas_kernels.decode.decode_partials``.
      max_steps: static bound on one worker's tiles (the TPU structure's second grid axis).
      interpret: None (decided at lowering), True/"triton" or "mosaic" (forced, interpreted).
      poison_outputs: NaN-fill the outputs first (tests: an unwritten slot shows).

    Returns:
      ``(out [G, K, R, Dv], lse [G, K, R, 1])`` float32; an empty slot has ``out = 0, lse = -inf`` on the
      triton structure and is unwritten on the mosaic one (give empty slots an id the merge drops).
    """
    segments = tuple(jnp.asarray(s, jnp.int32) for s in segments)
    G, K = segments[0].shape
    cfg = DecodeConfig(new_tokens=int(new_tokens), group=int(group), rows=int(q.shape[2]),
                       page_size=int(k_pages.shape[3]), num_splits=1, tiles_per_split=int(page_table.shape[1]),
                       scale=float(scale), softcap=None if softcap is None else float(softcap),
                       window=None if window is None else int(window), per_sequence=k_pages.shape[0] > 1,
                       target="", interpret=False, poison_outputs=bool(poison_outputs))
    return common.dispatch(functools.partial(_build, cfg=cfg, max_steps=int(max_steps)), segments,
                           page_table.astype(jnp.int32), q, k_pages, v_pages, interpret=interpret)
