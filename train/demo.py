"""``python -m train.demo``: small decoder LMs with different attention methods, trained and compared.

Each method trains (1) a byte-level LM on the Python standard library's source and (2) a model of the
same shape on multi-query associative recall (MQAR). Prints one table row per method — final train and
eval loss, training tokens/s, the compiled train step's memory, MQAR accuracy beside the ceiling that
the method's attention pattern allows (:func:`train.tasks.mqar_one_hop_ceiling`) — and saves the LM
loss curves and the MQAR accuracy curves as PNGs. The MQAR floor that matters is the copy plateau
(:func:`train.tasks.mqar_copy_plateau`): a model near it copies a context value without using the key.
Defaults fit a 2-core CPU in a few minutes; ``--big`` sizes it for a GPU; ``--seeds 0 1 2`` repeats
every run and reports mean and spread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from jattn.core import masks
from jattn.nn.methods import available_methods
from train.build import build_model, build_task, count_params
from train.config import DEFAULTS, merge
from train.loop import train
from train.tasks import MQAR, mqar_copy_plateau, mqar_one_hop_ceiling

# name shown -> (registered method, its config); entries whose method is not registered are skipped.
METHODS = {
    "softmax": ("softmax", {}),
    "lightning": ("lightning", {"chunk_size": 64}),
    "sliding_window": ("sliding_window", {"window": 31}),  # 31 keys back + the query's own: 32 visible
    "sparse(sink+local)": ("block_sparse", {"mask_fn": masks.sink_local_mask(16, 32), "block_size": 16}),
}

# MQAR has its own learning rate: at 2e-3 and above the models stalled on the copy plateau for the
# whole demo; at 1e-3 a softmax model leaves it after 400-1000 steps (docs/experiments.md). 15 keys:
# with 7 or 11 the 2-layer windowed models learn within a few hundred steps to relay pairs past their
# window (two hops), beating their one-hop ceilings; with 15 they sit at it longer (1500 steps) but by
# 2000 steps they relay too.
SMALL = {"dim": 64, "num_layers": 2, "num_heads": 4, "seq_len": 128, "batch_size": 16, "steps": 250,
         "lr": 3e-3, "mqar_lr": 1e-3, "mqar_steps": 2000, "mqar_pairs": 4, "mqar_vocab": 32, "mqar_batch": 64,
         "mqar_eval_every": 100, "max_bytes": 1_000_000}
BIG = {"dim": 256, "num_layers": 4, "num_heads": 4, "seq_len": 512, "batch_size": 32, "steps": 1500,
       "lr": 1e-3, "mqar_lr": 1e-3, "mqar_steps": 3000, "mqar_pairs": 16, "mqar_vocab": 128, "mqar_batch": 128,
       "mqar_eval_every": 200, "max_bytes": 4_000_000}
# The MQAR patterns: short enough windows that some pairs fall out of reach (sequences are 15 tokens).
MQAR_WINDOW = 7  # keys back: 8 visible with the query's own
MQAR_SINK_LOCAL = (4, 8)


def method_config(name: str, size: dict) -> tuple[str, dict]:
    method, config = METHODS[name]
    if method == "sliding_window":
        config = {**config, "window": max(4, size["seq_len"] // 4) - 1}  # keys back, the query's own not counted
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


def mqar_method_config(name: str, size: dict) -> tuple[str, dict]:
    """The method and config of ``name``'s MQAR model: the LM's, with windows sized to MQAR's length."""
    method, config = method_config(name, size)
    if method == "block_sparse":
        config = {**config, "mask_fn": masks.sink_local_mask(*MQAR_SINK_LOCAL)}
    if method == "sliding_window":
        config = {**config, "window": MQAR_WINDOW}
    return method, config


def attention_pattern(method: str, config: dict):
    """The mask function ``(b, h, q_idx, kv_idx) -> bool`` of a registered method as the demo configures
    it: which keys a query can read at all. Lightning's decay down-weights old keys but hides none."""
    if method in ("softmax", "lightning"):
        return masks.causal_mask()
    if method == "sliding_window":
        return masks.sliding_window_mask(config["window"])  # `window` keys back (jattn's one convention)
    if method == "block_sparse":
        return config["mask_fn"]
    raise ValueError(f"method must be one of softmax, lightning, sliding_window, block_sparse; got {method!r}")


def mqar_ceiling(name: str, size: dict) -> float:
    """The one-hop MQAR accuracy ceiling of ``name``'s MQAR model (see train.tasks.mqar_one_hop_ceiling)."""
    task = MQAR(size["mqar_pairs"], vocab_size=size["mqar_vocab"])
    return mqar_one_hop_ceiling(task, attention_pattern(*mqar_method_config(name, size)))


