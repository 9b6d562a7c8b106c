"""Portable Pallas flash attention (FlashAttention-2 style), forward and backward.

One kernel family serves every dense-attention feature of ``jattn.core.reference.reference_attention``
(its docstring defines the semantics): GQA, a bool mask and a float bias broadcastable to
``[B, H, T, S]``, causal, a (left, right) window, segment ids, softcap and sinks. Absent features are
static flags and cost nothing.

Structure (the same on CPU with ``interpret=True``, on GPU via Triton):

* forward: grid ``(q blocks, B, H)``; each program keeps one q tile and runs an online softmax over
  kv tiles with ``lax.fori_loop``, slicing k/v refs. The kv range is derived from causal/window, so
  invisible tiles are never visited; inside the range, tiles that are fully visible by position skip
  the position mask. A mask array or segment ids add a per-(q block, kv block) "any visible" table,
  computed by XLA before the call, and invisible tiles are skipped with ``lax.cond``.
* backward (``jax.custom_vjp``): ``delta = rowsum(dout * out) - dlse`` in XLA, then a dq kernel (grid
  over q blocks, loop over kv tiles; optionally writes every dS tile for the bias gradient) and a
  dk/dv kernel (grid over kv blocks and kv heads, loop over the query heads of the GQA group and
  their q tiles). Gradients flow to q, k, v, bias and sinks, and also through ``lse``.

Lengths need not be multiples of the blocks: inputs are zero-padded and the key tail is masked.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jattn.core import checks
from jattn.core.softmax import MASK_VALUE
from pallas_kernels import common

__all__ = ["flash_attention", "DEFAULT_BLOCK_Q", "DEFAULT_BLOCK_K", "DEFAULT_BWD_BLOCK"]

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 128
# The backward keeps four tiles of accumulators/operands live per program; smaller tiles avoid spills.
DEFAULT_BWD_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one call: the kernels are specialised on it."""
    B: int
    T: int
    S: int
    H: int
    Hkv: int
    D: int  # head dim after padding to a hardware-legal size
    T_pad: int
    S_pad: int
    block_q: int
    block_k: int
    bwd_block_q: int
    bwd_block_k: int
    scale: float
    softcap: float | None
    causal: bool
    window: tuple[int, int] | None
    bias_full: tuple[bool, bool, bool, bool] | None  # which of (B, H, T, S) the bias spans (else 1)
    mask_full: tuple[bool, bool, bool, bool] | None
    segments: bool
    sinks: bool
    interpret: bool
    poison: bool = False  # alias NaN-filled buffers onto every output (tests: unwritten tiles show)

    @property
    def group(self) -> int:
        return self.H // self.Hkv

    @property
    def has_table(self) -> bool:
        return self.mask_full is not None or self.segments

    @property
    def table_full(self) -> tuple[bool, bool]:
        """Whether the visibility table has a real batch / head axis."""
        mask_b, mask_h = (self.mask_full[0], self.mask_full[1]) if self.mask_full else (False, False)
        return mask_b or self.segments, mask_h

    @property
    def position_masked(self) -> bool:
        """Whether some tiles need the causal/window/key-tail mask at all."""
        return self.causal or self.window is not None or self.S != self.S_pad


# ----------------------------------------------------------------------------------------------
# Tile ranges: which kv blocks a q block can see (and which it sees completely), and vice versa.
# ----------------------------------------------------------------------------------------------

def _kv_ranges(spec: _Spec, q_block, block_q: int, block_k: int, *, cover_all: bool = False):
    """kv-block ranges ``(lo, full_lo, full_hi, hi)`` for q block ``q_block`` (see ``common.tile_ranges``).

    Without a position mask every tile is full and the bounds are static. ``cover_all`` visits every
    tile (masked where needed), e.g. to write every dS tile for the bias gradient.
    """
    num_k = spec.S_pad // block_k
    if not spec.position_masked:
        return 0, 0, num_k, num_k
    lo, f_lo, f_hi, hi = common.tile_ranges(q_block, over="kv", causal=spec.causal, window=spec.window,
                                            block_q=block_q, block_k=block_k, seq_q=spec.T, seq_k=spec.S,
                                            num_blocks=num_k)
    if cover_all:
        return 0, f_lo, f_hi, num_k
    return lo, f_lo, f_hi, hi


