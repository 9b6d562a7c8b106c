"""Experiment configs: Python files in ``configs/`` that define ``get_config() -> dict``.

``python -m train --config configs/NAME.py key=value ...``; dotted keys reach nested sections
(``train.steps=50``, ``model.method_config.window=16``). Values are Python literals when they parse
(``3e-4``, ``True``, ``(1, 2)``, ``{'window': 8}``) and strings otherwise.

Every key is checked, at every level: a misspelt key (``train.stpes=5``) is an error that names the
closest valid key, never a silently ignored setting. ``train`` and ``optim`` take the keys of
:data:`DEFAULTS` (``optim`` also ``eps``); ``task``, ``model`` and ``analysis`` take what their ``kind``'s
builder takes (:func:`train.build.section_keys`). ``model.method_config`` is the attention method's own
keyword config, checked by the method when the model is built.
"""
from __future__ import annotations

import argparse
import ast
import copy
import difflib
import importlib.util
import json
import os
from typing import Any, Callable, Iterable, Sequence

# The repository's ``configs/`` folder (the shipped configs), wherever the process runs from.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "seed": 0,
    "task": {"kind": "text", "seq_len": 128, "max_bytes": 2_000_000},
    "model": {"kind": "decoder_lm", "dim": 64, "num_layers": 2, "num_heads": 4, "method": "softmax",
              "method_config": {}},
    "optim": {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 10, "weight_decay": 0.1, "b1": 0.9,
              "b2": 0.95, "clip_norm": 1.0, "min_lr_ratio": 0.1, "decay_fraction": 0.2,
              # The learning-rate schedule's horizon in steps. None: ``train.steps`` for a new run and, on
              # resume, the horizon stored with the checkpoint, so raising ``train.steps`` to continue a
              # run does not re-stretch its schedule (steps past the horizon run at the final rate).
              # Set it to stretch the schedule on purpose.
              "schedule_steps": None},
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


def config_module(path: str):
    """The config file at ``path`` executed as a module (it must define ``get_config() -> dict``)."""
    if not isinstance(path, str) or not path.endswith(".py"):
        raise ValueError(f"config must be a path to a .py file, got {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"jattn_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path!r} must define get_config() -> dict")
    return module


def config_runner(path: str) -> str | None:
    """The experiment module a config names with ``RUNNER = "train.<module>"`` (it reads its own keys, not the
    generic ``task/model/optim/train`` ones), or None for a generic ``python -m train`` config."""
    runner = getattr(config_module(path), "RUNNER", None)
    if runner is not None and (not isinstance(runner, str) or not runner.startswith("train.")):
        raise ValueError(f"RUNNER in {path!r} must name a train.<module>, got {runner!r}")
    return runner


def read_config(path: str) -> dict:
    """``get_config()`` of the file at ``path``, as written (no defaults merged): for experiment scripts."""
    config = config_module(path).get_config()
    if not isinstance(config, dict):
        raise TypeError(f"get_config() in {path!r} must return a dict, got {type(config).__name__}")
    return config


