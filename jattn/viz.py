"""Pictures of attention patterns: ``plot_mask`` draws a dense mask, a mask function or a BlockMask.

Rows are queries (``q_idx``, top to bottom) and columns keys (``kv_idx``, left to right); dark cells are
visible (True = attend). For a ``BlockMask`` the tiles are shaded underneath: green where the tile is
*full* (the kernel skips the mask function), orange where it is *partial* (the kernel applies
``mask_fn``), white where the tile is not visited at all.

Only the object-oriented matplotlib API is used (``matplotlib.figure.Figure``, no pyplot state), so
drawing works in tests, in threads and on machines without a display. matplotlib is imported on first
use, keeping ``import jattn`` fast.
"""
from __future__ import annotations

import numpy as np

from jattn.core.checks import describe

# A BlockMask is drawn element by element up to this many elements (512 x 512); beyond it, tile by tile.
ELEMENT_VIEW_LIMIT = 512 * 512
# Element grid lines are drawn only while cells are still wider than a line.
ELEMENT_GRID_LIMIT = 96
# plot_mask never materialises more than this many [T, S] elements (a mask_fn, or a BlockMask drawn with
# view="elements"); larger patterns are drawn tile by tile from a BlockMask (view="blocks").
DENSE_DRAW_LIMIT = 4096 * 4096

VISIBLE = (0.10, 0.16, 0.33, 1.0)
VISIBLE_OVER_TILES = (0.05, 0.05, 0.15, 0.62)  # see-through, so the tile shade shows the tile kind
TRANSPARENT = (0.0, 0.0, 0.0, 0.0)
TILE_COLORS = ("white", "#ffc98b", "#9bd8a8")   # indexed by tile kind
TILE_SKIPPED, TILE_PARTIAL, TILE_FULL = 0, 1, 2
TILE_NAMES = ("not visited", "partial tile", "full tile")


# ------------------------------------------------------------------------------------------ checks

