"""``python -m train.moh``: the P02 MoH experiment: a small byte-level LM with Mixture-of-Head attention at 75 %
and 50 % active heads against plain MHA, at equal steps, over several seeds.

Model: :class:`jattn.nn.DecoderLM` (pre-norm, RoPE, SwiGLU, tied embedding, 256 byte tokens). The MoH variants
are the same model with every block's attention swapped for :class:`jattn.methods.routing.MoHAttention`
(``use_moh``: the projection weights of the same seed are kept, a learned router is added), so each seed
compares the two from identical initial projections. Head budgets (``H = 8`` by default):

* ``mha``: all 8 heads, gates 1.
* ``moh75``: 4 shared + top-2 of 4 routed = 6 of 8 heads per token.
* ``moh50``: 2 shared + top-2 of 6 routed = 4 of 8 heads per token.

Data: ``train.data.ByteCorpus`` (the Python stdlib's own source, no download; the last 10 % held out).
Objective: next-byte cross entropy plus, for MoH, ``0.01 x`` the layer-averaged load-balance loss (the paper's
coefficient). AdamW (no weight decay), constant learning rate after a short linear warm-up, gradient clip 1.0.
Every variant sees the same batches (a pure function of ``(seed, step)``). Reported: held-out cross entropy
(nats/byte, the LM loss only) on fixed eval batches, mean and sample std over seeds, the gap to MHA per seed,
the measured fraction of active heads and the final load-balance loss.

The MoH runs use the reference MoH core (all heads computed, then gated), as the official code trains;
``capacity_flop_fraction`` gives the attention-core FLOPs the gathered path would spend instead, and
``--flops T`` measures them (XLA's compiled cost analysis of both cores at T tokens, head dim 32).
``python -m train.moh --help`` lists the sizes; the default run (3 variants x 3 seeds) takes a few minutes on a
2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jattn.methods.routing.moh import (LOAD_BALANCE_WEIGHT, MoHAttention, capacity_flop_fraction, moh_attention,
                                       moh_aux_loss, moh_capacity, moh_capacity_attention, use_moh)
from jattn.nn.models import DecoderLM
from train.data import ByteCorpus

DEFAULTS = dict(seq_len=64, dim=64, layers=2, heads=8, batch=16, steps=200, lr=3e-3, warmup=30, eval_batches=4,
                eval_batch=32, seeds="0,1,2", variants="mha,moh75,moh50", impl="reference", max_bytes=400_000)

# variant -> (num_shared, top_k) as fractions of the heads: resolved by head_budget
VARIANTS = {"mha": None, "moh75": (0.5, 0.25), "moh50": (0.25, 0.25)}


def head_budget(variant: str, heads: int) -> tuple[int, int] | None:
    """``(num_shared, top_k)`` of a variant for ``heads`` heads (None for MHA)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    if VARIANTS[variant] is None:
        return None
    shared, routed = VARIANTS[variant]
    h_s, k = int(round(shared * heads)), max(1, int(round(routed * heads)))
    if not 0 <= h_s < heads or k > heads - h_s:
        raise ValueError(f"variant {variant!r} does not fit heads={heads}: num_shared={h_s}, top_k={k}")
    return h_s, k


def build_model(variant: str, *, seed: int, dim: int, layers: int, heads: int, impl: str) -> DecoderLM:
    """The LM of ``variant``; every variant of a seed starts from the same projections."""
    model = DecoderLM(ByteCorpus.vocab_size, dim, layers, heads, rngs=nnx.Rngs(seed), method_config={"impl": impl})
    budget = head_budget(variant, heads)
    if budget is not None:
        use_moh(model, num_shared=budget[0], top_k=budget[1], router="learned", rngs=nnx.Rngs(seed + 10_000))
    return model


def _cross_entropy(logits, targets):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def active_head_fraction(model: DecoderLM, tokens) -> float:
    """Mean over layers, tokens and heads of ``gate != 0`` (1.0 for MHA)."""
    fractions = []
    x = model.embed(tokens).astype(model.dtype)
    for block in model.blocks:
        attn = block.attention
        normed = block.attn_norm(x)
        if isinstance(attn, MoHAttention):
            gates, _ = attn.gates(normed)
            fractions.append(jnp.mean((gates != 0).astype(jnp.float32)))
        x = block(x)
    return float(jnp.mean(jnp.stack(fractions))) if fractions else 1.0


