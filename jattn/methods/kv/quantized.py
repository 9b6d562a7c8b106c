"""Quantised KV caches: int8, int4 and int2 (packed) K/V with per-channel key and per-token value scales.

The scheme is KIVI's (Liu et al., 2024), the standard way to make per-channel key scales work while tokens
are appended one at a time:

* **Uniform asymmetric min-max quantisation** over a set of elements ``x`` (the reduced ``axis``):
  ``m = min x``, ``scale = (max x - m) / (2^bits - 1)``, ``code = clip(round((x - m) / scale), 0, 2^bits - 1)``
  (round half to even), ``x' = code * scale + m``, so ``|x' - x| <= scale / 2`` per element. A constant set
  (``scale = 0``) gets code 0 and is exact. ``scale`` and ``m`` are stored in the cache's dtype and the codes
  are computed from the stored values, so the bound holds for what is actually kept.
* **Keys per channel**: one ``(scale, min)`` per ``(b, kv head, group of group_size tokens, channel)``.
  Key outliers live in a few channels, so per-channel scales keep them from flattening every other channel.
  A group can only be quantised once all its tokens are there: until then the newest tokens (the partial
  group, fewer than ``group_size``) are kept in full precision in a residual buffer (KIVI's residual). When
  an append fills the group it is quantised with the same statistics as quantising the whole sequence at
  once, so the cache does not depend on how the tokens were chunked.
* **Values per token**: one ``(scale, min)`` per ``(b, kv head, token)`` over the ``D`` channels, quantised
  as they arrive.
* **Packing**: 2-bit codes go 4 to a byte and 4-bit codes 2 to a byte along the last (channel) axis; the
  code at index ``j`` sits in byte ``j // (8 / bits)`` at bit offset ``(j % (8 / bits)) * bits`` (the
  official ZipCache/KIVI code packs planar halves instead; the bytes are the same). A channel count that is
  not a multiple of ``8 / bits`` is padded with zero codes; ``unpack`` takes the true count back.

Memory (``bytes_per_token``): ``Hkv * D * bits / 8`` bytes of key codes and as many of value codes per token,
plus ``2 * Hkv * D * scale_bytes / group_size`` (the key groups' scale and min) plus ``2 * Hkv * scale_bytes``
(each token's value scale and min), against ``2 * Hkv * D * 2`` for an fp16 cache. The residual buffer is a
fixed ``group_size`` tokens per sequence.

The capacity is rounded up to a multiple of ``lcm(group_size, page_size)`` (``page_size``: the decode
kernel's tile, 128), so ``attend(impl="auto")`` lowers to the Pallas decode kernel on GPU/TPU.

Attention (``attend`` = ``quantized_decode_attention``): ``impl="pallas"`` (and ``"auto"`` on GPU/TPU) runs
``pallas_kernels.decode_quantized``, which reads the packed codes and dequantises each key group in the
kernel, so no float copy of the cache is formed; the partial group's full-precision residual is attended
in XLA and merged by lse. ``"xla"`` (``"auto"`` on CPU) and ``"reference"`` run ``jattn.decode_attention``
over ``dequantized()``, a float copy of the cache.

Quirks: ``append`` writes the new tokens of a sequence only when they all fit (a concrete overflow raises a
``ValueError`` naming the sequence; under ``jit`` the sequence is marked overflowed, ``lengths = capacity +
1``, and attention turns its rows into NaN), as ``jattn.cache.ContiguousKVCache(policy="raise")``.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, UInt8

from jattn.core import checks
from jattn.core.reference import softmax_rows
from jattn.core.softmax import merge_partials, merge_sinks
from jattn.ops import decode as decode_op
from jattn.ops.decode import decode_attention
from jattn.ops.decode_reference import decode_visibility
from jattn.ops.dispatch import run_impl
from pallas_kernels import common
from pallas_kernels.decode_quantized import quantized_decode_partials

QUANT_BITS = (2, 4, 8)
PACK_BITS = (1, 2, 4, 8)


def _levels(bits: int) -> int:
    return 2 ** bits - 1


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take along the packed axis: ``ceil(n * bits / 8)``."""
    per_byte = 8 // bits
    return -(-n // per_byte)


def _axes(axis, ndim: int) -> tuple[int, ...]:
    raw = axis if isinstance(axis, (tuple, list)) else (axis,)
    if not raw or not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in raw):
        raise TypeError(f"axis must be an int or a non-empty tuple of ints, got {axis!r}")
    axes = tuple(int(a) % ndim if -ndim <= a < ndim else None for a in raw)
    if None in axes or len(set(axes)) != len(axes):
        raise ValueError(f"axis must name distinct axes of an array of rank {ndim}, got {axis!r}")
    return axes


