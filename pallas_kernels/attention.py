"""Portable Pallas flash attention (FlashAttention-2 style), forward and backward.

One kernel family serves the dense-attention features of ``jattn.core.reference.reference_attention``
(its docstring defines the semantics): GQA, a bool mask and a float bias broadcastable to
``[B, H, T, S]``, causal, a (left, right) window, segment ids and softcap. Absent features are static
flags and cost nothing. (Sinks are merged outside the kernel as one value-less LSE partial, exact.)

Layout. The kernels see a head-major layout, ``q [B, H, T, D]``, ``k, v [B, Hkv, S, D]``, so every block's
last two dims are ``(tile, D)`` with ``D`` whole: legal for Triton (powers of two) and for Mosaic TPU
(``(8, 128)`` tiling or the whole dim). Row statistics (``lse``, ``delta``) travel as ``[..., T, 1]``
columns and stay 2-D inside the kernels (``(rows, 1)``), which both compilers lower. The transposes from
and to the user's ``[B, T, H, D]`` run in XLA around the call.

Structure (the same kernel bodies on every target):

* forward: grid ``(q blocks, B, H)``; each program keeps one q tile and runs an online softmax over the
  kv tiles with ``lax.fori_loop``, slicing k/v refs. The kv range is derived from causal/window, so
  invisible tiles are never visited; inside the range, tiles that are fully visible by position skip
  the position mask. A mask array or segment ids add a per-(q block, kv block) "any visible" table,
  computed by XLA before the call, and invisible tiles are skipped with ``lax.cond``.
* backward (``jax.custom_vjp``): ``delta = rowsum(dout * out) - dlse`` in XLA, then a dq kernel (grid
  over q blocks, loop over kv tiles; optionally writes every dS tile for the bias gradient) and a
  dk/dv kernel (grid over kv blocks and kv heads, loop over the query heads of the GQA group and
  their q tiles). Gradients flow to q, k, v and bias, and also through ``lse``.

Targets (``pallas_kernels.common.dispatch``): Triton on GPU, Mosaic on TPU, the interpreter on CPU, chosen
when the program is lowered. The TPU variant differs only in where the visibility table lives (SMEM) and
in its tile rules: the kv tile is the lane dim of bias/mask/segment blocks, so with any of those it must
be a multiple of 128 or cover the whole (padded) key length. Each program holds one head's whole K/V in
VMEM (``S * D`` per operand), which bounds the TPU sequence length; a kv-on-the-grid variant is the next
step there.

Lengths need not be multiples of the blocks: inputs are zero-padded and the key tail is masked.

NaN: a NaN logit propagates through ``max`` into the row's running maximum, so the row's output, lse and
gradients are NaN (never silently zero): only a row whose maximum is still exactly the mask value saw no
visible key and finalises to ``out = 0, lse = -inf``.

The online-softmax step and finalisation (``common.online_softmax_step``, ``common.finalize_rows``), the tile
ranges (``common.tile_ranges``) and the mask/segment tile table (``common.visible_tiles``) are shared with the
block-sparse kernel and the pure-JAX path (``jattn.ops.attention_xla``).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels import common
from pallas_kernels import score_mod as score_mod_lib
from pallas_kernels.common import MASK_VALUE

__all__ = ["flash_attention", "BlockSizes", "DEFAULTS", "tpu_block_problem"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the three flash kernels (forward, dq, dk/dv); powers of two >= 16.

    None picks the target's default (``DEFAULTS``). Every size is shrunk to the smallest legal power of two
    covering a short sequence.
    """
    block_q: int | None = None
    block_k: int | None = None
    block_q_dq: int | None = None
    block_k_dq: int | None = None
    block_q_dkv: int | None = None
    block_k_dkv: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is not None:
                common.check_hardware_block(f.name, getattr(self, f.name))

    def resolve(self, target: str) -> "BlockSizes":
        defaults = DEFAULTS[target]
        return BlockSizes(*(d if v is None else v for v, d in zip(dataclasses.astuple(self),
                                                                  dataclasses.astuple(defaults))))

    def fit(self, T: int, S: int) -> "BlockSizes":
        q_fields = ("block_q", "block_q_dq", "block_q_dkv")
        return BlockSizes(**{f.name: common.fit_block(getattr(self, f.name), T if f.name in q_fields else S)
                             for f in dataclasses.fields(self)})