def _check_index(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def _check_seq(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _pick(name: str, index: int, size: int) -> int:
    """Index into a batch/head dim; a size-1 dim is shared by every index (as in attention's mask)."""
    if size == 1:
        return 0
    if index >= size:
        raise ValueError(f"{name}={index} is out of range: the mask's {name} dim has size {size}")
    return index


# ------------------------------------------------------------------------------------------ data

def dense_slice(mask, *, batch: int = 0, head: int = 0) -> np.ndarray:
    """The ``[T, S]`` bool NumPy slice of a dense mask ``[T, S]``, ``[H, T, S]`` or ``[B, H, T, S]``."""
    if not (hasattr(mask, "shape") and hasattr(mask, "dtype")):
        raise TypeError(f"mask must be a bool array, a BlockMask or None (with mask_fn=), got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must have dtype bool (True = attend), got {describe(mask)}")
    if mask.ndim not in (2, 3, 4) or 0 in mask.shape:
        raise ValueError(f"mask must be a non-empty [T, S], [H, T, S] or [B, H, T, S] array, got {describe(mask)}")
    full = np.asarray(mask).reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    return full[_pick("batch", batch, full.shape[0]), _pick("head", head, full.shape[1])]


def mask_fn_slice(mask_fn, seq_q: int, seq_k: int, *, batch: int = 0, head: int = 0) -> np.ndarray:
    """``[seq_q, seq_k]`` bool: ``mask_fn(batch, head, q_idx, kv_idx)`` over every position pair."""
    import jax.numpy as jnp

    q_idx = jnp.arange(seq_q)[:, None]
    kv_idx = jnp.arange(seq_k)[None, :]
    visible = mask_fn(jnp.int32(batch), jnp.int32(head), q_idx, kv_idx)
    return np.asarray(jnp.broadcast_to(visible, (seq_q, seq_k))).astype(bool)


def tile_kinds(block_mask, *, batch: int = 0, head: int = 0) -> np.ndarray:
    """``[nQ, nK]`` int: ``TILE_SKIPPED``, ``TILE_PARTIAL`` or ``TILE_FULL`` for each tile of one (b, h)."""
    Bm, Hm, _, _ = block_mask.shape
    b, h = _pick("batch", batch, Bm), _pick("head", head, Hm)
    listed = np.asarray(block_mask.to_dense_block_map()[b, h])
    full = np.asarray(block_mask.to_dense_full_map()[b, h])
    return np.where(full, TILE_FULL, np.where(listed, TILE_PARTIAL, TILE_SKIPPED))


def block_mask_slice(block_mask, mask_fn=None, *, batch: int = 0, head: int = 0) -> np.ndarray:
    """``[seq_q, seq_k]`` bool: what the kernel sees for one (b, h) (``BlockMask.to_dense_mask``)."""
    Bm, Hm, _, _ = block_mask.shape
    _pick("batch", batch, Bm)  # range checks only: the index is used as given below
    _pick("head", head, Hm)
    # A shared (size-1) dim is broadcast up to the index asked for, so mask_fn sees the real b and h.
    dense = block_mask.to_dense_mask(mask_fn, batch=batch + 1 if Bm == 1 else None,
                                     heads=head + 1 if Hm == 1 else None)
    return np.asarray(dense[batch, head])


def _expand_tiles(kinds: np.ndarray, block_q: int, block_k: int, seq_q: int, seq_k: int) -> np.ndarray:
    """``[nQ, nK]`` -> ``[seq_q, seq_k]``, each tile's value repeated over its rectangle."""
    return np.repeat(np.repeat(kinds, block_q, axis=0), block_k, axis=1)[:seq_q, :seq_k]


# ------------------------------------------------------------------------------------------ drawing

def _new_axes(ax, rows: int, cols: int):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    aspect = cols / rows
    width, height = (6.0, max(2.5, 6.0 / aspect)) if aspect >= 1 else (max(2.5, 6.0 * aspect), 6.0)
    fig = Figure(figsize=(width + 1.6, height + 0.8), layout="constrained")
    return fig, fig.add_subplot()


def _two_colour_map(on):
    from matplotlib.colors import ListedColormap
    return ListedColormap([TRANSPARENT, on])


def _draw_bool(ax, values: np.ndarray, colour, label: str):
    image = ax.imshow(values, cmap=_two_colour_map(colour), vmin=0, vmax=1, interpolation="nearest",
                      aspect="equal")
    image.set_label(label)
    return image


def _draw_tile_kinds(ax, kinds: np.ndarray):
    from matplotlib.colors import ListedColormap

    image = ax.imshow(kinds, cmap=ListedColormap(TILE_COLORS), vmin=0, vmax=len(TILE_COLORS) - 1,
                      interpolation="nearest", aspect="equal")
    image.set_label("tiles")
    return image


def _draw_boundaries(ax, rows: int, cols: int, step_q: int, step_k: int, **line_style):
    """Lines between cells every ``step`` positions (cell edges sit at half-integers)."""
    ax.set_xticks(np.arange(step_k, cols, step_k) - 0.5, minor=True)
    ax.set_yticks(np.arange(step_q, rows, step_q) - 0.5, minor=True)
    ax.grid(which="minor", **line_style)
    ax.tick_params(which="minor", length=0)


def _tile_legend(ax, kinds: np.ndarray, with_visible: bool):
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=TILE_COLORS[k], edgecolor="grey", label=TILE_NAMES[k])
               for k in (TILE_FULL, TILE_PARTIAL) if (kinds == k).any()]
    if with_visible:
        handles.append(Patch(facecolor=VISIBLE_OVER_TILES, edgecolor="grey", label="visible"))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def _title(ax, title, stats: str):
    ax.set_title(f"{title}\n{stats}" if title else stats, fontsize="medium")


def _selection(batch: int, head: int) -> str:
    return "" if batch == head == 0 else f", batch {batch}, head {head}"


