"""DETR's set-prediction machinery (Carion et al., ECCV 2020): box algebra, the Hungarian matching cost, the
one-to-one assignment and the plain DETR set loss. Shared by the P35 DEIM objective (``deim.py``) and the tiny
detector in ``jattn/nn/detr.py`` / ``train/detection.py``; it is the baseline DEIM is compared against.

Boxes are ``(cx, cy, w, h)`` normalised to [0, 1] (DETR's parameterisation) unless a name says ``xyxy``.

* **IoU / GIoU** (:func:`box_iou`, :func:`generalized_box_iou`), elementwise with broadcasting over
  ``xyxy`` boxes: ``IoU = |A∩B| / |A∪B|``; ``GIoU = IoU - (|C| - |A∪B|) / |C|`` with ``C`` the smallest
  enclosing box. Pairwise tables come from broadcasting ``a[:, None]`` against ``b[None]``.
* **Matching cost** (:func:`matching_cost`), per image ``[Q, M]`` (queries x target slots):
  ``w_class * cost_cls + w_bbox * |b_q - b_t|_1 + w_giou * (-GIoU(b_q, b_t))``. ``class_cost="softmax"`` is
  DETR's ``-p_q(c_t)`` over a softmax that includes the no-object logit (the last of ``C + 1``);
  ``class_cost="focal"`` is the sigmoid focal cost of Deformable-DETR / RT-DETR / DEIM,
  ``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` with ``alpha=0.25, gamma=2``.
  Defaults ``w_class=1, w_bbox=5, w_giou=2`` (DETR); DEIM's matcher uses ``2, 5, 2`` with the focal cost.
* **Assignment** (:func:`hungarian_match`): ``scipy.optimize.linear_sum_assignment`` per image on the host,
  outside jit, over the first ``counts[b]`` target slots. It returns ``query_target [B, Q]`` int32: the target
  slot each query is matched to, ``-1`` for unmatched queries, the jit-friendly form the losses consume.
* **DETR set loss** (:func:`detr_set_loss`): softmax cross-entropy over ``C + 1`` classes with the no-object
  class (index ``C``) weighted ``eos_coef=0.1`` and the loss normalised by the summed class weights (PyTorch's
  ``cross_entropy(weight=...)``), plus ``L1`` and ``1 - GIoU`` of matched boxes summed and divided by the number
  of target boxes in the batch; total ``= w_class * ce + w_bbox * l1 + w_giou * giou`` with DETR's ``1, 5, 2``.

Everything except :func:`hungarian_match` is a pure, jit-able function of arrays.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_EPS = 1e-7


def _check_boxes(name, boxes):
    if not hasattr(boxes, "shape") or boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must be an array [..., 4], got {getattr(boxes, 'shape', type(boxes))}")


def cxcywh_to_xyxy(boxes):
    """``(cx, cy, w, h) -> (x0, y0, x1, y1)`` over the last axis."""
    _check_boxes("boxes", boxes)
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def xyxy_to_cxcywh(boxes):
    """``(x0, y0, x1, y1) -> (cx, cy, w, h)`` over the last axis."""
    _check_boxes("boxes", boxes)
    x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def _area(b):
    return jnp.clip(b[..., 2] - b[..., 0], 0) * jnp.clip(b[..., 3] - b[..., 1], 0)


def _iou_union(a, b):
    lt = jnp.maximum(a[..., :2], b[..., :2])
    rb = jnp.minimum(a[..., 2:], b[..., 2:])
    inter = jnp.prod(jnp.clip(rb - lt, 0), -1)
    union = _area(a) + _area(b) - inter
    return inter / jnp.maximum(union, _EPS), union


def box_iou(a, b):
    """IoU of ``xyxy`` boxes, elementwise with broadcasting (``a[:, None], b[None]`` for a table)."""
    _check_boxes("a", a)
    _check_boxes("b", b)
    return _iou_union(a, b)[0]


def generalized_box_iou(a, b):
    """GIoU ``= IoU - (|C| - |A∪B|) / |C|`` of ``xyxy`` boxes (``C`` the enclosing box), in [-1, 1]."""
    _check_boxes("a", a)
    _check_boxes("b", b)
    iou, union = _iou_union(a, b)
    hull = _area(jnp.concatenate([jnp.minimum(a[..., :2], b[..., :2]), jnp.maximum(a[..., 2:], b[..., 2:])], -1))
    return iou - (hull - union) / jnp.maximum(hull, _EPS)


def _check_targets(logits, pred_boxes, target_classes, target_boxes):
    if logits.ndim != 3:
        raise ValueError(f"logits must be [B, Q, C or C+1], got shape {logits.shape}")
    if pred_boxes.shape != logits.shape[:2] + (4,):
        raise ValueError(f"pred_boxes must be [B, Q, 4] = {logits.shape[:2] + (4,)}, got {pred_boxes.shape}")
    if target_classes.ndim != 2 or target_classes.shape[0] != logits.shape[0]:
        raise ValueError(f"target_classes must be [B={logits.shape[0]}, M], got {target_classes.shape}")
    if target_boxes.shape != target_classes.shape + (4,):
        raise ValueError(f"target_boxes must be [B, M, 4] = {target_classes.shape + (4,)}, got {target_boxes.shape}")


def matching_cost(logits, pred_boxes, target_classes, target_boxes, *, class_cost: str = "softmax",
                  w_class: float = 1.0, w_bbox: float = 5.0, w_giou: float = 2.0, alpha: float = 0.25,
                  gamma: float = 2.0):
    """DETR's matching cost ``[B, Q, M]`` between queries and (padded) target slots.

    Args:
      logits: ``[B, Q, C + 1]`` for ``class_cost="softmax"`` (last = no-object), ``[B, Q, C]`` (or ``C + 1``,
        the extra logit ignored) for ``"focal"``.
      pred_boxes: ``[B, Q, 4]`` normalised ``cxcywh``. target_boxes: ``[B, M, 4]`` normalised ``cxcywh``.
      target_classes: ``[B, M]`` int in ``[0, C)``; padded slots may hold anything (``-1``), they are ignored by
        :func:`hungarian_match` via ``counts``.
    """
    _check_targets(logits, pred_boxes, target_classes, target_boxes)
    cls = jnp.clip(target_classes, 0)
    if class_cost == "softmax":
        prob = jax.nn.softmax(logits.astype(jnp.float32), -1)
        c_cls = -jnp.take_along_axis(prob, jnp.broadcast_to(cls[:, None, :], prob.shape[:2] + cls.shape[1:]), -1)
    elif class_cost == "focal":
        p = jax.nn.sigmoid(logits.astype(jnp.float32))
        pos = alpha * (1 - p) ** gamma * -jnp.log(p + 1e-8)
        neg = (1 - alpha) * p ** gamma * -jnp.log(1 - p + 1e-8)
        idx = jnp.broadcast_to(cls[:, None, :], p.shape[:2] + cls.shape[1:])
        c_cls = jnp.take_along_axis(pos - neg, idx, -1)
    else:
        raise ValueError(f"class_cost must be 'softmax' or 'focal', got {class_cost!r}")
    c_l1 = jnp.abs(pred_boxes[:, :, None, :] - target_boxes[:, None, :, :]).sum(-1)
    c_giou = -generalized_box_iou(cxcywh_to_xyxy(pred_boxes)[:, :, None], cxcywh_to_xyxy(target_boxes)[:, None])
    return w_class * c_cls + w_bbox * c_l1 + w_giou * c_giou


def hungarian_match(cost, counts) -> np.ndarray:
    """One-to-one assignment per image (host side, scipy). Returns ``query_target [B, Q]`` int32.

    ``cost [B, Q, M]`` (any array), ``counts [B]`` the number of real targets (the first ``counts[b]`` slots);
    ``query_target[b, q]`` is the slot matched to query ``q`` or ``-1``. Needs ``Q >= counts[b]``.
    """
    from scipy.optimize import linear_sum_assignment

    cost = np.asarray(cost, np.float64)
    counts = np.asarray(counts)
    if cost.ndim != 3:
        raise ValueError(f"cost must be [B, Q, M], got shape {cost.shape}")
    if counts.shape != cost.shape[:1]:
        raise ValueError(f"counts must be [B={cost.shape[0]}], got shape {counts.shape}")
    if counts.min(initial=0) < 0 or counts.max(initial=0) > min(cost.shape[1], cost.shape[2]):
        raise ValueError(f"counts must lie in [0, min(Q, M) = {min(cost.shape[1:])}], got {counts.tolist()}")
    if not np.isfinite(cost).all():
        raise ValueError("cost holds NaN or inf: the predictions diverged")
    out = -np.ones(cost.shape[:2], np.int32)
    for b, n in enumerate(counts):
        if n:
            rows, cols = linear_sum_assignment(cost[b, :, :n])
            out[b, rows] = cols
    return out


def gather_matched(query_target, target_classes, target_boxes, num_classes: int):
    """Per-query targets: ``(classes [B, Q]`` with ``num_classes`` for unmatched, ``boxes [B, Q, 4]``,
    ``positive [B, Q]`` bool)."""
    pos = query_target >= 0
    idx = jnp.clip(query_target, 0)
    cls = jnp.take_along_axis(target_classes, idx, 1)
    boxes = jnp.take_along_axis(target_boxes, idx[..., None], 1)
    return jnp.where(pos, cls, num_classes), boxes, pos


def box_losses(pred_boxes, matched_boxes, positive, num_boxes):
    """``(L1, 1 - GIoU)`` of matched queries, each summed and divided by ``num_boxes`` (DETR)."""
    w = positive.astype(jnp.float32)
    l1 = (jnp.abs(pred_boxes - matched_boxes).sum(-1) * w).sum() / num_boxes
    giou = generalized_box_iou(cxcywh_to_xyxy(pred_boxes), cxcywh_to_xyxy(matched_boxes))
    return l1, ((1 - giou) * w).sum() / num_boxes


def detr_set_loss(logits, pred_boxes, target_classes, target_boxes, query_target, *, eos_coef: float = 0.1,
                  w_class: float = 1.0, w_bbox: float = 5.0, w_giou: float = 2.0):
    """The plain DETR loss given a matching; returns ``{"total", "ce", "l1", "giou"}``.

    ``logits [B, Q, C + 1]`` (last = no-object), ``pred_boxes [B, Q, 4]`` and ``target_boxes [B, M, 4]``
    normalised cxcywh, ``target_classes [B, M]``, ``query_target [B, Q]`` from :func:`hungarian_match`.
    """
    _check_targets(logits, pred_boxes, target_classes, target_boxes)
    if query_target.shape != logits.shape[:2]:
        raise ValueError(f"query_target must be [B, Q] = {logits.shape[:2]}, got {query_target.shape}")
    if not 0 <= eos_coef:
        raise ValueError(f"eos_coef must be >= 0, got {eos_coef}")
    C = logits.shape[-1] - 1
    cls, boxes, pos = gather_matched(query_target, target_classes, target_boxes, C)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, cls[..., None], -1)[..., 0]
    cw = jnp.where(pos, 1.0, eos_coef)
    ce = (nll * cw).sum() / jnp.maximum(cw.sum(), _EPS)
    num_boxes = jnp.maximum(pos.sum(), 1).astype(jnp.float32)
    l1, giou = box_losses(pred_boxes, boxes, pos, num_boxes)
    return {"total": w_class * ce + w_bbox * l1 + w_giou * giou, "ce": ce, "l1": l1, "giou": giou}
