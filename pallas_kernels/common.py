"""Shared helpers for the Pallas kernels: JAX version shims, backend dispatch, block-size rules, padding,
and the softmax math every attention path shares.

Everything that depends on which JAX release is installed lives here, so the kernels themselves use
only APIs that exist on every supported release (``pl.pallas_call``, ``pl.BlockSpec``, ``pl.ds``,
``pl.program_id``, ``lax.fori_loop``, ``lax.cond``, ``lax.dot_general``). Kernels import nothing from
``jattn``: what they share with the library is defined here and imported by ``jattn``: ``MASK_VALUE``,
the online-softmax step and finalisation (``online_softmax_step``, ``finalize_rows``, ``is_unseen``), the
causal/window tile ranges (``tile_ranges``) and the mask/segment tile table (``visible_tiles``).

Backend dispatch (``dispatch``). A kernel is written once as a ``build(target)`` function that returns
the traced call for one *target*:

* ``"triton"``: the GPU structure (loops over tiles inside a program; tile tables are kernel inputs)
  with Triton compiler parameters;
* ``"mosaic"``: the TPU structure (tile tables in SMEM / scalar prefetch, TPU tiling rules) with
  Mosaic compiler parameters.

``dispatch`` stages every target with ``jax.lax.platform_dependent``, so the choice is made when the
program is *lowered*: one trace lowers to Triton for ``cuda``/``rocm``, to Mosaic for ``tpu``, and to the
Pallas interpreter (running the GPU structure) for ``cpu``. ``jax.export(..., platforms=["cuda"])``
from a CPU host therefore holds the real kernel. ``interpret`` overrides this for tests:

* ``None`` (default): dispatch at lowering time as above;
* ``True`` or ``"triton"``: run the GPU structure in the interpreter on every platform;
* ``"mosaic"``: run the TPU structure in the interpreter (how CPU tests check the TPU variant).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

# Smallest tile edge that a tensor-core dot accepts (Triton on GPU, Mosaic on TPU).
MIN_DOT_DIM = 16
# TPU vector registers are (8 sublanes, 128 lanes): a block's last dim is a multiple of 128 or whole.
TPU_LANES = 128
# A finite stand-in for -inf inside kernels (exp underflows to exactly 0, no inf - inf = NaN).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

TARGETS = ("triton", "mosaic")
INTERPRET_CHOICES = (None, True, "triton", "mosaic")


def check_interpret(interpret):
    """Normalises the ``interpret`` flag of every kernel (see the module docstring)."""
    if interpret is False:
        return None
    if not any(interpret is c or (isinstance(c, str) and interpret == c) for c in INTERPRET_CHOICES):
        raise ValueError(f"interpret must be one of None, True, 'triton', 'mosaic', got {interpret!r}")
    return "triton" if interpret is True else interpret


def dispatch(build: Callable[..., Callable], *args, interpret=None):
    """Runs ``build(target, interpret=...)(*args)`` for the platform the program is lowered for.

    ``build(target, interpret)`` returns a callable over ``args`` (pytrees of arrays); every target's
    callable must return the same shapes and dtypes.
    """
    forced = check_interpret(interpret)
    if forced is not None:
        return build(forced, interpret=True)(*args)
    gpu, tpu = build("triton", interpret=False), build("mosaic", interpret=False)
    return lax.platform_dependent(*args, cpu=build("triton", interpret=True), cuda=gpu, rocm=gpu, tpu=tpu)


def compiler_params(target: str, *, interpret: bool, num_warps: int = 4, num_stages: int = 2,
                    dimension_semantics=None):
    """Compiler parameters for ``target``, or None in interpret mode.

    Triton's class was ``TritonCompilerParams`` in older releases and Mosaic's ``TPUCompilerParams``; both
    are ``CompilerParams`` now. Passing Triton parameters explicitly matters: with none, current JAX
    lowers a GPU ``pallas_call`` with Mosaic GPU.
    """
    if interpret:
        return None
    if target == "triton":
        from jax.experimental.pallas import triton as pltriton
        cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
        return cls(num_warps=num_warps, num_stages=num_stages)
    if target == "mosaic":
        from jax.experimental.pallas import tpu as pltpu
        cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
        return cls(dimension_semantics=None if dimension_semantics is None else tuple(dimension_semantics))
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


def zeros_if_symbolic(ct, like):
    """A ``custom_vjp(symbolic_zeros=True)`` cotangent as an array: a symbolic zero (or None) becomes zeros
    shaped like ``like``."""
    if ct is None or isinstance(ct, jax.custom_derivatives.SymbolicZero):
        return jnp.zeros(like.shape, like.dtype)
    return ct


def smem_spec():
    """A whole-array input placed in TPU scalar memory (scalars read with dynamic indices)."""
    return pl.BlockSpec(memory_space=_tpu_memory_space("SMEM"))


def _tpu_memory_space(name: str):
    from jax.experimental.pallas import tpu as pltpu
    space = getattr(pltpu, name, None)
    if space is None:  # pragma: no cover - older releases spelt it pltpu.TPUMemorySpace.SMEM
        space = getattr(pltpu.TPUMemorySpace, name)
    return space


def vmem_scratch(shape, dtype):
    """A TPU VMEM scratch buffer (persists across the sequential grid steps of one program)."""
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.VMEM(tuple(shape), dtype)


def pallas_call(kernel, *, out_shape, target: str, interpret: bool, name: str, grid, in_specs, out_specs,
                poison_outputs: bool = False, num_warps: int = 4, num_stages: int = 2,
                dimension_semantics=None, num_scalar_prefetch: int = 0, scratch_shapes=()):
    """``pl.pallas_call`` with the target's compiler parameters and optional NaN-poisoned outputs.

    Returns a callable over the inputs; a None input (an absent feature) has a None ``in_specs`` entry and
    reaches the kernel as a None ref. The first ``num_scalar_prefetch`` inputs are scalar-prefetched (TPU: SMEM, passed
    to every index map and to the kernel first) and have no ``in_specs`` entry. ``poison_outputs`` fills
    every output buffer with NaN and aliases it to the output, so a kernel that misses a tile leaves NaN
    behind (tests); the kernel receives those refs between its inputs and outputs and never reads them.
    """
    out_shape, out_specs = list(out_shape), list(out_specs)

    def call(*inputs):
        arrays, specs = list(inputs), list(in_specs)
        aliases = {}
        if poison_outputs:
            flat = sum(x is not None for x in arrays)  # aliases count flattened inputs; None is no input
            aliases = {flat + n: n for n in range(len(out_shape))}
            arrays += [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shape]
            specs += out_specs
        params = compiler_params(target, interpret=interpret, num_warps=num_warps, num_stages=num_stages,
                                 dimension_semantics=dimension_semantics)
        if num_scalar_prefetch or scratch_shapes:
            from jax.experimental.pallas import tpu as pltpu
            layout = dict(grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=num_scalar_prefetch, grid=grid, in_specs=specs, out_specs=out_specs,
                scratch_shapes=tuple(scratch_shapes)))
        else:
            layout = dict(grid=grid, in_specs=specs, out_specs=out_specs)
        return pl.pallas_call(kernel, out_shape=out_shape, input_output_aliases=aliases, interpret=interpret,
                              name=name, compiler_params=params, **layout)(*arrays)
    return call


def check_hardware_block(name: str, value) -> int:
    """A kernel block size: an int that is a power of two and >= 16, as real hardware requires.

    Interpret mode would accept any size; checking anyway keeps CPU tests honest about GPU/TPU.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int (a power of two >= {MIN_DOT_DIM}), got {value!r}")
    value = int(value)
    if value < MIN_DOT_DIM or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {MIN_DOT_DIM}, got {value}")
    return value


