"""mkdocs hook (``hooks:`` in mkdocs.yml): tables rendered from the code at build time, so they cannot
go stale. A page asks for one with a marker line; an unknown marker fails the (strict) build.

* ``<!-- jattn:methods -->``: every ``jattn.nn.Attention(method=...)`` name in the method registry
  (``jattn.nn.methods``), with its config keys, their defaults and meaning (``AttentionMethod.options``);
* ``<!-- jattn:tile-defaults -->``: the default tile sizes of every op, read from the modules that use them;
* ``<!-- jattn:patterns -->``: the named patterns of ``jattn show-mask`` (``jattn.patterns``).
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- jattn:([a-z-]+) -->$", re.M)
log = logging.getLogger("mkdocs.plugins.jattn")

# Arguments every method adapter receives from Attention itself (not method config).
ADAPTER_ARGS = {"q", "k", "v", "causal", "mask", "scale", "return_probs", "initial_state",
                "return_final_state"}


def on_config(config, **kwargs):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return config


def on_page_markdown(markdown, page, config, files, **kwargs):
    def render(match):
        name = match.group(1)
        if name not in TABLES:
            log.warning("%s: unknown table marker %r (known: %s)", page.file.src_path, name, sorted(TABLES))
            return match.group(0)
        return TABLES[name]()
    return MARKER.sub(render, markdown)


# ------------------------------------------------------------------------------------ helpers

def _code(value) -> str:
    return f"`{value!r}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ methods

def _accepted_keys(method) -> tuple[str, ...] | None:
    """The config keys ``method.validate`` accepts, read from its unknown-key error (None: unknown)."""
    try:
        method.validate({"__jattn_docs_probe__": None})
    except TypeError as err:
        found = re.search(r"accepts (\(.*?\)|\[.*?\])", str(err))
        if found:
            try:
                return tuple(ast.literal_eval(found.group(1)))
            except (ValueError, SyntaxError):
                return None
    except Exception:  # noqa: BLE001 - a validator that fails for another reason tells us nothing
        return None
    return None


def _declared_config(method):
    """The registry's documented config, ``method.options`` (one ``Option(name, default, doc)`` per key).

    Returns ``[(key, default, meaning)]``, or None when the entry documents none (then the keys are read
    from ``validate`` and the defaults from ``apply``'s signature).
    """
    options = getattr(method, "options", None)
    if not options:
        return None
    return [(option.name, option.default, getattr(option, "doc", "") or "") for option in options]


def _config_rows(method):
    declared = _declared_config(method)
    if declared is not None:
        return declared, "registry"
    params = {name: p for name, p in inspect.signature(method.apply).parameters.items()
              if p.kind == p.KEYWORD_ONLY and name not in ADAPTER_ARGS}
    accepted = _accepted_keys(method)
    keys = list(accepted) if accepted is not None else list(params)
    rows = []
    for key in keys:
        p = params.get(key)
        rows.append((key, inspect.Parameter.empty if p is None else p.default, ""))
    return rows, "signature"


def _default_text(default) -> str:
    from jattn.nn import methods as registry

    required = getattr(registry, "REQUIRED", inspect.Parameter.empty)
    if default is inspect.Parameter.empty or default is required:
        return "**required**"
    return _code(default)


def methods_table() -> str:
    from jattn.nn import methods as registry

    names = registry.available_methods()
    rows = []
    for name in names:
        method = registry.get_method(name)
        config, _ = _config_rows(method)
        keys = "<br>".join(f"`{key}` = {_default_text(default)}" + (f": {_cell(meaning)}" if meaning else "")
                           for key, default, meaning in config) or "(no config keys)"
        decode = {"kv": "KV cache", "state": "recurrent state", None: "no"}.get(method.cache, str(method.cache))
        probs = "yes" if getattr(method, "supports_probs", True) else "no"
        rows.append([f"`{name}`", _cell(getattr(method, "description", "") or ""), keys, decode, probs])
    header = ["`method=`", "what it runs", "config keys = default", "decoding", "`return_probs`"]
    return (f"{len(names)} methods are registered (rendered from `jattn.nn.methods` when this site was "
            f"built).\n\n" + _table(header, rows))


# ------------------------------------------------------------------------------------ tile sizes

def tile_defaults_table() -> str:
    from jattn.ops import attention as attention_op
    from jattn.ops import linear as linear_op
    from jattn.ops import neighborhood as na_op
    from pallas_kernels import attention as flash

    rows = []
    xla_q, xla_k = attention_op.DEFAULT_BLOCKS["xla"]
    rows.append(["`jattn.attention`", "xla (every platform; what `auto` runs on CPU)", f"`block_q={xla_q}, block_k={xla_k}`",
                 "`attention(block_q=, block_k=)`"])
    for target, where in (("triton", "pallas, GPU (Triton) and the CPU interpreter"),
                          ("mosaic", "pallas, TPU (Mosaic)")):
        sizes = flash.DEFAULTS[target]
        text = ", ".join(f"{f.name}={getattr(sizes, f.name)}" for f in dataclasses.fields(sizes))
        rows.append(["`jattn.attention`", where, f"`{text}`",
                     "`attention(block_q=, block_k=)` sets the forward tiles; the backward tiles keep these "
                     "defaults (`pallas_kernels.attention.BlockSizes` sets all six)"])
    rows.append(["`jattn.block_sparse_attention`", "every impl", "the `BlockMask`'s `block_q`, `block_k`",
                 "the builder's `block_q`/`block_k`; in `Attention(method=...)`: `block_size` "
                 "(`block_sparse`) or `block` (the paper methods)"])
    chunk = inspect.signature(linear_op.linear_attention).parameters["chunk_size"].default
    rows.append(["`jattn.linear_attention`", "xla and pallas", f"`chunk_size={chunk}`; pallas value tile "
                 "`block_e = min(E padded, 64)`", "`linear_attention(chunk_size=)`; `block_e` only on "
                 "`jattn.ops.linear.linear_attention_pallas`"])
    for impl, table in (("xla", na_op.DEFAULT_XLA_TILES), ("pallas", na_op.DEFAULT_PALLAS_TILES)):
        text = ", ".join(f"{ndim}-D {tuple(tiles)}" for ndim, tiles in sorted(table.items()))
        rows.append(["`jattn.neighborhood_attention`", impl, f"`tile_shape`: {text}",
                     "`neighborhood_attention(tile_shape=)`"])
    return _table(["op", "impl / target", "default", "set with"], rows)


# ------------------------------------------------------------------------------------ patterns

def patterns_table() -> str:
    from jattn import patterns

    rows = [[f"`{p.name}`", _cell(p.help), _cell(patterns.describe_options(p))]
            for p in patterns.PATTERNS.values()]
    return _table(["`jattn show-mask NAME`", "pattern", "options (`--set key=value`)"], rows)


TABLES = {"methods": methods_table, "tile-defaults": tile_defaults_table, "patterns": patterns_table}
