"""P24 — ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token Identification.

Mixed-precision KV quantisation: tokens that receive much attention ("salient") keep ``bits_high`` (4) bits,
the rest ``bits_low`` (2), and saliency is the *normalised* attention score, which corrects the bias of
accumulated scores towards early tokens (seen by more causal queries). The rule, following the official code
(``ThisisBillhe/ZipCache``: ``zipcache/models/modeling_llama.py`` ``MixedLlamaAttention.forward`` and
``CompressUtils/compress_function.py`` ``true_mixedprec_compress_channelwise``,
``true_channel_separate_mixedprec_tokenwise_compress``), on a prompt of ``T`` tokens:

1. **Probe queries** (``probe_positions``): the recent ``[int(T - 0.05 T), T)`` plus ``int(0.05 T)``
   positions drawn uniformly *with replacement* from ``[0, int(T - 0.05 T))`` (``torch.randint`` in the code;
   here ``jax.random.randint`` with the given key; a duplicate counts twice).
2. **Saliency** (``normalized_attention_score``): ``A = softmax(q_probe K^T * scale + causal mask)`` per
   query head; ``c_j = sum over the probe rows and the G query heads of each kv head of A[:, j]``;
   ``p_j = c_j / (T - j)`` (``denominator="remaining"``: the code's, the number of queries that *could* see
   key ``j``, although only the probes were used), or ``c_j / #{probes p : pos_p >= j}``
   (``"visible"``: the exact mean over the probes that see ``j``), or ``c_j`` (``"none"``: the accumulated
   score). **Selection** (``select_salient``): per ``(sequence, kv head)`` the ``int(r T)`` lowest scores are
   non-salient (``r = unimportant_ratio``, 0.4), the rest salient; ties go to the lower position first (a
   stable sort; the code's ``topk`` leaves ties unspecified).
3. **Keys** (``quantize_channelwise``): each class (salient / not) is quantised separately, uniform
   asymmetric min-max per ``(kv head, channel)`` over the class's tokens:
   ``m = min_t x_tc``, ``step = (max_t x_tc - m) / (2^bits - 1)``, ``x' = round((x - m) / step) * step + m``.
4. **Values** (``quantize_channel_separable_tokenwise``): ``s_c = sqrt(max_t |v_tc|)`` over the segment's
   tokens (both classes), ``v / s_c`` is quantised per row with min-max over the row's ``Hkv * D`` entries
   (``quantize_tokenwise``), and ``s_c`` multiplies back on dequantisation. Each class separately.
5. **Decode** (``zipcache_decode``): new tokens stay in full precision; every ``streaming_gap`` (100) tokens
   their saliency is recomputed, un-normalised, and they are compressed: the ``int(r * gap)`` lowest scores
   get ``bits_low``. The score (``stream_score``): ``"last_query"`` (the default, the code: the attention of
   the one query of the step at which the gap fills, softmax over the whole cache, summed over the group's
   heads) or ``"accumulated"`` (the attention each new token received from every query since it arrived,
   the spec's wording). Shapes are static: the prompt, ``ceil(max_new_tokens / gap)`` segment slots and a
   full-precision residual of ``gap`` tokens; every step attends over the dequantised view of all three.

Where this departs from the code, and quirks kept:

* Statistics are per sequence; the code reduces key min/max and ``s_c`` over the batch as well
  (``reshape(-1, C)``), which mixes unrelated requests.
* Streaming compresses only the ``gap`` new tokens, as one more segment with its own statistics; the code
  re-quantises the whole cache every gap (the dequantised old tokens with the new ones, statistics over all),
  which quantises the prompt again and again and needs dynamic shapes.
* Kept: a value "row" is the ``j``-th token of its class *of every kv head* (the code gathers per kv head,
  then reshapes ``[B, Hkv, n, D] -> [B, n, Hkv * D]``): with ``Hkv > 1`` and per-head selection one row mixes
  different tokens of different heads; with ``Hkv = 1`` it is a token. At prefill the key selection is also
  the value selection (the code's ``unimportant_ids_v = unimportant_ids_k``).
* The salient set is stored as a packed 1-bit mask per ``(kv head, token)`` (the code keeps int64 indices);
  codes are packed along ``D`` with ``jattn.methods.kv.quantized.pack``. A constant slice (``step = 0``) is
  exact (code 0); a channel with ``max |v| = 0`` gets ``s_c = 1`` (the code divides by zero).
* Attention (``ZipCache.attend``, ``zipcache_decode``): on GPU/TPU (``impl="auto"`` or ``"pallas"``) one new
  token's attention reads the packed classes in place with ``pallas_kernels.decode_quantized``: attention
  over a set of keys does not depend on their order, and a decode token sees every held key, so each class
  (the prompt's and each stream segment's salient and other tokens) is one kernel sequence of its own
  length, its class-wide key statistics repeated per tile, its value rows' statistics per token, and
  ``s_c`` applied to the class's output (``sum_j p_j v_j s_c = s_c sum_j p_j v_j``). The residual is
  attended exactly in XLA, and the parts merge by lse. Each call pads a class's codes to whole tiles of
  ``KERNEL_TILE`` tokens (a copy of the packed bytes, not a float view). Several new tokens at once or a
  window need positions, which the compacted classes do not keep: those, ``impl="xla"`` and the CPU run
  ``jattn.decode_attention`` over the dequantised view. The prompt's own attention is the caller's (full
  precision, as in the code).

Memory: ``zipcache_bytes_per_token`` (formula in its docstring) against ``2 * Hkv * D * 2`` for fp16.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from jattn.core import checks
from jattn.core.reference import softmax_rows
from jattn.core.softmax import merge_partials, merge_sinks
from jattn.methods.kv.quantized import QUANT_BITS, dequantize, no_gradient, pack, packed_size, quantize, unpack
from jattn.ops import decode as decode_op
from jattn.ops.decode import decode_attention
from jattn.ops.dispatch import run_impl
from pallas_kernels import common
from pallas_kernels.decode_quantized import quantized_decode_partials

UNIMPORTANT_RATIO = 0.4
STREAMING_GAP = 100
PROBE_FRACTION = 0.05
DENOMINATORS = ("remaining", "visible", "none")
STREAM_SCORES = ("last_query", "accumulated")
HIGHEST = lax.Precision.HIGHEST
VIEW_TILE = 128     # the decode kernel's default page: the view is padded to a multiple of it
KERNEL_TILE = 16    # tokens per tile when the quantised decode kernel reads a precision class in place


# ---------------------------------------------------------------------------------------------- saliency

def _check_key(key):
    typed = hasattr(key, "dtype") and jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()
    raw = hasattr(key, "dtype") and key.dtype == jnp.uint32 and tuple(key.shape) == (2,)
    if not (typed or raw):
        raise TypeError(f"key must be one JAX PRNG key (jax.random.key(s) or jax.random.PRNGKey(s)), "
                        f"got {checks.describe(key)}")


def _probe_counts(seq_len: int, recent_fraction: float, random_fraction: float) -> tuple[int, int]:
    """``(first recent position, number of random probes)`` as the code computes them."""
    start = int(seq_len - recent_fraction * seq_len)
    n_random = int(random_fraction * seq_len) if start > 0 else 0
    return start, n_random


def probe_positions(key: jax.Array, *, seq_len: int, recent_fraction: float = PROBE_FRACTION,
                    random_fraction: float = PROBE_FRACTION) -> Int[Array, "P"]:
    """The probe query positions: the recent ``[int(T - f_r T), T)`` then ``int(f_x T)`` random earlier ones.

    Args:
      key: a JAX PRNG key (the random probes, drawn with replacement from ``[0, int(T - f_r T))``).
      seq_len: T.
      recent_fraction: f_r (0.05).
      random_fraction: f_x (0.05).

    Returns:
      int32 ``[P]``, recent positions first.

    Raises:
      TypeError: ``key`` is not a PRNG key or a size has the wrong type.
      ValueError: a fraction is outside ``[0, 1]`` or the probe set would be empty.
    """
    _check_key(key)
    seq_len = checks.check_int("seq_len", seq_len)
    recent_fraction = checks.check_float_in("recent_fraction", recent_fraction, 0.0, 1.0)
    random_fraction = checks.check_float_in("random_fraction", random_fraction, 0.0, 1.0)
    start, n_random = _probe_counts(seq_len, recent_fraction, random_fraction)
    if start == seq_len and n_random == 0:
        raise ValueError(f"the probe set is empty for seq_len={seq_len}, recent_fraction={recent_fraction}, "
                         f"random_fraction={random_fraction}; raise a fraction")
    recent = jnp.arange(start, seq_len, dtype=jnp.int32)
    random = jax.random.randint(key, (n_random,), 0, max(start, 1), dtype=jnp.int32)
    return jnp.concatenate([recent, random])


def normalized_attention_score(q_probe: Float[Array, "B P H D"], probe_positions: Int[Array, "P"],
                               k: Float[Array, "B T Hkv D"], *, denominator: str = "remaining",
                               scale: float | None = None) -> Float[Array, "B Hkv T"]:
    """ZipCache's saliency of every key from the attention of a few probe queries.

    ``A = softmax(scale * q_probe k^T)`` with probe ``p`` (at position ``probe_positions[p]``) seeing keys
    ``j <= position``; ``c_j`` sums ``A[:, j]`` over the probes and the query heads of each kv head (query head
    ``h`` reads kv head ``h // (H / Hkv)``); the score is ``c_j / (T - j)`` (``"remaining"``, the official
    code), ``c_j / #{p : position_p >= j}`` (``"visible"``; 0 where no probe sees ``j``) or ``c_j``
    (``"none"``, the accumulated score).

    Args:
      q_probe: ``[B, P, H, D]`` the probe queries.
      probe_positions: ``[P]`` int, their positions in ``[0, T)``.
      k: ``[B, T, Hkv, D]`` the keys.
      denominator: ``"remaining"``, ``"visible"`` or ``"none"``.
      scale: logit scale, default ``D ** -0.5``.

    Returns:
      float32 ``[B, Hkv, T]``.

    Raises:
      TypeError: an array has the wrong kind of dtype.
      ValueError: shapes disagree, a (concrete) position is out of range, or ``denominator`` is unknown.
    """
    checks.check_float_array("q_probe", q_probe, 4)
    checks.check_float_array("k", k, 4)
    B, P, H, D = q_probe.shape
    T, Hkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, T, Hkv, D={D}] like q_probe, got {checks.describe(k)}")
    if H % Hkv:
        raise ValueError(f"q_probe's heads H={H} must be a multiple of k's kv heads Hkv={Hkv}")
    if not hasattr(probe_positions, "dtype") or not jnp.issubdtype(probe_positions.dtype, jnp.integer):
        raise TypeError(f"probe_positions must be an integer array [P], got {checks.describe(probe_positions)}")
    if tuple(probe_positions.shape) != (P,):
        raise ValueError(f"probe_positions must have shape [P] = ({P},) like q_probe, got "
                         f"{checks.describe(probe_positions)}")
    if not checks.is_traced(probe_positions) and P:
        values = np.asarray(probe_positions)
        if values.min() < 0 or values.max() >= T:
            raise ValueError(f"probe_positions must lie in [0, T={T}), got {values.tolist()}")
    checks.check_choice("denominator", denominator, DENOMINATORS)
    scale = D ** -0.5 if scale is None else checks.check_positive_float("scale", scale, allow_none=False)
    qg = q_probe.astype(jnp.float32).reshape(B, P, Hkv, H // Hkv, D)
    logits = jnp.einsum("bpkgd,btkd->bkgpt", qg, k.astype(jnp.float32), precision=HIGHEST) * scale
    visible = jnp.arange(T)[None, :] <= probe_positions[:, None]                    # [P, T]
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    column = jnp.sum(probs, axis=(2, 3))                                             # [B, Hkv, T]
    if denominator == "remaining":
        return column / (T - jnp.arange(T, dtype=jnp.float32))
    if denominator == "visible":
        count = jnp.sum(visible, axis=0).astype(jnp.float32)
        return column / jnp.maximum(count, 1.0)
    return column


def unimportant_count(length: int, unimportant_ratio: float) -> int:
    """Non-salient tokens of a segment of ``length`` tokens: ``int(unimportant_ratio * length)`` (the code's)."""
    return int(unimportant_ratio * length)


def select_salient(scores: Float[Array, "B Hkv T"], *, unimportant_ratio: float = UNIMPORTANT_RATIO
                   ) -> Bool[Array, "B Hkv T"]:
    """True for the salient tokens: all but the ``int(r T)`` lowest scores of each ``(sequence, kv head)``.

    Args:
      scores: ``[B, Hkv, T]`` saliency.
      unimportant_ratio: r in ``[0, 1]``.

    Returns:
      bool ``[B, Hkv, T]``; ties among the lowest go to the lower position first.

    Raises:
      TypeError: ``scores`` is not a float array, or ``unimportant_ratio`` is not a number.
      ValueError: ``scores`` is not rank 3, or ``unimportant_ratio`` is not in [0, 1].
    """
    checks.check_float_array("scores", scores, 3)
    ratio = checks.check_float_in("unimportant_ratio", unimportant_ratio, 0.0, 1.0)
    n_low = unimportant_count(scores.shape[-1], ratio)
    order = jnp.argsort(scores, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    return rank >= n_low


# ------------------------------------------------------------------------------------------- quantisers

def quantize_channelwise(x: Float[Array, "B Hkv L D"], *, bits: int):
    """Per-channel min-max quantisation over tokens: one ``(scale, min)`` per ``(b, kv head, channel)``.

    Args:
      x: head-major ``[B, Hkv, L, D]``.
      bits: 2, 4 or 8.

    Returns:
      ``(codes uint8 [B, Hkv, L, D], scale [B, Hkv, 1, D], minimum [B, Hkv, 1, D])``.
    """
    checks.check_float_array("x", x, 4)
    return quantize(x, bits=bits, axis=2)


def quantize_tokenwise(x: Float[Array, "B Hkv L D"], *, bits: int):
    """Per-token min-max quantisation: one ``(scale, min)`` per ``(b, token)`` over all ``Hkv * D`` channels.

    Args:
      x: head-major ``[B, Hkv, L, D]``.
      bits: 2, 4 or 8.

    Returns:
      ``(codes uint8 [B, Hkv, L, D], scale [B, 1, L, 1], minimum [B, 1, L, 1])``.
    """
    checks.check_float_array("x", x, 4)
    return quantize(x, bits=bits, axis=(1, 3))


def channel_balancer(x: Float[Array, "B Hkv L D"]) -> Float[Array, "B Hkv 1 D"]:
    """ZipCache's value channel scale ``s_c = sqrt(max_t |x_tc|)`` (1 for an all-zero channel)."""
    checks.check_float_array("x", x, 4)
    s = jnp.sqrt(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=2, keepdims=True))
    return jnp.where(s > 0, s, 1.0).astype(x.dtype)


def quantize_channel_separable_tokenwise(x: Float[Array, "B Hkv L D"], *, bits: int):
    """Channel-separable token-wise quantisation: ``x / s_c`` quantised per token, ``s_c = sqrt(max_t |x_tc|)``.

    Dequantise with ``dequantize(codes, scale, minimum) * channel_scale``.

    Args:
      x: head-major ``[B, Hkv, L, D]``.
      bits: 2, 4 or 8.

    Returns:
      ``(codes [B, Hkv, L, D], scale [B, 1, L, 1], minimum [B, 1, L, 1], channel_scale [B, Hkv, 1, D])``.
    """
    channel_scale = channel_balancer(x)
    codes, scale, minimum = quantize_tokenwise((x / channel_scale).astype(x.dtype), bits=bits)
    return codes, scale, minimum, channel_scale


# ----------------------------------------------------------------------------------- compressed segment

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ZipCompressedKV:
    """One segment of ``length`` tokens, mixed precision, packed (head-major)."""
    salient: jax.Array        # [B, Hkv, ceil(L / 8)] uint8: 1 bit per token, 1 = salient
    k_high: jax.Array         # [B, Hkv, n_high, ceil(D * bits_high / 8)] uint8, salient tokens in position order
    k_high_scale: jax.Array   # [B, Hkv, 1, D]
    k_high_min: jax.Array     # [B, Hkv, 1, D]
    k_low: jax.Array          # [B, Hkv, n_low, ceil(D * bits_low / 8)] uint8
    k_low_scale: jax.Array    # [B, Hkv, 1, D]
    k_low_min: jax.Array      # [B, Hkv, 1, D]
    v_high: jax.Array         # [B, Hkv, n_high, ceil(D * bits_high / 8)] uint8
    v_high_scale: jax.Array   # [B, 1, n_high, 1]
    v_high_min: jax.Array     # [B, 1, n_high, 1]
    v_low: jax.Array          # [B, Hkv, n_low, ceil(D * bits_low / 8)] uint8
    v_low_scale: jax.Array    # [B, 1, n_low, 1]
    v_low_min: jax.Array      # [B, 1, n_low, 1]
    v_channel_scale: jax.Array  # [B, Hkv, 1, D]
    length: int = dataclasses.field(metadata=dict(static=True))
    head_dim: int = dataclasses.field(metadata=dict(static=True))
    bits_high: int = dataclasses.field(default=4, metadata=dict(static=True))
    bits_low: int = dataclasses.field(default=2, metadata=dict(static=True))

    @property
    def nbytes(self) -> int:
        """Bytes stored (all arrays)."""
        return sum(int(leaf.nbytes) for leaf in jax.tree_util.tree_leaves(self))

    def salient_mask(self) -> Bool[Array, "B Hkv L"]:
        """Which tokens got ``bits_high``."""
        return unpack(self.salient, bits=1, n=self.length).astype(bool)

    def dequantized(self) -> tuple[Float[Array, "B Hkv L D"], Float[Array, "B Hkv L D"]]:
        """``(k, v)`` head-major ``[B, Hkv, L, D]`` in the stored scales' dtype."""
        D = self.head_dim
        order = jnp.argsort(~self.salient_mask(), axis=-1, stable=True)    # salient positions, then the rest
        back = jnp.argsort(order, axis=-1)[..., None]

        def restore(high, low):
            return jnp.take_along_axis(jnp.concatenate([high, low], axis=2), back, axis=2)

        k = restore(dequantize(unpack(self.k_high, bits=self.bits_high, n=D), self.k_high_scale, self.k_high_min),
                    dequantize(unpack(self.k_low, bits=self.bits_low, n=D), self.k_low_scale, self.k_low_min))
        v = restore(dequantize(unpack(self.v_high, bits=self.bits_high, n=D), self.v_high_scale, self.v_high_min),
                    dequantize(unpack(self.v_low, bits=self.bits_low, n=D), self.v_low_scale, self.v_low_min))
        return k, (v.astype(jnp.float32) * self.v_channel_scale.astype(jnp.float32)).astype(v.dtype)


def _quantize_class(x, quantizer, bits: int, stats_shape):
    """``quantizer`` on one class's tokens ``[B, Hkv, n, D]``, packed; an empty class gets empty codes and
    zero statistics of ``stats_shape``."""
    B, Hkv, n, D = x.shape
    if n == 0:
        zeros = jnp.zeros(stats_shape, x.dtype)
        return jnp.zeros((B, Hkv, 0, packed_size(D, bits)), jnp.uint8), zeros, zeros
    codes, scale, minimum = quantizer(x, bits=bits)
    return pack(codes, bits=bits), scale, minimum


def compress_with_scores(k: Float[Array, "B L Hkv D"], v: Float[Array, "B L Hkv D"], scores: Float[Array, "B Hkv L"],
                         *, unimportant_ratio: float = UNIMPORTANT_RATIO, bits_high: int = 4, bits_low: int = 2
                         ) -> ZipCompressedKV:
    """Compresses one segment: ``select_salient(scores)`` then ZipCache's key and value quantisers per class.

    Args:
      k: ``[B, L, Hkv, D]`` keys.
      v: ``[B, L, Hkv, D]`` values (same dtype).
      scores: ``[B, Hkv, L]`` saliency (any: normalised, accumulated, random).
      unimportant_ratio: r: the ``int(r L)`` lowest scores per kv head get ``bits_low``.
      bits_high: bits of the salient tokens (2, 4 or 8).
      bits_low: bits of the others (2, 4 or 8).

    Returns:
      The ``ZipCompressedKV`` segment.

    Raises:
      TypeError: an array is not a float array.
      ValueError: shapes or dtypes disagree, or a ratio or bit width is out of range.
    """
    checks.check_float_array("k", k, 4)
    checks.check_float_array("v", v, 4)
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"k and v must have the same shape [B, L, Hkv, D] and dtype, got k {checks.describe(k)} "
                         f"and v {checks.describe(v)}")
    B, L, Hkv, D = k.shape
    checks.check_float_array("scores", scores, 3)
    if tuple(scores.shape) != (B, Hkv, L):
        raise ValueError(f"scores must be [B, Hkv, L] = {(B, Hkv, L)}, got {checks.describe(scores)}")
    checks.check_choice("bits_high", bits_high, QUANT_BITS)
    checks.check_choice("bits_low", bits_low, QUANT_BITS)
    salient = select_salient(scores, unimportant_ratio=unimportant_ratio)
    n_high = L - unimportant_count(L, float(unimportant_ratio))
    order = jnp.argsort(~salient, axis=-1, stable=True)[..., None]
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    channel_scale = channel_balancer(vh)
    keys = jnp.take_along_axis(kh, order, axis=2)
    values = jnp.take_along_axis((vh / channel_scale).astype(v.dtype), order, axis=2)
    key_stats, value_stats = (B, Hkv, 1, D), (B, 1, 0, 1)
    k_high = _quantize_class(keys[:, :, :n_high], quantize_channelwise, bits_high, key_stats)
    k_low = _quantize_class(keys[:, :, n_high:], quantize_channelwise, bits_low, key_stats)
    v_high = _quantize_class(values[:, :, :n_high], quantize_tokenwise, bits_high, value_stats)
    v_low = _quantize_class(values[:, :, n_high:], quantize_tokenwise, bits_low, value_stats)
    return ZipCompressedKV(pack(salient.astype(jnp.uint8), bits=1), *k_high, *k_low, *v_high, *v_low, channel_scale,
                           length=L, head_dim=D, bits_high=bits_high, bits_low=bits_low)