def quantize(x: Float[Array, "..."], *, bits: int, axis) -> tuple[UInt8[Array, "..."], Float[Array, "..."],
                                                                   Float[Array, "..."]]:
    """Uniform asymmetric min-max quantisation of ``x`` with one ``(scale, min)`` per slice over ``axis``.

    Args:
      x: a float array.
      bits: 2, 4 or 8.
      axis: the axis or tuple of axes reduced together (they share one scale and min).

    Returns:
      ``(codes, scale, minimum)``: ``codes`` uint8 of ``x``'s shape in ``[0, 2^bits - 1]`` (unpacked);
      ``scale = (max - min) / (2^bits - 1)`` and ``minimum`` in ``x``'s dtype, shaped like ``x`` with the
      reduced axes of size 1. ``dequantize(codes, scale, minimum)`` is within ``scale / 2`` of ``x``.

    Raises:
      TypeError: ``x`` is not a float array or ``axis`` is not an int / tuple of ints.
      ValueError: ``bits`` is not 2, 4 or 8, ``axis`` is out of range, or ``x`` is empty along it.
    """
    checks.check_float_array("x", x)
    checks.check_choice("bits", bits, QUANT_BITS)
    axes = _axes(axis, x.ndim)
    if any(x.shape[a] == 0 for a in axes):
        raise ValueError(f"x must have elements along axis {axis!r} to quantise, got {checks.describe(x)}")
    levels = _levels(bits)
    xf = x.astype(jnp.float32)
    minimum = jnp.min(xf, axis=axes, keepdims=True).astype(x.dtype)
    scale = ((jnp.max(xf, axis=axes, keepdims=True) - jnp.min(xf, axis=axes, keepdims=True)) / levels).astype(x.dtype)
    step = scale.astype(jnp.float32)
    codes = jnp.round((xf - minimum.astype(jnp.float32)) / jnp.where(step > 0, step, 1.0))
    return jnp.clip(codes, 0, levels).astype(jnp.uint8), scale, minimum


def dequantize(codes: UInt8[Array, "..."], scale: Float[Array, "..."], minimum: Float[Array, "..."]
               ) -> Float[Array, "..."]:
    """``codes * scale + minimum`` (broadcast), computed in float32, returned in ``scale``'s dtype.

    Args:
      codes: unpacked integer codes.
      scale: the quantisation step, broadcastable to ``codes``.
      minimum: the zero point (the slice's minimum), broadcastable to ``codes``.

    Returns:
      The dequantised array, ``scale``'s dtype.
    """
    checks.check_float_array("scale", scale)
    checks.check_float_array("minimum", minimum)
    out = codes.astype(jnp.float32) * scale.astype(jnp.float32) + minimum.astype(jnp.float32)
    return out.astype(scale.dtype)


def _check_codes(name: str, codes):
    if not hasattr(codes, "dtype") or codes.dtype != jnp.uint8:
        raise TypeError(f"{name} must be a uint8 array, got {checks.describe(codes)}")
    if codes.ndim == 0:
        raise ValueError(f"{name} must have at least one axis (the packed one), got {checks.describe(codes)}")


