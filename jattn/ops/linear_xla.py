"""The pure-JAX fast path of ``jattn.linear_attention`` (``impl="xla"``): Lightning-2's chunked form.

Inside a chunk of ``C`` tokens a masked product ``((Q K^T) * M) V`` (``M[i, j] = exp(b_i - b_j)``, ``j <= i``);
across chunks a state ``S`` carried by ``lax.scan``:

    O_n = ((Q_n K_n^T) * M) V_n + (Q_n * exp(b)) S_n,        S_{n+1} = exp(b_last) S_n + (K_n * exp(b_last - b))^T V_n

with ``b`` the log-decay cumulated from the chunk start (``jattn.core.decay.chunk_local_log_decay``), so every
exponent is ``<= 0``. The chunks are scanned in segments of ``SEGMENT_CHUNKS`` so the working set stays
cache-sized and time is linear in T. Gradients are JAX's autodiff of this form.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jattn.core.decay import chunk_local_log_decay, per_token_log_decay
from jattn.ops.linear_reference import as_f32, noncausal_linear_attention, state_or_zeros
from pallas_kernels.common import pad_axis

SEGMENT_CHUNKS = 16  # chunks per scanned segment: keeps the working set cache-sized, so time is linear in T


def _chunked_segment(q, k, v, a, s0, C):
    """One segment ``[B, N*C, ...]`` from state ``s0``: masked products inside chunks, a scanned state
    across them. ``a`` is ``[H]`` (per head) or ``[B, N*C, H]`` (per token). Returns (out, final)."""
    B, L, H, D = q.shape
    N = L // C

    def chunks(x):  # [B, N*C, H, F] -> [B, H, N, C, F]
        return jnp.transpose(x.reshape(B, N, C, H, x.shape[-1]), (0, 3, 1, 2, 4))

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    if a.ndim == 1:  # per head: b_i = (i + 1) a, no cumsum needed
        b = a[None, :, None, None] * jnp.arange(1, C + 1, dtype=jnp.float32)
    else:
        b = chunk_local_log_decay(jnp.transpose(a, (0, 2, 1)), C)  # [B, H, N, C], <= 0
    b_last = b[..., -1:]
    inside = jnp.tril(jnp.ones((C, C), bool))
    diff = jnp.where(inside, b[..., :, None] - b[..., None, :], 0.0)
    intra_decay = jnp.where(inside, jnp.exp(diff), 0.0)
    # where, not a product with zeros: a NaN key must not reach the earlier rows of its chunk (0 * NaN).
    scores = jnp.where(inside, jnp.einsum("bhncd,bhnmd->bhncm", qc, kc) * intra_decay, 0.0)
    out = jnp.einsum("bhncm,bhnme->bhnce", scores, vc)

    chunk_kv = jnp.einsum("bhncd,bhnce->bhnde", kc * jnp.exp(b_last - b)[..., None], vc)
    chunk_decay = jnp.broadcast_to(jnp.exp(b_last[..., 0]), chunk_kv.shape[:3])  # [B, H, N]

    def carry_state(state, xs):
        kv, decay = xs
        return decay[..., None, None] * state + kv, state

    final, states_before = jax.lax.scan(
        carry_state, s0, (jnp.moveaxis(chunk_kv, 2, 0), jnp.moveaxis(chunk_decay, 2, 0)))
    states_before = jnp.moveaxis(states_before, 0, 2)  # [B, H, N, D, E]
    out = out + jnp.einsum("bhncd,bhnde->bhnce", qc * jnp.exp(b)[..., None], states_before)
    return jnp.transpose(out, (0, 2, 3, 1, 4)).reshape(B, L, H, -1), final


def linear_attention_chunked(q: Float[Array, "B T H D"], k: Float[Array, "B T H D"], v: Float[Array, "B T H E"], *,
                             log_decay: Float[Array, "H"] | Float[Array, "B T H"] | None = None,
                             causal: bool = True, scale: float = 1.0,
                             initial_state: Float[Array, "B H D E"] | None = None, chunk_size: int = 64,
                             ) -> tuple[Float[Array, "B T H E"], Float[Array, "B H D E"]]:
    """Lightning-2's chunked form, scanned over segments of ``SEGMENT_CHUNKS`` chunks.

    Args:
      q: queries ``[B, T, H, D]``.
      k: keys ``[B, T, H, D]`` (as many heads as q).
      v: values ``[B, T, H, E]``.
      log_decay: None (no decay), ``[H]`` per head or ``[B, T, H]`` per token.
      causal: False runs ``noncausal_linear_attention`` (no decay).
      scale: multiplies the output.
      initial_state: ``S_0 [B, H, D, E]`` or None (zeros).
      chunk_size: the chunk length C, any int >= 1 (capped at T; T is zero-padded to whole chunks).

    Returns:
      ``(out [B, T, H, E], final state [B, H, D, E])``, both float32.
    """
    B, T, H, D = q.shape
    E = v.shape[3]
    if not causal:
        return noncausal_linear_attention(q, k, v, scale=scale, initial_state=initial_state)
    C = min(chunk_size, T)
    G = min(-(-T // C), SEGMENT_CHUNKS)
    L = G * C
    num_segments = -(-T // L)
    padded = num_segments * L
    q, k, v = (pad_axis(x, 1, padded) for x in as_f32(q, k, v))  # zero rows: no effect on the state
    if log_decay is None:
        a = jnp.zeros((H,), jnp.float32)
    elif log_decay.ndim == 1 and padded == T:
        a = log_decay.astype(jnp.float32)
    else:  # per token; padded positions get log 1 = 0 so the final state is not decayed past the end
        a = pad_axis(per_token_log_decay(log_decay, B, T, H), 1, padded)
    s0 = state_or_zeros(initial_state, B, H, D, E)
    if num_segments == 1:
        out, final = _chunked_segment(q, k, v, a, s0, C)
    else:
        def segments(x):  # [B, S*L, ...] -> [S, B, L, ...]
            return jnp.moveaxis(x.reshape((B, num_segments, L) + x.shape[2:]), 1, 0)

        per_token = a.ndim == 3

        def body(state, xs):
            q_s, k_s, v_s = xs[:3]
            out_s, state = _chunked_segment(q_s, k_s, v_s, xs[3] if per_token else a, state, C)
            return state, out_s

        xs = (segments(q), segments(k), segments(v)) + ((segments(a),) if per_token else ())
        final, out = jax.lax.scan(body, s0, xs)
        out = jnp.moveaxis(out, 0, 1).reshape(B, padded, H, E)
    return scale * out[:, :T], final