def next_power_of_two(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def fit_block(block: int, length: int) -> int:
    """Shrinks a block to the smallest hardware-legal power of two that still covers ``length``."""
    return min(block, max(MIN_DOT_DIM, next_power_of_two(length)))


def padded_head_dim(d: int) -> int:
    """Head dims are zero-padded to a power of two >= 16 (exact: zero features add nothing to q.k)."""
    return max(MIN_DOT_DIM, next_power_of_two(d))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_axis(x, axis: int, new_length: int, value=0, *, keep_broadcast: bool = False):
    """Pads ``x`` at the end of ``axis`` to ``new_length`` with ``value`` (no-op when already there).

    ``keep_broadcast``: a length-1 ``axis`` (a broadcast operand such as a ``[B, 1, 1, S]`` bias) stays as it is.
    """
    if keep_broadcast and x.shape[axis] == 1:
        return x
    extra = new_length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def as_4d(x):
    """A bias/mask broadcastable to ``[B, H, T, S]`` with its missing leading dims made explicit (size 1)."""
    return x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))


def trunc_div(a, b: int):
    """``a // b`` for a non-negative ``a``; on traced ints it is ``lax.div`` (truncating), which lowers
    everywhere, where ``//`` emits floor-correction ops that the Triton lowering has rejected on
    program ids."""
    return a // b if isinstance(a, int) else lax.div(a, jnp.asarray(b, a.dtype))


