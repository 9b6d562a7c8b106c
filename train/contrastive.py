"""``python -m train.contrastive``: the P46 AdaInf experiment: SimCLR on sklearn's digits with data inflation.

Real data: the training split of ``train.images.digits(16)`` (1,437 images). "Generated" data: no generative
model exists in the project yet, so a fixed pool stands in for one (:func:`generated_pool`): ``gen_factor``
random deformations of every real training image (rotation +-15 deg, scale 0.9..1.1, shift +-1.5 px, bilinear)
plus Gaussian pixel noise (sd 0.05) and a random intensity gamma 0.7..1.4, drawn once from ``seed 1000`` and
clipped to [0, 1]: near the real distribution but visibly off it, as generated samples are. Labels are never
used in training.

Variants, all at equal steps, batch and model (same init per seed):

* ``real``: real only, strong (SimCLR) augmentation.
* ``naive``: real ∪ generated mixed 1:1 (``dup = 1``, pool = one image per real image), strong augmentation.
* ``adainf``: the same union with AdaInf's reweighting (real replicated ``dup = 10`` times) and AdaInf's weaker
  augmentation.
* ``real_weak`` (ablation): real only with AdaInf's weaker augmentation (separates the augmentation change from
  the data).

Model: a small CNN (conv3x3 32 s2 - ReLU - conv3x3 64 s2 - ReLU - conv3x3 64 - ReLU - global mean pool, 64-d
representation) with SimCLR's projector (64 -> 64 -> ReLU -> 32); NT-Xent at temperature 0.5; Adam, constant
learning rate. Metric: linear-probe accuracy on the digits test split: closed-form ridge regression (standardised
representations -> one-hot labels, ``ridge`` = 1.0) fitted on the frozen representations of the (un-augmented)
real training split. Prints one JSON line per run and a summary (mean and sample std over seeds; the paired gap to
``real`` per seed).
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

from jattn.methods.objectives.adainf import (ADAINF, DUP, STRONG, AugmentConfig, InflatedSampler, augment_batch,
                                             nt_xent_loss)
from train.images import digits

DEFAULTS = dict(seeds="0,1,2", steps=500, batch=64, lr=2e-3, temperature=0.5, gen_factor=1, dup=DUP, ridge=1.0,
                width=16, variants="real,naive,adainf,real_weak")
# variant -> (uses generated data, dup, augmentation)
VARIANTS = {"real": (False, 1, STRONG), "naive": (True, 1, STRONG), "adainf": (True, None, ADAINF),
            "real_weak": (False, 1, ADAINF)}


def generated_pool(images, gen_factor: int = 1, seed: int = 1000) -> np.ndarray:
    """``gen_factor`` deformed, noisy copies of every image ``[N, S, S, 1]`` (see the module docstring)."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, S, S, C], got shape {images.shape}")
    if isinstance(gen_factor, bool) or not isinstance(gen_factor, int) or gen_factor < 1:
        raise ValueError(f"gen_factor must be an int >= 1, got {gen_factor!r}")
    from scipy.ndimage import affine_transform

    rng = np.random.default_rng(seed)
    S = images.shape[1]
    centre = (S - 1) / 2
    out = []
    for _ in range(gen_factor):
        for img in images:
            a = np.deg2rad(rng.uniform(-15, 15))
            s = rng.uniform(0.9, 1.1)
            m = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) / s
            shift = rng.uniform(-1.5, 1.5, 2)
            offset = centre - m @ (np.array([centre, centre]) + shift)
            warped = affine_transform(img[..., 0], m, offset=offset, order=1, mode="constant")
            warped = np.clip(warped, 0, 1) ** rng.uniform(0.7, 1.4) + rng.normal(0, 0.05, warped.shape)
            out.append(np.clip(warped, 0, 1)[..., None])
    return np.stack(out).astype(np.float32)


def _conv(key, cin, cout):
    bound = 1.0 / np.sqrt(9 * cin)
    return {"w": jax.random.uniform(key, (3, 3, cin, cout), jnp.float32, -bound, bound),
            "b": jnp.zeros((cout,), jnp.float32)}


def _dense(key, din, dout):
    bound = 1.0 / np.sqrt(din)
    return {"w": jax.random.uniform(key, (din, dout), jnp.float32, -bound, bound), "b": jnp.zeros((dout,))}


@functools.partial(jax.jit, static_argnums=(1,))
def init_encoder(key, width: int = 32) -> dict:
    """Params of the CNN encoder and the projector (see the module docstring)."""
    k = jax.random.split(key, 5)
    return {"c1": _conv(k[0], 1, width), "c2": _conv(k[1], width, 2 * width), "c3": _conv(k[2], 2 * width, 2 * width),
            "p1": _dense(k[3], 2 * width, 2 * width), "p2": _dense(k[4], 2 * width, width)}


def _apply_conv(p, x, stride):
    y = jax.lax.conv_general_dilated(x, p["w"], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y + p["b"])


def represent(params, images):
    """``[N, S, S, 1] -> [N, 2 width]``: the representation the probe reads."""
    x = _apply_conv(params["c1"], images, 2)
    x = _apply_conv(params["c2"], x, 2)
    x = _apply_conv(params["c3"], x, 1)
    return jnp.mean(x, axis=(1, 2))


def project(params, h):
    return jax.nn.relu(h @ params["p1"]["w"] + params["p1"]["b"]) @ params["p2"]["w"] + params["p2"]["b"]


