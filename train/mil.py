"""MIL on digit bags: ABMIL vs P59 AEM vs P40 ACMIL at equal steps, scored by bag AUC and instance localisation.

Task (the usual MIL-MNIST construction on sklearn's real 8x8 digits, :func:`train.images.digits`): a bag holds
``min_size .. max_size`` digit images (uniform), padded to ``max_size`` with a mask. It is positive (half the
bags) iff it holds at least one ``target`` digit: a positive bag has ``1 .. max_positives`` target images, the
rest drawn from the other nine classes. Train bags draw images from the digits' train split, test bags from its
test split; bag ``index`` of a split is a pure function of ``(seed, index, split)`` (:func:`make_bag`).

Instance features: the 64 raw pixels, frozen (both papers use frozen extractor features; here the frozen
extractor is the identity and each model's learned DimReduction ``ReLU(x W_r)`` is the only feature learning).
A small training set (``task.train_bags``, default 100 bags) makes overfitting possible, the regime AEM's spec
asks for.

Metrics on ``task.test_bags`` test bags (the model's inference path: ABMIL's attention, ACMIL's slide attention
``mean_j softmax(A_j)`` without STKIM):

- ``bag_auc``: exact ROC AUC (:func:`roc_auc`) of ``p(positive)`` against the bag labels;
- ``inst_auc``: instance localisation, the ROC AUC of the attention weights against the instance labels
  (is-the-target-digit) within each positive bag that also holds a negative instance, averaged over those bags;
- ``entropy``: mean attention entropy (nats) over test bags, and ``norm_entropy`` (entropy / log n);
- ``top1_mass``: mean attention weight on each bag's highest-weighted instance (ACMIL's de-concentration).

Run one config over seeds, or the three side by side::

    python -m train.mil --config configs/mil_aem.py --seeds 0 1 2
    python -m train.mil --compare --seeds 0 1 2 3 4      # configs/mil_abmil.py, mil_aem.py, mil_acmil.py

prints one JSON line per run and a mean ± std table (docs/mil.md keeps the measured one).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jattn.methods.objectives.abmil import GatedAttentionMILPool, abmil_loss, masked_softmax
from jattn.methods.objectives.acmil import ACMIL, acmil_loss
from jattn.methods.objectives.aem import aem_total_loss
from train.images import digits

METHODS = ("abmil", "aem", "acmil")
SPLITS = {"train": 0, "test": 1}


# ----------------------------------------------------------------------------------------------- data

def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def make_bag(seed: int, index: int, split: str = "train", *, target: int = 9, min_size: int = 8,
             max_size: int = 16, max_positives: int = 2):
    """Bag ``index`` of ``split``: ``(pixels [max_size, 64] float32, mask [max_size] bool, label int,
    instance_labels [max_size] int32)``; padding rows are zero with mask False and instance label 0."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    if not 0 <= target <= 9:
        raise ValueError(f"target must be a digit 0..9, got {target!r}")
    min_size, max_size = _check_int("min_size", min_size, 2), _check_int("max_size", max_size, 2)
    max_positives = _check_int("max_positives", max_positives, 1)
    if min_size > max_size or max_positives >= min_size:
        raise ValueError(f"need max_positives < min_size <= max_size, got max_positives={max_positives}, "
                         f"min_size={min_size}, max_size={max_size}")
    data = digits(8)
    images, labels = (data.train_images, data.train_labels) if split == "train" else (data.test_images,
                                                                                        data.test_labels)
    pos_pool, neg_pool = np.flatnonzero(labels == target), np.flatnonzero(labels != target)
    rng = np.random.default_rng([int(seed), int(index), SPLITS[split], 17])
    n = int(rng.integers(min_size, max_size + 1))
    label = int(rng.random() < 0.5)
    n_pos = int(rng.integers(1, max_positives + 1)) if label else 0
    chosen = np.concatenate([rng.choice(pos_pool, n_pos, replace=False),
                             rng.choice(neg_pool, n - n_pos, replace=False)])[rng.permutation(n)]
    pixels = np.zeros((max_size, 64), np.float32)
    pixels[:n] = images[chosen].reshape(n, 64)
    mask = np.arange(max_size) < n
    inst = np.zeros(max_size, np.int32)
    inst[:n] = labels[chosen] == target
    return pixels, mask, label, inst