def _q_ranges(spec: _Spec, kv_block, block_q: int, block_k: int):
    """q-block ranges ``(lo, full_lo, full_hi, hi)`` for kv block ``kv_block``; padded q blocks are skipped."""
    return common.tile_ranges(kv_block, over="q", causal=spec.causal, window=spec.window, block_q=block_q,
                              block_k=block_k, seq_q=spec.T, seq_k=spec.S, num_blocks=spec.T_pad // block_q)


# ----------------------------------------------------------------------------------------------
# Tile math shared by the three kernels.
# ----------------------------------------------------------------------------------------------

def _tile_logits(spec: _Spec, q, k, *, rows, cols, bias, mask, q_seg, kv_seg, position_mask: bool):
    """Masked float32 logits of one ``[bq, bk]`` tile and ``tanh(s / softcap)`` (for the backward)."""
    s = common.dot_nt(q, k) * spec.scale
    tanh_s = None
    if spec.softcap is not None:
        tanh_s = jnp.tanh(s / spec.softcap)
        s = spec.softcap * tanh_s
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    visible = None

    def both(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if mask is not None:
        visible = both(visible, mask != 0)
    if spec.segments:
        visible = both(visible, q_seg[:, None] == kv_seg[None, :])
    if position_mask:
        r, c = rows[:, None], cols[None, :]
        visible = both(visible, c < spec.S)
        if spec.causal:
            visible = both(visible, c <= r)
        if spec.window is not None:
            left, right = spec.window
            visible = both(visible, jnp.logical_and(c >= r - left, c <= r + right))
    if visible is not None:
        s = jnp.where(visible, s, MASK_VALUE)
    return s, tanh_s


def _loop_tiles(ranges, body, carry, *, position_masked: bool):
    """Runs ``body(j, carry, position_mask)`` over ``[lo, full_lo)``, ``[full_lo, full_hi)``, ``[full_hi, hi)``."""
    lo, f_lo, f_hi, hi = ranges
    if not position_masked:
        return lax.fori_loop(lo, hi, functools.partial(body, position_mask=False), carry)
    carry = lax.fori_loop(lo, f_lo, functools.partial(body, position_mask=True), carry)
    carry = lax.fori_loop(f_lo, f_hi, functools.partial(body, position_mask=False), carry)
    return lax.fori_loop(f_hi, hi, functools.partial(body, position_mask=True), carry)


def _maybe_skip(table_ref, index, update, carry):
    """Skips a tile the visibility table marks as fully masked (no table: always computes)."""
    if table_ref is None:
        return update(carry)
    return lax.cond(table_ref[index] != 0, update, lambda c: c, carry)


def _slice_cols(ref, full: bool, start, size):
    """A ``[rows, size]`` slice of a ``[rows, S]`` ref, or the whole ``[rows, 1]`` ref when broadcast."""
    return ref[:, pl.ds(start, size)] if full else ref[...]


# ----------------------------------------------------------------------------------------------
# Forward.
# ----------------------------------------------------------------------------------------------

def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, mask_ref, q_seg_ref, kv_seg_ref, table_ref,
                    sinks_ref, *refs, spec: _Spec):
    out_ref, lse_ref = refs[-2:]
    bq, bk = spec.block_q, spec.block_k
    q_block = pl.program_id(0)
    q = q_ref[...]
    rows = q_block * bq + jnp.arange(bq)
    q_seg = q_seg_ref[...] if spec.segments else None

    def body(j, carry, position_mask):
        def update(carry):
            m, l, acc = carry
            start = pl.multiple_of(j * bk, bk)
            k = k_ref[pl.ds(start, bk), :]
            v = v_ref[pl.ds(start, bk), :]
            s, _ = _tile_logits(
                spec, q, k, rows=rows, cols=start + jnp.arange(bk),
                bias=None if bias_ref is None else _slice_cols(bias_ref, spec.bias_full[3], start, bk),
                mask=None if mask_ref is None else _slice_cols(mask_ref, spec.mask_full[3], start, bk),
                q_seg=q_seg, kv_seg=kv_seg_ref[pl.ds(start, bk)] if spec.segments else None,
                position_mask=position_mask)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            correction = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[:, None])
            l = l * correction + jnp.sum(p, axis=1)
            acc = acc * correction[:, None] + common.dot_nn(p.astype(v.dtype), v)
            return m_new, l, acc
        return _maybe_skip(table_ref, j, update, carry)

    init = (jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, spec.D), jnp.float32))
    m, l, acc = _loop_tiles(_kv_ranges(spec, q_block, bq, bk), body, init,
                            position_masked=spec.position_masked)
    # A row whose max never rose above MASK_VALUE saw no visible finite logit: the exp(0) = 1 terms
    # it accumulated from masked entries are not real mass.
    seen = m > MASK_VALUE
    l = jnp.where(seen, l, 0.0)
    acc = jnp.where(seen[:, None], acc, 0.0)
    if spec.sinks:
        sink = sinks_ref[...].astype(jnp.float32)
        m_new = jnp.maximum(m, sink)
        correction = jnp.exp(m - m_new)
        l = l * correction + jnp.exp(sink - m_new)
        acc = acc * correction[:, None]
        m = m_new
    has_mass = l > 0
    safe_l = jnp.where(has_mass, l, 1.0)
    out_ref[...] = (acc * (1.0 / safe_l)[:, None]).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(has_mass, m + jnp.log(safe_l), -jnp.inf)