def _check_options(key, *, unimportant_ratio, bits_high, bits_low, recent_fraction, random_fraction, denominator,
                   scale):
    """Every option of ``compress_kv``, checked before anything is computed."""
    _check_key(key)
    checks.check_float_in("unimportant_ratio", unimportant_ratio, 0.0, 1.0)
    checks.check_choice("bits_high", bits_high, QUANT_BITS)
    checks.check_choice("bits_low", bits_low, QUANT_BITS)
    checks.check_float_in("recent_fraction", recent_fraction, 0.0, 1.0)
    checks.check_float_in("random_fraction", random_fraction, 0.0, 1.0)
    checks.check_choice("denominator", denominator, DENOMINATORS)
    checks.check_positive_float("scale", scale)


def compress_kv(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"],
                key: jax.Array, *, unimportant_ratio: float = UNIMPORTANT_RATIO, bits_high: int = 4,
                bits_low: int = 2, recent_fraction: float = PROBE_FRACTION, random_fraction: float = PROBE_FRACTION,
                denominator: str = "remaining", scale: float | None = None) -> ZipCompressedKV:
    """ZipCache's prefill compression of a prompt's K/V: probe saliency, then mixed-precision quantisation.

    Args:
      q: ``[B, T, H, D]`` the prompt's queries.
      k: ``[B, T, Hkv, D]`` its keys.
      v: ``[B, T, Hkv, D]`` its values.
      key: a JAX PRNG key (the random probes).
      unimportant_ratio: r (0.4).
      bits_high: salient tokens' bits (4).
      bits_low: the others' bits (2).
      recent_fraction: recent probes' fraction of T (0.05).
      random_fraction: random probes' fraction of T (0.05).
      denominator: the score's normaliser, ``"remaining"`` (the code's ``T - j``), ``"visible"`` or ``"none"``.
      scale: logit scale, default ``D ** -0.5``.

    Returns:
      The ``ZipCompressedKV`` of the T tokens.

    Raises:
      TypeError: a dtype, the key or an option's type is wrong (named).
      ValueError: a shape or an option's value is wrong (named).
    """
    checks.check_self_attention_qkv(q, k, v, "compress_kv")
    _check_options(key, unimportant_ratio=unimportant_ratio, bits_high=bits_high, bits_low=bits_low,
                   recent_fraction=recent_fraction, random_fraction=random_fraction, denominator=denominator,
                   scale=scale)
    positions = probe_positions(key, seq_len=q.shape[1], recent_fraction=recent_fraction,
                                random_fraction=random_fraction)
    scores = normalized_attention_score(q[:, positions], positions, k, denominator=denominator, scale=scale)
    return compress_with_scores(k, v, scores, unimportant_ratio=unimportant_ratio, bits_high=bits_high,
                                bits_low=bits_low)


