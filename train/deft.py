"""``python -m train.deft``: the P25 DEFT experiment on all-MiniLM-L6-v2 (real weights, no download).

Model: :class:`jattn.nn.pretrained.MiniLM`'s BertEncoder made DEFT by
:func:`jattn.methods.objectives.deft.apply_deft`: LoRA (``r=8``, ``alpha=16`` on the attention query and value
matrices, ``B=0`` init) with every base weight frozen, and MLPs that sow their GELU activation ``[B, T, 1536]``.

Data: English lines (comments and docstring lines, 6-30 words, no code punctuation) of the Python stdlib
corpus (:func:`train.data.stdlib_corpus`); every ``eval_every``-th line is held out. Sentences are tokenised
by MiniLM's own tokenizer, truncated/padded to ``seq_len`` tokens.

Objective: keep the sentence embeddings (mean-pooled over real tokens, L2-normalised) of the frozen original
model: ``L_task = mean_b (1 - cos(e_student, e_teacher))``, plus ``weight x L_d`` (``density_loss``, eps=1e-7,
means over real tokens). ``weight=0`` is the baseline: the same LoRA, steps, data and optimizer without DEFT.
Optimiser: AdamW (``train.optim.make_optimizer``) on the ``nnx.LoRAParam`` leaves only.

Reported on ``eval_sentences`` held-out sentences, before and after: per layer and mean, the exact density
(``count_nonzero``, the paper's metric), the ``|a| > tol`` density, the fraction ``a > 0`` and the smooth
surrogate; and the embedding drift, the mean cosine between original and finetuned embeddings. Each
``(weight, seed)`` is one run; the summary gives mean and sample std over seeds.

``python -m train.deft --seeds 0 1 2 --weights 0 1 --out /tmp/deft.json [key=value ...]`` (keys of
``configs/deft_minilm.py``, dotted: ``train.steps=100``).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.methods.objectives import deft
from jattn.nn.models import l2_normalize, mean_pool
from train.data import batch_rng, stdlib_corpus
from train.config import CONFIG_DIR, parse_value, read_config
from train.optim import make_optimizer

CONFIG = os.path.join(CONFIG_DIR, "deft_minilm.py")
_CODE_CHARS = re.compile(r"[=(){}\[\]<>_*/\\|`@$%^~#]")


# ----------------------------------------------------------------------------------------------- data
def english_lines(max_bytes: int = 2_000_000, *, min_words: int = 6, max_words: int = 30) -> list[str]:
    """English comment and docstring lines of the stdlib corpus, deduplicated, in corpus order."""
    if isinstance(min_words, bool) or not isinstance(min_words, int) or min_words < 1:
        raise ValueError(f"min_words must be an int >= 1, got {min_words!r}")
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < min_words:
        raise ValueError(f"max_words must be an int >= min_words={min_words}, got {max_words!r}")
    text = stdlib_corpus(max_bytes).tobytes().decode("utf-8", "replace")
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            line = line.lstrip("#").strip()
        elif line.startswith(('"""', "'''")):
            line = line[3:].strip()
        line = line.rstrip("\"'").strip()
        if not line or not line.isascii() or not line[0].isalpha() or _CODE_CHARS.search(line):
            continue
        if not min_words <= len(line.split()) <= max_words:
            continue
        if sum(c.isalpha() or c == " " for c in line) < 0.9 * len(line):
            continue
        lines.append(line)
    return list(dict.fromkeys(lines))


def split_lines(lines: list[str], eval_every: int = 10) -> tuple[list[str], list[str]]:
    """``(train, eval)``: every ``eval_every``-th line (index ``% eval_every == eval_every - 1``) is held out."""
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 2:
        raise ValueError(f"eval_every must be an int >= 2, got {eval_every!r}")
    held = [s for i, s in enumerate(lines) if i % eval_every == eval_every - 1]
    kept = [s for i, s in enumerate(lines) if i % eval_every != eval_every - 1]
    return kept, held