# ----------------------------------------------------------------------------------------------
# Tile ranges under a causal / sliding-window mask.
# ----------------------------------------------------------------------------------------------

def position_band(causal: bool, window) -> tuple[int | None, int | None]:
    """Offsets ``(lo, hi)``: key ``j`` is visible from query ``i`` iff ``lo <= j - i <= hi``.

    ``None`` is an open end. ``causal`` caps ``hi`` at 0; ``window=(left, right)`` gives
    ``[-left, right]``.
    """
    lo, hi = None, (0 if causal else None)
    if window is not None:
        left, right = window
        lo, hi = -left, (right if hi is None else min(hi, right))
    return lo, hi


def tile_ranges(block_index, *, over: str, causal: bool, window, block_q: int, block_k: int, seq_q: int,
                seq_k: int, num_blocks: int):
    """Which blocks one block meets under a causal/window mask: ``(lo, full_lo, full_hi, hi)``.

    ``over="kv"``: ``block_index`` is a query block and the indices are kv blocks (the forward and dq
    loops). ``over="q"``: ``block_index`` is a kv block and the indices are query blocks (the dk/dv
    loop); it is the same computation with queries and keys swapped.

    Blocks in ``[lo, hi)`` hold at least one visible (query, key) pair and every other block holds
    none, so a loop over ``[lo, hi)`` skips exactly the empty tiles. Blocks in ``[full_lo, full_hi)``
    are visible in every element, so they need no position mask; the rest of ``[lo, hi)`` does.
    ``lo <= full_lo <= full_hi <= hi <= num_blocks``; when nothing is visible all four are equal.

    Padding: a tile holding padded keys (past ``seq_k``) is never full, as padded keys must be masked.
    Padded query rows are discarded, so on the kv side they are ignored; on the q side a q block that
    holds padded rows is reported partial (conservative). ``num_blocks`` may exceed the blocks the
    sequence needs (a length padded further for another block size); those blocks are never visited.
    ``block_index`` may be a traced integer scalar (a program id, a loop index) or a Python int; every
    other argument is static.
    """
    if over == "kv":
        row_block, row_length, col_block, col_length = block_q, seq_q, block_k, seq_k
        band_lo, band_hi = position_band(causal, window)
    elif over == "q":
        row_block, row_length, col_block, col_length = block_k, seq_k, block_q, seq_q
        key_lo, key_hi = position_band(causal, window)       # of key - query; this side needs query - key
        band_lo, band_hi = (None if key_hi is None else -key_hi), (None if key_lo is None else -key_lo)
    else:
        raise ValueError(f"over must be 'kv' (ranges of kv blocks) or 'q' (ranges of q blocks), got {over!r}")

    first = block_index * row_block
    last = jnp.minimum(first + row_block - 1, row_length - 1)
    # Columns some row of the block sees ([vis_lo, vis_hi]) and columns every row sees ([full_lo, full_hi]).
    vis_lo, vis_hi = jnp.int32(0), jnp.int32(col_length - 1)
    full_lo, full_hi = jnp.int32(0), jnp.int32(col_length - 1)
    if band_lo is not None:
        vis_lo = jnp.maximum(vis_lo, first + band_lo)
        full_lo = jnp.maximum(full_lo, last + band_lo)
    if band_hi is not None:
        vis_hi = jnp.minimum(vis_hi, last + band_hi)
        full_hi = jnp.minimum(full_hi, first + band_hi)
    if over == "q":  # rows are keys here: a block holding padded keys must be masked throughout
        full_hi = jnp.where(first + row_block > row_length, -1, full_hi)
    return _runs_of_blocks(col_block, num_blocks, vis_lo, vis_hi, full_lo, full_hi)


