"""``python -m train.graph_moe``: the P53 experiment: a small byte-level MoE LM (top-1 of 4 SwiGLU experts per
block) with standard softmax gating vs attention-aware vs similarity-aware gating, at equal steps, over seeds.

Model (``GraphMoELM``): pre-norm blocks ``x += Attn(LN x)``, ``x += MoE(LN x)``; ``jattn.nn.Attention`` (RoPE,
causal) run as ``project`` -> ``jattn.attention`` -> ``finish``, so its post-RoPE ``(q, k)`` reach the MoE and the
attention-aware gate is ``mean_h softmax(q k^T / sqrt(D)) P`` through ``jattn.attention`` with ``v = P`` (no dense map).
The similarity gate mixes with ``softmax(x W_s x^T / tau)`` (causal). Every part of a block is drawn from its own
seeded stream, so the three variants of a seed start from identical attention/expert/router weights (the
similarity variant adds only ``W_s``).

Data: ``train.data.ByteCorpus`` (the stdlib's own source; last 10 % held out); the same batches for every variant.
Objective: next-byte CE + ``0.01 x`` MoH's load-balance loss on ``p~`` (mean over layers). AdamW, linear warm-up,
clip 1.0. Reported per run: held-out CE (nats/byte); mean gate entropy of ``p~`` (the gate that routes) and of the
tokens' own ``p``; the routing fluctuation rate (the spec's "works" metric: the fraction of held-out tokens x layers
whose top-1 expert differs between the checkpoint ``fluct_gap`` steps before the end and the final one); the
largest expert's share of tokens. Paired differences to ``standard`` use ``train.moh.paired_summary``.

Run: ``python -m train.graph_moe --config configs/graph_moe.py [--seeds 0,1,2] [--steps N] [--out f.json]``.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jattn.methods.routing.graph_moe import GATES, AttentionAwareMoE, gate_entropy
from jattn.methods.routing.moh import LOAD_BALANCE_WEIGHT
from jattn.nn.attention import Attention
from jattn.ops.attention import attention
from train.config import fill_defaults, seeds_variants_main
from train.config import read_config as load_config  # noqa: F401  (the scripts' public name)
from train.data import ByteCorpus
from train.moh import paired_summary

DEFAULTS = dict(seq_len=64, dim=48, layers=2, heads=4, experts=4, hidden=96, top_k=1, batch=16, steps=120,
                lr=3e-3, warmup=20, fluct_gap=20, eval_batches=2, eval_batch=32, seeds="0,1,2",
                variants="standard,attention,similarity", impl="xla", max_bytes=400_000, mix="prob")
INT_KEYS = ("seq_len", "dim", "layers", "heads", "experts", "hidden", "top_k", "batch", "steps", "warmup",
            "fluct_gap", "eval_batches", "eval_batch", "max_bytes")


def check_config(config: dict) -> dict:
    """``config`` with defaults filled; an unknown key or a bad value raises ``ValueError`` naming the key."""
    cfg = fill_defaults(config, DEFAULTS, sorted(DEFAULTS))
    for key in INT_KEYS:
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"config key {key!r} must be an int >= 1, got {cfg[key]!r}")
    if isinstance(cfg["lr"], bool) or not isinstance(cfg["lr"], (int, float)) or cfg["lr"] <= 0:
        raise ValueError(f"config key 'lr' must be a float > 0, got {cfg['lr']!r}")
    if cfg["dim"] % cfg["heads"]:
        raise ValueError(f"config key 'heads' ({cfg['heads']}) must divide 'dim' ({cfg['dim']})")
    if cfg["top_k"] > cfg["experts"]:
        raise ValueError(f"config key 'top_k' ({cfg['top_k']}) must be <= 'experts' ({cfg['experts']})")
    if cfg["fluct_gap"] >= cfg["steps"]:
        raise ValueError(f"config key 'fluct_gap' ({cfg['fluct_gap']}) must be < 'steps' ({cfg['steps']})")
    bad = [v for v in str(cfg["variants"]).split(",") if v not in GATES]
    if bad:
        raise ValueError(f"config key 'variants' must name gates among {GATES}, got {bad}")
    if cfg["mix"] not in ("prob", "logit"):
        raise ValueError(f"config key 'mix' must be 'prob' or 'logit', got {cfg['mix']!r}")
    return cfg


class GraphMoEBlock(nnx.Module):
    def __init__(self, dim, heads, experts, hidden, *, seed: int, gate: str, top_k: int, mix: str, impl: str):
        self.attn_norm = nnx.RMSNorm(dim, rngs=nnx.Rngs(0))
        self.moe_norm = nnx.RMSNorm(dim, rngs=nnx.Rngs(0))
        self.attention = Attention(dim, heads, rngs=nnx.Rngs(seed), causal=True, rope=True, method="softmax",
                                   impl=impl)
        self.moe = AttentionAwareMoE(dim, hidden, experts, rngs=nnx.Rngs(seed + 1), top_k=top_k, gate=gate, mix=mix,
                                     causal=True, impl=impl)
        self.impl = impl

    def __call__(self, x, positions):
        h = self.attn_norm(x)
        q, k, v = self.attention.project(h, positions)
        o = attention(q, k, v, causal=True, impl=self.impl)
        x = x + self.attention.finish(h, o)
        y, info = self.moe(self.moe_norm(x), qk=(q, k))
        return x + y, info


class GraphMoELM(nnx.Module):
    """``tokens [B, T] -> (logits [B, T, 256], infos)``: one routing ``info`` dict per block."""

    def __init__(self, *, seed: int, dim: int, layers: int, heads: int, experts: int, hidden: int, gate: str,
                 top_k: int = 1, mix: str = "prob", impl: str = "xla"):
        self.embed = nnx.Embed(ByteCorpus.vocab_size, dim, rngs=nnx.Rngs(seed))
        self.blocks = nnx.List([GraphMoEBlock(dim, heads, experts, hidden, seed=1000 * seed + 10 * (i + 1), gate=gate,
                                              top_k=top_k, mix=mix, impl=impl) for i in range(layers)])
        self.final_norm = nnx.RMSNorm(dim, rngs=nnx.Rngs(0))

    def __call__(self, tokens):
        x = self.embed(tokens)
        positions = jnp.arange(tokens.shape[1])[None]
        infos = []
        for block in self.blocks:
            x, info = block(x, positions)
            infos.append(info)
        return self.embed.attend(self.final_norm(x)).astype(jnp.float32), infos


def routing_stats(infos) -> dict:
    """Mean entropies of ``p~`` and ``p``, the top-1 experts ``[L, B, T]`` and the largest expert share."""
    experts = jnp.stack([i["expert"] for i in infos])
    E = infos[0]["p"].shape[-1]
    share = jnp.mean(jax.nn.one_hot(experts, E), axis=(0, 1, 2))
    return {"entropy_tilde": jnp.mean(jnp.stack([gate_entropy(i["p_tilde"]).mean() for i in infos])),
            "entropy_own": jnp.mean(jnp.stack([gate_entropy(i["p"]).mean() for i in infos])),
            "experts": experts, "max_share": jnp.max(share)}


def train_run(gate: str, *, seed: int, corpus: ByteCorpus, cfg: dict) -> dict:
    model = GraphMoELM(seed=seed, dim=cfg["dim"], layers=cfg["layers"], heads=cfg["heads"], experts=cfg["experts"],
                       hidden=cfg["hidden"], gate=gate, top_k=cfg["top_k"], mix=cfg["mix"], impl=cfg["impl"])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    warm = max(1, cfg["warmup"])
    schedule = optax.join_schedules([optax.linear_schedule(0.0, cfg["lr"], warm), optax.constant_schedule(cfg["lr"])],
                                    [warm])
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = optimizer.init(params)

    def forward(params, inputs):
        return nnx.merge(graphdef, params, rest)(inputs)

    def loss_fn(params, inputs, targets):
        logits, infos = forward(params, inputs)
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
        aux = jnp.mean(jnp.stack([i["aux"] for i in infos]))
        return ce + LOAD_BALANCE_WEIGHT * aux, ce

    @jax.jit
    def step(params, opt_state, inputs, targets):
        (_, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, inputs, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, ce

    @jax.jit
    def evaluate(params, inputs, targets):
        logits, infos = forward(params, inputs)
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
        return ce, routing_stats(infos)

    evals = [corpus.batch(1234, j, cfg["eval_batch"], split="eval") for j in range(cfg["eval_batches"])]
    start = time.perf_counter()
    snapshot = None
    ce = jnp.nan
    for i in range(cfg["steps"]):
        if i == cfg["steps"] - cfg["fluct_gap"]:
            snapshot = params
        b = corpus.batch(seed, i, cfg["batch"])
        params, opt_state, ce = step(params, opt_state, b["inputs"], b["targets"])
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    final = [evaluate(params, e["inputs"], e["targets"]) for e in evals]
    before = [evaluate(snapshot, e["inputs"], e["targets"]) for e in evals]
    changed = np.mean([float(jnp.mean(f[1]["experts"] != s[1]["experts"])) for f, s in zip(final, before)])
    return {"variant": gate, "seed": seed, "eval_ce": float(np.mean([float(f[0]) for f in final])),
            "final_train_ce": float(ce),
            "entropy_tilde": float(np.mean([float(f[1]["entropy_tilde"]) for f in final])),
            "entropy_own": float(np.mean([float(f[1]["entropy_own"]) for f in final])),
            "fluctuation": float(changed),
            "max_share": float(np.mean([float(f[1]["max_share"]) for f in final])),
            "seconds": round(seconds, 1)}


def summarize(rows: list[dict], baseline: str = "standard") -> dict:
    """``paired_summary`` of eval CE plus, per variant, mean ± std over seeds of entropy / fluctuation / max share
    and the paired difference of the fluctuation rate to ``baseline``."""
    out = paired_summary(rows, baseline)
    base = {r["seed"]: r for r in rows if r["variant"] == baseline}
    for variant, entry in out.items():
        mine = [r for r in rows if r["variant"] == variant]
        for key in ("entropy_tilde", "entropy_own", "fluctuation", "max_share"):
            vals = np.array([r[key] for r in mine])
            entry[key + "_mean"] = float(vals.mean())
            entry[key + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        diffs = np.array([r["fluctuation"] - base[r["seed"]]["fluctuation"] for r in mine if r["seed"] in base])
        if variant != baseline and len(diffs):
            entry["fluct_diff_mean"] = float(diffs.mean())
            entry["fluct_diff_std"] = float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0
    return out


def format_table(summary: dict) -> list[str]:
    """The printed table: per gate, eval CE, its paired gap to ``standard``, the gate entropies, the fluctuation
    rate and its paired difference, the largest expert's share."""
    lines = [f"{'gate':10s} {'eval CE':>16s} {'CE - standard':>16s} {'H(p~)':>14s} {'H(p)':>14s} "
             f"{'fluctuation':>14s} {'fluct - std':>16s} {'max share':>9s}"]
    for variant, s in summary.items():
        gap = f"{s['gap_mean']:+.4f}±{s['gap_std']:.4f}" if "gap_mean" in s else "-"
        fd = f"{s['fluct_diff_mean']:+.4f}±{s['fluct_diff_std']:.4f}" if "fluct_diff_mean" in s else "-"
        lines.append(f"{variant:10s} {s['eval_ce_mean']:.4f}±{s['eval_ce_std']:.4f} {gap:>16s} "
                     f"{s['entropy_tilde_mean']:.3f}±{s['entropy_tilde_std']:.3f} "
                     f"{s['entropy_own_mean']:.3f}±{s['entropy_own_std']:.3f} "
                     f"{s['fluctuation_mean']:.4f}±{s['fluctuation_std']:.4f} {fd:>16s} {s['max_share_mean']:9.3f}")
    return lines


def setup(cfg: dict):
    """``run(seed, variants)``: the rows of one seed, every gate trained on one shared corpus."""
    corpus = ByteCorpus(cfg["seq_len"], max_bytes=cfg["max_bytes"])
    return lambda seed, variants: (train_run(variant, seed=seed, corpus=corpus, cfg=cfg) for variant in variants)


def main(argv=None) -> int:
    return seeds_variants_main(argv, description=__doc__.split("\n\n")[0], defaults=DEFAULTS,
                               check_config=check_config, setup=setup, summarize=summarize, table=format_table)


if __name__ == "__main__":
    raise SystemExit(main())
