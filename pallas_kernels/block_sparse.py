"""Block-sparse flash attention in Pallas: visits only the tiles a block table lists.

Kernels only, no policy: ``jattn.ops.block_sparse`` validates user input, builds the tables from a
``BlockMask`` and merges sinks; this module runs the tiles.

Tables. Each row (one ``(b, h, q block)`` for the forward and dq passes, one ``(b, h, kv block)`` for the
dk/dv pass) is an int32 vector ``[count, code_0, code_1, ...]`` padded to a power of two, with
``code = 2 * block_id + full``. A kernel program reads ``count`` and loops over exactly that many
tiles, so work is proportional to the listed tiles. The table travels as a regular blocked input (the
portable form that interpret mode, Triton and Mosaic all accept); a TPU-tuned variant would move it to
scalar prefetch (``PrefetchScalarGridSpec``) and put the tile loop on the grid.

Masking inside a tile: ``causal`` (``kv <= q``) applies to every tile; on partial tiles (``full = 0``)
the kernel also applies the sequence-end mask and ``mask_fn(b, h, q_idx, kv_idx)`` under a ``lax.cond``,
so full tiles never evaluate the mask function. Masked logits are the finite ``MASK_VALUE``; a row that
sees nothing keeps ``m = MASK_VALUE`` and finalises to ``out = 0, lse = -inf``.

Passes: forward (grid ``B, H, nQ``; online softmax, writes out and lse), dq (grid ``B, H, nQ``, same
tables) and dk/dv (grid ``B, H, nK``, transposed tables; per query head, summed over the GQA group
afterwards). Every output tile is written by exactly one program: deterministic, no atomics.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jattn.core.softmax import MASK_VALUE
from pallas_kernels import common

F32 = jnp.float32
_SQ = pl.squeezed  # a squeezed block dim (the kernel sees the ref without it)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    seq_q: int
    seq_k: int
    block_q: int
    block_k: int
    scale: float
    softcap: Optional[float]
    causal: bool
    mask_fn: Optional[Callable]
    out_dtype: str
    interpret: bool
    poison_outputs: bool

    @property
    def num_q_blocks(self) -> int:
        return -(-self.seq_q // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.seq_k // self.block_k)


# ---------------------------------------------------------------------------------------- tables

def encode_table(indices, counts, full):
    """``[Bm, Hm, n, W]`` lists -> ``[Bm, Hm, n, P]`` int32 rows ``[count, 2 * id + full, ...]``, P a power of two."""
    codes = indices.astype(jnp.int32) * 2 + full.astype(jnp.int32)
    table = jnp.concatenate([counts.astype(jnp.int32)[..., None], codes], axis=-1)
    return common.pad_axis(table, 3, common.next_power_of_two(table.shape[-1]))


def _table_spec(table):
    """BlockSpec selecting one table row; shared (size-1) batch/head dims always read row 0."""
    Bm, Hm, _, width = table.shape
    shared_b, shared_h = Bm == 1, Hm == 1

    def index_map(b, h, r):
        return (0 if shared_b else b, 0 if shared_h else h, r, 0)

    return pl.BlockSpec((_SQ, _SQ, _SQ, width), index_map)


# ---------------------------------------------------------------------------------------- tile math

def _tile_logits(cfg: KernelConfig, q_tile, k_tile):
    """float32 logits ``[bq, bk]`` after scale and softcap, plus the tanh the softcap backward needs."""
    s = common.dot_nt(q_tile, k_tile) * cfg.scale
    if cfg.softcap is None:
        return s, None
    t = jnp.tanh(s / cfg.softcap)
    return cfg.softcap * t, t


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


def _decode(code):
    return code // 2, code % 2 == 1


# ---------------------------------------------------------------------------------------- forward

def _forward_kernel(table_ref, q_ref, k_ref, v_ref, *rest, cfg: KernelConfig):
    out_ref, lse_ref = rest[-2:]  # leading entries are the (unread) NaN buffers aliased to the outputs
    b, h, qi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = cfg.block_q, cfg.block_k
    q_tile = q_ref[...]

    def visit(j, state):
        m, l, acc = state
        kv_block, is_full = _decode(table_ref[1 + j])
        kv_start = pl.multiple_of(kv_block * bk, bk)
        k_tile = k_ref[pl.ds(kv_start, bk), :]
        v_tile = v_ref[pl.ds(kv_start, bk), :]
        s, _ = _tile_logits(cfg, q_tile, k_tile)
        s = _mask_tile(cfg, s, is_full, b, h, qi * bq, kv_start)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l_new = l * correction + jnp.sum(p, axis=1)
        acc_new = acc * correction[:, None] + common.dot_nn(p.astype(v_tile.dtype), v_tile)
        return m_new, l_new, acc_new

    init = (jnp.full((bq,), MASK_VALUE, F32), jnp.zeros((bq,), F32), jnp.zeros(out_ref.shape, F32))
    m, l, acc = lax.fori_loop(0, table_ref[0], visit, init)
    # A row that never met a visible key still has m == MASK_VALUE (its l, acc are junk from
    # exp(MASK - MASK) = 1): it finalises to out 0, lse -inf.
    seen = m > 0.5 * MASK_VALUE
    safe_l = jnp.where(seen, l, 1.0)
    out_ref[...] = jnp.where(seen[:, None], acc / safe_l[:, None], 0.0).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), -jnp.inf)


def _poison_like(shape, dtype):
    return jnp.full(shape, jnp.nan, dtype)


def _call(kernel, cfg: KernelConfig, grid, in_specs, args, out_specs, out_shapes):
    """``pallas_call`` with optional NaN-filled output buffers (aliased), so unwritten tiles show up."""
    aliases = {}
    if cfg.poison_outputs:
        first = len(args)
        args = tuple(args) + tuple(_poison_like(s.shape, s.dtype) for s in out_shapes)
        in_specs = list(in_specs) + list(out_specs)
        aliases = {first + i: i for i in range(len(out_shapes))}
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg), grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shapes, input_output_aliases=aliases, interpret=cfg.interpret,
        compiler_params=common.gpu_compiler_params(interpret=cfg.interpret, num_warps=4, num_stages=2),
    )(*args)


def _row_specs(block_rows: int, head_of):
    """BlockSpec of ``[B, L, Hx, Dp]`` selecting ``block_rows`` rows (block index r) of head ``head_of(h)``."""
    def spec(dp):
        return pl.BlockSpec((_SQ, block_rows, _SQ, dp), lambda b, h, r: (b, r, head_of(h), 0))
    return spec


def _whole_spec(length: int, head_of):
    """BlockSpec of ``[B, L, Hx, Dp]`` selecting the whole sequence of head ``head_of(h)``."""
    def spec(dp):
        return pl.BlockSpec((_SQ, length, _SQ, dp), lambda b, h, r: (b, 0, head_of(h), 0))
    return spec


def _forward(cfg: KernelConfig, q, k, v, kv_table):
    """Padded inputs -> ``(out [B, Tp, H, Dv], lse [B, H, Tp])``."""
    B, Tp, H, Dp = q.shape
    Sp, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hkv
    q_spec = _row_specs(cfg.block_q, lambda h: h)
    kv_spec = _whole_spec(Sp, lambda h: h // group)
    out_shapes = (jax.ShapeDtypeStruct((B, Tp, H, Dv), jnp.dtype(cfg.out_dtype)),
                  jax.ShapeDtypeStruct((B, H, Tp), F32))
    out_specs = (q_spec(Dv), pl.BlockSpec((_SQ, _SQ, cfg.block_q), lambda b, h, r: (b, h, r)))
    return _call(_forward_kernel, cfg, (B, H, cfg.num_q_blocks),
                 [_table_spec(kv_table), q_spec(Dp), kv_spec(Dp), kv_spec(Dv)],
                 (kv_table, q, k, v), out_specs, out_shapes)


# ---------------------------------------------------------------------------------------- backward

def _tile_dlogits(cfg: KernelConfig, q_tile, k_tile, v_tile, do_tile, lse_rows, delta_rows, is_full, b, h,
                  q_start, kv_start):
    """Recomputes one tile: ``p`` and ``ds = dL/d(raw logits) * scale`` (float32 ``[bq, bk]``)."""
    s, tanh = _tile_logits(cfg, q_tile, k_tile)
    s = _mask_tile(cfg, s, is_full, b, h, q_start, kv_start)
    # lse is +inf on rows that saw nothing (and on padding rows), so p = 0 there; masked s gives p = 0.
    p = jnp.exp(s - lse_rows[:, None])
    dp = common.dot_nt(do_tile, v_tile)
    ds = p * (dp - delta_rows[:, None])
    if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
    return p, ds * cfg.scale


def _dq_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, cfg: KernelConfig):
    dq_ref = rest[-1]
    b, h, qi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bk = cfg.block_k
    q_tile, do_tile = q_ref[...], do_ref[...]
    lse_rows, delta_rows = lse_ref[...], delta_ref[...]

    def visit(j, dq):
        kv_block, is_full = _decode(table_ref[1 + j])
        kv_start = pl.multiple_of(kv_block * bk, bk)
        k_tile = k_ref[pl.ds(kv_start, bk), :]
        v_tile = v_ref[pl.ds(kv_start, bk), :]
        _, ds = _tile_dlogits(cfg, q_tile, k_tile, v_tile, do_tile, lse_rows, delta_rows, is_full, b, h,
                              qi * cfg.block_q, kv_start)
        return dq + common.dot_nn(ds.astype(k_tile.dtype), k_tile)

    dq_ref[...] = lax.fori_loop(0, table_ref[0], visit, jnp.zeros(dq_ref.shape, F32))


def _dkv_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, cfg: KernelConfig):
    dk_ref, dv_ref = rest[-2:]
    b, h, ki = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq = cfg.block_q
    k_tile, v_tile = k_ref[...], v_ref[...]

    def visit(j, carry):
        dk, dv = carry
        q_block, is_full = _decode(table_ref[1 + j])
        q_start = pl.multiple_of(q_block * bq, bq)
        q_tile = q_ref[pl.ds(q_start, bq), :]
        do_tile = do_ref[pl.ds(q_start, bq), :]
        p, ds = _tile_dlogits(cfg, q_tile, k_tile, v_tile, do_tile, lse_ref[pl.ds(q_start, bq)],
                              delta_ref[pl.ds(q_start, bq)], is_full, b, h, q_start, ki * cfg.block_k)
        dv = dv + common.dot_tn(p.astype(do_tile.dtype), do_tile)
        dk = dk + common.dot_tn(ds.astype(q_tile.dtype), q_tile)
        return dk, dv

    init = (jnp.zeros(dk_ref.shape, F32), jnp.zeros(dv_ref.shape, F32))
    dk, dv = lax.fori_loop(0, table_ref[0], visit, init)
    dk_ref[...] = dk
    dv_ref[...] = dv


def _backward(cfg: KernelConfig, q, k, v, kv_table, q_table, d_out, lse_rows, delta):
    """Padded inputs -> ``dq [B, Tp, H, Dp]``, per-query-head ``dk, dv [B, Sp, H, D*]`` (float32)."""
    B, Tp, H, Dp = q.shape
    Sp, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hkv
    row_spec = pl.BlockSpec((_SQ, _SQ, cfg.block_q), lambda b, h, r: (b, h, r))
    whole_rows = pl.BlockSpec((_SQ, _SQ, Tp), lambda b, h, r: (b, h, 0))
    q_blocks, q_whole = _row_specs(cfg.block_q, lambda h: h), _whole_spec(Tp, lambda h: h)
    kv_blocks, kv_whole = _row_specs(cfg.block_k, lambda h: h // group), _whole_spec(Sp, lambda h: h // group)

    dq = _call(_dq_kernel, cfg, (B, H, cfg.num_q_blocks),
               [_table_spec(kv_table), q_blocks(Dp), kv_whole(Dp), kv_whole(Dv),
                q_blocks(Dv), row_spec, row_spec],
               (kv_table, q, k, v, d_out, lse_rows, delta), (q_blocks(Dp),),
               (jax.ShapeDtypeStruct((B, Tp, H, Dp), F32),))[0]
    per_head = _row_specs(cfg.block_k, lambda h: h)
    dk, dv = _call(_dkv_kernel, cfg, (B, H, cfg.num_kv_blocks),
                   [_table_spec(q_table), q_whole(Dp), kv_blocks(Dp), kv_blocks(Dv),
                    q_whole(Dv), whole_rows, whole_rows],
                   (q_table, q, k, v, d_out, lse_rows, delta), (per_head(Dp), per_head(Dv)),
                   (jax.ShapeDtypeStruct((B, Sp, H, Dp), F32), jax.ShapeDtypeStruct((B, Sp, H, Dv), F32)))
    return dq, dk, dv


# ---------------------------------------------------------------------------------------- custom_vjp

def _pad_inputs(cfg: KernelConfig, q, k, v):
    """Pads sequences to whole blocks and head dims to a power of two >= 16 (zeros: exact)."""
    Tp = cfg.num_q_blocks * cfg.block_q
    Sp = cfg.num_kv_blocks * cfg.block_k
    Dp = common.padded_head_dim(q.shape[3])
    Dv = common.padded_head_dim(v.shape[3])
    q = common.pad_axis(common.pad_axis(q, 1, Tp), 3, Dp)
    k = common.pad_axis(common.pad_axis(k, 1, Sp), 3, Dp)
    v = common.pad_axis(common.pad_axis(v, 1, Sp), 3, Dv)
    return q, k, v


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: KernelConfig, q, k, v, kv_table, q_table):
    return _core_fwd(cfg, q, k, v, kv_table, q_table)[0]


def _core_fwd(cfg, q, k, v, kv_table, q_table):
    T, D_v = q.shape[1], v.shape[3]
    qp, kp, vp = _pad_inputs(cfg, q, k, v)
    out, lse = _forward(cfg, qp, kp, vp, kv_table)
    out, lse = out[:, :T, :, :D_v], lse[:, :, :T]
    return (out, lse), (q, k, v, kv_table, q_table, out, lse)


def _core_bwd(cfg, residuals, cotangents):
    q, k, v, kv_table, q_table, out, lse = residuals
    d_out, d_lse = cotangents
    B, T, H, D = q.shape
    S, Hkv, D_v = k.shape[1], k.shape[2], v.shape[3]
    qp, kp, vp = _pad_inputs(cfg, q, k, v)
    Tp = qp.shape[1]
    # delta = rowsum(dO * out) - dlse: the lse output's own cotangent enters ds = p * (dp - delta).
    delta = jnp.einsum("bthe,bthe->bht", d_out.astype(F32), out.astype(F32)) - d_lse.astype(F32)
    delta = common.pad_axis(delta, 2, Tp)
    lse_rows = common.pad_axis(jnp.where(jnp.isfinite(lse), lse, jnp.inf), 2, Tp, value=jnp.inf)
    d_out_p = common.pad_axis(common.pad_axis(d_out.astype(q.dtype), 1, Tp), 3, vp.shape[3])
    dq, dk, dv = _backward(cfg, qp, kp, vp, kv_table, q_table, d_out_p, lse_rows, delta)
    group = H // Hkv
    dk = dk[:, :S, :, :D].reshape(B, S, Hkv, group, D).sum(axis=3)
    dv = dv[:, :S, :, :D_v].reshape(B, S, Hkv, group, D_v).sum(axis=3)
    return dq[:, :T, :, :D].astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_core.defvjp(_core_fwd, _core_bwd)


# ---------------------------------------------------------------------------------------- entry point

def _check_table(name: str, x, lead: tuple, rows: int, dtype_kind: str):
    want = f"[Bm in (1, {lead[0]}), Hm in (1, {lead[1]}), {rows}, ...]"
    if x.ndim != 4 - (name.endswith("counts")) or x.shape[2] != rows:
        raise ValueError(f"{name} must have shape {want}, got {x.shape}")
    if x.shape[0] not in (1, lead[0]) or x.shape[1] not in (1, lead[1]):
        raise ValueError(f"{name} must have shape {want}, got {x.shape}")
    ok = jnp.issubdtype(x.dtype, jnp.integer) if dtype_kind == "int" else x.dtype == jnp.bool_
    if not ok:
        raise TypeError(f"{name} must have {'an integer' if dtype_kind == 'int' else 'bool'} dtype, got {x.dtype}")


def block_sparse_attention_pallas(q, k, v, kv_indices, kv_counts, kv_full, q_indices, q_counts, q_full, *,
                                  block_q: int, block_k: int, scale: float, softcap: float | None = None,
                                  causal: bool = False, mask_fn: Callable | None = None, out_dtype=None,
                                  interpret: bool | None = None, poison_outputs: bool = False):
    """Block-sparse attention over tables in ``BlockMask`` layout (see ``jattn.core.block_mask``).

    q ``[B, T, H, D]``, k/v ``[B, S, Hkv, D]``; ``kv_*`` ``[Bm, Hm, nQ, ...]`` and ``q_*``
    ``[Bm, Hm, nK, ...]`` with Bm in (1, B), Hm in (1, H). Returns ``(out [B, T, H, D]`` in
    ``out_dtype`` (default q's), ``lse [B, H, T]`` float32, -inf on empty rows). No sinks here.
    ``poison_outputs`` fills every output buffer with NaN first (tests: unwritten tiles show up).
    """
    B, T, H, D = q.shape
    S = k.shape[1]
    block_q = common.check_hardware_block("block_q", block_q)
    block_k = common.check_hardware_block("block_k", block_k)
    nQ, nK = -(-T // block_q), -(-S // block_k)
    for name, x, rows, kind in (("kv_indices", kv_indices, nQ, "int"), ("kv_counts", kv_counts, nQ, "int"),
                                ("kv_full", kv_full, nQ, "bool"), ("q_indices", q_indices, nK, "int"),
                                ("q_counts", q_counts, nK, "int"), ("q_full", q_full, nK, "bool")):
        _check_table(name, x, (B, H), rows, kind)
    cfg = KernelConfig(seq_q=T, seq_k=S, block_q=block_q, block_k=block_k, scale=float(scale),
                       softcap=None if softcap is None else float(softcap), causal=bool(causal),
                       mask_fn=mask_fn, out_dtype=jnp.dtype(out_dtype or q.dtype).name,
                       interpret=common.resolve_interpret(interpret), poison_outputs=bool(poison_outputs))
    kv_table = encode_table(kv_indices, kv_counts, kv_full)
    q_table = encode_table(q_indices, q_counts, q_full)
    return _core(cfg, q, k, v, kv_table, q_table)