def _plot_elements(ax, visible: np.ndarray, *, title, grid: bool, what: str, selection: str):
    rows, cols = visible.shape
    _draw_bool(ax, visible, VISIBLE, "mask")
    ax.set_facecolor("white")
    if grid and max(rows, cols) <= ELEMENT_GRID_LIMIT:
        _draw_boundaries(ax, rows, cols, 1, 1, color="0.85", linewidth=0.4)
    ax.set_xlabel("key position (kv_idx)")
    ax.set_ylabel("query position (q_idx)")
    _title(ax, title, f"{what} [{rows} x {cols}]{selection}: {visible.mean():.1%} visible")


def _plot_block_mask(ax, block_mask, mask_fn, *, title, grid, batch, head, view):
    seq_q, seq_k, bq, bk = block_mask.seq_q, block_mask.seq_k, block_mask.block_q, block_mask.block_k
    kinds = tile_kinds(block_mask, batch=batch, head=head)
    listed, n_full = int((kinds != TILE_SKIPPED).sum()), int((kinds == TILE_FULL).sum())
    stats = (f"BlockMask [{seq_q} x {seq_k}], tiles {bq} x {bk}{_selection(batch, head)}: "
             f"{listed}/{kinds.size} visited ({n_full} full, {listed - n_full} partial)")
    if view == "blocks":
        _draw_tile_kinds(ax, kinds)
        if grid and max(kinds.shape) <= ELEMENT_GRID_LIMIT:  # beyond, lines would hide the cells
            _draw_boundaries(ax, *kinds.shape, 1, 1, color="0.6", linewidth=0.5)
        ax.set_xlabel(f"key block (kv_idx // {bk})")
        ax.set_ylabel(f"query block (q_idx // {bq})")
    else:
        _draw_tile_kinds(ax, _expand_tiles(kinds, bq, bk, seq_q, seq_k))
        _draw_bool(ax, block_mask_slice(block_mask, mask_fn, batch=batch, head=head), VISIBLE_OVER_TILES, "mask")
        if grid:
            _draw_boundaries(ax, seq_q, seq_k, bq, bk, color="0.35", linewidth=0.6)
        ax.set_xlabel("key position (kv_idx)")
        ax.set_ylabel("query position (q_idx)")
    _tile_legend(ax, kinds, with_visible=view == "elements")
    _title(ax, title, stats)