# GPU: the backward keeps four tiles live per program; 64-wide tiles avoid register spills.
# TPU: kv tiles are lane dims of the bias/mask blocks, so 128 everywhere.
DEFAULTS = {
    "triton": BlockSizes(128, 128, 64, 64, 64, 64),
    "mosaic": BlockSizes(128, 128, 128, 128, 128, 128),
}


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one call on one target: the kernels are specialised on it."""
    B: int
    T: int
    S: int
    H: int
    Hkv: int
    D: int  # head dim after padding to a hardware-legal size
    T_pad: int
    S_pad: int
    blocks: BlockSizes
    scale: float
    softcap: float | None
    causal: bool
    window: tuple[int, int] | None
    bias_full: tuple[bool, bool, bool, bool] | None  # which of (B, H, T, S) the bias spans (else 1)
    mask_full: tuple[bool, bool, bool, bool] | None
    segments: bool
    target: str
    interpret: bool
    poison_outputs: bool
    score_mod: object = None  # a traced jattn.core.score_mod (its .jaxpr); the arrays are kernel inputs
    mod_shapes: tuple = ()  # the real shapes of those arrays
    mod_scalar: tuple = ()  # per array: read one element at a time only (TPU: SMEM)

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

    @property
    def lane_sliced(self) -> bool:
        """Whether the kernels slice bias/mask/segment blocks along the kv (lane) dim."""
        return (self.bias_full is not None and self.bias_full[3]) or \
            (self.mask_full is not None and self.mask_full[3]) or self.segments


def tpu_block_problem(spec: _Spec) -> str | None:
    """Why Mosaic cannot take this spec (its kv tiles, or a score mod that gathers), or None."""
    if spec.target == "mosaic" and spec.score_mod is not None and \
            score_mod_lib.tile_varying_lookups(spec.score_mod.jaxpr):
        return score_mod_lib.TPU_GATHER_PROBLEM
    if spec.target != "mosaic" or not spec.lane_sliced:
        return None
    for name in ("block_k", "block_k_dq", "block_k_dkv"):
        size = getattr(spec.blocks, name)
        if size % common.TPU_LANES and size < spec.S_pad:
            return (f"{name}={size} cannot run on TPU with a bias, mask or segment ids over keys: the kv tile is "
                    f"the lane dim of those blocks and must be a multiple of {common.TPU_LANES} (or cover all "
                    f"{spec.S_pad} padded keys); pass {name}={common.TPU_LANES} or leave it None")
    return None


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

def _tile_logits(spec: _Spec, q, k, *, row_start, col_start, bias, mask, q_seg, kv_seg, position_mask: bool,
                 mod=None, mod_derivative: bool = False):
    """Masked float32 logits of one ``[bq, bk]`` tile, ``tanh(s / softcap)`` (for the backward) and, with
    ``mod_derivative``, the score mod's ``d mod / d s`` (else None).

    ``q_seg`` is a ``(bq, 1)`` column and ``kv_seg`` a ``(1, bk)`` row; bias/mask tiles broadcast. ``mod`` is
    ``(const_refs, b, h)``: the score mod's arrays and this tile's batch and query head.
    """
    s, tanh_s = common.scaled_logits(q, k, spec.scale, spec.softcap)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    d_mod = None
    if spec.score_mod is not None:
        const_refs, b, h = mod
        q_idx = score_mod_lib.clamp_positions(row_start, s.shape[0], spec.T, 0, s.shape)
        kv_idx = score_mod_lib.clamp_positions(col_start, s.shape[1], spec.S, 1, s.shape)
        s = score_mod_lib.apply_in_kernel(spec.score_mod.jaxpr, const_refs, spec.mod_shapes, s, b, h, q_idx, kv_idx,
                                          with_derivative=mod_derivative)
        if mod_derivative:
            s, d_mod = s
    visible = None

    def both(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if mask is not None:
        visible = both(visible, mask != 0)
    if spec.segments:
        visible = both(visible, q_seg == kv_seg)
    if position_mask:
        r = row_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        c = col_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        visible = both(visible, c < spec.S)
        if spec.causal:
            visible = both(visible, c <= r)
        if spec.window is not None:
            left, right = spec.window
            visible = both(visible, jnp.logical_and(c >= r - left, c <= r + right))
    if visible is not None:
        s = jnp.where(visible, s, MASK_VALUE)
    if mod_derivative:
        return s, tanh_s, d_mod
    return s, tanh_s


def _loop_tiles(ranges, body, carry, *, position_masked: bool):
    """Runs ``body(j, carry, position_mask)`` over ``[lo, full_lo)``, ``[full_lo, full_hi)``, ``[full_hi, hi)``."""
    lo, f_lo, f_hi, hi = ranges
    if not position_masked:
        return lax.fori_loop(lo, hi, functools.partial(body, position_mask=False), carry)
    carry = lax.fori_loop(lo, f_lo, functools.partial(body, position_mask=True), carry)
    carry = lax.fori_loop(f_lo, f_hi, functools.partial(body, position_mask=False), carry)
    return lax.fori_loop(f_hi, hi, functools.partial(body, position_mask=True), carry)


def _table_entry(spec: _Spec, table_ref, program, row, col):
    """The visibility-table entry of tile (row, col) for this program's batch and head.

    GPU: the table arrives as this program's ``[n_rows, n_cols]`` block. TPU: the whole table sits in SMEM
    and is indexed by the program's batch and head, ``program = (b, h)``: program ids the kernel read at its
    top level (the Pallas interpreter cannot read them inside loops).
    """
    if spec.target == "mosaic":
        b, h = program
        full_b, full_h = spec.table_full
        return table_ref[b if full_b else 0, h if full_h else 0, row, col]
    return table_ref[row, col]


def _skip_invisible(spec: _Spec, table_ref, program, row, col, update, carry):
    """Skips a tile the visibility table marks as fully masked (no table: always computes)."""
    if table_ref is None:
        return update(carry)
    return lax.cond(_table_entry(spec, table_ref, program, row, col) != 0, update, lambda c: c, carry)


def _slice_cols(ref, full: bool, start, size):
    """A ``[rows, size]`` slice of a ``[rows, S]`` ref, or the whole ``[rows, 1]`` ref when broadcast."""
    return ref[:, pl.ds(start, size)] if full else ref[...]


def _row_tile(spec: _Spec, kv_refs, q, q_seg, row_start, j, bk: int, position_mask: bool, mod=None,
              mod_derivative: bool = False):
    """kv tile ``j`` of a q-row program (forward, dq): ``(s, tanh_s, k, v, start)``, the tile's masked logits
    (``_tile_logits``), its k and v slices and its first key; with ``mod_derivative`` also ``d mod / d s``."""
    k_ref, v_ref, bias_ref, mask_ref, kv_seg_ref = kv_refs
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    logits = _tile_logits(
        spec, q, k, row_start=row_start, col_start=start,
        bias=None if bias_ref is None else _slice_cols(bias_ref, spec.bias_full[3], start, bk),
        mask=None if mask_ref is None else _slice_cols(mask_ref, spec.mask_full[3], start, bk),
        q_seg=q_seg, kv_seg=kv_seg_ref[:, pl.ds(start, bk)] if spec.segments else None,
        position_mask=position_mask, mod=mod, mod_derivative=mod_derivative)
    return (*logits[:2], k, v, start, *logits[2:])


# ----------------------------------------------------------------------------------------------
# Forward.
# ----------------------------------------------------------------------------------------------

def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, mask_ref, q_seg_ref, kv_seg_ref, table_ref, *refs,
                    spec: _Spec):
    out_ref, lse_ref = refs[-2:]
    bq, bk = spec.blocks.block_q, spec.blocks.block_k
    q_block = pl.program_id(0)
    program = (pl.program_id(1), pl.program_id(2))
    mod = (refs[:len(spec.mod_shapes)], *program)
    q = q_ref[...]
    q_seg = q_seg_ref[...] if spec.segments else None
    kv_refs = (k_ref, v_ref, bias_ref, mask_ref, kv_seg_ref)

    def body(j, carry, position_mask):
        def update(carry):
            s, _, _, v, _ = _row_tile(spec, kv_refs, q, q_seg, q_block * bq, j, bk, position_mask, mod)
            return common.online_softmax_step(*carry, s, v)
        return _skip_invisible(spec, table_ref, program, q_block, j, update, carry)

    init = (jnp.full((bq, 1), MASK_VALUE, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, spec.D), jnp.float32))
    m, l, acc = _loop_tiles(_kv_ranges(spec, q_block, bq, bk), body, init,
                            position_masked=spec.position_masked)
    # A row that never met a visible key (its l and acc count exp(0) = 1 terms of masked entries) gives 0, -inf.
    out, lse = common.finalize_rows(m, l, acc)
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse


def _broadcast_spec(full, block_shape, full_index):
    """BlockSpec for a bias/mask-like array whose dims are 1 or full: broadcast dims read index 0."""
    shape = tuple(b if (f or b is None) else 1 for f, b in zip(full, block_shape))

    def index_map(*grid_idx):
        idx = full_index(*grid_idx)
        return tuple(i if f else 0 for f, i in zip(full, idx))
    return pl.BlockSpec(shape, index_map)


def _table_spec(spec: _Spec, rows: int, cols: int, head_block):
    """The visibility table: SMEM on TPU, else the ``[rows, cols]`` slab of this program's (b, head)."""
    if spec.target == "mosaic":
        return common.smem_spec()
    full_b, full_h = spec.table_full
    return pl.BlockSpec((None, None, rows, cols),
                        lambda i, b, h: (b if full_b else 0, h if full_h else 0, 0, 0)) if head_block is None \
        else pl.BlockSpec((None, head_block, rows, cols),
                          lambda i, b, h: (b if full_b else 0, h if full_h else 0, 0, 0))


