"""Detection on the procedural shapes set: a tiny DETR trained with the plain Hungarian set loss (DETR) or with
P35 DEIM (matchability-aware loss and/or Dense O2O), scored by mAP@0.5 on held-out images.

    python -m train.detection --config configs/detr_shapes.py      # baseline vs DEIM variants, all seeds
    python -m train.detection --config configs/deim_shapes.py

Data: ``train.images.shapes(num, seed, size=32, max_objects=3)``; boxes pixel ``(x0, y0, x1, y1)`` (exclusive
ends), 3 classes (circle, square, triangle). The training pool (``pool`` images of stream ``data_seed``) and the
test set (``test_images`` of stream ``test_seed``, a different stream) are built once; every variant of a seed
sees the same batch indices at every step (Dense O2O draws its extra mosaic tiles from the same pool).
Targets are padded to ``max_targets`` slots (12 = 4 x 3, what a mosaic can hold) for every variant.

Variants (``variant`` string): ``detr`` (softmax CE with no-object weight 0.1 + 5 L1 + 2 GIoU, softmax matching
cost 1/5/2), ``mal`` (DEIM's MAL γ=1.5 + 5 L1 + 2 GIoU, focal matching cost 2/5/2 as deim.yml), ``vfl``
(VFL α=0.75 γ=2, RT-DETR's loss, same matcher as ``mal``); a ``+o2o`` suffix turns on Dense O2O (each batch
image a 2x2 mosaic with probability ``mosaic_prob`` for the first ``o2o_until`` fraction of steps). Every
decoder layer gets the loss (DETR's auxiliary losses), matched separately.

The Hungarian assignment runs on the host: ``scipy.optimize.linear_sum_assignment`` called through
``jax.pure_callback`` from the jitted step, on the stop-gradient cost, so the forward pass runs once per step.

mAP evaluator (:func:`mean_average_precision`): per class, all detections of that class over the whole test set
are sorted by score; each is a true positive if its IoU with the best still-unmatched same-class ground truth of
its image is >= ``iou_threshold`` (greedy, VOC/COCO style), otherwise a false positive. AP is the area under the
precision-recall curve after making precision monotone (all-point interpolation, VOC 2010+); mAP is the mean over
classes that have ground truth. Post-processing (:func:`postprocess`): scores per (query, class) — softmax
without the no-object column for ``detr``, sigmoid for ``mal``/``vfl`` — and the top ``num_queries`` of the
``Q x C`` table are the detections (RT-DETR's post-processor), boxes scaled to pixels.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jattn.methods.objectives import deim, hungarian
from jattn.nn.detr import TinyDETR
from train.images import shapes

VARIANTS = ("detr", "mal", "vfl")


# --------------------------------------------------------------------------------------------------------
# mAP@0.5


def _ap(tp, scores, num_gt):
    if num_gt == 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-np.asarray(scores), kind="stable")
    tp = np.asarray(tp, np.float64)[order]
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    recall = ctp / num_gt
    precision = ctp / np.maximum(ctp + cfp, 1e-12)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def _iou_np(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-12)


def mean_average_precision(pred_boxes, pred_scores, pred_classes, gt_boxes, gt_classes, gt_counts, num_classes,
                           iou_threshold: float = 0.5):
    """mAP over classes with ground truth. Returns ``(map, per_class_ap list)`` (NaN for classes with no GT).

    Predictions ``[N, K, 4]`` xyxy, ``[N, K]`` scores (``-inf`` = no detection), ``[N, K]`` int classes; ground
    truth ``[N, M, 4]`` xyxy, ``[N, M]`` classes, ``[N]`` counts (the first ``counts[i]`` slots are real)."""
    pb, ps, pc = (np.asarray(a) for a in (pred_boxes, pred_scores, pred_classes))
    gb, gc, gn = (np.asarray(a) for a in (gt_boxes, gt_classes, gt_counts))
    if pb.ndim != 3 or pb.shape[-1] != 4 or ps.shape != pb.shape[:2] or pc.shape != pb.shape[:2]:
        raise ValueError(f"pred_boxes [N, K, 4], pred_scores and pred_classes [N, K] expected, got "
                         f"{pb.shape}, {ps.shape}, {pc.shape}")
    if gb.ndim != 3 or gb.shape[-1] != 4 or gc.shape != gb.shape[:2] or gn.shape != gb.shape[:1]:
        raise ValueError(f"gt_boxes [N, M, 4], gt_classes [N, M], gt_counts [N] expected, got "
                         f"{gb.shape}, {gc.shape}, {gn.shape}")
    if pb.shape[0] != gb.shape[0]:
        raise ValueError(f"predictions cover {pb.shape[0]} images but ground truth {gb.shape[0]}")
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must lie in (0, 1], got {iou_threshold}")
    aps = []
    for c in range(num_classes):
        tps, scores, num_gt = [], [], 0
        for i in range(pb.shape[0]):
            g = gb[i, :gn[i]][gc[i, :gn[i]] == c]
            num_gt += len(g)
            keep = (pc[i] == c) & np.isfinite(ps[i])
            d, s = pb[i][keep], ps[i][keep]
            order = np.argsort(-s, kind="stable")
            d, s = d[order], s[order]
            used = np.zeros(len(g), bool)
            ious = _iou_np(d, g) if len(g) and len(d) else np.zeros((len(d), len(g)))
            for j in range(len(d)):
                tp = 0
                if len(g):
                    cand = np.where(used, -1.0, ious[j])
                    best = int(np.argmax(cand))
                    if cand[best] >= iou_threshold:
                        used[best], tp = True, 1
                tps.append(tp)
                scores.append(s[j])
        aps.append(_ap(tps, scores, num_gt))
    valid = [a for a in aps if not np.isnan(a)]
    return (float(np.mean(valid)) if valid else float("nan")), aps


def postprocess(logits, boxes, variant: str, image_size: int, top_k: int | None = None):
    """Last-layer ``logits [B, Q, C+1]``, ``boxes [B, Q, 4]`` -> (xyxy pixels ``[B, K, 4]``, scores, classes)."""
    C = logits.shape[-1] - 1
    if variant == "detr":
        scores = jax.nn.softmax(logits, -1)[..., :C]
    else:
        scores = jax.nn.sigmoid(logits[..., :C])
    B, Q = scores.shape[:2]
    k = Q if top_k is None else top_k
    top, flat = jax.lax.top_k(scores.reshape(B, Q * C), k)
    q, c = flat // C, flat % C
    xyxy = hungarian.cxcywh_to_xyxy(jnp.take_along_axis(boxes, q[..., None], 1)) * image_size
    return xyxy, top, c


# --------------------------------------------------------------------------------------------------------
# data


def to_targets(boxes_px, classes, counts, image_size: int, max_targets: int):
    """Pixel xyxy ``[N, M, 4]`` -> normalised cxcywh padded to ``max_targets`` slots (plus classes, counts)."""
    boxes_px, classes, counts = np.asarray(boxes_px, np.float32), np.asarray(classes), np.asarray(counts)
    N, M = classes.shape
    if M > max_targets:
        raise ValueError(f"max_targets={max_targets} is smaller than the {M} target slots given")
    out_b = np.tile(np.array([0.5, 0.5, 1.0, 1.0], np.float32), (N, max_targets, 1))
    out_c = -np.ones((N, max_targets), np.int32)
    x0, y0, x1, y1 = np.moveaxis(boxes_px / image_size, -1, 0)
    cxcywh = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)
    valid = np.arange(M)[None] < counts[:, None]
    out_b[:, :M] = np.where(valid[..., None], cxcywh, out_b[:, :M])
    out_c[:, :M] = np.where(valid, classes, -1)
    return out_b, out_c, counts.astype(np.int32)


def make_batch(pool, indices, step_rng, *, dense_o2o: bool, mosaic_prob: float, max_targets: int):
    """One training batch: plain pool images ``indices``; with ``dense_o2o`` each may become a mosaic of four
    other pool images (drawn from ``step_rng``)."""
    S = pool.images.shape[1]
    imgs, bx, cl, n = pool.images[indices], pool.boxes[indices], pool.kinds[indices], pool.counts[indices]
    if dense_o2o:
        extra = step_rng.integers(0, len(pool.images), 4 * len(indices))
        allidx = np.concatenate([indices, extra])
        imgs, bx, cl, n = deim.dense_o2o(pool.images[allidx], pool.boxes[allidx], pool.kinds[allidx],
                                         pool.counts[allidx], step_rng, mosaic_prob=mosaic_prob,
                                         max_objects=max_targets)
    b, c, n = to_targets(bx, cl, n, S, max_targets)
    return imgs.astype(np.float32), b, c, n


# --------------------------------------------------------------------------------------------------------
# training


def _match_host(cost, counts):
    cost, counts = np.asarray(cost), np.asarray(counts)
    return np.stack([hungarian.hungarian_match(c, counts) for c in cost]).astype(np.int32)


def match(cost, counts):
    """Hungarian matching of a ``[L, B, Q, M]`` cost from jitted code (``jax.pure_callback`` to scipy)."""
    out = jax.ShapeDtypeStruct(cost.shape[:3], jnp.int32)
    return jax.pure_callback(_match_host, out, jax.lax.stop_gradient(cost), counts)


def detection_loss(all_logits, all_boxes, tgt_boxes, tgt_classes, counts, variant: str, *, gamma=None,
                   alpha=None):
    """Loss summed over decoder layers, each matched separately. Returns ``(total, last-layer parts dict)``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "detr":
        cost = jax.vmap(lambda l, b: hungarian.matching_cost(l, b, tgt_classes, tgt_boxes))(all_logits, all_boxes)
    else:
        cost = jax.vmap(lambda l, b: hungarian.matching_cost(l[..., :-1], b, tgt_classes, tgt_boxes,
                                                             class_cost="focal", w_class=2.0))(all_logits, all_boxes)
    qt = match(cost, counts)
    total, parts = 0.0, {}
    for layer in range(all_logits.shape[0]):
        logits, boxes = all_logits[layer], all_boxes[layer]
        if variant == "detr":
            parts = hungarian.detr_set_loss(logits, boxes, tgt_classes, tgt_boxes, qt[layer])
        else:
            C = logits.shape[-1] - 1
            cls, mboxes, pos = hungarian.gather_matched(qt[layer], tgt_classes, tgt_boxes, C)
            ious = hungarian.box_iou(hungarian.cxcywh_to_xyxy(boxes), hungarian.cxcywh_to_xyxy(mboxes))
            ious = jnp.where(pos, ious, 0.0)
            nb = jnp.maximum(pos.sum(), 1).astype(jnp.float32)
            if variant == "mal":
                cls_loss = deim.matchability_aware_loss(logits[..., :C], cls, ious, gamma=1.5 if gamma is None else gamma,
                                                        alpha=alpha, num_boxes=nb)
            else:
                cls_loss = deim.varifocal_loss(logits[..., :C], cls, ious, gamma=2.0 if gamma is None else gamma,
                                               alpha=0.75 if alpha is None else alpha, num_boxes=nb)
            l1, giou = hungarian.box_losses(boxes, mboxes, pos, nb)
            parts = {"total": cls_loss + 5.0 * l1 + 2.0 * giou, "cls": cls_loss, "l1": l1, "giou": giou}
        total = total + parts["total"]
    return total, parts


