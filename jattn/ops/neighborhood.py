"""``neighborhood_attention``: NATTEN's neighborhood attention (P60 FNA, P48 GNA) in 1-D, 2-D and 3-D.

Tokens lie on a grid, layout ``[B, *spatial, H, D]``. On a spatial axis of length ``L`` with kernel
``w``, stride ``s``, dilation ``δ`` and a causal flag, query ``i`` may see key ``j`` iff

* both are in the same dilation group, ``i mod δ == j mod δ``, and on the in-group coordinates
  ``i' = i // δ``, ``j' = j // δ`` (group length ``L_g = ceil((L - i mod δ) / δ)``):
* non-causal: leader ``ℓ = min(⌊i'/s⌋·s + ⌊s/2⌋, L_g − 1)``, centre ``c = clamp(ℓ, ⌊w/2⌋, L_g − 1 − r)``
  with ``r = ⌊w/2⌋ + (w mod 2) − 1``; visible iff ``c − ⌊w/2⌋ ≤ j' ≤ c + r``. Windows shift at the
  borders, so every query sees exactly ``w`` keys; all queries of a stride group share the leader's window.
* causal: ``ℓ = min(⌊i'/s⌋·s + s − 1, L_g − 1)``; visible iff ``j' ≤ i'`` and ``ℓ − j' < w``.

In several dimensions a key is visible iff it is visible on every axis. Special cases: ``s = 1`` is
sliding-window NA, ``s = w`` (``L`` divisible) is blocked (Swin-style window) attention, ``w = L`` is
full attention. Either rule makes an axis's visible set an interval ``[lo(i'), hi(i')]``; the
implementation works with those intervals (``axis_window_bounds``).

Impls:

* ``"reference"``: the dense mask (``neighborhood_mask``) and ``reference_attention``.
* ``"xla"``: the CPU fast path. Dilation groups are split off (strided slices, batched by shape). On
  each undilated grid the queries are cut into multi-dimensional tiles and every tile attends to the
  smallest box of keys that holds all its windows, so a query costs ``∏(tile + w − 1)`` keys instead
  of ``∏L``. A custom VJP recomputes each tile's probabilities.
* ``"pallas"``: GNA's token permutation. Tokens are permuted tile-major, so every multi-dimensional tile
  is one contiguous block; the (q tile, kv tile) pairs with a visible entry become a ``BlockMask`` and
  the shared block-sparse kernel visits only those, evaluating the NA rule only on partial tiles.
* ``"auto"``: xla on CPU, pallas elsewhere.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.core.reference import reference_attention
from jattn.core.softmax import MASK_VALUE
from jattn.ops.dispatch import auto_is_pallas, run_impl
from jattn.core.masks import index_div, index_mod

F32 = jnp.float32
DEFAULT_XLA_TILES = {1: (128,), 2: (8, 8), 3: (4, 4, 4)}
DEFAULT_PALLAS_TILES = {1: (128,), 2: (8, 16), 3: (4, 4, 8)}


# ---------------------------------------------------------------------------------- the rule

def axis_window_bounds(index, length: int, kernel: int, stride: int, causal: bool, xp=np):
    """``(lo, hi)``: the visible in-group key interval of in-group query coordinate(s) ``index``.

    Pure integer arithmetic on ``xp`` (numpy for static tables, ``jax.numpy`` inside kernels).
    """
    first_of_stride = index_div(index, stride) * stride
    if causal:
        leader = xp.minimum(first_of_stride + stride - 1, length - 1)
        return xp.maximum(leader - kernel + 1, 0), index
    left = kernel // 2
    right = kernel // 2 + kernel % 2 - 1
    leader = xp.minimum(first_of_stride + stride // 2, length - 1)
    centre = xp.clip(leader, left, length - 1 - right)
    return centre - left, centre + right


def neighborhood_mask(shape: Sequence[int], kernel_size, *, stride=1, dilation=1, is_causal=False) -> np.ndarray:
    """The dense ``[T, T]`` bool mask over row-major flattened grid tokens (``T = ∏ shape``)."""
    geometry = NAGeometry.create(tuple(shape), kernel_size, stride, dilation, is_causal)
    per_axis = [geometry.axis_mask(a) for a in range(geometry.ndim)]
    mask = np.ones((1, 1), bool)
    for m in per_axis:  # Kronecker AND: flattened index = row-major over the axes
        mask = (mask[:, None, :, None] & m[None, :, None, :]).reshape(mask.shape[0] * m.shape[0], -1)
    return mask


# ---------------------------------------------------------------------------------- arguments

def per_axis(name: str, value, ndim: int, *, kind=int):
    """An int (or bool) or a tuple of ``ndim`` of them -> a tuple of ``ndim``."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim
    if len(values) != ndim:
        raise ValueError(f"{name} must be one {kind.__name__} or a tuple of {ndim} (one per spatial axis), "
                         f"got {value!r}")
    for x in values:
        ok = isinstance(x, (bool, np.bool_)) if kind is bool else (
            isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)))
        if not ok:
            raise TypeError(f"{name} must hold {kind.__name__}s, got {value!r}")
    return tuple(kind(x) for x in values)


