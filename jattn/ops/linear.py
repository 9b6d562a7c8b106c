"""``jattn.linear_attention``: causal (optionally decayed) and non-causal linear attention.

One recurrence serves the whole linear family (P58 Lightning-1 / TransNormerLLM, P74 Lightning-2):

    S_t = lambda_t * S_{t-1} + k_t^T v_t        (S: [D, E] per batch and head, float32)
    o_t = scale * q_t S_t

with ``lambda_t = exp(log_decay_t)``, either one value per head (``[H]``) or one per token and head
(``[B, T, H]``). The non-causal form is ``o_t = scale * q_t (S_0 + sum_j k_j^T v_j)`` (no decay).

Four forms, kept side by side and tested equal:

* ``reference``: the parallel quadratic form ``((q k^T) * D) v`` with the decay matrix
  ``D[i, j] = exp(c_i - c_j)`` for ``j <= i`` (``c`` the cumulative log-decay);
* ``recurrent``: a ``lax.scan`` over tokens; ``linear_attention_step`` is its one-token decode step;
* ``xla``: the chunked form of Lightning-2 (intra-chunk masked product + inter-chunk state), the CPU
  fast path;
* ``pallas``: ``pallas_kernels.lightning`` (forward, dq sweep and reverse dk/dv sweep).

Decay is applied through log-decays cumulated *from the chunk start* (``b_i <= 0`` when every
``log_decay <= 0``), so every exponent the chunked forms take is ``<= 0``: no overflow for any length.
"""
from __future__ import annotations

import functools

import math

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core import checks
from jattn.ops.dispatch import run_impl

HIGHEST = jax.lax.Precision.HIGHEST
LINEAR_IMPLS = ("auto", "pallas", "xla", "recurrent", "reference")
PALLAS_MIN_DIM = 16


# ----------------------------------------------------------------------------------------------------
# Decay constructors (both conventions of the P58 spec). They return log-decays (<= 0), shape [H].


def _alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes 2^(-8(h+1)/H); non-power-of-two H interleaves the next power's slopes (as ALiBi)."""
    def power_of_two_slopes(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    if num_heads & (num_heads - 1) == 0:
        return power_of_two_slopes(num_heads)
    closest = 2 ** int(math.floor(math.log2(num_heads)))
    extra = power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return power_of_two_slopes(closest) + extra


def _check_layer(num_heads, layer, num_layers):
    for name, value in (("num_heads", num_heads), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, (int, np.integer))
                              or not 0 <= layer < num_layers):
        raise ValueError(f"layer must be None or an int in [0, num_layers={num_layers}), got {layer!r}")


def alibi_log_decay(num_heads: int, *, layer: int | None = None, num_layers: int = 1) -> jnp.ndarray:
    """TransNormerLLM's decay (its HF code, which the P58 spec calls authoritative): ``-s_h * f_l``.

    ``s_h = 2^(-8(h+1)/H)`` (ALiBi slopes) and, when ``layer`` is given, the per-layer factor
    ``f_l = 1 - l / (L - 1) + 1e-5`` (``f_l = 1`` when ``num_layers == 1``, where the code divides by 0).
    """
    _check_layer(num_heads, layer, num_layers)
    slopes = np.asarray(_alibi_slopes(int(num_heads)), np.float64)
    if layer is not None and num_layers > 1:
        slopes = slopes * (1.0 - layer / (num_layers - 1) + 1e-5)
    return jnp.asarray(-slopes, jnp.float32)


def linear_log_decay(num_heads: int, *, layer: int = 0, num_layers: int = 1) -> jnp.ndarray:
    """The TransNormerLLM paper-text decay, linear in the head index: ``-(8h/H)(1 - l/L)``.

    Reading chosen (the text is ambiguous): ``h = 0..H-1``, so head 0 does not decay.
    """
    _check_layer(num_heads, layer, num_layers)
    heads = np.arange(num_heads, dtype=np.float64)
    return jnp.asarray(-(8.0 * heads / num_heads) * (1.0 - layer / num_layers), jnp.float32)


# ----------------------------------------------------------------------------------------------------
# Validation


def _check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _check_scale(scale):
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a Python float, got {scale!r}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return float(scale)


def _check_chunk_size(chunk_size):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"chunk_size must be an int, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


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
    _check_bool("causal", causal)
    _check_bool("return_final_state", return_final_state)
    _check_scale(scale)
    _check_chunk_size(chunk_size)
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


def resolve_linear_impl(impl: str) -> str:
    """Static policy only: "auto" counts as pallas (decided at lowering time, see ``jattn.ops.dispatch``)."""
    checks.check_choice("impl", impl, LINEAR_IMPLS)
    return "pallas" if impl == "auto" else impl


