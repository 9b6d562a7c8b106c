"""P74 — Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models.

Causal decayed linear attention without softmax, scale or denominator: ``O = ((Q K^T) * D) V`` with
``D[i, j] = lambda^(i-j)`` (``j <= i``). The chunked intra/inter algorithm and its Pallas forward and
backward live in ``jattn.ops.linear_xla`` / ``pallas_kernels.linear`` behind ``jattn.linear_attention``; this
file names the paper's entry points on top of it. ``log_decay = -s`` where ``s`` is the paper's per-head slope
(``s >= 0``, ``jattn.core.decay.alibi_slopes``).
"""
from __future__ import annotations

from jaxtyping import Array, Float

from jattn.core.decay import alibi_slopes  # noqa: F401  (re-exported: the paper's slopes)
from jattn.ops.linear import linear_attention, linear_attention_step

def lightning_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T H D"], v: Float[Array, "B T H E"],
                        log_decay: Float[Array, "H"] | Float[Array, "B T H"] | None = None, *,
                        chunk_size: int = 64, impl: str = "auto") -> Float[Array, "B T H E"]:
    """``((Q K^T) * D) V`` for ``q, k [B, T, H, D]``, ``v [B, T, H, E]``; ``log_decay [H]`` or ``[B, T, H]``."""
    return linear_attention(q, k, v, log_decay=log_decay, causal=True, scale=1.0, chunk_size=chunk_size, impl=impl)


def decayed_linear_attention_quadratic(q: Float[Array, "B T H D"], k: Float[Array, "B T H D"],
                                       v: Float[Array, "B T H E"],
                                       log_decay: Float[Array, "H"] | Float[Array, "B T H"] | None = None,
                                       ) -> Float[Array, "B T H E"]:
    """The quadratic masked form ``((Q K^T) * D) V`` (the oracle)."""
    return linear_attention(q, k, v, log_decay=log_decay, causal=True, scale=1.0, impl="reference")


def lightning_prefill_with_state(q: Float[Array, "B T H D"], k: Float[Array, "B T H D"], v: Float[Array, "B T H E"],
                                 kv0: Float[Array, "B H D E"] | None = None,
                                 log_decay: Float[Array, "H"] | Float[Array, "B T H"] | None = None, *,
                                 chunk_size: int = 64, impl: str = "auto",
                                 ) -> tuple[Float[Array, "B T H E"], Float[Array, "B H D E"]]:
    """Chunked prefill starting from state ``kv0 [B, H, D, E]``; returns ``(out, final kv)``."""
    return linear_attention(q, k, v, log_decay=log_decay, causal=True, scale=1.0, initial_state=kv0,
                            return_final_state=True, chunk_size=chunk_size, impl=impl)


def lightning_decode_step(q_t: Float[Array, "B H D"], k_t: Float[Array, "B H D"], v_t: Float[Array, "B H E"],
                          kv: Float[Array, "B H D E"], log_decay: Float[Array, "H"] | Float[Array, "B H"] | None = None,
                          ) -> tuple[Float[Array, "B H E"], Float[Array, "B H D E"]]:
    """``kv <- lambda kv + k_t^T v_t``, ``o_t = q_t kv``; returns ``(o_t [B, H, E], kv)``."""
    return linear_attention_step(q_t, k_t, v_t, kv, log_decay=log_decay, scale=1.0)
