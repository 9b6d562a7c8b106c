"""Experiment configs: Python files in ``configs/`` that define ``get_config() -> dict``.

``python -m train --config configs/NAME.py key=value ...``; dotted keys reach nested sections
(``train.steps=50``, ``model.method_config.window=16``). Values are Python literals when they parse
(``3e-4``, ``True``, ``(1, 2)``, ``{'window': 8}``) and strings otherwise.
"""
from __future__ import annotations

import ast
import copy
import importlib.util
import os
from typing import Any, Sequence

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "seed": 0,
    "task": {"kind": "text", "seq_len": 128, "max_bytes": 2_000_000},
    "model": {"kind": "decoder_lm", "dim": 64, "num_layers": 2, "num_heads": 4, "method": "softmax",
              "method_config": {}},
    "optim": {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 10, "weight_decay": 0.1, "b1": 0.9,
              "b2": 0.95, "clip_norm": 1.0, "min_lr_ratio": 0.1, "decay_fraction": 0.2},
    "train": {"steps": 100, "batch_size": 16, "grad_accum": 1, "log_every": 10, "eval_every": 0,
              "eval_batches": 2, "checkpoint_every": 0, "out_dir": None, "resume": True, "progress": True},
}


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; ``update`` wins. Neither input is modified. A section whose ``kind`` changes
    (another task or model) replaces the base section instead of merging into it."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        replaced = isinstance(value, dict) and isinstance(out.get(key), dict) and \
            "kind" in value and value["kind"] != out[key].get("kind")
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not replaced:
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(path: str) -> dict:
    """Loads ``get_config()`` from a Python file and fills in :data:`DEFAULTS`."""
    if not isinstance(path, str) or not path.endswith(".py"):
        raise ValueError(f"config must be a path to a .py file, got {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"jattn_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path!r} must define get_config() -> dict")
    config = module.get_config()
    if not isinstance(config, dict):
        raise TypeError(f"get_config() in {path!r} must return a dict, got {type(config).__name__}")
    return merge(DEFAULTS, config)


def parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    """Applies ``key=value`` strings; an unknown top-level section is an error (likely a typo)."""
    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"overrides must look like key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] not in config:
            raise ValueError(f"override {item!r}: unknown key {parts[0]!r}; known: {sorted(config)}")
        node = config
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = parse_value(text)
    return config