def _broadcast_spec(full, block_shape, full_index):
    """BlockSpec for a bias/mask-like array whose dims are 1 or full: broadcast dims read index 0."""
    shape = tuple(b if (f or b is None) else 1 for f, b in zip(full, block_shape))

    def index_map(*grid_idx):
        idx = full_index(*grid_idx)
        return tuple(i if f else 0 for f, i in zip(full, idx))
    return pl.BlockSpec(shape, index_map)


def _call(kernel, spec: _Spec, *, grid, inputs, in_specs, out_shapes, out_specs, name, warps):
    """pallas_call with optional NaN-poisoned outputs; ``inputs`` may hold None (absent features)."""
    inputs, in_specs = list(inputs), list(in_specs)
    aliases = {}
    if spec.poison:  # a kernel that misses a tile leaves NaN behind
        first = sum(x is not None for x in inputs)
        aliases = {first + n: n for n in range(len(out_shapes))}
        inputs += [jnp.full(sd.shape, jnp.nan, sd.dtype) for sd in out_shapes]
        in_specs += list(out_specs)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shapes,
        input_output_aliases=aliases, interpret=spec.interpret, name=name,
        compiler_params=common.gpu_compiler_params(interpret=spec.interpret, num_warps=warps,
                                                   num_stages=2),
    )(*inputs)


