"""A traced ``score_mod`` inside the Pallas kernels (``jattn.core.score_mod`` defines the contract).

A score mod arrives as a jaxpr on scalars, ``(score, b, h, q_idx, kv_idx) -> score``, whose constvars are
the arrays it closes over. Outside a kernel it is simply evaluated. Inside one, those arrays are kernel
inputs (refs), and neither Triton nor Mosaic lowers a dynamic slice of a loaded array value, so
``slopes[h]`` must become a *ref* load. ``eval_in_kernel`` interprets the jaxpr with each constvar bound
to its ref: a ``dynamic_slice`` of a constvar (what ``table[h]`` or ``table[h, i]`` traces to) becomes
``ref[h]`` / ``ref[h, i]``, clamped as ``dynamic_slice`` clamps; any other use loads the whole array.

Where each array lives (``const_placement``): on TPU an array read only by scalar slices goes to SMEM
(Mosaic loads dynamically indexed scalars from SMEM only), any other to VMEM; on GPU every array is one
whole block, padded to power-of-two dims (Triton's block rule), so only its real extent is ever read.

A lookup whose index varies across the tile (``table[h, q_idx - kv_idx]``) is a gather: the xla path runs
it; whether a kernel lowers it is for the target's compiler (the lowering test reports it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.extend import core as jex_core

__all__ = ["vmap_elementwise", "apply", "tile_varying_lookups", "scalar_only_consts", "eval_in_kernel", "apply_in_kernel", "pow2_shape",
           "clamp_positions", "const_shape", "const_specs", "pad_const", "TPU_GATHER_PROBLEM"]


def vmap_elementwise(fn, args, shape):
    """``fn`` on scalars, evaluated over the broadcast of ``args`` (all of ``len(shape)`` dims) with nested
    vmaps; an argument of size 1 along an axis is not mapped over it (so per-row or per-column terms stay
    ``[bq, 1]`` / ``[1, bk]`` until they meet the score). A 0-d argument is passed through untouched at every
    level (inside a kernel a program id stays a scalar: Mosaic cannot reshape a vector to 0-d)."""
    if not shape:
        return fn(*(a if a.ndim == 0 else a.reshape(()) for a in args))
    n = shape[0]
    in_axes = tuple(0 if (a.ndim and a.shape[0] == n and n != 1) else None for a in args)
    heads = tuple(a if (ax == 0 or a.ndim == 0) else a[0] for a, ax in zip(args, in_axes))

    def inner(*xs):
        return vmap_elementwise(fn, xs, shape[1:])
    if all(ax is None for ax in in_axes):
        return inner(*heads)[None]
    return jax.vmap(inner, in_axes=in_axes)(*heads)


def _as_ndim(x, ndim: int):
    return jnp.reshape(jnp.asarray(x, jnp.int32), (1,) * (ndim - jnp.ndim(x)) + jnp.shape(x))


def apply(jaxpr, consts, s, b, h, q_idx, kv_idx):
    """The score mod (a scalar ``jaxpr`` with one constvar per array in ``consts``) over ``s`` float32 (any
    shape), the index arrays int32 and broadcastable to it. Returns float32 of ``s``'s shape."""
    call = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(jaxpr, list(consts)))

    def scalar_mod(score, b, h, q, kv):
        return call(score, b, h, q, kv)[0]
    args = [s.astype(jnp.float32)] + [_as_ndim(x, s.ndim) for x in (b, h, q_idx, kv_idx)]
    return jnp.broadcast_to(vmap_elementwise(scalar_mod, args, s.shape), s.shape).astype(jnp.float32)


def pow2_shape(shape) -> tuple[int, ...]:
    """Each dim rounded up to a power of two (at least 1-D: a scalar array travels as ``(1,)``)."""
    return tuple(1 << max(0, int(d) - 1).bit_length() for d in (tuple(shape) or (1,)))


def _uses(jaxpr, var):
    return [eqn for eqn in jaxpr.eqns if any(v is var for v in eqn.invars)]


def tile_varying_lookups(jaxpr) -> bool:
    """Whether the mod reads an array it closes over at an index that depends on ``q_idx`` or ``kv_idx``
    (a gather across the tile, e.g. ``table[h, q_idx - kv_idx]``), which Mosaic cannot lower."""
    varying = {id(v) for v in jaxpr.invars[3:5]}
    consts = {id(v) for v in jaxpr.constvars}
    for eqn in jaxpr.eqns:
        depends = any(not isinstance(v, jex_core.Literal) and id(v) in varying for v in eqn.invars)
        if depends and eqn.invars and id(eqn.invars[0]) in consts and eqn.primitive.name in ("dynamic_slice", "gather"):
            return True
        if depends:
            varying.update(id(v) for v in eqn.outvars)
    return False


