"""A TransNormerLLM (P58) language model built from ``jattn.methods.linear.TNLBlock``, for the P58 experiment.

``tokens [B, T] -> logits [B, T, V]``: token embedding, ``num_layers`` TNL blocks (gated linear attention
with SiLU features, the official non-learnable decay, SRMSNorm and output gate; SGLU), a final SRMSNorm
and the tied embedding as output head. LRPE (learnable-angle relative position encoding) runs in the
layers listed in ``lrpe_layers`` (the paper: the first layer only); there is no other positional
encoding. ``python -m train.tnl --config configs/p58_tnl.py`` trains one (see :func:`main`).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from jattn.methods.linear import TNLBlock, srms_norm


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class TNLLM(nnx.Module):
    """A causal TransNormerLLM decoder (the HF ``modeling_transnormer.py`` layout, without embedding
    scaling): embed, ``TNLBlock`` x ``num_layers``, SRMSNorm, tied head."""

    def __init__(self, vocab_size: int, dim: int, num_layers: int, num_heads: int, *, rngs: nnx.Rngs,
                 mlp_dim: int | None = None, lrpe_layers: Sequence[int] = (0,), chunk_size: int = 64,
                 impl: str = "auto"):
        self.vocab_size = _positive("vocab_size", vocab_size)
        num_layers = _positive("num_layers", num_layers)
        lrpe_layers = tuple(lrpe_layers)
        bad = [layer for layer in lrpe_layers if not (isinstance(layer, int) and 0 <= layer < num_layers)]
        if bad:
            raise ValueError(f"lrpe_layers must hold layer indices in [0, num_layers={num_layers}), got {bad}")
        hidden = 4 * dim if mlp_dim is None else _positive("mlp_dim", mlp_dim)
        self.embed = nnx.Embed(self.vocab_size, _positive("dim", dim), rngs=rngs)
        self.blocks = nnx.List([
            TNLBlock(dim, _positive("num_heads", num_heads), hidden, layer=layer, num_layers=num_layers,
                     use_lrpe=layer in lrpe_layers, chunk_size=chunk_size, impl=impl, rngs=rngs)
            for layer in range(num_layers)])

    def __call__(self, tokens):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array [B, T], got shape {tokens.shape} dtype {tokens.dtype}")
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(srms_norm(x)).astype(jnp.float32)


def build_tnl_lm(cfg: dict, task, seed: int) -> TNLLM:
    """``model.kind = "tnl_lm"``: ``dim``, ``num_layers``, ``num_heads`` and optionally ``mlp_dim``,
    ``lrpe_layers``, ``chunk_size``, ``impl``; the vocabulary comes from the token task."""
    cfg = dict(cfg)
    cfg.pop("kind", None)
    if task.vocab_size is None:
        raise ValueError("model.kind='tnl_lm' needs a token task (text, mqar, needle, copy)")
    missing = [key for key in ("dim", "num_layers", "num_heads") if key not in cfg]
    if missing:
        raise ValueError(f"model.kind='tnl_lm' needs model.{missing[0]}")
    allowed = {"dim", "num_layers", "num_heads", "mlp_dim", "lrpe_layers", "chunk_size", "impl"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"model.kind='tnl_lm' got unknown settings {unknown}; it takes {sorted(allowed)}")
    return TNLLM(task.vocab_size, cfg.pop("dim"), cfg.pop("num_layers"), cfg.pop("num_heads"),
                 rngs=nnx.Rngs(seed), **cfg)


def main(argv=None) -> int:
    """Trains a ``tnl_lm`` config (e.g. configs/p58_tnl.py) and prints the same summary as ``python -m train``."""
    from train.build import build_task, count_params
    from train.config import apply_overrides, load_config
    from train.loop import train

    parser = argparse.ArgumentParser(prog="python -m train.tnl", description=main.__doc__)
    parser.add_argument("--config", required=True, help="a config whose model.kind is 'tnl_lm'")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=50")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    config = apply_overrides(load_config(args.config), args.overrides)
    if config["model"].get("kind") != "tnl_lm":
        parser.error(f"{args.config}: model.kind must be 'tnl_lm', got {config['model'].get('kind')!r}")
    out_dir = config["train"].get("out_dir") or os.path.join("runs", config.get("name", "run"))
    config["train"]["out_dir"] = out_dir
    task = build_task(config["task"])
    model = build_tnl_lm(config["model"], task, int(config["seed"]))
    result = train(config, model, task, quiet=args.quiet)
    summary = {"name": config.get("name"), "params": count_params(model), "steps": result.step,
               "seconds": round(result.seconds, 2), "tokens_per_second": result.tokens_per_second,
               "step_memory_bytes": result.step_memory_bytes,
               "final_train": next((r for r in reversed(result.history) if r["split"] == "train"), None),
               "final_eval": next((r for r in reversed(result.history) if r["split"] == "eval"), None)}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    print(json.dumps(summary, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
