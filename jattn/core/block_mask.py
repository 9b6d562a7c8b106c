"""``BlockMask``: which (query block, key block) tiles a block-sparse attention visits.

Every sparse method in jattn is a *selector* that produces a ``BlockMask`` and then calls the one
block-sparse kernel (``jattn.ops.block_sparse.block_sparse_attention``). The mask is the contract
between the two.

Layout. Queries are cut into ``nQ = ceil(seq_q / block_q)`` blocks and keys into
``nK = ceil(seq_k / block_k)`` blocks (the last block of each may be a short tail). For each
``(b, h, q_block)`` the mask lists the kv blocks to visit, in ascending order::

    kv_indices [Bm, Hm, nQ, maxK] int32   listed kv blocks; entries past the count repeat the last
                                          listed index (0 for an empty row) so a pipelined kernel
                                          re-uses the block it already holds
    kv_counts  [Bm, Hm, nQ]       int32   how many entries of the row are real
    kv_full    [Bm, Hm, nQ, maxK] bool    True: every element of the tile is visible, so the kernel
                                          skips the mask function there; False (partial): the kernel
                                          applies ``mask_fn`` (and the sequence-end mask)

and the transpose, for the dk/dv pass of the backward (for each kv block, the q blocks that visit it)::

    q_indices [Bm, Hm, nK, maxQ], q_counts [Bm, Hm, nK], q_full [Bm, Hm, nK, maxQ]

``Bm`` is 1 (shared by the batch) or B; ``Hm`` is 1 (shared by the heads) or H, the number of *query*
heads. ``block_q, block_k, seq_q, seq_k`` are static (pytree aux data), so a BlockMask passes through
``jit``, ``vmap``-free ``scan`` carries and ``custom_vjp`` like any pytree of arrays.

Semantics. Element ``(b, h, i, j)`` is visible iff its tile is listed AND (the tile is full OR
``mask_fn(b, h, i, j)``). A tile is *full* only if it lies entirely inside both sequences: tail tiles
are always partial. ``to_dense_mask()`` expands exactly this rule; every kernel impl is tested against it.

The mask travels with the tiles (as FlexAttention's ``BlockMask`` carries its ``mask_mod``): ``mask_fn``
is a static field (pytree aux data, so it must be hashable, as jit requires of static arguments), and
``block_sparse_attention(q, k, v, bm)`` uses it without being told again. What the partial tiles mean
is always stated, never guessed (``partial_tiles``, also static):

* a carried ``mask_fn`` (``from_mask_fn``, or ``mask_fn=`` given to any builder): partial tiles apply
  it. Passing a different ``mask_fn`` to the attention call is a ``ValueError``; an equal one (the same
  object, ``==``, or a closure of the same code over equal values) is accepted.
* ``partial_tiles="visible"`` (tile selectors: top-k, flat, token, vertical-slash indices and a dense
  block map without ``full_map``; they choose tiles, not elements): with no ``mask_fn`` every element of
  a listed tile is visible (the sequence ends aside); a ``mask_fn`` given to the call refines them.
* ``partial_tiles="mask_fn"`` without a carried function (a dense block map whose ``full_map`` leaves
  listed tiles partial, or the raw constructor): the call must pass ``mask_fn=``; if it does not and
  such tiles exist (or cannot be checked, under ``jit``), it raises instead of treating them as full.

Builders (block sizes are always explicit arguments; lengths need not be multiples of the blocks):

* ``from_mask_fn(mask_fn, B, H, seq_q, seq_k, block_q, block_k)``: tiles with any visible element,
  marked full where every element is visible. Evaluates one block row at a time.
* ``from_dense_block_map(block_map, *, block_q, block_k, seq_q, seq_k, full_map=None)``
* ``from_topk_indices(indices [B,H,nQ,k], ...)``: per q block, k kv-block ids (any order, -1 = pad)
* ``from_flat_indices(flat [B,H,n], ...)``: ids ``q_block * nK + kv_block`` (-1 = pad)
* ``from_vertical_slash(vertical [B,H,nV], slash [B,H,nS], ...)``: MInference key columns and
  diagonals -> the tiles they cross
* ``from_token_block_indices(indices [B,H,seq_q,k], ...)``: each query token's kv-block ids ->
  their union per q block

Selectors other than ``from_mask_fn`` mark every tile partial (they choose tiles, not elements) and
are ``partial_tiles="visible"`` unless given a ``mask_fn`` to carry.
Table widths: when the builder's input is concrete, ``maxK``/``maxQ`` are the true maxima, so gather
impls do work proportional to the kept blocks; under ``jit`` they fall back to a static bound
(``k`` for top-k, otherwise ``nK``/``nQ``). Out-of-range ids raise ``ValueError`` when concrete and
are dropped under ``jit``.
"""
from __future__ import annotations

import functools
import math
import types
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core.checks import check_int, describe


# ----------------------------------------------------------------------------------------- helpers

