"""P66 VL-SAM ("Training-Free Open-Ended Object Detection and Segmentation via Attention as Prompts"; no
official code found; the computation follows ``papers/P50-P74.md``, whose formulas are marked unverified).

VL-SAM turns a vision-language model's attention from an object word to the image tokens into a
localisation map, then into point prompts for SAM. The pieces here are pure functions of stored attention
probabilities (``return_probs=True`` maps), so they apply to any jattn model:

1. **Head importance (mean-max)**, :func:`head_importance_meanmax`: for head ``h``,
   ``s_h = mean_{q in Q} max_{k in K} A_h[q, k]`` (``Q`` the object-word query rows, ``K`` the image
   columns): a head that puts a sharp peak on some image token for the object's rows scores high.
2. **Head aggregation**, :func:`aggregate_heads`: ``A_bar = sum_h w_h A_h`` with ``w = s / sum(s)`` (or
   the mean, ``w_h = 1/H``, when no weights are given). Rows stay stochastic.
3. **Regularised attention flow**, :func:`attention_rollout`: ``F_1 = A_bar_1``, ``F_l = A_bar_l F_{l-1}``
   (attention rollout; ``residual = r`` uses ``(1 - r) A + r I`` per layer, Abnar & Zuidema's residual
   term, ``r = 0`` by default as in the spec). Under a causal (or prefix) mask the product piles mass on
   the tokens that many rows can see — the early tokens — whatever the content. The regulariser divides
   the flow elementwise by the **null flow** ``F0`` (the same rollout of maps that are uniform over each
   row's visible keys, built from the masks alone) and renormalises the rows:
   ``F_reg[i, j] = (F[i, j] / F0[i, j]) / sum_j' (F[i, j'] / F0[i, j'])`` over visible ``j``. So a stack of
   uniform-causal layers gives a uniform flow (the spec's test), and a single causal layer is unchanged.
4. **Localisation**: :func:`localization_map` averages the flow rows of the object's query tokens over
   the image columns and lays them out on the patch grid; :func:`threshold_map` keeps the positions
   ``>= thresh * max`` (the mask); :func:`attention_to_points` gives ``k_pos`` positive points (the
   largest values) and ``k_neg`` negative points (the smallest), the SAM prompts; :func:`mask_iou`.

Deliberate deviations. The paper's regulariser is described (unverified) as a column re-weighting by the
number of tokens that can attend to each position; the null-flow division is an exact version of that
idea: for one layer it is the per-column count correction (a constant per row, removed by the row
normalisation), and for a stack it removes the whole mask-induced bias, which a per-layer column weight
does not (the product of column-reweighted uniform-causal maps is not uniform). SAM itself, its iterative
re-prompting, multi-scale and question-prompt ensembles and NMS are out of scope (no SAM here): the
thresholded map is the mask.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

__all__ = ["head_importance_meanmax", "aggregate_heads", "null_flow", "attention_rollout", "localization_map",
           "threshold_map", "attention_to_points", "mask_iou", "centre_prior"]


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    return f"shape {tuple(shape)} dtype {getattr(x, 'dtype', None)}" if shape is not None else type(x).__name__


def _float_array(name, x, min_ndim):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be a float array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array, got {_describe(x)}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got {_describe(x)}")
    return jnp.asarray(x, jnp.float32)


def _bool_vector(name, x, length):
    if x is None:
        return None
    x = np.asarray(x) if not hasattr(x, "shape") else x
    if x.dtype != np.bool_ or tuple(x.shape) != (length,):
        raise ValueError(f"{name} must be a bool array [{length}], got {_describe(x)}")
    return jnp.asarray(x)


def _unit_float(name, x, low=0.0, high=1.0):
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) or not low <= float(x) <= high:
        raise ValueError(f"{name} must be a float in [{low}, {high}], got {x!r}")
    return float(x)


def head_importance_meanmax(attn, key_mask=None, query_mask=None):
    """Mean-max head scores ``[..., H]`` of ``attn [..., H, Q, K]``: the max over the keys in ``key_mask [K]``
    (the image columns; all when None), then the mean over the queries in ``query_mask`` (``[Q]``, or
    ``[..., Q]`` per map; all when None)."""
    attn = _float_array("attn", attn, 3)
    Q, K = attn.shape[-2:]
    key_mask = _bool_vector("key_mask", key_mask, K)
    if key_mask is not None:
        attn = jnp.where(key_mask, attn, -jnp.inf)
    peak = jnp.max(attn, axis=-1)                                          # [..., H, Q]
    if query_mask is None:
        return jnp.mean(peak, axis=-1)
    query_mask = np.asarray(query_mask) if not hasattr(query_mask, "shape") else query_mask
    lead = tuple(attn.shape[:-3])
    if query_mask.dtype != np.bool_ or tuple(query_mask.shape) not in ((Q,), lead + (Q,)):
        raise ValueError(f"query_mask must be a bool array [Q={Q}] or {list(lead) + [Q]}, got {_describe(query_mask)}")
    query_mask = jnp.asarray(query_mask)
    if not _is_traced(query_mask) and not bool(np.all(np.asarray(query_mask).any(-1))):
        raise ValueError("query_mask must select at least one query row per map, got a map with none")
    qm = query_mask[..., None, :]                                          # [..., 1, Q]
    return jnp.sum(jnp.where(qm, peak, 0.0), axis=-1) / jnp.sum(qm, axis=-1)


def aggregate_heads(attn, head_weights=None):
    """``sum_h w_h attn[..., h, :, :]`` with ``w = head_weights / sum(head_weights)`` (``[H]`` or ``[..., H]``,
    non-negative); the head mean when ``head_weights`` is None. ``attn [..., H, Q, K]`` -> ``[..., Q, K]``."""
    attn = _float_array("attn", attn, 3)
    H = attn.shape[-3]
    if head_weights is None:
        return jnp.mean(attn, axis=-3)
    w = _float_array("head_weights", head_weights, 1)
    if w.shape[-1] != H or (w.ndim > 1 and tuple(w.shape[:-1]) != tuple(attn.shape[:-3])):
        raise ValueError(f"head_weights must be [H={H}] or [{', '.join(map(str, attn.shape[:-3]))}, H={H}], "
                         f"got {_describe(head_weights)}")
    if not _is_traced(w):
        concrete = np.asarray(w)
        if np.any(concrete < 0) or np.any(concrete.sum(-1) <= 0):
            raise ValueError(f"head_weights must be non-negative with a positive sum per map, got values in "
                             f"[{concrete.min()}, {concrete.max()}]")
    w = w / jnp.sum(w, axis=-1, keepdims=True)
    return jnp.einsum("...h,...hqk->...qk", w, attn)


def _is_traced(x) -> bool:
    import jax
    return isinstance(x, jax.core.Tracer)


def _with_residual(a, residual):
    if residual == 0.0:
        return a
    eye = jnp.eye(a.shape[-1], dtype=jnp.float32)
    return (1.0 - residual) * a + residual * eye


def _visible_masks(num_layers, L, masks, causal):
    if masks is None:
        base = np.tril(np.ones((L, L), bool)) if causal else np.ones((L, L), bool)
        return [jnp.asarray(base)] * num_layers
    if isinstance(masks, (list, tuple)):
        if len(masks) != num_layers:
            raise ValueError(f"masks must hold one [.., L, L] bool mask per layer ({num_layers}), got {len(masks)}")
        out = list(masks)
    else:
        out = [masks] * num_layers
    for i, m in enumerate(out):
        if not hasattr(m, "shape") or m.dtype != np.bool_ or tuple(m.shape[-2:]) != (L, L):
            raise ValueError(f"masks[{i}] must be a bool array [..., L={L}, L={L}] (True = visible), "
                             f"got {_describe(m)}")
    return [jnp.asarray(m) for m in out]


def null_flow(masks: Sequence, residual: float = 0.0):
    """The rollout of maps uniform over each row's visible keys (``masks``: one bool ``[..., L, L]`` per
    layer, True = visible): the flow that the masks alone produce."""
    if not masks:
        raise ValueError("masks must hold at least one layer's mask, got none")
    residual = _unit_float("residual", residual, 0.0, 0.999)
    flow = None
    for m in masks:
        m = jnp.asarray(m, jnp.float32)
        u = _with_residual(m / jnp.maximum(jnp.sum(m, -1, keepdims=True), 1.0), residual)
        flow = u if flow is None else jnp.einsum("...ij,...jk->...ik", u, flow)
    return flow


def attention_rollout(attn_layers: Sequence, *, causal: bool = True, regularize: bool = True, head_weights=None,
                      masks=None, residual: float = 0.0, has_heads: bool = False):
    """Attention flow ``F_l = A_l F_{l-1}`` over ``attn_layers`` (first layer first; each ``[..., L, L]``, or
    ``[..., H, L, L]`` when ``has_heads`` or ``head_weights`` is given, aggregated by :func:`aggregate_heads`
    with ``head_weights`` — one ``[H]``/``[..., H]`` per layer, a single one for all, or None for the head
    mean). ``masks`` (one bool ``[..., L, L]`` per layer or one for all; True
    = visible) defaults to the causal lower triangle (``causal=True``) or all-visible. ``regularize`` divides
    by the :func:`null_flow` of the masks and renormalises rows (see the module docstring). Returns
    ``[..., L, L]`` with stochastic rows."""
    if not isinstance(attn_layers, (list, tuple)) or not attn_layers:
        raise ValueError(f"attn_layers must be a non-empty list of [..., L, L] maps, got {type(attn_layers).__name__}")
    residual = _unit_float("residual", residual, 0.0, 0.999)
    n = len(attn_layers)
    if isinstance(head_weights, (list, tuple)):
        if len(head_weights) != n:
            raise ValueError(f"head_weights must hold one entry per layer ({n}), got {len(head_weights)}")
        weights = list(head_weights)
    else:
        weights = [head_weights] * n
    maps = []
    for i, (a, w) in enumerate(zip(attn_layers, weights)):
        a = _float_array(f"attn_layers[{i}]", a, 2)
        if a.shape[-1] != a.shape[-2]:
            raise ValueError(f"attn_layers[{i}] must be square self-attention maps [..., L, L], got {_describe(a)}")
        if has_heads or w is not None:
            a = aggregate_heads(a, w)
        maps.append(a)
    L = maps[0].shape[-1]
    for i, a in enumerate(maps):
        if a.shape[-1] != L or a.shape[:-2] != maps[0].shape[:-2]:
            raise ValueError(f"attn_layers[{i}] aggregates to {_describe(a)}, layer 0 to {_describe(maps[0])}: "
                             f"all layers must share [..., L, L]")
    flow = None
    for a in maps:
        a = _with_residual(a, residual)
        flow = a if flow is None else jnp.einsum("...ij,...jk->...ik", a, flow)
    if not regularize:
        return flow
    null = null_flow(_visible_masks(n, L, masks, causal), residual)
    ratio = jnp.where(null > 0, flow / jnp.where(null > 0, null, 1.0), 0.0)
    total = jnp.sum(ratio, -1, keepdims=True)
    return jnp.where(total > 0, ratio / jnp.where(total > 0, total, 1.0), 0.0)


def localization_map(flow, query_rows, image_cols, grid: tuple):
    """The object's map ``[..., h, w]``: the mean of ``flow [..., L, L]``'s rows selected by ``query_rows``
    (bool ``[..., L]``) restricted to the ``image_cols`` (bool ``[L]``, ``h * w`` of them, row-major patches),
    normalised to sum 1 (all zeros stay zeros)."""
    flow = _float_array("flow", flow, 2)
    L = flow.shape[-1]
    image_cols = np.asarray(image_cols)
    if image_cols.dtype != np.bool_ or image_cols.shape != (L,):
        raise ValueError(f"image_cols must be a bool array [L={L}], got {_describe(image_cols)}")
    if (not isinstance(grid, tuple) or len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid)
            or grid[0] * grid[1] != int(image_cols.sum())):
        raise ValueError(f"grid must be (h, w) ints with h * w = {int(image_cols.sum())} image tokens, got {grid!r}")
    rows = jnp.asarray(query_rows)
    if rows.dtype != jnp.bool_ or tuple(rows.shape) != tuple(flow.shape[:-2]) + (L,):
        raise ValueError(f"query_rows must be a bool array {list(flow.shape[:-2]) + [L]}, got {_describe(query_rows)}")
    count = jnp.maximum(jnp.sum(rows, -1), 1)[..., None]
    mean_rows = jnp.einsum("...i,...ij->...j", rows.astype(jnp.float32), flow) / count
    img = mean_rows[..., np.nonzero(image_cols)[0]]
    total = jnp.sum(img, -1, keepdims=True)
    img = jnp.where(total > 0, img / jnp.where(total > 0, total, 1.0), 0.0)
    return img.reshape(img.shape[:-1] + grid)


def threshold_map(amap, thresh: float = 0.5):
    """``amap [..., h, w] >= thresh * max`` per map (bool): the localisation mask."""
    amap = _float_array("amap", amap, 2)
    thresh = _unit_float("thresh", thresh)
    peak = jnp.max(amap, axis=(-2, -1), keepdims=True)
    return amap >= thresh * peak


def attention_to_points(amap, k_pos: int = 1, k_neg: int = 1):
    """Point prompts of one map ``amap [h, w]``: ``(positive [k_pos, 2], negative [k_neg, 2])`` as (row, col)
    int arrays — the ``k_pos`` largest values (largest first) and the ``k_neg`` smallest (smallest first)."""
    amap = np.asarray(_float_array("amap", amap, 2))
    if amap.ndim != 2:
        raise ValueError(f"amap must be one map [h, w], got {_describe(amap)}")
    for name, k in (("k_pos", k_pos), ("k_neg", k_neg)):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= amap.size:
            raise ValueError(f"{name} must be an int in [0, {amap.size}], got {k!r}")
    order = np.argsort(-amap.reshape(-1), kind="stable")
    pos = order[:k_pos]
    neg = np.argsort(amap.reshape(-1), kind="stable")[:k_neg]
    w = amap.shape[1]
    as_points = lambda idx: np.stack([idx // w, idx % w], -1).astype(np.int32).reshape(-1, 2)  # noqa: E731
    return as_points(pos), as_points(neg)


def mask_iou(pred, target):
    """Intersection over union of bool masks ``[..., h, w]`` (per map; 0 when both are empty)."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.dtype != np.bool_ or target.dtype != np.bool_ or pred.shape != target.shape:
        raise ValueError(f"pred and target must be bool masks of one shape, got {_describe(pred)} and "
                         f"{_describe(target)}")
    inter = np.sum(pred & target, axis=(-2, -1))
    union = np.sum(pred | target, axis=(-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def centre_prior(grid: tuple, sigma: float = 0.25):
    """The content-free baseline map ``[h, w]``: a Gaussian at the grid centre, ``sigma`` in grid widths."""
    if (not isinstance(grid, tuple) or len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid)):
        raise ValueError(f"grid must be a (h, w) tuple of positive ints, got {grid!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or sigma <= 0:
        raise ValueError(f"sigma must be a positive float, got {sigma!r}")
    h, w = grid
    y = (np.arange(h) + 0.5) / h - 0.5
    x = (np.arange(w) + 0.5) / w - 0.5
    g = np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).astype(np.float32)
