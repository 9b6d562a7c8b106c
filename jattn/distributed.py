"""P03 — DistAttention (Infinite-LLM): exact attention across devices, with JAX's own SPMD (``shard_map``).

Three forms, all exact (they equal single-device ``jattn.attention`` / ``jattn.decode_attention``):

* ``kv_partitioned_attention``: the keys/values are split along the sequence over a mesh axis, the queries
  are replicated; each device attends to its shard and returns ``(out, lse)``, and ``merge_across`` combines
  the partials exactly over the axis (the LSE merge of ``jattn.core.softmax``, as ``pmax``/``psum``).
* ``ring_attention``: context-parallel prefill, forward and backward. q, k, v are split along the sequence;
  K/V blocks travel around the ring (``ppermute``) while each device folds them into its queries' online
  softmax. Causal rings use the zigzag layout (device ``i`` holds sequence chunks ``i`` and ``2n - 1 - i``),
  so every step costs every device the same two chunk-pairs of work and no device idles on fully masked
  blocks. The backward is a second ring: K/V travel again with their gradient accumulators, each block's
  gradients come from its own VJP fed the merged output's cotangents, and dK/dV arrive home after one more
  hop, so a device keeps only its q, k, v, output and lse between the passes.
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


def _empty_partial(q, v, rows: int):
    """``(out, lse)`` of no keys for ``rows`` queries: zeros and ``-inf``, float32 (heads on axis 2)."""
    B, _, H, _ = q.shape
    return jnp.zeros((B, rows, H, v.shape[3]), jnp.float32), jnp.full((B, rows, H), -jnp.inf, jnp.float32)


def _by_kv_head(fold, groups: int, inputs, states):
    """``fold(inputs_g, states_g) -> states_g`` applied to one KV head and its query heads at a time.

    ``inputs`` (read) and ``states`` (updated in place) are pytrees of ``[B, rows, heads, ...]`` arrays, heads
    on axis 2; group ``g`` of an array is its ``g``-th run of ``heads / groups`` heads, so with
    ``groups = Hkv`` it pairs KV head ``g`` with the query heads that share it. Why: the per-block attention's
    working set (its layout copies and score tiles) grows with the heads it is given, so one KV head at a
    time keeps a ring device's temp memory at a fraction of an all-heads call (T=32K on 8 devices: forward
    63.8 -> 40.0 MiB, see benchmarks/cpu_distributed.py); on CPU it also ran faster (1.77 -> 1.52 s at T=16K).
    """
    def group(x, g):
        per = x.shape[2] // groups
        return lax.dynamic_slice_in_dim(x, g * per, per, axis=2)

    def put(x, y, g):
        return lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), g * (x.shape[2] // groups), axis=2)

    def body(g, states):
        part = fold(jax.tree.map(lambda x: group(x, g), inputs), jax.tree.map(lambda x: group(x, g), states))
        return jax.tree.map(lambda x, y: put(x, y, g), states, part)

    return lax.fori_loop(0, groups, body, states)


def _block_grads(per_block, q, k, v, out, lse, d_out, delta, causal: bool):
    """q, k, v's gradients from one block of keys, given the merged (global) ``out``, ``lse`` and ``d_out``.

    The block's own ``(out_b, lse_b)`` enter the merge with weight ``w = exp(lse_b - lse)``, so its
    cotangents are ``d out_b = w * d_out`` and ``d lse_b = w * (<d_out, out_b> - <d_out, out>)``; the block's
    VJP then sees ``exp(s - lse_b) * w = exp(s - lse)``, the global probabilities. ``delta = <d_out, out>``.
    """
    (out_b, lse_b), vjp = jax.vjp(lambda q, k, v: per_block(q, k, v, causal=causal), q, k, v)
    lse_b = lse_b.astype(jnp.float32)
    # lse_b = -inf (no visible key) weighs 0; the global lse is then -inf too when the whole row is empty.
    weight = jnp.where(jnp.isneginf(lse_b), 0.0, jnp.exp(lse_b - jnp.where(jnp.isneginf(lse), 0.0, lse)))
    d_lse_b = weight * (jnp.sum(d_out * out_b.astype(jnp.float32), axis=-1) - delta)
    return vjp(((weight[..., None] * d_out).astype(out_b.dtype), d_lse_b.astype(lse_b.dtype)))


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

    def schedule(visit, step, rows: int, state):
        """Folds step ``step``'s visible (query rows, key rows, causal) pairs into ``state`` with
        ``visit(state, q_rows, k_rows, causal)``. At step t a device holds the K/V of device ``me - t``."""
        if not causal:
            return visit(state, slice(None), slice(None), False)
        c = rows // 2
        lo, hi = slice(0, c), slice(c, rows)
        if isinstance(step, int):  # step 0, this device's own chunks
            for q_rows, k_rows, block_causal in ((lo, lo, True), (hi, hi, True), (hi, lo, False)):
                state = visit(state, q_rows, k_rows, block_causal)
            return state
        state = visit(state, hi, lo, False)  # a later query chunk: all visible
        # The other visible pair: both low chunks when the keys come from an earlier device, else both high
        # chunks (the keys' high chunk precedes this device's). zigzag: device i holds chunks i and 2n-1-i.
        # lax.cond, not jnp.where: a select would materialise both pairs' inputs and both merges.
        me = lax.axis_index(axis)
        return lax.cond((me - step) % n < me, lambda s: visit(s, lo, lo, False), lambda s: visit(s, hi, hi, False),
                        state)

    def forward_step(q, k, v, step, partial):
        def visit(partial, q_rows, k_rows, block_causal):
            def fold(x, partial):
                q, k, v = x
                out, lse = partial
                new = merge_two(out[:, q_rows], lse[:, q_rows],
                                *per_block(q[:, q_rows], k[:, k_rows], v[:, k_rows], causal=block_causal))
                return out.at[:, q_rows].set(new[0]), lse.at[:, q_rows].set(new[1])
            return _by_kv_head(fold, k.shape[2], (q, k, v), partial)
        return schedule(visit, step, q.shape[1], partial)

    def backward_step(q, k, v, out, lse, d_out, delta, step, grads):
        def visit(grads, q_rows, k_rows, block_causal):
            def fold(x, grads):
                q, k, v, out, lse, d_out, delta = x
                dq, dk, dv = grads
                bq, bk, bv = _block_grads(per_block, q[:, q_rows], k[:, k_rows], v[:, k_rows], out[:, q_rows],
                                          lse[:, q_rows], d_out[:, q_rows], delta[:, q_rows], block_causal)
                return (dq.at[:, q_rows].add(bq.astype(dq.dtype)), dk.at[:, k_rows].add(bk.astype(dk.dtype)),
                        dv.at[:, k_rows].add(bv.astype(dv.dtype)))
            return _by_kv_head(fold, k.shape[2], (q, k, v, out, lse, d_out, delta), grads)
        return schedule(visit, step, q.shape[1], grads)

    def ring_forward(q, k, v):
        partial = forward_step(q, k, v, 0, _empty_partial(q, v, q.shape[1]))

        def step(carry, t):
            k, v, partial = carry
            k, v = rotate(k), rotate(v)
            return (k, v, forward_step(q, k, v, t, partial)), None
        (_, _, partial), _ = lax.scan(step, (k, v, partial), jnp.arange(1, n))
        return partial

    # The backward is a second ring, not JAX's transpose of the first: K/V travel again with their gradient
    # accumulators, so it keeps only q, k, v, out and lse per device instead of every step's shards and
    # per-block residuals (T=32K on 8 devices: 432 MiB of temp per device as a transpose).
    @jax.custom_vjp
    def ring(q, k, v):
        return ring_forward(q, k, v)[0].astype(q.dtype)

    def ring_fwd(q, k, v):
        out, lse = ring_forward(q, k, v)
        return out.astype(q.dtype), (q, k, v, out, lse)

    def ring_bwd(residuals, d_out):
        q, k, v, out, lse = residuals
        d_out = d_out.astype(jnp.float32)
        delta = jnp.sum(d_out * out, axis=-1)
        zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
        backward = functools.partial(backward_step, q)
        dq, dk, dv = backward(k, v, out, lse, d_out, delta, 0, (zeros(q.shape), zeros(k.shape), zeros(v.shape)))

        def step(carry, t):
            k, v, dq, dk, dv = carry
            k, v, dk, dv = rotate(k), rotate(v), rotate(dk), rotate(dv)
            dq, dk, dv = backward(k, v, out, lse, d_out, delta, t, (dq, dk, dv))
            return (k, v, dq, dk, dv), None
        (_, _, dq, dk, dv), _ = lax.scan(step, (k, v, dq, dk, dv), jnp.arange(1, n))
        dk, dv = rotate(dk), rotate(dv)  # home: the accumulators held the K/V of device me + 1
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    ring.defvjp(ring_fwd, ring_bwd)

    if not causal:
        return _shard_map(ring, mesh, (seq, seq, seq), seq)(q, k, v)
    order = zigzag_order(T, n)
    if reorder:
        q, k, v = (jnp.take(x, order, axis=1) for x in (q, k, v))
    out = _shard_map(ring, mesh, (seq, seq, seq), seq)(q, k, v)
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