def scalar_only_consts(jaxpr) -> tuple[bool, ...]:
    """Per constvar: is it only ever read one element at a time (every use a size-1 ``dynamic_slice`` of
    it), or is it a scalar? Those can live in TPU SMEM."""
    result = []
    for var in jaxpr.constvars:
        uses = _uses(jaxpr, var)
        scalar = var.aval.shape == () or all(
            eqn.primitive.name == "dynamic_slice" and eqn.invars[0] is var
            and all(s == 1 for s in eqn.params["slice_sizes"]) for eqn in uses)
        result.append(scalar)
    return tuple(result)


class _ConstRef:
    """A constvar bound to its kernel ref: ``shape`` is the array's real shape (the ref may be padded)."""

    def __init__(self, ref, shape):
        self.ref, self.shape = ref, tuple(shape)

    def whole(self):
        if self.shape == ():
            return self.ref[0]
        return self.ref[tuple(pl.ds(0, d) for d in self.shape)]

    def slice(self, starts, sizes):
        # dynamic_slice clamps each start into [0, dim - size]
        starts = [jnp.clip(jnp.asarray(s, jnp.int32), 0, d - n) for s, d, n in zip(starts, self.shape, sizes)]
        if all(n == 1 for n in sizes):
            return jnp.reshape(self.ref[tuple(starts)], (1,) * len(sizes))
        return self.ref[tuple(pl.ds(s, n) for s, n in zip(starts, sizes))]


def eval_in_kernel(jaxpr, const_refs, const_shapes, *args):
    """Evaluates the scalar score-mod ``jaxpr`` on ``args`` with its constvars read from ``const_refs``."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for var, ref, shape in zip(jaxpr.constvars, const_refs, const_shapes):
        env[var] = _ConstRef(ref, shape)
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if eqn.primitive.name == "dynamic_slice" and isinstance(invals[0], _ConstRef):
            outs = [invals[0].slice(invals[1:], eqn.params["slice_sizes"])]
        else:
            invals = [x.whole() if isinstance(x, _ConstRef) else x for x in invals]
            outs = eqn.primitive.bind(*invals, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        for var, value in zip(eqn.outvars, outs):
            env[var] = value
    return read(jaxpr.outvars[0])


def apply_in_kernel(jaxpr, const_refs, const_shapes, s, b, h, q_idx, kv_idx, *, with_derivative: bool = False):
    """The score mod over a kernel tile ``s [bq, bk]`` (``b``, ``h`` scalars, ``q_idx [bq, 1]``,
    ``kv_idx [1, bk]``). With ``with_derivative`` also returns ``d mod / d s`` per element (forward mode: the
    mod is elementwise, so the diagonal Jacobian is one JVP with a tangent of ones)."""
    def scalar_mod(score, b, h, q, kv):
        return eval_in_kernel(jaxpr, const_refs, const_shapes, score, b, h, q, kv).astype(jnp.float32)

    index = [jnp.asarray(b, jnp.int32), jnp.asarray(h, jnp.int32), q_idx, kv_idx]  # b, h stay scalars

    def over_tile(score):
        out = vmap_elementwise(scalar_mod, [score] + index, score.shape)
        return jnp.broadcast_to(out, score.shape)
    if not with_derivative:
        return over_tile(s)
    return jax.jvp(over_tile, (s,), (jnp.ones_like(s),))


def clamp_positions(start, size: int, length: int, axis: int, shape):
    """Positions ``start + iota`` along ``axis`` of a ``shape`` tile, clamped to ``length - 1`` (padded rows and
    keys read the last real position: they are masked anyway, and a table is never read out of range)."""
    return jnp.minimum(start + lax.broadcasted_iota(jnp.int32, shape, axis), length - 1)


# ------------------------------------------------------------------------------ the arrays as kernel inputs

TPU_GATHER_PROBLEM = (
    "score_mod reads an array it closes over at an index that varies with q_idx or kv_idx (a gather, e.g. "
    "table[h, q_idx - kv_idx]), which Mosaic cannot lower inside the TPU kernel: use impl='xla' on TPU, or compute "
    "the term from the indices arithmetically")


def const_shape(target: str, shape) -> tuple[int, ...]:
    """How a score mod's array travels into a kernel: power-of-two dims on GPU (Triton blocks), at least 1-D."""
    return pow2_shape(shape) if target == "triton" else (tuple(shape) or (1,))


def const_specs(target: str, shapes, scalar) -> list:
    """Whole-array ``in_specs`` of the score mod's arrays (any grid): SMEM on TPU for arrays read one element
    at a time, else one block holding the whole (padded) array."""
    from pallas_kernels import common
    specs = []
    for shape, is_scalar in zip(shapes, scalar):
        if target == "mosaic" and is_scalar:
            specs.append(common.smem_spec())
        else:
            block = const_shape(target, shape)
            specs.append(pl.BlockSpec(block, lambda *grid, n=len(block): (0,) * n))
    return specs


def pad_const(target: str, c):
    """A score mod's array as the kernels take it (``const_shape``): zero-padded, never read past its shape."""
    shape = const_shape(target, c.shape)
    c = jnp.reshape(c, c.shape or (1,))
    return jnp.pad(c, [(0, n - m) for n, m in zip(shape, c.shape)])