def zipcache_bytes_per_token(*, head_dim: int, kv_heads: int, length: int,
                             unimportant_ratio: float = UNIMPORTANT_RATIO, bits_high: int = 4, bits_low: int = 2,
                             scale_bytes: int = 2) -> float:
    """KV bytes per token per layer of a ``ZipCompressedKV`` segment of ``length`` tokens (one sequence).

    With ``n_low = int(r L)``, ``n_high = L - n_low``, ``pk(b) = ceil(D b / 8)``::

        [ 2 Hkv (n_high pk(bits_high) + n_low pk(bits_low))   key and value codes
        + 2 * 2 * Hkv * D * scale_bytes                        key (scale, min) per class and channel
        + 2 * L * scale_bytes                                  value (scale, min) per row
        + Hkv * D * scale_bytes                                value channel scales s_c
        + Hkv * ceil(L / 8) ] / L                              the salient bit mask

    against ``2 * Hkv * D * 2`` for fp16. At the defaults (r = 0.4, 4/2 bits) the codes average
    ``0.6 * 4 + 0.4 * 2 = 3.2`` bits per element; the per-segment statistics shrink as ``1 / L`` and the
    per-row value statistics and the mask add ``(2 * scale_bytes + Hkv / 8)`` bytes per token.

    Args:
      head_dim: D.
      kv_heads: Hkv.
      length: L, tokens in the segment.
      unimportant_ratio: r.
      bits_high: salient bits.
      bits_low: other bits.
      scale_bytes: bytes of one stored scale or min (2: fp16; the stored dtype's size).

    Returns:
      Bytes per token (a float).

    Raises:
      TypeError: a size is not an int.
      ValueError: a size is not positive, or a ratio or bit width is out of range.
    """
    for name, value in (("head_dim", head_dim), ("kv_heads", kv_heads), ("length", length),
                        ("scale_bytes", scale_bytes)):
        checks.check_int(name, value)
    ratio = checks.check_float_in("unimportant_ratio", unimportant_ratio, 0.0, 1.0)
    checks.check_choice("bits_high", bits_high, QUANT_BITS)
    checks.check_choice("bits_low", bits_low, QUANT_BITS)
    D, Hkv, L = head_dim, kv_heads, length
    n_low = unimportant_count(L, ratio)
    n_high = L - n_low
    codes = 2 * Hkv * (n_high * packed_size(D, bits_high) + n_low * packed_size(D, bits_low))
    stats = 4 * Hkv * D * scale_bytes + 2 * L * scale_bytes + Hkv * D * scale_bytes
    mask = Hkv * packed_size(L, 1)
    return (codes + stats + mask) / L