def pack(codes: UInt8[Array, "... n"], *, bits: int) -> UInt8[Array, "... m"]:
    """Packs ``bits``-bit codes along the last axis into bytes (``8 / bits`` codes per byte).

    Code ``j`` goes to byte ``j // (8 / bits)`` at bit offset ``(j % (8 / bits)) * bits``. A length that is
    not a multiple of ``8 / bits`` is padded with zero codes (``unpack`` takes the true length).

    Args:
      codes: uint8 codes, each below ``2^bits``.
      bits: 1, 2, 4 or 8 (8: the codes themselves).

    Returns:
      uint8 ``[..., ceil(n * bits / 8)]``.

    Raises:
      TypeError: ``codes`` is not uint8.
      ValueError: ``bits`` is not 1, 2, 4 or 8, or (concrete codes) a code does not fit in ``bits`` bits.
    """
    _check_codes("codes", codes)
    checks.check_choice("bits", bits, PACK_BITS)
    if not checks.is_traced(codes) and codes.size and int(np.max(np.asarray(codes))) > _levels(bits):
        raise ValueError(f"codes must be < 2^bits = {2 ** bits} to pack at bits={bits}, got a maximum of "
                         f"{int(np.max(np.asarray(codes)))}")
    if bits == 8:
        return codes
    per_byte = 8 // bits
    n = codes.shape[-1]
    padded = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, (-n) % per_byte)])
    fields = padded.reshape(*codes.shape[:-1], padded.shape[-1] // per_byte, per_byte)
    out = fields[..., 0]
    for i in range(1, per_byte):
        out = out | (fields[..., i] << jnp.uint8(i * bits))
    return out


def unpack(packed: UInt8[Array, "... m"], *, bits: int, n: int) -> UInt8[Array, "... n"]:
    """The inverse of ``pack``: the first ``n`` codes along the last axis.

    Args:
      packed: uint8 ``[..., ceil(n * bits / 8)]`` from ``pack``.
      bits: 1, 2, 4 or 8.
      n: codes to return (the length before packing).

    Returns:
      uint8 ``[..., n]``.

    Raises:
      TypeError: ``packed`` is not uint8.
      ValueError: ``bits`` is not 1, 2, 4 or 8, or the packed length is not ``ceil(n * bits / 8)``.
    """
    _check_codes("packed", packed)
    checks.check_choice("bits", bits, PACK_BITS)
    n = checks.check_int("n", n, 0)
    if packed.shape[-1] != packed_size(n, bits):
        raise ValueError(f"packed must have last axis ceil(n * bits / 8) = {packed_size(n, bits)} for n={n}, "
                         f"bits={bits}, got {checks.describe(packed)}")
    if bits == 8:
        return packed
    per_byte = 8 // bits
    shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    fields = (packed[..., None] >> shifts) & jnp.uint8(_levels(bits))
    return fields.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)[..., :n]


