"""``python -m train.entropy_guided``: the P21 experiment (entropy-guided attention) on the small byte LM.

Arms, each trained with ``train.loop.train`` for the same steps on the same batches (``ByteCorpus``: the Python
stdlib's source, no download; batches are pure functions of ``(seed, step)``):

* ``baseline``: ``jattn.nn.DecoderLM`` with softmax attention (``configs/lm_entropy_guided.py:get_config``).
* ``temp_only``: the same model (same seed: same initial weights) with every block's attention swapped for
  :class:`jattn.methods.objectives.entropy_guided.EntropyGuidedAttention` (learnable ``t [H, T]``, init 1),
  cross entropy only.
* ``ega_paper`` / ``ega_code``: that model trained on ``CE + lam * L_ent`` with the spec's defaults
  (``gamma = 0.2``, ``lam = 1e-5``), reduction ``"paper"`` (penalty on each head's mean entropy) or ``"code"``
  (the official code's per-row penalty summed over batch and queries).

Reported per arm: held-out cross entropy (nats/byte, CE only, fixed eval batches), mean and sample std over
seeds and the per-seed gap to the baseline; per head the mean row entropy of its causal maps on held-out
text, as a share of the uniform causal map's (``mean_i log(i + 1)``; 1 = uniform: "entropic overload");
the mean learned temperature and threshold. ``--figure`` draws the per-head entropies (docs/img).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jattn.methods.objectives.entropy_guided import (entropy_guided_layers, entropy_reg_loss, model_thresholds,
                                                     use_entropy_guided)
from jattn.nn.attention_maps import attention_entropy
from jattn.nn.models import DecoderLM
from train.config import CONFIG_DIR, DEFAULTS, merge
from train.data import ByteCorpus
from train.loop import train

CONFIG_PATH = os.path.join(CONFIG_DIR, "lm_entropy_guided.py")


def load_settings(path: str = CONFIG_PATH) -> tuple[dict, dict]:
    """``(train config with DEFAULTS filled in, P21 settings)`` from the config file."""
    spec = importlib.util.spec_from_file_location("_p21_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return merge(DEFAULTS, module.get_config()), module.entropy_guided()


class EntropyGuidedTask:
    """The byte-LM task with ``CE + lam * L_ent`` as its loss (``reduction=None``: CE only).

    ``loss(model, batch) -> (loss, {"ce", "reg"})`` (the ``train.loop`` task protocol); eval reports ``ce``."""

    def __init__(self, corpus: ByteCorpus, *, reduction: str | None, lam: float, gamma: float):
        if reduction not in (None, "paper", "code"):
            raise ValueError(f"reduction must be None, 'paper' or 'code', got {reduction!r}")
        self.data, self.reduction, self.lam, self.gamma = corpus, reduction, float(lam), float(gamma)
        self.seq_len, self.vocab_size = corpus.seq_len, corpus.vocab_size

    def batch(self, seed, step, batch_size, split="train"):
        return self.data.batch(seed, step, batch_size, split)

    def loss(self, model, batch):
        if self.reduction is None:
            logits, reg = model(batch["inputs"]), jnp.zeros((), jnp.float32)
        else:
            logits, maps = model(batch["inputs"], return_probs=True)
            reg = entropy_reg_loss(maps, model_thresholds(model), gamma=self.gamma, lam=self.lam,
                                   reduction=self.reduction)
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]))
        return ce + reg, {"ce": ce, "reg": reg}


def build_model(config: dict, settings: dict, arm: str, seed: int) -> DecoderLM:
    """The arm's model; every arm of a seed starts from the baseline's weights (``t = 1``)."""
    m = config["model"]
    model = DecoderLM(ByteCorpus.vocab_size, m["dim"], m["num_layers"], m["num_heads"], rngs=nnx.Rngs(seed),
                      method=m.get("method", "softmax"), method_config=m.get("method_config") or {})
    if arm != "baseline":
        use_entropy_guided(model, max_len=config["task"]["seq_len"], init_temperature=settings["init_temperature"],
                           init_threshold=settings["init_threshold"], per_position=settings["per_position"])
    return model


def head_entropy_shares(model, tokens) -> np.ndarray:
    """``[L, H]``: each head's mean row entropy over ``tokens``' causal maps divided by the uniform causal
    map's (``mean_i log(i + 1)``)."""
    _, maps = nnx.jit(lambda m, t: m(t, return_probs=True))(model, jnp.asarray(tokens))
    T = tokens.shape[1]
    uniform = float(np.mean(np.log(np.arange(1, T + 1))))
    rows = jnp.stack([attention_entropy(p) for p in maps])          # [L, B, H, T]
    return np.asarray(jnp.mean(rows, axis=(1, 3))) / uniform


