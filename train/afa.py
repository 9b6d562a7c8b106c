"""P30 AFA experiment: ensembling two tiny DiTs trained on disjoint halves of the digits with an adaptive
feature aggregator (:mod:`jattn.methods.generative.afa`), scored by held-out denoising MSE on the union.

Per seed ``s``:

1. Split the digits' train split into two disjoint halves: ``split="classes"`` (expert A sees classes 0-4,
   expert B classes 5-9, the spec's "disjoint MNIST halves") or ``split="random"`` (a seeded random half each).
2. Train expert A and expert B (``TinyDiT``) with the training loop's step (:func:`train.loop.make_train_step`),
   each on its half only, with different seeds (``100 s + 1``, ``100 s + 2``), ``expert.steps`` steps each,
   the same optimiser (class dropout 0.1 as in ``train.diffusion``). From scratch by default; with
   ``expert.base_steps > 0`` a shared base DiT is first trained on the union (seed ``100 s``) and both
   experts fine-tune from it (AFA's setting: Stable Diffusion fine-tunes share their ancestor, so their
   features are aligned; independently initialised networks' features are not).
3. Freeze both; train the AFA aggregators (``depth + 2`` SABW aggregators, zero-initialised logits, seed
   ``100 s + 3``) on the UNION train split for ``aggregator.steps`` steps with the epsilon MSE.
4. Optionally (``union_steps > 0``, default 0) train one DiT on the union for ``union_steps`` steps (seed
   ``100 s + 4``), the "one model on all the data" reference (``docs/afa.md`` uses base + expert steps, the
   steps each expert received).

Evaluation: the conditional epsilon MSE on the held-out test split (all ten classes) at ``eval.draws``
fixed (timestep, noise) draws per image (the same draws for every model and seed), for: expert A, expert B,
the plain output average ``(eps_A + eps_B) / 2``, AFA at initialisation (zero logits = the feature average
at every insertion point), trained AFA, and the union model. Also reported per half (test images of classes
0-4 / 5-9). Sample quality (classifier accuracy of guided samples) is not measured here.

Run: ``python -m train.afa`` (config ``configs/afa_digits.py``; ``--seeds 0 1 2``, ``--split random``,
``--expert-steps``, ``--aggregator-steps``, ``--base-steps``, ``--union-steps`` override it; ``--out`` writes
the JSON). Prints one JSON object per seed and a summary; ``docs/afa.md`` has the measured table. All seeds
run in one process and reuse the same jitted steps (:class:`Runner`), so only the first seed compiles.
"""
from __future__ import annotations

import argparse
import copy
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
from train.diffusion import DigitDiffusionTask, build_model, build_schedule, drop_labels, q_sample
from train.images import digits

SPLITS = ("classes", "random")
MODELS = ("expert_a", "expert_b", "output_average", "afa_init", "afa", "union")
CONFIG_KEYS = {"name", "seed", "seeds", "split", "model", "diffusion", "expert", "aggregator", "union_steps",
               "eval", "out_dir"}
SECTION_KEYS = {"expert": {"steps", "batch_size", "optim", "base_steps"},
                "aggregator": {"steps", "batch_size", "hidden", "num_heads", "optim"},
                "eval": {"draws", "batch_size"}}
OPTIM_KEYS = set(DEFAULTS["optim"])


def check_config(config: dict) -> dict:
    """Raises ValueError naming an unknown or missing key / a bad value; returns ``config``."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    unknown = set(config) - CONFIG_KEYS
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; expected some of {sorted(CONFIG_KEYS)}")
    missing = CONFIG_KEYS - {"out_dir", "name", "union_steps"} - set(config)
    if missing:
        raise ValueError(f"config is missing keys {sorted(missing)}")
    for section, keys in SECTION_KEYS.items():
        if not isinstance(config[section], dict):
            raise TypeError(f"config[{section!r}] must be a dict, got {type(config[section]).__name__}")
        bad = set(config[section]) - keys
        if bad:
            raise ValueError(f"unknown keys {sorted(bad)} in config[{section!r}]; expected some of {sorted(keys)}")
        bad_optim = set(config[section].get("optim", {})) - OPTIM_KEYS
        if bad_optim:
            raise ValueError(f"unknown keys {sorted(bad_optim)} in config[{section!r}]['optim']; expected some of "
                             f"{sorted(OPTIM_KEYS)}")
    if config["split"] not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {config['split']!r}")
    seeds = config["seeds"]
    if not isinstance(seeds, (list, tuple)) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of ints >= 0, got {seeds!r}")
    for path in (("expert", "steps"), ("expert", "batch_size"), ("aggregator", "steps"),
                 ("aggregator", "batch_size"), ("eval", "draws"), ("eval", "batch_size")):
        value = config[path[0]].get(path[1])
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{'.'.join(path)} must be an int >= 1, got {value!r}")
    union = config.get("union_steps", 0)
    if isinstance(union, bool) or not isinstance(union, int) or union < 0:
        raise ValueError(f"union_steps must be an int >= 0 (0 = no union model), got {union!r}")
    if config["model"].get("kind", "dit") != "dit":
        raise ValueError(f"model.kind must be 'dit', got {config['model'].get('kind')!r}")
    return config


def default_config() -> dict:
    """``configs/afa_digits.py``'s config."""
    return read_config(os.path.join(CONFIG_DIR, "afa_digits.py"))