def train_run(variant: str, *, seed: int, corpus: ByteCorpus, steps: int, batch: int, lr: float, warmup: int,
              dim: int, layers: int, heads: int, impl: str, eval_batches: int, eval_batch: int) -> dict:
    """Trains one variant for ``steps`` steps; returns its held-out loss and routing statistics."""
    model = build_model(variant, seed=seed, dim=dim, layers=layers, heads=heads, impl=impl)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, max(1, warmup)), optax.constant_schedule(lr)],
                                    [max(1, warmup)])
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = optimizer.init(params)

    def loss_fn(params, rest, inputs, targets):
        m = nnx.merge(graphdef, params, rest)
        ce = _cross_entropy(m(inputs), targets)
        aux = moh_aux_loss(m)
        return ce + LOAD_BALANCE_WEIGHT * aux, (ce, aux)

    @jax.jit
    def step(params, opt_state, rest, inputs, targets):
        (_, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, inputs, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, ce, aux

    @jax.jit
    def eval_ce(params, rest, inputs, targets):
        return loss_fn(params, rest, inputs, targets)[1][0]

    start = time.perf_counter()
    ce = aux = jnp.nan
    for i in range(steps):
        b = corpus.batch(seed, i, batch)
        params, opt_state, ce, aux = step(params, opt_state, rest, b["inputs"], b["targets"])
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    evals = [corpus.batch(1234, j, eval_batch, split="eval") for j in range(eval_batches)]
    held_out = float(np.mean([float(eval_ce(params, rest, e["inputs"], e["targets"])) for e in evals]))
    nnx.update(model, params)
    budget = head_budget(variant, heads)
    row = {"variant": variant, "seed": seed, "eval_ce": held_out, "final_train_ce": float(ce),
           "final_aux": float(aux), "active_fraction": active_head_fraction(model, jnp.asarray(evals[0]["inputs"])),
           "seconds": round(seconds, 1)}
    if budget is not None:
        C = moh_capacity(corpus.seq_len, heads - budget[0], budget[1], 1.0)
        row["capacity_flop_fraction"] = capacity_flop_fraction(corpus.seq_len, heads, budget[0], C)
    return row


def core_flop_ratios(T: int, heads: int, head_dim: int, variants=("moh75", "moh50"), capacity_factor: float = 1.0,
                     impl: str = "reference") -> dict:
    """Compiled FLOPs (XLA ``cost_analysis``) of ``moh_capacity_attention`` over those of the all-heads core
    ``moh_attention`` (causal, batch 1, ``T`` tokens), next to the analytic ``capacity_flop_fraction``."""
    q = jnp.ones((1, T, heads, head_dim), jnp.float32)
    g = jnp.ones((1, T, heads), jnp.float32)

    def flops(fn):
        cost = jax.jit(fn).lower(q, g).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])
    dense = flops(lambda q_, g_: moh_attention(q_, q_, q_, g_, causal=True, impl=impl))
    out = {}
    for variant in variants:
        h_s, k = head_budget(variant, heads)
        C = moh_capacity(T, heads - h_s, k, capacity_factor)
        sparse = flops(lambda q_, g_: moh_capacity_attention(q_, q_, q_, g_, num_shared=h_s, capacity=C, causal=True,
                                                             impl=impl))
        out[variant] = {"capacity": C, "measured": sparse / dense,
                        "analytic": capacity_flop_fraction(T, heads, h_s, C)}
    return out


def paired_summary(rows: list[dict], baseline: str = "mha") -> dict:
    """Per variant: mean and sample std of eval CE over seeds, and of the per-seed gap to ``baseline``.

    Shared by the small-LM comparisons (``train.moh``, ``train.rcmha``): rows carry ``variant``, ``seed`` and
    ``eval_ce``."""
    out = {}
    base = {r["seed"]: r["eval_ce"] for r in rows if r["variant"] == baseline}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        ce = np.array([r["eval_ce"] for r in mine])
        entry = {"n": len(ce), "eval_ce_mean": float(ce.mean()),
                 "eval_ce_std": float(ce.std(ddof=1)) if len(ce) > 1 else 0.0}
        gaps = np.array([r["eval_ce"] - base[r["seed"]] for r in mine if r["seed"] in base])
        if variant != baseline and len(gaps):
            entry["gap_mean"] = float(gaps.mean())
            entry["gap_std"] = float(gaps.std(ddof=1)) if len(gaps) > 1 else 0.0
        out[variant] = entry
    return out


def summarize(rows: list[dict]) -> dict:
    """:func:`paired_summary` plus each variant's mean fraction of active heads."""
    out = paired_summary(rows)
    for variant, entry in out.items():
        entry["active_fraction"] = float(np.mean([r["active_fraction"] for r in rows if r["variant"] == variant]))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--out", default=None, help="write the rows and summary as JSON here")
    parser.add_argument("--flops", type=int, default=0, metavar="T",
                        help="only print the gathered core's compiled FLOPs relative to all heads at T tokens")
    args = vars(parser.parse_args(argv))
    flops_T = args.pop("flops")
    if flops_T:
        ratios = core_flop_ratios(flops_T, args["heads"], 32)
        for variant, r in ratios.items():
            print(f"{variant}: capacity {r['capacity']} of {flops_T} rows per routed head; attention-core FLOPs "
                  f"{r['measured']:.4f} of all heads (analytic {r['analytic']:.4f})")
        return 0
    seeds = [int(s) for s in args.pop("seeds").split(",") if s]
    variants = [v for v in args.pop("variants").split(",") if v]
    for v in variants:
        head_budget(v, args["heads"])
    out_path = args.pop("out")
    corpus = ByteCorpus(args.pop("seq_len"), max_bytes=args.pop("max_bytes"))
    rows = []
    for seed in seeds:
        for variant in variants:
            row = train_run(variant, seed=seed, corpus=corpus, **args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = summarize(rows)
    print(f"{'variant':8s} {'active':>7s} {'eval CE (nats/byte)':>22s} {'gap to MHA (paired)':>22s}")
    for variant, s in summary.items():
        gap = f"{s['gap_mean']:+.4f} ± {s['gap_std']:.4f}" if "gap_mean" in s else "-"
        ce = f"{s['eval_ce_mean']:.4f} ± {s['eval_ce_std']:.4f}"
        print(f"{variant:8s} {s['active_fraction']:7.3f} {ce:>22s} {gap:>22s}")
    if out_path:
        with open(out_path, "w") as f:
            json.dump({"args": {**args, "seeds": seeds, "variants": variants}, "rows": rows, "summary": summary}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