def bytes_per_token(*, head_dim: int, kv_heads: int, bits: int, group_size: int = 32, scale_bytes: int = 2,
                    capacity: int | None = None, element_bytes: int = 2) -> float:
    """KV bytes per token per layer of a ``QuantizedKVCache`` (one sequence), scale and min overheads included.

    Steady state (``capacity=None``)::

        Hkv * ceil(D * bits / 8)                 key codes
      + Hkv * ceil(D * bits / 8)                 value codes
      + 2 * Hkv * D * scale_bytes / group_size   key (scale, min) per channel per group
      + 2 * Hkv * scale_bytes                    value (scale, min) per token

    against ``2 * Hkv * D * 2`` for an fp16 cache. With ``capacity`` (a multiple of ``group_size``) the fixed
    per-sequence storage is spread over it as well: the full-precision residual
    ``group_size * Hkv * D * element_bytes`` and the int32 length, ``(... + 4) / capacity``; that is exactly
    the cache's stored bytes divided by ``batch * capacity`` (scales stored at ``element_bytes``).

    Args:
      head_dim: D.
      kv_heads: Hkv.
      bits: 2, 4 or 8.
      group_size: tokens per key quantisation group.
      scale_bytes: bytes of one stored scale or min (2: fp16).
      capacity: the cache's capacity in tokens, or None for the steady state.
      element_bytes: bytes of one full-precision element (the residual).

    Returns:
      Bytes per token (a float: the overheads are fractional).

    Raises:
      TypeError: a size is not an int.
      ValueError: a size is not positive, ``bits`` is not 2, 4 or 8, or ``capacity`` is not a multiple of
        ``group_size``.
    """
    for name, value in (("head_dim", head_dim), ("kv_heads", kv_heads), ("group_size", group_size),
                        ("scale_bytes", scale_bytes), ("element_bytes", element_bytes)):
        checks.check_int(name, value)
    checks.check_choice("bits", bits, QUANT_BITS)
    D, Hkv = head_dim, kv_heads
    per_token = (2 * Hkv * packed_size(D, bits) + 2 * Hkv * D * scale_bytes / group_size
                 + 2 * Hkv * scale_bytes)
    if capacity is None:
        return per_token
    checks.check_int("capacity", capacity)
    if capacity % group_size:
        raise ValueError(f"capacity must be a multiple of group_size={group_size}, got {capacity}")
    return per_token + (group_size * Hkv * D * element_bytes + 4) / capacity


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKVCache:
    """A KIVI-style quantised KV cache (head-major, packed codes, per-channel key groups, per-token values).

    Build it with ``create``; ``append`` and ``attend`` are pure and ``jit``-able (each returns a new cache or
    the attention output). ``dequantized()`` is the float view ``decode_attention`` reads.
    """
    k_codes: jax.Array      # [B, Hkv, capacity, ceil(D * bits / 8)] uint8, complete groups only
    k_scale: jax.Array      # [B, Hkv, capacity / group_size, D]
    k_min: jax.Array        # [B, Hkv, capacity / group_size, D]
    k_residual: jax.Array   # [B, Hkv, group_size, D] full precision: the partial group's tokens
    v_codes: jax.Array      # [B, Hkv, capacity, ceil(D * bits / 8)] uint8
    v_scale: jax.Array      # [B, Hkv, capacity]
    v_min: jax.Array        # [B, Hkv, capacity]
    lengths: jax.Array      # [B] int32
    bits: int = dataclasses.field(default=8, metadata=dict(static=True))
    group_size: int = dataclasses.field(default=32, metadata=dict(static=True))

    @classmethod
    def create(cls, batch: int, kv_heads: int, capacity: int, head_dim: int, *, bits: int = 8,
               group_size: int = 32, page_size: int = 128, dtype=jnp.float32) -> "QuantizedKVCache":
        """An empty cache; ``capacity`` is rounded up to a multiple of ``lcm(group_size, page_size)``.

        Args:
          batch: sequences B.
          kv_heads: Hkv.
          capacity: tokens per sequence.
          head_dim: D.
          bits: 8, 4 or 2 (codes per element).
          group_size: tokens per key quantisation group (KIVI: 32).
          page_size: the decode kernel's tile (a power of two >= 16), so ``attend(impl="auto")`` lowers on
            GPU/TPU, as ``ContiguousKVCache``.
          dtype: the full-precision dtype (residual, scales, dequantised K/V).

        Returns:
          The empty cache.

        Raises:
          TypeError: a size is not an int, or ``dtype`` is not a float dtype.
          ValueError: a size is not positive, ``bits`` is not 2, 4 or 8, or ``page_size`` is not a power of
            two >= 16.
        """
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("capacity", capacity),
                            ("head_dim", head_dim), ("group_size", group_size)):
            checks.check_int(name, value)
        checks.check_block_size("page_size", page_size, minimum=16)
        checks.check_choice("bits", bits, QUANT_BITS)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"dtype must be a float dtype, got {dtype!r}")
        unit = math.lcm(group_size, page_size)
        capacity = -(-capacity // unit) * unit
        heads = (batch, kv_heads)
        codes = jnp.zeros(heads + (capacity, packed_size(head_dim, bits)), jnp.uint8)
        groups = jnp.zeros(heads + (capacity // group_size, head_dim), dtype)
        tokens = jnp.zeros(heads + (capacity,), dtype)
        return cls(codes, groups, groups, jnp.zeros(heads + (group_size, head_dim), dtype), codes, tokens, tokens,
                   jnp.zeros((batch,), jnp.int32), bits, group_size)

    @property
    def capacity(self) -> int:
        return self.k_codes.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_residual.shape[3]

    @property
    def dtype(self):
        return self.k_residual.dtype

    def append(self, k_new: Float[Array, "B T Hkv D"], v_new: Float[Array, "B T Hkv D"]) -> "QuantizedKVCache":
        """Appends ``k_new, v_new [B, T_new, Hkv, D]`` after each sequence's length.

        Values are quantised per token at once; keys join the partial group, and every group the append
        completes is quantised per channel.

        Args:
          k_new: new keys, the cache's dtype.
          v_new: new values, the cache's dtype.

        Returns:
          The new cache.

        Raises:
          ValueError: a shape is wrong, or (concrete lengths) a sequence would pass the capacity.
          TypeError: a dtype is wrong.
        """
        B, Hkv, _, D = self.k_scale.shape
        for name, x in (("k_new", k_new), ("v_new", v_new)):
            checks.check_float_array(name, x, 4)
            if x.shape[0] != B or x.shape[2] != Hkv or x.shape[3] != D:
                raise ValueError(f"{name} must be [B={B}, T_new, Hkv={Hkv}, D={D}], got {checks.describe(x)}")
            if x.dtype != self.dtype:
                raise TypeError(f"{name} must have the cache's dtype {self.dtype}, got {checks.describe(x)}")
        if k_new.shape[1] != v_new.shape[1]:
            raise ValueError(f"k_new and v_new must hold the same tokens, got {k_new.shape[1]} and {v_new.shape[1]}")
        T_new = k_new.shape[1]
        if not checks.is_traced(self.lengths):
            lengths = np.asarray(self.lengths)
            over = np.flatnonzero(lengths + T_new > self.capacity)
            if over.size:
                b = int(over[0])
                raise ValueError(f"appending {T_new} tokens to sequence {b} (length {int(lengths[b])}) passes the "
                                 f"capacity {self.capacity} of this QuantizedKVCache; create it with a larger "
                                 f"capacity")
        fits = self.lengths + T_new <= self.capacity
        append = jax.vmap(self._append_sequence)
        (k_codes, k_scale, k_min, k_residual, v_codes, v_scale, v_min) = append(
            self.k_codes, self.k_scale, self.k_min, self.k_residual, self.v_codes, self.v_scale, self.v_min,
            self.lengths, fits, jnp.swapaxes(k_new, 1, 2), jnp.swapaxes(v_new, 1, 2))
        lengths = jnp.where(fits, self.lengths + T_new, self.capacity + 1).astype(jnp.int32)
        return dataclasses.replace(self, k_codes=k_codes, k_scale=k_scale, k_min=k_min, k_residual=k_residual,
                                   v_codes=v_codes, v_scale=v_scale, v_min=v_min, lengths=lengths)

    def _append_sequence(self, k_codes, k_scale, k_min, k_residual, v_codes, v_scale, v_min, length, fits,
                         k_new, v_new):
        """One sequence (no batch axis): ``k_new, v_new [Hkv, T_new, D]``."""
        G, bits, capacity = self.group_size, self.bits, self.capacity
        Hkv, T_new, D = k_new.shape
        kept = length % G
        start = length - kept
        # the partial group's tokens then the new ones, cut into whole groups (the last may stay partial)
        n_groups = -(-(G - 1 + T_new) // G)
        offset = jnp.arange(n_groups * G)
        window = jnp.where((offset < kept)[None, :, None], k_residual[:, jnp.clip(offset, 0, G - 1)],
                           k_new[:, jnp.clip(offset - kept, 0, T_new - 1)])
        complete = (kept + T_new) // G
        codes, scale, minimum = quantize(window.reshape(Hkv, n_groups, G, D), bits=bits, axis=2)
        token_at = jnp.where(fits & (offset < complete * G), start + offset, capacity)     # capacity: dropped
        k_codes = k_codes.at[:, token_at].set(pack(codes.reshape(Hkv, -1, D), bits=bits), mode="drop")
        group = jnp.arange(n_groups)
        group_at = jnp.where(fits & (group < complete), start // G + group, capacity // G)
        k_scale = k_scale.at[:, group_at].set(scale[:, :, 0], mode="drop")
        k_min = k_min.at[:, group_at].set(minimum[:, :, 0], mode="drop")
        left = (kept + T_new) % G
        padded = jnp.pad(window, ((0, 0), (0, G), (0, 0)))
        residual = jax.lax.dynamic_slice_in_dim(padded, complete * G, G, axis=1)
        residual = jnp.where((jnp.arange(G) < left)[None, :, None], residual, 0)
        k_residual = jnp.where(fits, residual, k_residual)

        codes, scale, minimum = quantize(v_new, bits=bits, axis=2)
        token_at = jnp.where(fits, length + jnp.arange(T_new), capacity)
        v_codes = v_codes.at[:, token_at].set(pack(codes, bits=bits), mode="drop")
        v_scale = v_scale.at[:, token_at].set(scale[..., 0], mode="drop")
        v_min = v_min.at[:, token_at].set(minimum[..., 0], mode="drop")
        return k_codes, k_scale, k_min, k_residual, v_codes, v_scale, v_min

    def dequantized(self) -> tuple[Float[Array, "B Hkv S D"], Float[Array, "B Hkv S D"]]:
        """``(k, v)`` as ``[B, Hkv, capacity, D]`` in the cache's dtype: the dequantised groups and tokens,
        the residual (exact) in place of the partial group, zeros past each length."""
        G, D, S = self.group_size, self.head_dim, self.capacity
        k = dequantize(unpack(self.k_codes, bits=self.bits, n=D), jnp.repeat(self.k_scale, G, axis=2),
                       jnp.repeat(self.k_min, G, axis=2))
        position = jnp.arange(S)[None, :]
        start = (self.lengths - self.lengths % G)[:, None]
        in_residual = (position >= start) & (position < start + G)
        residual = jnp.take_along_axis(self.k_residual, jnp.clip(position - start, 0, G - 1)[:, None, :, None],
                                       axis=2)
        k = jnp.where(in_residual[:, None, :, None], residual, jnp.where((position < start)[:, None, :, None], k, 0))
        v = dequantize(unpack(self.v_codes, bits=self.bits, n=D), self.v_scale[..., None], self.v_min[..., None])
        return k, v

    def contiguous(self) -> tuple[Float[Array, "B Hkv S D"], Float[Array, "B Hkv S D"]]:
        """``dequantized()``, under the name ``jattn.cache``'s caches give their ``[B, Hkv, S, D]`` view."""
        return self.dequantized()

    def attend(self, q: Float[Array, "B *Tq H D"], **kwargs):
        """``quantized_decode_attention(q, self, **kwargs)``: attention of ``q``'s new tokens (already appended)
        over the cache."""
        return quantized_decode_attention(q, self, **kwargs)


def quantized_decode_attention(q: Float[Array, "B *Tq H D"], cache: QuantizedKVCache, *, window=None,
                               sinks: Float[Array, "H"] | None = None, softcap: float | None = None,
                               scale: float | None = None, return_lse: bool = False, impl: str = "auto",
                               num_splits: int | None = None, interpret=None, poison_outputs: bool = False):
    """``jattn.decode_attention``'s contract over a ``QuantizedKVCache``, its new tokens already appended.

    Args:
      q: ``[B, H, D]`` or ``[B, Tq, H, D]`` in the cache's dtype (causal within the new tokens).
      cache: the quantised cache; its ``lengths`` count the new tokens.
      window, sinks, softcap, scale, return_lse: as ``jattn.decode_attention``.
      impl: "auto" | "pallas" | "xla" | "reference". "pallas" (and "auto" on GPU/TPU) runs the kernel that
        dequantises key groups in place (``pallas_kernels.decode_quantized``); "xla" (and "auto" on CPU) and
        "reference" run ``jattn.decode_attention`` over ``cache.dequantized()``.
      num_splits: Pallas only: split-K ranges per sequence (default: enough for ~256 programs).
      interpret: Pallas only: None (decided at lowering), True/"triton" or "mosaic" (interpreted).
      poison_outputs: Pallas only: NaN-fill the kernel's outputs first (tests).

    Returns:
      ``out`` (q's shape, q's dtype), and with ``return_lse`` the float32 lse; an overflowed sequence
      (``lengths = capacity + 1``) gives NaN rows. Differentiable in ``q`` and ``sinks`` (the kernel's query
      gradient is the xla path's).

    Raises:
      ValueError / TypeError: a shape, dtype or static argument is wrong (named, before any kernel runs).
    """
    if not isinstance(cache, QuantizedKVCache):
        raise TypeError(f"cache must be a QuantizedKVCache, got {type(cache).__name__}")
    checks.check_static("quantized_decode_attention", window=window, softcap=softcap, scale=scale,
                        return_lse=return_lse, impl=impl, num_splits=num_splits)
    checks.check_choice("impl", impl, checks.IMPLS)
    checks.check_float_array("q", q)
    if q.ndim not in (3, 4):
        raise ValueError(f"q must be [B, H, D] (one new token) or [B, Tq, H, D], got {checks.describe(q)}")
    B, Hkv, _, D = cache.k_scale.shape
    q4 = q[:, None] if q.ndim == 3 else q
    if q4.shape[0] != B or q4.shape[3] != D or q4.shape[2] % Hkv:
        raise ValueError(f"q must be [B={B}, (Tq,) H, D={D}] with H a multiple of the cache's Hkv={Hkv}, got "
                         f"{checks.describe(q)}")
    if q.dtype != cache.dtype:
        raise TypeError(f"q must have the cache's dtype {cache.dtype}, got {checks.describe(q)}")
    window = checks.check_window(window)
    checks.check_sinks(sinks, q4.shape[2])
    softcap = checks.check_positive_float("softcap", softcap)
    scale = D ** -0.5 if scale is None else checks.check_positive_float("scale", scale, allow_none=False)
    if num_splits is not None:
        num_splits = checks.check_int("num_splits", num_splits)
    options = dict(window=window, softcap=softcap, scale=scale)

    def dense(impl_name):
        def run(q4, cache, sinks):
            k, v = cache.dequantized()
            lengths = jnp.clip(cache.lengths, 0, cache.capacity)
            out, lse = decode_attention(q4, k, v, lengths, sinks=sinks, return_lse=True, impl=impl_name, **options)
            return out.astype(jnp.float32), lse
        return run

    def pallas(q4, cache, sinks):
        problem = _kernel_problem(cache)
        if problem is not None:
            if impl == "pallas":
                raise ValueError(problem)
            shapes = [jax.ShapeDtypeStruct(q4.shape, jnp.float32), jax.ShapeDtypeStruct(q4.shape[:3], jnp.float32)]
            return tuple(common.unsupported_on_target(problem, shapes)(q4))
        plan = (("interpret", interpret), ("num_splits", num_splits), ("poison_outputs", bool(poison_outputs)),
                ("scale", scale), ("softcap", softcap), ("window_left", None if window is None else window[0]))
        out, lse = _pallas_quantized(plan, q4, cache)
        return (out, lse) if sinks is None else merge_sinks(out, lse, sinks)

    out, lse = run_impl(impl, (q4, cache, sinks), xla=dense("xla"), pallas=pallas, reference=dense("reference"))
    overflowed = (cache.lengths < 0) | (cache.lengths > cache.capacity)
    out = jnp.where(overflowed[:, None, None, None], jnp.nan, out).astype(q.dtype)
    lse = jnp.where(overflowed[:, None, None], jnp.nan, lse)
    if q.ndim == 3:
        out, lse = out[:, 0], lse[:, 0]
    return (out, lse) if return_lse else out


def _kernel_problem(cache: QuantizedKVCache) -> str | None:
    """Why the dequantising kernel cannot run this cache, or None."""
    G, D = cache.group_size, cache.head_dim
    if G < common.MIN_DOT_DIM or G & (G - 1):
        return (f"the quantised decode kernel's tile is one key group: group_size must be a power of two >= "
                f"{common.MIN_DOT_DIM}, got {G} (or use impl='xla')")
    if D < common.MIN_DOT_DIM or D & (D - 1) or packed_size(D, cache.bits) < common.MIN_DOT_DIM:
        return (f"the quantised decode kernel needs a head dim D that is a power of two with D * bits / 8 >= "
                f"{common.MIN_DOT_DIM}, got D={D} at bits={cache.bits} (or use impl='xla')")
    return None


def _kernel_attend(plan: tuple, q4, cache: QuantizedKVCache):
    """The kernel over the complete key groups, merged with the residual (partial group) attended in XLA."""
    plan = dict(plan)
    B, Tq, H, D = q4.shape
    Hkv, G, S = cache.k_scale.shape[1], cache.group_size, cache.capacity
    lengths = jnp.clip(cache.lengths, 0, S).astype(jnp.int32)
    tiles = S // G
    splits, per_split = decode_op.split_plan(B, Hkv, tiles, plan["num_splits"])
    grouped = lambda x, *tail: x.reshape(B, Hkv, tiles, *tail)
    out, lse = quantized_decode_partials(
        decode_op._pack_rows(q4, Hkv), grouped(cache.k_codes, G, -1), grouped(cache.k_scale, 1, D),
        grouped(cache.k_min, 1, D), grouped(cache.v_codes, G, -1), grouped(cache.v_scale, G, 1),
        grouped(cache.v_min, G, 1), lengths, bits=cache.bits, new_tokens=Tq, group=H // Hkv, num_splits=splits,
        tiles_per_split=per_split, scale=plan["scale"], softcap=plan["softcap"], window=plan["window_left"],
        interpret=plan["interpret"], poison_outputs=plan["poison_outputs"])
    out, lse = merge_partials(jnp.moveaxis(out, 2, 0), jnp.moveaxis(lse[..., 0], 2, 0))
    groups_out = decode_op._unpack_rows(out, Tq, H), decode_op._unpack_rows(lse, Tq, H)
    return merge_partials(*zip(groups_out, _residual_attend(plan, q4, cache, lengths)))


def _residual_attend(plan: dict, q4, cache: QuantizedKVCache, lengths):
    """``(out [B, Tq, H, D], lse [B, Tq, H])`` over the partial group: keys from the full-precision residual,
    values dequantised from their per-token codes (values have no residual)."""
    B, Tq, H, D = q4.shape
    Hkv, G, S = cache.k_scale.shape[1], cache.group_size, cache.capacity
    start = lengths - lengths % G
    position = jnp.clip(start[:, None] + jnp.arange(G)[None, :], 0, S - 1)             # [B, G]
    at = position[:, None, :, None]
    v = dequantize(unpack(jnp.take_along_axis(cache.v_codes, at, axis=2), bits=cache.bits, n=D),
                   jnp.take_along_axis(cache.v_scale, position[:, None], axis=2)[..., None],
                   jnp.take_along_axis(cache.v_min, position[:, None], axis=2)[..., None])
    rows = q4.astype(jnp.float32).reshape(B, Tq, Hkv, H // Hkv, D)
    s = jnp.einsum("btkgd,bkjd->btkgj", rows, cache.k_residual.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) * plan["scale"]
    if plan["softcap"] is not None:
        s = plan["softcap"] * jnp.tanh(s / plan["softcap"])
    visible = decode_visibility(lengths, Tq, G, plan["window_left"], kv_offset=start[:, None, None])   # [B, Tq, G]
    s = jnp.where(visible[:, :, None, None, :], s, -jnp.inf)
    p, lse = softmax_rows(s)
    # 0 * stale values: the residual's unused slots hold zeros, but values past the length may be stale
    v = jnp.where((position < lengths[:, None])[:, None, :, None], v.astype(jnp.float32), 0.0)
    out = jnp.einsum("btkgj,bkjd->btkgd", p, v, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(B, Tq, H, D), lse.reshape(B, Tq, H)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pallas_quantized(plan, q4, cache):
    return _kernel_attend(plan, q4, cache)


def _pallas_quantized_fwd(plan, q4, cache):
    return _kernel_attend(plan, q4, cache), (q4, cache)


def _pallas_quantized_bwd(plan, residuals, cotangents):
    """The query's gradient through the xla path over the dequantised cache (the same function); the codes
    and statistics of a quantised cache get none."""
    q4, cache = residuals
    options = dict(plan)
    def dense(q4):
        out, lse = decode_attention(
            q4, *cache.dequantized(), jnp.clip(cache.lengths, 0, cache.capacity), return_lse=True, impl="xla",
            window=None if options["window_left"] is None else (options["window_left"], 0),
            softcap=options["softcap"], scale=options["scale"])
        return out.astype(jnp.float32), lse
    _, vjp = jax.vjp(dense, q4)
    return vjp(cotangents)[0], jax.tree.map(no_gradient, cache)


def no_gradient(x):
    """The zero cotangent of a cache leaf that gets no gradient: zeros for floats, float0 for ints and bools."""
    return jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.floating) else np.zeros(x.shape, jax.dtypes.float0)


_pallas_quantized.defvjp(_pallas_quantized_fwd, _pallas_quantized_bwd)
