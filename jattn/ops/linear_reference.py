"""The oracles of ``jattn.linear_attention``: the parallel quadratic form and the token-by-token recurrence.

Both compute, in float32 at ``precision=HIGHEST``, for ``S: [D, E]`` per batch and head:

    S_t = lambda_t * S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t        (lambda_t = exp(log_decay_t))

* ``linear_attention_reference`` (``impl="reference"``): ``scale * ((q k^T) * M) v`` with the decay matrix
  ``M[i, j] = exp(c_i - c_j)`` for ``j <= i`` (``c`` the cumulative log-decay), plus the initial-state term;
* ``linear_attention_recurrent`` (``impl="recurrent"``): a ``lax.scan`` over tokens of ``recurrent_step``,
  the one-token step that ``jattn.linear_attention_step`` decodes with.

They take validated inputs with as many k/v heads as q heads (``jattn.ops.linear`` validates, repeats GQA
heads and casts the output).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jattn.core.decay import per_token_log_decay

HIGHEST = jax.lax.Precision.HIGHEST


def as_f32(*xs):
    """The arrays ``xs`` cast to float32 (a tuple)."""
    return tuple(x.astype(jnp.float32) for x in xs)


def state_or_zeros(initial_state, B: int, H: int, D: int, E: int) -> Float[Array, "B H D E"]:
    """``initial_state`` as float32, or the zero state ``[B, H, D, E]`` when it is None."""
    if initial_state is None:
        return jnp.zeros((B, H, D, E), jnp.float32)
    return initial_state.astype(jnp.float32)


def noncausal_linear_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T H D"], v: Float[Array, "B T H E"], *,
                               scale: float, initial_state: Float[Array, "B H D E"] | None,
                               precision=None) -> tuple[Float[Array, "B T H E"], Float[Array, "B H D E"]]:
    """``o = scale * q (S_0 + K^T V)``: two GEMMs, the non-causal form of every impl but the quadratic one.

    Args:
      q: queries ``[B, T, H, D]``.
      k: keys ``[B, T, H, D]``.
      v: values ``[B, T, H, E]``.
      scale: multiplies the output.
      initial_state: ``S_0 [B, H, D, E]`` or None (zeros).
      precision: the ``jnp.einsum`` precision.

    Returns:
      ``(out [B, T, H, E], final state [B, H, D, E])``, both float32.
    """
    q, k, v = as_f32(q, k, v)
    state = jnp.einsum("bthd,bthe->bhde", k, v, precision=precision)
    if initial_state is not None:
        state = state + initial_state.astype(jnp.float32)
    return scale * jnp.einsum("bthd,bhde->bthe", q, state, precision=precision), state


def linear_attention_reference(q: Float[Array, "B T H D"], k: Float[Array, "B T H D"], v: Float[Array, "B T H E"], *,
                               log_decay: Float[Array, "H"] | Float[Array, "B T H"] | None = None,
                               causal: bool = True, scale: float = 1.0,
                               initial_state: Float[Array, "B H D E"] | None = None,
                               ) -> tuple[Float[Array, "B T H E"], Float[Array, "B H D E"]]:
    """The quadratic parallel form ``scale * ((q k^T) * M) v`` (+ the initial-state term): the oracle.

    Args:
      q: queries ``[B, T, H, D]``.
      k: keys ``[B, T, H, D]`` (as many heads as q).
      v: values ``[B, T, H, E]``.
      log_decay: None (no decay), ``[H]`` per head or ``[B, T, H]`` per token.
      causal: False gives ``o_t = scale q_t (S_0 + sum_j k_j^T v_j)`` (no decay).
      scale: multiplies the output.
      initial_state: ``S_0 [B, H, D, E]`` or None (zeros).

    Returns:
      ``(out [B, T, H, E], final state [B, H, D, E])``, both float32.
    """
    B, T, H, D = q.shape
    E = v.shape[3]
    q, k, v = as_f32(q, k, v)
    s0 = state_or_zeros(initial_state, B, H, D, E)
    scores = jnp.einsum("bthd,bshd->bhts", q, k, precision=HIGHEST)
    if not causal:
        out = jnp.einsum("bhts,bshe->bthe", scores, v, precision=HIGHEST)
        out = out + jnp.einsum("bthd,bhde->bthe", q, s0, precision=HIGHEST)
        final = s0 + jnp.einsum("bthd,bthe->bhde", k, v, precision=HIGHEST)
        return scale * out, final
    cum = jnp.cumsum(per_token_log_decay(log_decay, B, T, H), axis=1)  # c_t, [B, T, H]
    cum = jnp.transpose(cum, (0, 2, 1))  # [B, H, T]
    visible = jnp.tril(jnp.ones((T, T), bool))
    diff = jnp.where(visible, cum[..., :, None] - cum[..., None, :], 0.0)
    decay = jnp.where(visible, jnp.exp(diff), 0.0)
    out = jnp.einsum("bhts,bshe->bthe", scores * decay, v, precision=HIGHEST)
    start_decay = jnp.exp(jnp.transpose(cum, (0, 2, 1)))  # exp(c_t), [B, T, H]
    out = out + start_decay[..., None] * jnp.einsum("bthd,bhde->bthe", q, s0, precision=HIGHEST)
    to_end = jnp.exp(cum[..., -1:] - cum)  # exp(c_T - c_j), [B, H, T]
    final = jnp.einsum("bhs,bshd,bshe->bhde", to_end, k, v, precision=HIGHEST)
    final = final + jnp.exp(cum[..., -1])[..., None, None] * s0
    return scale * out, final


def recurrent_step(state: Float[Array, "B H D E"], q_t: Float[Array, "B H D"], k_t: Float[Array, "B H D"],
                   v_t: Float[Array, "B H E"], log_decay_t: Float[Array, "B H"], scale: float,
                   ) -> tuple[Float[Array, "B H D E"], Float[Array, "B H E"]]:
    """One token: ``S = lambda S + k^T v``, ``o = scale q S``, all float32.

    Args:
      state: ``S_{t-1} [B, H, D, E]``.
      q_t: the token's query ``[B, H, D]``.
      k_t: its key ``[B, H, D]``.
      v_t: its value ``[B, H, E]``.
      log_decay_t: ``log lambda_t [B, H]``.
      scale: multiplies the output.

    Returns:
      ``(S_t [B, H, D, E], o_t [B, H, E])``.
    """
    state = jnp.exp(log_decay_t)[..., None, None] * state + k_t[..., :, None] * v_t[..., None, :]
    out = scale * jnp.einsum("bhd,bhde->bhe", q_t, state, precision=HIGHEST)
    return state, out


def linear_attention_recurrent(q: Float[Array, "B T H D"], k: Float[Array, "B T H D"], v: Float[Array, "B T H E"], *,
                               log_decay: Float[Array, "H"] | Float[Array, "B T H"] | None = None,
                               causal: bool = True, scale: float = 1.0,
                               initial_state: Float[Array, "B H D E"] | None = None,
                               ) -> tuple[Float[Array, "B T H E"], Float[Array, "B H D E"]]:
    """The recurrent form: a ``lax.scan`` of ``recurrent_step`` over tokens.

    Args:
      q: queries ``[B, T, H, D]``.
      k: keys ``[B, T, H, D]`` (as many heads as q).
      v: values ``[B, T, H, E]``.
      log_decay: None (no decay), ``[H]`` per head or ``[B, T, H]`` per token.
      causal: False runs ``noncausal_linear_attention`` (no decay).
      scale: multiplies the output.
      initial_state: ``S_0 [B, H, D, E]`` or None (zeros).

    Returns:
      ``(out [B, T, H, E], final state [B, H, D, E])``, both float32.
    """
    B, T, H, D = q.shape
    E = v.shape[3]
    if not causal:
        return noncausal_linear_attention(q, k, v, scale=scale, initial_state=initial_state, precision=HIGHEST)
    q, k, v = as_f32(q, k, v)
    s0 = state_or_zeros(initial_state, B, H, D, E)
    a = per_token_log_decay(log_decay, B, T, H)
    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, a)]

    def body(state, xs):
        q_t, k_t, v_t, a_t = xs
        return recurrent_step(state, q_t, k_t, v_t, a_t, scale)

    final, out = jax.lax.scan(body, s0, time_major)
    return jnp.moveaxis(out, 0, 1), final