def tokenize_fixed(tokenizer, sentences: list[str], seq_len: int) -> dict[str, np.ndarray]:
    """``input_ids``, ``attention_mask``, ``token_type_ids`` int32 ``[N, seq_len]`` (truncated, padded)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 3:
        raise ValueError(f"seq_len must be an int >= 3, got {seq_len!r}")
    if isinstance(sentences, str) or not sentences:
        raise TypeError(f"sentences must be a non-empty list of str, got {sentences!r:.80}")
    out = {k: np.zeros((len(sentences), seq_len), np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    for row, encoding in enumerate(tokenizer.encode_batch(list(sentences))):
        ids = list(encoding.ids)[:int(sum(encoding.attention_mask))]  # the tokenizer may pad: drop it
        if len(ids) > seq_len:  # keep [CLS] ... and the final [SEP]
            ids = ids[:seq_len - 1] + ids[-1:]
        out["input_ids"][row, :len(ids)] = ids
        out["attention_mask"][row, :len(ids)] = 1
    return out


# ---------------------------------------------------------------------------------------------- model
def embed(model, batch):
    """Normalised mean-pooled sentence embeddings ``[B, D]`` (the sentence-transformers pipeline)."""
    hidden = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return l2_normalize(mean_pool(hidden, batch["attention_mask"]))


def cosine_loss(student, teacher):
    """``mean_b (1 - <s_b, t_b>)`` of normalised embeddings ``[B, D]``."""
    return jnp.mean(1.0 - jnp.sum(student * teacher, axis=-1))


def make_loss(graphdef, *, eps: float = deft.DEFAULT_EPS, mask_padding: bool = True):
    """``loss(lora, rest, batch, weight) -> (total, metrics)``; ``batch`` holds the tokens and ``teacher [B, D]``;
    ``weight`` (lambda, a float32 scalar) is an argument so that one compiled step serves every weight."""

    def loss(lora, rest, batch, weight):
        model = nnx.merge(graphdef, lora, rest)
        student = embed(model, batch)
        acts = deft.pop_activations(model)
        task = cosine_loss(student, batch["teacher"])
        mask = batch["attention_mask"] if mask_padding else None
        total, density = deft.deft_loss(task, acts, weight=weight, eps=eps, mask=mask)
        return total, {"task_loss": task, "density_loss": density}

    return loss


def make_step(loss, optimizer):
    """``step(lora, opt_state, rest, batch, weight) -> (lora, opt_state, metrics)``: gradients reach ``lora`` only."""
    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def step(lora, opt_state, rest, batch, weight):
        (total, metrics), grads = grad_fn(lora, rest, batch, weight)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        lora = jax.tree.map(jnp.add, lora, updates)
        return lora, opt_state, {**metrics, "loss": total}

    return step


def embed_and_acts(model, batch):
    """``(embeddings [B, D], per-layer MLP activations [B, T, F])`` of a DEFT model."""
    emb = embed(model, batch)
    return emb, deft.pop_activations(model)


_embed_and_acts = nnx.jit(embed_and_acts)


def measure(model, batch, *, eps: float, tol: float, mask_padding: bool = True) -> dict[str, np.ndarray]:
    """Per-layer densities ``[L]`` (exact, ``|a|>tol``, ``a>0``, surrogate) and the embeddings ``[B, D]``."""
    emb, acts = _embed_and_acts(model, batch)
    mask = batch["attention_mask"] if mask_padding else None
    rows = {"exact": [deft.activation_density(a, 0.0, mask) for a in acts],
            "tol": [deft.activation_density(a, tol, mask) for a in acts],
            "positive": [deft.positive_fraction(a, mask) for a in acts],
            "surrogate": [deft.density_surrogate(a, eps, mask) for a in acts]}
    out = {k: np.asarray([float(jnp.mean(v)) for v in values]) for k, values in rows.items()}
    out["embeddings"] = np.asarray(emb)
    return out


def deft_weight(weight) -> float:
    """``deft.weight`` checked: a finite float >= 0."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise ValueError(f"deft.weight must be a finite float >= 0, got {weight!r}")
    return float(weight)


def _take(data: dict, index) -> dict:
    return {k: jnp.asarray(v[index]) for k, v in data.items()}


def finetune(model, data: dict, config: dict, *, seed: int, quiet: bool = True):
    """Trains the ``nnx.LoRAParam`` leaves of the DEFT ``model`` (in place) on ``data`` (tokens + ``teacher``).

    Returns ``(model, history)``; ``history`` holds ``{step, loss, task_loss, density_loss}`` records."""
    tcfg, dcfg, ocfg = config["train"], config["deft"], dict(config["optim"])
    steps, batch_size = int(tcfg["steps"]), int(tcfg["batch_size"])
    optimizer, _ = make_optimizer(total_steps=steps, **ocfg)
    graphdef, lora, rest = nnx.split(model, deft.TRAINABLE, ...)
    opt_state = optimizer.init(lora)
    loss = make_loss(graphdef, eps=dcfg["eps"], mask_padding=dcfg.get("mask_padding", True))
    weight = jnp.float32(deft_weight(dcfg["weight"]))
    step_fn = jax.jit(make_step(loss, optimizer), donate_argnums=(0, 1))
    n = len(data["input_ids"])
    history = []
    for step in range(steps):
        index = batch_rng(seed, step).integers(0, n, size=batch_size)
        lora, opt_state, metrics = step_fn(lora, opt_state, rest, _take(data, index), weight)
        if (step + 1) % tcfg.get("log_every", 50) == 0 or step + 1 == steps or step == 0:
            record = {"step": step + 1, **{k: float(v) for k, v in metrics.items()}}
            history.append(record)
            if not quiet:
                print(json.dumps(record), flush=True)
    nnx.update(model, lora)
    return model, history


