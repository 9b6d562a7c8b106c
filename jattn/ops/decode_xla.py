"""The decode family's pure-JAX path (the CPU fast path): one pass over the head-major cache.

Decode is memory bound: the cost is reading the cache once. With the cache head-major (``[B, Hkv, S, D]``)
the logits of all ``R = G * Tq`` packed rows of a kv head are one batched GEMM over the cache as stored
(no transpose, no copy), and so are the values: measured 13x faster on CPU than the same math on a
``[B, S, Hkv, D]`` cache, where XLA falls back to a strided contraction (benchmarks/cpu_decode.py).
A paged cache is gathered first (one copy of the pages the table names).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.core.reference import softmax_rows
from jattn.ops.decode_reference import contiguous_cache, decode_visibility

HIGHEST = jax.lax.Precision.HIGHEST


def decode_attention_xla(q, k_cache, v_cache, lengths, *, page_table=None, window_left=None, sinks=None,
                         softcap=None, scale: float, kv_offset=0):
    """Same contract as ``decode_attention_reference``: returns float32 ``(out [B, Tq, H, Dv], lse [B, Tq, H])``.

    ``kv_offset``: the global position of the cache's first key, when the cache is one shard of a longer
    one (``jattn.distributed.sharded_decode_attention``); ``lengths`` are then global."""
    k = contiguous_cache(k_cache, page_table)
    v = contiguous_cache(v_cache, page_table)
    B, Tq, H, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    R = G * Tq
    # rows r = (member, t) of each kv head: [B, Hkv, R, D]. One free dim per operand: XLA's CPU GEMM
    # (two free dims, e.g. [G, Tq], fall to a loop emitter 5x slower)
    rows = jnp.transpose((q.astype(jnp.float32) * scale).reshape(B, Tq, Hkv, G, D), (0, 2, 3, 1, 4))
    s = jnp.einsum("bkrd,bksd->bkrs", rows.reshape(B, Hkv, R, D), k.astype(jnp.float32), precision=HIGHEST)
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    visible = decode_visibility(lengths, Tq, S, window_left, kv_offset)         # [B, Tq, S]
    visible = jnp.broadcast_to(visible[:, None, None], (B, 1, G, Tq, S)).reshape(B, 1, R, S)
    s = jnp.where(visible, s, -jnp.inf)
    sink = None
    if sinks is not None:
        sink = jnp.repeat(sinks.astype(jnp.float32).reshape(1, Hkv, G, 1), Tq, axis=-1).reshape(1, Hkv, R, 1)
    p, lse = softmax_rows(s, sink)                                               # lse [B, Hkv, R]
    out = jnp.einsum("bkrs,bksd->bkrd", p, v.astype(jnp.float32), precision=HIGHEST)
    Dv = v.shape[-1]
    out = jnp.transpose(out.reshape(B, Hkv, G, Tq, Dv), (0, 3, 1, 2, 4)).reshape(B, Tq, H, Dv)
    return out, jnp.transpose(lse.reshape(B, Hkv, G, Tq), (0, 3, 1, 2)).reshape(B, Tq, H)
