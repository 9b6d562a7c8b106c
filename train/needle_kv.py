"""Needle in a haystack over long contexts: full KV cache vs compressed / selected caches at equal budget.

A small softmax ``DecoderLM`` is trained on ``train.tasks.NeedleInHaystack`` (``MARKER key value`` at a random
depth in random filler; the sequence ends with ``MARKER key`` and the model must produce ``value``). It is then
evaluated at contexts far longer than it was trained on. The prompt (everything before the final
``MARKER key``) is prefilled with full causal attention, as every method here does; the two final tokens
are the decode steps, and each method decides which prompt keys they may attend to, in every layer and head:

* ``full``: every key (the uncompressed cache);
* ``streaming``: the first ``sink`` keys and the last ``budget - sink`` (StreamingLLM; DuoAttention's
  streaming heads);
* ``h2o``: the last ``budget / 2`` keys plus the ``budget / 2`` earlier ones with the largest attention mass
  accumulated over the prompt's own queries (P70's H2O after prefill, summed over the query heads of a
  kv head);
* ``topk``: each kv head's ``budget`` keys with the largest logits from the decode query itself, in every
  layer (an upper bound for selection methods);
* ``tokenselect``: P44 TokenSelect's soft vote (``jattn.methods.kv.tokenselect.tokenselect_indices``): the
  first ``sink`` keys, the last ``budget / 4`` and the rest of the budget by the per-head softmax of the decode
  queries' mean (the fingerprint), summed over every head: one set for all heads, chosen in every layer.
  The model's keys are cached after RoPE, so the vote reads the exact logits (``rope_theta=None``; the
  official code caches keys before RoPE and rotates the fingerprint instead);
* ``tidaldecode``: P71 TidalDecode (``jattn.methods.kv.tidaldecode``): layer 0 is a token selection layer (full
  attention, and each query head's ``budget`` keys with the largest logits of each decode token), and the
  later layer attends only to the positions layer 0 chose ("position persistent"): with 2 layers,
  ``sparse_layer_start=0`` and no correction layer;
* ``int4``: every key, with K quantised per channel over groups of 32 tokens and V per token to 4 bits
  (KIVI-style, ``jattn.methods.kv.quantized``): 3.4x fewer bytes, not a token budget;
* ``zipcache``: every key, through P24 ZipCache's prefill compression (``compress_kv``: probe-normalised
  saliency, the 40 % least salient tokens at 2 bits and the rest at 4, channel-separable values): about 3.2
  bits per element, fewer bytes than ``int4``.

In every method the two decode tokens see each other (a causal tail), and a budget counts prompt keys.

    python -m train.needle_kv [--train-dir runs/needle_kv] [--contexts 1024 2048 4096 8192 16384] [--budget 256]

prints an accuracy table per method (contexts x needle depths, ``--samples`` haystacks per cell) and writes
``needle_kv.png`` (one heatmap per method) and the accuracies beside it (``needle_kv.json``).

The needle LM (2 layers, dim 64, 4 heads) is trained as a passkey-retrieval model: vocabulary 64, the
needle's key and value drawn from 16 ids of their own (``--needle-vocab``), the filler from the rest,
RoPE with base 1e6 (``--rope-theta``), 3000 steps at 64 tokens, then 300 steps at 1024 tokens
(``--finetune-len``; its checkpoints in ``<train-dir>_len1024``). The first recipe (64 tokens only,
vocabulary 32 shared by key, value and filler, RoPE base 1e4) learned the task at 64 tokens and was at chance
at 1K-16K even with the full cache. This one finds the needle at 1K-2K with the full cache (0.57-0.65 at 4K,
0.42 at 8K, 0.05-0.10 at 16K over two trainings; after the first stage alone: at 256 tokens, partly at 1K),
so the caches can be ranked there (docs/experiments.md; `make needle`, about 25-40 minutes on 2 cores). The
harness is tested in tests/train/test_needle_kv.py.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.core.reference import reference_attention
from jattn.methods.kv import quantized, tidaldecode, zipcache
from jattn.methods.kv.tokenselect import tokenselect_indices
from jattn.ops.attention import attention
from train.build import build_model, build_task
from train.config import DEFAULTS, check_config, merge
from train.loop import train
from train.tasks import NeedleInHaystack

METHODS = ("full", "streaming", "h2o", "topk", "tokenselect", "tidaldecode", "int4", "zipcache")
SELECTED_BY_LAYER = ("tidaldecode",)   # methods whose keep mask a later layer inherits
MARKER = NeedleInHaystack.MARKER


def needle_config(out_dir: str, steps: int, *, seq_len: int = 64, vocab_size: int = 32, lr: float = 1e-3,
                  batch_size: int = 64, needle_vocab: int = 0, rope_theta: float = 10000.0) -> dict:
    return check_config(merge(DEFAULTS, {
        "name": "needle_kv", "task": {"kind": "needle", "seq_len": seq_len, "vocab_size": vocab_size,
                                      "needle_vocab": needle_vocab},
        "model": {"kind": "decoder_lm", "dim": 64, "num_layers": 2, "num_heads": 4, "method": "softmax",
                  "method_config": {}, "rope_theta": rope_theta},
        "optim": {"lr": lr, "warmup_steps": 20},
        "train": {"steps": steps, "batch_size": batch_size, "log_every": 250, "eval_every": 250, "out_dir": out_dir,
                  "checkpoint_every": steps}}))


def haystack(rng, context: int, depth: float, vocab: int, needle_vocab: int = 0):
    """``[context]`` tokens ending in ``MARKER key``, and the value the model must produce (filler and needle
    ids as ``NeedleInHaystack(vocab_size=vocab, needle_vocab=needle_vocab)`` draws them)."""
    filler, needle = NeedleInHaystack(8, vocab, needle_vocab).ranges()
    tokens = rng.integers(*filler, size=context)
    key, value = rng.integers(*needle, size=2)
    at = int(depth * (context - 6))
    tokens[at:at + 3] = MARKER, key, value
    tokens[-2:] = MARKER, key
    return tokens, value


def prompt_mass(q, k, prompt: int, block: int = 512):
    """``[B, Hkv, prompt]``: attention probability each prompt key received from the prompt's own queries,
    summed over rows and over the query heads of its kv head (H2O's accumulated score)."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    qp, kp = q[:, :prompt], k[:, :prompt]
    rows = -(-prompt // block) * block
    qp = jnp.pad(qp, ((0, 0), (0, rows - prompt), (0, 0), (0, 0))).reshape(B, rows // block, block, H, D)

    def one(i):
        s = jnp.einsum("bqhd,bshd->bhqs", qp[:, i], jnp.repeat(kp, H // Hkv, axis=2)) * D ** -0.5
        q_idx = i * block + jnp.arange(block)
        s = jnp.where(jnp.arange(prompt)[None] <= q_idx[:, None], s, -jnp.inf)
        p = jax.nn.softmax(s, -1)
        p = jnp.where((q_idx < prompt)[:, None], p, 0.0)
        return p.sum(2).reshape(B, Hkv, H // Hkv, prompt).sum(2)
    return jnp.sum(jax.lax.map(one, jnp.arange(rows // block)), 0)


def keep_mask(method: str, q, k, prompt: int, budget: int, sink: int = 4):
    """``[B, H, prompt]`` (or ``[B, H, 2, prompt]``, per decode token) bool: the prompt keys the decode tokens
    may see in this layer."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    j = jnp.arange(prompt)
    if method in ("full", "int4", "zipcache") or budget >= prompt:
        return jnp.ones((B, H, prompt), bool)
    if method == "tokenselect":
        local = budget // 4                      # the newest keys: the two decode tokens and budget/4 - 2 prompt keys
        idx, valid = tokenselect_indices(q[:, prompt:], jnp.swapaxes(k, 1, 2), jnp.full((B,), T, jnp.int32),
                                         n_init=sink, n_local=local, top_k=budget + 2 - sink - local)
        chosen = jnp.zeros((B, T), bool).at[jnp.arange(B)[:, None], idx].max(valid)
        return jnp.broadcast_to(chosen[:, None, :prompt], (B, H, prompt))
    if method == "tidaldecode":                  # the selection layer's choice, per query head and decode token
        k_cache = jnp.swapaxes(k[:, :prompt], 1, 2)
        lengths = jnp.full((B,), prompt, jnp.int32)

        def rows(t):
            scores = tidaldecode.decode_scores(q[:, prompt + t], k_cache, lengths, scale=D ** -0.5)
            idx, valid = tidaldecode.select_topk_tokens(scores, lengths, k=budget)
            return jnp.zeros((B, H, prompt), bool).at[jnp.arange(B)[:, None, None], jnp.arange(H)[None, :, None],
                                                      idx].max(valid)
        return jnp.stack([rows(0), rows(1)], axis=2)
    if method == "streaming":
        return jnp.broadcast_to((j < sink) | (j >= prompt - (budget - sink)), (B, H, prompt))
    if method == "h2o":
        recent = budget // 2
        mass = jnp.where(j < prompt - recent, prompt_mass(q, k, prompt), -jnp.inf)
        top = jax.lax.top_k(mass, budget - recent)[1]                                 # [B, Hkv, n_hh]
        kept = jnp.zeros((B, Hkv, prompt), bool).at[jnp.arange(B)[:, None, None], jnp.arange(Hkv)[None, :, None],
                                                    top].set(True) | (j >= prompt - recent)
        return jnp.repeat(kept, H // Hkv, axis=1)
    if method == "topk":
        s = jnp.einsum("bthd,bshd->bhts", q[:, prompt:], jnp.repeat(k[:, :prompt], H // Hkv, axis=2))
        s = s.max(2).reshape(B, Hkv, H // Hkv, prompt).max(2)                          # per kv head
        top = jax.lax.top_k(s, budget)[1]
        kept = jnp.zeros((B, Hkv, prompt), bool).at[jnp.arange(B)[:, None, None], jnp.arange(Hkv)[None, :, None],
                                                    top].set(True)
        return jnp.repeat(kept, H // Hkv, axis=1)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def kivi_int4(x, group: int = 32):
    """``x [B, S, Hkv, D]`` through 4-bit KIVI-style storage: keys per channel per group of tokens."""
    B, S, Hkv, D = x.shape
    pad = -S % group
    g = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, (S + pad) // group, group, Hkv, D)
    return quantized.dequantize(*quantized.quantize(g, bits=4, axis=2)).reshape(B, S + pad, Hkv, D)[:, :S]


def zipcache_prompt(q, k, v, prompt: int, layer: int):
    """The prompt's K/V ``[B, prompt, Hkv, D]`` through ZipCache's prefill compression and back."""
    compressed = zipcache.compress_kv(q[:, :prompt], k[:, :prompt], v[:, :prompt], jax.random.PRNGKey(layer))
    return tuple(jnp.swapaxes(x, 1, 2).astype(k.dtype) for x in compressed.dequantized())


def layer_core(method: str, budget: int):
    """``core(q, k, v, layer, inherited) -> (out, keep)``: one layer's attention with ``method``'s cache;
    ``inherited`` is the keep mask a selection layer passed on (TidalDecode), else None."""
    def core(q, k, v, layer: int, inherited):
        T = q.shape[1]
        prompt = T - 2
        out_prompt = attention(q[:, :prompt], k[:, :prompt], v[:, :prompt], causal=True, impl="xla")
        if method == "int4":
            k = jnp.concatenate([kivi_int4(k[:, :prompt]), k[:, prompt:]], 1)
            v_prompt = v[:, :prompt]
            codes = quantized.quantize(v_prompt, bits=4, axis=3)                     # values per token
            v = jnp.concatenate([quantized.dequantize(*codes), v[:, prompt:]], 1)
        if method == "zipcache":
            k_prompt, v_prompt = zipcache_prompt(q, k, v, prompt, layer)
            k, v = (jnp.concatenate([a, b[:, prompt:]], 1) for a, b in ((k_prompt, k), (v_prompt, v)))
        if method in SELECTED_BY_LAYER and tidaldecode.layer_kind(layer, sparse_layer_start=0,
                                                                   correction_layer=None) == "sparse":
            kept = inherited
        else:
            kept = keep_mask(method, q, k, prompt, budget)
        B, H = kept.shape[:2]
        per_token = kept if kept.ndim == 4 else jnp.broadcast_to(kept[:, :, None], (B, H, 2, prompt))
        causal_tail = jnp.tril(jnp.ones((2, 2), bool))
        mask = jnp.concatenate([per_token, jnp.broadcast_to(causal_tail, (B, H, 2, 2))], -1)
        if method in SELECTED_BY_LAYER and kept is not inherited:
            mask = jnp.ones_like(mask).at[..., prompt:].set(causal_tail)   # a selection layer attends in full
        out_tail = reference_attention(q[:, prompt:], k, v, mask=mask)
        return jnp.concatenate([out_prompt, out_tail.astype(out_prompt.dtype)], 1), kept
    return core


def predict(model, tokens, method: str, budget: int):
    """The model's greedy next token after ``tokens [B, T]`` with ``method``'s cache for the last two."""
    x = model.embed(tokens).astype(model.dtype)
    positions = jnp.arange(tokens.shape[1])[None]
    core = layer_core(method, budget)
    kept = None
    for layer, block in enumerate(model.blocks):
        h = block.attn_norm(x)
        q, k, v = block.attention.project(h, positions)
        out, kept = core(q, k, v, layer, kept)
        x = x + block.attention.finish(h, out)
        x = x + block.mlp(block.mlp_norm(x))
    logits = model.embed.attend(model.final_norm(x[:, -1]))
    return jnp.argmax(logits, -1)


def evaluate_grid(model, *, contexts, depths, samples: int, budget: int, seed: int = 0, needle_vocab: int = 0,
                  methods=METHODS) -> dict:
    vocab = model.vocab_size
    results = {m: np.zeros((len(contexts), len(depths))) for m in methods}
    steps = {m: nnx.jit(lambda model, t, m=m: predict(model, t, m, budget)) for m in methods}
    for ci, context in enumerate(contexts):
        for di, depth in enumerate(depths):
            rng = np.random.default_rng([seed, context, di])
            batch = [haystack(rng, context, depth, vocab, needle_vocab) for _ in range(samples)]
            tokens = jnp.asarray(np.stack([t for t, _ in batch]), jnp.int32)
            values = np.array([v for _, v in batch])
            for m in methods:
                results[m][ci, di] = float(np.mean(np.asarray(steps[m](model, tokens)) == values))
    return results


def save_heatmaps(results, contexts, depths, path: str, budget: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(4, len(results))
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    for ax, (method, grid) in zip(axes.flat, results.items()):
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set_title(method if method in ("full", "int4", "zipcache") else f"{method} ({budget} keys)", fontsize=9)
        ax.set_xticks(range(len(depths)), [f"{d:.1f}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(contexts)), [f"{c // 1024}K" for c in contexts], fontsize=7)
        ax.set_xlabel("needle depth", fontsize=8)
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="w" if value < 0.6 else "k")
    for ax in axes[:, 0]:
        ax.set_ylabel("context", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _held_out(result) -> str:
    """The last held-out accuracy of a training run (none when it only resumed a finished checkpoint)."""
    evals = [record["accuracy"] for record in result.history if record["split"] == "eval"]
    return f"held-out accuracy {evals[-1]:.3f}" if evals else "resumed from its final checkpoint"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-dir", default="runs/needle_kv")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--needle-vocab", type=int, default=16,
                        help="key/value ids of their own (the last N ids), as in passkey retrieval; 0: shared")
    parser.add_argument("--rope-theta", type=float, default=1e6)
    parser.add_argument("--finetune-len", type=int, default=1024,
                        help="then train on haystacks of this length (its checkpoints in <train-dir>_len<N>)")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--finetune-batch", type=int, default=16)
    parser.add_argument("--finetune-lr", type=float, default=3e-4)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--png", default="needle_kv.png")
    args = parser.parse_args(argv)
    config = needle_config(args.train_dir, args.steps, seq_len=args.seq_len, vocab_size=args.vocab, lr=args.lr,
                           needle_vocab=args.needle_vocab, rope_theta=args.rope_theta)
    task = build_task(config["task"])
    start = time.time()
    result = train(config, build_model(config["model"], task, int(config["seed"])), task, quiet=True)
    model = result.model()
    trained_at = f"{args.steps} steps at {args.seq_len} tokens"
    if args.finetune_len:
        longer = needle_config(f"{args.train_dir}_len{args.finetune_len}", args.finetune_steps,
                               seq_len=args.finetune_len, vocab_size=args.vocab, lr=args.finetune_lr,
                               batch_size=args.finetune_batch, needle_vocab=args.needle_vocab,
                               rope_theta=args.rope_theta)
        result = train(longer, model, build_task(longer["task"]), quiet=True)
        model = result.model()
        trained_at += f", then {args.finetune_steps} at {args.finetune_len}"
    trained = time.time() - start
    results = evaluate_grid(model, contexts=args.contexts, depths=args.depths, samples=args.samples,
                            budget=args.budget, needle_vocab=args.needle_vocab)
    print(f"needle LM: {config['model']['num_layers']} layers, dim {config['model']['dim']}, RoPE theta "
          f"{args.rope_theta:g}, vocabulary {args.vocab} (needle ids {args.needle_vocab or 'shared'}), trained "
          f"{trained_at} ({trained:.0f} s, {_held_out(result)}); "
          f"budget {args.budget} keys; {args.samples} haystacks per cell; {time.time() - start:.0f} s in all")
    print("| method | " + " | ".join(f"{c // 1024}K" for c in args.contexts) + " |")
    print("|---|" + "---|" * len(args.contexts))
    for method, grid in results.items():
        print(f"| {method} | " + " | ".join(f"{row.mean():.2f}" for row in grid) + " |")
    save_heatmaps(results, args.contexts, args.depths, args.png, args.budget)
    table = os.path.splitext(args.png)[0] + ".json"
    with open(table, "w") as f:
        json.dump(dict(contexts=args.contexts, depths=args.depths, samples=args.samples, budget=args.budget,
                       accuracy={m: grid.tolist() for m, grid in results.items()}), f, indent=1)
    print(f"wrote {os.path.abspath(args.png)} and {os.path.abspath(table)}")
    return results


if __name__ == "__main__":
    main()
