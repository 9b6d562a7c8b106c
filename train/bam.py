"""``python -m train.bam``: the P36 BAM experiment: branch a dense byte LM into two domain experts, then compare
the BAM-upcycled MoE with the parameter-averaged dense model at equal further steps, over seeds.

Protocol (per seed; every phase sees batches that are a pure function of ``(seed, phase, step)``):

1. **seed**: a dense ``ParallelMoELM`` (one expert: parallel blocks ``x + Attn(LN x) + FFN(LN x)``, RoPE, tied
   embedding) trained ``seed_steps`` on mixed data (half of each batch from each domain).
2. **branch**: two copies trained ``branch_steps`` each, one on the *code* domain, one on the *comments* domain.
3. **merge** (both start from the two branches):

   * ``avg``: the dense model with every parameter averaged over the two branches (the baseline);
   * ``bam``: ``upcycle`` into a 2-expert model (soft mixture of attention experts with fresh routers, FFN experts
     with a fresh top-2 router; embedding, norms averaged); ``bam_kv``: the same with K/V shared (averaged).

   Each is trained ``further_steps`` more on mixed data with the same batches; held-out CE (nats/byte, mean of the
   two domains' eval splits) is recorded at step 0, at ``early`` and at the end.

Domains (no download): the stdlib byte corpus (``train.data.stdlib_corpus``) split by line: lines whose first
non-blank character is ``#`` (comments: mostly English) vs every other non-empty line (code); each domain's last
10 % is held out. The MoE has more parameters than the averaged model (two attention and FFN experts per block) and
costs about twice the FLOPs per token: the comparison is at equal steps and data, not equal compute.

Run: ``python -m train.bam --config configs/bam.py [--seeds 0,1,2] [--out f.json]``; ``--help`` lists the keys.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jattn.methods.routing.bam import ParallelMoELM, upcycle
from jattn.methods.routing.moh import LOAD_BALANCE_WEIGHT
from train.config import fill_defaults, seeds_variants_main
from train.config import read_config as load_config  # noqa: F401  (the scripts' public name)
from train.data import ByteCorpus, stdlib_corpus
from train.moh import paired_summary

DEFAULTS = dict(seq_len=48, dim=48, layers=2, heads=4, mlp_dim=96, batch=16, seed_steps=50, branch_steps=60,
                further_steps=60, early=15, lr=3e-3, warmup=10, eval_batches=2, eval_batch=32, seeds="0,1,2",
                variants="avg,bam", impl="xla", max_bytes=600_000)
INT_KEYS = ("seq_len", "dim", "layers", "heads", "mlp_dim", "batch", "seed_steps", "branch_steps", "further_steps",
            "early", "warmup", "eval_batches", "eval_batch", "max_bytes")
VARIANTS = ("avg", "bam", "bam_kv")


def check_config(config: dict) -> dict:
    """``config`` with defaults filled; an unknown key or a bad value raises ``ValueError`` naming the key."""
    cfg = fill_defaults(config, DEFAULTS, sorted(DEFAULTS))
    for key in INT_KEYS:
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < (0 if key == "early" else 1):
            raise ValueError(f"config key {key!r} must be an int >= 1, got {cfg[key]!r}")
    if isinstance(cfg["lr"], bool) or not isinstance(cfg["lr"], (int, float)) or cfg["lr"] <= 0:
        raise ValueError(f"config key 'lr' must be a float > 0, got {cfg['lr']!r}")
    if cfg["dim"] % cfg["heads"]:
        raise ValueError(f"config key 'heads' ({cfg['heads']}) must divide 'dim' ({cfg['dim']})")
    if cfg["batch"] % 2:
        raise ValueError(f"config key 'batch' must be even (half of a mixed batch per domain), got {cfg['batch']}")
    if cfg["early"] > cfg["further_steps"]:
        raise ValueError(f"config key 'early' ({cfg['early']}) must be <= 'further_steps' ({cfg['further_steps']})")
    bad = [v for v in str(cfg["variants"]).split(",") if v not in VARIANTS]
    if bad:
        raise ValueError(f"config key 'variants' must name variants among {VARIANTS}, got {bad}")
    return cfg


@functools.lru_cache(maxsize=4)
def domains(seq_len: int, max_bytes: int) -> dict[str, ByteCorpus]:
    """``{"code": ByteCorpus, "comments": ByteCorpus}``: the stdlib corpus split by line (see the module doc)."""
    lines = stdlib_corpus(max_bytes).tobytes().split(b"\n")
    comments = [ln for ln in lines if ln.lstrip().startswith(b"#")]
    code = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith(b"#")]
    return {name: ByteCorpus(seq_len, corpus=np.frombuffer(b"\n".join(part) + b"\n", np.uint8))
            for name, part in (("code", code), ("comments", comments))}


def batch_for(doms: dict, domain: str, seed: int, stream: int, step: int, batch: int) -> dict:
    """A training batch of ``domain`` ("code", "comments" or "mixed": half from each)."""
    if domain != "mixed":
        return doms[domain].batch(1000 * seed + stream, step, batch)
    halves = [doms[d].batch(1000 * seed + stream + 7 * i, step, batch // 2) for i, d in enumerate(("code", "comments"))]
    return {k: np.concatenate([h[k] for h in halves]) for k in ("inputs", "targets")}


def make_model(cfg: dict, num_experts: int, *, seed: int, kv_shared: bool = False) -> ParallelMoELM:
    return ParallelMoELM(ByteCorpus.vocab_size, cfg["dim"], cfg["layers"], cfg["heads"], num_experts,
                         rngs=nnx.Rngs(seed), mlp_dim=cfg["mlp_dim"], kv_shared=kv_shared, impl=cfg["impl"])


def make_optimizer(cfg: dict):
    """AdamW (no weight decay), linear warm-up then constant, clip 1.0; one object per (lr, warmup), so the jitted
    step (the optimizer is a static argument) compiles once per model shape."""
    return _optimizer(float(cfg["lr"]), max(1, int(cfg["warmup"])))


@functools.lru_cache(maxsize=8)
def _optimizer(lr: float, warm: int):
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))


def _loss(graphdef, params, rest, inputs, targets):
    logits, aux = nnx.merge(graphdef, params, rest)(inputs)
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    return ce + LOAD_BALANCE_WEIGHT * aux, ce


@functools.partial(jax.jit, static_argnums=(0, 1))
def _step(graphdef, optimizer, params, rest, opt_state, inputs, targets):
    (_, ce), grads = jax.value_and_grad(functools.partial(_loss, graphdef), has_aux=True)(params, rest, inputs,
                                                                                          targets)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, ce


@functools.partial(jax.jit, static_argnums=0)
def _eval_ce(graphdef, params, rest, inputs, targets):
    return _loss(graphdef, params, rest, inputs, targets)[1]


def train(model, cfg: dict, doms: dict, *, domain: str, steps: int, seed: int, stream: int,
          checkpoints: tuple[int, ...] = ()) -> tuple[nnx.Module, dict]:
    """Trains ``model`` (in place) ``steps`` steps on ``domain``; returns it and ``{step: eval}`` at checkpoints."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = make_optimizer(cfg)
    opt_state = optimizer.init(params)
    evals = {}
    for i in range(steps + 1):
        if i in checkpoints:
            nnx.update(model, params)
            evals[i] = evaluate(model, cfg, doms)
        if i == steps:
            break
        b = batch_for(doms, domain, seed, stream, i, cfg["batch"])
        params, opt_state, _ = _step(graphdef, optimizer, params, rest, opt_state, b["inputs"], b["targets"])
    nnx.update(model, params)
    return model, evals