def _check_geometry(block_q, block_k, seq_q, seq_k) -> tuple[int, int, int, int]:
    return (check_int("block_q", block_q), check_int("block_k", block_k),
            check_int("seq_q", seq_q), check_int("seq_k", seq_k))


def _concrete(x) -> np.ndarray | None:
    """``x`` as a NumPy array, or None when it is a tracer (inside jit)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_int_array(name: str, x, ndim: int):
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{name} must be an integer array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {describe(x)}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got {describe(x)}")
    return jnp.asarray(x, jnp.int32)


def _check_id_range(name: str, ids, upper: int, *, allow_pad: bool = True) -> None:
    """Concrete ids must lie in ``[0, upper)`` (or be -1 padding); tracers are not checked."""
    values = _concrete(ids)
    if values is None or values.size == 0:
        return
    low = -1 if allow_pad else 0
    bad = (values < low) | (values >= upper)
    if bad.any():
        first = values[bad].flat[0]
        pad = " or -1 for padding" if allow_pad else ""
        raise ValueError(f"{name} must hold ids in [0, {upper}){pad}, found {int(first)} in {describe(ids)}")


def _check_leading_dims(name: str, x, ndim_mask: int = 2) -> None:
    """Leading ``[B|1, H|1]`` dims must be positive (shared dims are size 1, not absent)."""
    if any(d < 1 for d in x.shape[:ndim_mask]):
        raise ValueError(f"{name} must have positive [B|1, H|1] dims, got {describe(x)}")


PARTIAL_TILES = ("mask_fn", "visible")


def _same_value(a, b, depth: int) -> bool:
    """Structural equality of values a mask function closes over (conservative: unsure -> False)."""
    if a is b:
        return True
    if depth > 6:
        return False
    if callable(a) and callable(b):
        return same_mask_fn(a, b, _depth=depth + 1)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(_same_value(x, y, depth + 1) for x, y in zip(a, b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[key], b[key], depth + 1) for key in a)
    if hasattr(a, "shape") and hasattr(a, "dtype") and hasattr(b, "shape") and hasattr(b, "dtype"):
        x, y = _concrete(a), _concrete(b)       # tracers compare only by identity (above)
        return (x is not None and y is not None and x.shape == y.shape and x.dtype == y.dtype
                and bool(np.array_equal(x, y)))
    try:
        equal = a == b
    except Exception:  # noqa: BLE001 - a value without a usable == is simply "not known equal"
        return False
    return equal if isinstance(equal, bool) else False


def same_mask_fn(a, b, *, _depth: int = 0) -> bool:
    """True when two mask functions are known to be the same function.

    The same object, objects equal under ``==`` (frozen dataclasses, ``functools.partial`` of equal
    parts), or closures of the same code over equal captured values: ``sliding_window_mask(64)``
    built twice is the same mask, ``sliding_window_mask(32)`` is not. Anything uncertain is "not equal".
    """
    if a is b:
        return True
    if a is None or b is None:
        return False
    if isinstance(a, types.FunctionType) and isinstance(b, types.FunctionType):
        if a.__code__ is not b.__code__ or a.__globals__ is not b.__globals__:
            return False
        cells_a, cells_b = a.__closure__ or (), b.__closure__ or ()
        try:
            contents_a = [cell.cell_contents for cell in cells_a]
            contents_b = [cell.cell_contents for cell in cells_b]
        except ValueError:                      # an empty cell
            return False
        return (_same_value(a.__defaults__, b.__defaults__, _depth)
                and _same_value(a.__kwdefaults__, b.__kwdefaults__, _depth)
                and _same_value(contents_a, contents_b, _depth))
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        return (same_mask_fn(a.func, b.func, _depth=_depth + 1) and _same_value(a.args, b.args, _depth)
                and _same_value(a.keywords, b.keywords, _depth))
    if type(a) is not type(b):
        return False
    try:
        equal = a == b
    except Exception:  # noqa: BLE001
        return False
    return equal if isinstance(equal, bool) else False


def _check_mask_fn(mask_fn):
    if mask_fn is not None and not callable(mask_fn):
        raise TypeError(f"mask_fn must be None or a callable mask_fn(b, h, q_idx, kv_idx), got {mask_fn!r}")
    return mask_fn


def _check_partial_tiles(partial_tiles):
    if partial_tiles not in PARTIAL_TILES:
        raise ValueError(f"partial_tiles must be one of {PARTIAL_TILES}, got {partial_tiles!r}")
    return partial_tiles


def _tail_free_tiles(nQ: int, nK: int, block_q: int, block_k: int, seq_q: int, seq_k: int):
    """``[nQ, nK]`` bool: tiles lying entirely inside both sequences (the only ones that may be full)."""
    q_inside = (np.arange(1, nQ + 1) * block_q) <= seq_q
    k_inside = (np.arange(1, nK + 1) * block_k) <= seq_k
    return jnp.asarray(q_inside[:, None] & k_inside[None, :])


def _full_width_lists(block_map, full_map):
    """Dense ``[..., nRows, nCols]`` bool maps -> (indices, counts, full) lists of width nCols.

    Rows list their True columns in ascending order; padding repeats the last listed id (0 for an
    empty row), so trimming the width later keeps the padding rule.
    """
    n_cols = block_map.shape[-1]
    counts = jnp.sum(block_map, axis=-1, dtype=jnp.int32)
    cols = jnp.arange(n_cols, dtype=jnp.int32)
    # Kept columns sort first and in ascending order: unique keys, so no stable sort is needed.
    order = jnp.argsort(jnp.where(block_map, cols, cols + n_cols), axis=-1).astype(jnp.int32)
    listed = cols < counts[..., None]
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    indices = jnp.where(listed, order, last)
    full = listed & jnp.take_along_axis(full_map, indices, axis=-1)
    return indices, counts, full


@jax.jit
def _lists_from_maps(block_map, full_map, tail_free):
    """kv lists and transposed q lists (full width) from dense maps; tail tiles forced partial."""
    full_map = block_map & full_map & tail_free
    kv_lists = _full_width_lists(block_map, full_map)
    q_lists = _full_width_lists(jnp.swapaxes(block_map, -1, -2), jnp.swapaxes(full_map, -1, -2))
    return kv_lists, q_lists


def _trim(lists, bound: int | None):
    """Cuts the table width to the true maximum count (concrete) or to the static ``bound``."""
    indices, counts, full = lists
    concrete = _concrete(counts)
    if concrete is not None:
        width = int(concrete.max()) if concrete.size else 1
    else:
        width = indices.shape[-1] if bound is None else bound
    width = max(1, min(width, indices.shape[-1]))
    return indices[..., :width], counts, full[..., :width]


@functools.partial(jax.jit, static_argnums=0)
def _scatter_block_map(shape, q_blocks, kv_blocks, valid):
    """Dense ``[Bm, Hm, nQ, nK]`` bool map with True at ``(b, h, q_blocks, kv_blocks)`` where valid.

    ``q_blocks``, ``kv_blocks``, ``valid``: ``[Bm, Hm, n]``. Invalid or out-of-range ids are dropped.
    """
    Bm, Hm, nQ, nK = shape
    in_range = valid & (q_blocks >= 0) & (q_blocks < nQ) & (kv_blocks >= 0) & (kv_blocks < nK)
    flat = jnp.where(in_range, q_blocks * nK + kv_blocks, nQ * nK)  # nQ * nK is out of bounds: dropped
    rows = jnp.zeros((Bm, Hm, nQ * nK), bool)
    b = jnp.arange(Bm)[:, None, None]
    h = jnp.arange(Hm)[None, :, None]
    rows = rows.at[b, h, flat].set(True, mode="drop")
    return rows.reshape(shape)


def _expand_tiles(tile_map, block_q: int, block_k: int, seq_q: int, seq_k: int):
    """``[..., nQ, nK]`` -> element-level ``[..., seq_q, seq_k]`` (each tile repeated over its rectangle)."""
    expanded = jnp.repeat(jnp.repeat(tile_map, block_q, axis=-2), block_k, axis=-1)
    return expanded[..., :seq_q, :seq_k]


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7, 8))
def _vertical_slash_map(vertical, slash, Bm, Hm, block_q, block_k, seq_q, seq_k, causal):
    nQ, nK = math.ceil(seq_q / block_q), math.ceil(seq_k / block_k)
    q_start = jnp.arange(nQ) * block_q                                   # [nQ]
    q_last = jnp.minimum(q_start + block_q, seq_q) - 1

    # Vertical column j lies in kv block j // block_k; causal: it reaches q blocks ending at or after
    # j, so a kv block is reached from its smallest chosen column on.
    b_ids = jnp.arange(vertical.shape[0])[:, None, None]
    h_ids = jnp.arange(vertical.shape[1])[None, :, None]
    v_block = jnp.where(vertical >= 0, vertical // block_k, nK)         # nK: dropped by the scatter
    first_col = jnp.full(vertical.shape[:2] + (nK,), seq_k, jnp.int32)
    first_col = first_col.at[b_ids, h_ids, v_block].min(vertical, mode="drop")   # [.., nK]
    reach = q_last[:, None] if causal else seq_k - 1
    vertical_map = first_col[:, :, None, :] <= reach                     # [.., nQ, nK]

    # Slash o covers keys [q_start - o, q_last - o] of a q block: a contiguous run of kv blocks,
    # marked with +1 at its first block and -1 after its last, then summed along the kv axis.
    o = slash[:, :, None, :]                                             # [.., 1, nS]
    lo = jnp.maximum(q_start[:, None] - o, 0)
    hi = jnp.minimum(q_last[:, None] - o, seq_k - 1)
    s_reach = (o >= 0) & (lo <= hi)                                      # [.., nQ, nS]
    runs_shape = (slash.shape[0], slash.shape[1], nQ, nK + 1)
    b_ids = jnp.arange(slash.shape[0])[:, None, None, None]
    h_ids = jnp.arange(slash.shape[1])[None, :, None, None]
    q_ids = jnp.arange(nQ)[None, None, :, None]
    runs = jnp.zeros(runs_shape, jnp.int32)
    runs = runs.at[b_ids, h_ids, q_ids, jnp.where(s_reach, lo // block_k, nK + 1)].add(1, mode="drop")
    runs = runs.at[b_ids, h_ids, q_ids, jnp.where(s_reach, hi // block_k + 1, nK + 1)].add(-1, mode="drop")
    slash_map = jnp.cumsum(runs, axis=-1)[..., :nK] > 0
    return jnp.broadcast_to(vertical_map | slash_map, (Bm, Hm, nQ, nK))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _topk_map(indices, nQ: int, nK: int):
    Bm, Hm, _, k = indices.shape
    q_blocks = jnp.broadcast_to(jnp.arange(nQ, dtype=jnp.int32)[:, None], indices.shape)
    flat = indices.reshape(Bm, Hm, -1)
    return _scatter_block_map((Bm, Hm, nQ, nK), q_blocks.reshape(Bm, Hm, -1), flat, flat >= 0)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _token_map(indices, block_q: int, nQ: int, nK: int):
    Bm, Hm, seq_q, k = indices.shape
    q_blocks = jnp.broadcast_to((jnp.arange(seq_q, dtype=jnp.int32) // block_q)[:, None], indices.shape)
    flat = indices.reshape(Bm, Hm, -1)
    return _scatter_block_map((Bm, Hm, nQ, nK), q_blocks.reshape(Bm, Hm, -1), flat, flat >= 0)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _flat_map(flat, nQ: int, nK: int):
    return _scatter_block_map((flat.shape[0], flat.shape[1], nQ, nK), flat // nK, flat % nK, flat >= 0)


@functools.partial(jax.jit, static_argnums=3)
def _lists_to_map(indices, counts, full, n_cols: int):
    """Scatters ``[Bm, Hm, n, W]`` lists back to a dense ``[Bm, Hm, n, n_cols]`` map (only full tiles if given)."""
    keep = jnp.arange(indices.shape[-1]) < counts[..., None]
    if full is not None:
        keep = keep & full
    cols = jnp.where(keep, indices, n_cols)                           # n_cols is out of bounds: dropped
    Bm, Hm, n_rows = counts.shape
    b = jnp.arange(Bm)[:, None, None, None]
    h = jnp.arange(Hm)[None, :, None, None]
    r = jnp.arange(n_rows)[None, None, :, None]
    return jnp.zeros((Bm, Hm, n_rows, n_cols), bool).at[b, h, r, cols].set(True, mode="drop")


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7, 8))
def _dense_mask(block_map, full_map, mask_fn, B, H, block_q, block_k, seq_q, seq_k):
    listed = jnp.broadcast_to(_expand_tiles(block_map, block_q, block_k, seq_q, seq_k), (B, H, seq_q, seq_k))
    if mask_fn is None:
        return listed
    full = jnp.broadcast_to(_expand_tiles(full_map, block_q, block_k, seq_q, seq_k), (B, H, seq_q, seq_k))
    b = jnp.arange(B)[:, None, None, None]
    h = jnp.arange(H)[None, :, None, None]
    i = jnp.arange(seq_q)[None, None, :, None]
    j = jnp.arange(seq_k)[None, None, None, :]
    return listed & (full | jnp.broadcast_to(mask_fn(b, h, i, j), (B, H, seq_q, seq_k)))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _mask_fn_tile_maps(mask_fn, B: int, H: int, seq_q: int, seq_k: int, block_q: int, block_k: int):
    """(any visible, all visible) per tile ``[B, H, nQ, nK]``, one ``[B, H, block_q, seq_k]`` row at a time."""
    nQ, nK = math.ceil(seq_q / block_q), math.ceil(seq_k / block_k)
    b = jnp.arange(B)[:, None, None, None]
    h = jnp.arange(H)[None, :, None, None]
    kv_pos = jnp.arange(nK * block_k)
    kv_inside = kv_pos < seq_k

    def block_row(q_block):
        q_pos = q_block * block_q + jnp.arange(block_q)
        inside = (q_pos < seq_q)[:, None] & kv_inside[None, :]
        # Clamped positions keep index-based mask functions (document ids, ...) in bounds.
        visible = mask_fn(b, h, jnp.minimum(q_pos, seq_q - 1)[None, None, :, None],
                          jnp.minimum(kv_pos, seq_k - 1)[None, None, None, :])
        visible = jnp.broadcast_to(visible, (B, H, block_q, nK * block_k)).astype(bool)
        tiles = lambda x: x.reshape(B, H, block_q, nK, block_k)
        any_visible = jnp.any(tiles(visible & inside), axis=(2, 4))
        all_visible = jnp.all(tiles(visible | ~inside), axis=(2, 4))
        return any_visible, all_visible

    any_visible, all_visible = jax.lax.map(block_row, jnp.arange(nQ))
    block_map = jnp.moveaxis(any_visible, 0, 2)
    full_map = jnp.moveaxis(all_visible, 0, 2)
    return block_map, full_map


# ---------------------------------------------------------------------------------------- BlockMask

@jax.tree_util.register_pytree_node_class
class BlockMask:
    """Block-sparse attention pattern (see the module docstring for layout and semantics).

    Build it with one of the ``from_*`` class methods rather than the constructor. Attributes:
    ``kv_indices, kv_counts, kv_full, q_indices, q_counts, q_full`` (arrays) and
    ``block_q, block_k, seq_q, seq_k, mask_fn, partial_tiles`` (static).

    ``mask_fn``: the element mask of the partial tiles (None: not carried). ``partial_tiles``: what
    partial tiles mean when no mask function is known: ``"mask_fn"`` (one is required: the attention
    call raises without it) or ``"visible"`` (every element of a listed tile is visible). A carried
    ``mask_fn`` forces ``"mask_fn"``.
    """

    def __init__(self, kv_indices, kv_counts, kv_full, q_indices, q_counts, q_full, *,
                 block_q: int, block_k: int, seq_q: int, seq_k: int, mask_fn: Callable | None = None,
                 partial_tiles: str = "mask_fn"):
        self.kv_indices, self.kv_counts, self.kv_full = kv_indices, kv_counts, kv_full
        self.q_indices, self.q_counts, self.q_full = q_indices, q_counts, q_full
        self.block_q, self.block_k, self.seq_q, self.seq_k = block_q, block_k, seq_q, seq_k
        self.mask_fn = _check_mask_fn(mask_fn)
        self.partial_tiles = "mask_fn" if mask_fn is not None else _check_partial_tiles(partial_tiles)

    # -- pytree --------------------------------------------------------------------------------
    def tree_flatten(self):
        children = (self.kv_indices, self.kv_counts, self.kv_full, self.q_indices, self.q_counts, self.q_full)
        return children, (self.block_q, self.block_k, self.seq_q, self.seq_k, self.mask_fn, self.partial_tiles)

    @classmethod
    def tree_unflatten(cls, aux, children):
        block_q, block_k, seq_q, seq_k, mask_fn, partial_tiles = aux
        # Bypass __init__: tree_unflatten also receives non-array leaves (object(), None) from JAX internals.
        obj = object.__new__(cls)
        obj.kv_indices, obj.kv_counts, obj.kv_full, obj.q_indices, obj.q_counts, obj.q_full = children
        obj.block_q, obj.block_k, obj.seq_q, obj.seq_k = block_q, block_k, seq_q, seq_k
        obj.mask_fn, obj.partial_tiles = mask_fn, partial_tiles
        return obj

    # -- the mask function ---------------------------------------------------------------------
    def with_mask_fn(self, mask_fn: Callable) -> "BlockMask":
        """The same tiles carrying ``mask_fn`` (partial tiles apply it). Raises if another is carried."""
        if not callable(mask_fn):
            raise TypeError(f"mask_fn must be a callable mask_fn(b, h, q_idx, kv_idx), got {mask_fn!r}")
        self.resolve_mask_fn(mask_fn)           # conflict check
        children, _ = self.tree_flatten()
        return BlockMask(*children, block_q=self.block_q, block_k=self.block_k, seq_q=self.seq_q,
                         seq_k=self.seq_k, mask_fn=mask_fn)

    def _has_interior_partial_tiles(self) -> bool | None:
        """Listed, not full and inside both sequences (tail tiles are partial by construction); None if traced."""
        indices, counts, full = (_concrete(x) for x in (self.kv_indices, self.kv_counts, self.kv_full))
        if indices is None or counts is None or full is None:
            return None
        listed = np.arange(indices.shape[-1]) < counts[..., None]
        q_inside = (np.arange(1, self.num_q_blocks + 1) * self.block_q <= self.seq_q)[:, None]
        k_inside = (indices + 1) * self.block_k <= self.seq_k
        return bool(np.any(listed & ~full & q_inside & k_inside))

    def resolve_mask_fn(self, mask_fn: Callable | None = None) -> Callable | None:
        """The mask function the kernels apply on partial tiles, given the call's ``mask_fn`` (or None).

        Returns the carried function when ``mask_fn`` is None, ``mask_fn`` when nothing is carried, None
        when partial tiles are fully visible. Raises ``ValueError`` when ``mask_fn`` conflicts with the
        carried one, or when partial tiles need a mask function and none is known.
        """
        _check_mask_fn(mask_fn)
        carried = self.mask_fn
        if mask_fn is not None:
            if carried is not None and not same_mask_fn(carried, mask_fn):
                raise ValueError(
                    f"mask_fn={mask_fn!r} conflicts with the mask function this BlockMask was built from "
                    f"({carried!r}); omit mask_fn= (the carried one is used) or rebuild the BlockMask from "
                    f"the mask function you mean")
            return mask_fn
        if carried is not None or self.partial_tiles == "visible":
            return carried
        interior = self._has_interior_partial_tiles()
        if interior is False:
            return None
        why = "has partial tiles" if interior else "may have partial tiles (its tables are traced)"
        raise ValueError(
            f"mask_fn is needed: this BlockMask {why} but carries no mask function, so which of their "
            f"elements are visible is unknown. Pass mask_fn=..., build the BlockMask with mask_fn=... "
            f"(from_mask_fn does), or with partial_tiles='visible' if every element of a listed tile is "
            f"meant to be visible")

    # -- shape ---------------------------------------------------------------------------------
    @property
    def num_q_blocks(self) -> int:
        return math.ceil(self.seq_q / self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return math.ceil(self.seq_k / self.block_k)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(Bm, Hm, nQ, nK)``: the shape of the dense block map."""
        Bm, Hm = self.kv_counts.shape[:2]
        return Bm, Hm, self.num_q_blocks, self.num_kv_blocks

    @property
    def max_kv_blocks(self) -> int:
        """Width of the kv tables: the most kv blocks any q block visits (or a static bound)."""
        return self.kv_indices.shape[-1]

    @property
    def max_q_blocks(self) -> int:
        return self.q_indices.shape[-1]

    @property
    def density(self):
        """Fraction of the ``Bm * Hm * nQ * nK`` tiles that are listed (a float when concrete)."""
        Bm, Hm, nQ, nK = self.shape
        kept = jnp.sum(self.kv_counts) / (Bm * Hm * nQ * nK)
        concrete = _concrete(kept)
        return float(concrete) if concrete is not None else kept

    def __repr__(self) -> str:
        Bm, Hm, nQ, nK = self.shape
        mask = (getattr(self.mask_fn, "__qualname__", None) or repr(self.mask_fn)) if self.mask_fn is not None \
            else f"None, partial_tiles={self.partial_tiles!r}"
        text = (f"BlockMask(shape=[Bm={Bm}, Hm={Hm}, nQ={nQ}, nK={nK}], block=({self.block_q}, {self.block_k}), "
                f"seq=({self.seq_q}, {self.seq_k}), max_kv_blocks={self.max_kv_blocks}, "
                f"max_q_blocks={self.max_q_blocks}, mask_fn={mask}")
        counts, full = _concrete(self.kv_counts), _concrete(self.kv_full)
        if counts is not None and full is not None:
            kept, n_full = int(counts.sum()), int(full.sum())
            text += f", density={kept / (Bm * Hm * nQ * nK):.4f}, full={n_full}, partial={kept - n_full}"
        return text + ")"

    # -- dense views ---------------------------------------------------------------------------
    def to_dense_block_map(self):
        """``[Bm, Hm, nQ, nK]`` bool: True where a tile is listed."""
        return _lists_to_map(self.kv_indices, self.kv_counts, None, self.num_kv_blocks)

    def to_dense_full_map(self):
        """``[Bm, Hm, nQ, nK]`` bool: True where a tile is listed and full."""
        return _lists_to_map(self.kv_indices, self.kv_counts, self.kv_full, self.num_kv_blocks)

    def to_dense_mask(self, mask_fn: Callable | None = None, *, batch: int | None = None,
                      heads: int | None = None):
        """Element-level bool mask ``[B, H, seq_q, seq_k]``: listed tile AND (full OR ``mask_fn``).

        ``mask_fn`` follows the attention call's rule (``resolve_mask_fn``): None uses the carried one.
        ``batch``/``heads`` broadcast shared (size-1) dims so ``mask_fn`` sees every ``(b, h)``;
        by default the mask keeps the BlockMask's own ``[Bm, Hm]``. Meant for tests and small shapes.
        """
        Bm, Hm, _, _ = self.shape
        B = Bm if batch is None else check_int("batch", batch)
        H = Hm if heads is None else check_int("heads", heads)
        for name, want, have in (("batch", B, Bm), ("heads", H, Hm)):
            if have not in (1, want):
                raise ValueError(f"{name}={want} does not match the BlockMask's {name} dim {have}")
        mask_fn = self.resolve_mask_fn(mask_fn)
        return _dense_mask(self.to_dense_block_map(), self.to_dense_full_map(), mask_fn, B, H,
                           self.block_q, self.block_k, self.seq_q, self.seq_k)

    # -- builders ------------------------------------------------------------------------------
    @classmethod
    def _from_maps(cls, block_map, full_map, *, block_q, block_k, seq_q, seq_k, max_kv=None, mask_fn=None,
                   partial_tiles="visible"):
        """Lists (and transposed lists) from dense ``[Bm, Hm, nQ, nK]`` maps; tail tiles forced partial."""
        nQ, nK = block_map.shape[-2:]
        kv_lists, q_lists = _lists_from_maps(block_map, full_map,
                                             _tail_free_tiles(nQ, nK, block_q, block_k, seq_q, seq_k))
        return cls(*_trim(kv_lists, max_kv), *_trim(q_lists, None), block_q=block_q, block_k=block_k,
                   seq_q=seq_q, seq_k=seq_k, mask_fn=mask_fn, partial_tiles=partial_tiles)

    @classmethod
    def from_dense_block_map(cls, block_map, *, block_q: int, block_k: int, seq_q: int, seq_k: int,
                             full_map=None, mask_fn: Callable | None = None,
                             partial_tiles: str | None = None) -> "BlockMask":
        """From a bool tile map ``[B|1, H|1, nQ, nK]`` (True = visit).

        ``full_map`` (same shape, optional): tiles where ``mask_fn`` may be skipped; it is intersected
        with ``block_map`` and with the tail-free tiles. Default: every listed tile is partial.
        ``mask_fn`` (optional): carried, applied on the partial tiles. ``partial_tiles`` (without
        ``mask_fn``): default ``"visible"`` (every listed tile fully visible) when there is no
        ``full_map`` or it covers every listed tile, else ``"mask_fn"`` (the tiles ``full_map`` leaves
        partial need a mask function: the attention call must pass one).
        """
        block_q, block_k, seq_q, seq_k = _check_geometry(block_q, block_k, seq_q, seq_k)
        _check_mask_fn(mask_fn)
        if partial_tiles is not None:
            _check_partial_tiles(partial_tiles)
        nQ, nK = math.ceil(seq_q / block_q), math.ceil(seq_k / block_k)
        for name, m in (("block_map", block_map), ("full_map", full_map)):
            if m is None:
                continue
            if not (hasattr(m, "shape") and hasattr(m, "dtype")):
                raise TypeError(f"{name} must be a bool array, got {type(m).__name__}")
            if m.dtype != jnp.bool_:
                raise TypeError(f"{name} must have dtype bool, got {describe(m)}")
            if m.ndim != 4 or m.shape[2:] != (nQ, nK):
                raise ValueError(f"{name} must have shape [B|1, H|1, nQ={nQ}, nK={nK}] for seq=({seq_q}, "
                                 f"{seq_k}) and blocks ({block_q}, {block_k}), got {describe(m)}")
            _check_leading_dims(name, m)
        block_map = jnp.asarray(block_map)
        if full_map is None:
            full_map = jnp.zeros(block_map.shape, bool)
            auto = "visible"
        elif full_map.shape != block_map.shape:
            raise ValueError(f"full_map must have block_map's shape {tuple(block_map.shape)}, got {describe(full_map)}")
        else:
            listed, full = _concrete(block_map), _concrete(full_map)
            auto = "visible" if listed is not None and full is not None and not np.any(listed & ~full) else "mask_fn"
        return cls._from_maps(block_map, jnp.asarray(full_map), block_q=block_q, block_k=block_k,
                              seq_q=seq_q, seq_k=seq_k, mask_fn=mask_fn,
                              partial_tiles=auto if partial_tiles is None else partial_tiles)

    @classmethod
    def from_mask_fn(cls, mask_fn: Callable, B: int, H: int, seq_q: int, seq_k: int, block_q: int,
                     block_k: int) -> "BlockMask":
        """Tiles of ``mask_fn(b, h, q_idx, kv_idx)`` with any visible element; full where all are.

        The BlockMask carries ``mask_fn``: ``block_sparse_attention(q, k, v, bm)`` applies it on the
        partial tiles without being told again.

        Pass ``B=1`` / ``H=1`` when the mask does not depend on the batch / head. Evaluates one block
        row ``[B, H, block_q, seq_k]`` at a time, never the whole ``[B, H, seq_q, seq_k]`` mask.
        """
        if not callable(mask_fn):
            raise TypeError(f"mask_fn must be a callable mask_fn(b, h, q_idx, kv_idx), got {mask_fn!r}")
        B, H = check_int("B", B), check_int("H", H)
        block_q, block_k, seq_q, seq_k = _check_geometry(block_q, block_k, seq_q, seq_k)
        nQ, nK = math.ceil(seq_q / block_q), math.ceil(seq_k / block_k)
        block_map, full_map = _mask_fn_tile_maps(mask_fn, B, H, seq_q, seq_k, block_q, block_k)
        return cls._from_maps(block_map, full_map, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k,
                              mask_fn=mask_fn)

    @classmethod
    def from_topk_indices(cls, indices, *, block_q: int, block_k: int, seq_q: int, seq_k: int,
                          mask_fn: Callable | None = None) -> "BlockMask":
        """From ``indices [B|1, H|1, nQ, k]``: kv-block ids per q block, any order, -1 = padding.

        Duplicates are merged. The kv tables have static width ``min(k, nK)`` even under ``jit``.
        ``mask_fn`` (optional) is carried; without it every listed tile is fully visible.
        """
        block_q, block_k, seq_q, seq_k = _check_geometry(block_q, block_k, seq_q, seq_k)
        _check_mask_fn(mask_fn)
        nQ, nK = math.ceil(seq_q / block_q), math.ceil(seq_k / block_k)
        indices = _check_int_array("indices", indices, 4)
        if indices.shape[2] != nQ or indices.shape[3] < 1:
            raise ValueError(f"indices must have shape [B|1, H|1, nQ={nQ}, k>=1], got {describe(indices)}")
        _check_leading_dims("indices", indices)
        _check_id_range("indices", indices, nK)
        block_map = _topk_map(indices, nQ, nK)
        k = indices.shape[3]
        return cls._from_maps(block_map, jnp.zeros(block_map.shape, bool), block_q=block_q, block_k=block_k,
                              seq_q=seq_q, seq_k=seq_k, max_kv=min(k, nK) if _concrete(indices) is None else None,
                              mask_fn=mask_fn)

    @classmethod
    def from_flat_indices(cls, flat_indices, *, block_q: int, block_k: int, seq_q: int, seq_k: int,
                          mask_fn: Callable | None = None) -> "BlockMask":
        """From ``flat_indices [B|1, H|1, n]``: tile ids ``q_block * nK + kv_block``, -1 = padding.

        ``mask_fn`` (optional) is carried; without it every listed tile is fully visible.
        """
        block_q, block_k, seq_q, seq_k = _check_geometry(block_q, block_k, seq_q, seq_k)
        _check_mask_fn(mask_fn)
        nQ, nK = math.ceil(seq_q / block_q), math.ceil(seq_k / block_k)
        flat = _check_int_array("flat_indices", flat_indices, 3)
        _check_leading_dims("flat_indices", flat)
        _check_id_range("flat_indices", flat, nQ * nK)
        block_map = _flat_map(flat, nQ, nK)
        return cls._from_maps(block_map, jnp.zeros(block_map.shape, bool), block_q=block_q, block_k=block_k,
                              seq_q=seq_q, seq_k=seq_k, mask_fn=mask_fn)

    @classmethod
    def from_token_block_indices(cls, indices, *, block_q: int, block_k: int, seq_q: int,
                                 seq_k: int, mask_fn: Callable | None = None) -> "BlockMask":
        """From ``indices [B|1, H|1, seq_q, k]``: each query token's kv-block ids (-1 = padding).

        A q block visits the union of its tokens' choices. Note the result is a tile cover: tokens
        of the block also see the blocks their neighbours chose (restrict with a ``mask_fn``, carried
        when given here).
        """
        block_q, block_k, seq_q, seq_k = _check_geometry(block_q, block_k, seq_q, seq_k)
        _check_mask_fn(mask_fn)
        nQ, nK = math.ceil(seq_q / block_q), math.ceil(seq_k / block_k)
        indices = _check_int_array("indices", indices, 4)
        if indices.shape[2] != seq_q or indices.shape[3] < 1:
            raise ValueError(f"indices must have shape [B|1, H|1, seq_q={seq_q}, k>=1], got {describe(indices)}")
        _check_leading_dims("indices", indices)
        _check_id_range("indices", indices, nK)
        block_map = _token_map(indices, block_q, nQ, nK)
        return cls._from_maps(block_map, jnp.zeros(block_map.shape, bool), block_q=block_q, block_k=block_k,
                              seq_q=seq_q, seq_k=seq_k, mask_fn=mask_fn)

    @classmethod
    def from_vertical_slash(cls, vertical_indices, slash_offsets, *, block_q: int, block_k: int,
                            seq_q: int, seq_k: int, causal: bool = False,
                            mask_fn: Callable | None = None) -> "BlockMask":
        """MInference-style vertical + slash pattern -> the tiles it crosses.

        ``vertical_indices [B|1, H|1, nV]``: key columns ``j`` every query attends (-1 = padding).
        ``slash_offsets [B|1, H|1, nS]``: diagonals ``o >= 0``: query ``i`` attends key ``i - o``
        (-1 = padding). With ``causal=True`` a vertical column only reaches q blocks containing a query
        ``i >= j``. Tiles are partial; the exact lines are a ``mask_fn`` away (carried when given here).
        """
        block_q, block_k, seq_q, seq_k = _check_geometry(block_q, block_k, seq_q, seq_k)
        _check_mask_fn(mask_fn)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        nQ, nK = math.ceil(seq_q / block_q), math.ceil(seq_k / block_k)
        vertical = _check_int_array("vertical_indices", vertical_indices, 3)
        slash = _check_int_array("slash_offsets", slash_offsets, 3)
        _check_leading_dims("vertical_indices", vertical)
        _check_leading_dims("slash_offsets", slash)
        _check_id_range("vertical_indices", vertical, seq_k)
        _check_id_range("slash_offsets", slash, max(seq_q, seq_k))
        Bm = max(vertical.shape[0], slash.shape[0])
        Hm = max(vertical.shape[1], slash.shape[1])
        for name, x in (("vertical_indices", vertical), ("slash_offsets", slash)):
            if x.shape[0] not in (1, Bm) or x.shape[1] not in (1, Hm):
                raise ValueError(f"vertical_indices and slash_offsets must agree on [B|1, H|1], got {name} "
                                 f"{describe(x)} against [Bm={Bm}, Hm={Hm}]")
        block_map = _vertical_slash_map(vertical, slash, Bm, Hm, block_q, block_k, seq_q, seq_k, causal)
        return cls._from_maps(block_map, jnp.zeros(block_map.shape, bool), block_q=block_q, block_k=block_k,
                              seq_q=seq_q, seq_k=seq_k, mask_fn=mask_fn)
