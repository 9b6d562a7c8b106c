"""Block-sparse flash attention in Pallas: visits only the tiles a block table lists.

Kernels only, no policy: ``jattn.ops.block_sparse`` validates user input, builds the tables from a
``BlockMask`` and merges sinks; this module runs the tiles.

Tables. Each row (one ``(b, h, q block)`` for the forward and dq passes, one ``(b, h, kv block)`` for the
dk/dv pass) is an int32 vector ``[count, code_0, code_1, ...]`` padded to a power of two, with
``code = 2 * block_id + full``.

Layout: head-major, ``q [B, H, Tp, Dp]``, ``k, v [B, Hkv, Sp, D*]``; row statistics are ``[B, H, Tp, 1]``
columns. Every block's last two dims are ``(tile, D)`` or ``(tile, 1)`` with D whole.

Two structures over the same tile math (``dispatch`` picks one when the program is lowered):

* ``"triton"`` (GPU, and the CPU interpreter): grid ``(B, H, row blocks)``; a program reads its table
  row (a kernel input: Triton has no scalar prefetch) and loops over exactly ``count`` tiles with
  ``lax.fori_loop``, loading each listed K/V tile by offset from the head's K/V.
* ``"mosaic"`` (TPU, splash-style): grid ``(B, H, row blocks, width)``; the tables are scalar-prefetched
  into SMEM and drive the K/V (or, for dk/dv, the Q/dO/lse/delta) ``index_map``, so each step DMAs only
  the one listed tile; steps past ``count`` repeat the last listed block (no new DMA) and skip compute.
  The online-softmax state lives in VMEM scratch across the sequential last grid axis.

Masking inside a tile: ``causal`` (``kv <= q``) applies to every tile; on partial tiles (``full = 0``)
the kernel also applies the sequence-end mask and ``mask_fn(b, h, q_idx, kv_idx)`` under a ``lax.cond``,
so full tiles never evaluate the mask function. Masked logits are the finite ``MASK_VALUE``; a row that
sees nothing keeps ``m = MASK_VALUE`` and finalises to ``out = 0, lse = -inf``; a NaN logit makes its
row NaN (never silently zero).

Passes: forward (online softmax, writes out and lse), dq (same tables) and dk/dv (transposed tables; per
query head, summed over the GQA group afterwards). Every output tile is written by exactly one program:
deterministic, no atomics. The online-softmax step and finalisation are ``common.online_softmax_step`` and
``common.finalize_rows``, shared with the flash kernel, the pure-JAX paths and ``jattn.core.softmax``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxtyping import Array, Bool, Float, Int

from pallas_kernels import common
from pallas_kernels import score_mod as score_mod_lib
from pallas_kernels.common import MASK_VALUE


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """The static problem of one block-sparse call, shared by the kernel and the pure-JAX path
    (``jattn.ops.block_sparse_xla``); hashable: it is a ``custom_vjp`` non-differentiable argument."""
    seq_q: int
    seq_k: int
    block_q: int
    block_k: int
    scale: float
    softcap: Optional[float]
    causal: bool
    mask_fn: Optional[Callable]

    @property
    def num_q_blocks(self) -> int:
        return -(-self.seq_q // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.seq_k // self.block_k)


@dataclasses.dataclass(frozen=True)
class KernelConfig(SparseConfig):
    """``SparseConfig`` plus what the kernel needs: output dtype, target structure, interpret, poisoning."""
    out_dtype: str
    target: str
    interpret: bool
    poison_outputs: bool
    score_mod: object = None  # a traced jattn.core.score_mod (its .jaxpr); its arrays are kernel inputs
    mod_shapes: tuple = ()    # their real shapes
    mod_scalar: tuple = ()    # per array: read one element at a time only (TPU: SMEM)


# ---------------------------------------------------------------------------------------- tables

def encode_table(indices, counts, full):
    """``[Bm, Hm, n, W]`` lists -> ``[Bm, Hm, n, P]`` int32 rows ``[count, 2 * id + full, ...]``, P a power of two."""
    codes = indices.astype(jnp.int32) * 2 + full.astype(jnp.int32)
    table = jnp.concatenate([counts.astype(jnp.int32)[..., None], codes], axis=-1)
    return common.pad_axis(table, 3, common.next_power_of_two(table.shape[-1]))


def _decode(code):
    """``(block id, is_full)`` of a table code; truncating ops (codes are >= 0) lower on every target,
    where ``//`` and ``%`` emit sign corrections that Mosaic cannot lower from a CPU host."""
    return lax.div(code, 2), lax.rem(code, 2) == 1


