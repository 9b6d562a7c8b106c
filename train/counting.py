"""Issue 18's counting table: P56 HMoDE vs a plain multi-scale head and a squeeze-excitation head, equal parameters.

Data: the procedural shapes set (``train.images.shape_image``; 32x32 RGB, 1..``max_objects`` non-overlapping
circles / squares / triangles on a textured background), ``num_train`` images of stream ``data_seed`` (indices
0..) for training and ``num_test`` held-out images (indices from 1,000,000). Images are built with
``shape_image`` rather than ``shapes`` because ``shapes`` builds captions, which fail for 5 or more objects of one
colour and kind (``NUMBER_WORDS`` stops at "four"). Ground-truth density: each object's unit mass spread uniformly
over its visible mask (so the map integrates exactly to the count), sum-pooled 2x2 to the 16x16 density
resolution, times ``density_scale`` (the official ``LOG_PARA``). Metric: count MAE (and RMSE) on the
held-out images, predicted count = ``sum(D) / density_scale``.

Backbone (shared, channels-last, ``w = width``)::

    e1 conv3x3(3->w) relu, conv3x3(w->w) relu @32 | maxpool2 | e2 conv3x3(w->2w) relu @16 = x3 | maxpool2
    | e3 conv3x3(2w->4w) relu @8 = x4 | maxpool2 | e4 conv3x3(4w->4w) relu @4 = x5
    decoder: f3 = relu conv3x3(x5) [4w @4]; f2 = relu conv3x3([x4, up f3]) [2w @8];
             f1 = relu conv3x3([x3, up f2]) [w @16]

Heads (``module``):

* ``hmode`` -- ``jattn.methods.vision.hmode.HMoDEHead`` on ``(f1, f2, f3)`` with ``x5`` gating (gate width
  ``gate_width``, level-2 gate depth ``gate2_depth``).
* ``plain`` -- the same three density heads, ``D = mean(D1, D2, D3)`` (nearest-upsampled): HMoDE with constant,
  equal gates.
* ``se`` -- ``train.vision_modules.SqueezeExcite`` (r = 4) on each of ``f1, f2, f3`` before its head, then the mean.

Every density head's last bias starts at 1.0 (``DensityHead(out_bias=1.0)``; official 0): with 0, a head whose
output ReLU starts closed everywhere never trains (seen in a first HMoDE run: D2 stuck at 0).

Parameter matching: the hidden width of the three 1x1 density heads (``head_hidden``) is the knob (parameters are
affine in it, untouched by the modules); each row is brought within 5% of ``target_params``
(``match_params``; parameters counted by ``train.vision_modules.count_params``).

Loss (the official ``train.py``'s, per image, averaged over the batch): ``sum_px (P - GT)^2`` for each supervised
map with weight ``2^(level)``: the three experts (1), HMoDE's level-1 mixtures G1..G3 (2), the final map (4);
HMoDE adds the BCE of its spatial attention (nearest-upsampled) against ``GT > 0`` summed over pixels
(``att_weight``), the expert importance loss ``cv^2`` (``imp_weight``) and optionally the relative local counting
loss on the final map (``rel_weight``, patch ``rel_patch``; 0 by default: the official trainer comments it out).
Plain and SE get the same expert and final-map terms. Adam(W) lr ``lr`` cosine to 0.1x, weight decay 0, batch
``batch_size``, ``steps`` steps, batches from ``train.data.batch_rng(seed, step, stream=56)``; initialisation from
``seed``. The data are the same for every seed.

Run: ``python -m train.counting --config configs/counting_hmode.py --config configs/counting_plain.py --config
configs/counting_se.py --out runs/counting`` (prints the markdown table last; JSON per row in ``--out``).
FLOPs: XLA's compiled cost analysis of the forward pass to the final density map on one image (``forward_flops``;
``--flops-only`` prints them without training). ``--img DIR`` saves the HMoDE row's gates, attention, experts and
density on held-out image :data:`MAP_IMAGE` from the first seed's model as ``DIR/counting_hmode.png``
(:func:`save_hmode_png`).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jattn.methods.vision.hmode import PAIRS, DensityHead, HMoDEHead, relative_local_count_loss, upsample_nearest
from train.config import add_seeds_steps_flags, fill_defaults
from train.config import read_config as load_config
from train.data import batch_rng
from train.images import shape_image
from train.vision_modules import SqueezeExcite, compiled_flops, count_params, save_panels_png

MODULES = ("hmode", "plain", "se")
CONFIG_KEYS = ("name", "module", "width", "head_hidden", "gate_width", "gate2_depth", "target_params", "steps",
               "batch_size", "lr", "seeds", "size", "max_objects", "num_train", "num_test", "data_seed",
               "density_scale", "att_weight", "imp_weight", "rel_weight", "rel_patch")
DEFAULTS = {"width": 8, "head_hidden": 32, "gate_width": 8, "gate2_depth": 5, "target_params": None, "steps": 250,
            "batch_size": 32, "lr": 1e-3, "seeds": (0, 1, 2), "size": 32, "max_objects": 6, "num_train": 1500,
            "num_test": 500, "data_seed": 0, "density_scale": 100.0, "att_weight": 1.0, "imp_weight": 1.0,
            "rel_weight": 0.0, "rel_patch": 4}
TEST_START = 1_000_000
MAP_IMAGE = 0        # the held-out image of the HMoDE map (index 1,000,000 of data stream 0: 4 objects)
PAPERS = {"hmode": "P56", "plain": "-", "se": "SE (baseline)"}


def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_float(name, value, minimum=0.0, strict=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum or (strict and
                                                                                                value <= minimum):
        raise ValueError(f"{name} must be a float {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


def check_config(config: dict) -> dict:
    """Validated config with defaults filled; unknown keys or bad values raise ``ValueError`` naming the key."""
    cfg = fill_defaults(config, DEFAULTS, CONFIG_KEYS)
    if "module" not in config:
        raise ValueError("config key 'module' is required")
    if cfg["module"] not in MODULES:
        raise ValueError(f"config key 'module' must be one of {MODULES}, got {cfg['module']!r}")
    for key in ("width", "head_hidden", "gate_width", "gate2_depth", "steps", "batch_size", "max_objects",
                "num_train", "num_test", "rel_patch"):
        cfg[key] = _check_int(f"config key {key!r}", cfg[key])
    cfg["data_seed"] = _check_int("config key 'data_seed'", cfg["data_seed"], 0)
    if cfg["size"] != 32:
        raise ValueError(f"config key 'size' must be 32 (the backbone's three pools and 16x16 density), got "
                         f"{cfg['size']!r}")
    if cfg["target_params"] is not None:
        cfg["target_params"] = _check_int("config key 'target_params'", cfg["target_params"])
    cfg["lr"] = _check_float("config key 'lr'", cfg["lr"], strict=True)
    cfg["density_scale"] = _check_float("config key 'density_scale'", cfg["density_scale"], strict=True)
    for key in ("att_weight", "imp_weight", "rel_weight"):
        cfg[key] = _check_float(f"config key {key!r}", cfg[key])
    if cfg["rel_weight"] > 0 and (16 % cfg["rel_patch"] or (16 // cfg["rel_patch"]) ** 2 < 9):
        raise ValueError(f"config key 'rel_patch' must divide 16 and leave >= 9 regions, got {cfg['rel_patch']}")
    seeds = cfg["seeds"]
    if isinstance(seeds, str):
        seeds = tuple(int(s) for s in seeds.split(","))
    if not isinstance(seeds, (tuple, list)) or not seeds:
        raise ValueError(f"config key 'seeds' must be a non-empty tuple of ints, got {cfg['seeds']!r}")
    cfg["seeds"] = tuple(_check_int("config key 'seeds'", s, 0) for s in seeds)
    cfg.setdefault("name", f"counting_{cfg['module']}")
    return cfg


# ---------------------------------------------------------------------------------------------------- data
def density_from_masks(masks, size: int = 32, pool: int = 2) -> np.ndarray:
    """``[M, S, S]`` bool object masks -> ``[S/pool, S/pool]`` density: unit mass per non-empty mask, uniform over
    its pixels, sum-pooled ``pool x pool``. Integrates to the number of non-empty masks."""
    masks = np.asarray(masks, bool)
    area = masks.sum(axis=(1, 2))
    dens = np.zeros((size, size), np.float64)
    for m, a in zip(masks, area):
        if a:
            dens += m / a
    return dens.reshape(size // pool, pool, size // pool, pool).sum(axis=(1, 3)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def counting_data(num: int, seed: int, start: int = 0, size: int = 32, max_objects: int = 6):
    """``(images [N, S, S, 3], density [N, S/2, S/2] (unscaled), counts [N])`` of shapes stream ``seed``."""
    images, dens, counts = [], [], []
    for i in range(start, start + num):
        image, _, masks, _, _, n = shape_image(seed, i, size, max_objects)
        images.append(image)
        dens.append(density_from_masks(masks, size))
        counts.append(n)
    return np.stack(images), np.stack(dens), np.asarray(counts, np.int32)


# --------------------------------------------------------------------------------------------------- model
def _conv(c_in, c_out, rngs):
    return nnx.Conv(c_in, c_out, (3, 3), rngs=rngs)


def _pool(x):
    return nnx.max_pool(x, (2, 2), strides=(2, 2))


class CountingNet(nnx.Module):
    """Backbone + head of ``module`` (module docstring): ``[B, 32, 32, 3]`` -> dict with ``density``
    ``[B, 16, 16, 1]``, ``count`` ``[B]`` (= sum of ``density``), ``experts`` ``[B, 16, 16, 3]`` and, for hmode,
    ``level1``, ``attention``, ``importance_loss``."""

    def __init__(self, module: str = "hmode", *, width: int = 16, head_hidden: int = 32, gate_width: int = 8,
                 gate2_depth: int = 5, out_bias: float = 1.0, rngs: nnx.Rngs):
        if module not in MODULES:
            raise ValueError(f"module must be one of {MODULES}, got {module!r}")
        w = _check_int("width", width, 2)
        self.module_name = module
        self.e1a, self.e1b = _conv(3, w, rngs), _conv(w, w, rngs)
        self.e2, self.e3, self.e4 = _conv(w, 2 * w, rngs), _conv(2 * w, 4 * w, rngs), _conv(4 * w, 4 * w, rngs)
        self.d3, self.d2, self.d1 = _conv(4 * w, 4 * w, rngs), _conv(8 * w, 2 * w, rngs), _conv(4 * w, w, rngs)
        chans = (w, 2 * w, 4 * w)
        if module == "hmode":
            self.head = HMoDEHead(chans, 4 * w, head_hidden=head_hidden, gate_width=gate_width,
                                  gate2_depth=gate2_depth, out_bias=out_bias, rngs=rngs)
        else:
            self.heads = nnx.List([DensityHead(c, head_hidden, out_bias=out_bias, rngs=rngs) for c in chans])
            if module == "se":
                self.se = nnx.List([SqueezeExcite(c, 4, rngs=rngs) for c in chans])

    def features(self, images):
        if not hasattr(images, "shape") or images.ndim != 4 or tuple(images.shape[1:]) != (32, 32, 3):
            raise ValueError(f"images must be [B, 32, 32, 3], got {getattr(images, 'shape', type(images).__name__)}")
        r = jax.nn.relu
        x1 = r(self.e1b(r(self.e1a(images))))
        x3 = r(self.e2(_pool(x1)))
        x4 = r(self.e3(_pool(x3)))
        x5 = r(self.e4(_pool(x4)))
        f3 = r(self.d3(x5))
        f2 = r(self.d2(jnp.concatenate([x4, upsample_nearest(f3, x4.shape[1:3])], -1)))
        f1 = r(self.d1(jnp.concatenate([x3, upsample_nearest(f2, x3.shape[1:3])], -1)))
        return (f1, f2, f3), x5

    def __call__(self, images):
        feats, x5 = self.features(images)
        if self.module_name == "hmode":
            return self.head(feats, x5)
        if self.module_name == "se":
            feats = tuple(se(f) for se, f in zip(self.se, feats))
        size = feats[0].shape[1:3]
        experts = jnp.concatenate([upsample_nearest(h(f), size) for h, f in zip(self.heads, feats)], axis=-1)
        density = jnp.mean(experts, axis=-1, keepdims=True)
        return {"density": density, "experts": experts, "count": jnp.sum(density, axis=(1, 2, 3))}


def build_model(cfg: dict, head_hidden: int | None = None, seed: int = 0) -> CountingNet:
    head_hidden = cfg["head_hidden"] if head_hidden is None else head_hidden
    return CountingNet(cfg["module"], width=cfg["width"], head_hidden=head_hidden, gate_width=cfg["gate_width"],
                       gate2_depth=cfg["gate2_depth"], rngs=nnx.Rngs(seed))


def forward_flops(model, size: int = 32) -> float:
    """FLOPs of one image's forward pass to the final density map (XLA's compiled cost analysis; the training-only
    outputs -- importance loss, level-1 maps -- are dropped by XLA when nothing reads them)."""
    return compiled_flops(model, jnp.zeros((1, size, size, 3), jnp.float32), select=lambda out: out["density"])


def _abstract_count(cfg, head_hidden):
    return count_params(nnx.eval_shape(lambda: build_model(cfg, head_hidden)))


def match_params(config: dict, target: int | None = None, tolerance: float = 0.05) -> tuple[int, int]:
    """``(head_hidden, params)`` closest to ``target`` (default ``target_params``; none -> the config's own knob);
    ``ValueError`` if no knob value lands within ``tolerance`` (relative)."""
    cfg = check_config(config)
    target = cfg["target_params"] if target is None else _check_int("target", target)
    if target is None:
        return cfg["head_hidden"], _abstract_count(cfg, cfg["head_hidden"])
    p1, p2 = _abstract_count(cfg, 1), _abstract_count(cfg, 2)
    best = max(1, int(round(1 + (target - p1) / (p2 - p1))))       # parameters are affine in the knob
    params = _abstract_count(cfg, best)
    if abs(params - target) > tolerance * target:
        raise ValueError(f"cannot match target_params={target} within {tolerance:.0%} for module "
                         f"{cfg['module']!r}: the nearest head_hidden={best} gives {params}")
    return best, params


# ---------------------------------------------------------------------------------------------------- loss
def counting_loss(out: dict, gt, cfg: dict):
    """The weighted loss of one batch (module docstring) -> ``(loss, parts)``; ``gt`` ``[B, 16, 16]`` scaled."""
    g = gt[..., None]

    def sse(p):                                 # sum over pixels, mean over the batch
        return jnp.mean(jnp.sum((p - g) ** 2, axis=(1, 2, 3)))

    experts = sum(sse(out["experts"][..., i:i + 1]) for i in range(3))
    final = sse(out["density"])
    parts = {"experts": experts, "final": final}
    loss = experts + 4.0 * final
    if "level1" in out:
        parts["level1"] = sum(sse(out["level1"][..., i:i + 1]) for i in range(3))
        target = (g > 1e-5).astype(jnp.float32)
        a = jnp.clip(upsample_nearest(out["attention"], g.shape[1:3]), 1e-10, 1 - 1e-7)
        parts["attention"] = -jnp.mean(jnp.sum(target * jnp.log(a) + (1 - target) * jnp.log(1 - a), axis=(1, 2, 3)))
        parts["importance"] = out["importance_loss"]
        loss = (loss + 2.0 * parts["level1"] + cfg["att_weight"] * parts["attention"]
                + cfg["imp_weight"] * parts["importance"])
    if cfg["rel_weight"] > 0:
        parts["rel"] = relative_local_count_loss(out["density"], g, patch=cfg["rel_patch"]) / g.shape[0]
        loss = loss + cfg["rel_weight"] * parts["rel"]
    return loss, parts


# ------------------------------------------------------------------------------------------------ training
def train_one(cfg: dict, seed: int, *, steps: int | None = None, head_hidden: int | None = None,
              log_every: int = 0):
    """Trains one model; returns ``(model, result dict)`` with the test MAE of the final map and of each expert."""
    steps = cfg["steps"] if steps is None else steps
    images, dens, _ = counting_data(cfg["num_train"], cfg["data_seed"], 0, cfg["size"], cfg["max_objects"])
    dens = dens * cfg["density_scale"]
    model = build_model(cfg, head_hidden, seed)
    graphdef, params = nnx.split(model, nnx.Param)
    opt = optax.adam(optax.cosine_decay_schedule(cfg["lr"], steps, alpha=0.1))
    opt_state = opt.init(params)

    def loss_fn(params, x, y):
        return counting_loss(nnx.merge(graphdef, params)(x), y, cfg)

    @jax.jit
    def step(params, opt_state, x, y):
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses, times = [], []
    for i in range(steps):
        idx = batch_rng(seed, i, stream=56).integers(0, len(images), cfg["batch_size"])
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, images[idx], dens[idx])
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
        if log_every and i % log_every == 0:
            print(f"  step {i} loss {losses[-1]:.3f}", flush=True)
    model = nnx.merge(graphdef, params)
    res = evaluate(model, cfg)
    res.update(seed=seed, first_loss=losses[0], final_loss=float(np.mean(losses[-10:])),
               ms_per_step=1e3 * float(np.median(times[min(5, len(times) - 1):])))
    return model, res


def evaluate(model, cfg: dict, batch_size: int = 250) -> dict:
    """Held-out MAE / RMSE of the final count and MAE of each expert's own count (D1, D2, D3)."""
    images, _, counts = counting_data(cfg["num_test"], cfg["data_seed"], TEST_START, cfg["size"], cfg["max_objects"])
    graphdef, state = nnx.split(model)

    @jax.jit
    def fn(state, x):
        out = nnx.merge(graphdef, state)(x)
        return out["count"], jnp.sum(out["experts"], axis=(1, 2))

    preds, experts = zip(*(fn(state, images[i:i + batch_size]) for i in range(0, len(images), batch_size)))
    scale = cfg["density_scale"]
    pred = np.concatenate([np.asarray(p) for p in preds]) / scale
    exp = np.concatenate([np.asarray(e) for e in experts]) / scale
    err = pred - counts
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2))),
            "expert_mae": [float(np.mean(np.abs(exp[:, i] - counts))) for i in range(3)],
            "mean_predictor_mae": float(np.mean(np.abs(counts - np.mean(counts))))}


