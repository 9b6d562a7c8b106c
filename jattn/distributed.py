"""P03 — DistAttention (Infinite-LLM): exact attention across devices, with JAX's own SPMD (``shard_map``).

Three forms, all exact (they equal single-device ``jattn.attention`` / ``jattn.decode_attention``):

* ``kv_partitioned_attention``: the keys/values are split along the sequence over a mesh axis, the queries
  are replicated; each device attends to its shard and returns ``(out, lse)``, and ``merge_across`` combines
  the partials exactly over the axis (the LSE merge of ``jattn.core.softmax``, as ``pmax``/``psum``).
* ``ring_attention``: context-parallel prefill, forward and backward. q, k, v are split along the sequence;
  K/V blocks travel around the ring (``ppermute``) while each device folds them into its queries' online
  softmax. Causal rings use the zigzag layout (device ``i`` holds sequence chunks ``i`` and ``2n - 1 - i``),
  so every step costs every device the same two chunk-pairs of work and no device idles on fully masked
  blocks. The backward is JAX's transpose of the same program (``ppermute`` reversed, the per-block
  attention's own custom VJP).
* ``sharded_decode_attention``: decode against a KV cache split along the sequence over a mesh axis.

On a real multi-host mesh the code is the same; only the mesh changes (see the README).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jattn.core import checks
from jattn.core.softmax import merge_sinks, merge_two
from jattn.ops import decode as decode_op
from jattn.ops.attention import attention
from jattn.ops.decode_xla import decode_attention_xla


def _shard_map(fn, mesh: Mesh, in_specs, out_specs):
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map
    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _check_mesh(mesh, axis) -> int:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {mesh!r}")
    if axis not in mesh.axis_names:
        raise ValueError(f"axis must be one of the mesh's axes {mesh.axis_names}, got {axis!r}")
    return int(mesh.shape[axis])


def _check_divides(name: str, length: int, parts: int, what: str):
    if length % parts:
        raise ValueError(f"{name}'s sequence length {length} must be a multiple of {parts} ({what})")


class KVMemory(NamedTuple):
    resident: int    # this device's K/V shard, bytes
    in_flight: int   # K/V shards received or being sent around a ring, bytes (0 for the other forms)


FORMS = ("ring", "kv_partitioned", "sharded_decode")


def kv_memory_per_device(*, form: str, context: int, devices: int, batch: int, kv_heads: int, head_dim: int,
                         value_dim: int | None = None, bytes_per_element: int = 4) -> KVMemory:
    """Bytes of K/V each device holds, for ``form`` over a mesh axis of ``devices`` (P03's memory model).

    Every form splits the keys and values along the sequence, so each device keeps
    ``resident = batch * kv_heads * (context / devices) * (head_dim + value_dim) * bytes_per_element``:
    KV memory per device falls as ``1 / devices`` at any context. The ring also holds shards in flight:
    the shard it received last step (the loop's carry) and the one ``ppermute`` is receiving now,
    ``in_flight = 2 * resident``. ``tests/test_distributed.py`` checks ``resident`` against the compiled
    programs' per-device argument bytes and ``in_flight`` against their temp bytes.

    Args:
      form: "ring" | "kv_partitioned" | "sharded_decode".
      context: keys per sequence (a multiple of ``devices``).
      devices: size of the mesh axis the sequence is split over.
      batch: sequences.
      kv_heads: Hkv.
      head_dim: D of the keys.
      value_dim: Dv (default ``head_dim``).
      bytes_per_element: of K and V.

    Returns:
      ``KVMemory(resident, in_flight)`` in bytes per device.
    """
    checks.check_choice("form", form, FORMS)
    for name, value in (("context", context), ("devices", devices), ("batch", batch), ("kv_heads", kv_heads),
                        ("head_dim", head_dim), ("bytes_per_element", bytes_per_element)):
        checks.check_int(name, value)
    _check_divides("context", context, devices, "the number of devices")
    resident = batch * kv_heads * (context // devices) * (head_dim + (value_dim or head_dim)) * bytes_per_element
    return KVMemory(resident, 2 * resident if form == "ring" else 0)


def merge_across(out, lse, axis: str):
    """Exact merge of per-device partials over mesh axis ``axis`` (inside ``shard_map``).

    Args:
      out: ``[..., E]`` this device's partial output.
      lse: ``[...]`` its log-sum-exp (``-inf`` where it saw no key).

    Returns:
      ``(out, lse)`` float32 over the union of every device's keys; rows no device saw give 0 and -inf;
      a NaN partial makes its row NaN.
    """
    lse = lse.astype(jnp.float32)
    top = lax.pmax(lax.stop_gradient(lse), axis)  # a stabiliser only: the result does not depend on it
    safe_top = jnp.where(jnp.isfinite(top), top, 0.0)
    weight = jnp.where(jnp.isneginf(lse), 0.0, jnp.exp(lse - safe_top))
    denom = lax.psum(weight, axis)
    total = lax.psum(weight[..., None] * out.astype(jnp.float32), axis)
    empty = denom == 0
    safe = jnp.where(empty, 1.0, denom)
    return total / safe[..., None], jnp.where(empty, -jnp.inf, safe_top + jnp.log(safe))


def kv_partitioned_attention(q, k, v, *, mesh: Mesh, axis: str, causal: bool = False, scale=None, softcap=None,
                             impl: str = "auto"):
    """Attention with k, v split along the sequence over ``axis`` and q replicated.

    Args:
      q: ``[B, T, H, D]`` queries (replicated over ``axis``).
      k: ``[B, S, Hkv, D]`` keys, S a multiple of the axis size (sharded along S).
      v: ``[B, S, Hkv, Dv]`` values.
      mesh: the device mesh.
      axis: the mesh axis the keys are split over.
      causal: top-left aligned causal mask (query i sees global keys j <= i).
      scale: logit scale, default ``D ** -0.5``.
      softcap: logit soft cap, or None.
      impl: the per-device ``jattn.attention`` impl.

    Returns:
      ``out [B, T, H, Dv]`` in q's dtype, equal to ``jattn.attention(q, k, v, causal=causal)``.
    """
    n = _check_mesh(mesh, axis)
    checks.check_qkv(q, k, v, same_value_dim=False)
    _check_divides("k", k.shape[1], n, f"the size of mesh axis {axis!r}")
    shard = k.shape[1] // n
    T = q.shape[1]

    def local(q, k, v):
        mask = None
        if causal:  # a shifted causal mask: this shard's keys start at global position index * shard
            offset = lax.axis_index(axis) * shard
            mask = (offset + jnp.arange(shard)[None, :] <= jnp.arange(T)[:, None])[None, None]
        out, lse = attention(q, k, v, mask=mask, scale=scale, softcap=softcap, return_lse=True, impl=impl)
        out, _ = merge_across(out, lse, axis)
        return out.astype(q.dtype)

    seq = P(None, axis)
    return _shard_map(local, mesh, (P(), seq, seq), P())(q, k, v)


def _as_f32(partial):
    return tuple(x.astype(jnp.float32) for x in partial)


def _empty_partial(q, v, rows: int):
    """``(out, lse)`` of no keys for ``rows`` queries: zeros and ``-inf``, float32 (heads on axis 2)."""
    B, _, H, _ = q.shape
    return jnp.zeros((B, rows, H, v.shape[3]), jnp.float32), jnp.full((B, rows, H), -jnp.inf, jnp.float32)


def _by_kv_head(fold, q, k, v, states):
    """``fold(q_g, k_g, v_g, states_g) -> states_g`` applied to one KV head and its query heads at a time.

    ``states`` is a pytree of ``[B, rows, H, ...]`` arrays (heads on axis 2), updated in place head group by
    head group. Why: the per-block attention's working set (its layout copies and score tiles) grows with
    the heads it is given, so one KV head at a time keeps a ring device's temp memory at a fraction of an
    all-heads call (T=32K on 8 devices: 63.8 -> 40.0 MiB, see benchmarks/cpu_distributed.py); on CPU it
    also ran faster (1.77 -> 1.52 s at T=16K).
    """
    groups = k.shape[2]
    q_per, kv_per = q.shape[2] // groups, 1

    def head_slice(x, g, per):
        return lax.dynamic_slice_in_dim(x, g * per, per, axis=2)

    def body(g, states):
        part = jax.tree.map(lambda x: head_slice(x, g, q_per), states)
        part = fold(head_slice(q, g, q_per), head_slice(k, g, kv_per), head_slice(v, g, kv_per), part)
        return jax.tree.map(lambda x, y: lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), g * q_per, axis=2),
                            states, part)

    return lax.fori_loop(0, groups, body, states)


def zigzag_order(length: int, parts: int) -> np.ndarray:
    """The zigzag permutation of ``range(length)``: ``2 * parts`` chunks, device ``i`` gets chunks ``i`` and
    ``2 * parts - 1 - i`` (so each device's causal work is the same)."""
    chunks = np.arange(length).reshape(2 * parts, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * parts - 1 - i]]) for i in range(parts)])