def _table_row(table, b, h, r):
    """Where a (b, h, row) entry lives: shared (size-1) batch/head dims of the table read index 0."""
    return (b if table.shape[0] > 1 else 0, h if table.shape[1] > 1 else 0, r)


# ---------------------------------------------------------------------------------------- tile math

def _mask_tile(cfg: KernelConfig, s, is_full, b, h, q_start, kv_start):
    """Replaces invisible logits by MASK_VALUE; the mask function runs only on partial tiles."""
    bq, bk = s.shape
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    kv_pos = kv_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    if cfg.causal:
        s = jnp.where(kv_pos <= q_pos, s, MASK_VALUE)
    ragged_tail = cfg.seq_k % cfg.block_k != 0
    if cfg.mask_fn is None and not ragged_tail:
        return s

    def partial(s):
        visible = kv_pos < cfg.seq_k
        if cfg.mask_fn is not None:
            chosen = cfg.mask_fn(b, h, jnp.minimum(q_pos, cfg.seq_q - 1), jnp.minimum(kv_pos, cfg.seq_k - 1))
            visible = visible & jnp.broadcast_to(chosen, (bq, bk))
        return jnp.where(visible, s, MASK_VALUE)

    return lax.cond(is_full, lambda s: s, partial, s)


def _apply_mod(cfg: KernelConfig, s, const_refs, b, h, q_start, kv_start, *, derivative: bool):
    """The score mod on a tile's logits (``pallas_kernels.score_mod``); with ``derivative`` also ``d mod / d s``."""
    q_idx = score_mod_lib.clamp_positions(q_start, s.shape[0], cfg.seq_q, 0, s.shape)
    kv_idx = score_mod_lib.clamp_positions(kv_start, s.shape[1], cfg.seq_k, 1, s.shape)
    return score_mod_lib.apply_in_kernel(cfg.score_mod.jaxpr, const_refs, cfg.mod_shapes, s, b, h, q_idx, kv_idx,
                                         with_derivative=derivative)


def _softmax_step(cfg, state, q_tile, k_tile, v_tile, is_full, b, h, q_start, kv_start, const_refs=()):
    """One online-softmax update (``common.online_softmax_step``) of ``(m [bq, 1], l [bq, 1], acc [bq, Dv])``."""
    s, _ = common.scaled_logits(q_tile, k_tile, cfg.scale, cfg.softcap)
    if cfg.score_mod is not None:
        s = _apply_mod(cfg, s, const_refs, b, h, q_start, kv_start, derivative=False)
    s = _mask_tile(cfg, s, is_full, b, h, q_start, kv_start)
    return common.online_softmax_step(*state, s, v_tile)


def _tile_dlogits(cfg: KernelConfig, q_tile, k_tile, v_tile, do_tile, lse_rows, delta_rows, is_full, b, h,
                  q_start, kv_start, const_refs=()):
    """Recomputes one tile: ``p`` and ``ds = dL/d(raw logits) * scale`` (float32 ``[bq, bk]``)."""
    s, tanh = common.scaled_logits(q_tile, k_tile, cfg.scale, cfg.softcap)
    d_mod = None
    if cfg.score_mod is not None:
        s, d_mod = _apply_mod(cfg, s, const_refs, b, h, q_start, kv_start, derivative=True)
    s = _mask_tile(cfg, s, is_full, b, h, q_start, kv_start)
    # lse is +inf on rows that saw nothing (and on padding rows), so p = 0 there; masked s gives p = 0.
    p = jnp.exp(s - lse_rows)
    dp = common.dot_nt(do_tile, v_tile)
    ds = p * (dp - delta_rows)
    if d_mod is not None:
        ds = ds * d_mod
    if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
    return p, ds * cfg.scale


# ------------------------------------------------------------------- GPU structure: loop inside a program

