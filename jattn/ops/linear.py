"""``jattn.linear_attention``: causal (optionally decayed) and non-causal linear attention.

One recurrence serves the whole linear family (P58 Lightning-1 / TransNormerLLM, P74 Lightning-2):

    S_t = lambda_t * S_{t-1} + k_t^T v_t        (S: [D, E] per batch and head, float32)
    o_t = scale * q_t S_t

with ``lambda_t = exp(log_decay_t)``, either one value per head (``[H]``) or one per token and head
(``[B, T, H]``). The non-causal form is ``o_t = scale * q_t (S_0 + sum_j k_j^T v_j)`` (no decay).

This module is the API: argument validation, GQA head repetition, impl dispatch
(``jattn.ops.dispatch.run_impl``) and the padding glue of the Pallas kernel. The forms, kept side by side
and tested equal (``tests/ops/test_linear.py``):

* ``reference`` and ``recurrent``: ``jattn.ops.linear_reference`` (the quadratic form and a ``lax.scan``
  over tokens; ``linear_attention_step`` is the recurrence's one-token decode step);
* ``xla``: ``jattn.ops.linear_xla``, the chunked form of Lightning-2, the CPU fast path;
* ``pallas``: ``pallas_kernels.linear`` (forward, dq sweep and reverse dk/dv sweep).

The decay rules (``alibi_log_decay``, ``linear_log_decay``, chunk-local cumulation) are in
``jattn.core.decay``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jattn.core import checks
from jattn.core.decay import per_token_log_decay
from jattn.ops.dispatch import run_impl
from jattn.ops.linear_reference import (as_f32, linear_attention_recurrent, linear_attention_reference,
                                        noncausal_linear_attention, recurrent_step, state_or_zeros)
from jattn.ops.linear_xla import linear_attention_chunked
from pallas_kernels import common

LINEAR_IMPLS = ("auto", "pallas", "xla", "recurrent", "reference")
PALLAS_MIN_DIM = common.MIN_DOT_DIM


def check_linear_args(q, k, v, *, log_decay, causal, scale, initial_state, return_final_state,
                      chunk_size, impl):
    """Validates every argument of `linear_attention` at trace time; returns (B, T, H, D, E)."""
    checks.check_float_array("q", q, 4)
    checks.check_float_array("k", k, 4)
    checks.check_float_array("v", v, 4)
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if tuple(k.shape) != (B, T, Hkv, D) or Hkv == 0 or H % Hkv:
        raise ValueError(f"k must have the shape of q [B, T, H, D] = {(B, T, H, D)} or, for GQA, [B, T, Hkv, D] "
                         f"with H={H} a multiple of Hkv, got {checks.describe(k)}")
    if tuple(v.shape[:3]) != (B, T, Hkv):
        raise ValueError(f"v must have shape [B, T, Hkv, E] with [B, T, Hkv] = {(B, T, Hkv)} (k's heads), "
                         f"got {checks.describe(v)}")
    if T == 0 or D == 0 or v.shape[3] == 0:
        raise ValueError(f"q, k, v need T, D, E > 0, got q {checks.describe(q)} and v {checks.describe(v)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    E = v.shape[3]
    checks.check_bool("causal", causal)
    checks.check_bool("return_final_state", return_final_state)
    checks.check_finite_float("scale", scale)
    checks.check_int("chunk_size", chunk_size)
    checks.check_choice("impl", impl, LINEAR_IMPLS)
    if log_decay is not None:
        checks.check_float_array("log_decay", log_decay)
        if tuple(log_decay.shape) not in ((H,), (B, T, H)):
            raise ValueError(f"log_decay must have shape [H] = {(H,)} (per head) or [B, T, H] = {(B, T, H)} "
                             f"(per token), got {checks.describe(log_decay)}")
        if not causal:
            raise ValueError("log_decay needs causal=True: the non-causal form has no decay, got causal=False")
    if initial_state is not None:
        checks.check_float_array("initial_state", initial_state, 4)
        if tuple(initial_state.shape) != (B, H, D, E):
            raise ValueError(f"initial_state must have shape [B, H, D, E] = {(B, H, D, E)}, "
                             f"got {checks.describe(initial_state)}")
    return B, T, H, D, E


# ----------------------------------------------------------------------------------------------------
# The Pallas kernel's glue: padding and head-major layout


def linear_attention_pallas(q: Float[Array, "B T H D"], k: Float[Array, "B T H D"], v: Float[Array, "B T H E"], *,
                            log_decay: Float[Array, "H"] | Float[Array, "B T H"] | None = None,
                            causal: bool = True, scale: float = 1.0,
                            initial_state: Float[Array, "B H D E"] | None = None, chunk_size: int = 64,
                            block_e: int | None = None, interpret=None, poison_outputs: bool = False,
                            ) -> tuple[Float[Array, "B T H E"], Float[Array, "B H D E"]]:
    """The Pallas kernel ``pallas_kernels.linear`` on ``[B, T, H, *]`` inputs with as many k/v heads as q heads.

    D and E are zero-padded to powers of two >= 16 (exact: zero features add nothing to q k^T, zero value
    channels are sliced off) and T to a multiple of the chunk. Non-causal linear attention has no kernel: it
    is two GEMMs, ``o = scale * q (S_0 + K^T V)``, which XLA (cuBLAS / the TPU MXU) already runs at the
    roofline, so ``causal=False`` runs them here on every impl.

    Args:
      q: queries ``[B, T, H, D]``.
      k: keys ``[B, T, H, D]``.
      v: values ``[B, T, H, E]``.
      log_decay: None (no decay), ``[H]`` per head or ``[B, T, H]`` per token.
      causal: False runs the two GEMMs.
      scale: multiplies the output.
      initial_state: ``S_0 [B, H, D, E]`` or None (zeros).
      chunk_size: the kernel's chunk, a power of two >= 16.
      block_e: the value tile, a power of two >= 16 dividing the padded E (default ``min(E padded, 64)``).
      interpret: None dispatches when the program is lowered; True, "triton" or "mosaic" force one
        structure in the Pallas interpreter (tests).
      poison_outputs: NaN-fill every kernel output before the kernels run (tests).

    Returns:
      ``(out [B, T, H, E] in q's dtype, final state [B, H, D, E] float32)``.

    Raises:
      ValueError: ``chunk_size`` or ``block_e`` is not a power of two >= 16, or ``block_e`` does not divide
        the padded value dim.
    """
    from pallas_kernels import linear as kernel

    B, T, H, D = q.shape
    E = v.shape[3]
    if not causal:
        return noncausal_linear_attention(q, k, v, scale=scale, initial_state=initial_state)
    checks.check_block_size("chunk_size", chunk_size, minimum=PALLAS_MIN_DIM)
    C = chunk_size
    N = -(-T // C)
    Dp, Ep = common.padded_head_dim(D), common.padded_head_dim(E)
    block_e = min(Ep, 64) if block_e is None else checks.check_block_size("block_e", block_e,
                                                                          minimum=PALLAS_MIN_DIM)
    if Ep % block_e:
        raise ValueError(f"block_e={block_e} must divide the padded value dim {Ep} (E={E})")

    def to_kernel(x, F, Fp):  # [B, T, H, F] -> [B*H, N*C, Fp]
        x = jnp.pad(x, ((0, 0), (0, N * C - T), (0, 0), (0, Fp - F)))
        return jnp.transpose(x, (0, 2, 1, 3)).reshape(B * H, N * C, Fp)

    kk, vk = to_kernel(k, D, Dp), to_kernel(v, E, Ep)
    a = common.pad_axis(per_token_log_decay(log_decay, B, T, H), 1, N * C)
    a = jnp.transpose(a, (0, 2, 1)).reshape(B * H, N * C)
    s0 = state_or_zeros(initial_state, B, H, D, E)
    s0 = jnp.pad(s0, ((0, 0), (0, 0), (0, Dp - D), (0, Ep - E))).reshape(B * H, Dp, Ep)
    out, final = kernel.lightning_attention(to_kernel(q, D, Dp), kk, vk, a, s0, scale=scale, chunk_size=C,
                                            block_e=block_e, interpret=interpret, poison_outputs=poison_outputs)
    out = jnp.transpose(out.reshape(B, H, N * C, Ep), (0, 2, 1, 3))[:, :T, :, :E]
    return out, final.reshape(B, H, Dp, Ep)[:, :, :D, :E]


def _is_pallas_chunk(chunk_size) -> bool:
    return chunk_size >= PALLAS_MIN_DIM and not chunk_size & (chunk_size - 1)


def _unsupported_chunk(chunk_size: int, q, v):
    B, T, H, D = q.shape
    shapes = [jax.ShapeDtypeStruct((B, T, H, v.shape[3]), q.dtype),
              jax.ShapeDtypeStruct((B, H, D, v.shape[3]), jnp.float32)]
    message = (f"chunk_size={chunk_size} cannot run the Pallas lightning kernel that impl='auto' uses on GPU/TPU: "
               f"it must be a power of two >= {PALLAS_MIN_DIM}")
    return lambda q, k, v, s0: tuple(common.unsupported_on_target(message, shapes)(q, k, v, s0))


def _with_state(form):
    """``form(q, k, v, *, initial_state, **static)`` as a callable over ``(q, k, v, initial_state)``."""
    return lambda q, k, v, initial_state, **static: form(q, k, v, initial_state=initial_state, **static)


# ----------------------------------------------------------------------------------------------------
# The public entry points


def linear_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv E"], *,
                     log_decay: Float[Array, "H"] | Float[Array, "B T H"] | None = None, causal: bool = True,
                     scale: float = 1.0, initial_state: Float[Array, "B H D E"] | None = None,
                     return_final_state: bool = False, chunk_size: int = 64, impl: str = "auto",
                     ) -> Float[Array, "B T H E"] | tuple[Float[Array, "B T H E"], Float[Array, "B H D E"]]:
    """Linear attention ``S_t = lambda_t S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t`` (P58, P74).

    GQA/MQA: query head ``h`` reads kv head ``h // (H // Hkv)`` (k, v are repeated per group before
    dispatch, so every impl and the gradients, which sum over the group, are exact); ``log_decay``,
    ``initial_state`` and the final state are per query head.

    Args:
      q: queries ``[B, T, H, D]``; one dtype for q, k and v.
      k: keys ``[B, T, Hkv, D]``, ``H`` a multiple of ``Hkv``.
      v: values ``[B, T, Hkv, E]`` (E may differ from D).
      log_decay: None (no decay), ``[H]`` per head or ``[B, T, H]`` per token; ``lambda = exp(log_decay)``.
        Values should be ``<= 0`` (a decay); causal only.
      causal: False gives ``o_t = scale q_t (S_0 + sum_j k_j^T v_j)``.
      scale: multiplies the output (Lightning's kernels use 1.0).
      initial_state: ``[B, H, D, E]`` state ``S_0`` to start from (chunked prefill, decode handoff).
      return_final_state: also return ``S_T [B, H, D, E]`` (float32).
      chunk_size: chunk length of the xla and pallas forms (pallas: a power of two >= 16).
      impl: "auto" (pallas on GPU/TPU, xla on CPU) | "pallas" | "xla" | "recurrent" | "reference".

    Returns:
      ``out [B, T, H, E]`` in q's dtype, or ``(out, final state [B, H, D, E] float32)`` with
      ``return_final_state``.

    Raises:
      ValueError: a shape, size or choice is invalid (the message names the argument).
      TypeError: a dtype or a static argument's type is invalid, or a static argument is traced.
    """
    checks.check_static("linear_attention", causal=causal, scale=scale, return_final_state=return_final_state,
                        chunk_size=chunk_size, impl=impl)
    check_linear_args(q, k, v, log_decay=log_decay, causal=causal, scale=scale, initial_state=initial_state,
                      return_final_state=return_final_state, chunk_size=chunk_size, impl=impl)
    if k.shape[2] != q.shape[2]:  # GQA: repeat kv head j for query heads j*G .. j*G + G - 1
        group = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    static = dict(log_decay=log_decay, causal=causal, scale=float(scale))
    chunked = dict(static, chunk_size=int(chunk_size))
    pallas = functools.partial(_with_state(linear_attention_pallas), **chunked)
    if impl == "auto" and causal and not _is_pallas_chunk(chunk_size):
        # Legal for the xla path that CPU runs; the kernels' targets fail, naming it, only when lowered.
        pallas = _unsupported_chunk(chunk_size, q, v)
    out, final = run_impl(
        impl, (q, k, v, initial_state), xla=functools.partial(_with_state(linear_attention_chunked), **chunked),
        pallas=pallas, reference=functools.partial(_with_state(linear_attention_reference), **static),
        extra={"recurrent": functools.partial(_with_state(linear_attention_recurrent), **static)},
        choices=LINEAR_IMPLS)
    out = out.astype(q.dtype)
    return (out, final) if return_final_state else out


def linear_attention_step(q_t: Float[Array, "B H D"], k_t: Float[Array, "B H D"], v_t: Float[Array, "B H E"],
                          state: Float[Array, "B H D E"], *,
                          log_decay: Float[Array, "H"] | Float[Array, "B H"] | None = None, scale: float = 1.0,
                          ) -> tuple[Float[Array, "B H E"], Float[Array, "B H D E"]]:
    """One decode step of causal linear attention: ``S = lambda S + k_t^T v_t``, ``o_t = scale q_t S``.

    Args:
      q_t: the new token's query ``[B, H, D]``.
      k_t: its key ``[B, H, D]``.
      v_t: its value ``[B, H, E]``.
      state: the state ``[B, H, D, E]`` after the previous token (``linear_attention``'s final state).
      log_decay: None (no decay), ``[H]`` per head or ``[B, H]`` for this token.
      scale: multiplies the output.

    Returns:
      ``(o_t [B, H, E] in q_t's dtype, new state [B, H, D, E] float32)``.

    Raises:
      ValueError: a shape is invalid (the message names the argument).
      TypeError: a dtype or ``scale`` is invalid.
    """
    checks.check_float_array("q_t", q_t, 3)
    checks.check_float_array("k_t", k_t, 3)
    checks.check_float_array("v_t", v_t, 3)
    checks.check_float_array("state", state, 4)
    B, H, D = q_t.shape
    if tuple(k_t.shape) != (B, H, D):
        raise ValueError(f"k_t must have the shape of q_t [B, H, D] = {(B, H, D)}, got {checks.describe(k_t)}")
    if tuple(v_t.shape[:2]) != (B, H):
        raise ValueError(f"v_t must have shape [B, H, E] with [B, H] = {(B, H)}, got {checks.describe(v_t)}")
    E = v_t.shape[2]
    if tuple(state.shape) != (B, H, D, E):
        raise ValueError(f"state must have shape [B, H, D, E] = {(B, H, D, E)}, got {checks.describe(state)}")
    scale = checks.check_finite_float("scale", scale)
    if log_decay is None:
        a = jnp.zeros((B, H), jnp.float32)
    else:
        checks.check_float_array("log_decay", log_decay)
        if tuple(log_decay.shape) not in ((H,), (B, H)):
            raise ValueError(f"log_decay must have shape [H] = {(H,)} or [B, H] = {(B, H)}, "
                             f"got {checks.describe(log_decay)}")
        a = jnp.broadcast_to(log_decay.astype(jnp.float32), (B, H))
    new_state, out = recurrent_step(state.astype(jnp.float32), *as_f32(q_t, k_t, v_t), a, scale)
    return out.astype(q_t.dtype), new_state