# --- data ----------------------------------------------------------------------------------------------

def split_halves(labels: np.ndarray, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of two disjoint halves of ``labels``: classes ``< 5`` / ``>= 5`` (``"classes"``) or a seeded
    random permutation cut in two (``"random"``)."""
    labels = np.asarray(labels)
    if split == "classes":
        return np.flatnonzero(labels < 5), np.flatnonzero(labels >= 5)
    if split == "random":
        perm = np.random.default_rng(seed).permutation(len(labels))
        half = len(labels) // 2
        return np.sort(perm[:half]), np.sort(perm[half:])
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class SubsetDiffusionTask(DigitDiffusionTask):
    """``DigitDiffusionTask`` whose train batches draw only from ``indices`` of the train split."""

    def __init__(self, schedule, indices, **kwargs):
        super().__init__(schedule, **kwargs)
        indices = np.asarray(indices)
        if indices.ndim != 1 or indices.size == 0:
            raise ValueError(f"indices must be a non-empty 1-D index array, got shape {indices.shape}")
        self.indices = indices

    def batch(self, seed: int, step: int, batch_size: int, split: str = "train") -> dict:
        if split != "train":
            return super().batch(seed, step, batch_size, split)
        rng = batch_rng(seed, step, stream=42)
        idx = self.indices[rng.integers(0, len(self.indices), batch_size)]
        images = self.data.train_images[idx]
        return {"x0": (2.0 * images - 1.0).astype(np.float32),
                "labels": drop_labels(self.data.train_labels[idx], rng.random(batch_size), self.p_uncond,
                                      self.num_classes),
                "t": rng.integers(0, self.schedule.num_steps, batch_size).astype(np.int32),
                "noise": rng.standard_normal(images.shape).astype(np.float32)}


def eval_batches(data, num_steps: int, draws: int) -> list[dict]:
    """The fixed held-out evaluation: every test image at ``draws`` (t, noise) draws, labels kept."""
    out = []
    for d in range(draws):
        rng = np.random.default_rng(10_000 + d)
        n = len(data.test_labels)
        out.append({"x0": (2.0 * data.test_images - 1.0).astype(np.float32),
                    "labels": data.test_labels.astype(np.int32),
                    "t": rng.integers(0, num_steps, n).astype(np.int32),
                    "noise": rng.standard_normal(data.test_images.shape).astype(np.float32)})
    return out


# --- training (compiled once per process: every seed reuses the same jitted steps) ---------------------

class Runner:
    """Holds the jitted expert step (per step count), the jitted aggregator step and the jitted evaluation
    functions, so that seeds after the first compile nothing (the graph definitions are the same)."""

    def __init__(self, config: dict):
        self.config = check_config(config)
        self.schedule = build_schedule(config["diffusion"])
        self.alpha_bars = np.asarray(self.schedule.alpha_bars, np.float32)
        self._expert_steps, self._agg_step, self._eval = {}, None, {}

    def _task(self, model, indices=None):
        kwargs = dict(size=model.image_size, p_uncond=self.config["diffusion"].get("p_uncond", 0.1),
                      num_classes=model.num_classes)
        return (DigitDiffusionTask(self.schedule, **kwargs) if indices is None
                else SubsetDiffusionTask(self.schedule, indices, **kwargs))

    def train_dit_on(self, indices, seed: int, steps: int, init=None):
        """A TinyDiT trained on ``indices`` of the train split (``None``: all of it) with the training loop's
        own step (:func:`train.loop.make_train_step`, clip + AdamW on the warmup-cosine schedule), starting
        from a copy of ``init``'s parameters when given (fine-tuning) or from ``seed``'s initialisation."""
        from train.loop import make_loss_of, make_train_step
        from train.optim import make_optimizer

        model = build_model(self.config["model"], seed)
        task = self._task(model, indices)
        ecfg = self.config["expert"]
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        if init is not None:
            params = jax.tree.map(jnp.copy, nnx.state(init, nnx.Param))
        if steps not in self._expert_steps:
            ocfg = merge(DEFAULTS["optim"], ecfg.get("optim", {}))
            ocfg.pop("schedule_steps", None)
            ocfg["warmup_steps"] = min(ocfg.get("warmup_steps", 0), steps // 10)
            optimizer, _ = make_optimizer(total_steps=steps, **ocfg)
            rest_def = jax.tree.structure(rest)

            def loss_of(params, rest_leaves, batch):
                return make_loss_of(graphdef, jax.tree.unflatten(rest_def, rest_leaves), task.loss)(params, batch)

            def step(params, opt_state, rest_leaves, batch):
                inner = make_train_step(lambda p, b: loss_of(p, rest_leaves, b), optimizer)
                return inner(params, opt_state, batch)

            self._expert_steps[steps] = (optimizer, jax.jit(step))
        optimizer, step = self._expert_steps[steps]
        opt_state, leaves = optimizer.init(params), jax.tree.leaves(rest)
        began = time.perf_counter()
        for i in range(steps):
            params, opt_state, _ = step(params, opt_state, leaves, task.batch(seed, i, ecfg["batch_size"]))
        jax.block_until_ready(params)
        return nnx.merge(graphdef, params, rest), time.perf_counter() - began

    def train_aggregator(self, experts, seed: int):
        """Trains an :class:`AFAEnsemble`'s aggregators on the union train split with the experts frozen.
        Returns ``(ensemble_trained, ensemble_init, losses, seconds)``."""
        from jattn.methods.generative.afa import AFAEnsemble, make_afa_train_step
        from train.optim import make_optimizer

        acfg = self.config["aggregator"]
        steps = acfg["steps"]
        ensemble = AFAEnsemble(experts[0], len(experts), hidden=acfg.get("hidden", 32),
                               num_heads=acfg.get("num_heads", 4), rngs=nnx.Rngs(seed))
        initial = nnx.clone(ensemble)
        ocfg = merge(DEFAULTS["optim"], acfg.get("optim", {}))
        ocfg.pop("schedule_steps", None)
        ocfg["warmup_steps"] = min(ocfg.get("warmup_steps", 0), steps // 10)
        optimizer, _ = make_optimizer(total_steps=steps, **ocfg)
        step, params, opt_state, expert_states = make_afa_train_step(ensemble, experts, optimizer, self.alpha_bars)
        if self._agg_step is None:
            self._agg_step = jax.jit(step)   # no donation: `initial` shares the starting arrays
        task = self._task(experts[0])
        began, losses = time.perf_counter(), []
        for i in range(steps):
            params, opt_state, loss = self._agg_step(params, opt_state, expert_states,
                                                     task.batch(seed, i, acfg["batch_size"]))
            losses.append(loss)
        losses = [float(x) for x in losses]
        nnx.update(ensemble, params)
        return ensemble, initial, losses, time.perf_counter() - began

    # --- evaluation ---

    def _errors(self, kind, graphdefs, states, batch):
        """Per-image epsilon MSE ``[n]`` of a model ``kind`` ("dit", "average", "afa") on one batch."""
        if kind not in self._eval:
            alpha_bars = self.alpha_bars

            def errors(states, x0, t, y, noise):
                x_t = q_sample(alpha_bars, x0, t, noise)
                if kind == "dit":
                    eps = nnx.merge(graphdefs[0], states[0])(x_t, t, y)
                elif kind == "average":
                    eps = 0.5 * sum(nnx.merge(g, s)(x_t, t, y) for g, s in zip(graphdefs, states))
                else:
                    experts = [nnx.merge(g, s) for g, s in zip(graphdefs[1:], states[1:])]
                    eps = nnx.merge(graphdefs[0], states[0])(experts, x_t, t, y)
                return jnp.mean(jnp.square(eps - noise), axis=(1, 2, 3))

            self._eval[kind] = jax.jit(errors)
        return np.asarray(self._eval[kind](states, batch["x0"], batch["t"], batch["labels"], batch["noise"]))

    def evaluate(self, models: dict, batches) -> dict:
        """``{name: per-image errors [draws * n]}`` for ``models = {name: (kind, [modules])}``."""
        bs = self.config["eval"]["batch_size"]
        out = {}
        for name, (kind, modules) in models.items():
            defs, states = zip(*(nnx.split(m) for m in modules))
            errs = []
            for batch in batches:
                for start in range(0, len(batch["labels"]), bs):
                    sub = {k: v[start:start + bs] for k, v in batch.items()}
                    errs.append(self._errors(kind, defs, states, sub))
            out[name] = np.concatenate(errs)
        return out

    def run_seed(self, seed: int) -> dict:
        """One full run (two experts, aggregator, optional union model, evaluation) for ``seed``."""
        config = self.config
        began = time.perf_counter()
        data = digits(config["model"].get("image_size", 16))
        half_a, half_b = split_halves(data.train_labels, config["split"], seed)
        steps, base, sec_base = config["expert"]["steps"], None, 0.0
        if config["expert"].get("base_steps", 0):
            base, sec_base = self.train_dit_on(None, 100 * seed, config["expert"]["base_steps"])
        expert_a, sec_a = self.train_dit_on(half_a, 100 * seed + 1, steps, init=base)
        expert_b, sec_b = self.train_dit_on(half_b, 100 * seed + 2, steps, init=base)
        ensemble, initial, losses, sec_agg = self.train_aggregator([expert_a, expert_b], 100 * seed + 3)
        models = {"expert_a": ("dit", [expert_a]), "expert_b": ("dit", [expert_b]),
                  "output_average": ("average", [expert_a, expert_b]),
                  "afa_init": ("afa", [initial, expert_a, expert_b]), "afa": ("afa", [ensemble, expert_a, expert_b])}
        sec_union = 0.0
        if config.get("union_steps", 0):
            union, sec_union = self.train_dit_on(None, 100 * seed + 4, config["union_steps"])
            models["union"] = ("dit", [union])
        batches = eval_batches(data, self.schedule.num_steps, config["eval"]["draws"])
        errors = self.evaluate(models, batches)
        labels = np.concatenate([b["labels"] for b in batches])
        report = {"seed": seed, "split": config["split"], "expert_steps": steps,
                  "base_steps": config["expert"].get("base_steps", 0),
                  "aggregator_steps": config["aggregator"]["steps"], "union_steps": config.get("union_steps", 0),
                  "mse": {k: float(v.mean()) for k, v in errors.items()},
                  "mse_classes_0_4": {k: float(v[labels < 5].mean()) for k, v in errors.items()},
                  "mse_classes_5_9": {k: float(v[labels >= 5].mean()) for k, v in errors.items()},
                  "aggregator_loss_first_last10": [losses[0], float(np.mean(losses[-10:]))],
                  "seconds": {"base": round(sec_base, 1), "expert_a": round(sec_a, 1), "expert_b": round(sec_b, 1),
                              "aggregator": round(sec_agg, 1), "union": round(sec_union, 1)}}
        report["seconds"]["total"] = round(time.perf_counter() - began, 1)
        return report


def run_seed(config: dict, seed: int) -> dict:
    """One seed of the experiment with a fresh :class:`Runner`."""
    return Runner(config).run_seed(seed)


def summarize(reports: list[dict]) -> dict:
    """Mean and sample std over seeds of every reported number (``{metric: {model: [mean, std]}}``)."""
    out = {}
    for key in ("mse", "mse_classes_0_4", "mse_classes_5_9"):
        if key not in reports[0]:
            continue
        out[key] = {}
        for name in reports[0][key]:
            values = np.array([r[key][name] for r in reports])
            out[key][name] = [float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--split", choices=SPLITS, default=None)
    parser.add_argument("--expert-steps", type=int, default=None)
    parser.add_argument("--aggregator-steps", type=int, default=None)
    parser.add_argument("--union-steps", type=int, default=None)
    parser.add_argument("--base-steps", type=int, default=None,
                        help="train a shared base on the union first; both experts fine-tune from it")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--config", default=None, help="config file (default configs/afa_digits.py)")
    args = parser.parse_args(argv)
    config = copy.deepcopy(read_config(args.config) if args.config else default_config())
    for value, path in ((args.seeds, ("seeds",)), (args.split, ("split",)), (args.expert_steps, ("expert", "steps")),
                        (args.aggregator_steps, ("aggregator", "steps")), (args.union_steps, ("union_steps",)),
                        (args.base_steps, ("expert", "base_steps"))):
        if value is not None:
            target = config
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
    check_config(config)
    runner, reports = Runner(config), []
    for seed in config["seeds"]:
        reports.append(runner.run_seed(seed))
        print(json.dumps(reports[-1]), flush=True)
    summary = {"summary": summarize(reports), "seeds": config["seeds"], "split": config["split"]}
    print(json.dumps(summary), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"config": config, "runs": reports, **summary}, f, indent=1)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