# ------------------------------------------------------------------------------------ streaming decode

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ZipCache:
    """A ZipCache for decoding: the compressed prompt, fixed slots for the compressed stream segments, and a
    full-precision residual of up to ``streaming_gap`` new tokens (all sequences share one length)."""
    prompt: ZipCompressedKV
    stream: ZipCompressedKV        # every leaf has a leading [segments] axis; unfilled slots are zeros
    residual_k: jax.Array          # [B, Hkv, gap, D]
    residual_v: jax.Array          # [B, Hkv, gap, D]
    residual_score: jax.Array      # [B, Hkv, gap] float32: the new tokens' saliency so far
    length: jax.Array              # int32 scalar: tokens held; capacity + 1 once an append overflowed
    accumulate: jax.Array          # bool scalar: stream_score "accumulated" (else "last_query"); data, not a
    #                                static field, so both modes share one compiled decode step
    unimportant_ratio: float = dataclasses.field(default=UNIMPORTANT_RATIO, metadata=dict(static=True))
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))

    @property
    def prompt_length(self) -> int:
        return self.prompt.length

    @property
    def streaming_gap(self) -> int:
        return self.residual_k.shape[2]

    @property
    def segments(self) -> int:
        return self.stream.salient.shape[0]

    @property
    def capacity(self) -> int:
        return self.prompt_length + self.segments * self.streaming_gap

    @property
    def view_length(self) -> int:
        """Keys in the dequantised view: the capacity rounded up to a multiple of ``VIEW_TILE`` (zeros past
        ``length``), so the decode kernel has a legal tile (``impl="auto"`` on GPU/TPU)."""
        return -(-self.capacity // VIEW_TILE) * VIEW_TILE

    @property
    def dtype(self):
        return self.residual_k.dtype

    @property
    def lengths(self) -> Int[Array, "B"]:
        """``[B]`` for ``decode_attention`` over the view: ``length``, or ``view_length + 1`` once overflowed
        (``decode_attention`` then gives NaN rows)."""
        return _lengths(self.length, self.capacity, self.view_length, self.residual_k.shape[0])

    def dequantized(self) -> tuple[Float[Array, "B Hkv S D"], Float[Array, "B Hkv S D"]]:
        """``(k, v)`` as ``[B, Hkv, view_length, D]``: prompt, compressed segments, then the residual (exact),
        zeros past ``length``."""
        return _view(self, self.residual_k, self.residual_v, _filled(self))

    def attend(self, q: Float[Array, "B *Tq H D"], *, window=None, sinks: Float[Array, "H"] | None = None,
               softcap: float | None = None, return_lse: bool = False, impl: str = "auto",
               num_splits: int | None = None, interpret=None, poison_outputs: bool = False):
        """``jattn.decode_attention``'s contract for ``q`` (its tokens already held) over this cache.

        Args:
          q: ``[B, H, D]`` or ``[B, Tq, H, D]`` in the cache's dtype (causal within the new tokens).
          window, sinks, softcap, return_lse: as ``jattn.decode_attention``.
          impl: "auto" | "pallas" | "xla" | "reference". "pallas" (and "auto" on GPU/TPU) reads the packed
            classes in place with the quantised decode kernel when ``Tq == 1`` and there is no window (else
            the float decode kernel over the dequantised view); "xla" and "reference" attend over the view.
          num_splits, interpret, poison_outputs: the quantised kernel's (see ``quantized_decode_attention``).

        Returns:
          ``out`` like ``q`` (and its float32 lse with ``return_lse``); NaN rows once the cache overflowed.
        """
        checks.check_float_array("q", q)
        if q.ndim not in (3, 4):
            raise ValueError(f"q must be [B, H, D] or [B, Tq, H, D], got {checks.describe(q)}")
        filled = _filled(self)
        held = self.length - self.prompt_length - filled * self.streaming_gap
        out, lse = _attend(self, q[:, None] if q.ndim == 3 else q, filled, held, self.lengths,
                           dict(window=window, sinks=sinks, softcap=softcap, impl=impl, num_splits=num_splits,
                                interpret=interpret, poison_outputs=poison_outputs))
        if q.ndim == 3:
            out, lse = out[:, 0], lse[:, 0]
        return (out, lse) if return_lse else out


def _lengths(length, capacity: int, view_length: int, batch: int):
    return jnp.full((batch,), jnp.where(length > capacity, view_length + 1, length), jnp.int32)


def _filled(cache: ZipCache):
    return (cache.length - cache.prompt_length) // cache.streaming_gap


def _view(cache: ZipCache, residual_k, residual_v, filled):
    k_prompt, v_prompt = cache.prompt.dequantized()
    k_stream, v_stream = jax.vmap(ZipCompressedKV.dequantized)(cache.stream)   # [segments, B, Hkv, gap, D]

    view = cache.view_length

    def lay_out(prompt, stream, residual):
        stream = jnp.moveaxis(stream, 0, 2).reshape(*prompt.shape[:2], -1, prompt.shape[3])
        gap = residual.shape[2]
        pad = max(gap, view - cache.capacity)
        buffer = jnp.pad(jnp.concatenate([prompt, stream], axis=2), ((0, 0), (0, 0), (0, pad), (0, 0)))
        start = cache.prompt_length + filled * gap
        buffer = lax.dynamic_update_slice_in_dim(buffer, residual.astype(buffer.dtype), start, axis=2)
        return buffer[:, :, :view]
    return lay_out(k_prompt, k_stream, residual_k), lay_out(v_prompt, v_stream, residual_v)


# --------------------------------------------------------------------- attention: in place or over the view

def _attend(cache: ZipCache, q4, filled, held, lengths, options: dict):
    """``(out [B, Tq, H, D] in q's dtype, lse [B, Tq, H])`` of ``q4`` over the cache with ``filled`` stream
    segments compressed and ``held`` residual tokens (``lengths``: the view's, for the view paths)."""
    _, Tq, H, D = q4.shape
    B, Hkv = cache.residual_k.shape[:2]
    if q4.dtype != cache.dtype or q4.shape[0] != B or D != cache.residual_k.shape[3] or H % Hkv:
        raise ValueError(f"q must be [B={B}, (Tq,) H, D={cache.residual_k.shape[3]}] "
                         f"in the cache's dtype {cache.dtype} with H a multiple of Hkv={Hkv}, got "
                         f"{checks.describe(q4)}")
    impl = options["impl"]
    checks.check_choice("impl", impl, checks.IMPLS)
    view_options = dict(window=options["window"], softcap=options["softcap"], scale=cache.scale, return_lse=True)

    def over_view(impl_name):
        def run(q4, cache, sinks):
            k, v = _view(cache, cache.residual_k, cache.residual_v, filled)
            out, lse = decode_attention(q4, k, v, lengths, sinks=sinks, impl=impl_name, **view_options)
            return out.astype(jnp.float32), lse
        return run

    def pallas(q4, cache, sinks):
        problem = _kernel_problem(cache, Tq, options["window"])
        if problem is not None:
            return over_view("pallas")(q4, cache, sinks)
        plan = (("interpret", options["interpret"]), ("num_splits", options["num_splits"]),
                ("poison_outputs", bool(options["poison_outputs"])), ("softcap", options["softcap"]))
        out, lse = _pallas_zip(plan, q4, cache, filled, held)
        out = jnp.where(cache.length > cache.capacity, jnp.nan, out)     # overflowed: NaN rows, as the view's
        lse = jnp.where(cache.length > cache.capacity, jnp.nan, lse)
        return (out, lse) if sinks is None else merge_sinks(out, lse, sinks)

    out, lse = run_impl(impl, (q4, cache, options["sinks"]), xla=over_view("xla"), pallas=pallas,
                        reference=over_view("reference"))
    return out.astype(q4.dtype), lse


def _kernel_problem(cache: ZipCache, new_tokens: int, window) -> str | None:
    """Why one call cannot read the packed classes in place (it then runs over the view), or None."""
    D = cache.residual_k.shape[3]
    if new_tokens != 1 or window is not None:
        return "several new tokens or a window need key positions, which the compacted classes do not keep"
    bits = (cache.prompt.bits_high, cache.prompt.bits_low)
    if D < common.MIN_DOT_DIM or D & (D - 1) or min(packed_size(D, b) for b in bits) < common.MIN_DOT_DIM:
        return f"the quantised kernel needs D a power of two with D * bits / 8 >= {common.MIN_DOT_DIM}"
    return None


def _class_partial(plan: dict, rows, codes_k, k_scale, k_min, codes_v, v_scale, v_min, channel_scale, counts,
                   *, bits: int, group: int):
    """One precision class of ``Bp`` segments through the quantised kernel: ``(out [Bp, Hkv, R, D] with s_c
    applied, lse [Bp, Hkv, R])`` over each segment's first ``counts`` tokens of the class."""
    Bp, Hkv, n, _ = codes_k.shape
    D = k_scale.shape[-1]
    tiles = -(-n // KERNEL_TILE)

    def tiled(x):  # [Bp, Hkv, n, w] -> [Bp, Hkv, tiles, KERNEL_TILE, w], zeros past n (masked by counts)
        return common.pad_axis(x, 2, tiles * KERNEL_TILE).reshape(Bp, Hkv, tiles, KERNEL_TILE, x.shape[-1])

    def per_tile(stat):  # a class-wide [Bp, Hkv, 1, D] key statistic, one row per tile
        return jnp.broadcast_to(stat[:, :, None], (Bp, Hkv, tiles, 1, D))

    def per_token(stat):  # a value row's [Bp, 1, n, 1] statistic, shared by the kv heads
        return tiled(jnp.broadcast_to(stat, (Bp, Hkv, n, 1)))

    splits, per_split = decode_op.split_plan(Bp, Hkv, tiles, plan["num_splits"])
    rounded = -(-counts // KERNEL_TILE) * KERNEL_TILE
    out, lse = quantized_decode_partials(
        rows, tiled(codes_k), per_tile(k_scale), per_tile(k_min), tiled(codes_v), per_token(v_scale),
        per_token(v_min), counts, bits=bits, new_tokens=1, group=group, num_splits=splits,
        tiles_per_split=per_split, scale=plan["scale"], softcap=plan["softcap"], interpret=plan["interpret"],
        poison_outputs=plan["poison_outputs"], quantized_lengths=rounded)
    out, lse = merge_partials(jnp.moveaxis(out, 2, 0), jnp.moveaxis(lse[..., 0], 2, 0))
    return out * channel_scale.astype(jnp.float32), lse


def _segment_partials(plan: dict, rows, segment: ZipCompressedKV, filled_high, filled_low, group: int):
    """Both classes of ``Bp`` segments (``segment``'s leaves ``[Bp, ...]``), as ``[(out, lse), ...]``."""
    parts = []
    for codes_k, k_scale, k_min, codes_v, v_scale, v_min, bits, counts in (
            (segment.k_high, segment.k_high_scale, segment.k_high_min, segment.v_high, segment.v_high_scale,
             segment.v_high_min, segment.bits_high, filled_high),
            (segment.k_low, segment.k_low_scale, segment.k_low_min, segment.v_low, segment.v_low_scale,
             segment.v_low_min, segment.bits_low, filled_low)):
        if codes_k.shape[2]:                                      # an empty class (r = 0 or 1) has no keys
            parts.append(_class_partial(plan, rows, codes_k, k_scale, k_min, codes_v, v_scale, v_min,
                                        segment.v_channel_scale, counts, bits=bits, group=group))
    return parts


def _residual_partial(plan: dict, rows, residual_k, residual_v, held):
    """The exact residual's first ``held`` tokens for packed rows ``[B, Hkv, R, D]``: ``(out, lse)``."""
    s = jnp.einsum("bkrd,bkjd->bkrj", rows.astype(jnp.float32), residual_k.astype(jnp.float32),
                   precision=HIGHEST) * plan["scale"]
    if plan["softcap"] is not None:
        s = plan["softcap"] * jnp.tanh(s / plan["softcap"])
    s = jnp.where(jnp.arange(residual_k.shape[2]) < held, s, -jnp.inf)
    p, lse = softmax_rows(s)
    return jnp.einsum("bkrj,bkjd->bkrd", p, residual_v.astype(jnp.float32), precision=HIGHEST), lse


def _kernel_attend(plan: tuple, q4, cache: ZipCache, filled, held):
    """One new token over the packed prompt, the filled stream segments and the residual, merged by lse."""
    plan = dict(plan, scale=cache.scale)
    B, _, H, D = q4.shape
    Hkv = cache.residual_k.shape[1]
    group, S = H // Hkv, cache.segments
    rows = decode_op._pack_rows(q4, Hkv)                                      # [B, Hkv, R, D]
    prompt = cache.prompt
    n_high = prompt.k_high.shape[2]
    parts = _segment_partials(plan, rows, prompt, jnp.full((B,), n_high, jnp.int32),
                              jnp.full((B,), prompt.k_low.shape[2], jnp.int32), group)
    # the stream's segments become sequences of their own: [S, B, ...] -> [S * B, ...]
    stream = jax.tree.map(lambda x: x.reshape(S * B, *x.shape[2:]), cache.stream)
    is_filled = jnp.repeat(jnp.arange(S) < filled, B)
    stream_rows = jnp.broadcast_to(rows[None], (S, *rows.shape)).reshape(S * B, *rows.shape[1:])
    counts = [jnp.where(is_filled, cache.stream.k_high.shape[3], 0).astype(jnp.int32),
              jnp.where(is_filled, cache.stream.k_low.shape[3], 0).astype(jnp.int32)]
    for out, lse in _segment_partials(plan, stream_rows, stream, *counts, group):
        parts += list(zip(out.reshape(S, *rows.shape), lse.reshape(S, *rows.shape[:3])))
    parts.append(_residual_partial(plan, rows, cache.residual_k, cache.residual_v, held))
    out, lse = merge_partials(*zip(*parts))
    return decode_op._unpack_rows(out, 1, H), decode_op._unpack_rows(lse, 1, H)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pallas_zip(plan, q4, cache, filled, held):
    return _kernel_attend(plan, q4, cache, filled, held)


def _pallas_zip_fwd(plan, q4, cache, filled, held):
    return _kernel_attend(plan, q4, cache, filled, held), (q4, cache, filled, held)


def _pallas_zip_bwd(plan, residuals, cotangents):
    """The query's gradient through attention over the dequantised view (the same function); the codes,
    statistics and counters get none."""
    q4, cache, filled, held = residuals
    softcap = dict(plan)["softcap"]

    def dense(q4):
        k, v = _view(cache, cache.residual_k, cache.residual_v, filled)
        lengths = jnp.full((q4.shape[0],), cache.prompt_length + filled * cache.streaming_gap + held, jnp.int32)
        out, lse = decode_attention(q4, k, v, lengths, softcap=softcap, scale=cache.scale, return_lse=True,
                                    impl="xla")
        return out.astype(jnp.float32), lse
    _, vjp = jax.vjp(dense, q4)
    return (vjp(cotangents)[0], jax.tree.map(no_gradient, cache), no_gradient(filled), no_gradient(held))


_pallas_zip.defvjp(_pallas_zip_fwd, _pallas_zip_bwd)


def zipcache_prefill(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"],
                     key: jax.Array, *, max_new_tokens: int, streaming_gap: int = STREAMING_GAP,
                     unimportant_ratio: float = UNIMPORTANT_RATIO, bits_high: int = 4, bits_low: int = 2,
                     recent_fraction: float = PROBE_FRACTION, random_fraction: float = PROBE_FRACTION,
                     denominator: str = "remaining", stream_score: str = "last_query",
                     scale: float | None = None) -> ZipCache:
    """A ``ZipCache`` holding the compressed prompt, with room for ``max_new_tokens`` (rounded up to whole
    streaming gaps).

    Args:
      q: ``[B, T, H, D]`` the prompt's queries (probes).
      k: ``[B, T, Hkv, D]`` its keys.
      v: ``[B, T, Hkv, D]`` its values.
      key: a JAX PRNG key (the random probes).
      max_new_tokens: tokens to decode at most.
      streaming_gap: new tokens compressed together (100).
      unimportant_ratio: r (0.4), prompt and stream.
      bits_high: salient bits (4).
      bits_low: other bits (2).
      recent_fraction: recent probes' fraction (0.05).
      random_fraction: random probes' fraction (0.05).
      denominator: the prompt score's normaliser (``"remaining"``, ``"visible"``, ``"none"``).
      stream_score: the new tokens' score, ``"last_query"`` (the code) or ``"accumulated"``.
      scale: logit scale, default ``D ** -0.5`` (probes and decode).

    Returns:
      The cache, ``length = T``.

    Raises:
      TypeError: a dtype, the key or an option's type is wrong (named).
      ValueError: a shape or an option's value is wrong (named).
    """
    checks.check_self_attention_qkv(q, k, v, "zipcache_prefill")
    checks.check_int("max_new_tokens", max_new_tokens)
    gap = checks.check_int("streaming_gap", streaming_gap)
    checks.check_choice("stream_score", stream_score, STREAM_SCORES)
    _check_options(key, unimportant_ratio=unimportant_ratio, bits_high=bits_high, bits_low=bits_low,
                   recent_fraction=recent_fraction, random_fraction=random_fraction, denominator=denominator,
                   scale=scale)
    prompt = compress_kv(q, k, v, key, unimportant_ratio=unimportant_ratio, bits_high=bits_high, bits_low=bits_low,
                         recent_fraction=recent_fraction, random_fraction=random_fraction,
                         denominator=denominator, scale=scale)
    B, T, Hkv, D = k.shape
    segments = -(-max_new_tokens // gap)
    stream = _empty_segments(segments, jax.ShapeDtypeStruct((B, gap, Hkv, D), k.dtype),
                             unimportant_ratio=unimportant_ratio, bits_high=bits_high, bits_low=bits_low)
    zeros = jnp.zeros((B, Hkv, gap, D), k.dtype)
    return ZipCache(prompt, stream, zeros, zeros, jnp.zeros((B, Hkv, gap), jnp.float32), jnp.int32(T),
                    jnp.asarray(stream_score == "accumulated"), unimportant_ratio=float(unimportant_ratio),
                    scale=D ** -0.5 if scale is None else float(scale))


def _empty_segments(segments: int, kv: jax.ShapeDtypeStruct, **options) -> ZipCompressedKV:
    """``segments`` zero-filled segments shaped like ``compress_with_scores`` of ``kv [B, gap, Hkv, D]``."""
    def compress(kv):
        scores = jnp.zeros((kv.shape[0], kv.shape[2], kv.shape[1]), jnp.float32)
        return compress_with_scores(kv, kv, scores, **options)
    template = jax.eval_shape(compress, kv)
    return jax.tree_util.tree_map(lambda s: jnp.zeros((segments,) + s.shape, s.dtype), template)


def _residual_attention(q, residual_k, lse, scale: float):
    """``[B, Hkv, gap]``: the attention ``q [B, H, D]`` pays each residual slot, summed over the group's heads
    (``lse [B, H]`` from the full decode attention, so the softmax runs over the whole cache)."""
    B, H, D = q.shape
    Hkv = residual_k.shape[1]
    qg = q.astype(jnp.float32).reshape(B, Hkv, H // Hkv, D)
    logits = jnp.einsum("bkgd,bktd->bkgt", qg, residual_k.astype(jnp.float32), precision=HIGHEST) * scale
    return jnp.sum(jnp.exp(logits - lse.reshape(B, Hkv, H // Hkv, 1)), axis=2)


def _decode_token(cache: ZipCache, q, k_tok, v_tok, impl: str):
    """One new token per sequence: ``q [B, H, D]``, ``k_tok, v_tok [B, Hkv, D]``."""
    gap = cache.streaming_gap
    fits = cache.length < cache.capacity
    since = cache.length - cache.prompt_length
    filled, count = since // gap, since % gap
    residual_k = jnp.where(fits, cache.residual_k.at[:, :, count].set(k_tok), cache.residual_k)
    residual_v = jnp.where(fits, cache.residual_v.at[:, :, count].set(v_tok), cache.residual_v)
    length = jnp.where(fits, cache.length + 1, cache.capacity + 1).astype(jnp.int32)
    cache = dataclasses.replace(cache, residual_k=residual_k, residual_v=residual_v, length=length)
    out, lse = _attend(cache, q[:, None], filled, count + 1, _lengths(length, cache.capacity, cache.view_length,
                                                                      q.shape[0]),
                       dict(window=None, sinks=None, softcap=None, impl=impl, num_splits=None, interpret=None,
                            poison_outputs=False))
    out, lse = out[:, 0], lse[:, 0]
    paid = _residual_attention(q, residual_k, lse, cache.scale)
    held = jnp.arange(gap) <= count
    score = jnp.where(cache.accumulate, cache.residual_score + paid, paid)
    score = jnp.where(fits, jnp.where(held, score, 0.0), cache.residual_score)
    cache = dataclasses.replace(cache, residual_score=score)

    def compress(cache):
        segment = compress_with_scores(jnp.swapaxes(cache.residual_k, 1, 2), jnp.swapaxes(cache.residual_v, 1, 2),
                                       cache.residual_score, unimportant_ratio=cache.unimportant_ratio,
                                       bits_high=cache.prompt.bits_high, bits_low=cache.prompt.bits_low)
        stream = jax.tree_util.tree_map(lambda slots, new: slots.at[filled].set(new), cache.stream, segment)
        return dataclasses.replace(cache, stream=stream, residual_k=jnp.zeros_like(cache.residual_k),
                                   residual_v=jnp.zeros_like(cache.residual_v),
                                   residual_score=jnp.zeros_like(cache.residual_score))
    return lax.cond(fits & (count == gap - 1), compress, lambda cache: cache, cache), out


def zipcache_decode(cache: ZipCache, q: Float[Array, "B *Tq H D"], k_new: Float[Array, "B Tq Hkv D"],
                    v_new: Float[Array, "B Tq Hkv D"], *, impl: str = "auto") -> tuple[Float[Array, "B *Tq H D"],
                                                                                         ZipCache]:
    """Decodes ``Tq`` new tokens one at a time: append each token's K/V, attend, and compress the residual
    into the next segment every ``streaming_gap`` tokens.

    Token ``t``'s query sees the cache with tokens ``<= t`` (causal), the not-yet-compressed ones exact.

    Args:
      cache: the ``ZipCache``.
      q: ``[B, H, D]`` (one token) or ``[B, Tq, H, D]``, the cache's dtype.
      k_new: ``[B, Tq, Hkv, D]`` the new tokens' keys.
      v_new: ``[B, Tq, Hkv, D]`` their values.
      impl: ``decode_attention``'s impl.

    Returns:
      ``(out, cache)``: ``out`` like ``q``; the cache after the ``Tq`` tokens.

    Raises:
      ValueError: a shape is wrong, or (concrete length) the tokens pass the capacity.
      TypeError: a dtype is wrong.
    """
    checks.check_float_array("q", q)
    if q.ndim not in (3, 4):
        raise ValueError(f"q must be [B, H, D] or [B, Tq, H, D], got {checks.describe(q)}")
    q4 = q[:, None] if q.ndim == 3 else q
    B, Tq, H, D = q4.shape
    Hkv = cache.residual_k.shape[1]
    for name, x in (("q", q), ("k_new", k_new), ("v_new", v_new)):
        checks.check_float_array(name, x)
        if x.dtype != cache.dtype:
            raise TypeError(f"{name} must have the cache's dtype {cache.dtype}, got {checks.describe(x)}")
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if tuple(x.shape) != (B, Tq, Hkv, D):
            raise ValueError(f"{name} must be [B, Tq, Hkv, D] = {(B, Tq, Hkv, D)} (q's tokens), got "
                             f"{checks.describe(x)}")
    if H % Hkv or cache.residual_k.shape[0] != B or cache.residual_k.shape[3] != D:
        raise ValueError(f"q {checks.describe(q)} does not fit the cache's B={cache.residual_k.shape[0]}, "
                         f"Hkv={Hkv}, D={cache.residual_k.shape[3]}")
    checks.check_choice("impl", impl, checks.IMPLS)
    if not checks.is_traced(cache.length) and int(cache.length) + Tq > cache.capacity:
        raise ValueError(f"decoding {Tq} tokens passes the capacity {cache.capacity} of this ZipCache for all "
                         f"{B} sequences (length {int(cache.length)}); prefill with a larger max_new_tokens")

    def step(cache, token):
        cache, out = _decode_token(cache, *token, impl)
        return cache, out
    cache, out = lax.scan(step, cache, (jnp.moveaxis(q4, 1, 0), jnp.moveaxis(k_new, 1, 0), jnp.moveaxis(v_new, 1, 0)))
    out = jnp.moveaxis(out, 0, 1)
    return (out[:, 0] if q.ndim == 3 else out), cache