def fill_defaults(config: dict, defaults: dict, keys=None) -> dict:
    """``{**defaults, **config}`` for an experiment script's own flat config (the first step of its
    ``check_config``): ``config`` must be a dict (else ``TypeError``) whose keys all lie in ``keys`` (default:
    ``defaults``' keys; else ``ValueError`` naming the unknown keys and ``keys`` as given)."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    keys = tuple(defaults) if keys is None else keys
    unknown = sorted(set(config) - set(keys))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; expected keys among {keys}")
    return {**defaults, **config}


def _int_list(text: str) -> list[int]:
    return [int(s) for s in text.split(",")]


def add_seeds_steps_flags(parser):
    """Adds the ``--seeds 0,1,2`` (a list of ints; None when absent) and ``--steps N`` (None when absent) flags
    that override a config's ``seeds`` / ``steps`` in the experiment scripts with their own config files
    (``train.counting``, ``train.dcal``). Returns ``parser``."""
    parser.add_argument("--seeds", type=_int_list, default=None, help="override, e.g. 0,1,2")
    parser.add_argument("--steps", type=int, default=None, help="override the config's steps")
    return parser


def seeds_variants_main(argv, *, description: str, defaults: dict, check_config: Callable[[dict], dict],
                        setup: Callable, summarize: Callable[[list], dict], table: Callable[[dict], Iterable[str]]
                        ) -> int:
    """The ``main`` of an experiment script whose config is one flat dict holding ``seeds`` and ``variants`` as
    comma strings (``train.bam``, ``train.graph_moe``).

    Flags: ``--config FILE.py`` (its ``get_config()``, optional), a ``--<key>`` per key of ``defaults`` (``_``
    written ``-``, typed as the default; it overrides the file) and ``--out FILE.json``. ``check_config(config)``
    fills and checks the config; ``setup(cfg)`` returns ``run(seed, variants) -> rows`` (an iterable of dicts:
    each is printed as one JSON line as it arrives); then the lines of ``table(summarize(rows))`` are printed
    and ``--out`` gets ``{"config", "rows", "summary"}``. Returns 0."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="a configs/*.py with get_config() (keys as DEFAULTS)")
    for key, value in defaults.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=None)
    parser.add_argument("--out", default=None, help="write the rows and summary as JSON here")
    args = vars(parser.parse_args(argv))
    out_path, path = args.pop("out"), args.pop("config")
    config = read_config(path) if path else {}
    config.update({k: v for k, v in args.items() if v is not None})
    cfg = check_config(config)
    seeds = [int(s) for s in str(cfg["seeds"]).split(",") if s]
    variants = [v for v in cfg["variants"].split(",") if v]
    run = setup(cfg)
    rows = []
    for seed in seeds:
        for row in run(seed, variants):
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = summarize(rows)
    for line in table(summary):
        print(line)
    if out_path:
        with open(out_path, "w") as f:
            json.dump({"config": cfg, "rows": rows, "summary": summary}, f, indent=2)
    return 0


def load_config(path: str) -> dict:
    """Loads ``get_config()`` from a Python file and fills in :data:`DEFAULTS`."""
    return merge(DEFAULTS, read_config(path))


def parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# Top-level keys besides the DEFAULTS sections: the optional post-training analysis.
EXTRA_TOP_LEVEL = ("analysis",)
# optim keys make_optimizer takes that DEFAULTS leaves at their default.
EXTRA_OPTIM = ("eps",)
# Sections whose keys depend on their ``kind``; their default kind when it is not set.
KIND_SECTIONS = {"task": "text", "model": "decoder_lm", "analysis": None}
# Dict values that are free-form (checked by their consumer, not by key).
FREE_FORM = {("model", "method_config")}


def _known_keys(config: dict, path: tuple[str, ...]) -> tuple[str, ...] | None:
    """The keys the dict at ``path`` may hold, or None when any key goes (free-form, or an unknown kind
    that the builder will reject with the list of kinds)."""
    if path == ():
        return tuple(DEFAULTS) + EXTRA_TOP_LEVEL
    if path in FREE_FORM or len(path) > 1:
        return None
    section = path[0]
    if section == "train":
        return tuple(DEFAULTS["train"])
    if section == "optim":
        return tuple(DEFAULTS["optim"]) + EXTRA_OPTIM
    if section in KIND_SECTIONS:
        from train.build import section_keys
        node = config.get(section)
        kind = node.get("kind", KIND_SECTIONS[section]) if isinstance(node, dict) else KIND_SECTIONS[section]
        return section_keys(section, kind)
    return None


def _unknown_key_error(where: str, key: str, path: tuple[str, ...], known) -> ValueError:
    dotted = ".".join((*path, key))
    section = f"section {'.'.join(path)!r}" if path else "the top level"
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    hint = f"; did you mean {'.'.join((*path, close[0]))!r}?" if close else ""
    return ValueError(f"{where}unknown key {dotted!r}{hint} ({section} takes: {', '.join(sorted(known))})")


def check_config(config: dict) -> dict:
    """Raises ``ValueError`` for any key the run would not read (with the closest valid key); returns
    ``config``."""
    def walk(node: dict, path: tuple[str, ...]):
        known = _known_keys(config, path)
        for key, value in node.items():
            if known is not None and key not in known:
                raise _unknown_key_error("config: ", key, path, known)
            if isinstance(value, dict) and known is not None:
                walk(value, (*path, key))
    walk(config, ())
    return config


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    """Applies ``key=value`` strings. An unknown key at any level is an error that names the closest
    valid key (see the module docstring); so is a dotted key that runs through a plain value."""
    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"overrides must look like key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = tuple(part.strip() for part in key.strip().split("."))
        if not all(parts):
            raise ValueError(f"override {item!r}: empty key part in {key!r}")
        node = config
        for depth, part in enumerate(parts):
            path = parts[:depth]
            known = _known_keys(config, path)
            if known is not None and part not in known:
                raise _unknown_key_error(f"override {item!r}: ", part, path, known)
            if depth == len(parts) - 1:
                node[part] = parse_value(text)
                break
            if part not in node:
                node[part] = {}
            elif not isinstance(node[part], dict):
                raise ValueError(f"override {item!r}: {'.'.join(parts[:depth + 1])!r} is a value "
                                 f"({node[part]!r}), not a section with keys")
            node = node[part]
    return config


def argparse_defaults(path: str, keys: dict) -> dict:
    """The argparse defaults a ``configs/*.py`` file sets for an experiment script with its own flags.

    ``keys`` maps each config section to the keys it reads: a name (the flag has the same name) or a
    ``(config key, flag name)`` pair. The config must pass :func:`check_config`; absent keys keep the script's
    own defaults."""
    config = check_config(load_config(path))
    out = {}
    for section, names in keys.items():
        for key in names:
            src, dst = key if isinstance(key, tuple) else (key, key)
            if src in config.get(section, {}):
                out[dst] = config[section][src]
    return out
