"""``neighborhood_attention(impl="xla")``: the pure-JAX fast path of neighborhood attention.

Dilation groups are split off (strided slices, batched by shape: ``over_dilation_groups``, which the
Pallas path shares). On each undilated grid the queries are cut into multi-dimensional tiles and every
tile attends to the smallest box of keys that holds all its windows (``TilePlan``), so a query costs
``∏(tile + w − 1)`` keys instead of ``∏L``. A custom VJP recomputes each tile's probabilities.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core.neighborhood import NAGeometry, axis_window_bounds
from jattn.core.softmax import MASK_VALUE

DEFAULT_XLA_TILES = {1: (128,), 2: (8, 8), 3: (4, 4, 4)}


# ---------------------------------------------------------------------------------- dilation groups

def _group_slices(offsets, dilation):
    return (slice(None),) + tuple(slice(g, None, d) for g, d in zip(offsets, dilation))


def over_dilation_groups(geometry: NAGeometry, core, q, k, v):
    """Runs ``core(undilated_geometry, q, k, v)`` on every dilation group; groups of one shape share a call."""
    if all(d == 1 for d in geometry.dilation):
        return core(geometry, q, k, v)
    B = q.shape[0]
    out = jnp.zeros(q.shape[:-1] + v.shape[-1:], jnp.float32)
    for sub_shape, offsets in geometry.dilation_classes():
        slices = [_group_slices(o, geometry.dilation) for o in offsets]

        def stacked(x):  # [len(offsets) * B, *sub_shape, H, D]
            return jnp.concatenate([x[s] for s in slices], axis=0)

        part = core(geometry.undilated(sub_shape), stacked(q), stacked(k), stacked(v))
        for n, s in enumerate(slices):
            out = out.at[s].set(part[n * B:(n + 1) * B].astype(jnp.float32))
    return out


# ---------------------------------------------------------------------------------- xla: query tiles + key boxes

@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Query tiles and the key box of each, per axis, on an undilated grid (static, hashable).

    Tiles start at multiples of the tile size; the last one is moved back to end at the border (it
    overlaps its neighbour rather than being padded). ``box`` is the widest key interval any tile needs;
    every tile's box is that long, placed to cover the tile's windows and clamped inside the axis.
    """
    geometry: NAGeometry
    tile: tuple[int, ...]
    box: tuple[int, ...]
    q_starts: tuple[tuple[int, ...], ...]
    kv_starts: tuple[tuple[int, ...], ...]
    scale: float

    @classmethod
    def create(cls, geometry: NAGeometry, tile, scale: float) -> "TilePlan":
        tiles, boxes, q_starts, kv_starts = [], [], [], []
        for a, L in enumerate(geometry.shape):
            t = min(tile[a], L)
            starts = [min(n * t, L - t) for n in range(-(-L // t))]
            lo, hi = axis_window_bounds(np.arange(L), L, geometry.kernel[a], geometry.stride[a], geometry.causal[a])
            box_lo = [int(lo[s:s + t].min()) for s in starts]
            box = max(int(hi[s:s + t].max()) - bl + 1 for s, bl in zip(starts, box_lo))
            tiles.append(t)
            boxes.append(box)
            q_starts.append(tuple(starts))
            kv_starts.append(tuple(min(bl, L - box) for bl in box_lo))
        return cls(geometry, tuple(tiles), tuple(boxes), tuple(q_starts), tuple(kv_starts), float(scale))

    @property
    def tile_counts(self) -> tuple[int, ...]:
        return tuple(len(s) for s in self.q_starts)

    @property
    def num_tiles(self) -> int:
        return math.prod(self.tile_counts)

    def start_tables(self):
        """``(q_starts, kv_starts)`` int32 ``[num_tiles, ndim]``, tiles in row-major order."""
        def table(starts):
            return jnp.asarray(np.array(list(itertools.product(*starts)), np.int32).reshape(-1, len(self.tile)))
        return table(self.q_starts), table(self.kv_starts)


def _tile_visibility(plan: TilePlan, q_start, kv_start):
    """``[tile_tokens, box_tokens]`` bool: the NA rule between one tile's queries and its key box."""
    g = plan.geometry
    visible = jnp.ones((1, 1), bool)
    for a in range(g.ndim):
        qi = q_start[a] + jnp.arange(plan.tile[a])
        kj = kv_start[a] + jnp.arange(plan.box[a])
        lo, hi = axis_window_bounds(qi, g.shape[a], g.kernel[a], g.stride[a], g.causal[a], xp=jnp)
        axis = (lo[:, None] <= kj[None, :]) & (kj[None, :] <= hi[:, None])
        visible = (visible[:, None, :, None] & axis[None, :, None, :]).reshape(
            visible.shape[0] * axis.shape[0], -1)
    return visible


def _slice_tile(x, start, size):
    """``x [B, *grid, H, D]`` -> the sub-box at ``start`` of ``size``, flattened to ``[B, n, H, D]``."""
    zero = jnp.zeros((), jnp.int32)
    box = jax.lax.dynamic_slice(x, (zero, *start, zero, zero), (x.shape[0], *size, *x.shape[-2:]))
    return box.reshape(x.shape[0], -1, *x.shape[-2:])


def _add_tile(acc, part, start, size):
    """``acc[box at start] += part`` (``part [B, n, H, D]`` reshaped to the box)."""
    zero = jnp.zeros((), jnp.int32)
    index = (zero, *start, zero, zero)
    shape = (acc.shape[0], *size, *acc.shape[-2:])
    current = jax.lax.dynamic_slice(acc, index, shape)
    return jax.lax.dynamic_update_slice(acc, current + part.reshape(shape), index)


def _grouped(x, Hkv: int):
    """``[B, n, H, D]`` -> ``[B, n, Hkv, G, D]`` (query heads grouped by their kv head)."""
    return x.reshape(x.shape[0], x.shape[1], Hkv, -1, x.shape[-1])


def _tile_logits(plan: TilePlan, q_tile, k_box, visible):
    """Masked logits ``[B, Hkv, G, n_q, n_k]``; ``q_tile`` is already grouped and scaled."""
    s = jnp.einsum("bqkgd,bnkd->bkgqn", q_tile, k_box)
    return jnp.where(visible, s, MASK_VALUE)


def _tile_forward(plan: TilePlan, qs, k, v, q_start, kv_start):
    """One tile: ``(out [B, tile_tokens, H, E], lse [B, Hkv, G, tile_tokens])``; ``qs`` is pre-scaled."""
    Hkv = k.shape[-2]
    q_tile = _grouped(_slice_tile(qs, q_start, plan.tile), Hkv)
    k_box, v_box = _slice_tile(k, kv_start, plan.box), _slice_tile(v, kv_start, plan.box)
    s = _tile_logits(plan, q_tile, k_box, _tile_visibility(plan, q_start, kv_start))
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)  # >= 1: every query's window lies inside its tile's box
    out = jnp.einsum("bkgqn,bnke->bqkge", p / l, v_box)
    return out.reshape(out.shape[0], out.shape[1], -1, out.shape[-1]), (m + jnp.log(l))[..., 0]


def _tiled_forward(plan: TilePlan, q, k, v):
    q_starts, kv_starts = plan.start_tables()
    qs, k, v = q.astype(jnp.float32) * plan.scale, k.astype(jnp.float32), v.astype(jnp.float32)
    step = functools.partial(_tile_forward, plan, qs, k, v)
    _, (out_tiles, lse_tiles) = jax.lax.scan(lambda _, starts: (None, step(*starts)), None, (q_starts, kv_starts))
    return out_tiles, lse_tiles


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled_core(plan: TilePlan, q, k, v):
    """``(out tiles [N, B, tile_tokens, H, E] f32, lse tiles [N, B, Hkv, G, tile_tokens])``."""
    return _tiled_forward(plan, q, k, v)


def _tiled_core_fwd(plan, q, k, v):
    out_tiles, lse_tiles = _tiled_forward(plan, q, k, v)
    return (out_tiles, lse_tiles), (q, k, v, out_tiles, lse_tiles)


def _tiled_core_bwd(plan, residuals, cotangents):
    q, k, v, out_tiles, lse_tiles = residuals
    d_out_tiles, d_lse_tiles = cotangents
    Hkv = k.shape[-2]
    q_starts, kv_starts = plan.start_tables()
    qs, kf, vf = q.astype(jnp.float32) * plan.scale, k.astype(jnp.float32), v.astype(jnp.float32)
    # ds = p * (dp - delta), delta = rowsum(dO * O) - dlse. A query covered by two overlapping tiles gets
    # its cotangent in only one of them (the grid gather's transpose), so it is never counted twice.
    delta_tiles = jnp.einsum("nbqhe,nbqhe->nbqh", d_out_tiles.astype(jnp.float32), out_tiles)
    delta_tiles = jnp.moveaxis(delta_tiles.reshape(*delta_tiles.shape[:3], Hkv, -1), 2, -1) - d_lse_tiles

    def tile_grads(q_start, kv_start, d_out, lse, delta):
        q_tile = _grouped(_slice_tile(qs, q_start, plan.tile), Hkv)
        k_box, v_box = _slice_tile(kf, kv_start, plan.box), _slice_tile(vf, kv_start, plan.box)
        s = _tile_logits(plan, q_tile, k_box, _tile_visibility(plan, q_start, kv_start))
        p = jnp.exp(s - lse[..., None])
        d_out = _grouped(d_out.astype(jnp.float32), Hkv)
        dv_box = jnp.einsum("bkgqn,bqkge->bnke", p, d_out)
        ds = p * (jnp.einsum("bqkge,bnke->bkgqn", d_out, v_box) - delta[..., None])
        dq_tile = jnp.einsum("bkgqn,bnkd->bqkgd", ds, k_box) * plan.scale
        dk_box = jnp.einsum("bkgqn,bqkgd->bnkd", ds, q_tile)  # q_tile is pre-scaled
        return dq_tile, dk_box, dv_box

    def step(grads, xs):
        dq, dk, dv = grads
        q_start, kv_start = xs[:2]
        dq_tile, dk_box, dv_box = tile_grads(*xs)
        dq = _add_tile(dq, dq_tile, q_start, plan.tile)
        dk = _add_tile(dk, dk_box, kv_start, plan.box)
        dv = _add_tile(dv, dv_box, kv_start, plan.box)
        return (dq, dk, dv), None

    init = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
    xs = (q_starts, kv_starts, d_out_tiles, lse_tiles, delta_tiles)
    (dq, dk, dv), _ = jax.lax.scan(step, init, xs)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_tiled_core.defvjp(_tiled_core_fwd, _tiled_core_bwd)


def _tiles_to_grid(plan: TilePlan, out_tiles):
    """``[N, B, tile_tokens, H, E]`` -> ``[B, *grid, H, E]``: each token read from the one tile that owns it."""
    counts, ndim = plan.tile_counts, plan.geometry.ndim
    B, H, E = out_tiles.shape[1], out_tiles.shape[3], out_tiles.shape[4]
    tiles = out_tiles.reshape(*counts, B, *plan.tile, H, E)
    tile_index, offset = [], []
    for a, L in enumerate(plan.geometry.shape):
        i = np.arange(L)
        owner = np.minimum(i // plan.tile[a], counts[a] - 1)
        shape = [1] * ndim
        shape[a] = L
        tile_index.append(owner.reshape(shape))
        offset.append((i - np.array(plan.q_starts[a])[owner]).reshape(shape))
    grid = tiles[(*tile_index, slice(None), *offset)]  # [*grid, B, H, E]
    return jnp.moveaxis(grid, ndim, 0)


def tiled_attention(geometry: NAGeometry, q, k, v, *, tile, scale: float):
    """Undilated NA on the xla path: ``[B, *grid, H, E]`` float32 (``over_dilation_groups``' ``core``)."""
    plan = TilePlan.create(geometry, tile, scale)
    out_tiles, _ = _tiled_core(plan, q, k, v)
    return _tiles_to_grid(plan, out_tiles)
