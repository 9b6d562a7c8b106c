"""Shared helpers for the Pallas kernels: JAX version shims, hardware block-size rules and padding.

Everything that depends on which JAX release is installed lives here, so the kernels themselves use
only APIs that exist on every supported release (``pl.pallas_call``, ``pl.BlockSpec``, ``pl.ds``,
``pl.program_id``, ``lax.fori_loop``, ``lax.cond``, ``lax.dot_general``).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jattn.core import checks

# Smallest tile edge that a tensor-core dot accepts (Triton on GPU, Mosaic on TPU).
MIN_DOT_DIM = 16


def default_interpret() -> bool:
    """Pallas kernels run in interpret mode when the default backend is the CPU."""
    return jax.default_backend() == "cpu"


def resolve_interpret(interpret) -> bool:
    if interpret is None:
        return default_interpret()
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret must be None or a bool, got {interpret!r}")
    return interpret


def check_hardware_block(name: str, value) -> int:
    """A kernel block size: an int that is a power of two and >= 16, as real hardware requires.

    Interpret mode would accept any size; checking anyway keeps CPU tests honest about GPU/TPU.
    """
    if value is None:
        raise TypeError(f"{name} must be an int (a power of two >= {MIN_DOT_DIM}), got None")
    return checks.check_block_size(name, value, minimum=MIN_DOT_DIM)


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


def pad_axis(x, axis: int, new_length: int, value=0):
    """Pads ``x`` at the end of ``axis`` to ``new_length`` with ``value`` (no-op when already there)."""
    extra = new_length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


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


def gpu_compiler_params(*, interpret: bool, num_warps: int, num_stages: int):
    """Triton compiler parameters for a GPU run, or None (interpret mode, or a non-GPU backend).

    The class was ``TritonCompilerParams`` in older releases and ``CompilerParams`` in newer ones.
    """
    if interpret or jax.default_backend() != "gpu":
        return None
    try:
        from jax.experimental.pallas import triton as plgpu
    except ImportError:  # pragma: no cover - depends on the installed jaxlib
        return None
    params_cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
    if params_cls is None:  # pragma: no cover
        return None
    return params_cls(num_warps=num_warps, num_stages=num_stages)
