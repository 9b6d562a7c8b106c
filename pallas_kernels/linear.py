"""The linear-attention kernel: Lightning Attention-2's chunked decayed-linear algorithm (P74; P58's).

``impl="pallas"`` of ``jattn.linear_attention``. Kernel layout (the policy — padding, head folding,
scale — lives in ``jattn.ops.linear``):
``q, k [BH, T, D]``, ``v [BH, T, E]``, per-token log-decays ``a [BH, T]`` (float32, ``<= 0``),
initial state ``s0 [BH, D, E]`` (float32); T a multiple of the chunk, D and the value tile powers of two.

Forward, one program per (batch*head, value tile), looping over chunks with the state ``S [D, E_tile]``
carried in float32 (Lightning-2's intra/inter split, decays relative to the chunk start ``b``):

    O_t = scale * ( ((Q_t K_t^T) * M) V_t + (Q_t * exp(b)) S )        M[i, j] = exp(b_i - b_j), j <= i
    S   = exp(b_last) S + (K_t * exp(b_last - b))^T V_t

Backward (P74 Alg. 2, the intra part folded into the two sweeps):
* the dq sweep (forward over chunks, recomputing S): ``dQ_t = ((dO_t V_t^T) * M) K_t + (dO_t S^T) * exp(b)``;
* the reverse sweep with ``dS`` (from the final-state cotangent):
  ``dK_t = ((dO_t V_t^T) * M)^T Q_t + (V_t dS^T) * exp(b_last - b)``,
  ``dV_t = ((Q_t K_t^T) * M)^T dO_t + (K_t dS) * exp(b_last - b)``,
  ``dS = exp(b_last) dS + (Q_t * exp(b))^T dO_t``; what is left of dS is the initial state's gradient.
The log-decay gradient needs no kernel: with ``c`` the cumulative log-decay, the function depends on
``c`` only through ``q e^c`` and ``k e^-c`` (and ``S_T = e^{c_T}(...)``), so
``dc_i = q_i.dq_i - k_i.dk_i (+ <dS_T, S_T> at the end)`` and ``da`` is its reverse cumulative sum.

All exponents are ``<= 0`` when every log-decay is ``<= 0``. Dots use ``lax.dot_general`` (``pl.dot`` is
gone in current JAX); every block is loaded through ``pl.ds`` slices of power-of-two length.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from pallas_kernels import common


class ChunkDecay(NamedTuple):
    intra: jax.Array  # [C, C]  exp(b_i - b_j) for j <= i, else 0
    q: jax.Array      # [C, 1]  exp(b_i): decay from the chunk start to row i
    k: jax.Array      # [C, 1]  exp(b_last - b_j): decay from row j to the chunk end
    chunk: jax.Array  # []      exp(b_last): decay across the whole chunk


def _chunk_decay(b, chunk: int) -> ChunkDecay:
    """Decay factors of one chunk from its chunk-local cumulative log-decays ``b [C]``."""
    index = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    b_last = jnp.sum(jnp.where(index == chunk - 1, b, 0.0))  # a reduction: portable scalar extraction
    row = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    inside = row >= col
    diff = jnp.where(inside, b[:, None] - b[None, :], 0.0)  # masked before exp: no overflow above
    return ChunkDecay(jnp.where(inside, jnp.exp(diff), 0.0), jnp.exp(b)[:, None],
                      jnp.exp(b_last - b)[:, None], jnp.exp(b_last))


def _causal(scores, decay: ChunkDecay):
    """``scores * M`` with the upper triangle set to 0 by ``where`` (a product with 0 would let a NaN
    key reach the earlier rows of its chunk)."""
    row = jax.lax.broadcasted_iota(jnp.int32, scores.shape, 0)
    col = jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
    return jnp.where(row >= col, scores * decay.intra, 0.0)


def _load(ref, rows, *lead):
    return ref[lead + (rows, slice(None))].astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------
# Kernels


def _forward_kernel(q_ref, k_ref, v_ref, b_ref, s0_ref, o_ref, state_ref, *, chunk, num_chunks, scale):
    def body(n, state):
        rows = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        q, k, v = _load(q_ref, rows, 0), _load(k_ref, rows, 0), _load(v_ref, rows, 0)
        decay = _chunk_decay(b_ref[0, 0, rows], chunk)
        out = common.dot_nn(_causal(common.dot_nt(q, k), decay), v) + common.dot_nn(q * decay.q, state)
        o_ref[0, rows, :] = (scale * out).astype(o_ref.dtype)
        return decay.chunk * state + common.dot_tn(k * decay.k, v)

    state_ref[0] = jax.lax.fori_loop(0, num_chunks, body, s0_ref[0].astype(jnp.float32))


def _dq_kernel(k_ref, v_ref, b_ref, s0_ref, do_ref, dq_ref, *, chunk, num_chunks, scale):
    def body(n, state):
        rows = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        k, v = _load(k_ref, rows, 0), _load(v_ref, rows, 0)
        do = scale * _load(do_ref, rows, 0)
        decay = _chunk_decay(b_ref[0, 0, rows], chunk)
        dq = common.dot_nn(_causal(common.dot_nt(do, v), decay), k) + common.dot_nt(do, state) * decay.q
        dq_ref[0, 0, rows, :] = dq
        return decay.chunk * state + common.dot_tn(k * decay.k, v)

    jax.lax.fori_loop(0, num_chunks, body, s0_ref[0].astype(jnp.float32))


def _dkv_kernel(q_ref, k_ref, v_ref, b_ref, do_ref, dstate_ref, dk_ref, dv_ref, ds0_ref, *, chunk,
                num_chunks, scale):
    def body(i, dstate):
        n = num_chunks - 1 - i
        rows = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        q, k, v = _load(q_ref, rows, 0), _load(k_ref, rows, 0), _load(v_ref, rows, 0)
        do = scale * _load(do_ref, rows, 0)
        decay = _chunk_decay(b_ref[0, 0, rows], chunk)
        scores = _causal(common.dot_nt(q, k), decay)
        dscores = _causal(common.dot_nt(do, v), decay)
        dk_ref[0, 0, rows, :] = common.dot_tn(dscores, q) + common.dot_nt(v, dstate) * decay.k
        dv_ref[0, rows, :] = common.dot_tn(scores, do) + common.dot_nn(k, dstate) * decay.k
        return decay.chunk * dstate + common.dot_tn(q * decay.q, do)

    ds0_ref[0] = jax.lax.fori_loop(0, num_chunks, body, dstate_ref[0].astype(jnp.float32))


# ----------------------------------------------------------------------------------------------------
# pallas_call plumbing


def _call(kernel, inputs, in_specs, out_shapes, out_specs, grid, target, interpret, poison, name):
    """``pallas_call`` for one target; with ``poison`` every output starts as NaN (aliased)."""
    body = kernel
    if poison:
        n_inputs = len(inputs)

        def kernel(*refs):  # drops the aliased NaN refs the kernel never reads
            body(*refs[:n_inputs], *refs[n_inputs + len(out_shapes):])

    return common.pallas_call(kernel, out_shape=out_shapes, target=target, interpret=interpret, name=name, grid=grid,
                              in_specs=in_specs, out_specs=out_specs, poison_outputs=poison,
                              dimension_semantics=("parallel", "parallel"))(*inputs)


def _specs(T, D, block_e):
    """BlockSpecs over grid (batch*head i, value tile j)."""
    return dict(
        qk=pl.BlockSpec((1, T, D), lambda i, j: (i, 0, 0)),
        v=pl.BlockSpec((1, T, block_e), lambda i, j: (i, 0, j)),
        b=pl.BlockSpec((1, 1, T), lambda i, j: (i, 0, 0)),
        state=pl.BlockSpec((1, D, block_e), lambda i, j: (i, 0, j)),
        per_tile_qk=pl.BlockSpec((1, 1, T, D), lambda i, j: (i, j, 0, 0)),
    )


def _chunk_local(a, chunk):
    """``a [BH, T]`` -> chunk-local cumulative log-decays ``[BH, 1, T]``."""
    BH, T = a.shape
    return jnp.cumsum(a.reshape(BH, T // chunk, chunk), axis=-1).reshape(BH, 1, T)


def _forward(q, k, v, a, s0, *, scale, chunk, block_e, target, interpret, poison):
    BH, T, D = q.shape
    E = v.shape[2]
    s = _specs(T, D, block_e)
    grid = (BH, E // block_e)
    kernel = functools.partial(_forward_kernel, chunk=chunk, num_chunks=T // chunk, scale=scale)
    out_shapes = (jax.ShapeDtypeStruct((BH, T, E), q.dtype), jax.ShapeDtypeStruct((BH, D, E), jnp.float32))
    return _call(kernel, (q, k, v, _chunk_local(a, chunk), s0), (s["qk"], s["qk"], s["v"], s["b"], s["state"]),
                 out_shapes, (s["v"], s["state"]), grid, target, interpret, poison, "jattn_lightning_forward")


def _backward(q, k, v, a, s0, do, dstate, *, scale, chunk, block_e, target, interpret, poison):
    BH, T, D = q.shape
    E = v.shape[2]
    tiles = E // block_e
    s = _specs(T, D, block_e)
    b = _chunk_local(a, chunk)
    static = dict(chunk=chunk, num_chunks=T // chunk, scale=scale)
    partial_qk = jax.ShapeDtypeStruct((BH, tiles, T, D), jnp.float32)  # one partial per value tile, summed below
    (dq,) = _call(functools.partial(_dq_kernel, **static), (k, v, b, s0, do),
                  (s["qk"], s["v"], s["b"], s["state"], s["v"]), (partial_qk,), (s["per_tile_qk"],),
                  (BH, tiles), target, interpret, poison, "jattn_lightning_dq")
    dk, dv, ds0 = _call(functools.partial(_dkv_kernel, **static), (q, k, v, b, do, dstate),
                        (s["qk"], s["qk"], s["v"], s["b"], s["v"], s["state"]),
                        (partial_qk, jax.ShapeDtypeStruct((BH, T, E), jnp.float32), jax.ShapeDtypeStruct((BH, D, E), jnp.float32)),
                        (s["per_tile_qk"], s["v"], s["state"]), (BH, tiles), target, interpret, poison,
                        "jattn_lightning_dkv")
    return dq.sum(axis=1), dk.sum(axis=1), dv, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _lightning(q, k, v, a, s0, cfg):
    return _forward(q, k, v, a, s0, **dataclasses.asdict(cfg))


@dataclasses.dataclass(frozen=True)
class LinearConfig:
    scale: float
    chunk: int
    block_e: int
    target: str
    interpret: bool
    poison: bool


def _lightning_fwd(q, k, v, a, s0, cfg):
    out, final = _lightning(q, k, v, a, s0, cfg)
    return (out, final), (q, k, v, a, s0, final)


def _lightning_bwd(cfg, residuals, cotangents):
    q, k, v, a, s0, final = residuals
    do, dfinal = cotangents
    dq, dk, dv, ds0 = _backward(q, k, v, a, s0, do, dfinal.astype(jnp.float32), **dataclasses.asdict(cfg))
    dc = (jnp.sum(q.astype(jnp.float32) * dq, axis=-1) - jnp.sum(k.astype(jnp.float32) * dk, axis=-1))
    dc = dc.at[:, -1].add(jnp.sum(dfinal.astype(jnp.float32) * final, axis=(-2, -1)))
    da = jnp.flip(jnp.cumsum(jnp.flip(dc, axis=-1), axis=-1), axis=-1)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), da.astype(a.dtype),
            ds0.astype(s0.dtype))


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def lightning_attention(q: Float[Array, "BH T D"], k: Float[Array, "BH T D"], v: Float[Array, "BH T E"],
                        a: Float[Array, "BH T"], s0: Float[Array, "BH D E"], *, scale: float = 1.0,
                        chunk_size: int = 64, block_e: int | None = None, interpret=None,
                        poison_outputs: bool = False) -> tuple[Float[Array, "BH T E"], Float[Array, "BH D E"]]:
    """Causal decayed linear attention in kernel layout; differentiable in every array argument.

    Args:
      q: queries ``[BH, T, D]`` (batch and heads folded), D a power of two >= 16.
      k: keys ``[BH, T, D]``, q's dtype.
      v: values ``[BH, T, E]``, q's dtype.
      a: per-token log-decays ``[BH, T]`` (float32, ``<= 0``).
      s0: the initial state ``[BH, D, E]`` (float32).
      scale: multiplies the output.
      chunk_size: the chunk, a power of two >= 16 dividing T.
      block_e: the value tile, a power of two >= 16 dividing E (default ``min(E, 64)``).
      interpret: None dispatches when the program is lowered (Triton on GPU, Mosaic on TPU, the interpreter
        on CPU; see ``pallas_kernels.common.dispatch``); True, "triton" or "mosaic" force one structure in
        the interpreter.
      poison_outputs: NaN-fill every output before the kernels run (tests).

    Returns:
      ``(out [BH, T, E] in q's dtype, final state [BH, D, E] float32)``.

    Raises:
      ValueError: a shape does not match, or a size is not a legal power of two.
      TypeError: q, k, v do not share one dtype.
    """
    for name, x, ndim in (("q", q, 3), ("k", k, 3), ("v", v, 3), ("a", a, 2), ("s0", s0, 3)):
        if getattr(x, "ndim", None) != ndim:
            raise ValueError(f"{name} must be a rank-{ndim} array, got {getattr(x, 'shape', x)!r}")
    BH, T, D = q.shape
    E = v.shape[2]
    if k.shape != q.shape or v.shape[:2] != (BH, T) or a.shape != (BH, T) or s0.shape != (BH, D, E):
        raise ValueError(f"expected q, k [BH, T, D], v [BH, T, E], a [BH, T], s0 [BH, D, E]; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}, a {a.shape}, s0 {s0.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    block_e = min(E, 64) if block_e is None else block_e
    common.check_hardware_block("chunk_size", chunk_size)
    common.check_hardware_block("D (head dim)", D)
    common.check_hardware_block("block_e", block_e)
    if T % chunk_size or E % block_e:
        raise ValueError(f"T={T} must be a multiple of chunk_size={chunk_size} and E={E} of block_e={block_e}")

    def build(target, interpret):
        cfg = LinearConfig(float(scale), int(chunk_size), int(block_e), target, interpret, bool(poison_outputs))
        return lambda q, k, v, a, s0: _lightning(q, k, v, a, s0, cfg)

    return common.dispatch(build, q, k, v, a.astype(jnp.float32), s0.astype(jnp.float32), interpret=interpret)
