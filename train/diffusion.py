"""DDPM training and DDPM/DDIM sampling with classifier-free guidance for :class:`jattn.nn.dit.TinyDiT` on
sklearn's real digits (``train.images.digits(16)``): issue 16's trained diffusion subject.

The computation (Ho et al. 2020; Song et al. 2021 for DDIM; Ho & Salimans 2022 for guidance):

* schedule: ``linear`` betas ``linspace(beta_start, beta_end, T)`` (1e-4, 0.02, T=1000) or ``cosine``
  (Nichol & Dhariwal: ``alpha_bar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2)`` normalised, betas clipped at
  0.999); ``alpha_bar_t = prod_{s<=t} (1 - beta_s)``.
* training: images scaled to ``[-1, 1]``; ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``,
  ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``; loss ``mean((eps_theta(x_t, t, y) - eps)^2)``
  with the label replaced by the null class with probability ``p_uncond = 0.1`` (class dropout).
* guidance: ``eps = eps(x, t, null) + w * (eps(x, t, y) - eps(x, t, null))``: ``w = 0`` is the unconditional
  model, ``w = 1`` the conditional one, ``w > 1`` guided.
* DDPM ancestral step: ``x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)`` (clipped to [-1, 1] by default),
  ``x_{t-1} = c0 x0 + ct x_t + sqrt(beta~_t) z`` with ``c0 = sqrt(ab_{t-1}) beta_t / (1 - ab_t)``,
  ``ct = sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t)``, ``beta~_t = beta_t (1 - ab_{t-1}) / (1 - ab_t)``, no
  noise at ``t = 0``.
* DDIM step (over ``steps`` evenly spaced timesteps): ``x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev -
  sigma^2) eps + sigma z``, ``sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)``,
  ``ab_prev = 1`` after the last step; ``eta = 0`` is deterministic.

Training runs through :func:`train.loop.train` (:class:`DigitDiffusionTask` follows its task protocol:
``batch(seed, step, batch_size, split)`` and a pure ``loss(model, batch)``), so logs, orbax checkpoints and
resume are the loop's. The finished model's parameters are saved on their own (``<out>/model``, with the
model and schedule config in the checkpoint's metadata) and :func:`load_dit` rebuilds the subject in one
line. ``python -m train.diffusion`` trains the default subject into ``runs/dit_digits`` (once: a later call
loads it), samples a class-per-row grid, and scores the samples with :mod:`train.digit_classifier`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.checkpoint import Checkpointer
from train.config import CONFIG_DIR, DEFAULTS, merge, read_config
from train.data import batch_rng
from train.images import digits

SCHEDULE_KINDS = ("linear", "cosine")
DEFAULT_DIR = os.path.join("runs", "dit_digits")


def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_float(name, value, lo=None, hi=None):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite float in [{lo}, {hi}], got {value!r}")
    return value


# --- the noise schedule -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """``betas [T]`` (float64) and what follows from them."""
    betas: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> np.ndarray:
        return 1.0 - self.betas

    @property
    def alpha_bars(self) -> np.ndarray:
        return np.cumprod(self.alphas)


def make_noise_schedule(kind: str = "linear", num_steps: int = 1000, *, beta_start: float = 1e-4,
                        beta_end: float = 0.02, cosine_s: float = 0.008) -> NoiseSchedule:
    """The DDPM ``linear`` schedule or the ``cosine`` one (see module docstring)."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"kind must be one of {SCHEDULE_KINDS}, got {kind!r}")
    T = _check_int("num_steps", num_steps, 2)
    if kind == "linear":
        beta_start = _check_float("beta_start", beta_start, 0.0, 1.0)
        beta_end = _check_float("beta_end", beta_end, 0.0, 1.0)
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"beta_start, beta_end must satisfy 0 < beta_start <= beta_end < 1, got "
                             f"{beta_start}, {beta_end}")
        return NoiseSchedule(np.linspace(beta_start, beta_end, T, dtype=np.float64))
    s = _check_float("cosine_s", cosine_s, 0.0, 1.0)
    steps = np.arange(T + 1, dtype=np.float64) / T
    f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
    alpha_bar = f / f[0]
    return NoiseSchedule(np.clip(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.0, 0.999))


