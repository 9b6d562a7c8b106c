"""Dynamic-sparse selectors on real MiniLM attention inputs and at equal density on synthetic long inputs.

Issue 14 §2. Two tables and one figure, all from ``jattn.eval.sparse_quality`` (density of kept tiles --
of the causal tiles for the causal runs --, recall of the dense attention mass, output relative error vs
dense, selection / sparse attention / dense seconds, best of ``--repeats`` compiled runs, ``impl="xla"``):

1. **MiniLM, each paper's default budget.** q, k, v of all 6 layers of the real all-MiniLM-L6-v2 weights
   (``jattn.nn.pretrained.MiniLM``, packaged weights, nothing downloaded), captured with
   ``jattn.nn.capture.attention_inputs`` on 512 tokens of real text: the module docstrings of a fixed list
   of stdlib modules (``STDLIB_MODULES``), joined, tokenised and truncated to 512 tokens ([CLS] ... [SEP]).
   The 6 layers are stacked along the batch axis (``B = 6``, ``H = 12``, ``D = 32``), so every number is over
   all layers and heads (every selector here works per batch element, so this is the same as running the
   layers one by one; ZipVL's layer-wide token set and AdaSpa's head-adaptive rule are per batch element,
   i.e. per layer). MiniLM is a bidirectional encoder: the causal selectors (FlexPrefill, HiP, SALE,
   AnchorAttention, Kinetics, ZipVL) are run *causally* on its q, k, v (dense reference = causal attention
   on the same q, k, v, which is not what MiniLM computes), VMoBA and AdaSpa non-causally (reference =
   MiniLM's own attention; the text has no padding). Where a paper default exceeds T = 512 (block sizes,
   token budgets, dense fallbacks) it is scaled down by 4 (``MINILM``: each row says what changed), since at
   the literal defaults most selectors fall back to dense at this length.
2. **Synthetic long inputs, approximately equal density.** ``jattn.methods.dynamic.synthetic_long_qkv``
   (sink, 4 stripes, local band, slashes at offsets 64 and 512; B=1, T=4096, H=8, D=64, f32). For each
   selector one budget knob is swept over a short list (``EQUAL``) and the value whose density is closest to
   ``--target`` is used. The causal selectors run causally; VMoBA and AdaSpa non-causally on the same inputs
   (whose planted structure is the causal one: a non-causal query also sees the band and sink, and the
   slashes' mirror keys carry no planted mass).
3. **A small causal LM the project trains** (``--lm``): the byte-level ``DecoderLM`` of
   ``benchmarks/modifiers.py`` (dim 64, 2 layers x 4 heads, D = 16, RoPE; 300 steps on stdlib source at 128
   bytes, loaded from ``runs/modifiers_lm/seed<s>``, trained there on first use), q, k, v of both layers on 4
   held-out windows of ``LM_LENGTH`` bytes stacked on the batch axis, per seed. Here causal attention *is*
   what the model computes, so the causal selectors' reference is the model's own attention; the windows are
   4x its training length (its held-out loss there is 2.40 vs 1.75 nats/byte at 128: docs/modifiers.md).
   Same scaled-down budgets as table 1; mean over seeds.
4. ``docs/img/dynamic_selectors.png``: the dense map of one MiniLM head and each selector's tiles on it.

    .venv/bin/python benchmarks/dynamic_quality.py   # tables + PNG: ~4 min CPU time (10 min wall, loaded)
    .venv/bin/python benchmarks/dynamic_quality.py --skip-synthetic # MiniLM only
    .venv/bin/python -m benchmarks.dynamic_quality --skip-minilm --skip-synthetic --lm   # the trained LM only
"""
from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jattn.eval import sparse_quality
from jattn.methods.dynamic import (adaspa_block_mask, anchor_block_mask, flexprefill_block_mask, hip_block_mask,
                                   kinetics_block_mask, sale_block_mask, synthetic_long_qkv, vmoba_block_mask,
                                   zipvl_attention, zipvl_block_mask, zipvl_token_mask)
from jattn.ops.attention import attention