def ring_attention(q, k, v, *, mesh: Mesh, axis: str, causal: bool = False, scale=None, softcap=None,
                   impl: str = "auto", reorder: bool = True):
    """Context-parallel attention: q, k, v split along the sequence over ``axis``; K/V travel the ring.

    Args:
      q: ``[B, T, H, D]`` (T == S; for causal a multiple of twice the axis size, else of the axis size).
      k: ``[B, T, Hkv, D]``.
      v: ``[B, T, Hkv, Dv]``.
      mesh: the device mesh.
      axis: the mesh axis of the ring.
      causal: causal self-attention (zigzag-balanced ring).
      scale: logit scale, default ``D ** -0.5``.
      softcap: logit soft cap, or None.
      impl: the per-block ``jattn.attention`` impl.
      reorder: causal only. True: inputs and output are in natural order and are permuted to the zigzag
        layout and back here (one all-to-all each way). False: they are already in zigzag order
        (``zigzag_order``), as a model that keeps its activations zigzag-ordered passes them.

    Returns:
      ``out [B, T, H, Dv]`` in q's dtype, equal to ``jattn.attention(q, k, v, causal=causal)``.
    """
    n = _check_mesh(mesh, axis)
    checks.check_qkv(q, k, v, same_value_dim=False)
    T = q.shape[1]
    if k.shape[1] != T:
        raise ValueError(f"ring_attention is self-attention: k's length must be q's T={T}, got {k.shape[1]}")
    _check_divides("q", T, 2 * n if causal else n, f"{'twice ' if causal else ''}the size of mesh axis {axis!r}")
    per_block = functools.partial(attention, scale=scale, softcap=softcap, return_lse=True, impl=impl)
    permutation = [(i, (i + 1) % n) for i in range(n)]
    seq = P(None, axis)

    def rotate(x):
        return lax.ppermute(x, axis, permutation)

    def plain(q, k, v):
        def first(q, k, v, _):
            return _as_f32(per_block(q, k, v))
        state = _by_kv_head(first, q, k, v, _empty_partial(q, v, q.shape[1]))

        def step(carry, _):
            k, v, state = carry
            k, v = rotate(k), rotate(v)
            state = _by_kv_head(lambda q, k, v, state: merge_two(*state, *per_block(q, k, v)), q, k, v, state)
            return (k, v, state), None
        (_, _, (out, _)), _ = lax.scan(step, (k, v, state), None, length=n - 1)
        return out.astype(q.dtype)

    def zigzag(q, k, v):
        c = q.shape[1] // 2
        me = lax.axis_index(axis)

        def first(q, k, v, _):
            lo = per_block(q[:, :c], k[:, :c], v[:, :c], causal=True)
            hi = merge_two(*per_block(q[:, c:], k[:, c:], v[:, c:], causal=True),
                           *per_block(q[:, c:], k[:, :c], v[:, :c]))
            return _as_f32(lo), hi
        empty = _empty_partial(q, v, c)
        lo, hi = _by_kv_head(first, q, k, v, (empty, empty))

        def fold(q, k, v, states, t):
            lo, hi = states
            hi = merge_two(*hi, *per_block(q[:, c:], k[:, :c], v[:, :c]))  # a later query chunk: all visible
            # The other visible pair: both low chunks when the keys come from an earlier device, else both
            # high chunks (the keys' high chunk precedes this device's).
            # lax.cond, not jnp.where: a select would materialise both halves of q, k, v and both merges.
            return lax.cond(
                (me - t) % n < me,
                lambda lo, hi: (merge_two(*lo, *per_block(q[:, :c], k[:, :c], v[:, :c])), hi),
                lambda lo, hi: (lo, merge_two(*hi, *per_block(q[:, c:], k[:, c:], v[:, c:]))),
                lo, hi)

        def step(carry, t):
            k, v, lo, hi = carry
            k, v = rotate(k), rotate(v)
            lo, hi = _by_kv_head(functools.partial(fold, t=t), q, k, v, (lo, hi))
            return (k, v, lo, hi), None
        (_, _, lo, hi), _ = lax.scan(step, (k, v, lo, hi), jnp.arange(1, n))
        return jnp.concatenate([lo[0], hi[0]], axis=1).astype(q.dtype)

    if not causal:
        return _shard_map(plain, mesh, (seq, seq, seq), seq)(q, k, v)
    order = zigzag_order(T, n)
    if reorder:
        q, k, v = (jnp.take(x, order, axis=1) for x in (q, k, v))
    out = _shard_map(zigzag, mesh, (seq, seq, seq), seq)(q, k, v)
    return jnp.take(out, np.argsort(order), axis=1) if reorder else out


