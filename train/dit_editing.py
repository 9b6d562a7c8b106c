"""Issue 16's shapes diffusion subject and the two editing experiments on it: P34 Attentive Eraser (object
removal) and P72 DiffUHaul (attention masking, shared / interpolated K-V, dragging).

Subject: :class:`jattn.nn.dit.TinyDiT`, unconditional (``num_classes=1``: every label is 0, no class dropout),
trained with :func:`train.loop.train` on ``train.images.shapes`` (32x32 RGB, patch 4 -> 8x8 = 64 tokens) by
the DDPM epsilon loss of :mod:`train.diffusion`. ``configs/dit_shapes.py`` holds the defaults; the model is
cached under ``runs/dit_shapes`` (git-ignored) and :func:`train.diffusion.load_dit` loads it.

Removal (P34). A held-out image ``x0`` (indices from ``data.heldout_start``) and the mask ``M`` of its first
object. ``x0`` is noised to ``t_start`` (``q_sample`` with a seeded ``eps``) and denoised by DDIM over the
timesteps ``<= t_start``, by

* ``plain``: the model as it is (no edit: the reconstruction the others are compared with);
* ``blend``: inpainting by mask only: after every step the latent outside ``M`` is replaced by ``x0`` noised to
  that step (RePaint/blended-diffusion style), the model untouched;
* ``aas``: blend + Attentive Eraser's AAS in layers ``[aas_layers[0], aas_layers[1])`` and denoising steps
  ``[aas_steps[0], aas_steps[1])`` (:func:`jattn.methods.generative.attentive_eraser.aas_hook`), with similarity
  suppression (``ss_scale``) while the 0-based step index is ``<= ss_steps`` (the official ``cur_step``
  convention); the token mask is the object mask dilated by one pixel, max-pooled to the 8x8 grid;
* ``aas_sarg``: blend + SARG: ``eps = eps_wo + s (eps_w - eps_wo)`` with ``s = sarg_scale``.

Metric: the mean absolute difference (over pixels and channels, [0, 1] scale) between the result and the
background-only image (:func:`background_image`, the same texture and noise without the objects) inside ``M``
(lower = more removed) and outside ``M`` (lower = better preserved), per image set, mean +- std over the
seeds (each seed: its own images and noise).

P72. (a) Attention mass that queries inside the object's token blob put on keys outside it, per layer, on the
trained model at a mid timestep, with plain attention vs :func:`~jattn.methods.generative.diffuhaul.masked_attention`
restricted to blob-to-blob / rest-to-rest (the layout masking transplanted to a DiT without layout tokens;
the reduction is by construction, and what is measured is how much leakage there was and what the masking does to
the prediction). (b) Dragging: the object's pixels are pasted ``drag_offset`` pixels away into the source
image (the old place keeps the object), the result is noised to ``t_start`` and denoised plainly vs with
DiffUHaul's attention sharing (target queries over ``[K_tgt; K_src]``), soft anchoring (``interpolate_kv``
with ``alpha`` for ``t > t_switch``) and nearest-neighbour feature copy inside the target region after; the
measure is the IoU between the object-coloured pixels of the result and the moved mask, and the fraction of
the old-only place still object-coloured.

Deliberate choices: removal and drag start from ``x0`` noised with ``q_sample`` (not DDIM inversion); the drag
toy has no layout conditioning (BlobGEN's blob tokens), so the old copy of the object is only discouraged by
masking the target's own keys there. ``python -m train.dit_editing --config configs/dit_shapes.py
--pictures docs/img`` trains (once, ~16 min on the loaded 2-core CPU) and runs all three experiments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.config import CONFIG_DIR, DEFAULTS, merge, read_config
from train.data import batch_rng
from train.diffusion import (NoiseSchedule, build_model, build_schedule, ddim_step, ddim_timesteps,
                             epsilon_loss, load_dit, q_sample, save_dit, DiffusionSubject)
from train.images import shapes

DEFAULT_DIR = os.path.join("runs", "dit_shapes")


def check_config(config: dict) -> dict:
    """Validates the keys this runner reads; returns ``config``."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    for key in ("model", "diffusion", "data", "train", "experiment"):
        if key not in config or not isinstance(config[key], dict):
            raise ValueError(f"config[{key!r}] must be a dict, got {type(config.get(key)).__name__}")
    model = config["model"]
    if model.get("channels") != 3:
        raise ValueError(f"config['model']['channels'] must be 3 (RGB shapes), got {model.get('channels')!r}")
    if model.get("image_size", 0) < 16 or model["image_size"] % model.get("patch_size", 1):
        raise ValueError(f"config['model']['image_size'] must be >= 16 and a multiple of patch_size, got "
                         f"{model.get('image_size')!r} / {model.get('patch_size')!r}")
    data = config["data"]
    if int(data.get("num_train", 0)) < 1 or int(data.get("heldout_start", 0)) < int(data["num_train"]):
        raise ValueError(f"config['data'] needs num_train >= 1 and heldout_start >= num_train (held-out images "
                         f"disjoint from training), got {data}")
    exp = config["experiment"]
    if not exp.get("seeds"):
        raise ValueError(f"config['experiment']['seeds'] must be a non-empty list, got {exp.get('seeds')!r}")
    if not 0 < int(exp.get("t_start", 0)) < int(config["diffusion"].get("num_steps", 1000)):
        raise ValueError(f"config['experiment']['t_start'] must be in (0, num_steps), got {exp.get('t_start')!r}")
    return config