STDLIB_MODULES = ("argparse", "json", "functools", "collections", "itertools", "textwrap", "dataclasses",
                  "pathlib", "heapq", "bisect", "contextlib", "typing")

CAUSAL = ("flexprefill", "hip", "sale", "anchor", "kinetics", "zipvl")
# VMoBA's own ``select`` keyword ("threshold" / "topk") collides with sparse_quality's first parameter
# ``select``: it is bound here (the paper default, "threshold") instead of passed through **params.
SELECT = dict(flexprefill=flexprefill_block_mask, hip=hip_block_mask, sale=sale_block_mask, anchor=anchor_block_mask,
              kinetics=kinetics_block_mask, zipvl=zipvl_block_mask,
              vmoba=functools.partial(vmoba_block_mask, select="threshold"), adaspa=adaspa_block_mask)

# Table 1: each paper's default budget at T = 512 ((params, what differs from the paper/official default)).
MINILM = {
    "flexprefill": (dict(gamma=0.9, tau=0.1, min_budget=128, block_size=32),
                    "block 128->32, min_budget 512->128 (at the defaults T=512 hits the dense fallback)"),
    "hip": (dict(k_budget=128, block_q=32, block_k=16, window=32),
            "k_budget 512->128, window 128->32 (defaults cover all 512 keys)"),
    "sale": (dict(tau=0.004, block_q=16, block_k=16, local_window=32, dense_len=256),
             "blocks 64/32->16/16, local 128->32, dense_len 1024->256 (defaults: dense below 1024)"),
    "anchor": (dict(theta=12.0, block_size=32, step=4, block_q=32, block_k=32),
               "pool block 128->32, step 16->4 (big block 2048->128), tiles 128->32"),
    "kinetics": (dict(topk=16, block_q=16, block_size=16, sink=4, local=0),
                 "topk 64->16 blocks of 16 (the default 1024-token budget covers T), block_q 64->16"),
    "zipvl": (dict(tau=0.975, block_q=32, block_k=32), "tiles 64->32 (token-level rule unchanged)"),
    "vmoba": (dict(chunk_size=32, tau=0.25, mode="query_head", block_q=1),
              "1-D chunks of 32 tokens (text: no video grid; demo chunks are ~S/72 = 7)"),
    "adaspa": (dict(block_size=16, sparsity=0.8, text_len=0), "block 64->16 (8 blocks at 64)"),
}

# Table 2: fixed params and the swept knob per selector, synthetic T = 4096.
EQUAL = {
    "flexprefill": (dict(gamma=0.9, tau=0.1, block_size=64), "min_budget", (256, 512, 768, 1024)),
    "hip": (dict(block_q=64, block_k=64, window=128), "k_budget", (128, 256, 512)),
    "sale": (dict(block_q=64, block_k=64, local_window=128), "tau", (0.3, 0.1, 0.03)),
    "anchor": (dict(block_size=32, step=8, block_q=64, block_k=64), "theta", (0.0, 4.0, 8.0, 12.0)),
    "kinetics": (dict(block_q=64, block_size=64, sink=4, local=128), "topk", (2, 4, 8)),
    "zipvl": (dict(block_q=64, block_k=64), "tau", (0.7, 0.72, 0.75, 0.78)),
    "vmoba": (dict(chunk_size=64, mode="query_head", block_q=64), "tau", (0.1, 0.15, 0.2, 0.25)),
    "adaspa": (dict(block_size=64, text_len=0), "sparsity", (0.7, 0.75, 0.8)),
}


def stdlib_text() -> str:
    """The module docstrings of ``STDLIB_MODULES``, in that order, joined by blank lines."""
    return "\n\n".join(inspect.getdoc(importlib.import_module(name)) or "" for name in STDLIB_MODULES)


