"""The decode family's pure-JAX path (the CPU fast path): one pass over the cache in its own layout.

Decode is memory bound: the cost is reading the cache once. The logits of all ``G * Tq`` packed rows of a
kv head come from one contraction over the cache as stored (``[B, S, Hkv, D]``, no transpose), the
softmax runs on ``[B, Hkv, S, R]`` float32 logits and the values are reduced in their own layout too.
A paged cache is gathered first (one copy of the pages the table names).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.ops.decode_reference import contiguous_cache, decode_visibility

HIGHEST = jax.lax.Precision.HIGHEST


def decode_attention_xla(q, k_cache, v_cache, lengths, *, page_table=None, window_left=None, sinks=None,
                         softcap=None, scale: float):
    """Same contract as ``decode_attention_reference``: returns float32 ``(out [B, Tq, H, Dv], lse [B, Tq, H])``."""
    k = contiguous_cache(k_cache, page_table)
    v = contiguous_cache(v_cache, page_table)
    B, Tq, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    # rows r = (member, t) of each kv head; logits [B, S, Hkv, R] straight from the cache layout
    qg = (q.astype(jnp.float32) * scale).reshape(B, Tq, Hkv, G, D)
    s = jnp.einsum("bskd,btkgd->bskgt", k.astype(jnp.float32), qg, precision=HIGHEST)
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    visible = decode_visibility(lengths, Tq, S, window_left)            # [B, Tq, S]
    visible = jnp.transpose(visible, (0, 2, 1))[:, :, None, None, :]      # [B, S, 1, 1, Tq]
    s = jnp.where(visible, s, -jnp.inf)
    m = jnp.max(s, axis=1, keepdims=True)
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(1, 1, Hkv, G, 1)
        m = jnp.maximum(m, sink)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    empty = denom == 0       # only an exactly empty row is special; NaN stays NaN
    safe = jnp.where(empty, 1.0, denom)
    out = jnp.einsum("bskgt,bskd->btkgd", p / safe, v.astype(jnp.float32), precision=HIGHEST)
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(safe))[:, 0]          # [B, Hkv, G, Tq]
    return out.reshape(B, Tq, H, v.shape[-1]), jnp.transpose(lse, (0, 3, 1, 2)).reshape(B, Tq, H)