# ----------------------------------------------------------------------------------------------------
# Shared helpers (float32 throughout)


def _per_token_log_decay(log_decay, B, T, H):
    """float32 ``[B, T, H]`` log-decays (zeros when None)."""
    if log_decay is None:
        return jnp.zeros((B, T, H), jnp.float32)
    log_decay = log_decay.astype(jnp.float32)
    return jnp.broadcast_to(log_decay, (B, T, H)) if log_decay.ndim == 1 else log_decay


def _zero_state(B, H, D, E):
    return jnp.zeros((B, H, D, E), jnp.float32)


def _f32(*xs):
    return tuple(x.astype(jnp.float32) for x in xs)


def _finish(out, final_state, dtype, return_final_state):
    out = out.astype(dtype)
    return (out, final_state) if return_final_state else out


def _noncausal(q, k, v, *, scale, initial_state, precision=None):
    """``o = scale * q (S_0 + K^T V)``: two GEMMs, the same for every impl but the quadratic one."""
    q, k, v = _f32(q, k, v)
    state = jnp.einsum("bthd,bthe->bhde", k, v, precision=precision)
    if initial_state is not None:
        state = state + initial_state.astype(jnp.float32)
    return scale * jnp.einsum("bthd,bhde->bthe", q, state, precision=precision), state


# ----------------------------------------------------------------------------------------------------
# The parallel (quadratic) form: the oracle


def linear_attention_reference(q, k, v, *, log_decay=None, causal=True, scale=1.0, initial_state=None):
    """Quadratic parallel form ``scale * ((q k^T) * D) v`` (+ the initial-state term); (out f32, final state)."""
    B, T, H, D = q.shape
    E = v.shape[3]
    q, k, v = _f32(q, k, v)
    s0 = _zero_state(B, H, D, E) if initial_state is None else initial_state.astype(jnp.float32)
    scores = jnp.einsum("bthd,bshd->bhts", q, k, precision=HIGHEST)
    if not causal:
        out = jnp.einsum("bhts,bshe->bthe", scores, v, precision=HIGHEST)
        out = out + jnp.einsum("bthd,bhde->bthe", q, s0, precision=HIGHEST)
        final = s0 + jnp.einsum("bthd,bthe->bhde", k, v, precision=HIGHEST)
        return scale * out, final
    cum = jnp.cumsum(_per_token_log_decay(log_decay, B, T, H), axis=1)  # c_t, [B, T, H]
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


# ----------------------------------------------------------------------------------------------------
# The recurrent form and its decode step


def _step(state, q_t, k_t, v_t, log_decay_t, scale):
    """One token: ``S = lambda S + k^T v``, ``o = scale q S``; shapes [B, H, ...], all float32."""
    state = jnp.exp(log_decay_t)[..., None, None] * state + k_t[..., :, None] * v_t[..., None, :]
    out = scale * jnp.einsum("bhd,bhde->bhe", q_t, state, precision=HIGHEST)
    return state, out


def linear_attention_recurrent(q, k, v, *, log_decay=None, causal=True, scale=1.0, initial_state=None):
    """``lax.scan`` over tokens; (out f32, final state)."""
    B, T, H, D = q.shape
    E = v.shape[3]
    if not causal:
        return _noncausal(q, k, v, scale=scale, initial_state=initial_state, precision=HIGHEST)
    q, k, v = _f32(q, k, v)
    s0 = _zero_state(B, H, D, E) if initial_state is None else initial_state.astype(jnp.float32)
    a = _per_token_log_decay(log_decay, B, T, H)
    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, a)]

    def body(state, xs):
        q_t, k_t, v_t, a_t = xs
        return _step(state, q_t, k_t, v_t, a_t, scale)

    final, out = jax.lax.scan(body, s0, time_major)
    return jnp.moveaxis(out, 0, 1), final