@dataclasses.dataclass(frozen=True)
class NAGeometry:
    """Static description of one neighborhood-attention pattern (hashable)."""
    shape: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]

    @classmethod
    def create(cls, shape, kernel_size, stride=1, dilation=1, is_causal=False) -> "NAGeometry":
        ndim = len(shape)
        if ndim not in (1, 2, 3):
            raise ValueError(f"neighborhood attention works on 1, 2 or 3 spatial axes, got spatial shape {shape}")
        kernel = per_axis("kernel_size", kernel_size, ndim)
        stride = per_axis("stride", stride, ndim)
        dilation = per_axis("dilation", dilation, ndim)
        causal = per_axis("is_causal", is_causal, ndim, kind=bool)
        for a, (L, w, s, d) in enumerate(zip(shape, kernel, stride, dilation)):
            if d < 1:
                raise ValueError(f"dilation must be >= 1 on every axis, got {dilation}")
            if w < 1 or w * d > L:
                raise ValueError(f"kernel_size must satisfy 1 <= kernel_size * dilation <= input size on every "
                                 f"axis; axis {a} has size {L}, kernel_size {w}, dilation {d}")
            if not 1 <= s <= w:
                raise ValueError(f"stride must satisfy 1 <= stride <= kernel_size on every axis; axis {a} has "
                                 f"stride {s}, kernel_size {w}")
        return cls(tuple(int(x) for x in shape), kernel, stride, dilation, causal)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def axis_mask(self, axis: int) -> np.ndarray:
        """``[L, L]`` bool: visibility on one axis, dilation included."""
        L, w, s, d, c = (self.shape[axis], self.kernel[axis], self.stride[axis], self.dilation[axis],
                         self.causal[axis])
        i = np.arange(L)
        group = i % d
        group_len = -(-(L - group) // d)
        lo, hi = axis_window_bounds(i // d, group_len, w, s, c)
        j = (i // d)[None, :]
        return (group[:, None] == group[None, :]) & (lo[:, None] <= j) & (j <= hi[:, None])

    def dilation_classes(self):
        """``[(sub_shape, [offsets...])]``: dilation groups batched by their (undilated) sub-grid shape."""
        per_axis = []
        for L, d in zip(self.shape, self.dilation):
            by_length: dict[int, list[int]] = {}
            for g in range(d):
                by_length.setdefault(-(-(L - g) // d), []).append(g)
            per_axis.append(list(by_length.items()))
        return [(tuple(n for n, _ in combo), list(itertools.product(*(gs for _, gs in combo))))
                for combo in itertools.product(*per_axis)]

    def undilated(self, sub_shape) -> "NAGeometry":
        return NAGeometry(tuple(sub_shape), self.kernel, self.stride, (1,) * self.ndim, self.causal)


# ---------------------------------------------------------------------------------- public API

def neighborhood_attention(q, k, v, kernel_size, *, stride=1, dilation=1, causal=False, scale=None,
                           impl: str = "auto", tile_shape=None, is_causal=None):
    """Neighborhood attention over a 1-D, 2-D or 3-D token grid, exactly as NATTEN defines it.

    Args:
      q: ``[B, *spatial, H, D]``; k, v: ``[B, *spatial, Hkv, D]`` (H a multiple of Hkv: GQA/MQA).
      kernel_size, stride, dilation: an int or one int per spatial axis (``1 <= stride <= kernel_size``,
        ``kernel_size * dilation <= size``). causal: a bool or one per axis (``causal``, the flag's name
        in every jattn op; ``is_causal``, NATTEN's and jax.nn's name, is a deprecated alias that warns).
      scale: logit scale (default ``D ** -0.5``).
      impl: "auto" | "xla" | "pallas" | "reference".
      tile_shape: query tile per axis (xla: any ints; pallas: powers of two whose product is >= 16).

    Returns ``[B, *spatial, H, D]`` in q's dtype.
    """
    causal = checks.causal_alias(causal, is_causal, "jattn.neighborhood_attention")
    checks.check_static("neighborhood_attention", kernel_size=kernel_size, stride=stride, dilation=dilation, causal=causal, scale=scale, impl=impl, tile_shape=tile_shape)
    spatial = checks.check_grid_qkv(q, k, v)
    geometry = NAGeometry.create(spatial, kernel_size, stride, dilation, causal)
    scale = checks.check_positive_float("scale", scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    checks.check_choice("impl", impl, checks.IMPLS)
    # "auto" is decided at lowering time (xla on CPU, pallas elsewhere): its tiles must suit both paths.
    pallas_tiles = check_tile_shape(tile_shape, geometry.ndim, "pallas") if auto_is_pallas(impl) else None
    xla_tiles = pallas_tiles if tile_shape is not None and pallas_tiles is not None else \
        check_tile_shape(tile_shape, geometry.ndim, "xla")
    return _compiled(geometry, impl, (xla_tiles, pallas_tiles), float(scale), q, k, v)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _compiled(geometry: NAGeometry, impl: str, tiles, scale: float, q, k, v):
    """One compiled program per pattern (eager dispatch of the per-group slicing is slow)."""
    xla_tiles, pallas_tiles = tiles

    def xla(q, k, v):
        core = functools.partial(_tiled_attention, tile=xla_tiles, scale=scale)
        return over_dilation_groups(geometry, core, q, k, v).astype(q.dtype)

    def pallas(q, k, v):
        core = functools.partial(permuted_attention, tile=pallas_tiles, scale=scale, sparse_impl="pallas")
        return over_dilation_groups(geometry, core, q, k, v).astype(q.dtype)

    return run_impl(impl, (q, k, v), xla=xla, pallas=pallas,
                    reference=lambda q, k, v: _reference(geometry, q, k, v, scale).astype(q.dtype))


def check_tile_shape(tile_shape, ndim: int, impl: str):
    defaults = DEFAULT_PALLAS_TILES if impl == "pallas" else DEFAULT_XLA_TILES
    if tile_shape is None:
        return defaults[ndim]
    tiles = per_axis("tile_shape", tile_shape, ndim)
    if any(t < 1 for t in tiles):
        raise ValueError(f"tile_shape must hold ints >= 1, got {tile_shape!r}")
    if impl == "pallas" and (any(t & (t - 1) for t in tiles) or math.prod(tiles) < 16):
        raise ValueError(f"tile_shape for impl='pallas' must hold powers of two whose product is >= 16 (one "
                         f"kernel block), got {tile_shape!r}")
    return tiles


def _flatten_grid(x):
    return x.reshape(x.shape[0], -1, *x.shape[-2:])


def _reference(geometry: NAGeometry, q, k, v, scale: float):
    mask = jnp.asarray(neighborhood_mask(geometry.shape, geometry.kernel, stride=geometry.stride,
                                         dilation=geometry.dilation, is_causal=geometry.causal))
    out = reference_attention(_flatten_grid(q), _flatten_grid(k), _flatten_grid(v), mask=mask, scale=scale)
    return out.reshape(q.shape[:-1] + v.shape[-1:])


# ---------------------------------------------------------------------------------- dilation groups

def _group_slices(offsets, dilation):
    return (slice(None),) + tuple(slice(g, None, d) for g, d in zip(offsets, dilation))


def over_dilation_groups(geometry: NAGeometry, core, q, k, v):
    """Runs ``core(undilated_geometry, q, k, v)`` on every dilation group; groups of one shape share a call."""
    if all(d == 1 for d in geometry.dilation):
        return core(geometry, q, k, v)
    B = q.shape[0]
    out = jnp.zeros(q.shape[:-1] + v.shape[-1:], F32)
    for sub_shape, offsets in geometry.dilation_classes():
        slices = [_group_slices(o, geometry.dilation) for o in offsets]

        def stacked(x):  # [len(offsets) * B, *sub_shape, H, D]
            return jnp.concatenate([x[s] for s in slices], axis=0)

        part = core(geometry.undilated(sub_shape), stacked(q), stacked(k), stacked(v))
        for n, s in enumerate(slices):
            out = out.at[s].set(part[n * B:(n + 1) * B].astype(F32))
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
    qs, k, v = q.astype(F32) * plan.scale, k.astype(F32), v.astype(F32)
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
    qs, kf, vf = q.astype(F32) * plan.scale, k.astype(F32), v.astype(F32)
    # ds = p * (dp - delta), delta = rowsum(dO * O) - dlse. A query covered by two overlapping tiles gets
    # its cotangent in only one of them (the grid gather's transpose), so it is never counted twice.
    delta_tiles = jnp.einsum("nbqhe,nbqhe->nbqh", d_out_tiles.astype(F32), out_tiles)
    delta_tiles = jnp.moveaxis(delta_tiles.reshape(*delta_tiles.shape[:3], Hkv, -1), 2, -1) - d_lse_tiles

    def tile_grads(q_start, kv_start, d_out, lse, delta):
        q_tile = _grouped(_slice_tile(qs, q_start, plan.tile), Hkv)
        k_box, v_box = _slice_tile(kf, kv_start, plan.box), _slice_tile(vf, kv_start, plan.box)
        s = _tile_logits(plan, q_tile, k_box, _tile_visibility(plan, q_start, kv_start))
        p = jnp.exp(s - lse[..., None])
        d_out = _grouped(d_out.astype(F32), Hkv)
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

    init = (jnp.zeros(q.shape, F32), jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32))
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


def _tiled_attention(geometry: NAGeometry, q, k, v, *, tile, scale: float):
    plan = TilePlan.create(geometry, tile, scale)
    out_tiles, _ = _tiled_core(plan, q, k, v)
    return _tiles_to_grid(plan, out_tiles)


# ---------------------------------------------------------------------------------- pallas: token permutation

def _pallas_tiles(shape, tile):
    """Tile per axis shrunk to the grid (powers of two), keeping at least 16 tokens per block."""
    tiles = [min(t, 1 << max(0, math.ceil(math.log2(L)))) for t, L in zip(tile, shape)]
    while math.prod(tiles) < 16:
        tiles[-1] *= 2
    return tuple(tiles)


def token_permute(x, tile):
    """``[B, *grid, H, D]`` -> ``[B, N, H, D]``: zero-pad every axis to a multiple of its tile, then order
    tokens tile-major (tiles row-major, tokens row-major inside a tile), so each tile is one block."""
    ndim = len(tile)
    grid = x.shape[1:1 + ndim]
    counts = [-(-L // t) for L, t in zip(grid, tile)]
    x = jnp.pad(x, [(0, 0)] + [(0, n * t - L) for n, t, L in zip(counts, tile, grid)] + [(0, 0), (0, 0)])
    split = x.reshape(x.shape[0], *itertools.chain(*zip(counts, tile)), *x.shape[-2:])
    order = [0] + [1 + 2 * a for a in range(ndim)] + [2 + 2 * a for a in range(ndim)] + [1 + 2 * ndim, 2 + 2 * ndim]
    return split.transpose(order).reshape(x.shape[0], -1, *x.shape[-2:])


def token_unpermute(x, tile, grid):
    """Inverse of ``token_permute``: ``[B, N, H, D]`` -> ``[B, *grid, H, D]`` (padding dropped)."""
    ndim = len(tile)
    counts = [-(-L // t) for L, t in zip(grid, tile)]
    split = x.reshape(x.shape[0], *counts, *tile, *x.shape[-2:])
    order = [0] + list(itertools.chain(*((1 + a, 1 + ndim + a) for a in range(ndim)))) + [1 + 2 * ndim, 2 + 2 * ndim]
    full = split.transpose(order).reshape(x.shape[0], *(n * t for n, t in zip(counts, tile)), *x.shape[-2:])
    return full[(slice(None),) + tuple(slice(0, L) for L in grid)]


def axis_tile_maps(geometry: NAGeometry, axis: int, q_tile: int, kv_tile: int):
    """``(any, all)`` ``[nq, nk]``: per-axis (q tile, kv tile) pairs with some / only visible entries;
    padded coordinates (past the axis end) count as invisible."""
    L = geometry.shape[axis]
    nq, nk = -(-L // q_tile), -(-L // kv_tile)
    padded = np.zeros((nq * q_tile, nk * kv_tile), bool)
    padded[:L, :L] = geometry.axis_mask(axis)
    tiles = padded.reshape(nq, q_tile, nk, kv_tile)
    return tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))


def na_tile_maps(geometry: NAGeometry, q_tile, kv_tile=None):
    """``(block_map, full_map)`` ``[Nq, Nk]`` over tile-major permuted tokens. The NA mask is an AND over
    axes, so a tile pair has a visible entry iff it has one on every axis, and is full iff every axis is."""
    kv_tile = q_tile if kv_tile is None else kv_tile
    block_map, full_map = np.ones((1, 1), bool), np.ones((1, 1), bool)
    for a in range(geometry.ndim):
        any_a, all_a = axis_tile_maps(geometry, a, q_tile[a], kv_tile[a])
        block_map = np.kron(block_map, any_a).astype(bool)
        full_map = np.kron(full_map, all_a).astype(bool)
    return block_map, full_map


def _grid_coordinates(index, shape, tile):
    """Grid coordinates (one per axis) of tile-major permuted token ``index`` (index arithmetic only)."""
    counts = [-(-L // t) for L, t in zip(shape, tile)]
    tile_id, offset = index_div(index, math.prod(tile)), index_mod(index, math.prod(tile))
    coords = []
    for a in reversed(range(len(shape))):
        coords.append(index_mod(tile_id, counts[a]) * tile[a] + index_mod(offset, tile[a]))
        tile_id, offset = index_div(tile_id, counts[a]), index_div(offset, tile[a])
    return coords[::-1]


def _permuted_mask_fn(geometry: NAGeometry, q_tile, kv_tile):
    """``mask_fn(b, h, q_idx, kv_idx)``: the NA rule on permuted token indices, padding invisible."""
    def mask_fn(b, h, q_idx, kv_idx):
        visible = True
        for a, (qi, kj) in enumerate(zip(_grid_coordinates(q_idx, geometry.shape, q_tile),
                                         _grid_coordinates(kv_idx, geometry.shape, kv_tile))):
            L = geometry.shape[a]
            lo, hi = axis_window_bounds(qi, L, geometry.kernel[a], geometry.stride[a], geometry.causal[a], xp=jnp)
            visible = visible & (qi < L) & (kj < L) & (lo <= kj) & (kj <= hi)
        return visible

    return mask_fn


def na_block_mask(geometry: NAGeometry, q_tile, kv_tile=None) -> BlockMask:
    """The ``BlockMask`` of an undilated NA pattern over tile-major permuted tokens (one block per tile)."""
    kv_tile = q_tile if kv_tile is None else kv_tile
    block_map, full_map = na_tile_maps(geometry, q_tile, kv_tile)
    return BlockMask.from_dense_block_map(
        jnp.asarray(block_map)[None, None], full_map=jnp.asarray(full_map)[None, None],
        block_q=math.prod(q_tile), block_k=math.prod(kv_tile),
        seq_q=block_map.shape[0] * math.prod(q_tile), seq_k=block_map.shape[1] * math.prod(kv_tile))


def permuted_attention(geometry: NAGeometry, q, k, v, *, tile, scale: float, kv_tile=None,
                       sparse_impl: str = "pallas"):
    """Undilated NA through token permutation and ``block_sparse_attention`` (GNA's formulation)."""
    from jattn.ops.block_sparse import block_sparse_attention
    q_tile = _pallas_tiles(geometry.shape, tile)
    kv_tile = q_tile if kv_tile is None else _pallas_tiles(geometry.shape, kv_tile)
    out = block_sparse_attention(token_permute(q, q_tile), token_permute(k, kv_tile), token_permute(v, kv_tile),
                                 na_block_mask(geometry, q_tile, kv_tile),
                                 mask_fn=_permuted_mask_fn(geometry, q_tile, kv_tile), scale=scale, impl=sparse_impl)
    return token_unpermute(out, q_tile, geometry.shape)