def evaluate(model, cfg: dict, doms: dict) -> dict:
    """Held-out CE per domain and their mean (``mixed``) on fixed eval batches."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    out = {}
    for name, corpus in doms.items():
        vals = [float(_eval_ce(graphdef, params, rest, b["inputs"], b["targets"]))
                for b in (corpus.batch(4321, j, cfg["eval_batch"], split="eval") for j in range(cfg["eval_batches"]))]
        out[name] = float(np.mean(vals))
    out["mixed"] = float(np.mean([out["code"], out["comments"]]))
    return out


def pure_params(model) -> dict:
    return nnx.state(model, nnx.Param).to_pure_dict()


def merged_model(variant: str, branches: list, cfg: dict, *, seed: int):
    """The ``avg`` dense model or the ``bam`` / ``bam_kv`` upcycled MoE built from the branch models."""
    dense = [pure_params(b) for b in branches]
    if variant == "avg":
        model = make_model(cfg, 1, seed=seed)
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), 0), *dense))
    else:
        kv = variant == "bam_kv"
        model = make_model(cfg, len(branches), seed=seed + 77, kv_shared=kv)   # fresh routers
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, upcycle(dense, state.to_pure_dict(), kv_shared=kv))
    nnx.update(model, state)
    return model


def run_seed(seed: int, cfg: dict, variants: list[str]) -> list[dict]:
    doms = domains(cfg["seq_len"], cfg["max_bytes"])
    start = time.perf_counter()
    seed_model, _ = train(make_model(cfg, 1, seed=seed), cfg, doms, domain="mixed", steps=cfg["seed_steps"], seed=seed,
                          stream=1)
    seed_state = pure_params(seed_model)
    branches, branch_evals = [], {}
    for i, domain in enumerate(("code", "comments")):
        m = make_model(cfg, 1, seed=seed)
        state = nnx.state(m, nnx.Param)
        nnx.replace_by_pure_dict(state, seed_state)
        nnx.update(m, state)
        m, ev = train(m, cfg, doms, domain=domain, steps=cfg["branch_steps"], seed=seed, stream=2 + i,
                      checkpoints=(cfg["branch_steps"],))
        branches.append(m)
        branch_evals[domain] = ev[cfg["branch_steps"]]
    rows = []
    marks = (0, cfg["early"], cfg["further_steps"])
    for variant in variants:
        model = merged_model(variant, branches, cfg, seed=seed)
        _, evals = train(model, cfg, doms, domain="mixed", steps=cfg["further_steps"], seed=seed, stream=9,
                         checkpoints=marks)
        rows.append({"variant": variant, "seed": seed, "eval_ce": evals[cfg["further_steps"]]["mixed"],
                     "ce_at_0": evals[0]["mixed"], "ce_early": evals[cfg["early"]]["mixed"],
                     "final": evals[cfg["further_steps"]], "branches": branch_evals,
                     "params": int(sum(x.size for x in jax.tree.leaves(pure_params(model)))),
                     "seconds": round(time.perf_counter() - start, 1)})
    return rows


def summarize(rows: list[dict], baseline: str = "avg") -> dict:
    """``paired_summary`` of the final eval CE plus paired gaps to ``baseline`` at step 0 and at ``early``."""
    out = paired_summary(rows, baseline)
    for key in ("ce_at_0", "ce_early"):
        renamed = [dict(r, eval_ce=r[key]) for r in rows]
        for variant, entry in paired_summary(renamed, baseline).items():
            out[variant][key + "_mean"], out[variant][key + "_std"] = entry["eval_ce_mean"], entry["eval_ce_std"]
            if "gap_mean" in entry:
                out[variant][key + "_gap_mean"], out[variant][key + "_gap_std"] = entry["gap_mean"], entry["gap_std"]
    return out


def format_table(summary: dict) -> list[str]:
    """The printed table: mean ± std of the CE and the paired gap to ``avg`` at step 0, ``early`` and the end."""
    lines = [f"{'variant':8s} {'CE at 0':>16s} {'gap at 0':>16s} {'CE early':>16s} {'gap early':>16s} "
             f"{'CE final':>16s} {'gap final':>16s}"]
    for variant, e in summary.items():
        cells = []
        for key in ("ce_at_0", "ce_early", None):
            m, sd = (e["eval_ce_mean"], e["eval_ce_std"]) if key is None else (e[key + "_mean"], e[key + "_std"])
            g = ("gap" if key is None else key + "_gap")
            gap = f"{e[g + '_mean']:+.4f}±{e[g + '_std']:.4f}" if g + "_mean" in e else "-"
            cells += [f"{m:.4f}±{sd:.4f}", gap]
        lines.append(f"{variant:8s} " + " ".join(f"{c:>16s}" for c in cells))
    return lines


def main(argv=None) -> int:
    return seeds_variants_main(argv, description=__doc__.split("\n\n")[0], defaults=DEFAULTS,
                               check_config=check_config, summarize=summarize, table=format_table,
                               setup=lambda cfg: lambda seed, variants: run_seed(seed, cfg, variants))


if __name__ == "__main__":
    raise SystemExit(main())