def _runs_of_blocks(block: int, num_blocks: int, vis_lo, vis_hi, full_lo, full_hi):
    """Position bounds -> block indices ``lo <= full_lo <= full_hi <= hi``.

    ``[vis_lo, vis_hi]`` (inclusive) becomes the blocks it touches, ``[full_lo, full_hi]`` the blocks it
    covers whole; an empty interval (``vis_hi < vis_lo``) becomes an empty run. Negative numerators of
    the truncating divisions only occur where the clip to ``[lo, hi]`` overrides them.
    """
    lo = trunc_div(vis_lo, block)
    hi = jnp.where(vis_hi >= vis_lo, trunc_div(vis_hi, block) + 1, lo)
    hi = jnp.minimum(hi, num_blocks)
    lo = jnp.minimum(lo, hi)
    covered_lo = _clip(trunc_div(full_lo + block - 1, block), lo, hi)
    covered_hi = _clip(trunc_div(full_hi + 1, block), covered_lo, hi)
    return lo, covered_lo, covered_hi, hi


def _clip(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


def dot_nt(a, b):
    """``a @ b.T`` with float32 accumulation (``pl.dot`` is gone in newer JAX; dot_general lowers everywhere)."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a, b):
    """``a @ b`` with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a, b):
    """``a.T @ b`` with float32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def scaled_logits(q, k, scale: float, softcap: float | None):
    """float32 ``softcap * tanh(q k^T scale / softcap)`` of one tile (plain ``q k^T scale`` without a softcap),
    and the ``tanh`` the softcap's backward needs (None without one)."""
    s = dot_nt(q, k) * scale
    if softcap is None:
        return s, None
    t = jnp.tanh(s / softcap)
    return softcap * t, t


# ----------------------------------------------------------------------------------------------
# The online softmax: the one home of the running max / denominator / accumulator update and of the
# final normalisation. Pure jnp, so the same functions run inside the Pallas kernels (Triton loop carry
# and Mosaic VMEM scratch), in the pure-JAX paths and in ``jattn.core.softmax.OnlineSoftmax``.
# ----------------------------------------------------------------------------------------------

def _rows_as(x, like):
    """Row statistics ``[..., rows]`` broadcast against ``like`` (``[..., rows, n]``); columns pass through."""
    return x if x.ndim == like.ndim else x[..., None]