def plot_mask(mask=None, *, mask_fn=None, seq_q: int | None = None, seq_k: int | None = None, ax=None,
              title: str | None = None, batch: int = 0, head: int = 0, grid: bool = True, view: str = "auto"):
    """Draws an attention pattern and returns the matplotlib ``Figure`` (nothing is shown or saved).

    What to draw, one of:

    * ``mask``: a dense bool array ``[T, S]``, ``[H, T, S]`` or ``[B, H, T, S]`` (True = attend);
      a size-1 batch or head dim is shared by every index.
    * ``mask_fn=fn, seq_q=T[, seq_k=S]`` (``mask`` None): ``fn(b, h, q_idx, kv_idx)`` evaluated at
      ``b=batch, h=head`` over ``T x S`` positions (``seq_k`` defaults to ``seq_q``).
    * ``mask``: a ``BlockMask``, with the optional ``mask_fn`` that the kernel applies in partial tiles.
      ``view="elements"`` draws what the kernel sees (``BlockMask.to_dense_mask``) over the tiles,
      shaded full vs partial, with tile boundaries; ``view="blocks"`` draws one cell per tile;
      ``view="auto"`` picks elements up to ``ELEMENT_VIEW_LIMIT`` elements and blocks beyond; the
      blocks view reads only the tile tables, so it draws BlockMasks of any length without ever
      materialising ``[T, S]``.

    Nothing larger than ``DENSE_DRAW_LIMIT`` elements is materialised: a larger ``mask_fn`` or
    ``view="elements"`` is a ``ValueError`` (draw a BlockMask's tiles instead).

    ``batch``/``head`` select the slice drawn. ``ax``: draw into an existing matplotlib Axes (its
    figure is returned). ``title``: a first title line above the generated summary. ``grid``: draw
    tile boundaries (BlockMask; in the blocks view up to ``ELEMENT_GRID_LIMIT`` tiles a side) or element
    boundaries (dense masks up to ``ELEMENT_GRID_LIMIT`` a side).
    The mask itself is the Axes image labelled ``"mask"`` and the tile kinds the one labelled ``"tiles"``.
    """
    from jattn.core.block_mask import BlockMask

    batch, head = _check_index("batch", batch), _check_index("head", head)
    if view not in ("auto", "elements", "blocks"):
        raise ValueError(f"view must be 'auto', 'elements' or 'blocks', got {view!r}")
    if mask_fn is not None and not callable(mask_fn):
        raise TypeError(f"mask_fn must be None or a callable mask_fn(b, h, q_idx, kv_idx), got {mask_fn!r}")
    if callable(mask) and not isinstance(mask, BlockMask):
        raise TypeError("mask is a function: pass it as plot_mask(mask_fn=fn, seq_q=T) instead")
    if view == "blocks" and not isinstance(mask, BlockMask):
        raise ValueError(f"view='blocks' needs a BlockMask, got {type(mask).__name__}")
    if mask is not None and not isinstance(mask, BlockMask) and (seq_q is not None or seq_k is not None):
        raise ValueError("seq_q/seq_k go with mask_fn (mask=None); a dense mask carries its own lengths")

    if isinstance(mask, BlockMask):
        if view == "auto":
            view = "elements" if mask.seq_q * mask.seq_k <= ELEMENT_VIEW_LIMIT else "blocks"
        if view == "elements" and mask.seq_q * mask.seq_k > DENSE_DRAW_LIMIT:
            raise ValueError(f"view='elements' would materialise the BlockMask's {mask.seq_q} x {mask.seq_k} mask, "
                             f"more than DENSE_DRAW_LIMIT={DENSE_DRAW_LIMIT} elements: use view='blocks'")
        rows, cols = (mask.num_q_blocks, mask.num_kv_blocks) if view == "blocks" else (mask.seq_q, mask.seq_k)
        fig, ax = _new_axes(ax, rows, cols)
        _plot_block_mask(ax, mask, mask_fn, title=title, grid=grid, batch=batch, head=head, view=view)
        return fig

    if mask is None:
        if mask_fn is None:
            raise TypeError("plot_mask needs a mask (bool array or BlockMask) or mask_fn= with seq_q=")
        if seq_q is None:
            raise ValueError("mask_fn needs the sequence lengths: pass seq_q= (and seq_k= when it differs)")
        seq_q = _check_seq("seq_q", seq_q)
        seq_k = seq_q if seq_k is None else _check_seq("seq_k", seq_k)
        if seq_q * seq_k > DENSE_DRAW_LIMIT:
            raise ValueError(f"mask_fn over seq_q={seq_q} x seq_k={seq_k} would materialise {seq_q * seq_k} "
                             f"elements, more than DENSE_DRAW_LIMIT={DENSE_DRAW_LIMIT}: draw its tiles instead, "
                             f"plot_mask(BlockMask.from_mask_fn(mask_fn, 1, 1, seq_q, seq_k, block, block))")
        visible, what = mask_fn_slice(mask_fn, seq_q, seq_k, batch=batch, head=head), "mask_fn"
    else:
        if mask_fn is not None:
            raise TypeError("mask_fn is used with a BlockMask or in place of mask, not with a dense mask; "
                            f"got a dense mask {describe(mask)} and mask_fn={mask_fn!r}")
        visible, what = dense_slice(mask, batch=batch, head=head), "mask"
    fig, ax = _new_axes(ax, *visible.shape)
    _plot_elements(ax, visible, title=title, grid=grid, what=what, selection=_selection(batch, head))
    return fig