def q_sample(alpha_bars, x0, t, noise):
    """``x_t = sqrt(ab[t]) x0 + sqrt(1 - ab[t]) noise`` for ``x0, noise [B, ...]`` and ``t [B]``."""
    ab = jnp.asarray(alpha_bars, jnp.float32)[t].reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def epsilon_loss(eps_pred, noise):
    """The DDPM "simple" loss: ``mean((eps_pred - noise)^2)`` over every element."""
    if eps_pred.shape != noise.shape:
        raise ValueError(f"eps_pred and noise must have the same shape, got {eps_pred.shape} and {noise.shape}")
    return jnp.mean(jnp.square(eps_pred.astype(jnp.float32) - noise.astype(jnp.float32)))


def drop_labels(labels: np.ndarray, uniform: np.ndarray, p_uncond: float, null_class: int) -> np.ndarray:
    """Class dropout: ``labels`` where ``uniform >= p_uncond``, ``null_class`` elsewhere (``uniform`` in [0, 1))."""
    p_uncond = _check_float("p_uncond", p_uncond, 0.0, 1.0)
    labels, uniform = np.asarray(labels), np.asarray(uniform)
    if labels.shape != uniform.shape:
        raise ValueError(f"labels and uniform must have the same shape, got {labels.shape} and {uniform.shape}")
    return np.where(uniform < p_uncond, null_class, labels).astype(np.int32)


def guided_eps(eps_cond, eps_uncond, w):
    """Classifier-free guidance ``eps_uncond + w * (eps_cond - eps_uncond)``."""
    return eps_uncond + w * (eps_cond - eps_uncond)


# --- the training task ---------------------------------------------------------------------------------

class DigitDiffusionTask:
    """Epsilon prediction on ``digits(size)`` (``train.loop`` task protocol). A batch is a pure function of
    ``(seed, step)``: images (train split; ``split="eval"`` reads the test split) scaled to [-1, 1], labels
    after class dropout, timesteps and noise; the loss forms ``x_t`` in the jitted step."""

    seq_len = None

    def __init__(self, schedule: NoiseSchedule, *, size: int = 16, p_uncond: float = 0.1, num_classes: int = 10):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.p_uncond = _check_float("p_uncond", p_uncond, 0.0, 1.0)
        self.num_classes = _check_int("num_classes", num_classes)
        self.data = digits(_check_int("size", size, 8))
        self.alpha_bars = np.asarray(schedule.alpha_bars, np.float32)

    def batch(self, seed: int, step: int, batch_size: int, split: str = "train") -> dict:
        images, labels = ((self.data.train_images, self.data.train_labels) if split == "train"
                          else (self.data.test_images, self.data.test_labels))
        rng = batch_rng(seed, step, stream=40 if split == "train" else 41)
        idx = rng.integers(0, len(labels), batch_size)
        return {"x0": (2.0 * images[idx] - 1.0).astype(np.float32),
                "labels": drop_labels(labels[idx], rng.random(batch_size), self.p_uncond, self.num_classes),
                "t": rng.integers(0, self.schedule.num_steps, batch_size).astype(np.int32),
                "noise": rng.standard_normal(images[idx].shape).astype(np.float32)}

    def loss(self, model, batch):
        x_t = q_sample(self.alpha_bars, batch["x0"], batch["t"], batch["noise"])
        loss = epsilon_loss(model(x_t, batch["t"], batch["labels"]), batch["noise"])
        return loss, {}


# --- samplers ------------------------------------------------------------------------------------------

def ddim_timesteps(num_train_steps: int, steps: int) -> np.ndarray:
    """``steps`` evenly spaced training timesteps, descending, ending at 0 (``steps <= num_train_steps``)."""
    steps = _check_int("steps", steps)
    if steps > num_train_steps:
        raise ValueError(f"steps must be <= the schedule's {num_train_steps} steps, got {steps}")
    return np.round(np.linspace(0, num_train_steps - 1, steps)).astype(np.int32)[::-1].copy()