# --- the training task ---------------------------------------------------------------------------------

class ShapesDiffusionTask:
    """Epsilon prediction on a fixed pool of shapes images (``train.loop`` task protocol). A batch is a pure
    function of ``(seed, step)``: images scaled to [-1, 1] (random horizontal flips), label 0, timesteps, noise."""

    seq_len = None

    def __init__(self, schedule: NoiseSchedule, *, size: int = 32, num_train: int = 4000, data_seed: int = 0,
                 max_objects: int = 3, heldout_start: int = 100000, num_eval: int = 256):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.train_images = shapes(num_train, data_seed, size=size, max_objects=max_objects).images
        self.eval_images = shapes(num_eval, data_seed, size=size, max_objects=max_objects,
                                  start=heldout_start).images
        self.alpha_bars = np.asarray(schedule.alpha_bars, np.float32)

    def batch(self, seed: int, step: int, batch_size: int, split: str = "train") -> dict:
        images = self.train_images if split == "train" else self.eval_images
        rng = batch_rng(seed, step, stream=50 if split == "train" else 51)
        x0 = images[rng.integers(0, len(images), batch_size)]
        flip = rng.random(batch_size) < 0.5
        x0 = np.where(flip[:, None, None, None], x0[:, :, ::-1], x0)
        return {"x0": (2.0 * x0 - 1.0).astype(np.float32), "labels": np.zeros(batch_size, np.int32),
                "t": rng.integers(0, self.schedule.num_steps, batch_size).astype(np.int32),
                "noise": rng.standard_normal(x0.shape).astype(np.float32)}

    def loss(self, model, batch):
        x_t = q_sample(self.alpha_bars, batch["x0"], batch["t"], batch["noise"])
        return epsilon_loss(model(x_t, batch["t"], batch["labels"]), batch["noise"]), {}


def default_config() -> dict:
    import importlib.util

    path = os.path.join(CONFIG_DIR, "dit_shapes.py")
    spec = importlib.util.spec_from_file_location("jattn_config_dit_shapes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def train_shapes_dit(config: dict | None = None, out_dir: str | None = DEFAULT_DIR, *,
                     quiet: bool = False) -> DiffusionSubject:
    """Trains the shapes TinyDiT on ``config`` (default ``configs/dit_shapes.py``); saves it under ``out_dir``
    (``None``: not saved) and returns the subject."""
    from train.loop import train

    config = check_config(merge({"train": DEFAULTS["train"], "optim": DEFAULTS["optim"]},
                                config or default_config()))
    config = merge(config, {"train": {"out_dir": out_dir}})
    model = build_model(config["model"], int(config.get("seed", 0)))
    schedule = build_schedule(config["diffusion"])
    data = config["data"]
    task = ShapesDiffusionTask(schedule, size=model.image_size, num_train=int(data["num_train"]),
                               data_seed=int(data.get("seed", 0)), max_objects=int(data.get("max_objects", 3)),
                               heldout_start=int(data["heldout_start"]))
    began = time.perf_counter()
    result = train(config, model, task, quiet=quiet)
    seconds = time.perf_counter() - began
    model = result.model()
    if out_dir is not None:
        save_dit(model, config, out_dir, step=result.step, extra={"train_seconds": seconds})
    return DiffusionSubject(model, schedule, config)


