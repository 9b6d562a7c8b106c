"""``python -m train.anomaly``: the P54 FOD experiment: one-class anomaly detection on sklearn's digits.

Task: ``train.images.digits(16)``; one digit class is *normal*. The reconstructor is trained only on the normal
class's training images; every test image (all ten classes, the fixed stratified split) is scored and the image
AUROC of normal (negative) vs the other nine classes (positive) is reported.

Features (no pretrained CNN can be downloaded, so raw pixels stand in for FOD's frozen WideResNet features):
each 16x16 image is cut into 6x6 patches at stride 4 (zero padding 1), a 4x4 grid of 36-dim patch tokens
(:func:`patch_features`; ``--patch 4 --stride 2`` gives an 8x8 grid of 16-dim tokens, about 10x the CPU time per
step), plus a constant channel ``bias = 1`` (``--bias 0`` drops it: blank patches are then zero vectors whose
cosine term is a constant 1, which made the digit 1, mostly background, look anomalous: AUROC 0.07 for ``rec``).
The reference ``ref`` is the mean normal training feature at each position.

Variants, at equal budget (same model, same init per seed, same batches, same steps):

* ``plain``: the official code's reconstruction-only model (``with_intra = with_inter = False``): each layer is
  ``x + self-attention(x)`` (no inter branch, no reference), trained on reconstruction, reconstruction score.
* ``rec``: the I2Correlation transformer trained on reconstruction only (``lambda1 = lambda2 = 0``); scored by
  the reconstruction score alone (the brief's baseline: the same transformer without the FOD losses).
* ``fod``: the same transformer trained with the FOD minimax losses (``lambda1 = lambda2 = 0.5``), scored by
  ``rec_score * inter_score`` (FOD's score); ``fod_recscore`` is the same trained model scored by the
  reconstruction score alone (which part of any gain is the score, which the training).

``--task texture`` runs the spec's own check instead (:func:`texture_images`, :func:`texture_run`): train on 200
stationary smooth-noise textures, test on 100 normal and 100 with a pasted rough-texture square; pixel AUROC of the
patch score maps upsampled bilinearly to 16x16.

An image's score is the mean of its patch scores (``--reduce max`` takes the max, as FOD does after upsampling
and blurring). Adam, constant learning rate. ``python -m train.anomaly --help`` lists the sizes; the default
(10 classes x 3 seeds x 3 variants) takes about 10 minutes on a busy 2-core CPU. Prints one JSON line per run and
a summary (mean and sample std over seeds, per class and over classes).
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.metrics import roc_auc_score

from jattn.methods.objectives.fod import fod_anomaly_score, fod_forward, fod_losses, init_fod, reference_features
from train.images import digits

DEFAULTS = dict(classes="0,1,2,3,4,5,6,7,8,9", seeds="0,1,2", steps=200, batch=16, lr=1e-3, d_model=32, heads=4,
                layers=2, lambda1=0.5, lambda2=0.5, patch=6, stride=4, size=16, reduce="mean", bias=1.0)
VARIANTS = ("plain", "rec", "fod")


def patch_features(images, patch: int = 4, stride: int = 2) -> np.ndarray:
    """``[N, S, S, C]`` images -> ``[N, g*g, patch*patch*C]`` patch tokens (row-major grid), zero padding
    ``(patch - stride) // 2`` so that ``g = S // stride``."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, S, S, C], got shape {images.shape}")
    if patch < stride or (patch - stride) % 2:
        raise ValueError(f"patch - stride must be even and >= 0, got patch={patch}, stride={stride}")
    pad = (patch - stride) // 2
    x = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    N, S, C = images.shape[0], images.shape[1], images.shape[3]
    g = S // stride
    out = np.empty((N, g, g, patch * patch * C), np.float32)
    for i in range(g):
        for j in range(g):
            out[:, i, j] = x[:, i * stride:i * stride + patch, j * stride:j * stride + patch].reshape(N, -1)
    return out.reshape(N, g * g, -1)