def _forward(spec: _Spec, q, k, v, bias, sinks, mask, q_seg, kv_seg):
    """Padded forward: ``out [B, T_pad, H, D]``, ``lse [B, H, T_pad]`` (float32)."""
    bq, bk, G = spec.block_q, spec.block_k, spec.group
    table = _visibility_table(spec, mask, q_seg, kv_seg, bq, bk)
    in_specs = [
        pl.BlockSpec((None, bq, None, spec.D), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, spec.S_pad, None, spec.D), lambda i, b, h: (b, 0, common.trunc_div(h, G), 0)),
        pl.BlockSpec((None, spec.S_pad, None, spec.D), lambda i, b, h: (b, 0, common.trunc_div(h, G), 0)),
        None if bias is None else _broadcast_spec(spec.bias_full, (None, None, bq, spec.S_pad),
                                                  lambda i, b, h: (b, h, i, 0)),
        None if mask is None else _broadcast_spec(spec.mask_full, (None, None, bq, spec.S_pad),
                                                  lambda i, b, h: (b, h, i, 0)),
        None if q_seg is None else pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
        None if kv_seg is None else pl.BlockSpec((None, spec.S_pad), lambda i, b, h: (b, 0)),
        None if table is None else _broadcast_spec(
            spec.table_full + (True, True), (None, None, None, spec.S_pad // bk),
            lambda i, b, h: (b, h, i, 0)),
        None if sinks is None else pl.BlockSpec((None,), lambda i, b, h: (h,)),
    ]
    out_shapes = [jax.ShapeDtypeStruct((spec.B, spec.T_pad, spec.H, spec.D), q.dtype),
                  jax.ShapeDtypeStruct((spec.B, spec.H, spec.T_pad), jnp.float32)]
    out_specs = [pl.BlockSpec((None, bq, None, spec.D), lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))]
    out, lse = _call(
        functools.partial(_forward_kernel, spec=spec), spec,
        grid=(spec.T_pad // bq, spec.B, spec.H),
        inputs=[q, k, v, bias, mask, q_seg, kv_seg, table, sinks], in_specs=in_specs,
        out_shapes=out_shapes, out_specs=out_specs, name="jattn_flash_forward",
        warps=4 if spec.D <= 64 else 8)
    return out, lse


def _visibility_table(spec: _Spec, mask, q_seg, kv_seg, bq: int, bk: int):
    """int32 ``[Bt, Ht, nq, nk]``: 1 where a (q block, kv block) tile may hold a visible entry.

    From the mask: exact ("any True in the tile"). From segment ids: the id ranges of the two blocks
    overlap (exact for sorted ids, conservative otherwise). None when neither is given.
    """
    if not spec.has_table:
        return None
    nq, nk = spec.T_pad // bq, spec.S_pad // bk
    table = None
    if mask is not None:
        Bm, Hm, Tm, Sm = mask.shape
        tiles = mask.reshape(Bm, Hm, nq if Tm > 1 else 1, bq if Tm > 1 else 1,
                             nk if Sm > 1 else 1, bk if Sm > 1 else 1)
        table = jnp.max(tiles, axis=(3, 5)).astype(jnp.int32) > 0
    if spec.segments:
        q_blocks = q_seg.reshape(spec.B, nq, bq)
        kv_blocks = kv_seg.reshape(spec.B, nk, bk)
        q_min, q_max = q_blocks.min(-1), q_blocks.max(-1)
        kv_min, kv_max = kv_blocks.min(-1), kv_blocks.max(-1)
        overlap = ((q_min[:, :, None] <= kv_max[:, None, :]) & (kv_min[:, None, :] <= q_max[:, :, None]))
        overlap = overlap[:, None]
        table = overlap if table is None else table & overlap
    Bt, Ht = spec.table_full
    shape = (spec.B if Bt else 1, spec.H if Ht else 1, nq, nk)
    return jnp.broadcast_to(table, shape).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Backward.
# ----------------------------------------------------------------------------------------------

def _dq_kernel(q_ref, k_ref, v_ref, bias_ref, mask_ref, q_seg_ref, kv_seg_ref, table_ref,
               do_ref, lse_ref, delta_ref, *refs, spec: _Spec, write_ds: bool):
    dq_ref = refs[-2] if write_ds else refs[-1]
    ds_ref = refs[-1] if write_ds else None
    bq, bk = spec.bwd_block_q, spec.bwd_block_k
    q_block = pl.program_id(0)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    rows = q_block * bq + jnp.arange(bq)
    q_seg = q_seg_ref[...] if spec.segments else None

    def body(j, dq, position_mask):
        def update(dq):
            start = pl.multiple_of(j * bk, bk)
            k = k_ref[pl.ds(start, bk), :]
            v = v_ref[pl.ds(start, bk), :]
            s, tanh_s = _tile_logits(
                spec, q, k, rows=rows, cols=start + jnp.arange(bk),
                bias=None if bias_ref is None else _slice_cols(bias_ref, spec.bias_full[3], start, bk),
                mask=None if mask_ref is None else _slice_cols(mask_ref, spec.mask_full[3], start, bk),
                q_seg=q_seg, kv_seg=kv_seg_ref[pl.ds(start, bk)] if spec.segments else None,
                position_mask=position_mask)
            p = jnp.exp(s - lse[:, None])
            dp = common.dot_nt(do, v)
            ds = p * (dp - delta[:, None])
            if write_ds:
                ds_ref[:, pl.ds(start, bk)] = ds
            if tanh_s is not None:
                ds = ds * (1.0 - tanh_s * tanh_s)
            return dq + common.dot_nn(ds.astype(k.dtype), k)
        return _maybe_skip(table_ref, j, update, dq)

    ranges = _kv_ranges(spec, q_block, bq, bk, cover_all=write_ds)
    dq = _loop_tiles(ranges, body, jnp.zeros((bq, spec.D), jnp.float32),
                     position_masked=spec.position_masked)
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, bias_ref, mask_ref, q_seg_ref, kv_seg_ref, table_ref,
                do_ref, lse_ref, delta_ref, *refs, spec: _Spec):
    dk_ref, dv_ref = refs[-2:]
    bq, bk = spec.bwd_block_q, spec.bwd_block_k
    kv_block = pl.program_id(0)
    start_k = kv_block * bk
    k = k_ref[...]
    v = v_ref[...]
    cols = start_k + jnp.arange(bk)
    kv_seg = kv_seg_ref[...] if spec.segments else None
    ranges = _q_ranges(spec, kv_block, bq, bk)

    def rows_of(ref, full_t: bool, head, start):
        """The ``[bq|1, bk|1]`` tile of a bias/mask ref ``[G|1, T|1, bk|1]``."""
        return ref[head, pl.ds(start, bq), :] if full_t else ref[head, :, :]

    def per_head(g, carry):
        def body(i, carry, position_mask):
            def update(carry):
                dk, dv = carry
                start = pl.multiple_of(i * bq, bq)
                q = q_ref[pl.ds(start, bq), g, :]
                do = do_ref[pl.ds(start, bq), g, :]
                lse = lse_ref[g, pl.ds(start, bq)]
                delta = delta_ref[g, pl.ds(start, bq)]
                s, tanh_s = _tile_logits(
                    spec, q, k, rows=start + jnp.arange(bq), cols=cols,
                    bias=None if bias_ref is None else rows_of(
                        bias_ref, spec.bias_full[2], g if spec.bias_full[1] else 0, start),
                    mask=None if mask_ref is None else rows_of(
                        mask_ref, spec.mask_full[2], g if spec.mask_full[1] else 0, start),
                    q_seg=q_seg_ref[pl.ds(start, bq)] if spec.segments else None, kv_seg=kv_seg,
                    position_mask=position_mask)
                p = jnp.exp(s - lse[:, None])
                dv = dv + common.dot_tn(p.astype(do.dtype), do)
                dp = common.dot_nt(do, v)
                ds = p * (dp - delta[:, None])
                if tanh_s is not None:
                    ds = ds * (1.0 - tanh_s * tanh_s)
                dk = dk + common.dot_tn(ds.astype(q.dtype), q)
                return dk, dv
            if table_ref is None:
                return update(carry)
            return lax.cond(table_ref[g if spec.table_full[1] else 0, i] != 0, update, lambda c: c, carry)
        return _loop_tiles(ranges, body, carry, position_masked=spec.position_masked)

    zeros = jnp.zeros((bk, spec.D), jnp.float32)
    dk, dv = lax.fori_loop(0, spec.group, per_head, (zeros, zeros))
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(spec: _Spec, needs, residuals, d_out, d_lse):
    """Cotangents ``(dq, dk, dv, dbias, dsinks)`` of the padded inputs; ``needs`` = (q, kv, bias) flags."""
    q, k, v, bias, sinks, mask, q_seg, kv_seg, out, lse = residuals
    need_dq, need_dkv, need_dbias = needs
    bq, bk, G = spec.bwd_block_q, spec.bwd_block_k, spec.group
    nq, nk = spec.T_pad // bq, spec.S_pad // bk
    # d lse_i / d s_ij = p_ij, so an lse cotangent just shifts delta.
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))
    delta = delta - d_lse
    # Rows with no visible key have lse = -inf; +inf makes every exp(s - lse) exactly 0 there.
    lse_safe = jnp.where(jnp.isneginf(lse), jnp.inf, lse)
    table = None if need_dbias else _visibility_table(spec, mask, q_seg, kv_seg, bq, bk)
    dq = dk = dv = dbias = dsinks = None

    if need_dq or need_dbias:
        in_specs = [
            pl.BlockSpec((None, bq, None, spec.D), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, spec.S_pad, None, spec.D), lambda i, b, h: (b, 0, common.trunc_div(h, G), 0)),
            pl.BlockSpec((None, spec.S_pad, None, spec.D), lambda i, b, h: (b, 0, common.trunc_div(h, G), 0)),
            None if bias is None else _broadcast_spec(spec.bias_full, (None, None, bq, spec.S_pad),
                                                      lambda i, b, h: (b, h, i, 0)),
            None if mask is None else _broadcast_spec(spec.mask_full, (None, None, bq, spec.S_pad),
                                                      lambda i, b, h: (b, h, i, 0)),
            None if q_seg is None else pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
            None if kv_seg is None else pl.BlockSpec((None, spec.S_pad), lambda i, b, h: (b, 0)),
            None if table is None else _broadcast_spec(
                spec.table_full + (True, True), (None, None, None, nk), lambda i, b, h: (b, h, i, 0)),
            pl.BlockSpec((None, bq, None, spec.D), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        ]
        out_shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
        out_specs = [pl.BlockSpec((None, bq, None, spec.D), lambda i, b, h: (b, i, h, 0))]
        if need_dbias:
            out_shapes.append(jax.ShapeDtypeStruct((spec.B, spec.H, spec.T_pad, spec.S_pad), jnp.float32))
            out_specs.append(pl.BlockSpec((None, None, bq, spec.S_pad), lambda i, b, h: (b, h, i, 0)))
        results = _call(
            functools.partial(_dq_kernel, spec=spec, write_ds=need_dbias), spec,
            grid=(nq, spec.B, spec.H),
            inputs=[q, k, v, bias, mask, q_seg, kv_seg, table, d_out, lse_safe, delta],
            in_specs=in_specs, out_shapes=out_shapes, out_specs=out_specs, name="jattn_flash_dq",
            warps=4 if bq * bk < 128 * 128 else 8)
        dq = results[0] if need_dq else None
        if need_dbias:
            reduce_axes = tuple(a for a, full in enumerate(spec.bias_full) if not full)
            dbias = jnp.sum(results[1], axis=reduce_axes, keepdims=True).astype(bias.dtype)

    if need_dkv:
        bias_spec = None if bias is None else _broadcast_spec(
            spec.bias_full, (None, G, spec.T_pad, bk), lambda j, b, h: (b, h, 0, j))
        mask_spec = None if mask is None else _broadcast_spec(
            spec.mask_full, (None, G, spec.T_pad, bk), lambda j, b, h: (b, h, 0, j))
        table_t = None if table is None else jnp.swapaxes(table, 2, 3)
        in_specs = [
            pl.BlockSpec((None, spec.T_pad, G, spec.D), lambda j, b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, bk, None, spec.D), lambda j, b, h: (b, j, h, 0)),
            pl.BlockSpec((None, bk, None, spec.D), lambda j, b, h: (b, j, h, 0)),
            bias_spec,
            mask_spec,
            None if q_seg is None else pl.BlockSpec((None, spec.T_pad), lambda j, b, h: (b, 0)),
            None if kv_seg is None else pl.BlockSpec((None, bk), lambda j, b, h: (b, j)),
            None if table_t is None else _broadcast_spec(
                spec.table_full + (True, True), (None, G, None, nq), lambda j, b, h: (b, h, j, 0)),
            pl.BlockSpec((None, spec.T_pad, G, spec.D), lambda j, b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, G, spec.T_pad), lambda j, b, h: (b, h, 0)),
            pl.BlockSpec((None, G, spec.T_pad), lambda j, b, h: (b, h, 0)),
        ]
        out_shapes = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
        out_specs = [pl.BlockSpec((None, bk, None, spec.D), lambda j, b, h: (b, j, h, 0))] * 2
        dk, dv = _call(
            functools.partial(_dkv_kernel, spec=spec), spec, grid=(nk, spec.B, spec.Hkv),
            inputs=[q, k, v, bias, mask, q_seg, kv_seg, table_t, d_out, lse_safe, delta],
            in_specs=in_specs, out_shapes=out_shapes, out_specs=out_specs, name="jattn_flash_dkv",
            warps=4 if bq * bk < 128 * 128 else 8)

    if sinks is not None:
        p_sink = jnp.exp(sinks[None, :, None] - lse_safe)
        dsinks = -jnp.sum(p_sink * delta, axis=(0, 2)).astype(sinks.dtype)
    return dq, dk, dv, dbias, dsinks