# ---------------------------------------------------------------------------------------------------- maps
@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):            # one compile per model structure (the map and the PNG share it)
    return nnx.merge(graphdef, state)(x)


def hmode_maps(model: CountingNet, image) -> dict:
    """HMoDE's maps on one image ``[32, 32, 3]``: ``density``, ``experts`` ``[16, 16, 3]`` (D1..D3), ``attention``
    ``[4, 4]`` (level-2 spatial attention ``a``), ``w2`` ``[16, 16, 3]`` (level-2 gates over G1..G3), ``w1``
    ``[16, 16, 3, 2]`` (level-1 pair gates) and ``effective`` ``[16, 16, 3]``: each expert's total weight in the
    final map, ``sum_j w2_j w1_j[expert]`` (sums to 1 per pixel), all in density units / scale as the model
    outputs them."""
    if model.module_name != "hmode":
        raise ValueError(f"model must be the 'hmode' row, got module {model.module_name!r}")
    graphdef, state = nnx.split(model)
    out = _forward(graphdef, state, jnp.asarray(image, jnp.float32)[None])
    w1, w2 = np.asarray(out["w1"])[0], np.asarray(out["w2"])[0]
    effective = np.zeros(w2.shape, np.float64)
    for j, pair in enumerate(PAIRS):
        for slot, expert in enumerate(pair):
            effective[..., expert] += w2[..., j] * w1[..., j, slot]
    return {"density": np.asarray(out["density"])[0, ..., 0], "experts": np.asarray(out["experts"])[0],
            "attention": np.asarray(out["attention"])[0, ..., 0], "w1": w1, "w2": w2, "effective": effective}