def mqar_config(name: str, size: dict, seed: int) -> dict:
    method, config = mqar_method_config(name, size)
    return merge(DEFAULTS, {
        "name": f"mqar_{name}", "seed": seed,
        "task": {"kind": "mqar", "num_pairs": size["mqar_pairs"], "vocab_size": size["mqar_vocab"]},
        "model": {"kind": "decoder_lm", "dim": size["dim"], "num_layers": size["num_layers"],
                  "num_heads": size["num_heads"], "method": method, "method_config": config},
        "optim": {"lr": size["mqar_lr"], "warmup_steps": max(1, size["mqar_steps"] // 10), "schedule": "cosine",
                  "weight_decay": 0.0},
        "train": {"steps": size["mqar_steps"], "batch_size": size["mqar_batch"], "log_every": 50,
                  "eval_every": size["mqar_eval_every"], "eval_batches": 8, "checkpoint_every": 0,
                  "out_dir": None},
    })


def run_one(config: dict, quiet: bool):
    task = build_task(config["task"])
    model = build_model(config["model"], task, config["seed"])
    return count_params(model), train(config, model, task, quiet=quiet)


def _mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (0 for a single value)."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def summarize(runs: list[dict]) -> list[dict]:
    """One row per method: the mean of each number over seeds, plus ``<key>_spread`` (half the range)."""
    rows = []
    for name in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == name]
        row = {"method": name, "seeds": len(mine)}
        for key, value in mine[0].items():
            if isinstance(value, (int, float)) and key not in ("seed", "seeds"):
                row[key], row[f"{key}_spread"] = _mean_spread([r[key] for r in mine])
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """The table; with several seeds, MQAR accuracy and eval loss show mean ± half the range."""
    seeds = max((r.get("seeds", 1) for r in rows), default=1)
    acc_width, loss_width = (14, 16) if seeds > 1 else (10, 11)
    header = (f"{'method':<20}{'params':>9}{'train loss':>12}{'eval loss':>{loss_width}}{'tokens/s':>11}"
              f"{'step mem MB':>13}{'MQAR acc':>{acc_width}}{'1-hop ceil':>12}{'time s':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        acc, loss = f"{r['mqar_accuracy']:.3f}", f"{r['eval_loss']:.4f}"
        if seeds > 1:
            acc += f" ± {r.get('mqar_accuracy_spread', 0.0):.3f}"
            loss += f" ± {r.get('eval_loss_spread', 0.0):.3f}"
        lines.append(f"{r['method']:<20}{r['params']:>9.0f}{r['train_loss']:>12.4f}{loss:>{loss_width}}"
                     f"{r['tokens_per_second']:>11.0f}{r['step_memory_mb']:>13.1f}{acc:>{acc_width}}"
                     f"{r['mqar_ceiling']:>12.3f}{r['seconds']:>8.1f}")
    return "\n".join(lines)


def _plot(curves: dict[str, list[tuple[int, float]]], path: str, *, ylabel: str, title: str,
          hlines: dict[str, float] | None = None, ylim=None) -> None:
    """Line plot of ``name -> [(step, value)]``; ``hlines`` adds dashed reference lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        steps, values = zip(*points)
        ax.plot(steps, values, label=name)
    for label, value in (hlines or {}).items():
        ax.axhline(value, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(label, (0, value), xycoords=("axes fraction", "data"), fontsize=7, color="grey",
                    xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: str) -> None:
    _plot(curves, path, ylabel="train loss (nats / byte)",
          title="byte-level LM on the Python stdlib: attention methods")


def plot_mqar_curves(curves: dict[str, list[tuple[int, float]]], path: str, *, plateau: float,
                     ceilings: dict[str, float]) -> None:
    """MQAR eval accuracy per method, with the copy plateau and every ceiling below 1 marked."""
    hlines = {f"copy plateau {plateau:.2f}": plateau}
    for name, ceiling in ceilings.items():
        if ceiling < 0.999:
            hlines[f"{name} 1-hop ceiling {ceiling:.3f}"] = ceiling
    _plot(curves, path, ylabel="MQAR eval accuracy", title="MQAR: accuracy during training (seed 0 of the run)",
          hlines=hlines, ylim=(0, 1.02))


def run_method(name: str, size: dict, seed: int, quiet: bool) -> tuple[dict, list, list]:
    """Trains ``name``'s LM and MQAR model with ``seed``: its table row, LM loss curve, MQAR accuracy curve."""
    tick = time.perf_counter()
    params, lm = run_one(lm_config(name, size, seed), quiet)
    _, mqar = run_one(mqar_config(name, size, seed), quiet)
    train_curve = [(r["step"], r["loss"]) for r in lm.history if r["split"] == "train"]
    eval_final = [r for r in lm.history if r["split"] == "eval"][-1]
    mqar_curve = [(r["step"], r["accuracy"]) for r in mqar.history if r["split"] == "eval"]
    row = {"method": name, "seed": seed, "params": params, "train_loss": train_curve[-1][1],
           "eval_loss": eval_final["loss"], "tokens_per_second": lm.tokens_per_second or 0.0,
           "step_memory_mb": (lm.step_memory_bytes or 0) / 2**20, "mqar_accuracy": mqar_curve[-1][1],
           "mqar_ceiling": mqar_ceiling(name, size), "mqar_seconds": mqar.seconds,
           "seconds": time.perf_counter() - tick}
    return row, train_curve, mqar_curve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__)
    parser.add_argument("--big", action="store_true", help="GPU-sized models and runs")
    parser.add_argument("--methods", nargs="*", default=None, help=f"subset of {list(METHODS)}")
    parser.add_argument("--steps", type=int, default=None, help="LM training steps (overrides the size)")
    parser.add_argument("--mqar-steps", type=int, default=None, help="MQAR training steps")
    parser.add_argument("--out", default="demo_out",
                        help="folder for results.json, loss_curves.png and mqar_accuracy.png")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one or more seeds; with several the table shows mean ± half the range")
    parser.add_argument("--seed", type=int, default=None, help="a single seed (same as --seeds SEED)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else list(dict.fromkeys(args.seeds))
    size = dict(BIG if args.big else SMALL)
    if args.steps is not None:
        size["steps"] = args.steps
    if args.mqar_steps is not None:
        size["mqar_steps"] = args.mqar_steps
        size["mqar_eval_every"] = min(size["mqar_eval_every"], args.mqar_steps)
    names = list(METHODS) if args.methods is None else args.methods
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    registered = set(available_methods())
    skipped = [n for n in names if METHODS[n][0] not in registered]
    names = [n for n in names if n not in skipped]
    os.makedirs(args.out, exist_ok=True)

    began = time.perf_counter()
    runs, curves, mqar_curves = [], {}, {}
    for seed in seeds:
        for name in names:
            row, train_curve, mqar_curve = run_method(name, size, seed, args.quiet)
            runs.append(row)
            if seed == seeds[0]:
                curves[name], mqar_curves[name] = train_curve, mqar_curve
            print(f"[demo] {name} (seed {seed}): done in {row['seconds']:.1f}s, MQAR accuracy "
                  f"{row['mqar_accuracy']:.3f} (1-hop ceiling {row['mqar_ceiling']:.3f})", flush=True)
    rows = summarize(runs)
    plateau = mqar_copy_plateau(size["mqar_pairs"], MQAR(size["mqar_pairs"], vocab_size=size["mqar_vocab"]).value_vocab)
    plot_path = os.path.join(args.out, "loss_curves.png")
    mqar_path = os.path.join(args.out, "mqar_accuracy.png")
    plot_curves(curves, plot_path)
    plot_mqar_curves(mqar_curves, mqar_path, plateau=plateau, ceilings={r["method"]: r["mqar_ceiling"] for r in rows})
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"size": size, "seeds": seeds, "mqar_copy_plateau": plateau, "rows": rows, "runs": runs,
                   "curves": curves, "mqar_curves": mqar_curves, "skipped": skipped}, f, indent=2)
    import jax
    print(f"\njattn demo ({'big' if args.big else 'small'}; backend {jax.default_backend()}; seeds {seeds}; "
          f"LM {size['steps']} steps x {size['batch_size']} x {size['seq_len']} bytes, "
          f"MQAR {size['mqar_steps']} steps x {size['mqar_batch']}, {size['mqar_pairs']} pairs, lr {size['mqar_lr']})")
    print(format_table(rows))
    print(f"MQAR: copy plateau {plateau:.3f} (a model that copies a random context value, ignoring the key). "
          f"1-hop ceil: the accuracy the method's\nmask allows when each query reads its pair's value "
          f"directly and guesses otherwise; a 2-layer windowed model above it relays\npairs through an "
          f"intermediate position (two hops).")
    if skipped:
        print(f"skipped (method not available): {skipped}")
    print(f"loss curves: {plot_path}; MQAR accuracy: {mqar_path}; total {time.perf_counter() - began:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
