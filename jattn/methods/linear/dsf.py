"""P57 — Understanding the differences in Foundation Models: Attention, State Space Models, and Recurrent
Neural Networks (the Dynamical Systems Framework, DSF).

Every causal mixer here is one linear time-varying system per value channel, with a diagonal state of
size n:

    h_i = Lambda_i * h_{i-1} + B_i u_i,      y_i = C_i . h_i + D_i u_i

``DSF`` holds ``Lambda, B, C [..., T, n]`` and ``D [..., T]``; the same system acts on every value channel
(``u [..., T, E]``); per-channel systems (S6) put the channel in the leading dims. Its implied mixing
matrix is ``M[i, j] = C_i . (prod_{k=j+1..i} Lambda_k) B_j`` (+ ``D_i`` on the diagonal).

Conversions (the paper's correspondences; its Sec. on normalisation is partly unverified, the reading is
stated per function): decayed linear attention (Lambda = lambda I), normalised linear attention
(Lambda_i = eta_{i-1} / eta_i, a data-dependent scalar decay produced by the normaliser), selective SSM
S6 (Lambda = exp(Delta A), B = Delta b, C = c), SSD / Mamba-2 (scalar Lambda). The equivalence condition
``dsf_to_linear_attention`` checks: a DSF is a (decayed) linear attention exactly when each Lambda_i is a
positive multiple of the identity (isotropic).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core import checks
from jattn.core.reference import HIGHEST


class DSF(NamedTuple):
    decay: jax.Array   # Lambda [..., T, n]
    input: jax.Array   # B      [..., T, n]
    output: jax.Array  # C      [..., T, n]
    skip: jax.Array    # D      [..., T]


def _check_dsf(dsf):
    if not isinstance(dsf, DSF):
        raise TypeError(f"dsf must be a DSF (decay, input, output, skip), got {type(dsf).__name__}")
    for name, x in zip(DSF._fields, dsf):
        checks.check_float_array(f"dsf.{name}", x)
    shape = dsf.decay.shape
    if dsf.input.shape != shape or dsf.output.shape != shape or dsf.skip.shape != shape[:-1]:
        raise ValueError(f"dsf arrays must be decay, input, output [..., T, n] and skip [..., T]; got "
                         f"{[tuple(x.shape) for x in dsf]}")


def dsf_recurrent(dsf: DSF, u):
    """Runs the system on ``u [..., T, E]`` (leading dims broadcast with the DSF's); returns ``y [..., T, E]``."""
    _check_dsf(dsf)
    checks.check_float_array("u", u)
    if u.ndim < 2 or u.shape[-2] != dsf.decay.shape[-2]:
        raise ValueError(f"u must have shape [..., T, E] with T={dsf.decay.shape[-2]}, got {checks.describe(u)}")
    lead = jnp.broadcast_shapes(dsf.decay.shape[:-2], u.shape[:-2])
    n, E = dsf.decay.shape[-1], u.shape[-1]
    time_major = [jnp.moveaxis(jnp.broadcast_to(x.astype(jnp.float32), lead + x.shape[-2:]), -2, 0)
                  for x in (dsf.decay, dsf.input, dsf.output, u)]
    skip = jnp.moveaxis(jnp.broadcast_to(dsf.skip.astype(jnp.float32), lead + dsf.skip.shape[-1:]), -1, 0)

    def step(h, xs):
        decay, b, c, u_i, d = xs
        h = decay[..., None] * h + b[..., None] * u_i[..., None, :]
        return h, jnp.einsum("...n,...ne->...e", c, h, precision=HIGHEST) + d[..., None] * u_i

    _, y = jax.lax.scan(step, jnp.zeros(lead + (n, E), jnp.float32), (*time_major[:3], time_major[3], skip))
    return jnp.moveaxis(y, 0, -2)


def dsf_attention_matrix(dsf: DSF):
    """The mixing matrix ``M [..., T, T]`` with ``y = M u`` (lower triangular); no logs or divisions,
    so any real Lambda (zero or negative too) is exact."""
    _check_dsf(dsf)
    decay, b, c = (jnp.moveaxis(x.astype(jnp.float32), -2, 0) for x in dsf[:3])  # [T, ..., n]
    T = decay.shape[0]

    def row(carried, xs):  # carried[j] = (prod_{k=j+1..i} Lambda_k) B_j for j <= i, else 0
        i, decay_i, b_i, c_i = xs
        carried = decay_i[None] * carried
        carried = carried.at[i].set(b_i)
        return carried, jnp.einsum("j...n,...n->...j", carried, c_i, precision=HIGHEST)

    _, rows = jax.lax.scan(row, jnp.zeros((T,) + b.shape[1:], jnp.float32), (jnp.arange(T), decay, b, c))
    matrix = jnp.moveaxis(rows, 0, -2)  # [..., T(i), T(j)]
    return matrix + dsf.skip.astype(jnp.float32)[..., :, None] * jnp.eye(T, dtype=jnp.float32)


# ----------------------------------------------------------------------------------------------------
# Conversions into the DSF


def _check_qk(q, k):
    checks.check_float_array("q", q)
    checks.check_float_array("k", k)
    if q.shape != k.shape or q.ndim < 2:
        raise ValueError(f"q and k must share one shape [..., T, n], got {checks.describe(q)} and {checks.describe(k)}")


def linear_attention_dsf(q, k, log_decay=None, *, scale: float = 1.0) -> DSF:
    """Decayed linear attention (Lightning, P74) for one head: ``q, k [..., T, n]``; ``log_decay``
    scalar, ``[...]`` or ``[..., T]``; Lambda_i = lambda_i I, B_i = k_i, C_i = scale q_i."""
    _check_qk(q, k)
    a = jnp.zeros(q.shape[:-1], jnp.float32) if log_decay is None else jnp.asarray(log_decay, jnp.float32)
    if a.ndim == q.ndim - 2:  # per sequence (per head): the same decay at every step
        a = a[..., None]
    decay = jnp.broadcast_to(jnp.exp(a)[..., None], q.shape).astype(jnp.float32)
    return DSF(decay, k.astype(jnp.float32), scale * q.astype(jnp.float32), jnp.zeros(q.shape[:-1], jnp.float32))


def normalized_linear_attention_dsf(q, k, phi=lambda x: jax.nn.elu(x) + 1.0) -> DSF:
    """Normalised linear attention ``y_i = sum_{j<=i} phi(q_i).phi(k_j) u_j / eta_i`` with
    ``eta_i = phi(q_i) . sum_{j<=i} phi(k_j)``: with ``h_i = S_i / eta_i`` it is the DSF
    Lambda_i = eta_{i-1}/eta_i (eta_{-1} := eta_0), B_i = phi(k_i)/eta_i, C_i = phi(q_i).
    (The spec writes C_i ~ phi(q_i)/eta_i; this placement of 1/eta is the one that is exact.)"""
    _check_qk(q, k)
    phi_q, phi_k = phi(q.astype(jnp.float32)), phi(k.astype(jnp.float32))
    eta = jnp.sum(phi_q * jnp.cumsum(phi_k, axis=-2), axis=-1)  # [..., T]
    eta_prev = jnp.concatenate([eta[..., :1], eta[..., :-1]], axis=-1)
    decay = jnp.broadcast_to((eta_prev / eta)[..., None], phi_q.shape)
    return DSF(decay, phi_k / eta[..., None], phi_q, jnp.zeros(eta.shape, jnp.float32))


def s6_dsf(delta, A, b, c, d=None) -> DSF:
    """Selective SSM (S6 / Mamba) per channel: ``delta [..., T, E]``, ``A [E, n]``, ``b, c [..., T, n]``,
    ``d [E]``. Lambda = exp(Delta A), B = Delta b (Mamba's Euler input discretisation), C = c. Returns a DSF
    with the channel as a leading dim: arrays ``[..., E, T, n]`` (run it on ``u [..., E, T, 1]``)."""
    for name, x in (("delta", delta), ("A", A), ("b", b), ("c", c)):
        checks.check_float_array(name, x)
    E, n = A.shape
    if delta.shape[-1] != E or b.shape != c.shape or b.shape[-1] != n or b.shape[:-1] != delta.shape[:-1]:
        raise ValueError(f"expected delta [..., T, E], A [E, n], b, c [..., T, n]; got delta {delta.shape}, "
                         f"A {A.shape}, b {b.shape}, c {c.shape}")
    dt = jnp.moveaxis(delta.astype(jnp.float32), -1, -2)[..., None]  # [..., E, T, 1]
    decay = jnp.exp(dt * A.astype(jnp.float32)[:, None, :])
    b_e = jnp.broadcast_to(b.astype(jnp.float32)[..., None, :, :], decay.shape)
    c_e = jnp.broadcast_to(c.astype(jnp.float32)[..., None, :, :], decay.shape)
    skip = jnp.zeros(decay.shape[:-1], jnp.float32) if d is None else jnp.broadcast_to(
        jnp.asarray(d, jnp.float32)[:, None], decay.shape[:-1])
    return DSF(decay, dt * b_e, c_e, skip)


def ssd_dsf(log_decay, b, c) -> DSF:
    """SSD (Mamba-2): a scalar decay per step ``log_decay [..., T]`` (Lambda_i = exp(a_i) I), B = b, C = c."""
    checks.check_float_array("log_decay", log_decay)
    _check_qk(c, b)
    if log_decay.shape != b.shape[:-1]:
        raise ValueError(f"log_decay must have shape {b.shape[:-1]}, got {checks.describe(log_decay)}")
    return linear_attention_dsf(c, b, log_decay)


def dsf_to_linear_attention(dsf: DSF, *, atol: float = 1e-6):
    """``(q, k, log_decay [..., T])`` of the decayed linear attention equal to ``dsf``. The equivalence
    holds iff every Lambda_i is a positive multiple of the identity and D = 0; anything else (a diagonal
    S6 Lambda) raises ValueError. Needs concrete arrays (it inspects values)."""
    _check_dsf(dsf)
    decay = np.asarray(dsf.decay)
    if not np.allclose(decay, decay[..., :1], atol=atol):
        raise ValueError("Lambda_i is not isotropic (not a multiple of I): not a linear attention")
    if np.any(decay <= 0):
        raise ValueError("Lambda_i must be > 0 to be written as exp(log_decay)")
    if np.any(np.asarray(dsf.skip) != 0):
        raise ValueError("D must be 0 for a pure linear attention")
    return dsf.output, dsf.input, jnp.log(jnp.asarray(decay[..., 0]))


# ----------------------------------------------------------------------------------------------------
# Normalised linear attention, quadratic and through the Lambda_i = eta_{i-1}/eta_i recurrence


def normalized_linear_attention_quadratic(q, k, v, phi=lambda x: jax.nn.elu(x) + 1.0):
    """``y_i = sum_{j<=i} (phi(q_i).phi(k_j)) v_j / sum_{j<=i} phi(q_i).phi(k_j)``; ``q, k [..., T, n]``,
    ``v [..., T, E]``."""
    _check_qk(q, k)
    w = jnp.einsum("...in,...jn->...ij", phi(q.astype(jnp.float32)), phi(k.astype(jnp.float32)), precision=HIGHEST)
    w = jnp.tril(w)
    return jnp.einsum("...ij,...je->...ie", w / jnp.sum(w, axis=-1, keepdims=True), v.astype(jnp.float32),
                      precision=HIGHEST)


def normalized_linear_attention_recurrent(q, k, v, phi=lambda x: jax.nn.elu(x) + 1.0):
    """The same through ``h_i = (eta_{i-1}/eta_i) h_{i-1} + phi(k_i) v_i / eta_i``, ``y_i = phi(q_i) h_i``."""
    return dsf_recurrent(normalized_linear_attention_dsf(q, k, phi), v)