def save_hmode_png(model: CountingNet, cfg: dict, path: str, *, title: str | None = None):
    """One PNG of :func:`hmode_maps` on held-out image :data:`MAP_IMAGE`: image, ground-truth and predicted density
    with their counts, the spatial attention; each expert's density and count; each expert's effective gate
    weight; the level-2 gates as an RGB image (R, G, B = G1 {D1, D2}, G2 {D1, D3}, G3 {D2, D3})."""
    images, dens, counts = counting_data(cfg["num_test"], cfg["data_seed"], TEST_START, cfg["size"],
                                         cfg["max_objects"])
    image, scale = images[MAP_IMAGE], cfg["density_scale"]
    m = hmode_maps(model, image)
    top = float(max(dens[MAP_IMAGE].max(), m["density"].max() / scale, m["experts"].max() / scale))
    objects = dens[MAP_IMAGE] > 0
    dmap = dict(vmin=0.0, vmax=top, cmap="viridis", outline=objects)
    panels = [{"image": image, "title": f"held-out image {MAP_IMAGE}: {counts[MAP_IMAGE]} objects"},
              {"map": dens[MAP_IMAGE], "title": f"GT density (sum {dens[MAP_IMAGE].sum():.2f})",
               **{**dmap, "outline": None}},
              {"map": m["density"] / scale, "title": f"HMoDE density (sum {m['density'].sum() / scale:.2f})", **dmap},
              {"map": m["attention"], "outline": objects, "vmin": 0, "vmax": 1,
               "title": "spatial attention a (4x4)"}]
    for i in range(3):
        panels.append({"map": m["experts"][..., i] / scale, **dmap,
                       "title": f"expert D{i + 1} (sum {m['experts'][..., i].sum() / scale:.2f})"})
    panels.append({"image": m["w2"], "title": "level-2 gates, RGB = G1, G2, G3"})
    for i in range(3):
        panels.append({"map": m["effective"][..., i], "vmin": 0, "vmax": 1, "outline": objects,
                       "title": f"D{i + 1}'s weight in the final map"})
    panels.append({"bars": m["effective"].reshape(-1, 3).mean(0), "ylim": (0, 1), "labels": ("D1", "D2", "D3"),
                   "title": "mean weight over the image"})
    save_panels_png(panels, path, title=title, cols=4)