# ------------------------------------------------------------------------------------------ experiment
def load_config(overrides=(), path: str = CONFIG) -> dict:
    config = read_config(path)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"overrides must look like key=value, got {item!r}")
        key, text = item.split("=", 1)
        node, parts = config, key.strip().split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:depth]) or "the config"
                known = sorted(node) if isinstance(node, dict) else []
                raise ValueError(f"override {item!r}: {where} has no key {part!r} (keys: {known})")
            if depth == len(parts) - 1:
                node[part] = parse_value(text)
            else:
                node = node[part]
    return config


class Experiment:
    """The MiniLM, its tokenised train/eval sentences and the frozen model's embeddings (computed once)."""

    def __init__(self, config: dict):
        from jattn.nn.pretrained import MiniLM
        dcfg = config["data"]
        self.config = config
        self.minilm = MiniLM()
        self.graphdef, self.state = nnx.split(self.minilm.model)
        train_lines, eval_lines = split_lines(english_lines(dcfg["max_bytes"]), dcfg["eval_every"])
        train_lines, eval_lines = train_lines[:dcfg["train_sentences"]], eval_lines[:dcfg["eval_sentences"]]
        self.sizes = {"train_sentences": len(train_lines), "eval_sentences": len(eval_lines)}
        self.train = tokenize_fixed(self.minilm.tokenizer, train_lines, dcfg["seq_len"])
        self.eval = tokenize_fixed(self.minilm.tokenizer, eval_lines, dcfg["seq_len"])
        teacher = nnx.jit(embed)
        self.train["teacher"] = np.concatenate([
            np.asarray(teacher(self.minilm.model, _take(self.train, slice(i, i + 256))))
            for i in range(0, len(train_lines), 256)])

    def fresh(self, lora_seed: int):
        model = nnx.merge(self.graphdef, self.state)
        lcfg = self.config["lora"]
        return deft.apply_deft(model, rank=lcfg["rank"], alpha=lcfg["alpha"], targets=tuple(lcfg["targets"]),
                               seed=lora_seed)

    def evaluate(self, model) -> dict:
        dcfg = self.config["deft"]
        return measure(model, _take(self.eval, slice(None)), eps=dcfg["eps"], tol=dcfg["tol"],
                       mask_padding=dcfg.get("mask_padding", True))

    def run(self, weight: float, seed: int, *, quiet: bool = True) -> dict:
        config = copy.deepcopy(self.config)
        config["deft"]["weight"] = float(weight)
        model = self.fresh(seed)
        before = self.evaluate(model)
        began = time.perf_counter()
        model, history = finetune(model, self.train, config, seed=seed, quiet=quiet)
        seconds = time.perf_counter() - began
        after = self.evaluate(model)
        drift = float(np.mean(np.sum(before["embeddings"] * after["embeddings"], axis=-1)))
        row = {"weight": float(weight), "seed": seed, "seconds": round(seconds, 1), "cosine_to_original": drift,
               "history": history}
        for name in ("exact", "tol", "positive", "surrogate"):
            row[f"{name}_before"] = before[name].tolist()
            row[f"{name}_after"] = after[name].tolist()
            row[f"{name}_mean_before"] = float(before[name].mean())
            row[f"{name}_mean_after"] = float(after[name].mean())
        return row


def summarize(rows: list[dict]) -> list[dict]:
    """Per weight: mean and sample std over seeds of the mean densities after and the cosine drift."""
    out = []
    for weight in sorted({r["weight"] for r in rows}):
        group = [r for r in rows if r["weight"] == weight]
        entry = {"weight": weight, "seeds": [r["seed"] for r in group]}
        keys = ["cosine_to_original"] + [f"{n}_mean_{w}" for n in ("exact", "tol", "positive", "surrogate")
                                         for w in ("before", "after")]
        for key in keys:
            values = np.asarray([r[key] for r in group])
            entry[key] = [float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0]
        for name in ("tol", "positive", "surrogate"):
            per_layer = np.asarray([r[f"{name}_after"] for r in group])
            entry[f"{name}_per_layer_after"] = per_layer.mean(axis=0).round(4).tolist()
        entry[f"tol_per_layer_before"] = np.asarray(group[0]["tol_before"]).round(4).tolist()
        entry["positive_per_layer_before"] = np.asarray(group[0]["positive_before"]).round(4).tolist()
        out.append(entry)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--out", default=None, help="write the rows and summary as JSON here")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--config", default=CONFIG, help="config file (default configs/deft_minilm.py)")
    parser.add_argument("overrides", nargs="*", help="key=value (dotted keys of configs/deft_minilm.py)")
    args = parser.parse_args(argv)
    config = load_config(args.overrides, args.config)
    experiment = Experiment(config)
    print(json.dumps({"config": config, **experiment.sizes}), flush=True)
    rows = []
    for weight in args.weights:
        for seed in args.seeds:
            row = experiment.run(weight, seed, quiet=not args.verbose)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if "mean" in k or k in
                              ("weight", "seed", "seconds", "cosine_to_original")}), flush=True)
    summary = summarize(rows)
    for entry in summary:
        print(json.dumps(entry), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": config, "sizes": experiment.sizes, "rows": rows, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
