"""P55 — FuseMax: Leveraging Extended Einsums to Optimize Attention Accelerator Design.

The paper's testable content is its cascade formalism: softmax attention written as a cascade of extended
Einsums, and how many passes over the keys/values (rank ``M``) a cascade needs. With queries ``P``, keys ``M``,
``E`` the q/k dim and ``F`` the v dim (per batch and head):

* **3-pass** (naive): ``QK[m, p] = sum_e Q[e, p] K[e, m]``; pass 1 ``GM[p] = max_m QK``; pass 2 ``SN = exp(QK -
  GM)``, ``SD[p] = sum_m SN``; pass 3 ``A = SN / SD``, ``AV[f, p] = sum_m A V``. The max, the sum and ``AV``
  each reduce over all of ``M`` and the next Einsum needs the full reduction, so each is one pass over the
  inputs (or ``QK`` is buffered: ``O(M P)``).
* **2-pass**: pass 1 keeps a running max and a rescaled running denominator (the online normaliser); pass 2
  ``AV = sum_m exp(QK - GM) / SD * V``.
* **1-pass** (FuseMax): ``M = M1 x M0``; for each ``m1``: ``LM = max_{m0} QK``, ``RM = max(RM_prev, LM)``,
  ``PRM = exp(RM_prev - RM)``, ``SLN = exp(QK - RM)``, ``SLD = sum_{m0} SLN``, ``SLNV = sum_{m0} SLN V``,
  ``SPD = PRM RD_prev``, ``SPNV = PRM RNV_prev``, ``RD = SPD + SLD``, ``RNV = SPNV + SLNV``; at the end ``AV =
  RNV / RD`` (the division deferred). This is the online softmax jattn's flash kernels run.

``cascade_attention`` runs each cascade as written, one ``lax.scan`` over the ``M1`` key chunks per pass (the
tests count those scans in the jaxpr), and ``cascade_cost_model`` counts its passes over K/V, the on-chip
buffer it needs and its per-Einsum operations. The accelerator (a 256 x 256 PE array, Timeloop/Accelergy
models in ``FPSG-UIUC/micro24-fusemax-artifact``) is out of scope; the op counts here follow the cascade
definitions above (the artifact's compute-cost table was not read), counting one op per Einsum point.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from jattn.core import checks

__all__ = ["cascade_attention", "cascade_cost_model", "CascadeCost", "PASSES"]

HIGHEST = lax.Precision.HIGHEST
PASSES = (3, 2, 1)


def _check(q, k, v, passes, m0):
    checks.check_float_array("q", q, 4)
    checks.check_float_array("k", k, 4)
    checks.check_float_array("v", v, 4)
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q [B, P, H, E], k [B, M, Hkv, E] and v [B, M, Hkv, F] must agree, got q "
                         f"{checks.describe(q)}, k {checks.describe(k)}, v {checks.describe(v)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q's heads must be a multiple of k's, got H={q.shape[2]} and Hkv={k.shape[2]}")
    if passes not in PASSES:
        raise ValueError(f"passes must be one of {PASSES}, got {passes!r}")
    M = k.shape[1]
    m0 = M if m0 is None else checks.check_int("m0", m0)
    if M % m0:
        raise ValueError(f"m0 must divide the number of keys M={M} (M = M1 x M0), got m0={m0}")
    return m0


def _chunks(x, m0):
    """``[B, M, H, D] -> [M1, B, H, m0, D]``: the key chunks a pass scans over."""
    B, M, H, D = x.shape
    return jnp.moveaxis(x.reshape(B, M // m0, m0, H, D), 1, 0).swapaxes(2, 3)


def _logits(q, k_chunk, scale):
    """``QK`` of one chunk: ``[B, H, P, m0]`` float32."""
    return jnp.einsum("bphe,bhme->bhpm", q, k_chunk, precision=HIGHEST) * scale


def _three_pass(q, k_chunks, v_chunks, scale):
    B, P, H, _ = q.shape
    neg = jnp.full((B, H, P), -jnp.inf, jnp.float32)
    gm, _ = lax.scan(lambda gm, kc: (jnp.maximum(gm, jnp.max(_logits(q, kc, scale), -1)), None), neg, k_chunks)
    sd, _ = lax.scan(lambda sd, kc: (sd + jnp.sum(jnp.exp(_logits(q, kc, scale) - gm[..., None]), -1), None),
                     jnp.zeros_like(gm), k_chunks)

    def third(av, kv):
        a = jnp.exp(_logits(q, kv[0], scale) - gm[..., None]) / sd[..., None]
        return av + jnp.einsum("bhpm,bhmf->bhpf", a, kv[1], precision=HIGHEST), None
    av, _ = lax.scan(third, jnp.zeros((B, H, P, v_chunks.shape[-1]), jnp.float32), (k_chunks, v_chunks))
    return av


def _two_pass(q, k_chunks, v_chunks, scale):
    B, P, H, _ = q.shape

    def first(carry, kc):
        rm, rd = carry
        qk = _logits(q, kc, scale)
        new = jnp.maximum(rm, jnp.max(qk, -1))
        return (new, rd * jnp.exp(rm - new) + jnp.sum(jnp.exp(qk - new[..., None]), -1)), None
    (gm, sd), _ = lax.scan(first, (jnp.full((B, H, P), -jnp.inf), jnp.zeros((B, H, P))), k_chunks)

    def second(av, kv):
        a = jnp.exp(_logits(q, kv[0], scale) - gm[..., None]) / sd[..., None]
        return av + jnp.einsum("bhpm,bhmf->bhpf", a, kv[1], precision=HIGHEST), None
    av, _ = lax.scan(second, jnp.zeros((B, H, P, v_chunks.shape[-1]), jnp.float32), (k_chunks, v_chunks))
    return av


def _one_pass(q, k_chunks, v_chunks, scale):
    B, P, H, _ = q.shape

    def step(carry, kv):
        rm_prev, rd_prev, rnv_prev = carry
        qk = _logits(q, kv[0], scale)
        lm = jnp.max(qk, -1)                                  # LM: local max over m0
        rm = jnp.maximum(rm_prev, lm)                         # RM
        prm = jnp.exp(rm_prev - rm)                           # PRM (exp(-inf) = 0 on the first chunk)
        sln = jnp.exp(qk - rm[..., None])                     # SLN
        sld = jnp.sum(sln, -1)                                # SLD
        slnv = jnp.einsum("bhpm,bhmf->bhpf", sln, kv[1], precision=HIGHEST)  # SLNV
        rd = prm * rd_prev + sld                              # RD = SPD + SLD
        rnv = prm[..., None] * rnv_prev + slnv                # RNV = SPNV + SLNV
        return (rm, rd, rnv), None
    init = (jnp.full((B, H, P), -jnp.inf), jnp.zeros((B, H, P)), jnp.zeros((B, H, P, v_chunks.shape[-1])))
    (_, rd, rnv), _ = lax.scan(step, init, (k_chunks, v_chunks))
    return rnv / rd[..., None]                                # AV: the one division, at the end


def cascade_attention(q: Float[Array, "B P H E"], k: Float[Array, "B M Hkv E"], v: Float[Array, "B M Hkv F"], *,
                      passes: int, m0: int | None = None, scale: float | None = None) -> Float[Array, "B P H F"]:
    """Softmax attention (non-causal) computed by the ``passes``-pass cascade, one scan over the ``M / m0``
    key chunks per pass.

    Args:
      q: ``[B, P, H, E]`` queries.
      k: ``[B, M, Hkv, E]`` keys (GQA: query head ``h`` reads kv head ``h // (H // Hkv)``).
      v: ``[B, M, Hkv, F]`` values.
      passes: 3 (naive), 2 (online normaliser, then ``AV``) or 1 (FuseMax: online softmax, deferred division).
      m0: keys per chunk ``M0`` (must divide ``M``); None: one chunk.
      scale: logit scale, default ``E ** -0.5``.

    Returns:
      float32 ``[B, P, H, F]``.
    """
    m0 = _check(q, k, v, passes, m0)
    scale = q.shape[-1] ** -0.5 if scale is None else checks.check_finite_float("scale", scale)
    group = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x.astype(jnp.float32), group, axis=2) for x in (k, v))
    run = {3: _three_pass, 2: _two_pass, 1: _one_pass}[passes]
    out = run(q.astype(jnp.float32), _chunks(k, m0), _chunks(v, m0), scale)
    return jnp.transpose(out, (0, 2, 1, 3))


class CascadeCost(NamedTuple):
    input_passes: int          # passes over K and V (the rank M)
    buffer_elements: int       # on-chip state for one (batch, head): chunk tiles + running state
    buffer_elements_unfused: int  # what holding QK instead of re-reading K would take (3- and 2-pass)
    ops: dict                  # per-Einsum op counts (one op per point of the Einsum's iteration space)


def cascade_cost_model(*, P: int, M: int, E: int, F: int, passes: int, m0: int) -> CascadeCost:
    """Passes over K/V, on-chip buffer and per-Einsum op counts of one (batch, head)'s cascade.

    The buffer is what a pass keeps on chip: the ``[P, m0]`` logit tile, the ``[m0, E]`` / ``[m0, F]`` K/V
    tiles, the queries ``[P, E]`` and the running per-query state (``GM``/``SD``: ``P`` each; 1-pass also
    ``RNV``: ``P F``). It depends on ``m0`` but not on ``M``: re-reading the inputs is what buys that. The
    alternative, buffering ``QK`` between passes (``buffer_elements_unfused``), needs ``M P``.

    Args:
      P: queries. M: keys. E: q/k dim. F: v dim.
      passes: 3, 2 or 1.
      m0: keys per chunk (divides M).
    """
    for name, value in (("P", P), ("M", M), ("E", E), ("F", F), ("m0", m0)):
        checks.check_int(name, value)
    if passes not in PASSES:
        raise ValueError(f"passes must be one of {PASSES}, got {passes!r}")
    if M % m0:
        raise ValueError(f"m0 must divide M={M}, got m0={m0}")
    M1 = M // m0
    tiles = P * m0 + m0 * E + m0 * F + P * E
    qk = P * M * E
    if passes == 3:
        ops = {"QK": 3 * qk, "GM": P * M, "SN": 2 * P * M, "SD": P * M, "A": P * M, "AV": P * M * F}
        state = 2 * P + P * F
    elif passes == 2:
        ops = {"QK": 2 * qk, "RM": P * M, "PRM": P * M1, "SN": 2 * P * M, "RD": P * M + P * M1, "A": P * M,
               "AV": P * M * F}
        state = 2 * P + P * F
    else:
        ops = {"QK": qk, "LM": P * M, "RM": P * M1, "PRM": P * M1, "SLN": P * M, "SLD": P * M, "SLNV": P * M * F,
               "SPD": P * M1, "SPNV": P * M1 * F, "RD": P * M1, "RNV": P * M1 * F, "AV": P * F}
        state = 2 * P + P * F
    unfused = 0 if passes == 1 else P * M + state
    return CascadeCost(input_passes=passes, buffer_elements=tiles + state, buffer_elements_unfused=unfused, ops=ops)