def _mean_sd(xs):
    xs = np.asarray(xs, np.float64)
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def run_config(config: dict, *, out_dir: str | None = None, seeds=None, steps: int | None = None,
               img_dir: str | None = None) -> dict:
    """All seeds of one row -> summary (params, FLOPs, MAE mean/sd, expert MAEs, ms/step); JSON to ``out_dir``;
    the HMoDE row's maps (first seed's model) to ``img_dir/counting_hmode.png``."""
    cfg = check_config(config)
    head_hidden, params = match_params(cfg)
    seeds = cfg["seeds"] if seeds is None else tuple(seeds)
    runs = []
    for seed in seeds:
        t0 = time.time()
        model, res = train_one(cfg, seed, steps=steps, head_hidden=head_hidden)
        res["wall_s"] = time.time() - t0
        if img_dir and seed == seeds[0] and cfg["module"] == "hmode":
            png = os.path.join(img_dir, f"counting_{cfg['module']}.png")
            save_hmode_png(model, cfg, png, title=f"{cfg['name']}: seed {seed}, {steps or cfg['steps']} steps, "
                                                  f"held-out MAE {res['mae']:.3f}")
            print(f"wrote {png}", flush=True)
        print(f"[{cfg['name']}] seed {seed}: MAE {res['mae']:.3f} RMSE {res['rmse']:.3f} experts "
              f"{[round(e, 3) for e in res['expert_mae']]} loss {res['first_loss']:.1f}->{res['final_loss']:.1f} "
              f"({res['wall_s']:.0f}s)", flush=True)
        runs.append(res)
    mae, mae_sd = _mean_sd([r["mae"] for r in runs])
    rmse, rmse_sd = _mean_sd([r["rmse"] for r in runs])
    experts = [_mean_sd([r["expert_mae"][i] for r in runs]) for i in range(3)]
    summary = {"name": cfg["name"], "module": cfg["module"], "paper": PAPERS[cfg["module"]],
               "head_hidden": head_hidden, "params": params, "target_params": cfg["target_params"],
               "flops": forward_flops(build_model(cfg, head_hidden), cfg["size"]),
               "mae_mean": mae, "mae_sd": mae_sd, "rmse_mean": rmse, "rmse_sd": rmse_sd,
               "expert_mae": experts, "mean_predictor_mae": runs[0]["mean_predictor_mae"],
               "ms_per_step": float(np.median([r["ms_per_step"] for r in runs])), "steps": steps or cfg["steps"],
               "seeds": list(seeds), "runs": runs}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{cfg['name']}.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
    return summary