def linear_attention_step(q_t, k_t, v_t, state, *, log_decay=None, scale=1.0):
    """One decode step of causal linear attention: returns ``(o_t [B, H, E] in q's dtype, new state f32)``.

    Args: ``q_t, k_t [B, H, D]``, ``v_t [B, H, E]``, ``state [B, H, D, E]``, ``log_decay`` ``[H]`` or
    ``[B, H]`` (None: no decay), ``scale`` a float.
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
    scale = _check_scale(scale)
    if log_decay is None:
        a = jnp.zeros((B, H), jnp.float32)
    else:
        checks.check_float_array("log_decay", log_decay)
        if tuple(log_decay.shape) not in ((H,), (B, H)):
            raise ValueError(f"log_decay must have shape [H] = {(H,)} or [B, H] = {(B, H)}, "
                             f"got {checks.describe(log_decay)}")
        a = jnp.broadcast_to(log_decay.astype(jnp.float32), (B, H))
    new_state, out = _step(state.astype(jnp.float32), *_f32(q_t, k_t, v_t), a, scale)
    return out.astype(q_t.dtype), new_state


# ----------------------------------------------------------------------------------------------------
# The chunked form (Lightning-2), pure JAX


def chunk_local_log_decay(a, chunk: int):
    """Cumulative log-decay from each chunk's start: ``a [..., N*chunk] -> b [..., N, chunk]``."""
    return jnp.cumsum(a.reshape(a.shape[:-1] + (a.shape[-1] // chunk, chunk)), axis=-1)


def _pad_time(x, padded_T, axis=1):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, padded_T - x.shape[axis])
    return jnp.pad(x, pad)


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


def linear_attention_chunked(q, k, v, *, log_decay=None, causal=True, scale=1.0, initial_state=None,
                             chunk_size=64):
    """Lightning-2's chunked form, scanned over segments of ``SEGMENT_CHUNKS`` chunks; (out f32, final)."""
    B, T, H, D = q.shape
    E = v.shape[3]
    if not causal:
        return _noncausal(q, k, v, scale=scale, initial_state=initial_state)
    C = min(chunk_size, T)
    G = min(-(-T // C), SEGMENT_CHUNKS)
    L = G * C
    num_segments = -(-T // L)
    padded = num_segments * L
    q, k, v = (_pad_time(x, padded) for x in _f32(q, k, v))  # zero rows: no effect on the state
    if log_decay is None:
        a = jnp.zeros((H,), jnp.float32)
    elif log_decay.ndim == 1 and padded == T:
        a = log_decay.astype(jnp.float32)
    else:  # per token; padded positions get log 1 = 0 so the final state is not decayed past the end
        a = _pad_time(_per_token_log_decay(log_decay, B, T, H), padded)
    s0 = _zero_state(B, H, D, E) if initial_state is None else initial_state.astype(jnp.float32)
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


# ----------------------------------------------------------------------------------------------------
# Pallas dispatch


def _next_pow2(n: int, minimum: int) -> int:
    p = minimum
    while p < n:
        p *= 2
    return p


def linear_attention_pallas(q, k, v, *, log_decay=None, causal=True, scale=1.0, initial_state=None,
                            chunk_size=64, block_e=None, interpret=None, poison_outputs=False):
    """Pallas lightning kernel. D and E are zero-padded to powers of two >= 16 (exact: zero features
    add nothing to q k^T, zero value channels are sliced off) and T to a multiple of the chunk.

    Non-causal linear attention has no kernel: it is two GEMMs, ``o = scale * q (S_0 + K^T V)``, which XLA
    (cuBLAS / the TPU MXU) already runs at the roofline, so ``causal=False`` runs them here on every impl.
    """
    from pallas_kernels import lightning

    B, T, H, D = q.shape
    E = v.shape[3]
    if not causal:
        return _noncausal(q, k, v, scale=scale, initial_state=initial_state)
    checks.check_block_size("chunk_size", chunk_size, minimum=PALLAS_MIN_DIM)
    C = chunk_size
    N = -(-T // C)
    Dp, Ep = _next_pow2(D, PALLAS_MIN_DIM), _next_pow2(E, PALLAS_MIN_DIM)
    block_e = min(Ep, 64) if block_e is None else checks.check_block_size("block_e", block_e,
                                                                          minimum=PALLAS_MIN_DIM)
    if Ep % block_e:
        raise ValueError(f"block_e={block_e} must divide the padded value dim {Ep} (E={E})")

    def to_kernel(x, F, Fp):  # [B, T, H, F] -> [B*H, N*C, Fp]
        x = jnp.pad(x, ((0, 0), (0, N * C - T), (0, 0), (0, Fp - F)))
        return jnp.transpose(x, (0, 2, 1, 3)).reshape(B * H, N * C, Fp)

    kk, vk = to_kernel(k, D, Dp), to_kernel(v, E, Ep)
    a = _pad_time(_per_token_log_decay(log_decay, B, T, H), N * C)
    a = jnp.transpose(a, (0, 2, 1)).reshape(B * H, N * C)
    s0 = _zero_state(B, H, D, E) if initial_state is None else initial_state.astype(jnp.float32)
    s0 = jnp.pad(s0, ((0, 0), (0, 0), (0, Dp - D), (0, Ep - E))).reshape(B * H, Dp, Ep)
    out, final = lightning.lightning_attention(to_kernel(q, D, Dp), kk, vk, a, s0, scale=scale, chunk_size=C,
                                               block_e=block_e, interpret=interpret, poison_outputs=poison_outputs)
    out = jnp.transpose(out.reshape(B, H, N * C, Ep), (0, 2, 1, 3))[:, :T, :, :E]
    return out, final.reshape(B, H, Dp, Ep)[:, :, :D, :E]


# ----------------------------------------------------------------------------------------------------
# The public entry point


def _chunked_with_state(q, k, v, initial_state, **kwargs):
    return linear_attention_chunked(q, k, v, initial_state=initial_state, **kwargs)


def _is_pallas_chunk(chunk_size) -> bool:
    return chunk_size >= PALLAS_MIN_DIM and not chunk_size & (chunk_size - 1)


def _unsupported_chunk(chunk_size: int, q, v):
    from pallas_kernels.common import unsupported_on_target
    B, T, H, D = q.shape
    shapes = [jax.ShapeDtypeStruct((B, T, H, v.shape[3]), q.dtype),
              jax.ShapeDtypeStruct((B, H, D, v.shape[3]), jnp.float32)]
    message = (f"chunk_size={chunk_size} cannot run the Pallas lightning kernel that impl='auto' uses on GPU/TPU: "
               f"it must be a power of two >= {PALLAS_MIN_DIM}")
    return lambda q, k, v, s0: tuple(unsupported_on_target(message, shapes)(q, k, v, s0))


def _pallas_with_state(q, k, v, initial_state, **kwargs):
    return linear_attention_pallas(q, k, v, initial_state=initial_state, **kwargs)


def linear_attention(q, k, v, *, log_decay=None, causal: bool = True, scale: float = 1.0,
                     initial_state=None, return_final_state: bool = False, chunk_size: int = 64,
                     impl: str = "auto"):
    """Linear attention ``S_t = lambda_t S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t`` (P58, P74).

    Args:
      q: ``[B, T, H, D]``; k: ``[B, T, Hkv, D]``; v: ``[B, T, Hkv, E]`` (E may differ from D). One dtype for
        all three. GQA/MQA: ``H`` a multiple of ``Hkv``, query head ``h`` reads kv head ``h // (H // Hkv)``
        (k, v are repeated per group before dispatch, so every impl and the gradients, which sum over the
        group, are exact); ``log_decay``, ``initial_state`` and the final state are per query head.
      log_decay: None (no decay), ``[H]`` per head or ``[B, T, H]`` per token; ``lambda = exp(log_decay)``.
        Values should be ``<= 0`` (a decay); causal only.
      causal: False gives ``o_t = scale q_t (S_0 + sum_j k_j^T v_j)``.
      scale: multiplies the output (Lightning's kernels use 1.0).
      initial_state: ``[B, H, D, E]`` state ``S_0`` to start from (chunked prefill, decode handoff).
      return_final_state: also return ``S_T [B, H, D, E]`` (float32).
      chunk_size: chunk length of the xla and pallas forms (pallas: a power of two >= 16).
      impl: "auto" (pallas on GPU/TPU, xla on CPU) | "pallas" | "xla" | "recurrent" | "reference".

    Returns ``out [B, T, H, E]`` in q's dtype (and the float32 final state when asked).
    """
    checks.check_static("linear_attention", causal=causal, scale=scale, return_final_state=return_final_state, chunk_size=chunk_size, impl=impl)
    check_linear_args(q, k, v, log_decay=log_decay, causal=causal, scale=scale, initial_state=initial_state,
                      return_final_state=return_final_state, chunk_size=chunk_size, impl=impl)
    if k.shape[2] != q.shape[2]:  # GQA: repeat kv head j for query heads j*G .. j*G + G - 1
        group = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    kwargs = dict(log_decay=log_decay, causal=causal, scale=float(scale))
    if impl == "reference":
        out, final = linear_attention_reference(q, k, v, initial_state=initial_state, **kwargs)
    elif impl == "recurrent":
        out, final = linear_attention_recurrent(q, k, v, initial_state=initial_state, **kwargs)
    else:
        xla = functools.partial(_chunked_with_state, chunk_size=int(chunk_size), **kwargs)
        pallas = functools.partial(_pallas_with_state, chunk_size=int(chunk_size), **kwargs)
        if impl == "auto" and causal and not _is_pallas_chunk(chunk_size):
            # Legal for the xla path that CPU runs; the kernels' targets fail, naming it, only when lowered.
            pallas = _unsupported_chunk(chunk_size, q, v)
        out, final = run_impl(impl, (q, k, v, initial_state), xla=xla, pallas=pallas, choices=LINEAR_IMPLS)
    return _finish(out, final, q.dtype, return_final_state)