def online_softmax_step(m, l, acc, logits, v_tile, *, precision=None):
    """Folds one tile into a running row-wise softmax-weighted sum; returns the new ``(m, l, acc)``.

    Args:
      m: running row maxima, ``[..., rows, 1]`` (column form, as kernels keep them) or ``[..., rows]``;
        start at ``MASK_VALUE``.
      l: running denominators, the same shape as ``m``; start at 0.
      acc: running numerators ``[..., rows, E]`` float32; start at 0.
      logits: float32 ``[..., rows, cols]``, masked entries set to ``MASK_VALUE`` (or ``-inf``).
      v_tile: ``[..., cols, E]`` with ``logits``' leading dims; the probabilities are cast to its dtype for
        the ``p @ v`` dot (float32 accumulation).
      precision: ``lax.Precision`` of the ``p @ v`` dot (None: the default).

    Returns:
      ``(m, l, acc)`` after the tile: ``m' = max(m, rowmax)``, ``l' = l e^{m - m'} + sum e^{s - m'}``,
      ``acc' = acc e^{m - m'} + e^{s - m'} v``. A row that saw only masked entries keeps ``m`` at the mask
      value (see ``finalize_rows``); a NaN logit makes its row's ``l`` NaN.
    """
    keep = m.ndim == logits.ndim
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1, keepdims=keep))
    correction = jnp.exp(m - m_new)
    p = jnp.exp(logits - _rows_as(m_new, logits))
    l_new = l * correction + jnp.sum(p, axis=-1, keepdims=keep)
    batch = tuple(range(logits.ndim - 2))
    pv = lax.dot_general(p.astype(v_tile.dtype), v_tile, (((logits.ndim - 1,), (v_tile.ndim - 2,)), (batch, batch)),
                         precision=precision, preferred_element_type=jnp.float32)
    return m_new, l_new, acc * _rows_as(correction, acc) + pv


def is_unseen(m, l):
    """Rows whose running maximum never rose above the mask value saw no visible key.

    A NaN logit must give a NaN row, never a silent zero one: a max reduction may skip NaN (XLA's CPU
    vectorised max does), leaving ``m`` at the mask value, but then ``l`` holds ``exp(NaN)``, so a row
    with a NaN denominator is never "unseen".
    """
    return (m <= 0.5 * MASK_VALUE) & jnp.logical_not(jnp.isnan(l))


def finalize_rows(m, l, acc):
    """``(out, lse)`` of a finished running softmax (``online_softmax_step``'s state).

    Args:
      m: row maxima, ``[..., rows, 1]`` or ``[..., rows]``.
      l: row denominators, the shape of ``m``.
      acc: row numerators ``[..., rows, E]``.

    Returns:
      ``out = acc / l`` (``[..., rows, E]`` float32) and ``lse = m + log l`` (the shape of ``m``). A row is
      empty, giving ``out = 0`` and ``lse = -inf``, when its denominator is exactly 0 or it never met a
      visible key (``is_unseen``: its ``l`` then counts masked entries); a NaN row stays NaN.
    """
    empty = (l == 0) | is_unseen(m, l)
    safe_l = jnp.where(empty, 1.0, l)
    out = jnp.where(_rows_as(empty, acc), 0.0, acc / _rows_as(safe_l, acc))
    return out, jnp.where(empty, -jnp.inf, m + jnp.log(safe_l))


# ----------------------------------------------------------------------------------------------
# Which (q block, kv block) tiles a mask array or segment ids leave anything visible in.
# ----------------------------------------------------------------------------------------------

