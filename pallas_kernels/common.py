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