def _gpu_forward_kernel(table_ref, q_ref, k_ref, v_ref, *rest, cfg: KernelConfig):
    out_ref, lse_ref = rest[-2:]  # leading entries: the score mod's arrays, then the (unread) NaN buffers
    const_refs = rest[:len(cfg.mod_shapes)]
    b, h, qi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = cfg.block_q, cfg.block_k
    q_tile = q_ref[...]

    def visit(j, state):
        kv_block, is_full = _decode(table_ref[1 + j])
        kv_start = pl.multiple_of(kv_block * bk, bk)
        return _softmax_step(cfg, state, q_tile, k_ref[pl.ds(kv_start, bk), :], v_ref[pl.ds(kv_start, bk), :],
                             is_full, b, h, qi * bq, kv_start, const_refs)

    init = (jnp.full((bq, 1), MASK_VALUE, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros(out_ref.shape, jnp.float32))
    out, lse = common.finalize_rows(*lax.fori_loop(0, table_ref[0], visit, init))
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse


def _gpu_dq_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, cfg: KernelConfig):
    dq_ref = rest[-1]
    const_refs = rest[:len(cfg.mod_shapes)]
    b, h, qi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bk = cfg.block_k
    q_tile, do_tile = q_ref[...], do_ref[...]
    lse_rows, delta_rows = lse_ref[...], delta_ref[...]

    def visit(j, dq):
        kv_block, is_full = _decode(table_ref[1 + j])
        kv_start = pl.multiple_of(kv_block * bk, bk)
        k_tile = k_ref[pl.ds(kv_start, bk), :]
        _, ds = _tile_dlogits(cfg, q_tile, k_tile, v_ref[pl.ds(kv_start, bk), :], do_tile, lse_rows, delta_rows,
                              is_full, b, h, qi * cfg.block_q, kv_start, const_refs)
        return dq + common.dot_nn(ds.astype(k_tile.dtype), k_tile)

    dq_ref[...] = lax.fori_loop(0, table_ref[0], visit, jnp.zeros(dq_ref.shape, jnp.float32))


def _gpu_dkv_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, cfg: KernelConfig):
    dk_ref, dv_ref = rest[-2:]
    const_refs = rest[:len(cfg.mod_shapes)]
    b, h, ki = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq = cfg.block_q
    k_tile, v_tile = k_ref[...], v_ref[...]

    def visit(j, carry):
        dk, dv = carry
        q_block, is_full = _decode(table_ref[1 + j])
        q_start = pl.multiple_of(q_block * bq, bq)
        q_tile = q_ref[pl.ds(q_start, bq), :]
        do_tile = do_ref[pl.ds(q_start, bq), :]
        p, ds = _tile_dlogits(cfg, q_tile, k_tile, v_tile, do_tile, lse_ref[pl.ds(q_start, bq), :],
                              delta_ref[pl.ds(q_start, bq), :], is_full, b, h, q_start, ki * cfg.block_k,
                              const_refs)
        return dk + common.dot_tn(ds.astype(q_tile.dtype), q_tile), dv + common.dot_tn(p.astype(do_tile.dtype),
                                                                                       do_tile)

    init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, table_ref[0], visit, init)
    dk_ref[...] = dk
    dv_ref[...] = dv


def _gpu_table_spec(table):
    """The table row of this program's (b, h, row block)."""
    width = table.shape[-1]

    def index_map(b, h, r):
        return (*_table_row(table, b, h, r), 0)

    return pl.BlockSpec((None, None, None, width), index_map)


def _rows(length: int, head_of, dim: int):
    """BlockSpec of a head-major ``[B, Hx, L, dim]`` array: ``length`` rows of block ``r`` of head ``head_of(h)``."""
    return pl.BlockSpec((None, None, length, dim), lambda b, h, r: (b, head_of(h), r, 0))


def _whole(length: int, head_of, dim: int):
    return pl.BlockSpec((None, None, length, dim), lambda b, h, r: (b, head_of(h), 0, 0))


def _const_specs(cfg) -> list:
    return score_mod_lib.const_specs(cfg.target, cfg.mod_shapes, cfg.mod_scalar)