def _const_specs(spec: _Spec) -> list:
    return score_mod_lib.const_specs(spec.target, spec.mod_shapes, spec.mod_scalar)


def _q_row_specs(spec: _Spec, bq: int, bk: int, *, bias, mask, q_seg, kv_seg, table):
    """``in_specs`` of ``(q, k, v, bias, mask, q_seg, kv_seg, table)`` for a q-row kernel (forward, dq) on the
    grid ``(q blocks, B, H)``: one q tile, the head's whole K/V, the bias/mask rows of the tile."""
    rows = lambda i, b, h: (b, h, i, 0)  # noqa: E731
    kv_index = lambda i, b, h: (b, common.trunc_div(h, spec.group), 0, 0)  # noqa: E731
    return [
        pl.BlockSpec((None, None, bq, spec.D), rows),
        pl.BlockSpec((None, None, spec.S_pad, spec.D), kv_index),
        pl.BlockSpec((None, None, spec.S_pad, spec.D), kv_index),
        None if bias is None else _broadcast_spec(spec.bias_full, (None, None, bq, spec.S_pad), rows),
        None if mask is None else _broadcast_spec(spec.mask_full, (None, None, bq, spec.S_pad), rows),
        None if q_seg is None else pl.BlockSpec((None, bq, 1), lambda i, b, h: (b, i, 0)),
        None if kv_seg is None else pl.BlockSpec((None, 1, spec.S_pad), lambda i, b, h: (b, 0, 0)),
        None if table is None else _table_spec(spec, spec.T_pad // bq, spec.S_pad // bk, None),
    ]


def _call(kernel, spec: _Spec, *, grid, inputs, in_specs, out_shapes, out_specs, name, warps):
    semantics = ("parallel",) * len(grid)
    return common.pallas_call(
        kernel, out_shape=out_shapes, target=spec.target, interpret=spec.interpret, name=name, grid=grid,
        in_specs=in_specs, out_specs=out_specs, poison_outputs=spec.poison_outputs, num_warps=warps,
        dimension_semantics=semantics)(*inputs)


def _forward(spec: _Spec, q, k, v, bias, mask, q_seg, kv_seg, consts=()):
    """Padded head-major forward: ``out [B, H, T_pad, D]``, ``lse [B, H, T_pad, 1]`` (float32)."""
    bq, bk = spec.blocks.block_q, spec.blocks.block_k
    table = _visibility_table(spec, mask, q_seg, kv_seg, bq, bk)
    in_specs = _q_row_specs(spec, bq, bk, bias=bias, mask=mask, q_seg=q_seg, kv_seg=kv_seg, table=table)
    in_specs += _const_specs(spec)
    out_shapes = [jax.ShapeDtypeStruct((spec.B, spec.H, spec.T_pad, spec.D), q.dtype),
                  jax.ShapeDtypeStruct((spec.B, spec.H, spec.T_pad, 1), jnp.float32)]
    out_specs = [pl.BlockSpec((None, None, bq, spec.D), lambda i, b, h: (b, h, i, 0)),
                 pl.BlockSpec((None, None, bq, 1), lambda i, b, h: (b, h, i, 0))]
    return _call(functools.partial(_forward_kernel, spec=spec), spec, grid=(spec.T_pad // bq, spec.B, spec.H),
                 inputs=[q, k, v, bias, mask, q_seg, kv_seg, table, *consts], in_specs=in_specs,
                 out_shapes=out_shapes, out_specs=out_specs, name="jattn_flash_forward",
                 warps=4 if spec.D <= 64 else 8)


def _visibility_table(spec: _Spec, mask, q_seg, kv_seg, bq: int, bk: int):
    """int32 ``[Bt, Ht, nq, nk]``: 1 where a (q block, kv block) tile may hold a visible entry.

    From the mask: exact ("any True in the tile"). From segment ids: the id ranges of the two blocks
    overlap (exact for sorted ids, conservative otherwise). None when neither is given.
    """
    if not spec.has_table:
        return None
    nq, nk = spec.T_pad // bq, spec.S_pad // bk
    table = common.visible_tiles(mask, None if q_seg is None else q_seg.reshape(spec.B, spec.T_pad),
                                 None if kv_seg is None else kv_seg.reshape(spec.B, spec.S_pad), block_q=bq,
                                 block_k=bk, num_q_blocks=nq, num_k_blocks=nk)
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
    bq, bk = spec.blocks.block_q_dq, spec.blocks.block_k_dq
    q_block = pl.program_id(0)
    program = (pl.program_id(1), pl.program_id(2))
    mod = (refs[:len(spec.mod_shapes)], *program)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_seg = q_seg_ref[...] if spec.segments else None
    kv_refs = (k_ref, v_ref, bias_ref, mask_ref, kv_seg_ref)

    def body(j, dq, position_mask):
        def update(dq):
            s, tanh_s, k, v, start, *d_mod = _row_tile(spec, kv_refs, q, q_seg, q_block * bq, j, bk, position_mask,
                                                       mod, mod_derivative=spec.score_mod is not None)
            p = jnp.exp(s - lse)
            dp = common.dot_nt(do, v)
            ds = p * (dp - delta)
            if write_ds:  # w.r.t. the final logits (after the bias and the score mod)
                ds_ref[:, pl.ds(start, bk)] = ds
            if d_mod:
                ds = ds * d_mod[0]
            if tanh_s is not None:
                ds = ds * (1.0 - tanh_s * tanh_s)
            return dq + common.dot_nn(ds.astype(k.dtype), k)
        return _skip_invisible(spec, table_ref, program, q_block, j, update, dq)

    ranges = _kv_ranges(spec, q_block, bq, bk, cover_all=write_ds)
    dq = _loop_tiles(ranges, body, jnp.zeros((bq, spec.D), jnp.float32), position_masked=spec.position_masked)
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, bias_ref, mask_ref, q_seg_ref, kv_seg_ref, table_ref,
                do_ref, lse_ref, delta_ref, *refs, spec: _Spec):
    dk_ref, dv_ref = refs[-2:]
    const_refs = refs[:len(spec.mod_shapes)]
    bq, bk = spec.blocks.block_q_dkv, spec.blocks.block_k_dkv
    kv_block = pl.program_id(0)
    b_id, kv_head = pl.program_id(1), pl.program_id(2)
    k = k_ref[...]
    v = v_ref[...]
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
                q = q_ref[g, pl.ds(start, bq), :]
                do = do_ref[g, pl.ds(start, bq), :]
                lse = lse_ref[g, pl.ds(start, bq), :]
                delta = delta_ref[g, pl.ds(start, bq), :]
                s, tanh_s, *d_mod = _tile_logits(
                    spec, q, k, row_start=start, col_start=kv_block * bk,
                    mod=(const_refs, b_id, kv_head * spec.group + g), mod_derivative=spec.score_mod is not None,
                    bias=None if bias_ref is None else rows_of(
                        bias_ref, spec.bias_full[2], g if spec.bias_full[1] else 0, start),
                    mask=None if mask_ref is None else rows_of(
                        mask_ref, spec.mask_full[2], g if spec.mask_full[1] else 0, start),
                    q_seg=q_seg_ref[pl.ds(start, bq), :] if spec.segments else None, kv_seg=kv_seg,
                    position_mask=position_mask)
                p = jnp.exp(s - lse)
                dv = dv + common.dot_tn(p.astype(do.dtype), do)
                dp = common.dot_nt(do, v)
                ds = p * (dp - delta)
                if d_mod:
                    ds = ds * d_mod[0]
                if tanh_s is not None:
                    ds = ds * (1.0 - tanh_s * tanh_s)
                dk = dk + common.dot_tn(ds.astype(q.dtype), q)
                return dk, dv
            if table_ref is None:
                return update(carry)
            if spec.target == "mosaic":
                b, h = b_id, kv_head * spec.group + g
                full_b, full_h = spec.table_full
                entry = table_ref[b if full_b else 0, h if full_h else 0, i, kv_block]
            else:
                entry = table_ref[g if spec.table_full[1] else 0, i, kv_block]
            return lax.cond(entry != 0, update, lambda c: c, carry)
        return _loop_tiles(ranges, body, carry, position_masked=spec.position_masked)

    zeros = jnp.zeros((bk, spec.D), jnp.float32)
    dk, dv = lax.fori_loop(0, spec.group, per_head, (zeros, zeros))
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(spec: _Spec, needs, residuals, d_out, d_lse):
    """Cotangents ``(dq, dk, dv, dbias, dconsts)`` of the padded head-major inputs; ``needs`` = (q, kv, bias,
    per score-mod array) flags."""
    q, k, v, bias, mask, q_seg, kv_seg, consts, out, lse = residuals
    need_dq, need_dkv, need_dbias, need_dconsts = needs
    write_ds = need_dbias or any(need_dconsts)
    blocks, G = spec.blocks, spec.group
    # d lse_i / d s_ij = p_ij, so an lse cotangent just shifts delta.
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1, keepdims=True) - d_lse
    # Rows with no visible key have lse = -inf; +inf makes every exp(s - lse) exactly 0 there.
    lse_safe = jnp.where(jnp.isneginf(lse), jnp.inf, lse)
    dq = dk = dv = dbias = None
    dconsts = tuple(None for _ in consts)

    if need_dq or write_ds:
        bq, bk = blocks.block_q_dq, blocks.block_k_dq
        table = None if write_ds else _visibility_table(spec, mask, q_seg, kv_seg, bq, bk)
        row_spec = pl.BlockSpec((None, None, bq, 1), lambda i, b, h: (b, h, i, 0))
        tile_spec = pl.BlockSpec((None, None, bq, spec.D), lambda i, b, h: (b, h, i, 0))
        in_specs = [*_q_row_specs(spec, bq, bk, bias=bias, mask=mask, q_seg=q_seg, kv_seg=kv_seg, table=table),
                    tile_spec, row_spec, row_spec, *_const_specs(spec)]
        out_shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
        out_specs = [tile_spec]
        if write_ds:
            out_shapes.append(jax.ShapeDtypeStruct((spec.B, spec.H, spec.T_pad, spec.S_pad), jnp.float32))
            out_specs.append(pl.BlockSpec((None, None, bq, spec.S_pad), lambda i, b, h: (b, h, i, 0)))
        results = _call(
            functools.partial(_dq_kernel, spec=spec, write_ds=write_ds), spec,
            grid=(spec.T_pad // bq, spec.B, spec.H),
            inputs=[q, k, v, bias, mask, q_seg, kv_seg, table, d_out, lse_safe, delta, *consts],
            in_specs=in_specs, out_shapes=out_shapes, out_specs=out_specs, name="jattn_flash_dq",
            warps=4 if bq * bk < 128 * 128 else 8)
        dq = results[0] if need_dq else None
        ds = results[1] if write_ds else None
        if spec.score_mod is not None and write_ds:
            ds, dconsts = _score_mod_backward(spec, q, k, bias, consts, need_dconsts, ds)
        if need_dbias:
            reduce_axes = tuple(a for a, full in enumerate(spec.bias_full) if not full)
            dbias = jnp.sum(ds, axis=reduce_axes, keepdims=True).astype(bias.dtype)

    if need_dkv:
        bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
        table = _visibility_table(spec, mask, q_seg, kv_seg, bq, bk)
        group_spec = lambda last: pl.BlockSpec((None, G, spec.T_pad, last), lambda j, b, h: (b, h, 0, 0))  # noqa: E731
        kv_tile = pl.BlockSpec((None, None, bk, spec.D), lambda j, b, h: (b, h, j, 0))
        if table is not None and spec.target != "mosaic":
            full_b, full_h = spec.table_full
            table_spec = pl.BlockSpec((None, G if full_h else 1, spec.T_pad // bq, spec.S_pad // bk),
                                      lambda j, b, h: (b if full_b else 0, h if full_h else 0, 0, 0))
        else:
            table_spec = None if table is None else common.smem_spec()
        in_specs = [
            group_spec(spec.D),
            kv_tile,
            kv_tile,
            None if bias is None else _broadcast_spec(spec.bias_full, (None, G, spec.T_pad, bk),
                                                      lambda j, b, h: (b, h, 0, j)),
            None if mask is None else _broadcast_spec(spec.mask_full, (None, G, spec.T_pad, bk),
                                                      lambda j, b, h: (b, h, 0, j)),
            None if q_seg is None else pl.BlockSpec((None, spec.T_pad, 1), lambda j, b, h: (b, 0, 0)),
            None if kv_seg is None else pl.BlockSpec((None, 1, bk), lambda j, b, h: (b, 0, j)),
            table_spec,
            group_spec(spec.D), group_spec(1), group_spec(1),
            *_const_specs(spec),
        ]
        out_shapes = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
        dk, dv = _call(
            functools.partial(_dkv_kernel, spec=spec), spec, grid=(spec.S_pad // bk, spec.B, spec.Hkv),
            inputs=[q, k, v, bias, mask, q_seg, kv_seg, table, d_out, lse_safe, delta, *consts],
            in_specs=in_specs, out_shapes=out_shapes, out_specs=[kv_tile, kv_tile], name="jattn_flash_dkv",
            warps=4 if bq * bk < 128 * 128 else 8)
    return dq, dk, dv, dbias, dconsts


def _score_mod_backward(spec: _Spec, q, k, bias, consts, need_dconsts, ds_final):
    """From ``ds_final`` ``[B, H, T_pad, S_pad]`` (the gradient w.r.t. the logits after the score mod, written
    by the dq kernel), the gradient before the mod (the bias gradient) and the mod's array gradients.

    The mod's array gradients sum over every (query, key) entry, so this step is dense: it recomputes the
    logits ``[B, H, T_pad, S_pad]`` in XLA, as the bias gradient already costs a dense ``dS`` (the xla path
    needs neither). Only taken when the bias or a mod array is differentiated.
    """
    G = spec.group
    qg = q.astype(jnp.float32).reshape(spec.B, spec.Hkv, G, spec.T_pad, spec.D)
    s = jnp.einsum("bkgtd,bksd->bkgts", qg, k.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST).reshape(spec.B, spec.H, spec.T_pad, spec.S_pad) * spec.scale
    if spec.softcap is not None:
        s = spec.softcap * jnp.tanh(s / spec.softcap)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    real = [jnp.reshape(c[tuple(slice(0, d) for d in shape)], shape) if shape else jnp.reshape(c[(0,) * c.ndim], ())
            for c, shape in zip(consts, spec.mod_shapes)]
    positions = (jnp.arange(spec.B)[:, None, None, None], jnp.arange(spec.H)[None, :, None, None],
                 jnp.minimum(jnp.arange(spec.T_pad), spec.T - 1)[None, None, :, None],
                 jnp.minimum(jnp.arange(spec.S_pad), spec.S - 1)[None, None, None, :])
    wanted = [i for i, n in enumerate(need_dconsts) if n]

    def mod(s, chosen):
        arrays = list(real)
        for i, c in zip(wanted, chosen):
            arrays[i] = c
        return score_mod_lib.apply(spec.score_mod.jaxpr, arrays, s, *positions)
    _, vjp = jax.vjp(mod, s, [real[i] for i in wanted])
    ds, d_chosen = vjp(ds_final)
    dconsts = [None] * len(consts)
    for i, d in zip(wanted, d_chosen):  # back onto the padded array the kernel took
        shape = consts[i].shape
        d = jnp.reshape(d, (1,) * len(shape)) if not spec.mod_shapes[i] else d
        dconsts[i] = jnp.pad(d, [(0, n - m) for n, m in zip(shape, d.shape)]).astype(consts[i].dtype)
    return ds, tuple(dconsts)


# ----------------------------------------------------------------------------------------------
# custom_vjp over the padded head-major arrays (padding, transposes and slicing are differentiated by JAX).
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_padded(spec, q, k, v, bias, mask, q_seg, kv_seg, consts):
    return _forward(spec, q, k, v, bias, mask, q_seg, kv_seg, consts)


def _value(x):
    return None if x is None else x.value


def _perturbed(x) -> bool:
    return x is not None and bool(x.perturbed)


def _flash_padded_fwd(spec, q, k, v, bias, mask, q_seg, kv_seg, consts):
    # With symbolic_zeros, each array arrives as CustomVJPPrimal(value, perturbed); None stays None.
    values = [_value(x) for x in (q, k, v, bias, mask, q_seg, kv_seg)]
    const_values = tuple(_value(c) for c in consts)
    out, lse = _forward(spec, *values, const_values)
    needs = (_perturbed(q), _perturbed(k) or _perturbed(v), _perturbed(bias),
             *(_perturbed(c) and jnp.issubdtype(c.value.dtype, jnp.inexact) for c in consts))
    # The flags ride in the residuals' tree structure (None vs ()), which stays static under jit.
    markers = tuple(() if n else None for n in needs)
    return (out, lse), (markers, (*values, const_values, out, lse))


def _flash_padded_bwd(spec, residuals, cotangents):
    markers, arrays = residuals
    needs = tuple(m is not None for m in markers)
    needs = (*needs[:3], needs[3:])
    out, lse = arrays[-2:]
    d_out = common.zeros_if_symbolic(cotangents[0], out)
    d_lse = common.zeros_if_symbolic(cotangents[1], lse)
    dq, dk, dv, dbias, dconsts = _backward(spec, needs, arrays, d_out, d_lse)
    return dq, dk, dv, dbias, None, None, None, dconsts


_flash_padded.defvjp(_flash_padded_fwd, _flash_padded_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Problem:
    """The target-independent static description of a call (validated by the caller)."""
    B: int
    T: int
    S: int
    H: int
    Hkv: int
    D: int
    block_sizes: BlockSizes
    scale: float
    softcap: float | None
    causal: bool
    window: tuple[int, int] | None
    bias_full: tuple[bool, bool, bool, bool] | None
    mask_full: tuple[bool, bool, bool, bool] | None
    segments: bool
    poison_outputs: bool
    score_mod: object = None
    mod_shapes: tuple = ()
    mod_scalar: tuple = ()

    def spec(self, target: str, interpret: bool) -> _Spec:
        blocks = self.block_sizes.resolve(target).fit(self.T, self.S)
        q_blocks = (blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv)
        k_blocks = (blocks.block_k, blocks.block_k_dq, blocks.block_k_dkv)
        return _Spec(B=self.B, T=self.T, S=self.S, H=self.H, Hkv=self.Hkv, D=common.padded_head_dim(self.D),
                     T_pad=common.round_up(self.T, max(q_blocks)), S_pad=common.round_up(self.S, max(k_blocks)),
                     blocks=blocks, scale=self.scale, softcap=self.softcap, causal=self.causal,
                     window=self.window, bias_full=self.bias_full, mask_full=self.mask_full,
                     segments=self.segments, target=target, interpret=interpret,
                     poison_outputs=self.poison_outputs, score_mod=self.score_mod, mod_shapes=self.mod_shapes,
                     mod_scalar=self.mod_scalar)


def flash_attention(q: Float[Array, "B T H D"], k: Float[Array, "B S Hkv D"], v: Float[Array, "B S Hkv D"], *,
                    bias: Float[Array, "..."] | None = None, mask: Bool[Array, "..."] | None = None,
                    q_segment_ids: Int[Array, "B T"] | None = None, kv_segment_ids: Int[Array, "B S"] | None = None,
                    causal: bool = False, window: tuple[int, int] | None = None, scale: float,
                    softcap: float | None = None, score_mod=None, mod_consts: tuple = (),
                    block_sizes: BlockSizes | None = None, interpret=None,
                    poison_outputs: bool = False) -> tuple[Float[Array, "B T H D"], Float[Array, "B T H"]]:
    """Flash attention with the exact semantics of ``jattn.core.reference.reference_attention``.

    Inputs are validated by the caller (``jattn.attention``); this layer holds no policy. Sinks are not
    a kernel feature: merge them afterwards with ``jattn.core.softmax.merge_sinks`` (exact).

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, S, Hkv, D]`` with ``H % Hkv == 0`` (query head ``h`` reads kv head ``h // (H // Hkv)``).
      v: ``[B, S, Hkv, D]``.
      bias: float, broadcastable to ``[B, H, T, S]`` (each dim 1 or full); differentiable.
      mask: bool (True = attend), broadcastable to ``[B, H, T, S]``.
      q_segment_ids: int ``[B, T]``; give with ``kv_segment_ids``.
      kv_segment_ids: int ``[B, S]``; keys are visible only within the same segment.
      causal: key ``j`` visible to query ``i`` only if ``j <= i`` (top-left aligned).
      window: ``(left, right)``: keys ``i - left <= j <= i + right``.
      scale: logit scale.
      softcap: ``s = softcap * tanh(s / softcap)`` before the bias.
      score_mod: a traced score mod (``jattn.core.score_mod.trace_score_mod``) applied to each tile's logits
        after the bias, inside the kernels (``pallas_kernels.score_mod``).
      mod_consts: the arrays it closes over, kernel inputs; differentiable where float (that gradient, like
        the bias gradient, goes through one dense ``[B, H, T, S]`` step).
      block_sizes: ``BlockSizes`` of the forward, dq and dk/dv kernels (None: the target's defaults).
      interpret: None dispatches at lowering time (Triton / Mosaic / CPU interpreter); ``True`` or
        ``"triton"`` / ``"mosaic"`` run that structure in the interpreter (see ``pallas_kernels.common``).
      poison_outputs: NaN-fill every output buffer before the kernels run (tests: unwritten tiles show).

    Returns:
      ``out [B, T, H, D]`` in q's dtype and ``lse [B, T, H]`` in float32. A row with no visible key
      gives ``out = 0`` and ``lse = -inf``, never NaN, and finite gradients.

    Raises:
      ValueError: ``interpret`` is not one of its choices; a block size is not a power of two >= 16
        (raised by ``BlockSizes``). A block size Mosaic cannot take raises only when lowered for TPU.
    """
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    problem = _Problem(
        B=B, T=T, S=S, H=H, Hkv=Hkv, D=D, block_sizes=block_sizes or BlockSizes(), scale=float(scale),
        softcap=None if softcap is None else float(softcap), causal=bool(causal),
        window=None if window is None else tuple(int(w) for w in window),
        bias_full=None if bias is None else tuple(d != 1 for d in common.as_4d(bias).shape),
        mask_full=None if mask is None else tuple(d != 1 for d in common.as_4d(mask).shape),
        segments=q_segment_ids is not None, poison_outputs=bool(poison_outputs), score_mod=score_mod,
        mod_shapes=tuple(tuple(c.shape) for c in mod_consts),
        mod_scalar=() if score_mod is None else score_mod_lib.scalar_only_consts(score_mod.jaxpr))
    return _flash(problem, common.check_interpret(interpret), q, k, v, bias, mask, q_segment_ids,
                  kv_segment_ids, tuple(mod_consts))


def _pad_inputs(spec: _Spec, q, k, v, bias, mask, q_seg, kv_seg):
    """Pads and transposes every operand to the kernels' head-major block grid.

    Zeros for q/k/v/bias; False for the mask (int8: bool refs do not lower everywhere); segment ids repeat
    their edge value. q_seg becomes a ``[B, T_pad, 1]`` column, kv_seg a ``[B, 1, S_pad]`` row.
    """
    def heads_first(x, length):
        return jnp.swapaxes(common.pad_axis(common.pad_axis(x, 1, length), 3, spec.D), 1, 2)

    q, k, v = heads_first(q, spec.T_pad), heads_first(k, spec.S_pad), heads_first(v, spec.S_pad)

    def pad_ts(x, full, value):
        x = common.as_4d(x)
        if full[2]:
            x = common.pad_axis(x, 2, spec.T_pad, value)
        if full[3]:
            x = common.pad_axis(x, 3, spec.S_pad, value)
        return x

    if bias is not None:
        bias = pad_ts(bias, spec.bias_full, 0)
    if mask is not None:
        mask = pad_ts(mask.astype(jnp.int8), spec.mask_full, 0)
    if q_seg is not None:
        q_seg = jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, spec.T_pad - spec.T)), mode="edge")[:, :, None]
        kv_seg = jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, spec.S_pad - spec.S)), mode="edge")[:, None, :]
    return q, k, v, bias, mask, q_seg, kv_seg