def run_arm(config: dict, settings: dict, arm: str, seed: int, corpus: ByteCorpus, probe) -> dict:
    reduction, lam = (None, 0.0) if arm == "baseline" else settings["arms"][arm]
    task = EntropyGuidedTask(corpus, reduction=reduction, lam=lam, gamma=settings["gamma"])
    model = build_model(config, settings, arm, seed)
    run_config = merge(config, {"seed": seed, "name": f"p21_{arm}_{seed}"})
    result = train(run_config, model, task, quiet=True)
    final_eval = [r for r in result.history if r["split"] == "eval"][-1]
    trained = result.model()
    row = {"arm": arm, "seed": seed, "eval_ce": final_eval["ce"], "eval_reg": final_eval["reg"],
           "seconds": round(result.seconds, 1),
           "head_entropy_share": head_entropy_shares(trained, probe).round(4).tolist()}
    layers = entropy_guided_layers(trained)
    if layers:
        row["mean_temperature"] = [float(jnp.mean(layer.temperature[...])) for layer in layers]
        row["threshold"] = np.asarray(model_thresholds(trained)).round(3).tolist()
    return row


def summarize(rows: list[dict]) -> dict:
    """Per arm: eval CE mean/std over seeds, gap to the baseline per seed, mean per-head entropy share."""
    base = {r["seed"]: r["eval_ce"] for r in rows if r["arm"] == "baseline"}
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        ce = np.array([r["eval_ce"] for r in mine])
        shares = np.array([r["head_entropy_share"] for r in mine])          # [seeds, L, H]
        entry = {"n": len(ce), "eval_ce_mean": float(ce.mean()), "eval_ce_std": float(ce.std(ddof=1)) if len(ce) > 1 else 0.0,
                 "entropy_share_per_layer": shares.mean(axis=(0, 2)).round(3).tolist(),
                 "entropy_share_max": float(shares.max()), "entropy_share_min": float(shares.min())}
        gaps = np.array([r["eval_ce"] - base[r["seed"]] for r in mine if r["seed"] in base])
        if arm != "baseline" and len(gaps):
            entry["gap_mean"] = float(gaps.mean())
            entry["gap_std"] = float(gaps.std(ddof=1)) if len(gaps) > 1 else 0.0
        out[arm] = entry
    return out


def save_figure(rows: list[dict], path: str) -> None:
    """Per-head entropy shares (mean over seeds, bars) per arm, one panel per layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    shares = {a: np.mean([r["head_entropy_share"] for r in rows if r["arm"] == a], axis=0) for a in arms}
    L, H = next(iter(shares.values())).shape
    fig, axes = plt.subplots(1, L, figsize=(4.2 * L, 3.2), squeeze=False, sharey=True)
    width = 0.8 / len(arms)
    for layer in range(L):
        ax = axes[0, layer]
        for i, arm in enumerate(arms):
            ax.bar(np.arange(H) + i * width, shares[arm][layer], width, label=arm)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_xlabel("head")
        ax.set_xticks(np.arange(H) + 0.4 - width / 2, [str(h) for h in range(H)])
    axes[0, 0].set_ylabel("mean row entropy / uniform causal")
    axes[0, -1].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=CONFIG_PATH)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", default="baseline,temp_only,ega_paper,ega_code")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--seq-len", type=int, default=None, help="override task.seq_len")
    parser.add_argument("--max-bytes", type=int, default=400_000)
    parser.add_argument("--out", default=None, help="write rows and summary as JSON here")
    parser.add_argument("--figure", default=None, help="save the per-head entropy figure here")
    args = parser.parse_args(argv)
    config, settings = load_settings(args.config)
    if args.steps is not None:
        config["train"]["steps"] = args.steps
        config["optim"]["warmup_steps"] = min(config["optim"]["warmup_steps"], max(0, args.steps // 10))
    if args.seq_len is not None:
        config["task"]["seq_len"] = args.seq_len
    arms = [a for a in args.arms.split(",") if a]
    for arm in arms:
        if arm != "baseline" and arm not in settings["arms"]:
            raise ValueError(f"--arms: unknown arm {arm!r}; arms are baseline, {', '.join(settings['arms'])}")
    corpus = ByteCorpus(config["task"]["seq_len"], max_bytes=args.max_bytes)
    probe = corpus.batch(4321, 0, 16, split="eval")["inputs"]
    rows = []
    began = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        for arm in arms:
            row = run_arm(config, settings, arm, seed, corpus, probe)
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("arm", "seed", "eval_ce", "eval_reg", "seconds")}), flush=True)
    summary = summarize(rows)
    print(json.dumps(summary, indent=1))
    print(f"total {time.perf_counter() - began:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "summary": summary, "config": config, "settings": settings}, f, indent=1)
    if args.figure:
        save_figure(rows, args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
