"""Command line: load a config, apply overrides, train, run the config's analysis, print a summary.

A config that names its own experiment script (``RUNNER = "train.<module>"``: the vision table, MIL, detection,
...) is handed to that script: ``python -m train --config configs/vision_ela.py`` runs
``python -m train.vision_modules --config configs/vision_ela.py``, with any further arguments passed on."""
from __future__ import annotations

import argparse
import json
import os
import sys

from train.checkpoint import CheckpointMismatchError
from train.build import build_model, build_task, count_params
from train.config import apply_overrides, check_config, config_runner, load_config
from train.loop import train

# A config that ships in configs/ (tests/train/test_loop.py checks the --help example exists).
EXAMPLE_CONFIG = "configs/lm_softmax.py"


def run_config(config: dict, *, quiet: bool = False) -> dict:
    """Trains what ``config`` describes and returns a summary (final train/eval metrics, analysis)."""
    task = build_task(config["task"])
    model = build_model(config["model"], task, int(config["seed"]))
    result = train(config, model, task, quiet=quiet)
    summary = {"name": config.get("name"), "params": count_params(model), "steps": result.step,
               "seconds": round(result.seconds, 2), "tokens_per_second": result.tokens_per_second,
               "step_memory_bytes": result.step_memory_bytes,
               "final_train": next((r for r in reversed(result.history) if r["split"] == "train"), None),
               "final_eval": next((r for r in reversed(result.history) if r["split"] == "eval"), None)}
    analysis = config.get("analysis")
    if analysis:
        from train.experiments import run_analysis
        summary["analysis"] = run_analysis(analysis, result.model(), task, config)
        if analysis.get("kind") == "icl" and config["train"].get("out_dir"):
            from train.experiments import save_icl_pattern_plot
            os.makedirs(config["train"]["out_dir"], exist_ok=True)
            save_icl_pattern_plot(result.model(), os.path.join(config["train"]["out_dir"], "kq_ov.png"))
    out_dir = config["train"].get("out_dir")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=float)
    return summary


def run_runner(runner: str, config_path: str, argv) -> int:
    """``python -m train --config X ...`` for a config that names its experiment script (``RUNNER``): the same
    as ``python -m <RUNNER> --config X ...``."""
    import importlib

    result = importlib.import_module(runner).main(["--config", config_path, *argv])
    return result if isinstance(result, int) else 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    known, rest = first.parse_known_args(argv)
    if known.config and os.path.isfile(known.config) and known.config.endswith(".py"):
        runner = config_runner(known.config)
        if runner is not None:
            return run_runner(runner, known.config, rest)
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("--config", required=True, help=f"path to a config file, e.g. {EXAMPLE_CONFIG}")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=50 (unknown keys are errors)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        config = check_config(apply_overrides(load_config(args.config), args.overrides))
    except (ValueError, TypeError, FileNotFoundError) as err:  # a bad config path, key or override
        parser.error(str(err))
    if config["train"].get("out_dir") is None:
        config["train"]["out_dir"] = os.path.join("runs", config.get("name", "run"))
    try:
        summary = run_config(config, quiet=args.quiet)
    except CheckpointMismatchError as err:  # one message, not a traceback through orbax
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=float))
    return 0