def build(cfg: dict, seed: int):
    m = cfg["model"]
    model = TinyDETR(num_classes=3, image_size=cfg["data"]["size"], dim=m["dim"], num_heads=m["heads"],
                     num_queries=m["queries"], num_encoder_layers=m["encoder_layers"],
                     num_decoder_layers=m["decoder_layers"], query_mode=m.get("query_mode", "learned"),
                     rngs=nnx.Rngs(seed))
    o = cfg["optim"]
    key = (o["lr"], o["warmup"], o["clip"], o["weight_decay"])
    if key not in _TX_CACHE:  # one transformation object per setting: it is static in the optimizer's graphdef,
        # so a fresh one per seed would make nnx.jit recompile the step for every run
        sched = optax.join_schedules([optax.linear_schedule(0.0, o["lr"], o["warmup"]),
                                      optax.constant_schedule(o["lr"])], [o["warmup"]])
        _TX_CACHE[key] = optax.chain(optax.clip_by_global_norm(o["clip"]),
                                     optax.adamw(sched, weight_decay=o["weight_decay"]))
    return model, nnx.Optimizer(model, _TX_CACHE[key], wrt=nnx.Param)


_TX_CACHE: dict = {}


@partial(nnx.jit, static_argnames=("variant",))
def train_step(model, optimizer, images, tgt_boxes, tgt_classes, counts, variant):
    def loss_fn(model):
        logits, boxes = model(images)
        return detection_loss(logits, boxes, tgt_boxes, tgt_classes, counts, variant)

    (loss, parts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, parts


@partial(nnx.jit, static_argnames=("variant", "image_size"))
def _predict(model, images, variant, image_size):
    logits, boxes = model(images)
    return postprocess(logits[-1], boxes[-1], variant, image_size)


def evaluate(model, test, variant: str, batch_size: int = 100):
    S = test.images.shape[1]
    outs = [_predict(model, jnp.asarray(test.images[i:i + batch_size]), variant, S)
            for i in range(0, len(test.images), batch_size)]
    pb, ps, pc = (np.concatenate([np.asarray(o[j]) for o in outs]) for j in range(3))
    return mean_average_precision(pb, ps, pc, test.boxes, test.kinds, test.counts, 3)[0]


def run(cfg: dict, variant_spec: str, seed: int, pool=None, test=None, log=None):
    """Trains one variant (``detr``/``mal``/``vfl`` with optional ``+o2o``) for one seed; returns
    ``{"variant", "seed", "map": {step: mAP@0.5}, "loss": [...], "seconds"}``."""
    base, _, extra = variant_spec.partition("+")
    if base not in VARIANTS or extra not in ("", "o2o"):
        raise ValueError(f"variant must be one of {VARIANTS} optionally followed by '+o2o', got {variant_spec!r}")
    d, t = cfg["data"], cfg["train"]
    if cfg["model"]["queries"] < d["max_targets"]:
        raise ValueError(f"model.queries={cfg['model']['queries']} must be >= data.max_targets="
                         f"{d['max_targets']} (one-to-one matching needs a query per target)")
    if pool is None:
        pool = shapes(d["pool"], d["data_seed"], size=d["size"], max_objects=3)
    if test is None:
        test = shapes(d["test_images"], d["test_seed"], size=d["size"], max_objects=3)
    model, optimizer = build(cfg, seed)
    rng = np.random.default_rng([seed, 17])
    o2o_rng = np.random.default_rng([seed, 35])
    steps, eval_at = t["steps"], set(t["eval_at"])
    maps, losses, start = {}, [], time.time()
    for step in range(1, steps + 1):
        idx = rng.integers(0, len(pool.images), t["batch_size"])
        use_o2o = extra == "o2o" and step <= t["o2o_until"] * steps
        imgs, b, c, n = make_batch(pool, idx, o2o_rng, dense_o2o=use_o2o, mosaic_prob=t["mosaic_prob"],
                                   max_targets=d["max_targets"])
        loss, _ = train_step(model, optimizer, jnp.asarray(imgs), jnp.asarray(b), jnp.asarray(c),
                             jnp.asarray(n), base)
        losses.append(float(loss))
        if step in eval_at:
            maps[step] = evaluate(model, test, base)
            if log:
                log(f"{variant_spec} seed={seed} step={step} loss={losses[-1]:.3f} mAP50={maps[step]:.3f} "
                    f"({time.time() - start:.0f}s)")
    return {"variant": variant_spec, "seed": seed, "map": maps, "loss": losses, "seconds": time.time() - start}


def load_config(path: str) -> dict:
    spec = importlib.util.spec_from_file_location("_detection_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--variants", default=None, help="comma list overriding the config's variants")
    p.add_argument("--seeds", default=None, help="comma list overriding the config's seeds")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--eval-at", default=None, help="comma list overriding train.eval_at")
    p.add_argument("--out", default=None, help="JSONL file for per-run results")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    if args.steps is not None:
        cfg["train"]["steps"] = args.steps
    if args.eval_at is not None:
        cfg["train"]["eval_at"] = [int(s) for s in args.eval_at.split(",")]
    variants = (args.variants or cfg["variants"]).split(",")
    seeds = [int(s) for s in (args.seeds or cfg["seeds"]).split(",")]
    d = cfg["data"]
    pool = shapes(d["pool"], d["data_seed"], size=d["size"], max_objects=3)
    test = shapes(d["test_images"], d["test_seed"], size=d["size"], max_objects=3)
    results = []
    for seed in seeds:
        for v in variants:
            r = run(cfg, v, seed, pool, test, log=lambda s: print(s, flush=True))
            results.append(r)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({k: r[k] for k in ("variant", "seed", "map", "seconds")}) + "\n")
    print("\nvariant        " + "  ".join(f"step {s:>4}" for s in cfg["train"]["eval_at"]))
    for v in variants:
        rs = [r for r in results if r["variant"] == v]
        cells = []
        for s in cfg["train"]["eval_at"]:
            vals = np.array([r["map"][s] for r in rs])
            cells.append(f"{vals.mean():.3f}±{vals.std():.3f}")
        print(f"{v:<14} " + "  ".join(cells) + f"   (n={len(rs)} seeds)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
