"""``python -m train.demo``: small decoder LMs with different attention methods, trained and compared.

Each method trains (1) a byte-level LM on the Python standard library's source and (2) a model of the
same shape on multi-query associative recall (MQAR). Prints one table row per method — final train and
eval loss, training tokens/s, the compiled train step's memory, MQAR accuracy — and saves the loss
curves as a PNG. Defaults fit a 2-core CPU in a few minutes; ``--big`` sizes it for a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from jattn.core import masks
from jattn.nn.methods import available_methods
from train.build import build_model, build_task, count_params
from train.config import DEFAULTS, merge
from train.loop import train

# name shown -> (registered method, its config); entries whose method is not registered are skipped.
METHODS = {
    "softmax": ("softmax", {}),
    "lightning": ("lightning", {"chunk_size": 64}),
    "sliding_window": ("sliding_window", {"window": 32}),
    "sparse(sink+local)": ("block_sparse", {"mask_fn": masks.sink_local_mask(16, 32), "block_size": 16}),
}

SMALL = {"dim": 64, "num_layers": 2, "num_heads": 4, "seq_len": 128, "batch_size": 16, "steps": 250,
         "lr": 3e-3, "mqar_steps": 300, "mqar_pairs": 4, "mqar_vocab": 32, "mqar_batch": 64, "max_bytes": 1_000_000}
BIG = {"dim": 256, "num_layers": 4, "num_heads": 4, "seq_len": 512, "batch_size": 32, "steps": 1500,
       "lr": 1e-3, "mqar_steps": 2000, "mqar_pairs": 16, "mqar_vocab": 128, "mqar_batch": 128,
       "max_bytes": 4_000_000}


def method_config(name: str, size: dict) -> tuple[str, dict]:
    method, config = METHODS[name]
    if method == "sliding_window":
        config = {**config, "window": max(4, size["seq_len"] // 4)}
    return method, config


def lm_config(name: str, size: dict, seed: int) -> dict:
    method, config = method_config(name, size)
    return merge(DEFAULTS, {
        "name": f"demo_{name}", "seed": seed,
        "task": {"kind": "text", "seq_len": size["seq_len"], "max_bytes": size["max_bytes"]},
        "model": {"kind": "decoder_lm", "dim": size["dim"], "num_layers": size["num_layers"],
                  "num_heads": size["num_heads"], "method": method, "method_config": config},
        "optim": {"lr": size["lr"], "warmup_steps": max(1, size["steps"] // 10), "schedule": "cosine"},
        "train": {"steps": size["steps"], "batch_size": size["batch_size"], "log_every": 5,
                  "eval_every": 0, "eval_batches": 4, "checkpoint_every": 0, "out_dir": None},
    })


def mqar_config(name: str, size: dict, seed: int) -> dict:
    method, config = method_config(name, size)
    if method == "block_sparse":  # MQAR sequences are short: a pattern that still covers the context
        config = {**config, "mask_fn": masks.sink_local_mask(4, 8)}
    if method == "sliding_window":
        config = {**config, "window": 8}
    return merge(DEFAULTS, {
        "name": f"mqar_{name}", "seed": seed,
        "task": {"kind": "mqar", "num_pairs": size["mqar_pairs"], "vocab_size": size["mqar_vocab"]},
        "model": {"kind": "decoder_lm", "dim": size["dim"], "num_layers": size["num_layers"],
                  "num_heads": size["num_heads"], "method": method, "method_config": config},
        "optim": {"lr": size["lr"], "warmup_steps": max(1, size["mqar_steps"] // 10), "schedule": "cosine",
                  "weight_decay": 0.0},
        "train": {"steps": size["mqar_steps"], "batch_size": size["mqar_batch"], "log_every": 50,
                  "eval_every": 0, "eval_batches": 8, "checkpoint_every": 0, "out_dir": None},
    })


def run_one(config: dict, quiet: bool):
    task = build_task(config["task"])
    model = build_model(config["model"], task, config["seed"])
    return count_params(model), train(config, model, task, quiet=quiet)


def format_table(rows: list[dict]) -> str:
    header = (f"{'method':<20}{'params':>9}{'train loss':>12}{'eval loss':>11}{'tokens/s':>11}"
              f"{'step mem MB':>13}{'MQAR acc':>10}{'time s':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['method']:<20}{r['params']:>9}{r['train_loss']:>12.4f}{r['eval_loss']:>11.4f}"
                     f"{r['tokens_per_second']:>11.0f}{r['step_memory_mb']:>13.1f}{r['mqar_accuracy']:>10.3f}"
                     f"{r['seconds']:>8.1f}")
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        steps, losses = zip(*points)
        ax.plot(steps, losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats / byte)")
    ax.set_title("byte-level LM on the Python stdlib: attention methods")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__)
    parser.add_argument("--big", action="store_true", help="GPU-sized models and runs")
    parser.add_argument("--methods", nargs="*", default=None, help=f"subset of {list(METHODS)}")
    parser.add_argument("--steps", type=int, default=None, help="LM training steps (overrides the size)")
    parser.add_argument("--mqar-steps", type=int, default=None, help="MQAR training steps")
    parser.add_argument("--out", default="demo_out", help="folder for results.json and loss_curves.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    size = dict(BIG if args.big else SMALL)
    if args.steps is not None:
        size["steps"] = args.steps
    if args.mqar_steps is not None:
        size["mqar_steps"] = args.mqar_steps
    names = list(METHODS) if args.methods is None else args.methods
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    registered = set(available_methods())
    skipped = [n for n in names if METHODS[n][0] not in registered]
    names = [n for n in names if n not in skipped]
    os.makedirs(args.out, exist_ok=True)

    began = time.perf_counter()
    rows, curves = [], {}
    for name in names:
        tick = time.perf_counter()
        params, lm = run_one(lm_config(name, size, args.seed), args.quiet)
        _, mqar = run_one(mqar_config(name, size, args.seed), args.quiet)
        train_curve = [(r["step"], r["loss"]) for r in lm.history if r["split"] == "train"]
        eval_final = [r for r in lm.history if r["split"] == "eval"][-1]
        mqar_eval = [r for r in mqar.history if r["split"] == "eval"][-1]
        curves[name] = train_curve
        rows.append({"method": name, "params": params, "train_loss": train_curve[-1][1],
                     "eval_loss": eval_final["loss"], "tokens_per_second": lm.tokens_per_second or 0.0,
                     "step_memory_mb": (lm.step_memory_bytes or 0) / 2**20,
                     "mqar_accuracy": mqar_eval["accuracy"], "seconds": time.perf_counter() - tick})
        print(f"[demo] {name}: done in {rows[-1]['seconds']:.1f}s", flush=True)
    plot_path = os.path.join(args.out, "loss_curves.png")
    plot_curves(curves, plot_path)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"size": size, "rows": rows, "curves": curves, "skipped": skipped}, f, indent=2)
    import jax
    print(f"\njattn demo ({'big' if args.big else 'small'}; backend {jax.default_backend()}; "
          f"LM {size['steps']} steps x {size['batch_size']} x {size['seq_len']} bytes, "
          f"MQAR {size['mqar_steps']} steps, {size['mqar_pairs']} pairs)")
    print(format_table(rows))
    if skipped:
        print(f"skipped (method not available): {skipped}")
    print(f"loss curves: {plot_path}; total {time.perf_counter() - began:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