def ridge_probe_accuracy(train_h, train_y, test_h, test_y, ridge: float = 1.0, num_classes: int = 10) -> float:
    """Closed-form ridge regression from standardised features to one-hot labels; test accuracy of its argmax."""
    train_h, test_h = np.asarray(train_h, np.float64), np.asarray(test_h, np.float64)
    mu, sd = train_h.mean(0), train_h.std(0) + 1e-6
    a, b = (train_h - mu) / sd, (test_h - mu) / sd
    a = np.concatenate([a, np.ones((len(a), 1))], 1)
    b = np.concatenate([b, np.ones((len(b), 1))], 1)
    y = np.eye(num_classes)[np.asarray(train_y)]
    reg = ridge * np.eye(a.shape[1])
    reg[-1, -1] = 0.0  # the bias is not penalised
    w = np.linalg.solve(a.T @ a + reg, a.T @ y)
    return float(np.mean(np.argmax(b @ w, 1) == np.asarray(test_y)))


@functools.lru_cache(maxsize=4)
def _programs(lr: float, temperature: float):
    opt = optax.adam(lr)

    def loss(params, key, images, cfg):
        k1, k2 = jax.random.split(key)
        v1, v2 = augment_batch(k1, images, cfg), augment_batch(k2, images, cfg)
        z1, z2 = project(params, represent(params, v1)), project(params, represent(params, v2))
        return nt_xent_loss(z1, z2, temperature)

    @jax.jit
    def step(params, opt_state, key, pool, idx, cfg):
        value, grads = jax.value_and_grad(loss)(params, key, pool[idx], cfg)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return opt, step, jax.jit(represent)


@functools.lru_cache(maxsize=2)
def _data(gen_factor: int):
    d = digits(16)
    gen = generated_pool(d.train_images, gen_factor)
    return d, jnp.asarray(np.concatenate([d.train_images, gen])), len(d.train_images), len(gen)


def train_run(variant: str, seed: int, *, steps: int, batch: int, lr: float, temperature: float = 0.5,
              gen_factor: int = 1, dup: int = DUP, ridge: float = 1.0, width: int = 32) -> dict:
    """Pretrain one variant with SimCLR for ``steps`` steps and return its linear-probe test accuracy."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    uses_gen, v_dup, cfg = VARIANTS[variant]
    v_dup = dup if v_dup is None else v_dup
    d, pool, n_real, n_gen = _data(gen_factor)
    sampler = InflatedSampler(n_real, n_gen if uses_gen else 0, v_dup, batch_size=batch, seed=seed)
    opt, step, rep = _programs(float(lr), float(temperature))
    params = init_encoder(jax.random.PRNGKey(seed), width)
    opt_state = opt.init(params)
    cfg = AugmentConfig(*[jnp.float32(v) for v in cfg])
    key = jax.random.PRNGKey(10_000 + seed)
    start = time.time()
    losses, real_seen = [], 0
    for t in range(steps):
        idx = sampler.batch(t)
        real_seen += int(np.sum(idx < n_real))
        params, opt_state, value = step(params, opt_state, jax.random.fold_in(key, t), pool, jnp.asarray(idx), cfg)
        losses.append(value)
    acc = ridge_probe_accuracy(rep(params, jnp.asarray(d.train_images)), d.train_labels,
                               rep(params, jnp.asarray(d.test_images)), d.test_labels, ridge)
    return {"variant": variant, "seed": seed, "steps": steps, "probe_acc": acc,
            "final_loss": float(np.mean([float(v) for v in losses[-10:]])),
            "real_fraction_seen": real_seen / (steps * batch), "train_seconds": round(time.time() - start, 2)}


def random_init_probe(seed: int, ridge: float = 1.0, width: int = 32) -> float:
    """The probe on an untrained encoder (what pretraining has to beat)."""
    d = digits(16)
    params = init_encoder(jax.random.PRNGKey(seed), width)
    return ridge_probe_accuracy(represent(params, jnp.asarray(d.train_images)), d.train_labels,
                                represent(params, jnp.asarray(d.test_images)), d.test_labels, ridge)


def _stats(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def summarize(rows: list[dict]) -> dict:
    out = {}
    for variant in VARIANTS:
        sel = [r for r in rows if r["variant"] == variant]
        if sel:
            out[variant] = _stats([r["probe_acc"] for r in sel])
    base = {r["seed"]: r["probe_acc"] for r in rows if r["variant"] == "real"}
    for variant in VARIANTS:
        gaps = [r["probe_acc"] - base[r["seed"]] for r in rows if r["variant"] == variant and variant != "real"
                and r["seed"] in base]
        if gaps:
            out[f"gap_{variant}_minus_real"] = _stats(gaps)
    return out


CONFIG_KEYS = {"task": ("gen_factor", "dup", "seeds", "variants"), "model": ("width", "temperature"),
               "optim": ("lr",), "train": (("steps", "steps"), ("batch_size", "batch"))}


def config_defaults(path: str) -> dict:
    """The argparse defaults a ``configs/*.py`` file sets (its ``get_config()`` sections, see CONFIG_KEYS)."""
    from train.config import argparse_defaults

    return argparse_defaults(path, CONFIG_KEYS)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m train.contrastive", description=__doc__.split("\n")[0])
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    ap.add_argument("--config", default=None, help="a configs/*.py file whose values become the defaults")
    pre, _ = ap.parse_known_args(argv)
    if pre.config:
        ap.set_defaults(**config_defaults(pre.config))
    args = ap.parse_args(argv)
    kw = {k: getattr(args, k) for k in DEFAULTS if k not in ("seeds", "variants")}
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = []
    for seed in seeds:
        for variant in args.variants.split(","):
            row = train_run(variant, seed, **kw)
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {"config": vars(args), "summary": summarize(rows),
               "random_init_probe": _stats([random_init_probe(s, args.ridge, args.width) for s in seeds])}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