def digit_bags(num: int, seed: int, split: str = "train", **kwargs) -> dict:
    """Bags ``0 .. num-1`` of ``split`` stacked: ``x [num, max_size, 64]``, ``mask``, ``label [num]``, ``inst``."""
    bags = [make_bag(seed, i, split, **kwargs) for i in range(_check_int("num", num))]
    return {"x": np.stack([b[0] for b in bags]), "mask": np.stack([b[1] for b in bags]),
            "label": np.array([b[2] for b in bags], np.int32), "inst": np.stack([b[3] for b in bags])}


# -------------------------------------------------------------------------------------------- metrics

def roc_auc(scores, labels) -> float:
    """Exact ROC AUC: ``P(s_pos > s_neg) + 0.5 P(s_pos == s_neg)`` over all positive/negative pairs (the
    Mann-Whitney statistic with average ranks for ties). ``labels`` 0/1 (or bool) with both classes present."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have the same size, got {scores.shape} and {labels.shape}")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError(f"labels must be 0/1, got values {np.unique(labels)[:5]}")
    labels = labels.astype(bool)
    P, N = int(labels.sum()), int((~labels).sum())
    if P == 0 or N == 0:
        raise ValueError(f"labels must hold both classes, got {P} positives and {N} negatives")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks (1-based) over runs of tied scores
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - P * (P + 1) / 2) / (P * N))


def attention_metrics(weights, mask, inst, bag_labels) -> dict:
    """``inst_auc``, ``entropy``, ``norm_entropy``, ``top1_mass`` of instance weights ``[B, N]`` (see module doc)."""
    weights, mask, inst = np.asarray(weights, np.float64), np.asarray(mask, bool), np.asarray(inst)
    aucs = [roc_auc(w[m], y[m]) for w, m, y, lab in zip(weights, mask, inst, bag_labels)
            if lab == 1 and 0 < y[m].sum() < m.sum()]
    p = np.where(mask, weights, 0.0)
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return {"inst_auc": float(np.mean(aucs)) if aucs else float("nan"), "entropy": float(ent.mean()),
            "norm_entropy": float(np.mean(ent / np.log(mask.sum(-1)))), "top1_mass": float(p.max(-1).mean())}


# ------------------------------------------------------------------------------------- model and loss

def build_model(config: dict, seed: int):
    method, m = config["method"], config.get("model", {})
    if method not in METHODS:
        raise ValueError(f"config['method'] must be one of {METHODS}, got {method!r}")
    rngs = nnx.Rngs(seed)
    common = dict(inner_dim=m.get("inner_dim", 128), hidden=m.get("hidden", 128))
    if method == "acmil":
        return ACMIL(64, branches=m.get("branches", 5), n_masked=m.get("n_masked", 10),
                     mask_drop=m.get("mask_drop", 0.6), rngs=rngs, **common)
    return GatedAttentionMILPool(64, rngs=rngs, **common)


def loss_and_metrics(config: dict, model, batch, rng):
    """The method's training loss on ``batch`` (dict of x, mask, label) and its parts."""
    method = config["method"]
    x, mask, y = batch["x"], batch["mask"], batch["label"]
    if method == "acmil":
        branch, slide, A = model(x, mask, rng=rng, train=True)
        return acmil_loss(branch, slide, y, A, mask), {"ce": abmil_loss(slide, y)}
    bag, a = model(x, mask)
    if method == "aem":
        return aem_total_loss(bag, y, a, config.get("lam", 0.1), mask), {"ce": abmil_loss(bag, y)}
    return abmil_loss(bag, y), {"ce": abmil_loss(bag, y)}


def predict(config: dict, model, x, mask):
    """Inference: ``(p(positive) [B], instance weights [B, N])``."""
    if config["method"] == "acmil":
        _, slide, A = model(x, mask)
        return jax.nn.softmax(slide)[:, 1], jnp.mean(masked_softmax(A, mask), axis=1)
    bag, a = model(x, mask)
    return jax.nn.softmax(bag)[:, 1], masked_softmax(a, mask)


# ------------------------------------------------------------------------------------------ training