# ----------------------------------------------------------------------------------------------
# custom_vjp over the padded arrays (padding and slicing outside are differentiated by JAX).
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_padded(spec, q, k, v, bias, sinks, mask, q_seg, kv_seg):
    return _forward(spec, q, k, v, bias, sinks, mask, q_seg, kv_seg)


def _value(x):
    return None if x is None else x.value


def _perturbed(x) -> bool:
    return x is not None and bool(x.perturbed)


def _flash_padded_fwd(spec, q, k, v, bias, sinks, mask, q_seg, kv_seg):
    # With symbolic_zeros, each array arrives as CustomVJPPrimal(value, perturbed); None stays None.
    values = [_value(x) for x in (q, k, v, bias, sinks, mask, q_seg, kv_seg)]
    out, lse = _forward(spec, *values)
    needs = (_perturbed(q), _perturbed(k) or _perturbed(v), _perturbed(bias))
    # The flags ride in the residuals' tree structure (None vs ()), which stays static under jit.
    markers = tuple(() if n else None for n in needs)
    return (out, lse), (markers, (*values, out, lse))


def _zeros_if_symbolic(ct, like):
    if ct is None or isinstance(ct, jax.custom_derivatives.SymbolicZero):
        return jnp.zeros(like.shape, like.dtype)
    return ct


