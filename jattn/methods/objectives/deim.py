"""P35 DEIM (Huang et al., CVPR 2025, "DEIM: DETR with Improved Matching for Fast Convergence"; official code
ShihuaHuang95/DEIM: engine/deim/deim_criterion.py ``loss_labels_mal`` / ``loss_labels_vfl``,
configs/base/deim.yml, engine/data/transforms/mosaic.py).

Two parts, both about giving DETR's one-to-one (Hungarian) matching more, and better-scored, positives:

* **Matchability-Aware Loss** (:func:`matchability_aware_loss`), per query x class logit ``x``, ``p = σ(x)``
  (detached where it is a weight). For a matched positive (query, GT class ``c``) with ``q = IoU(pred, GT)``
  (detached) the target is ``t = q^γ`` at ``(query, c)`` and 0 elsewhere; the weight is ``w = p^γ`` on
  negative entries (``α p^γ`` if ``alpha`` is given, the code's ``mal_alpha``) and 1 on positive entries.
  ``L = Σ BCEWithLogits(x, t) · w``, reduced as the official ``loss.mean(1).sum() * Q / num_boxes`` on
  ``[B, Q, C]``: mean over queries times ``Q``, i.e. the sum over batch, queries and classes divided by
  ``num_boxes`` (the spec's prose says "mean over classes"; the code's axis 1 is the query axis and is
  followed here). Default ``γ = 1.5``, ``alpha=None`` (deim.yml). Deviation: the code raises the whole
  target table to γ, so at ``γ = 0`` every negative's target becomes ``0^0 = 1``; here negatives keep target 0 for
  every γ (identical for ``γ > 0``), so ``γ = 0`` is plain BCE to one-hot targets.
* **VFL** (:func:`varifocal_loss`, the RT-DETR / D-FINE reference DEIM replaces): target ``q`` (not ``q^γ``),
  negative weight ``α p^γ``, positive weight ``q``; defaults ``α = 0.75, γ = 2``; same reduction.
* **Dense O2O** (:func:`mosaic`, :func:`mixup`, :func:`dense_o2o`): more targets per training image so one-to-one
  matching yields more positives. Mosaic puts four images, each resized to half size, in a 2x2 grid (boxes
  halved and shifted into their tile); MixUp blends two images ``0.5/0.5`` and keeps both box sets. In DEIM each
  is applied with probability 0.5 during an early window of training and switched off before the end.
  Deliberate deviations: the official mosaic samples a random centre and crops a 2x canvas with random scale;
  here the grid is fixed (every tile half the output size, so every box stays inside its tile), which keeps the
  32-px toy set legible. Images are numpy ``[N, S, S, C]``, boxes pixel ``xyxy`` ``[N, M, 4]``, classes
  ``[N, M]`` with ``-1`` padding, ``counts [N]``, the format of ``train.images.shapes``.

Not here: D-FINE's FGL/DDF distribution losses (``fgl 0.15, ddf 1.5``) and its deformable decoder; the toy
detector regresses boxes directly with L1 + GIoU (``bbox 5, giou 2``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _check(logits, target_classes, ious, gamma, alpha):
    if not hasattr(logits, "ndim") or logits.ndim != 3:
        raise ValueError(f"logits must be [B, Q, C], got {getattr(logits, 'shape', type(logits))}")
    if getattr(target_classes, "shape", None) != logits.shape[:2]:
        raise ValueError(f"target_classes must be [B, Q] = {logits.shape[:2]}, got "
                         f"{getattr(target_classes, 'shape', type(target_classes))}")
    if not jnp.issubdtype(target_classes.dtype, jnp.integer):
        raise TypeError(f"target_classes must be an integer array, got dtype {target_classes.dtype}")
    if getattr(ious, "shape", None) != logits.shape[:2]:
        raise ValueError(f"ious must be [B, Q] = {logits.shape[:2]}, got {getattr(ious, 'shape', type(ious))}")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if alpha is not None and not alpha >= 0:
        raise ValueError(f"alpha must be None or >= 0, got {alpha}")


def _reduce(loss, num_boxes):
    # official: loss.mean(1).sum() * Q / num_boxes on [B, Q, C]
    Q = loss.shape[1]
    nb = jnp.maximum(jnp.asarray(num_boxes, jnp.float32), 1.0)
    return loss.mean(1).sum() * Q / nb


def _bce_with_logits(x, t):
    return jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _targets(logits, target_classes, ious):
    C = logits.shape[-1]
    onehot = jax.nn.one_hot(target_classes, C, dtype=jnp.float32)  # out-of-range (-1 or C) -> all zeros
    q = jax.lax.stop_gradient(ious.astype(jnp.float32))
    return onehot, q[..., None] * onehot


def matchability_aware_loss(logits, target_classes, ious, gamma: float = 1.5, alpha: float | None = None,
                            num_boxes=None, reduction: str = "official"):
    """DEIM's MAL. ``logits [B, Q, C]``; ``target_classes [B, Q]`` int, a class in ``[0, C)`` for matched
    queries and ``-1`` or ``C`` for unmatched; ``ious [B, Q]`` the matched IoU (ignored where unmatched).

    ``num_boxes`` defaults to the number of positives. ``reduction="none"`` returns the ``[B, Q, C]`` terms.
    """
    _check(logits, target_classes, ious, gamma, alpha)
    x = logits.astype(jnp.float32)
    onehot, score = _targets(x, target_classes, ious)
    target = onehot * score ** gamma  # the official ``(q * onehot).pow(γ)`` except at γ = 0, where 0^0 = 1
    p = jax.lax.stop_gradient(jax.nn.sigmoid(x))
    neg_w = p ** gamma if alpha is None else alpha * p ** gamma
    w = neg_w * (1 - onehot) + onehot
    loss = _bce_with_logits(x, target) * w
    if reduction == "none":
        return loss
    if reduction != "official":
        raise ValueError(f"reduction must be 'official' or 'none', got {reduction!r}")
    return _reduce(loss, onehot.sum() if num_boxes is None else num_boxes)


def varifocal_loss(logits, target_classes, ious, gamma: float = 2.0, alpha: float = 0.75, num_boxes=None,
                   reduction: str = "official"):
    """VFL as in RT-DETR / D-FINE: target ``q``, weight ``α p^γ`` on negatives and ``q`` on positives."""
    _check(logits, target_classes, ious, gamma, alpha)
    x = logits.astype(jnp.float32)
    onehot, score = _targets(x, target_classes, ious)
    p = jax.lax.stop_gradient(jax.nn.sigmoid(x))
    w = alpha * p ** gamma * (1 - onehot) + score
    loss = _bce_with_logits(x, score) * w
    if reduction == "none":
        return loss
    if reduction != "official":
        raise ValueError(f"reduction must be 'official' or 'none', got {reduction!r}")
    return _reduce(loss, onehot.sum() if num_boxes is None else num_boxes)


# ---------------------------------------------------------------------------------------------------------
# Dense O2O data utilities (numpy, host side)


def _check_batch(images, boxes, classes, counts):
    images, boxes, classes, counts = (np.asarray(a) for a in (images, boxes, classes, counts))
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be [N, S, S, C], got shape {images.shape}")
    N = images.shape[0]
    if boxes.ndim != 3 or boxes.shape[0] != N or boxes.shape[2] != 4:
        raise ValueError(f"boxes must be [N={N}, M, 4], got shape {boxes.shape}")
    if classes.shape != boxes.shape[:2]:
        raise ValueError(f"classes must be [N, M] = {boxes.shape[:2]}, got shape {classes.shape}")
    if counts.shape != (N,):
        raise ValueError(f"counts must be [N={N}], got shape {counts.shape}")
    return images, boxes.astype(np.float32), classes, counts


def _half(images):
    """2x2 average pooling (exactly a half-size bilinear resize with half-pixel centres)."""
    N, S, _, C = images.shape
    if S % 2:
        raise ValueError(f"mosaic needs an even image size, got {S}")
    return images.reshape(N, S // 2, 2, S // 2, 2, C).mean((2, 4))


def _pack(box_lists, cls_lists, max_objects):
    n = len(box_lists)
    boxes = np.zeros((n, max_objects, 4), np.float32)
    classes = -np.ones((n, max_objects), np.int32)
    counts = np.zeros(n, np.int32)
    for i, (b, c) in enumerate(zip(box_lists, cls_lists)):
        k = min(len(b), max_objects)
        boxes[i, :k], classes[i, :k], counts[i] = b[:k], c[:k], k
    return boxes, classes, counts


def mosaic(images, boxes, classes, counts, max_objects: int | None = None):
    """Groups of four images -> one 2x2 mosaic each (tiles: top-left, top-right, bottom-left, bottom-right).

    Each image is halved (2x2 average pool) and its boxes ``xyxy`` halved and shifted by the tile offset, so every
    box lies inside its tile. ``N`` must be a multiple of 4; returns ``N/4`` images with ``max_objects`` slots
    (default ``4 M``)."""
    images, boxes, classes, counts = _check_batch(images, boxes, classes, counts)
    N, S = images.shape[:2]
    if N % 4:
        raise ValueError(f"mosaic takes groups of 4 images: N must be a multiple of 4, got {N}")
    M = boxes.shape[1]
    max_objects = 4 * M if max_objects is None else int(max_objects)
    small = _half(images)
    h = S // 2
    out = np.zeros((N // 4, S, S, images.shape[-1]), images.dtype)
    box_lists, cls_lists = [], []
    for g in range(N // 4):
        bl, cl = [], []
        for t in range(4):
            i = 4 * g + t
            oy, ox = (t // 2) * h, (t % 2) * h
            out[g, oy:oy + h, ox:ox + h] = small[i]
            n = counts[i]
            bl.append(boxes[i, :n] / 2 + np.array([ox, oy, ox, oy], np.float32))
            cl.append(classes[i, :n])
        box_lists.append(np.concatenate(bl))
        cls_lists.append(np.concatenate(cl))
    return (out, *_pack(box_lists, cls_lists, max_objects))


def mixup(images, boxes, classes, counts, weight: float = 0.5, max_objects: int | None = None):
    """Pairs of images -> one blend each, ``weight * a + (1 - weight) * b``, keeping both box sets."""
    images, boxes, classes, counts = _check_batch(images, boxes, classes, counts)
    N = images.shape[0]
    if N % 2:
        raise ValueError(f"mixup takes pairs of images: N must be even, got {N}")
    if not 0 <= weight <= 1:
        raise ValueError(f"weight must lie in [0, 1], got {weight}")
    M = boxes.shape[1]
    max_objects = 2 * M if max_objects is None else int(max_objects)
    a, b = images[0::2], images[1::2]
    out = (weight * a + (1 - weight) * b).astype(images.dtype)
    bl = [np.concatenate([boxes[2 * i, :counts[2 * i]], boxes[2 * i + 1, :counts[2 * i + 1]]]) for i in range(N // 2)]
    cl = [np.concatenate([classes[2 * i, :counts[2 * i]], classes[2 * i + 1, :counts[2 * i + 1]]])
          for i in range(N // 2)]
    return (out, *_pack(bl, cl, max_objects))


def dense_o2o(images, boxes, classes, counts, rng: np.random.Generator, *, mosaic_prob: float = 0.5,
              mixup_prob: float = 0.0, max_objects: int | None = None):
    """A Dense-O2O training batch of ``N`` images from a pool of ``5 N`` (the first ``N`` are the plain images).

    Each output slot is, with probability ``mosaic_prob``, a mosaic of four pool images; otherwise (with
    probability ``mixup_prob`` among the rest) a mixup of two, else the plain image. ``max_objects`` defaults
    to ``4 M``. The pool is consumed in order so the batch is a deterministic function of ``rng``."""
    images, boxes, classes, counts = _check_batch(images, boxes, classes, counts)
    if images.shape[0] % 5:
        raise ValueError(f"dense_o2o needs a pool of 5 N images, got {images.shape[0]}")
    if not (0 <= mosaic_prob <= 1 and 0 <= mixup_prob <= 1):
        raise ValueError(f"mosaic_prob and mixup_prob must lie in [0, 1], got {mosaic_prob}, {mixup_prob}")
    N = images.shape[0] // 5
    M = boxes.shape[1]
    max_objects = 4 * M if max_objects is None else int(max_objects)
    out_i = images[:N].copy()
    out_b, out_c, out_n = _pack([boxes[i, :counts[i]] for i in range(N)],
                                [classes[i, :counts[i]] for i in range(N)], max_objects)
    u = rng.uniform(size=(N, 2))
    for i in range(N):
        extra = slice(N + 4 * i, N + 4 * i + 4)
        if u[i, 0] < mosaic_prob:
            r = mosaic(images[extra], boxes[extra], classes[extra], counts[extra], max_objects)
        elif u[i, 1] < mixup_prob:
            sl = [i, N + 4 * i]
            r = mixup(images[sl], boxes[sl], classes[sl], counts[sl], 0.5, max_objects)
        else:
            continue
        out_i[i], out_b[i], out_c[i], out_n[i] = r[0][0], r[1][0], r[2][0], r[3][0]
    return out_i, out_b, out_c, out_n
