"""Mask functions ``mask_fn(b, h, q_idx, kv_idx) -> bool`` (True = attend) and their algebra.

Arguments are integer arrays that broadcast against each other, so one mask function serves a single
element, a tile inside a kernel and a dense ``[B, H, T, S]`` materialisation. Constructors return plain
Python closures; combine them with ``and_masks``, ``or_masks`` and ``not_mask``.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from jax import lax
import numpy as np

MaskFn = Callable[..., jnp.ndarray]


def _non_negative(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def index_div(a, b: int):
    """``a // b`` for non-negative integer indices ``a`` (arrays or ints).

    Mask functions run inside the kernels: on traced ints this is ``lax.div`` (truncating, equal to floor
    division for ``a >= 0``), which lowers on every target, where ``//`` adds sign corrections that the
    Mosaic TPU lowering cannot emit from a CPU host.
    """
    if isinstance(a, (int, np.integer)) or isinstance(a, np.ndarray):
        return a // b
    return lax.div(a, jnp.asarray(b, a.dtype))


def index_mod(a, b: int):
    """``a % b`` for non-negative integer indices ``a`` (see ``index_div``)."""
    if isinstance(a, (int, np.integer)) or isinstance(a, np.ndarray):
        return a % b
    return lax.rem(a, jnp.asarray(b, a.dtype))


def full_mask() -> MaskFn:
    """Every key is visible."""
    def mask_fn(b, h, q_idx, kv_idx):
        return jnp.ones(jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx)), bool)
    return mask_fn


def causal_mask(offset: int = 0) -> MaskFn:
    """Query ``i`` sees keys ``j <= i + offset`` (``offset = S - T`` aligns a suffix of queries)."""
    def mask_fn(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset
    return mask_fn


def sliding_window_mask(left: int, right: int = 0) -> MaskFn:
    """Query ``i`` sees keys ``i - left <= j <= i + right``."""
    left, right = _non_negative("left", left), _non_negative("right", right)

    def mask_fn(b, h, q_idx, kv_idx):
        return (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)
    return mask_fn


def prefix_lm_mask(prefix_length: int) -> MaskFn:
    """Bidirectional over the first ``prefix_length`` keys, causal after them."""
    prefix_length = _non_negative("prefix_length", prefix_length)

    def mask_fn(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_length) | (kv_idx <= q_idx)
    return mask_fn


def document_mask(q_segment_ids, kv_segment_ids=None) -> MaskFn:
    """Attend only within the same document: ``q_segment_ids [B, T]``, ``kv_segment_ids [B, S]``."""
    kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    q_ids, kv_ids = jnp.asarray(q_segment_ids), jnp.asarray(kv_segment_ids)
    if q_ids.ndim != 2 or kv_ids.ndim != 2:
        raise ValueError(f"segment ids must be [B, T] and [B, S], got {q_ids.shape} and {kv_ids.shape}")

    def mask_fn(b, h, q_idx, kv_idx):
        return q_ids[b, q_idx] == kv_ids[b, kv_idx]
    return mask_fn


def chunked_mask(chunk_size: int) -> MaskFn:
    """Block-diagonal: query and key must fall in the same chunk of ``chunk_size`` positions."""
    chunk_size = _positive("chunk_size", chunk_size)

    def mask_fn(b, h, q_idx, kv_idx):
        return index_div(q_idx, chunk_size) == index_div(kv_idx, chunk_size)
    return mask_fn


def sink_local_mask(num_sinks: int, window: int) -> MaskFn:
    """StreamingLLM: the first ``num_sinks`` keys plus the last ``window`` keys up to the query (causal)."""
    num_sinks, window = _non_negative("num_sinks", num_sinks), _non_negative("window", window)

    def mask_fn(b, h, q_idx, kv_idx):
        causal = kv_idx <= q_idx
        return causal & ((kv_idx < num_sinks) | (kv_idx > q_idx - window))
    return mask_fn


def dilated_mask(stride: int, offset: int = 0) -> MaskFn:
    """Strided: key ``j`` is visible when ``(i - j) % stride == offset % stride``."""
    stride = _positive("stride", stride)

    def mask_fn(b, h, q_idx, kv_idx):
        return jnp.mod(q_idx - kv_idx, stride) == offset % stride
    return mask_fn


def and_masks(*mask_fns: MaskFn) -> MaskFn:
    """Visible where every mask is visible (the full mask when given none)."""
    if not mask_fns:
        return full_mask()

    def mask_fn(b, h, q_idx, kv_idx):
        result = mask_fns[0](b, h, q_idx, kv_idx)
        for fn in mask_fns[1:]:
            result = result & fn(b, h, q_idx, kv_idx)
        return result
    return mask_fn


def or_masks(*mask_fns: MaskFn) -> MaskFn:
    """Visible where any mask is visible (nothing visible when given none)."""
    if not mask_fns:
        return not_mask(full_mask())

    def mask_fn(b, h, q_idx, kv_idx):
        result = mask_fns[0](b, h, q_idx, kv_idx)
        for fn in mask_fns[1:]:
            result = result | fn(b, h, q_idx, kv_idx)
        return result
    return mask_fn


def not_mask(mask_fn: MaskFn) -> MaskFn:
    """Visible exactly where ``mask_fn`` is not."""
    def negated(b, h, q_idx, kv_idx):
        return ~mask_fn(b, h, q_idx, kv_idx)
    return negated


def materialize(mask_fn: MaskFn, B: int, H: int, T: int, S: int):
    """The dense bool mask ``[B, H, T, S]`` of a mask function."""
    b = jnp.arange(B)[:, None, None, None]
    h = jnp.arange(H)[None, :, None, None]
    q_idx = jnp.arange(T)[None, None, :, None]
    kv_idx = jnp.arange(S)[None, None, None, :]
    return jnp.broadcast_to(mask_fn(b, h, q_idx, kv_idx), (B, H, T, S)).astype(bool)