def _flash_padded_bwd(spec, residuals, cotangents):
    markers, arrays = residuals
    needs = tuple(m is not None for m in markers)
    out, lse = arrays[-2:]
    d_out = _zeros_if_symbolic(cotangents[0], out)
    d_lse = _zeros_if_symbolic(cotangents[1], lse)
    dq, dk, dv, dbias, dsinks = _backward(spec, needs, arrays, d_out, d_lse)
    return dq, dk, dv, dbias, dsinks, None, None, None


_flash_padded.defvjp(_flash_padded_fwd, _flash_padded_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------------------------

def _as_4d(x):
    return x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))


def _validate(q, k, v, *, bias, mask, q_segment_ids, kv_segment_ids, sinks, causal, window, scale,
              softcap, block_q, block_k, bwd_block_q, bwd_block_k, interpret):
    B, T, S, H, Hkv, D = checks.check_qkv(q, k, v)
    if mask is not None:
        checks.check_broadcastable("mask", mask, (B, H, T, S), dtype_kind="bool")
    if bias is not None:
        checks.check_broadcastable("bias", bias, (B, H, T, S), dtype_kind="float")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together, got "
                         f"q_segment_ids={checks.describe(q_segment_ids)} and "
                         f"kv_segment_ids={checks.describe(kv_segment_ids)}")
    if q_segment_ids is not None:
        checks.check_segment_ids((q_segment_ids, kv_segment_ids), B, T, S)
    checks.check_sinks(sinks, H)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    window = checks.check_window(window)
    scale = checks.check_positive_float("scale", scale, allow_none=False)
    softcap = checks.check_positive_float("softcap", softcap)
    blocks = tuple(common.check_hardware_block(name, value) for name, value in (
        ("block_q", block_q), ("block_k", block_k), ("bwd_block_q", bwd_block_q),
        ("bwd_block_k", bwd_block_k)))
    return (B, T, S, H, Hkv, D), window, scale, softcap, blocks, common.resolve_interpret(interpret)