def minilm_qkv(max_length: int = 512):
    """``(q, k, v)`` ``[6, T, 12, 32]`` (layers stacked on the batch axis), the text and the dense maps."""
    from jattn.nn.capture import attention_inputs
    from jattn.nn.pretrained import MiniLM
    model = MiniLM(max_length=max_length, method_config={"impl": "reference"})
    ids, mask, types = model.tokenize([stdlib_text()])
    if ids.shape[1] != max_length or mask.min() != 1:
        raise RuntimeError(f"expected {max_length} unpadded tokens, got {ids.shape[1]} ({int(mask.sum())} real)")
    with attention_inputs(probs=True) as records:
        model.model(ids, mask, types)      # eager: the capture records outside jit only
    stack = lambda name: jnp.concatenate([getattr(r, name) for r in records], axis=0)
    return stack("q"), stack("k"), stack("v"), stack("probs")


LM_LENGTH = 512


def lm_qkv(seed: int, length: int = LM_LENGTH, windows: int = 4):
    """``(q, k, v)`` ``[layers * windows, length, 4, 16]`` of the trained small byte LM of ``seed``."""
    from benchmarks.modifiers import LM, train_lm
    from jattn.nn.capture import attention_inputs
    from train.data import ByteCorpus
    model = train_lm(seed, 300)
    inputs = ByteCorpus(length, max_bytes=LM["max_bytes"]).batch(4321, 0, windows, split="eval")["inputs"]
    with attention_inputs() as records:
        model(jnp.asarray(inputs))       # eager: the capture records outside jit only
    stack = lambda name: jnp.concatenate([getattr(r, name) for r in records], axis=0)  # noqa: E731
    return stack("q"), stack("k"), stack("v")


def lm_table(seeds, repeats: int) -> list[str]:
    """The causal selectors at table 1's budgets on the trained LM's q, k, v: mean over seeds per column."""
    results = {name: [] for name in CAUSAL}
    for seed in seeds:
        q, k, v = lm_qkv(seed)
        for name in CAUSAL:
            results[name].append(sparse_quality(SELECT[name], q, k, v, causal=True, impl="xla", repeats=repeats,
                                                **MINILM[name][0]))
    rows = []
    for name, runs in results.items():
        mean = {key: float(np.mean([r[key] for r in runs])) for key in runs[0] if isinstance(runs[0][key], float)}
        spread = {key: (max(r[key] for r in runs) - min(r[key] for r in runs)) / 2 for key in ("recall", "density")}
        rows.append(_row(name, mean, _fmt(MINILM[name][0]))
                    + f" recall ± {spread['recall']:.3f}, density ± {spread['density']:.3f} over seeds {list(seeds)} |")
        print(rows[-1], flush=True)
    return rows


def _row(name, r, params):
    total = r["select_seconds"] + r["attention_seconds"]
    return (f"| {name} | {'causal' if name in CAUSAL else 'non-causal'} | {params} | {r['density']:.3f} | "
            f"{r['recall']:.3f} | {r['rel_error']:.3g} | {r['select_seconds'] * 1e3:.1f} | "
            f"{r['attention_seconds'] * 1e3:.1f} | {r['dense_seconds'] * 1e3:.1f} | "
            f"{r['dense_seconds'] / total:.2f}x |")


def header(extra: str) -> str:
    return ("| selector | mode | params | density | recall | rel error | select ms | attention ms | dense ms "
            f"| dense / (select + attn) | {extra} |\n" + "|---" * 11 + "|")