def one_class_split(normal_class: int, size: int = 16, patch: int = 4, stride: int = 2, bias: float = 1.0):
    """Features of the normal class's training images, all test images and the test anomaly labels.

    ``bias`` (when nonzero) is appended to every token as a constant channel: a blank patch is otherwise the
    zero vector, whose cosine term ``1 - cos`` is 1 whatever the reconstruction (torch's cosine of a zero vector
    is 0), so images with much background (the digit 1) would score as anomalous for no reason."""
    if not 0 <= normal_class <= 9:
        raise ValueError(f"normal_class must be a digit 0..9, got {normal_class!r}")
    d = digits(size)
    train_x = patch_features(d.train_images[d.train_labels == normal_class], patch, stride)
    test_x = patch_features(d.test_images, patch, stride)
    if bias:
        train_x, test_x = (np.concatenate([f, np.full(f.shape[:-1] + (1,), bias, np.float32)], -1)
                           for f in (train_x, test_x))
    return train_x, test_x, (d.test_labels != normal_class).astype(np.int32), size // stride


@functools.lru_cache(maxsize=8)
def _programs(grid: int, heads: int, lr: float, with_inter: bool = True):
    """The jitted train step and scorer for one configuration (shared by every seed, class and variant: the loss
    weights are traced arguments)."""
    opt = optax.adam(lr)
    kw = dict(num_heads=heads, grid_hw=(grid, grid), with_inter=with_inter)

    def loss(params, x, ref, lambda1, lambda2):
        out, maps = fod_forward(params, x, ref, **kw)
        parts = fod_losses(out, x, maps, lambda1=lambda1, lambda2=lambda2)
        return parts["total"], parts

    @jax.jit
    def step(params, opt_state, x, ref, lambda1, lambda2):
        (_, parts), grads = jax.value_and_grad(loss, has_aux=True)(params, x, ref, lambda1, lambda2)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, parts

    @jax.jit
    def score(params, x, ref):
        out, maps = fod_forward(params, x, ref, **kw)
        return fod_anomaly_score(out, x, maps), fod_anomaly_score(out, x, maps, use_inter=False)

    return opt, step, score


def _fit(variant, train_x, grid, seed, *, steps, batch, lr, d_model, heads, layers, lambda1, lambda2, stream):
    """Train one variant on ``train_x [N, L, C]``; return ``(params, ref, score_fn, final_losses)``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    ref = jnp.asarray(reference_features(train_x))
    l1, l2 = (float(lambda1), float(lambda2)) if variant == "fod" else (0.0, 0.0)
    l1, l2 = jnp.float32(l1), jnp.float32(l2)
    opt, step, score = _programs(grid, heads, float(lr), variant != "plain")
    params = init_fod(jax.random.PRNGKey(seed), train_x.shape[-1], (grid, grid), d_model=d_model, num_heads=heads,
                      num_layers=layers)
    opt_state = opt.init(params)
    rng = np.random.default_rng([seed, stream])
    parts = {}
    for _ in range(steps):
        idx = rng.choice(len(train_x), size=min(batch, len(train_x)), replace=False)
        params, opt_state, parts = step(params, opt_state, jnp.asarray(train_x[idx]), ref, l1, l2)
    return params, ref, score, {k: float(v) for k, v in parts.items()}


def train_run(variant: str, normal_class: int, seed: int, *, steps: int, batch: int, lr: float, d_model: int,
              heads: int, layers: int, lambda1: float = 0.5, lambda2: float = 0.5, patch: int = 4, stride: int = 2,
              size: int = 16, reduce: str = "mean", bias: float = 1.0) -> dict:
    """Train one variant for one normal class and seed; return its test AUROCs and final losses."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    train_x, test_x, test_y, grid = one_class_split(normal_class, size, patch, stride, bias)
    start = time.time()
    params, ref, score, final = _fit(variant, train_x, grid, seed, steps=steps, batch=batch, lr=lr, d_model=d_model,
                                     heads=heads, layers=layers, lambda1=lambda1, lambda2=lambda2,
                                     stream=normal_class)
    fod_s, rec_s = (np.asarray(s) for s in score(params, jnp.asarray(test_x), ref))
    agg = (lambda s: s.mean(1)) if reduce == "mean" else (lambda s: s.max(1))
    row = {"variant": variant, "normal_class": normal_class, "seed": seed, "steps": steps,
           "train_seconds": round(time.time() - start, 2), "final": final}
    if variant == "fod":
        row["auroc"] = float(roc_auc_score(test_y, agg(fod_s)))
        row["auroc_recscore"] = float(roc_auc_score(test_y, agg(rec_s)))
    else:
        row["auroc"] = float(roc_auc_score(test_y, agg(rec_s)))
    return row


