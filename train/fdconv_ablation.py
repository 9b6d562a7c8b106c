"""Why P47 FDConv trained slowly in docs/vision.md's table: each of the code's two Adam-unfriendly choices switched
alone, on the table's ``cnn`` row (``configs/vision_fdconv.py``: 13,500-parameter target, 150 steps, seeds 0, 1, 2).

    python -m train.fdconv_ablation [--variants code unit ...] [--seeds 0,1,2]

Each variant is a set of ``FDConv`` keyword arguments used for both stage convs (the row's
``fdconv_options``); the head width stays the one matched for the full layer, so the ``modulation=False`` rows
(no gate heads) hold fewer parameters. Prints one JSON line per variant: top-1 % per seed, mean, sample sd,
final training loss per seed.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from train import vision_modules
from train.config import CONFIG_DIR

VARIANTS = {
    "code": {},
    "static_code": {"modulation": False},
    "static_unit": {"modulation": False, "dft_scale": "unit"},
    "unit": {"dft_scale": "unit"},
    "filter_one": {"filter_gate_init": "one"},
    "unit_filter_one": {"dft_scale": "unit", "filter_gate_init": "one"},
}


def run_variant(name: str, seeds) -> dict:
    """Trains the fdconv row with ``VARIANTS[name]`` as its FDConv arguments; returns the row's numbers."""
    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {name!r}")
    row = vision_modules.check_config(vision_modules.load_config(os.path.join(CONFIG_DIR, "vision_fdconv.py")))
    hidden = vision_modules.match_params(row)[0]
    cfg = {**row, "fdconv_options": VARIANTS[name]}
    results = [vision_modules.train_one(cfg, seed, hidden=hidden)[1] for seed in seeds]
    top1 = [100 * r["test_top1"] for r in results]
    return {"variant": name, "kwargs": VARIANTS[name], "top1": [round(a, 1) for a in top1],
            "mean": round(float(np.mean(top1)), 1),
            "sd": round(float(np.std(top1, ddof=1)), 1) if len(top1) > 1 else 0.0,
            "final_loss": [round(r["final_loss"], 3) for r in results]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    for name in args.variants:
        print(json.dumps(run_variant(name, seeds)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