def _gpu_forward(cfg, q, k, v, kv_table, consts):
    B, H, Tp, Dp = q.shape
    Hkv, Sp, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hkv
    kv_head = lambda h: common.trunc_div(h, group)  # noqa: E731
    same = lambda h: h  # noqa: E731
    return common.pallas_call(
        functools.partial(_gpu_forward_kernel, cfg=cfg), out_shape=_forward_shapes(cfg, q, v),
        target=cfg.target, interpret=cfg.interpret, name="jattn_block_sparse_forward",
        grid=(B, H, cfg.num_q_blocks),
        in_specs=[_gpu_table_spec(kv_table), _rows(cfg.block_q, same, Dp), _whole(Sp, kv_head, Dp),
                  _whole(Sp, kv_head, Dv), *_const_specs(cfg)],
        out_specs=[_rows(cfg.block_q, same, Dv), _rows(cfg.block_q, same, 1)],
        poison_outputs=cfg.poison_outputs)(kv_table, q, k, v, *consts)


def _gpu_backward(cfg, q, k, v, kv_table, q_table, d_out, lse_rows, delta, consts):
    B, H, Tp, Dp = q.shape
    Hkv, Sp, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hkv
    kv_head = lambda h: common.trunc_div(h, group)  # noqa: E731
    same = lambda h: h  # noqa: E731
    call = functools.partial(common.pallas_call, target=cfg.target, interpret=cfg.interpret,
                             poison_outputs=cfg.poison_outputs)
    (dq,) = call(
        functools.partial(_gpu_dq_kernel, cfg=cfg), out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32)],
        name="jattn_block_sparse_dq", grid=(B, H, cfg.num_q_blocks),
        in_specs=[_gpu_table_spec(kv_table), _rows(cfg.block_q, same, Dp), _whole(Sp, kv_head, Dp),
                  _whole(Sp, kv_head, Dv), _rows(cfg.block_q, same, Dv), _rows(cfg.block_q, same, 1),
                  _rows(cfg.block_q, same, 1), *_const_specs(cfg)],
        out_specs=[_rows(cfg.block_q, same, Dp)])(kv_table, q, k, v, d_out, lse_rows, delta, *consts)
    dk, dv = call(
        functools.partial(_gpu_dkv_kernel, cfg=cfg), name="jattn_block_sparse_dkv", grid=(B, H, cfg.num_kv_blocks),
        out_shape=[jax.ShapeDtypeStruct((B, H, Sp, Dp), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, Sp, Dv), jnp.float32)],
        in_specs=[_gpu_table_spec(q_table), _whole(Tp, same, Dp), _rows(cfg.block_k, kv_head, Dp),
                  _rows(cfg.block_k, kv_head, Dv), _whole(Tp, same, Dv), _whole(Tp, same, 1), _whole(Tp, same, 1),
                  *_const_specs(cfg)],
        out_specs=[_rows(cfg.block_k, same, Dp), _rows(cfg.block_k, same, Dv)])(
            q_table, q, k, v, d_out, lse_rows, delta, *consts)
    return dq, dk, dv


# ------------------------------------------------------------- TPU structure: listed tiles on the grid

def _listed_block(table_ref, b, h, r, j):
    """Block id of the j-th listed tile of row r, clamped to the last listed one (no re-fetch past count)."""
    bb, hh, rr = _table_row(table_ref, b, h, r)
    count = table_ref[bb, hh, rr, 0]
    slot = jnp.minimum(j, jnp.maximum(count - 1, 0))
    return _decode(table_ref[bb, hh, rr, 1 + slot])[0]


def _listed_entry(table_ref, b, h, r, j):
    """``(count, block id, is_full)`` of the j-th listed tile of row r."""
    bb, hh, rr = _table_row(table_ref, b, h, r)
    count = table_ref[bb, hh, rr, 0]
    block, is_full = _decode(table_ref[bb, hh, rr, 1 + jnp.minimum(j, table_ref.shape[-1] - 2)])
    return count, block, is_full