def ddim_step(x, eps, ab_t, ab_prev, *, eta: float = 0.0, noise=None, clip: bool = False):
    """One DDIM update from ``x_t`` to ``x_prev`` given ``eps`` (see module docstring); returns ``(x_prev, x0)``."""
    x0 = (x - jnp.sqrt(1.0 - ab_t) * eps) / jnp.sqrt(ab_t)
    if clip:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (x - jnp.sqrt(ab_t) * x0) / jnp.sqrt(1.0 - ab_t)
    sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab_t)) * jnp.sqrt(1.0 - ab_t / ab_prev)
    x_prev = jnp.sqrt(ab_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma ** 2, 0.0)) * eps
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def ddim_sample(eps_fn: Callable, x_T, schedule: NoiseSchedule, *, steps: int = 50, eta: float = 0.0,
                key=None, clip: bool = True):
    """DDIM from ``x_T`` with ``eps_fn(x, t [B]) -> eps`` over ``steps`` timesteps; ``eta > 0`` needs ``key``."""
    eta = _check_float("eta", eta, 0.0, 1.0)
    if eta > 0 and key is None:
        raise ValueError("eta > 0 adds noise: key must be a jax.random key, got None")
    ts = ddim_timesteps(schedule.num_steps, steps)
    ab = schedule.alpha_bars
    ab_t = jnp.asarray(ab[ts], jnp.float32)
    ab_prev = jnp.asarray(np.concatenate([ab[ts[1:]], [1.0]]), jnp.float32)
    keys = jax.random.split(key if key is not None else jax.random.key(0), len(ts))
    B = x_T.shape[0]

    def body(x, inputs):
        t, a, a_prev, k = inputs
        eps = eps_fn(x, jnp.full((B,), t, jnp.int32))
        noise = jax.random.normal(k, x.shape, x.dtype) if eta > 0 else None
        x, _ = ddim_step(x, eps, a, a_prev, eta=eta, noise=noise, clip=clip)
        return x, None

    x, _ = jax.lax.scan(body, x_T, (jnp.asarray(ts), ab_t, ab_prev, keys))
    return x


def ddpm_step(x, eps, beta_t, ab_t, ab_prev, *, noise=None, clip: bool = True):
    """One ancestral DDPM step (posterior mean from the predicted ``x0``, variance ``beta~_t``)."""
    x0 = (x - jnp.sqrt(1.0 - ab_t) * eps) / jnp.sqrt(ab_t)
    if clip:
        x0 = jnp.clip(x0, -1.0, 1.0)
    c0 = jnp.sqrt(ab_prev) * beta_t / (1.0 - ab_t)
    ct = jnp.sqrt(1.0 - beta_t) * (1.0 - ab_prev) / (1.0 - ab_t)
    mean = c0 * x0 + ct * x
    if noise is None:
        return mean
    return mean + jnp.sqrt(beta_t * (1.0 - ab_prev) / (1.0 - ab_t)) * noise


def ddpm_sample(eps_fn: Callable, x_T, schedule: NoiseSchedule, *, key, clip: bool = True):
    """Ancestral sampling over all ``T`` steps (``T - 1 .. 0``; no noise added at ``t = 0``)."""
    if key is None:
        raise ValueError("key must be a jax.random key, got None")
    T = schedule.num_steps
    ts = np.arange(T - 1, -1, -1, dtype=np.int32)
    ab = schedule.alpha_bars
    ab_prev_all = np.concatenate([[1.0], ab[:-1]])
    xs = (jnp.asarray(ts), jnp.asarray(schedule.betas[ts], jnp.float32), jnp.asarray(ab[ts], jnp.float32),
          jnp.asarray(ab_prev_all[ts], jnp.float32), jax.random.split(key, T))
    B = x_T.shape[0]

    def body(x, inputs):
        t, beta, a, a_prev, k = inputs
        eps = eps_fn(x, jnp.full((B,), t, jnp.int32))
        noise = jax.random.normal(k, x.shape, x.dtype) * (t > 0)
        return ddpm_step(x, eps, beta, a, a_prev, noise=noise, clip=clip), None

    x, _ = jax.lax.scan(body, x_T, xs)
    return x


def model_eps_fn(model, labels, guidance: float, **call_kwargs) -> Callable:
    """``eps_fn(x, t)`` of ``model`` for ``labels [B]`` with guidance ``w`` (one batched call of ``2B``: the
    conditional and the null-class halves). ``call_kwargs`` (``prob_mods``, ``attn_fns``) go to every call."""
    labels = jnp.asarray(labels, jnp.int32)
    null = jnp.full_like(labels, model.null_class)

    def eps_fn(x, t):
        both = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([labels, null]),
                     **call_kwargs)
        cond, uncond = jnp.split(both, 2)
        return guided_eps(cond, uncond, guidance)

    return eps_fn


SAMPLERS = ("ddim", "ddpm")