TABLE_HEADER = ("| head | paper | params (vs target) | FLOPs/img | steps | seeds | count MAE (mean ± sd) | RMSE | "
                "expert MAE D1 / D2 / D3 | ms/step |\n|---|---|---|---|---|---|---|---|---|---|")


def format_row(s: dict) -> str:
    match = "" if s["target_params"] is None else f" ({100 * (s['params'] / s['target_params'] - 1):+.1f}%)"
    experts = " / ".join(f"{m:.3f}" for m, _ in s["expert_mae"])
    flops = f"{s['flops'] / 1e6:.2f} M" if "flops" in s else "-"
    return (f"| {s['module']} | {s['paper']} | {s['params']:,}{match} | {flops} | {s['steps']} | {len(s['seeds'])} | "
            f"{s['mae_mean']:.3f} ± {s['mae_sd']:.3f} | {s['rmse_mean']:.3f} ± {s['rmse_sd']:.3f} | {experts} | "
            f"{s['ms_per_step']:.1f} |")


def markdown_table(summaries) -> str:
    return "\n".join([TABLE_HEADER] + [format_row(s) for s in summaries])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="configs/counting_<name>.py (repeatable)")
    parser.add_argument("--out", default="runs/counting")
    parser.add_argument("--img", default=None, help="folder for counting_hmode.png (the hmode row's first seed)")
    parser.add_argument("--flops-only", action="store_true", help="print each row's params and FLOPs; no training")
    args = add_seeds_steps_flags(parser).parse_args(argv)
    if not args.config:
        parser.error("give --config PATH (repeatable)")
    if args.flops_only:
        for p in args.config:
            cfg = check_config(load_config(p))
            head_hidden, params = match_params(cfg)
            flops = forward_flops(build_model(cfg, head_hidden), cfg["size"])
            print(f"{cfg['name']}: params {params:,}, FLOPs/img {flops / 1e6:.2f} M")
        return 0
    summaries = [run_config(load_config(p), out_dir=args.out, seeds=args.seeds, steps=args.steps, img_dir=args.img)
                 for p in args.config]
    print(f"mean-predictor MAE: {summaries[0]['mean_predictor_mae']:.3f}")
    print(markdown_table(summaries))


if __name__ == "__main__":
    main()