def _tpu_forward_kernel(table_ref, q_ref, k_ref, v_ref, *rest, cfg: KernelConfig):
    out_ref, lse_ref, m_scratch, l_scratch, acc_scratch = rest[-5:]
    const_refs = rest[:len(cfg.mod_shapes)]
    b, h, qi, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scratch[...] = jnp.full(m_scratch.shape, MASK_VALUE, jnp.float32)
        l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
        acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

    count, kv_block, is_full = _listed_entry(table_ref, b, h, qi, j)

    @pl.when(j < count)
    def _visit():
        state = (m_scratch[...], l_scratch[...], acc_scratch[...])
        m, l, acc = _softmax_step(cfg, state, q_ref[...], k_ref[...], v_ref[...], is_full, b, h,
                                  qi * cfg.block_q, kv_block * cfg.block_k, const_refs)
        m_scratch[...], l_scratch[...], acc_scratch[...] = m, l, acc

    @pl.when(j == pl.num_programs(3) - 1)
    def _write():
        out, lse = common.finalize_rows(m_scratch[...], l_scratch[...], acc_scratch[...])
        out_ref[...] = out.astype(out_ref.dtype)
        lse_ref[...] = lse


def _tpu_dq_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, cfg: KernelConfig):
    dq_ref, dq_scratch = rest[-2:]
    const_refs = rest[:len(cfg.mod_shapes)]
    b, h, qi, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

    count, kv_block, is_full = _listed_entry(table_ref, b, h, qi, j)

    @pl.when(j < count)
    def _visit():
        k_tile = k_ref[...]
        _, ds = _tile_dlogits(cfg, q_ref[...], k_tile, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
                              is_full, b, h, qi * cfg.block_q, kv_block * cfg.block_k, const_refs)
        dq_scratch[...] += common.dot_nn(ds.astype(k_tile.dtype), k_tile)

    @pl.when(j == pl.num_programs(3) - 1)
    def _write():
        dq_ref[...] = dq_scratch[...]


def _tpu_dkv_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, cfg: KernelConfig):
    dk_ref, dv_ref, dk_scratch, dv_scratch = rest[-4:]
    const_refs = rest[:len(cfg.mod_shapes)]
    b, h, ki, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
        dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

    count, q_block, is_full = _listed_entry(table_ref, b, h, ki, j)

    @pl.when(j < count)
    def _visit():
        q_tile, do_tile = q_ref[...], do_ref[...]
        p, ds = _tile_dlogits(cfg, q_tile, k_ref[...], v_ref[...], do_tile, lse_ref[...], delta_ref[...],
                              is_full, b, h, q_block * cfg.block_q, ki * cfg.block_k, const_refs)
        dk_scratch[...] += common.dot_tn(ds.astype(q_tile.dtype), q_tile)
        dv_scratch[...] += common.dot_tn(p.astype(do_tile.dtype), do_tile)

    @pl.when(j == pl.num_programs(3) - 1)
    def _write():
        dk_ref[...] = dk_scratch[...]
        dv_ref[...] = dv_scratch[...]


def _tpu_call(kernel, cfg, *, name, table, grid_rows, out_shape, in_specs, out_specs, scratch, inputs):
    width = table.shape[-1] - 1
    return common.pallas_call(
        functools.partial(kernel, cfg=cfg), out_shape=out_shape, target=cfg.target, interpret=cfg.interpret,
        name=name, grid=(*grid_rows, width), in_specs=in_specs, out_specs=out_specs,
        poison_outputs=cfg.poison_outputs, num_scalar_prefetch=1, scratch_shapes=scratch,
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))(table, *inputs)


def _tpu_forward(cfg, q, k, v, kv_table, consts):
    B, H, Tp, Dp = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    group = H // Hkv
    bq, bk = cfg.block_q, cfg.block_k
    q_spec = pl.BlockSpec((None, None, bq, Dp), lambda b, h, i, j, t: (b, h, i, 0))

    def kv_spec(dim):
        return pl.BlockSpec((None, None, bk, dim), lambda b, h, i, j, t: (
            b, common.trunc_div(h, group), _listed_block(t, b, h, i, j), 0))

    return _tpu_call(
        _tpu_forward_kernel, cfg, name="jattn_block_sparse_forward", table=kv_table,
        grid_rows=(B, H, cfg.num_q_blocks), out_shape=_forward_shapes(cfg, q, v),
        in_specs=[q_spec, kv_spec(Dp), kv_spec(Dv), *_const_specs(cfg)],
        out_specs=[pl.BlockSpec((None, None, bq, Dv), lambda b, h, i, j, t: (b, h, i, 0)),
                   pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, t: (b, h, i, 0))],
        scratch=[common.vmem_scratch((bq, 1), jnp.float32), common.vmem_scratch((bq, 1), jnp.float32),
                 common.vmem_scratch((bq, Dv), jnp.float32)], inputs=(q, k, v, *consts))