# --- held-out images and their backgrounds -------------------------------------------------------------

def background_image(seed: int, index: int, size: int = 32) -> np.ndarray:
    """The background of ``shapes`` image ``(seed, index)`` without its objects: the same texture and pixel noise
    (``train.images.shape_image`` draws them first from the same generator), ``[S, S, 3]`` in [0, 1]."""
    rng = np.random.default_rng([int(seed), int(index), 7])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    freq, phase = rng.uniform(0.2, 0.6, 2), rng.uniform(0, 2 * np.pi, 2)
    base = rng.uniform(0.35, 0.6)
    texture = base + 0.08 * np.sin(freq[0] * xx + phase[0]) * np.cos(freq[1] * yy + phase[1])
    image = np.repeat(texture[..., None], 3, axis=-1) + rng.normal(0, 0.03, (size, size, 3))
    return np.clip(image, 0, 1).astype(np.float32)


def dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Binary dilation of ``[..., S, S]`` bool masks by a ``(2 radius + 1)^2`` square."""
    out = np.asarray(mask, bool).copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            out |= np.roll(np.roll(mask, dy, axis=-2), dx, axis=-1)
    return out


def removal_set(config: dict, set_seed: int):
    """Held-out images for one seed: ``(images [n, S, S, 3], object masks [n, S, S], backgrounds [n, S, S, 3])``;
    image set ``s`` takes indices ``heldout_start + 1000 s + (0 .. n-1)`` and removes its first object."""
    data, exp = config["data"], config["experiment"]
    size = config["model"]["image_size"]
    n = int(exp["num_images"])
    start = int(data["heldout_start"]) + 1000 * int(set_seed)
    batch = shapes(n, int(data.get("seed", 0)), size=size, max_objects=int(data.get("max_objects", 3)), start=start)
    backgrounds = np.stack([background_image(int(data.get("seed", 0)), start + i, size) for i in range(n)])
    return batch.images, batch.masks[:, 0], backgrounds, batch


# --- denoising from an intermediate step, with per-step hooks -----------------------------------------

def partial_timesteps(t_start: int, steps: int) -> np.ndarray:
    """``steps`` DDIM timesteps from ``t_start`` down to 0 (descending, distinct)."""
    ts = np.unique(np.round(np.linspace(0, int(t_start), int(steps))).astype(np.int32))[::-1]
    return ts.copy()


def denoise_from(eps_of_step, x0, known, schedule: NoiseSchedule, *, t_start: int, steps: int, noise):
    """Noises ``x0 [B, S, S, C]`` (in [-1, 1]) to ``t_start`` with ``noise`` and runs DDIM (eta 0) to 0 with
    ``eps_of_step(i, x, t) -> eps``. Where ``known [B, S, S]`` is True the latent is reset after every step to
    ``x0`` noised (same ``noise``) to the next timestep (blended / RePaint-style inpainting); ``known=None``
    blends nothing. Returns the final ``x`` in [-1, 1] (numpy)."""
    ab = schedule.alpha_bars
    ts = partial_timesteps(t_start, steps)
    B = x0.shape[0]
    x = q_sample(ab, x0, jnp.full((B,), ts[0], jnp.int32), noise)
    known = jnp.zeros(x0.shape[:3], bool) if known is None else jnp.asarray(known)
    for i, t in enumerate(ts):
        eps = eps_of_step(i, x, jnp.full((B,), t, jnp.int32))
        last = i + 1 == len(ts)
        ab_prev = 1.0 if last else ab[ts[i + 1]]
        ref = x0 * np.sqrt(ab_prev) + noise * np.sqrt(1.0 - ab_prev)      # x0 noised to the next step
        x = _ddim_blend(x, eps, jnp.float32(ab[t]), jnp.float32(ab_prev), ref, known)
    return np.asarray(x)


_JIT_CACHE: dict = {}


def _cached(key, build):
    """Compiled functions cached per (model id, what): one compile per model and hook kind, not per call."""
    if key not in _JIT_CACHE:
        if len(_JIT_CACHE) > 64:
            _JIT_CACHE.clear()
        _JIT_CACHE[key] = build()
    return _JIT_CACHE[key]


def _jit_model(model):
    def build():
        graphdef, state = nnx.split(model)

        @jax.jit
        def plain(state, x, t):
            return nnx.merge(graphdef, state)(x, t, jnp.zeros(x.shape[0], jnp.int32))

        return graphdef, state, plain

    return _cached((id(model), "plain"), build)


@jax.jit
def _ddim_blend(x, eps, ab_t, ab_prev, ref, known):
    x, _ = ddim_step(x, eps, ab_t, ab_prev, clip=True)
    return jnp.where(known[..., None], ref, x)


# --- P34: removal --------------------------------------------------------------------------------------

REMOVAL_METHODS = ("plain", "blend", "aas", "aas_sarg")


def make_removal_eps(model, method: str, token_fg, *, layers, aas_steps, ss_steps: int, ss_scale: float,
                     sarg_scale: float):
    """``eps_of_step(i, x, t)`` for one removal method (see the module docstring); ``token_fg [B, N]`` bool."""
    from jattn.methods.generative.attentive_eraser import aas_hook, sarg_guidance

    if method not in REMOVAL_METHODS:
        raise ValueError(f"method must be one of {REMOVAL_METHODS}, got {method!r}")
    graphdef, state, plain = _jit_model(model)
    lo, hi = int(layers[0]), int(layers[1])

    def aas_call(state, x, t, km, suppress):
        m = nnx.merge(graphdef, state)
        fn = aas_hook(km, km if suppress else None, ss_scale if suppress else 1.0)
        return m(x, t, jnp.zeros(x.shape[0], jnp.int32), attn_fns={l: fn for l in range(lo, hi)})

    aas_jit = _cached((id(model), "aas", lo, hi, float(ss_scale)), lambda: jax.jit(aas_call, static_argnums=(4,)))
    km = jnp.asarray(token_fg)

    def eps_of_step(i, x, t):
        if method in ("plain", "blend") or not aas_steps[0] <= i < aas_steps[1]:
            return plain(state, x, t)
        eps_w = aas_jit(state, x, t, km, bool(i <= ss_steps))
        if method == "aas":
            return eps_w
        return sarg_guidance(plain(state, x, t), eps_w, sarg_scale)

    return eps_of_step


def run_removal(subject: DiffusionSubject, config: dict, *, set_seeds=None, picture: str | None = None) -> dict:
    """P34 removal on held-out image sets: per method and seed, the mean |result - background| inside and outside
    the removed object's mask ([0, 1] scale)."""
    from jattn.methods.generative.attentive_eraser import token_mask

    exp = config["experiment"]
    model = subject.model
    set_seeds = list(exp["seeds"] if set_seeds is None else set_seeds)
    per = {m: {"inside": [], "outside": []} for m in REMOVAL_METHODS}
    reference = {"inside": [], "outside": []}
    shown = None
    for s in set_seeds:
        images, masks, backgrounds, _ = removal_set(config, s)
        region = dilate(masks, 1)
        tok = token_mask(jnp.asarray(region), model.grid)
        noise = jax.random.normal(jax.random.key(1000 + int(s)), images.shape, jnp.float32)
        x0 = jnp.asarray(2.0 * images - 1.0)
        inside = masks[..., None].repeat(3, -1)
        err0 = np.abs(images - backgrounds)
        reference["inside"].append(float(err0[inside].mean()))
        reference["outside"].append(float(err0[~inside].mean()))
        results = {}
        for method in REMOVAL_METHODS:
            eps_of_step = make_removal_eps(model, method, tok, layers=exp["aas_layers"], aas_steps=exp["aas_steps"],
                                           ss_steps=int(exp["ss_steps"]), ss_scale=float(exp["ss_scale"]),
                                           sarg_scale=float(exp["sarg_scale"]))
            out = denoise_from(eps_of_step, x0, None if method == "plain" else ~region, subject.schedule,
                               t_start=int(exp["t_start"]), steps=int(exp["sample_steps"]), noise=noise)
            out = np.clip((out + 1.0) / 2.0, 0.0, 1.0)
            results[method] = out
            err = np.abs(out - backgrounds)
            per[method]["inside"].append(float(err[inside].mean()))
            per[method]["outside"].append(float(err[~inside].mean()))
        if shown is None:
            shown = (images, results, backgrounds)
    summary = {"seeds": set_seeds, "t_start": exp["t_start"], "sample_steps": exp["sample_steps"],
               "original_vs_background": _stats(reference)}
    for method in REMOVAL_METHODS:
        summary[method] = _stats(per[method])
    if picture:
        from train.diffusion import save_grid
        images, results, backgrounds = shown
        k = min(6, len(images))
        rows = [images[:k]] + [results[m][:k] for m in REMOVAL_METHODS] + [backgrounds[:k]]
        save_grid(np.concatenate(rows), picture, nrow=len(rows), scale=4)
        summary["picture"] = picture + " (rows: original, " + ", ".join(REMOVAL_METHODS) + ", background)"
    return summary