def sample(model, schedule: NoiseSchedule, labels, *, seed: int = 0, guidance: float = 2.0, sampler: str = "ddim",
           steps: int = 50, eta: float = 0.0, clip: bool = True, **call_kwargs) -> np.ndarray:
    """Images ``[B, S, S, C]`` in [0, 1] for ``labels [B]`` (jit-compiled; ``call_kwargs`` go to the model)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    guidance = _check_float("guidance", guidance, 0.0, None)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D int array, got shape {labels.shape} dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() > model.null_class:
        raise ValueError(f"labels must be in [0, {model.null_class}], got values in [{labels.min()}, {labels.max()}]")
    graphdef, state = nnx.split(model)
    shape = (len(labels), model.image_size, model.image_size, model.channels)

    @jax.jit
    def run(state, key):
        m = nnx.merge(graphdef, state)
        init_key, loop_key = jax.random.split(key)
        x_T = jax.random.normal(init_key, shape, jnp.float32)
        eps_fn = model_eps_fn(m, labels, guidance, **call_kwargs)
        if sampler == "ddim":
            return ddim_sample(eps_fn, x_T, schedule, steps=steps, eta=eta, key=loop_key, clip=clip)
        return ddpm_sample(eps_fn, x_T, schedule, key=loop_key, clip=clip)

    x = run(state, jax.random.key(seed))
    return np.clip((np.asarray(x) + 1.0) / 2.0, 0.0, 1.0)


# --- pictures ------------------------------------------------------------------------------------------

def save_grid(images, path: str, *, nrow: int, scale: int = 4, pad: int = 1) -> str:
    """Writes ``images [N, S, S, 1|3]`` in [0, 1] as a PNG grid of ``nrow`` rows (row-major), upscaled by
    ``scale`` (nearest) with ``pad`` pixels of gap; returns ``path``."""
    from PIL import Image

    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, S, S, 1 or 3], got shape {images.shape}")
    nrow = _check_int("nrow", nrow)
    scale, pad = _check_int("scale", scale), _check_int("pad", pad, 0)
    N, H, W, C = images.shape
    ncol = -(-N // nrow)
    grid = np.ones((nrow * (H + pad) + pad, ncol * (W + pad) + pad, C), np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = img
    grid = np.kron(grid, np.ones((scale, scale, 1), np.float32))
    pixels = (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(pixels[..., 0] if C == 1 else pixels).save(path)
    return path


# --- the trained subject -------------------------------------------------------------------------------

def default_config() -> dict:
    """``configs/dit_digits.py``'s config (the default subject)."""
    return read_config(os.path.join(CONFIG_DIR, "dit_digits.py"))


def build_model(model_cfg: dict, seed: int = 0):
    from jattn.nn.dit import TinyDiT
    cfg = dict(model_cfg)
    cfg.pop("kind", None)
    return TinyDiT(rngs=nnx.Rngs(seed), **cfg)


def build_schedule(diffusion_cfg: dict) -> NoiseSchedule:
    return make_noise_schedule(diffusion_cfg.get("schedule", "linear"), diffusion_cfg.get("num_steps", 1000),
                               **{k: diffusion_cfg[k] for k in ("beta_start", "beta_end", "cosine_s")
                                  if k in diffusion_cfg})


@dataclasses.dataclass
class DiffusionSubject:
    """A trained (or fresh) TinyDiT with its noise schedule and config."""
    model: Any
    schedule: NoiseSchedule
    config: dict

    def sample(self, labels, **kwargs) -> np.ndarray:
        """:func:`sample` with this subject's model and schedule."""
        return sample(self.model, self.schedule, labels, **kwargs)


def train_dit(config: dict | None = None, out_dir: str = DEFAULT_DIR, *, quiet: bool = False) -> DiffusionSubject:
    """Trains a TinyDiT with :func:`train.loop.train` on ``config`` (default: ``configs/dit_digits.py``),
    saves the parameters under ``out_dir/model`` and returns the subject."""
    from train.loop import train

    config = merge({"train": DEFAULTS["train"], "optim": DEFAULTS["optim"]}, config or default_config())
    config = merge(config, {"train": {"out_dir": out_dir}})
    seed = int(config.get("seed", 0))
    model = build_model(config["model"], seed)
    schedule = build_schedule(config["diffusion"])
    task = DigitDiffusionTask(schedule, size=model.image_size, p_uncond=config["diffusion"].get("p_uncond", 0.1),
                              num_classes=model.num_classes)
    began = time.perf_counter()
    result = train(config, model, task, quiet=quiet)
    seconds = time.perf_counter() - began
    model = result.model()
    save_dit(model, config, out_dir, step=result.step, extra={"train_seconds": seconds})
    return DiffusionSubject(model, schedule, config)


def save_dit(model, config: dict, out_dir: str, *, step: int = 0, extra: dict | None = None) -> str:
    """Saves ``model``'s parameters under ``out_dir/model`` with ``config`` in the metadata."""
    directory = os.path.join(out_dir, "model")
    with Checkpointer(directory, max_to_keep=1) as ckpt:
        ckpt.delete_all()
        ckpt.save(step, nnx.state(model, nnx.Param),
                  {"config": json.loads(json.dumps(config)), **(extra or {})})
    return directory