def _tpu_backward(cfg, q, k, v, kv_table, q_table, d_out, lse_rows, delta, consts):
    B, H, Tp, Dp = q.shape
    Hkv, Sp, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hkv
    bq, bk = cfg.block_q, cfg.block_k

    def fixed(rows, dim, kv_head=False):
        return pl.BlockSpec((None, None, rows, dim), lambda b, h, r, j, t: (
            b, common.trunc_div(h, group) if kv_head else h, r, 0))

    def listed(rows, dim, kv_head=False):
        return pl.BlockSpec((None, None, rows, dim), lambda b, h, r, j, t: (
            b, common.trunc_div(h, group) if kv_head else h, _listed_block(t, b, h, r, j), 0))

    (dq,) = _tpu_call(
        _tpu_dq_kernel, cfg, name="jattn_block_sparse_dq", table=kv_table, grid_rows=(B, H, cfg.num_q_blocks),
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32)],
        in_specs=[fixed(bq, Dp), listed(bk, Dp, True), listed(bk, Dv, True), fixed(bq, Dv), fixed(bq, 1),
                  fixed(bq, 1), *_const_specs(cfg)],
        out_specs=[fixed(bq, Dp)], scratch=[common.vmem_scratch((bq, Dp), jnp.float32)],
        inputs=(q, k, v, d_out, lse_rows, delta, *consts))
    dk, dv = _tpu_call(
        _tpu_dkv_kernel, cfg, name="jattn_block_sparse_dkv", table=q_table, grid_rows=(B, H, cfg.num_kv_blocks),
        out_shape=[jax.ShapeDtypeStruct((B, H, Sp, Dp), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, Sp, Dv), jnp.float32)],
        in_specs=[listed(bq, Dp), fixed(bk, Dp, True), fixed(bk, Dv, True), listed(bq, Dv), listed(bq, 1),
                  listed(bq, 1), *_const_specs(cfg)],
        out_specs=[fixed(bk, Dp), fixed(bk, Dv)],
        scratch=[common.vmem_scratch((bk, Dp), jnp.float32), common.vmem_scratch((bk, Dv), jnp.float32)],
        inputs=(q, k, v, d_out, lse_rows, delta, *consts))
    return dq, dk, dv


def _forward_shapes(cfg, q, v):
    B, H, Tp, _ = q.shape
    return [jax.ShapeDtypeStruct((B, H, Tp, v.shape[3]), jnp.dtype(cfg.out_dtype)),
            jax.ShapeDtypeStruct((B, H, Tp, 1), jnp.float32)]


STRUCTURES = {"triton": (_gpu_forward, _gpu_backward), "mosaic": (_tpu_forward, _tpu_backward)}


# ---------------------------------------------------------------------------------------- custom_vjp

def _pad_inputs(cfg: KernelConfig, q, k, v):
    """Head-major, sequences padded to whole blocks, head dims to a power of two >= 16 (zeros: exact)."""
    Tp = cfg.num_q_blocks * cfg.block_q
    Sp = cfg.num_kv_blocks * cfg.block_k
    Dp = common.padded_head_dim(q.shape[3])
    Dv = common.padded_head_dim(v.shape[3])

    def heads_first(x, length, dim):
        return jnp.swapaxes(common.pad_axis(common.pad_axis(x, 1, length), 3, dim), 1, 2)

    return heads_first(q, Tp, Dp), heads_first(k, Sp, Dp), heads_first(v, Sp, Dv)