def _stats(per: dict) -> dict:
    return {key: {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4),
                  "per_seed": [round(float(x), 4) for x in v]} for key, v in per.items()}


# --- P72: leakage and dragging -------------------------------------------------------------------------

def run_leakage(subject: DiffusionSubject, config: dict, *, set_seeds=None, t: int = 300) -> dict:
    """P72 (a): per layer, the attention mass that queries inside the object's token blob put on keys outside it
    (plain model), the uniform-attention value ``1 - |blob| / N`` for scale, and the epsilon-prediction MSE of
    the plain vs the blob-masked model (``masked_attention`` with blob-to-blob / rest-to-rest in every layer;
    its leakage is 0 by construction)."""
    from jattn.methods.generative.attentive_eraser import token_mask
    from jattn.methods.generative.diffuhaul import blob_leakage, blob_mask, masked_attention

    model = subject.model
    graphdef, state = nnx.split(model)
    set_seeds = list(config["experiment"]["seeds"] if set_seeds is None else set_seeds)

    @jax.jit
    def measure(state, x0, noise, blob):
        m = nnx.merge(graphdef, state)
        B = x0.shape[0]
        tt = jnp.full((B,), t, jnp.int32)
        y = jnp.zeros(B, jnp.int32)
        x_t = q_sample(subject.schedule.alpha_bars, x0, tt, noise)
        eps, maps = m(x_t, tt, y, return_probs=True)
        mask = blob_mask(blob)
        fn = lambda q, k, v: masked_attention(q, k, v, mask)
        eps_masked = m(x_t, tt, y, attn_fns={l: fn for l in range(m.depth)})
        leak = jnp.stack([blob_leakage(p, blob) for p in maps])                 # [L, B]
        err = lambda e: jnp.mean(jnp.square(e - noise), axis=(1, 2, 3))
        return leak, err(eps), err(eps_masked)

    rows = {"leak": [], "uniform": [], "mse_plain": [], "mse_masked": []}
    for s in set_seeds:
        images, masks, _, _ = removal_set(config, s)
        blob = token_mask(jnp.asarray(masks), model.grid)
        noise = jax.random.normal(jax.random.key(2000 + int(s)), images.shape, jnp.float32)
        leak, e0, e1 = measure(state, jnp.asarray(2.0 * images - 1.0), noise, blob)
        rows["leak"].append(np.asarray(leak).mean(axis=1))
        rows["uniform"].append(float(np.mean(1.0 - np.asarray(blob).sum(1) / blob.shape[1])))
        rows["mse_plain"].append(float(np.mean(e0)))
        rows["mse_masked"].append(float(np.mean(e1)))
    leak = np.stack(rows["leak"])                                                # [seeds, L]
    return {"t": t, "seeds": set_seeds,
            "leakage_per_layer_mean": [round(float(x), 4) for x in leak.mean(0)],
            "leakage_per_layer_std": [round(float(x), 4) for x in leak.std(0)],
            "leakage_masked": 0.0,
            "uniform_attention_leakage": round(float(np.mean(rows["uniform"])), 4),
            **_stats({"eps_mse_plain": rows["mse_plain"], "eps_mse_masked": rows["mse_masked"]})}