def visible_tiles(mask, q_segments, kv_segments, *, block_q: int, block_k: int, num_q_blocks: int,
                  num_k_blocks: int):
    """bool ``[Bt, Ht, num_q_blocks, num_k_blocks]``: False only where a tile holds no visible entry.

    Args:
      mask: None or ``[Bm, Hm, Tm, Sm]`` (bool or 0/1 ints), each of ``Tm``/``Sm`` 1 (broadcast) or padded
        to whole blocks. A tile is visible when any of its entries is (exact).
      q_segments: None or int ``[B, num_q_blocks * block_q]`` segment ids (padded); give with ``kv_segments``.
      kv_segments: int ``[B, num_k_blocks * block_k]``. A tile is visible when the id ranges of its query
        and key blocks overlap (exact for sorted ids, conservative otherwise).
      block_q: query tile.
      block_k: key tile.
      num_q_blocks: query tiles.
      num_k_blocks: key tiles.

    Returns:
      The table, ``Bt`` = ``Bm`` or ``B`` (1 when neither varies), ``Ht`` = ``Hm`` (1 without a mask); None
      when neither a mask nor segment ids are given.
    """
    nq, nk, bq, bk = num_q_blocks, num_k_blocks, block_q, block_k
    table = None
    if mask is not None:
        Bm, Hm, Tm, Sm = mask.shape
        tiles = mask.reshape(Bm, Hm, nq if Tm > 1 else 1, bq if Tm > 1 else 1, nk if Sm > 1 else 1,
                             bk if Sm > 1 else 1)
        table = jnp.any(tiles != 0, axis=(3, 5))
    if q_segments is not None:
        q_blocks = q_segments.reshape(q_segments.shape[0], nq, bq)
        kv_blocks = kv_segments.reshape(kv_segments.shape[0], nk, bk)
        q_min, q_max = q_blocks.min(-1), q_blocks.max(-1)
        kv_min, kv_max = kv_blocks.min(-1), kv_blocks.max(-1)
        overlap = ((q_min[:, :, None] <= kv_max[:, None, :]) & (kv_min[:, None, :] <= q_max[:, :, None]))[:, None]
        table = overlap if table is None else table & overlap
    if table is None:
        return None
    return jnp.broadcast_to(table, (*table.shape[:2], nq, nk))


# ----------------------------------------------------------------------------------------------
# A target that cannot take a configuration fails when (and only when) it is lowered for.
# ----------------------------------------------------------------------------------------------

def _make_unsupported_primitive():
    try:
        from jax.extend.core import Primitive
    except ImportError:  # pragma: no cover - older releases
        from jax.core import Primitive
    from jax.interpreters import ad, batching, mlir

    prim = Primitive("jattn_unsupported_on_target")
    prim.multiple_results = True

    def abstract_eval(*_, out_avals, message):
        return out_avals

    def lowering(ctx, *_, out_avals, message):
        raise ValueError(message)

    def batch(args, dims, *, out_avals, message):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not batching.not_mapped)
        batched = tuple(jax.core.ShapedArray((size, *a.shape), a.dtype) for a in out_avals)
        return prim.bind(*args, out_avals=batched, message=message), (0,) * len(batched)

    prim.def_abstract_eval(abstract_eval)
    prim.def_impl(lambda *a, out_avals, message: (_ for _ in ()).throw(ValueError(message)))
    mlir.register_lowering(prim, lowering)
    batching.primitive_batchers[prim] = batch

    def jvp(primals, tangents, *, out_avals, message):  # differentiable, so grad traces; lowering still fails
        outs = prim.bind(*primals, out_avals=out_avals, message=message)
        return outs, [ad.Zero(a.to_tangent_aval()) if hasattr(a, "to_tangent_aval") else jnp.zeros(a.shape, a.dtype)
                      for a in out_avals]

    ad.primitive_jvps[prim] = jvp
    return prim


_UNSUPPORTED = _make_unsupported_primitive()


def unsupported_on_target(message: str, out_shapes):
    """A stand-in for a kernel that this target cannot run with the given configuration.

    Tracing succeeds (so the other targets of a ``dispatch`` still work, e.g. a TPU-illegal tile size on a
    CPU or GPU run); lowering it raises ``ValueError(message)``.
    """
    out_avals = tuple(jax.core.ShapedArray(s.shape, s.dtype) for s in out_shapes)

    def call(*inputs):
        arrays = [x for x in jax.tree_util.tree_leaves(inputs)]
        return list(_UNSUPPORTED.bind(*arrays, out_avals=out_avals, message=message))
    return call
