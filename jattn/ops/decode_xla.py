"""The decode family's pure-JAX path (the CPU fast path): one pass over the head-major cache.

Decode is memory bound: the cost is reading the cache once. With the cache head-major (``[B, Hkv, S, D]``)
the logits of all ``R = G * Tq`` packed rows of a kv head are one batched GEMM over the cache as stored
(no transpose, no copy), and so are the values: measured 13x faster on CPU than the same math on a
``[B, S, Hkv, D]`` cache, where XLA falls back to a strided contraction (benchmarks/cpu_decode.py).
A paged cache is gathered first (one copy of the pages the table names).

Keys and values past a sequence's length are never part of its result, whatever they hold (a recycled
page may hold NaN). Their probabilities are exactly 0, but ``0 * NaN`` is NaN, so the ``p @ v`` GEMM
would still leak them. Zeroing V first costs a second pass over the cache (measured 1.9x on the 32K
decode), so the forward runs on the cache as stored and recomputes with the stale rows zeroed only when
its output is not finite (``lax.cond``: free when nothing is stale and non-finite; under ``vmap`` both
branches run). The gradient always runs on the zeroed cache (``0 * NaN`` hits ``dq = ds @ K`` too).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jattn.core.reference import softmax_rows
from jattn.core.softmax import merge_partials, merge_sinks
from jattn.ops.decode_reference import contiguous_cache, decode_visibility, zero_past_lengths

HIGHEST = jax.lax.Precision.HIGHEST
KV_CHUNK = 4096


def decode_attention_xla(q, k_cache, v_cache, lengths, *, page_table=None, window_left=None, sinks=None,
                         softcap=None, scale: float, kv_offset=0):
    """Same contract as ``decode_attention_reference``: returns float32 ``(out [B, Tq, H, Dv], lse [B, Tq, H])``.

    ``kv_offset``: the global position of the cache's first key, when the cache is one shard of a longer
    one (``jattn.distributed.sharded_decode_attention``); ``lengths`` are then global."""
    static = (window_left, None if softcap is None else float(softcap), float(scale))
    return _stale_safe_decode(static, q, k_cache, v_cache, sinks, lengths, page_table,
                              jnp.asarray(kv_offset, jnp.int32))


def attend_contiguous(static, q, k, v, sinks, lengths, kv_offset):
    """The math on contiguous ``[B, Hkv, S, D]`` caches, without the stale-row guard: the path's cost.

    ``static`` is ``(window_left, softcap, scale)``; returns float32 ``(out [B, Tq, H, Dv], lse [B, Tq, H])``."""
    window_left, softcap, scale = static
    B, Tq, H, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    R = G * Tq
    # rows r = (member, t) of each kv head: [B, Hkv, R, D]. One free dim per operand: XLA's CPU GEMM
    # (two free dims, e.g. [G, Tq], fall to a loop emitter 5x slower)
    rows = jnp.transpose((q.astype(jnp.float32) * scale).reshape(B, Tq, Hkv, G, D), (0, 2, 3, 1, 4))
    n, C = _kv_chunks(S)
    # [B, Hkv, n, C, D] is a free reshape of the head-major cache: one GEMM per chunk keeps its key panel in cache
    chunked = lambda x: x.astype(jnp.float32).reshape(B, Hkv, n, C, x.shape[-1])
    s = jnp.einsum("bkrd,bknsd->bknrs", rows.reshape(B, Hkv, R, D), chunked(k), precision=HIGHEST)
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    visible = decode_visibility(lengths, Tq, S, window_left, kv_offset)         # [B, Tq, S]
    visible = jnp.broadcast_to(visible[:, None, None], (B, 1, G, Tq, S)).reshape(B, 1, R, n, C)
    s = jnp.where(jnp.swapaxes(visible, 2, 3), s, -jnp.inf)                     # [B, Hkv, n, R, C]
    p, chunk_lse = softmax_rows(s)
    chunk_out = jnp.einsum("bknrs,bknsd->bknrd", p, chunked(v), precision=HIGHEST)
    out, lse = merge_partials(jnp.moveaxis(chunk_out, 2, 0), jnp.moveaxis(chunk_lse, 2, 0))  # [B, Hkv, R, Dv]
    Dv = v.shape[-1]
    out = jnp.transpose(out.reshape(B, Hkv, G, Tq, Dv), (0, 3, 1, 2, 4)).reshape(B, Tq, H, Dv)
    lse = jnp.transpose(lse.reshape(B, Hkv, G, Tq), (0, 3, 1, 2)).reshape(B, Tq, H)
    return (out, lse) if sinks is None else merge_sinks(out, lse, sinks)


def _kv_chunks(S: int) -> tuple[int, int]:
    """``(n, C)``: the cache's keys as ``n`` chunks of ``C = KV_CHUNK``. XLA's CPU GEMM over one 4096-key panel at
    a time reads the cache 13-23% faster than one GEMM over all of it (B=1, H=32, Hkv=8, D=128, f32, best of 9
    interleaved calls: 33.2 -> 28.7 ms at 32K keys, 126.9 -> 110.2 ms at 128K); a length that 4096 does not
    divide stays one chunk (slicing it would copy the cache)."""
    return (S // KV_CHUNK, KV_CHUNK) if S % KV_CHUNK == 0 and S > KV_CHUNK else (1, S)


def _decode_on_zeroed(static, q, k_cache, v_cache, sinks, lengths, page_table, kv_offset):
    k, v = (zero_past_lengths(contiguous_cache(cache, page_table), lengths, kv_offset) for cache in (k_cache, v_cache))
    return attend_contiguous(static, q, k, v, sinks, lengths, kv_offset)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stale_safe_decode(static, q, k_cache, v_cache, sinks, lengths, page_table, kv_offset):
    k, v = (contiguous_cache(cache, page_table) for cache in (k_cache, v_cache))
    out, lse = attend_contiguous(static, q, k, v, sinks, lengths, kv_offset)
    return jax.lax.cond(jnp.isfinite(out).all(), lambda: (out, lse), lambda: _decode_on_zeroed(
        static, q, k_cache, v_cache, sinks, lengths, page_table, kv_offset))


def _stale_safe_fwd(static, *args):
    return _stale_safe_decode(static, *args), args


def _stale_safe_bwd(static, residuals, cotangents):
    q, k_cache, v_cache, sinks, lengths, page_table, kv_offset = residuals
    _, vjp = jax.vjp(lambda q, k, v, sinks: _decode_on_zeroed(static, q, k, v, sinks, lengths, page_table,
                                                               kv_offset), q, k_cache, v_cache, sinks)
    return (*vjp(cotangents), None, None, None)


_stale_safe_decode.defvjp(_stale_safe_fwd, _stale_safe_bwd)