def object_pixels(images: np.ndarray, colours: np.ndarray, tol: float = 0.25) -> np.ndarray:
    """Pixels within ``tol`` (max over channels) of each image's object colour: ``[B, S, S]`` bool."""
    from train.images import COLOUR_RGB
    rgb = COLOUR_RGB[np.asarray(colours)]                                        # [B, 3]
    return np.max(np.abs(images - rgb[:, None, None, :]), axis=-1) <= tol


def drag_set(config: dict, set_seed: int):
    """Held-out images whose first object, moved by ``drag_offset`` (or its negative), stays inside the image
    and clear of the other objects' boxes: ``(images, masks, moved masks, colours, (dx, dy) per image)``."""
    data, exp = config["data"], config["experiment"]
    size = config["model"]["image_size"]
    n = int(exp["num_images"])
    dx0, dy0 = (int(v) for v in exp["drag_offset"])
    start = int(data["heldout_start"]) + 50000 + 1000 * int(set_seed)
    batch = shapes(8 * n, int(data.get("seed", 0)), size=size, max_objects=int(data.get("max_objects", 3)),
                   start=start)
    keep, moved, offsets = [], [], []
    for i in range(len(batch.images)):
        x0, y0, x1, y1 = batch.boxes[i, 0]
        for dx, dy in ((dx0, dy0), (-dx0, -dy0)):
            nb = (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
            if nb[0] < 0 or nb[1] < 0 or nb[2] > size or nb[3] > size:
                continue
            clash = any(nb[0] < b[2] + 1 and b[0] < nb[2] + 1 and nb[1] < b[3] + 1 and b[1] < nb[3] + 1
                        for b in batch.boxes[i, 1:batch.counts[i]])
            if not clash:
                keep.append(i)
                moved.append(np.roll(np.roll(batch.masks[i, 0], dy, 0), dx, 1))
                offsets.append((dx, dy))
                break
        if len(keep) == n:
            break
    keep = np.asarray(keep)
    return batch.images[keep], batch.masks[keep, 0], np.stack(moved), batch.colours[keep, 0], offsets


def paste(images, masks, moved, offsets):
    """The object's pixels copied to the moved place (the old place keeps them): the drag's initial target."""
    out = images.copy()
    for i, (dx, dy) in enumerate(offsets):
        shifted = np.roll(np.roll(images[i], dy, 0), dx, 1)
        out[i][moved[i]] = shifted[moved[i]]
    return out


DRAG_METHODS = ("paste_plain", "paste_blend", "diffuhaul")


def make_drag_eps(model, method: str, *, old_only, new_region, src_obj, alpha: float, switch_step: int):
    """``eps_of_step(i, x, t)`` on the batch ``[source; target]`` (the source half is the source image's own
    denoising). ``diffuhaul``: in every layer the target half masks its own keys at the old-only place, and
    attends over the shared ``[K_tgt; K_src]`` (source keys at the old place visible); for steps
    ``i < switch_step`` the target K/V are first interpolated toward the source's (``alpha``), after that the
    target's K/V inside the new region are nearest-neighbour copies of the source object's tokens."""
    from jattn.methods.generative.diffuhaul import interpolate_kv, nn_copy_features
    from jattn.ops.attention import attention

    if method not in DRAG_METHODS:
        raise ValueError(f"method must be one of {DRAG_METHODS}, got {method!r}")
    graphdef, state, plain = _jit_model(model)

    def hooked(state, x, t, old_only, new_region, src_obj, early):
        m = nnx.merge(graphdef, state)

        def fn(q, k, v):
            B = q.shape[0] // 2
            qs, qt, ks, kt, vs, vt = q[:B], q[B:], k[:B], k[B:], v[:B], v[B:]
            out_s = attention(qs, ks, vs)
            if early:
                kt2, vt2 = interpolate_kv(ks, kt, vs, vt, alpha)
            else:
                B_, N, H, D = kt.shape
                kc, idx = nn_copy_features(kt.reshape(B_, N, H * D), ks.reshape(B_, N, H * D), new_region,
                                           src_region=src_obj)
                vc = jnp.take_along_axis(vs.reshape(B_, N, H * D), idx[..., None], axis=1)
                kt2 = kc.reshape(kt.shape)
                vt2 = jnp.where(new_region[..., None], vc, vt.reshape(B_, N, H * D)).reshape(vt.shape)
            own = jnp.concatenate([~old_only, jnp.ones_like(old_only)], axis=1)[:, None, None, :]
            kk = jnp.concatenate([kt2, ks], axis=1)
            vv = jnp.concatenate([vt2, vs], axis=1)
            out_t = attention(qt, kk, vv, mask=own)
            return jnp.concatenate([out_s, out_t], axis=0)

        return m(x, t, jnp.zeros(x.shape[0], jnp.int32), attn_fns={l: fn for l in range(m.depth)})

    hooked_jit = _cached((id(model), "drag", float(alpha)), lambda: jax.jit(hooked, static_argnums=(6,)))
    args = tuple(jnp.asarray(a) for a in (old_only, new_region, src_obj))

    def eps_of_step(i, x, t):
        if method != "diffuhaul":
            return plain(state, x, t)
        return hooked_jit(state, x, t, *args, bool(i < switch_step))

    return eps_of_step


def run_drag(subject: DiffusionSubject, config: dict, *, set_seeds=None, picture: str | None = None) -> dict:
    """P72 (b): dragging the first object by ``drag_offset``; IoU of the result's object-coloured pixels with the
    moved mask, and the fraction of the old-only place still object-coloured (lower = old copy removed)."""
    from jattn.methods.generative.attentive_eraser import token_mask

    exp = config["experiment"]
    model = subject.model
    set_seeds = list(exp["seeds"] if set_seeds is None else set_seeds)
    per = {m: {"iou": [], "old_residual": []} for m in DRAG_METHODS}
    ref = {"iou": [], "old_residual": []}
    ts = partial_timesteps(int(exp["t_start"]), int(exp["sample_steps"]))
    switch_step = int(round(len(ts) * (1.0 - float(exp["t_switch_frac"]))))
    shown = None

    def score(out, moved, old_only_pix, colours, into):
        obj = object_pixels(out, colours)
        inter = (obj & moved).sum((1, 2))
        union = (obj | moved).sum((1, 2))
        into["iou"].append(float(np.mean(inter / np.maximum(union, 1))))
        into["old_residual"].append(float(np.mean((obj & old_only_pix).sum((1, 2)) /
                                                  np.maximum(old_only_pix.sum((1, 2)), 1))))

    for s in set_seeds:
        images, masks, moved, colours, offsets = drag_set(config, s)
        target = paste(images, masks, moved, offsets)
        old_only_pix = masks & ~moved
        score(target, moved, old_only_pix, colours, ref)
        region = dilate(masks | moved, 1)
        tok_new = token_mask(jnp.asarray(moved), model.grid)
        tok_old = token_mask(jnp.asarray(dilate(masks, 1)), model.grid) & ~tok_new
        tok_src = token_mask(jnp.asarray(masks), model.grid)
        B = len(images)
        noise = jax.random.normal(jax.random.key(3000 + int(s)), images.shape, jnp.float32)
        both0 = jnp.asarray(2.0 * np.concatenate([images, target]) - 1.0)
        both_noise = jnp.concatenate([noise, noise])
        results = {}
        for method in DRAG_METHODS:
            eps_of_step = make_drag_eps(model, method, old_only=tok_old, new_region=tok_new, src_obj=tok_src,
                                        alpha=float(exp["alpha_early"]), switch_step=switch_step)
            known = None if method == "paste_plain" else np.concatenate([np.ones_like(region), ~region])
            out = denoise_from(eps_of_step, both0, known, subject.schedule, t_start=int(exp["t_start"]),
                               steps=int(exp["sample_steps"]), noise=both_noise)
            out = np.clip((out[B:] + 1.0) / 2.0, 0.0, 1.0)
            results[method] = out
            score(out, moved, old_only_pix, colours, per[method])
        if shown is None:
            shown = (images, target, results)
    summary = {"seeds": set_seeds, "t_start": exp["t_start"], "offset": exp["drag_offset"],
               "switch_step": switch_step, "alpha": exp["alpha_early"], "pasted_input": _stats(ref)}
    for method in DRAG_METHODS:
        summary[method] = _stats(per[method])
    if picture:
        from train.diffusion import save_grid
        images, target, results = shown
        k = min(6, len(images))
        rows = [images[:k], target[:k]] + [results[m][:k] for m in DRAG_METHODS]
        save_grid(np.concatenate(rows), picture, nrow=len(rows), scale=4)
        summary["picture"] = picture + " (rows: source, pasted target, " + ", ".join(DRAG_METHODS) + ")"
    return summary


# --- the script ----------------------------------------------------------------------------------------

def load_or_train(config: dict, out_dir: str, *, retrain: bool = False) -> DiffusionSubject:
    if not retrain and os.path.isdir(os.path.join(out_dir, "model")):
        return load_dit(out_dir)
    return train_shapes_dit(merge(config, {"train": {"resume": False}}), out_dir)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="config file (default configs/dit_shapes.py)")
    parser.add_argument("--out", default=DEFAULT_DIR, help="subject directory (trained once, then loaded)")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--only", nargs="+", default=["removal", "leakage", "drag"],
                        choices=["removal", "leakage", "drag", "samples"])
    parser.add_argument("--pictures", default=None, help="directory for the PNGs (e.g. docs/img)")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    config = check_config(default_config() if args.config is None else read_config(args.config))
    if args.steps is not None:
        config = merge(config, {"train": {"steps": args.steps},
                                "optim": {"warmup_steps": min(config["optim"].get("warmup_steps", 0),
                                                              args.steps // 10)}})
    began = time.perf_counter()
    subject = load_or_train(config, args.out, retrain=args.retrain)
    config = merge(subject.config, {"experiment": config["experiment"], "data": config["data"]})
    report = {"out": args.out, "train_steps": subject.config["train"]["steps"],
              "train_or_load_seconds": round(time.perf_counter() - began, 1)}
    pic = (lambda name: os.path.join(args.pictures, name)) if args.pictures else (lambda name: None)
    if "samples" in args.only:
        from train.diffusion import save_grid
        imgs = subject.sample(np.zeros(16, np.int32), seed=0, guidance=1.0, steps=50)
        if args.pictures:
            save_grid(imgs, pic("dit_shapes_samples.png"), nrow=2, scale=4)
        report["samples"] = {"n": 16, "picture": pic("dit_shapes_samples.png")}
    for name, fn in (("removal", run_removal), ("leakage", run_leakage), ("drag", run_drag)):
        if name in args.only:
            t0 = time.perf_counter()
            kwargs = {} if name == "leakage" else {"picture": pic(f"dit_shapes_{name}.png")}
            report[name] = fn(subject, config, **kwargs)
            report[name]["seconds"] = round(time.perf_counter() - t0, 1)
    report["total_seconds"] = round(time.perf_counter() - began, 1)
    text = json.dumps(report)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
