"""``python -m train.p62_control``: P62's linear-attention control for length generalisation.

The spec's claim (P62 "works": "length generalisation (train n = 40, test n = 80) better for softmax than for a
linear-attention control"). Models, both one layer, ``H`` heads, head dim ``d + 1``, no MLP, read out on the
query's last coordinate, with per-head ``KQ_h = W_K,h^T W_Q,h`` and ``OV_h = W_O,h W_V,h``:

* softmax: :class:`jattn.nn.icl.OneLayerMHSoftmax`,
  ``y_hat = sum_h e^T OV_h sum_l z_l softmax_l(z_l^T KQ_h z_q)``;
* linear control: :class:`OneLayerMHLinear`, the softmax replaced by the identity,
  ``y_hat = sum_h e^T OV_h sum_l z_l (z_l^T KQ_h z_q) / c(n)`` with ``c(n) = 1`` (``normalize="sum"``) or
  ``c(n) = n`` (``"mean"``, the 1/n form of linear-transformer ICL analyses). The spec does not say which; both
  are run, since a sum-form model's output grows with ``n`` while the mean form's does not.

All arms train at ``n = 40`` (d = 5, noise 0) with ``train.loop.train`` on the same batches and steps, and are
evaluated on fresh prompts at ``n = 40`` and ``n = 80``. Baselines on the same prompts: the zero predictor
(``E y^2 = 1``); one-step debiased GD ``c * (1/n) sum_l y_l (x_l . x_q - mean_m x_m . x_q)`` with ``c`` fitted by
least squares at each length (an oracle scale) and with ``c`` fitted at n = 40 and kept at 80; ordinary least
squares on the context (exact, MSE ~ 0, at noise 0 with n >= d).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.core import checks
from jattn.core.reference import HIGHEST
from jattn.nn.icl import OneLayerMHSoftmax, best_scale, debiased_gd_predictor
from train.build import Task, regression_loss
from train.config import CONFIG_DIR, DEFAULTS, merge
from train.loop import train
from train.tasks import ICLRegression

CONFIG_PATH = os.path.join(CONFIG_DIR, "p62_linear_control.py")
NORMALIZATIONS = ("sum", "mean")


class OneLayerMHLinear(nnx.Module):
    """One-layer multi-head *linear* attention for in-context regression: ``tokens [B, n + 1, d + 1] -> [B]``.

    The same parameters and layout as :class:`jattn.nn.icl.OneLayerMHSoftmax` (so ``kq()``/``ov()`` and the P62
    analysis functions apply), with the softmax over the context scores replaced by the scores themselves
    (``normalize="sum"``) or the scores divided by ``n`` (``"mean"``)."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, init_scale: float = 0.1,
                 normalize: str = "sum"):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
        checks.check_choice("normalize", normalize, NORMALIZATIONS)
        self.dim, self.num_heads, self.normalize = dim, num_heads, normalize
        e = dim + 1

        def init():
            return nnx.Param(init_scale * jax.random.normal(rngs.params(), (num_heads, e, e)) / jnp.sqrt(e))

        self.w_q, self.w_k, self.w_v, self.w_o = init(), init(), init(), init()

    kq = OneLayerMHSoftmax.kq
    ov = OneLayerMHSoftmax.ov

    def attention(self, tokens):
        """Per-head weights of the context for the query: the raw scores (or scores / n): ``[B, H, n]``."""
        context, query = tokens[:, :-1], tokens[:, -1]
        scores = jnp.einsum("bld,hde,be->bhl", context, self.kq(), query, precision=HIGHEST)
        return scores / context.shape[1] if self.normalize == "mean" else scores

    def __call__(self, tokens):
        checks.check_float_array("tokens", tokens, 3)
        if tokens.shape[-1] != self.dim + 1 or tokens.shape[1] < 2:
            raise ValueError(f"tokens must be [B, n + 1 >= 2, d + 1 = {self.dim + 1}], got shape {tokens.shape}")
        weights = self.attention(tokens)
        readout = self.ov()[:, -1, :]
        values = jnp.einsum("bld,hd->bhl", tokens[:, :-1], readout, precision=HIGHEST)
        return jnp.sum(weights * values, axis=(1, 2))


def least_squares_predictor(tokens):
    """``x_q . beta_hat`` with ``beta_hat`` the minimum-norm least-squares fit to the context pairs: ``[B]``."""
    checks.check_float_array("tokens", tokens, 3)
    x, y, x_q = tokens[:, :-1, :-1], tokens[:, :-1, -1], tokens[:, -1, :-1]
    beta = jax.vmap(lambda a, b: jnp.linalg.lstsq(a, b)[0])(x.astype(jnp.float32), y.astype(jnp.float32))
    return jnp.einsum("bd,bd->b", beta, x_q, precision=HIGHEST)