def _run_on_target(problem: _Problem, target: str, interpret: bool):
    spec = problem.spec(target, interpret)
    problem_text = tpu_block_problem(spec)

    def run(q, k, v, bias, mask, q_seg, kv_seg, consts):
        if problem_text is not None:
            out_shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                          jax.ShapeDtypeStruct((spec.B, spec.T, spec.H), jnp.float32)]
            return tuple(common.unsupported_on_target(problem_text, out_shapes)(q, k, v, bias))
        padded = _pad_inputs(spec, q, k, v, bias, mask, q_seg, kv_seg)
        consts = tuple(score_mod_lib.pad_const(spec.target, c) for c in consts)
        out, lse = _flash_padded(spec, *padded, consts)
        out = jnp.swapaxes(out[:, :, :spec.T, :q.shape[3]], 1, 2)
        lse = jnp.swapaxes(lse[:, :, :spec.T, 0], 1, 2)
        return out, lse
    return run


@functools.partial(jax.jit, static_argnums=(0, 1))
def _flash(problem: _Problem, interpret, q, k, v, bias, mask, q_seg, kv_seg, consts):
    return common.dispatch(lambda target, interpret: _run_on_target(problem, target, interpret),
                           q, k, v, bias, mask, q_seg, kv_seg, consts, interpret=interpret)