def load_dit(path: str = DEFAULT_DIR) -> DiffusionSubject:
    """The subject trained into ``path`` (by :func:`train_dit` or ``python -m train.diffusion``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a directory path, got {type(path).__name__}")
    directory = os.path.join(os.fspath(path), "model")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"path={os.fspath(path)!r} holds no trained TinyDiT (no {directory}); train one "
                                f"with `python -m train.diffusion --out {os.fspath(path)}`")
    with Checkpointer(directory) as ckpt:
        config = ckpt.read_meta()["config"]
        model = build_model(config["model"], int(config.get("seed", 0)))
        params, _ = ckpt.restore(nnx.state(model, nnx.Param))
    nnx.update(model, params)
    return DiffusionSubject(model, build_schedule(config["diffusion"]), config)


def default_dit(path: str = DEFAULT_DIR) -> DiffusionSubject:
    """The cached default subject: loads ``path``, training it first (minutes on a CPU) if it is absent."""
    if os.path.isdir(os.path.join(path, "model")):
        return load_dit(path)
    return train_dit(default_config(), path)


# --- the experiment ------------------------------------------------------------------------------------

def evaluate_samples(subject: DiffusionSubject, classifier, *, per_class: int = 20, guidance: float = 2.0,
                     sampler: str = "ddim", steps: int = 50, seed: int = 0) -> dict:
    """Samples ``per_class`` images of every class and scores them with ``classifier``."""
    from train.digit_classifier import classify_samples

    num_classes = subject.model.num_classes
    labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    began = time.perf_counter()
    images = subject.sample(labels, seed=seed, guidance=guidance, sampler=sampler, steps=steps)
    seconds = time.perf_counter() - began
    per_class_acc = classify_samples(images, labels, classifier)
    return {"images": images, "labels": labels, "per_class": per_class_acc,
            "accuracy": float(np.mean(per_class_acc)), "sample_seconds": seconds}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_DIR, help="subject directory (trained once, then loaded)")
    parser.add_argument("--retrain", action="store_true", help="train even if --out holds a model")
    parser.add_argument("--config", default=None, help="config file to train from (default configs/dit_digits.py)")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--seed", type=int, default=None, help="override the training seed")
    parser.add_argument("--guidance", type=float, nargs="+", default=[2.0])
    parser.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--grid", default=None, help="write a class-per-row sample grid PNG here")
    parser.add_argument("--classifier", default=None, help="classifier directory (default: train.digit_classifier's)")
    args = parser.parse_args(argv)
    from train import digit_classifier

    began = time.perf_counter()
    if args.retrain or not os.path.isdir(os.path.join(args.out, "model")):
        config = default_config() if args.config is None else read_config(args.config)
        if args.steps is not None:
            warmup = min(config["optim"].get("warmup_steps", 0), args.steps // 10)
            config = merge(config, {"train": {"steps": args.steps}, "optim": {"warmup_steps": warmup}})
        if args.seed is not None:
            config = merge(config, {"seed": args.seed})
        config = merge(config, {"train": {"resume": False}})
        subject = train_dit(config, args.out)
    else:
        subject = load_dit(args.out)
    train_seconds = time.perf_counter() - began
    classifier = (digit_classifier.load_classifier(args.classifier) if args.classifier
                  else digit_classifier.default_classifier())
    report = {"out": args.out, "train_or_load_seconds": round(train_seconds, 1),
              "train_steps": subject.config["train"]["steps"], "seed": subject.config.get("seed", 0),
              "classifier_test_accuracy": classifier.test_accuracy, "sampler": args.sampler,
              "sample_steps": args.sample_steps, "per_class": args.per_class, "results": []}
    for w in args.guidance:
        result = evaluate_samples(subject, classifier.model, per_class=args.per_class, guidance=w,
                                  sampler=args.sampler, steps=args.sample_steps, seed=args.sample_seed)
        report["results"].append({"guidance": w, "accuracy": round(result["accuracy"], 4),
                                  "per_class": [round(float(a), 3) for a in result["per_class"]],
                                  "sample_seconds": round(result["sample_seconds"], 1)})
        if args.grid and w == args.guidance[0]:
            n = min(args.per_class, 10)
            keep = np.concatenate([np.flatnonzero(result["labels"] == c)[:n] for c in range(subject.model.num_classes)])
            save_grid(result["images"][keep], args.grid, nrow=subject.model.num_classes)
    report["total_seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