def load_settings(path: str = CONFIG_PATH) -> tuple[dict, dict]:
    spec = importlib.util.spec_from_file_location("_p62_control_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return merge(DEFAULTS, module.get_config()), module.control()


def build(config: dict, normalize: str | None, seed: int):
    """``(task, model)``: the softmax model when ``normalize`` is None, else the linear control."""
    t = config["task"]
    data = ICLRegression(t["dim"], t["num_context"], t.get("noise", 0.0))
    task = Task(data, regression_loss, None, data.num_context + 1)
    m = config["model"]
    rngs = nnx.Rngs(seed)
    if normalize is None:
        model = OneLayerMHSoftmax(data.dim, m["num_heads"], rngs=rngs, init_scale=m.get("init_scale", 0.1))
    else:
        model = OneLayerMHLinear(data.dim, m["num_heads"], rngs=rngs, init_scale=m.get("init_scale", 0.1),
                                 normalize=normalize)
    return task, model


def evaluate_lengths(model, data: ICLRegression, seed: int, lengths, samples: int, train_n: int) -> dict:
    """Test MSE of ``model`` and the baselines at each context length (fresh eval prompts, the same for every arm
    of a seed)."""
    out = {}
    gd_scale_train = None
    for n in sorted(lengths, key=lambda n: (n != train_n, n)):
        batch = data.batch(seed, 50_000, samples, split="eval", num_context=n)
        tokens, target = jnp.asarray(batch["tokens"]), jnp.asarray(batch["target"])
        prediction = nnx.jit(lambda m, t: m(t))(model, tokens)
        unit = debiased_gd_predictor(tokens, 1.0)
        scale = best_scale(unit, target)
        if n == train_n:
            gd_scale_train = scale
        out[n] = {"model": float(jnp.mean((prediction - target) ** 2)),
                  "debiased_gd_best_scale": float(jnp.mean((scale * unit - target) ** 2)),
                  "debiased_gd_train_scale": float(jnp.mean((gd_scale_train * unit - target) ** 2)),
                  "least_squares": float(jnp.mean((least_squares_predictor(tokens) - target) ** 2)),
                  "zero": float(jnp.mean(target ** 2))}
    return out


def run_arm(config: dict, arm: str, normalize: str | None, seed: int, lengths, samples: int) -> dict:
    task, model = build(config, normalize, seed)
    result = train(merge(config, {"seed": seed, "name": f"p62_{arm}_{seed}"}), model, task, quiet=True)
    trained = result.model()
    mse = evaluate_lengths(trained, task.data, seed, lengths, samples, task.data.num_context)
    return {"arm": arm, "seed": seed, "seconds": round(result.seconds, 1),
            "final_train_loss": [r for r in result.history if r["split"] == "train"][-1]["loss"],
            "mse": {str(n): v for n, v in mse.items()}}


def summarize(rows: list[dict]) -> dict:
    """Per arm and length: the model's test MSE mean and sample std over seeds (and the baselines' means)."""
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        entry = {}
        for n in mine[0]["mse"]:
            values = np.array([r["mse"][n]["model"] for r in mine])
            entry[n] = {"model_mean": float(values.mean()),
                        "model_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                        **{f"{k}_mean": float(np.mean([r["mse"][n][k] for r in mine]))
                           for k in mine[0]["mse"][n] if k != "model"}}
        out[arm] = entry
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=CONFIG_PATH)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", default=None, help="comma-separated subset of the config's arms")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--samples", type=int, default=None, help="eval prompts per length")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    config, settings = load_settings(args.config)
    if args.steps is not None:
        config["train"]["steps"] = args.steps
        config["optim"]["warmup_steps"] = min(config["optim"]["warmup_steps"], max(0, args.steps // 10))
    arms = settings["arms"] if args.arms is None else {a: settings["arms"][a] for a in args.arms.split(",") if a}
    samples = settings["eval_samples"] if args.samples is None else args.samples
    rows = []
    began = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        for arm, normalize in arms.items():
            row = run_arm(config, arm, normalize, seed, settings["eval_lengths"], samples)
            rows.append(row)
            print(json.dumps({"arm": arm, "seed": seed, "seconds": row["seconds"],
                              **{f"mse_{n}": round(v["model"], 4) for n, v in row["mse"].items()}}), flush=True)
    summary = summarize(rows)
    print(json.dumps(summary, indent=1))
    print(f"total {time.perf_counter() - began:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "summary": summary, "config": config, "settings": settings}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
