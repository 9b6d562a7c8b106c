"""P74 — Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models.

Causal decayed linear attention without softmax, scale or denominator: ``O = ((Q K^T) * D) V`` with
``D[i, j] = lambda^(i-j)`` (``j <= i``). The chunked intra/inter algorithm and its Pallas forward and
backward live in ``jattn.ops.linear`` / ``pallas_kernels.lightning``; this file names the paper's entry
points on top of them. ``log_decay = -s`` where ``s`` is the paper's per-head slope (``s >= 0``).
"""
from __future__ import annotations

import jax.numpy as jnp

from jattn.ops.linear import (_alibi_slopes, _check_layer, linear_attention, linear_attention_step)


def alibi_slopes(num_heads: int) -> jnp.ndarray:
    """The paper's per-head slopes ``s_h = 2^(-8(h+1)/H)`` (ALiBi), positive; ``log_decay = -s``."""
    _check_layer(num_heads, None, 1)
    return jnp.asarray(_alibi_slopes(int(num_heads)), jnp.float32)


def lightning_attention(q, k, v, log_decay=None, *, block: int = 64, impl: str = "auto"):
    """``((Q K^T) * D) V`` for ``q, k [B, T, H, D]``, ``v [B, T, H, E]``; ``log_decay [H]`` or ``[B, T, H]``."""
    return linear_attention(q, k, v, log_decay=log_decay, causal=True, scale=1.0, chunk_size=block, impl=impl)


def decayed_linear_attention_quadratic(q, k, v, log_decay=None):
    """The quadratic masked form ``((Q K^T) * D) V`` (the oracle)."""
    return linear_attention(q, k, v, log_decay=log_decay, causal=True, scale=1.0, impl="reference")


def lightning_prefill_with_state(q, k, v, kv0=None, log_decay=None, *, block: int = 64, impl: str = "auto"):
    """Chunked prefill starting from state ``kv0 [B, H, D, E]``; returns ``(out, final kv)``."""
    return linear_attention(q, k, v, log_decay=log_decay, causal=True, scale=1.0, initial_state=kv0,
                            return_final_state=True, chunk_size=block, impl=impl)


def lightning_decode_step(q_t, k_t, v_t, kv, log_decay=None):
    """``kv <- lambda kv + k_t^T v_t``, ``o_t = q_t kv``; returns ``(o_t [B, H, E], kv)``."""
    return linear_attention_step(q_t, k_t, v_t, kv, log_decay=log_decay, scale=1.0)