def _make_spec(q, k, v, *, bias=None, mask=None, q_segment_ids=None, kv_segment_ids=None, sinks=None,
               causal=False, window=None, scale, softcap=None, block_q=DEFAULT_BLOCK_Q,
               block_k=DEFAULT_BLOCK_K, bwd_block_q=DEFAULT_BWD_BLOCK, bwd_block_k=DEFAULT_BWD_BLOCK,
               interpret=None) -> _Spec:
    """Validates every argument and returns the static description the kernels are built from."""
    (B, T, S, H, Hkv, D), window, scale, softcap, blocks, interpret = _validate(
        q, k, v, bias=bias, mask=mask, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        sinks=sinks, causal=causal, window=window, scale=scale, softcap=softcap, block_q=block_q,
        block_k=block_k, bwd_block_q=bwd_block_q, bwd_block_k=bwd_block_k, interpret=interpret)
    bq, bk = common.fit_block(blocks[0], T), common.fit_block(blocks[1], S)
    bwd_bq, bwd_bk = common.fit_block(blocks[2], T), common.fit_block(blocks[3], S)
    return _Spec(
        B=B, T=T, S=S, H=H, Hkv=Hkv, D=common.padded_head_dim(D),
        T_pad=common.round_up(T, max(bq, bwd_bq)), S_pad=common.round_up(S, max(bk, bwd_bk)),
        block_q=bq, block_k=bk, bwd_block_q=bwd_bq, bwd_block_k=bwd_bk, scale=scale, softcap=softcap,
        causal=causal, window=window,
        bias_full=None if bias is None else tuple(d != 1 for d in _as_4d(bias).shape),
        mask_full=None if mask is None else tuple(d != 1 for d in _as_4d(mask).shape),
        segments=q_segment_ids is not None, sinks=sinks is not None, interpret=interpret)