def sharded_decode_attention(q, k_cache, v_cache, lengths, *, mesh: Mesh, axis: str, window=None, sinks=None,
                             softcap=None, scale=None, return_lse: bool = False):
    """``jattn.decode_attention`` with a contiguous head-major cache split along the sequence over ``axis``.

    Args:
      q: ``[B, H, D]`` or ``[B, Tq, H, D]`` new tokens (replicated).
      k_cache: ``[B, Hkv, S_max, D]``, S_max a multiple of the axis size (sharded along S_max).
      v_cache: ``[B, Hkv, S_max, Dv]``.
      lengths: ``[B]`` global valid lengths, the new tokens included.
      mesh: the device mesh.
      axis: the mesh axis the cache is split over.
      window: as ``decode_attention``.
      sinks: ``[H]`` value-less softmax terms (merged once, after the cross-device merge).
      softcap: logit soft cap, or None.
      scale: logit scale, default ``D ** -0.5``.
      return_lse: also return the float32 lse.

    Returns:
      As ``decode_attention``: each device runs the xla decode path on its shard, then ``merge_across``.
    """
    n = _check_mesh(mesh, axis)
    B, Tq, H, D, Hkv, Dv, capacity, _ = decode_op._check_caches(q, k_cache, v_cache, None)
    decode_op._check_lengths(lengths, B, capacity)
    _check_divides("k_cache", capacity, n, f"the size of mesh axis {axis!r}")
    window = checks.check_window(window)
    checks.check_sinks(sinks, H)
    softcap = checks.check_positive_float("softcap", softcap)
    scale = D ** -0.5 if scale is None else checks.check_positive_float("scale", scale, allow_none=False)
    shard = capacity // n
    q4 = q[:, None] if q.ndim == 3 else q

    def local(q4, k, v, lengths):
        out, lse = decode_attention_xla(q4, k, v, lengths, window_left=None if window is None else window[0],
                                        softcap=softcap, scale=scale, kv_offset=lax.axis_index(axis) * shard)
        return merge_across(out, lse, axis)

    cache = P(None, None, axis)
    out, lse = _shard_map(local, mesh, (P(), cache, cache, P()), (P(), P()))(
        q4, k_cache, v_cache, lengths.astype(jnp.int32))
    if sinks is not None:
        out, lse = merge_sinks(out, lse, sinks)
    out = out.astype(q.dtype)
    if q.ndim == 3:
        out, lse = out[:, 0], lse[:, 0]
    return (out, lse) if return_lse else out