def _forward_core(cfg, q, k, v, kv_table, consts):
    T, D_v = q.shape[1], v.shape[3]
    forward, _ = STRUCTURES[cfg.target]
    out, lse = forward(cfg, *_pad_inputs(cfg, q, k, v), kv_table, consts)
    out = jnp.swapaxes(out[:, :, :T, :D_v], 1, 2)
    lse = lse[:, :, :T, 0]                                               # [B, H, T]: the kernels' row layout
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: KernelConfig, q, k, v, kv_table, q_table, consts):
    out, lse = _forward_core(cfg, q, k, v, kv_table, consts)
    return out, jnp.swapaxes(lse, 1, 2)


def _core_fwd(cfg, q, k, v, kv_table, q_table, consts):
    # symbolic_zeros: every array arrives as CustomVJPPrimal(value, perturbed)
    q, k, v, kv_table, q_table = (x.value for x in (q, k, v, kv_table, q_table))
    differentiated = any(c.perturbed and jnp.issubdtype(c.value.dtype, jnp.inexact) for c in consts)
    consts = tuple(c.value for c in consts)
    out, lse = _forward_core(cfg, q, k, v, kv_table, consts)
    # the flag rides in the residuals' tree structure (None vs ()), static under jit
    return (out, jnp.swapaxes(lse, 1, 2)), (() if differentiated else None, (q, k, v, kv_table, q_table, consts,
                                                                             out, lse))