def flash_attention(q, k, v, *, bias=None, mask=None, q_segment_ids=None, kv_segment_ids=None,
                    sinks=None, causal: bool = False, window=None, scale: float, softcap=None,
                    block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                    bwd_block_q: int = DEFAULT_BWD_BLOCK, bwd_block_k: int = DEFAULT_BWD_BLOCK,
                    interpret=None):
    """Flash attention with the exact semantics of ``jattn.core.reference.reference_attention``.

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, S, Hkv, D]`` with ``H % Hkv == 0`` (query head ``h`` reads kv
        head ``h // (H // Hkv)``).
      bias: float, broadcastable to ``[B, H, T, S]`` (each dim 1 or full); differentiable.
      mask: bool (True = attend), broadcastable to ``[B, H, T, S]``.
      q_segment_ids, kv_segment_ids: int ``[B, T]`` and ``[B, S]``; keys are visible only within
        the same segment. Give both or neither.
      sinks: ``[H]``; adds ``exp(sinks[h])`` to every row's denominator (and to lse); differentiable.
      causal: key ``j`` visible to query ``i`` only if ``j <= i`` (top-left aligned).
      window: ``(left, right)``: keys ``i - left <= j <= i + right``.
      scale: logit scale (required: this layer holds no policy; the ops layer picks the default).
      softcap: ``s = softcap * tanh(s / softcap)`` before the bias.
      block_q, block_k: forward tile sizes; bwd_block_q, bwd_block_k: backward tile sizes. Powers of
        two >= 16; shrunk automatically for short sequences.
      interpret: run the Pallas interpreter (None: only when the default backend is CPU).

    Returns:
      ``out [B, T, H, D]`` in q's dtype and ``lse [B, T, H]`` in float32. A row with no visible key
      gives ``out = 0`` and ``lse = -inf`` (``lse = sinks[h]`` with sinks), never NaN, and finite
      gradients.
    """
    spec = _make_spec(q, k, v, bias=bias, mask=mask, q_segment_ids=q_segment_ids,
                      kv_segment_ids=kv_segment_ids, sinks=sinks, causal=causal, window=window,
                      scale=scale, softcap=softcap, block_q=block_q, block_k=block_k,
                      bwd_block_q=bwd_block_q, bwd_block_k=bwd_block_k, interpret=interpret)
    return _flash(spec, q, k, v, bias, sinks, mask, q_segment_ids, kv_segment_ids)


def _pad_inputs(spec: _Spec, q, k, v, bias, sinks, mask, q_seg, kv_seg):
    """Pads every operand to the kernel's block grid (zeros; mask pads with False; ids repeat the edge)."""
    q = common.pad_axis(common.pad_axis(q, 1, spec.T_pad), 3, spec.D)
    k = common.pad_axis(common.pad_axis(k, 1, spec.S_pad), 3, spec.D)
    v = common.pad_axis(common.pad_axis(v, 1, spec.S_pad), 3, spec.D)

    def pad_ts(x, full, value):
        x = _as_4d(x)
        if full[2]:
            x = common.pad_axis(x, 2, spec.T_pad, value)
        if full[3]:
            x = common.pad_axis(x, 3, spec.S_pad, value)
        return x

    if bias is not None:
        bias = pad_ts(bias, spec.bias_full, 0)
    if mask is not None:
        # int8: bool refs do not lower everywhere; padded keys are masked by the key tail anyway.
        mask = pad_ts(mask.astype(jnp.int8), spec.mask_full, 0)
    if q_seg is not None:
        q_seg = jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, spec.T_pad - spec.T)), mode="edge")
        kv_seg = jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, spec.S_pad - spec.S)), mode="edge")
    if sinks is not None:
        sinks = sinks.astype(jnp.float32)
    return q, k, v, bias, sinks, mask, q_seg, kv_seg


@functools.partial(jax.jit, static_argnums=(0,))
def _flash(spec: _Spec, q, k, v, bias, sinks, mask, q_seg, kv_seg):
    padded = _pad_inputs(spec, q, k, v, bias, sinks, mask, q_seg, kv_seg)
    out, lse = _flash_padded(spec, *padded)
    out = out[:, :spec.T, :, :q.shape[3]]
    lse = jnp.transpose(lse[:, :, :spec.T], (0, 2, 1))
    return out, lse