def _fmt(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def density_of(block_mask, causal: bool) -> float:
    """The fraction of tiles kept (of the causal tiles when ``causal``), as ``sparse_quality`` counts it."""
    kept = np.asarray(block_mask.to_dense_block_map())
    nQ, nK = kept.shape[-2:]
    tiles = np.ones((nQ, nK), bool)
    if causal:
        tiles = (np.arange(nK)[None] * block_mask.block_k
                 <= np.arange(nQ)[:, None] * block_mask.block_q + block_mask.block_q - 1)
    kept = np.broadcast_to(kept, kept.shape[:-2] + (nQ, nK)) & tiles
    return float(kept.sum() / (kept.size / (nQ * nK) * tiles.sum()))


def _best(fn, args, repeats):
    out = jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best, out


def zipvl_token_quality(q, k, v, repeats: int, tau: float = 0.975) -> dict:
    """ZipVL measured on its exact token rule ``imp[t] & imp[s] & s <= t`` (``zipvl_attention``), not the tile
    cover: density = kept causal (t, s) pairs; recall = dense causal mass on them (mean over rows, an
    unimportant query row counts 0); error of ``zipvl_attention`` (unimportant rows output 0) vs dense; select
    = ``zipvl_token_mask``; attention = all of ``zipvl_attention`` (it selects again inside)."""
    select_s, (important, _) = _best(jax.jit(lambda q, k: zipvl_token_mask(q, k, tau=tau)), (q, k), repeats)
    attn_s, out = _best(jax.jit(lambda q, k, v: zipvl_attention(q, k, v, tau=tau, block=32, impl="xla")),
                        (q, k, v), repeats)
    dense_s, want = _best(jax.jit(lambda q, k, v: attention(q, k, v, causal=True, impl="xla")), (q, k, v), repeats)
    T, D = q.shape[1], q.shape[3]
    causal = jnp.tril(jnp.ones((T, T), bool))
    logits = jnp.einsum("bthd,bshd->bhts", q, k, precision=jax.lax.Precision.HIGHEST) * D ** -0.5
    probs = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
    keep = important[:, None, :, None] & important[:, None, None, :] & causal
    pairs = jnp.sum(important[:, :, None] & important[:, None, :] & causal, axis=(1, 2))
    return dict(density=float(jnp.mean(pairs) / (T * (T + 1) / 2)),
                recall=float(jnp.mean(jnp.sum(jnp.where(keep, probs, 0.0), -1))),
                rel_error=float(jnp.linalg.norm(out - want) / jnp.linalg.norm(want)),
                select_seconds=select_s, attention_seconds=attn_s, dense_seconds=dense_s)


def _head_density(block_mask, b: int, h: int, causal: bool) -> float:
    kept = np.asarray(block_mask.to_dense_block_map())[b, h]
    nQ, nK = kept.shape
    tiles = np.ones((nQ, nK), bool)
    if causal:
        tiles = (np.arange(nK)[None] * block_mask.block_k
                 <= np.arange(nQ)[:, None] * block_mask.block_q + block_mask.block_q - 1)
    return float((kept & tiles).sum() / tiles.sum())


def minilm_table(q, k, v, repeats: int) -> tuple[list[str], dict]:
    rows, masks = [], {}
    for name, (params, note) in MINILM.items():
        causal = name in CAUSAL
        r = sparse_quality(SELECT[name], q, k, v, causal=causal, impl="xla", repeats=repeats, **params)
        rows.append(_row(name, r, _fmt(params)) + f" {note} |")
        masks[name] = SELECT[name](q, k, **params)
        print(rows[-1], flush=True)
        if name == "zipvl":
            r = zipvl_token_quality(q, k, v, repeats, tau=params["tau"])
            rows.append(_row(name, r, "tau=0.975, token rule (zipvl_attention, block=32)")
                        + " exact token mask instead of its tile cover; attention ms includes selection |")
            print(rows[-1], flush=True)
    return rows, masks


def equal_density_table(q, k, v, target: float, repeats: int) -> list[str]:
    rows = []
    for name, (fixed, knob, values) in EQUAL.items():
        causal = name in CAUSAL
        select = jax.jit(functools.partial(SELECT[name], **fixed), static_argnames=(knob,))
        found = [(density_of(select(q, k, **{knob: value}), causal), value) for value in values]
        best = min(found, key=lambda dv: abs(dv[0] - target))[1]
        params = dict(fixed, **{knob: best})
        r = sparse_quality(SELECT[name], q, k, v, causal=causal, impl="xla", repeats=repeats, **params)
        sweep = ", ".join(f"{value}: {d:.2f}" for d, value in found)
        rows.append(_row(name, r, _fmt(params)) + f" {knob} (density): {sweep} |")
        print(rows[-1], flush=True)
    return rows


def plot(masks: dict, probs, q, k, layer: int, head: int, path: str) -> None:
    """The dense map of one MiniLM head, then each selector's tiles on it (ZipVL: its exact token mask)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from jattn.viz import plot_mask
    fig, axes = plt.subplots(3, 3, figsize=(13, 13))
    ax = axes.flat[0]
    p = np.asarray(probs[layer, head])
    ax.imshow(np.log10(np.maximum(p, 1e-6)), cmap="magma", interpolation="nearest")
    ax.set_title(f"MiniLM layer {layer} head {head}\ndense map, log10 prob (non-causal)", fontsize=10)
    for ax, (name, block_mask) in zip(axes.flat[1:], masks.items()):
        mode = "causal" if name in CAUSAL else "non-causal"
        if name == "zipvl":   # its tile cover is every causal tile here: draw the exact token rule instead
            important = np.asarray(zipvl_token_mask(q[layer:layer + 1], k[layer:layer + 1],
                                                    **{key: val for key, val in MINILM["zipvl"][0].items()
                                                       if key == "tau"})[0][0])
            T = important.shape[0]
            token = important[:, None] & important[None, :] & np.tril(np.ones((T, T), bool))
            plot_mask(token, ax=ax, grid=False)
            title = f"zipvl ({mode}), token mask: {token.sum() / (T * (T + 1) / 2):.2f} of causal pairs"
        else:
            h = head if block_mask.shape[1] > 1 else 0
            plot_mask(block_mask, ax=ax, batch=layer, head=h, view="elements", grid=False)
            d = _head_density(block_mask, layer, h, name in CAUSAL)
            title = (f"{name} ({mode}), tiles {block_mask.block_q}x{block_mask.block_k}: "
                     f"{d:.2f} of {'causal ' if name in CAUSAL else ''}tiles")
        ax.set_title(title, fontsize=9)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--T", type=int, default=4096, help="synthetic length")
    parser.add_argument("--target", type=float, default=0.25, help="synthetic density target")
    parser.add_argument("--layer", type=int, default=2, help="MiniLM layer of the figure")
    parser.add_argument("--head", type=int, default=0, help="MiniLM head of the figure")
    parser.add_argument("--png", default="docs/img/dynamic_selectors.png")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--plot-only", action="store_true", help="MiniLM capture and the PNG, no tables")
    parser.add_argument("--lm", action="store_true", help="also the trained small causal LM (table 3)")
    parser.add_argument("--lm-seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"backend={jax.default_backend()}, impl=xla, best of {args.repeats}\n")
    if not args.skip_minilm:
        q, k, v, probs = minilm_qkv()
        print(f"## MiniLM (all-MiniLM-L6-v2), {q.shape[0]} layers stacked as batch, T={q.shape[1]}, "
              f"H={q.shape[2]}, D={q.shape[3]}, f32; text: docstrings of {', '.join(STDLIB_MODULES)}\n")
        print(header("change from the default"))
        if args.plot_only:
            masks = {name: SELECT[name](q, k, **params) for name, (params, _) in MINILM.items()}
        else:
            _, masks = minilm_table(q, k, v, args.repeats)
        plot(masks, probs, q, k, args.layer, args.head, args.png)
        print(f"\nwrote {args.png} ({time.perf_counter() - start:.0f} s so far)\n")
    if not args.skip_synthetic and not args.plot_only:
        q, k, v, _ = synthetic_long_qkv(0, args.T, H=8, Hkv=8, D=64)
        print(f"## Synthetic (synthetic_long_qkv seed 0), B=1, T={args.T}, H=8, D=64, f32, target density "
              f"{args.target}\n")
        print(header("knob swept"))
        equal_density_table(q, k, v, args.target, args.repeats)
    if args.lm and not args.plot_only:
        print(f"## The trained small causal byte LM (benchmarks/modifiers.py), 2 layers x 4 windows stacked as batch, "
              f"T={LM_LENGTH}, H=4, D=16, f32; causal = the model's own attention\n")
        print(header("spread"))
        lm_table(args.lm_seeds, args.repeats)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