def _core_bwd(cfg, residuals, cotangents):
    differentiated, (q, k, v, kv_table, q_table, consts, out, lse) = residuals
    if differentiated is not None:
        raise ValueError("the gradient w.r.t. the arrays a score_mod closes over is not available from the "
                         "block-sparse Pallas kernel: use impl='xla' (jattn.block_sparse_attention's default on "
                         "every platform for a mod that closes over float arrays)")
    d_out = common.zeros_if_symbolic(cotangents[0], out)
    d_lse = common.zeros_if_symbolic(cotangents[1], jnp.swapaxes(lse, 1, 2))
    B, T, H, D = q.shape
    S, Hkv, D_v = k.shape[1], k.shape[2], v.shape[3]
    qp, kp, vp = _pad_inputs(cfg, q, k, v)
    Tp = qp.shape[2]
    # delta = rowsum(dO * out) - dlse: the lse output's own cotangent enters ds = p * (dp - delta).
    delta = jnp.einsum("bthe,bthe->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
    delta = delta - jnp.swapaxes(d_lse, 1, 2).astype(jnp.float32)
    delta = common.pad_axis(delta, 2, Tp)[..., None]
    lse_rows = common.pad_axis(jnp.where(jnp.isneginf(lse), jnp.inf, lse), 2, Tp, value=jnp.inf)[..., None]
    d_out_p = jnp.swapaxes(common.pad_axis(common.pad_axis(d_out.astype(q.dtype), 1, Tp), 3, vp.shape[3]), 1, 2)
    _, backward = STRUCTURES[cfg.target]
    dq, dk, dv = backward(cfg, qp, kp, vp, kv_table, q_table, d_out_p, lse_rows, delta, consts)
    group = H // Hkv
    dq = jnp.swapaxes(dq[:, :, :T, :D], 1, 2)
    dk = jnp.swapaxes(dk[:, :, :S, :D], 1, 2).reshape(B, S, Hkv, group, D).sum(axis=3)
    dv = jnp.swapaxes(dv[:, :, :S, :D_v], 1, 2).reshape(B, S, Hkv, group, D_v).sum(axis=3)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, tuple(None for _ in consts)


_core.defvjp(_core_fwd, _core_bwd, symbolic_zeros=True)


# ---------------------------------------------------------------------------------------- entry point

def block_sparse_attention_pallas(
        q: Float[Array, "B T H D"], k: Float[Array, "B S Hkv D"], v: Float[Array, "B S Hkv Dv"],
        kv_indices: Int[Array, "Bm Hm nQ W"], kv_counts: Int[Array, "Bm Hm nQ"], kv_full: Bool[Array, "Bm Hm nQ W"],
        q_indices: Int[Array, "Bm Hm nK Wq"], q_counts: Int[Array, "Bm Hm nK"], q_full: Bool[Array, "Bm Hm nK Wq"],
        *, block_q: int, block_k: int, scale: float, softcap: float | None = None, causal: bool = False,
        mask_fn: Callable | None = None, score_mod=None, mod_consts: tuple = (), out_dtype=None, interpret=None,
        poison_outputs: bool = False) -> tuple[Float[Array, "B T H Dv"], Float[Array, "B T H"]]:
    """Block-sparse attention over tables in ``BlockMask`` layout (see ``jattn.core.block_mask``).

    Inputs are validated by the caller (``jattn.block_sparse_attention``); this layer holds no policy.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, S, Hkv, D]``.
      v: ``[B, S, Hkv, Dv]``.
      kv_indices: ``[Bm, Hm, nQ, W]`` int kv-block ids of each q block (Bm in (1, B), Hm in (1, H)).
      kv_counts: ``[Bm, Hm, nQ]`` how many of them are listed.
      kv_full: ``[Bm, Hm, nQ, W]`` bool: the tile is visible throughout (no mask_fn needed).
      q_indices: ``[Bm, Hm, nK, W']`` the transposed lists (for dk/dv).
      q_counts: ``[Bm, Hm, nK]``.
      q_full: ``[Bm, Hm, nK, W']``.
      block_q: q tile (a power of two >= 16).
      block_k: kv tile (a power of two >= 16).
      scale: logit scale.
      softcap: ``s -> softcap * tanh(s / softcap)``.
      causal: additionally require ``kv <= q``.
      mask_fn: ``mask_fn(b, h, q_idx, kv_idx) -> bool`` on partial tiles (pure index arithmetic).
      score_mod: a traced score mod (``jattn.core.score_mod.trace_score_mod``) on every listed tile's logits
        after the softcap, inside the kernels (``pallas_kernels.score_mod``).
      mod_consts: the arrays it closes over, kernel inputs. Their gradient is not computed here: taking it
        raises (the xla path gives it).
      out_dtype: the output dtype (default q's).
      interpret: see ``pallas_kernels.common.dispatch`` (None: Triton / Mosaic / CPU interpreter; ``True`` or
        ``"triton"`` / ``"mosaic"`` run that structure in the interpreter).
      poison_outputs: NaN-fill every output buffer first (tests: unwritten tiles show up).

    Returns:
      ``out [B, T, H, Dv]`` in ``out_dtype`` and ``lse [B, T, H]`` float32 (-inf on empty rows). No sinks:
      merge them afterwards with ``jattn.core.softmax.merge_sinks``.

    Raises:
      TypeError, ValueError: ``block_q`` / ``block_k`` is not a power of two >= 16 (``common.check_hardware_block``).
    """
    block_q = common.check_hardware_block("block_q", block_q)
    block_k = common.check_hardware_block("block_k", block_k)
    kv_table = encode_table(kv_indices, kv_counts, kv_full)
    q_table = encode_table(q_indices, q_counts, q_full)

    mod_shapes = tuple(tuple(c.shape) for c in mod_consts)
    mod_scalar = () if score_mod is None else score_mod_lib.scalar_only_consts(score_mod.jaxpr)

    def build(target, interpret):
        cfg = KernelConfig(seq_q=q.shape[1], seq_k=k.shape[1], block_q=block_q, block_k=block_k,
                           scale=float(scale), softcap=None if softcap is None else float(softcap),
                           causal=bool(causal), mask_fn=mask_fn, out_dtype=jnp.dtype(out_dtype or q.dtype).name,
                           target=target, interpret=interpret, poison_outputs=bool(poison_outputs),
                           score_mod=score_mod, mod_shapes=mod_shapes, mod_scalar=mod_scalar)
        if target == "mosaic" and score_mod is not None and score_mod_lib.tile_varying_lookups(score_mod.jaxpr):
            out_shapes = [jax.ShapeDtypeStruct((*q.shape[:3], v.shape[3]), jnp.dtype(cfg.out_dtype)),
                          jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)]
            return lambda q, k, v, *rest: tuple(common.unsupported_on_target(score_mod_lib.TPU_GATHER_PROBLEM,
                                                                             out_shapes)(q, k, v))

        def run(q, k, v, kv_table, q_table, consts):
            return _core(cfg, q, k, v, kv_table, q_table,
                         tuple(score_mod_lib.pad_const(target, c) for c in consts))
        return run

    return common.dispatch(build, q, k, v, kv_table, q_table, tuple(mod_consts), interpret=interpret)