def texture_images(num: int, seed: int, size: int = 16, anomalous: bool = False):
    """The spec's synthetic texture set: stationary smooth noise (Gaussian-filtered white noise, sigma 1 px,
    standardised to mean 0.5, sd 0.15); an anomalous image has one pasted square (side 4..6 px, random place) of
    rougher texture (sigma 0.3 px, sd 0.25). Returns ``(images [N, S, S, 1], masks [N, S, S] bool)``."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng([seed, int(anomalous), 54])
    images, masks = [], []
    for _ in range(num):
        base = gaussian_filter(rng.normal(size=(size, size)), 1.0, mode="wrap")
        img = 0.5 + 0.15 * (base - base.mean()) / base.std()
        mask = np.zeros((size, size), bool)
        if anomalous:
            side = int(rng.integers(4, 7))
            y, x = rng.integers(0, size - side + 1, 2)
            rough = gaussian_filter(rng.normal(size=(side, side)), 0.3)
            img[y:y + side, x:x + side] = 0.5 + 0.25 * (rough - rough.mean()) / (rough.std() + 1e-6)
            mask[y:y + side, x:x + side] = True
        images.append(np.clip(img, 0, 1)[..., None])
        masks.append(mask)
    return np.stack(images).astype(np.float32), np.stack(masks)


def texture_run(variant: str, seed: int, *, steps: int, batch: int, lr: float, d_model: int, heads: int,
                layers: int, lambda1: float = 0.5, lambda2: float = 0.5, patch: int = 4, stride: int = 2,
                size: int = 16, bias: float = 1.0, num_train: int = 200, num_test: int = 100, **_) -> dict:
    """The spec's check: train on normal textures, score ``num_test`` normal + ``num_test`` anomalous images;
    pixel AUROC of the patch score maps upsampled bilinearly to the image (``--task texture``)."""
    from train.images import upsample

    train_img, _ = texture_images(num_train, 1000 + seed, size)
    normal, m0 = texture_images(num_test, 2000 + seed, size)
    anomalous, m1 = texture_images(num_test, 3000 + seed, size, anomalous=True)
    feats = lambda im: np.concatenate([patch_features(im, patch, stride)] +
                                      ([np.full((len(im), (size // stride) ** 2, 1), bias, np.float32)]
                                       if bias else []), -1)
    grid = size // stride
    params, ref, score, final = _fit(variant, feats(train_img), grid, seed, steps=steps, batch=batch, lr=lr,
                                     d_model=d_model, heads=heads, layers=layers, lambda1=lambda1, lambda2=lambda2,
                                     stream=54)
    test = np.concatenate([normal, anomalous])
    masks = np.concatenate([m0, m1]).ravel()
    pix = lambda s: upsample(np.asarray(s).reshape(-1, grid, grid, 1), size).ravel()
    fod_s, rec_s = score(params, jnp.asarray(feats(test)), ref)
    row = {"task": "texture", "variant": variant, "seed": seed, "steps": steps, "final": final}
    if variant == "fod":
        row["pixel_auroc"] = float(roc_auc_score(masks, pix(fod_s)))
        row["pixel_auroc_recscore"] = float(roc_auc_score(masks, pix(rec_s)))
    else:
        row["pixel_auroc"] = float(roc_auc_score(masks, pix(rec_s)))
    return row


def _stats(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def summarize(rows: list[dict]) -> dict:
    """Mean and sample std over seeds per (variant, class), and over all runs of a variant; the paired gap
    fod - rec per (class, seed)."""
    out: dict = {}
    keys = [("plain", "auroc"), ("rec", "auroc"), ("fod", "auroc"), ("fod", "auroc_recscore")]
    for variant, field in keys:
        name = variant if field == "auroc" else "fod_recscore"
        sel = [r for r in rows if r["variant"] == variant and field in r]
        if not sel:
            continue
        out[name] = {"all": _stats([r[field] for r in sel])}
        for c in sorted({r["normal_class"] for r in sel}):
            out[name][f"class{c}"] = _stats([r[field] for r in sel if r["normal_class"] == c])
    base = {(r["normal_class"], r["seed"]): r["auroc"] for r in rows if r["variant"] == "rec"}
    gaps = [r["auroc"] - base[(r["normal_class"], r["seed"])] for r in rows
            if r["variant"] == "fod" and (r["normal_class"], r["seed"]) in base]
    if gaps:
        out["gap_fod_minus_rec"] = _stats(gaps)
    plain = {(r["normal_class"], r["seed"]): r["auroc"] for r in rows if r["variant"] == "plain"}
    gaps = [r["auroc"] - plain[(r["normal_class"], r["seed"])] for r in rows
            if r["variant"] == "fod" and (r["normal_class"], r["seed"]) in plain]
    if gaps:
        out["gap_fod_minus_plain"] = _stats(gaps)
    return out


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


CONFIG_KEYS = {"task": ("size", "patch", "stride", "classes", "seeds", "reduce", "bias"),
               "model": ("d_model", "heads", "layers", "lambda1", "lambda2"), "optim": ("lr",),
               "train": (("steps", "steps"), ("batch_size", "batch"))}


def config_defaults(path: str) -> dict:
    """The argparse defaults a ``configs/*.py`` file sets (its ``get_config()`` sections, see CONFIG_KEYS)."""
    from train.config import argparse_defaults

    return argparse_defaults(path, CONFIG_KEYS)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m train.anomaly", description=__doc__.split("\n")[0])
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--task", default="digits", choices=("digits", "texture"),
                    help="digits: one-class image AUROC; texture: the spec's pasted-patch pixel AUROC")
    ap.add_argument("--config", default=None, help="a configs/*.py file whose values become the defaults")
    pre, _ = ap.parse_known_args(argv)
    if pre.config:
        ap.set_defaults(**config_defaults(pre.config))
    args = ap.parse_args(argv)
    kw = {k: getattr(args, k) for k in DEFAULTS if k not in ("classes", "seeds")}
    rows = []
    if args.task == "texture":
        kw.pop("reduce")
        for seed in _ints(args.seeds):
            for variant in args.variants.split(","):
                row = texture_run(variant, seed, **kw)
                print(json.dumps(row), flush=True)
                rows.append(row)
        out = {}
        for variant, field in (("plain", "pixel_auroc"), ("rec", "pixel_auroc"), ("fod", "pixel_auroc"),
                               ("fod", "pixel_auroc_recscore")):
            vals = [r[field] for r in rows if r["variant"] == variant]
            if vals:
                out[variant if field == "pixel_auroc" else "fod_recscore"] = _stats(vals)
        summary = {"config": vars(args), "summary": out}
        print(json.dumps(summary), flush=True)
        return summary
    for c in _ints(args.classes):
        for seed in _ints(args.seeds):
            for variant in args.variants.split(","):
                row = train_run(variant, c, seed, **kw)
                print(json.dumps(row), flush=True)
                rows.append(row)
    summary = {"config": vars(args), "summary": summarize(rows)}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