def run(config: dict, seed: int, *, log_every: int = 0) -> dict:
    """Trains ``config``'s method for ``train.steps`` AdamW steps with ``seed`` (init, batches, STKIM) and
    evaluates on the test bags. The bag sets are fixed by ``task.seed`` (the same for every seed and method)."""
    t0 = time.time()
    task, tr, opt = config.get("task", {}), config.get("train", {}), config.get("optim", {})
    bag_kw = {k: task[k] for k in ("target", "min_size", "max_size", "max_positives") if k in task}
    data_seed = task.get("seed", 0)
    train_set = digit_bags(task.get("train_bags", 100), data_seed, "train", **bag_kw)
    test_set = digit_bags(task.get("test_bags", 500), data_seed, "test", **bag_kw)
    model = build_model(config, seed)
    graphdef, params = nnx.split(model)
    optimizer = optax.adamw(opt.get("lr", 1e-3), weight_decay=opt.get("weight_decay", 1e-5))
    opt_state = optimizer.init(params)
    steps, batch_size = _check_int("train.steps", tr.get("steps", 600)), _check_int("train.batch_size",
                                                                                      tr.get("batch_size", 8))
    n_train = len(train_set["label"])

    @jax.jit
    def step(params, opt_state, batch, rng):
        def loss_of(p):
            return loss_and_metrics(config, nnx.merge(graphdef, p), batch, rng)
        (loss, parts), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, parts

    key = jax.random.key(seed)
    order_rng = np.random.default_rng([seed, 99])
    perm, pos = order_rng.permutation(n_train), 0
    for i in range(steps):
        if pos + batch_size > n_train:  # epochs of shuffled bags
            perm, pos = order_rng.permutation(n_train), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        batch = {k: jnp.asarray(train_set[k][idx]) for k in ("x", "mask", "label")}
        params, opt_state, loss, parts = step(params, opt_state, batch, jax.random.fold_in(key, i))
        if log_every and (i + 1) % log_every == 0:
            print(f"step {i + 1} loss {float(loss):.4f} ce {float(parts['ce']):.4f}", file=sys.stderr)
    model = nnx.merge(graphdef, params)
    prob, weights = jax.jit(lambda x, m: predict(config, model, x, m))(jnp.asarray(test_set["x"]),
                                                                       jnp.asarray(test_set["mask"]))
    train_prob, _ = jax.jit(lambda x, m: predict(config, model, x, m))(jnp.asarray(train_set["x"]),
                                                                       jnp.asarray(train_set["mask"]))
    out = {"name": config.get("name", config["method"]), "method": config["method"], "seed": seed,
           "steps": steps, "bag_auc": roc_auc(np.asarray(prob), test_set["label"]),
           "train_bag_auc": roc_auc(np.asarray(train_prob), train_set["label"]),
           "final_loss": float(loss)}
    out.update(attention_metrics(np.asarray(weights), test_set["mask"], test_set["inst"], test_set["label"]))
    out["seconds"] = round(time.time() - t0, 1)
    return out


def load_config(path: str) -> dict:
    spec = importlib.util.spec_from_file_location("mil_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def summarize(results: list[dict], keys=("bag_auc", "inst_auc", "entropy", "norm_entropy", "top1_mass",
                                          "train_bag_auc")) -> str:
    """A markdown table: one row per config name, ``mean ± std`` (population std over seeds) per metric."""
    names = list(dict.fromkeys(r["name"] for r in results))
    lines = ["| config | seeds | steps | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 3)]
    for name in names:
        rows = [r for r in results if r["name"] == name]
        cells = [f"{np.mean([r[k] for r in rows]):.3f} ± {np.std([r[k] for r in rows]):.3f}" for k in keys]
        lines.append(f"| {name} | {len(rows)} | {rows[0]['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", help="configs/mil_*.py (repeatable)")
    parser.add_argument("--compare", action="store_true", help="run configs/mil_abmil.py, mil_aem.py, mil_acmil.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--set", action="append", default=[], help="override, e.g. lam=1.0 or model.mask_drop=0")
    args = parser.parse_args(argv)
    paths = list(args.config or [])
    if args.compare:
        paths += [f"configs/mil_{m}.py" for m in METHODS]
    if not paths:
        parser.error("give --config or --compare")
    results = []
    for path in paths:
        config = load_config(path)
        if args.steps is not None:
            config.setdefault("train", {})["steps"] = args.steps
        for item in args.set:
            key, value = item.split("=", 1)
            *head, last = key.split(".")
            target = config
            for part in head:
                target = target.setdefault(part, {})
            target[last] = json.loads(value)
            config["name"] = config.get("name", config["method"]) + f"[{item}]"
        for seed in args.seeds:
            r = run(config, seed)
            print(json.dumps(r), flush=True)
            results.append(r)
    print(summarize(results))
    return results


if __name__ == "__main__":
    main()
