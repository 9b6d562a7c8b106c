"""P16 AttentionInfluence on a model trained here: are the detected retrieval heads the ones retrieval needs?

The subject is the needle LM of ``train/needle_kv.py`` (2 layers x 4 heads, RoPE, trained on ``MARKER key
value ... MARKER key`` -> ``value`` at 64 tokens, where it reaches accuracy 1.0). Steps:

1. Retrieval scores (``retrieval_head_scores``) on ``--probe`` fresh needle prompts: the answer step is the last
   position (it reads ``MARKER key`` and must produce ``value``); a head copies when its attention from there
   peaks on the needle's value token.
2. Ablation (``uniform_head_ablation``: uniform causal attention, the running mean of v): needle accuracy on
   ``--samples`` held-out prompts with the top ``k`` retrieval heads ablated, against ``k`` random heads (mean and
   spread over ``--draws`` random draws), for k = 1, 2.
3. AttentionInfluence per "document": needle prompts against filler prompts (same tokens, no needle: their
   last token is unpredictable), with the last token's cross-entropy as the document loss and the top-2 heads
   ablated. The paper's claim in small: retrieval-bearing documents rank above the rest.

    python -m train.attention_influence [--steps 3000] [--train-dir runs/attention_influence]

prints the tables (docs/modifiers.md keeps the measured ones).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.methods.modifiers.attention_influence import (attention_influence, retrieval_head_scores, top_heads,
                                                         uniform_head_ablation)
from train.build import build_model, build_task
from train.loop import train
from train.needle_kv import MARKER, haystack, needle_config


def logits_with_ablation(model, tokens, head_mask):
    """The model's last-position logits with the heads in ``head_mask [L, H]`` ablated (uniform causal)."""
    x = model.embed(tokens).astype(model.dtype)
    positions = jnp.arange(tokens.shape[1])[None]
    for layer, block in enumerate(model.blocks):
        h = block.attn_norm(x)
        q, k, v = block.attention.project(h, positions)
        x = x + block.attention.finish(h, uniform_head_ablation(q, k, v, head_mask[layer], impl="xla"))
        x = x + block.mlp(block.mlp_norm(x))
    return model.embed.attend(model.final_norm(x[:, -1]))


def needle_batch(seed: int, n: int, seq_len: int, vocab: int):
    rng = np.random.default_rng(seed)
    batch = [haystack(rng, seq_len, rng.uniform(0.05, 0.9), vocab) for _ in range(n)]
    return jnp.asarray(np.stack([t for t, _ in batch]), jnp.int32), np.array([v for _, v in batch])


def filler_batch(seed: int, n: int, seq_len: int, vocab: int):
    """Prompts of the same form without a needle: ``MARKER key`` at the end, the value nowhere."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, vocab, size=(n, seq_len))
    tokens[:, -2], tokens[:, -1] = MARKER, rng.integers(2, vocab, size=n)
    return jnp.asarray(tokens, jnp.int32), rng.integers(2, vocab, size=n)


def scores_of(model, tokens, values):
    """Retrieval score per (layer, head) on needle prompts ``tokens [B, T]`` with answers ``values [B]``."""
    _, maps = model(tokens, return_probs=True)
    probs = jnp.stack(maps)                                               # [L, B, H, T, T]
    B, T = tokens.shape
    answer = jnp.zeros((B, T), bool).at[:, -1].set(True)
    return np.asarray(retrieval_head_scores(probs, tokens, answer, jnp.asarray(values)[:, None]))


def run(model, *, seq_len: int, vocab: int, probe: int, samples: int, draws: int, seed: int = 0) -> dict:
    L, H = len(model.blocks), model.blocks[0].attention.num_heads
    scores = scores_of(model, *needle_batch(seed + 1, probe, seq_len, vocab))
    tokens, values = needle_batch(seed + 2, samples, seq_len, vocab)
    predict = nnx.jit(lambda model, t, m: jnp.argmax(logits_with_ablation(model, t, m), -1))

    def accuracy(mask):
        return float(np.mean(np.asarray(predict(model, tokens, jnp.asarray(mask))) == values))

    rng = np.random.default_rng(seed + 3)
    table = {"none": (accuracy(np.zeros((L, H), bool)), 0.0)}
    for k in (1, 2):
        table[f"top-{k} retrieval"] = (accuracy(top_heads(scores, k / (L * H))), 0.0)
        random = []
        for _ in range(draws):
            mask = np.zeros(L * H, bool)
            mask[rng.choice(L * H, k, replace=False)] = True
            random.append(accuracy(mask.reshape(L, H)))
        table[f"random {k}"] = (float(np.mean(random)), float(np.std(random)))

    ablate = jnp.asarray(top_heads(scores, 2 / (L * H)))
    loss = nnx.jit(lambda model, t, y, m: -jax.nn.log_softmax(logits_with_ablation(model, t, m))[
        jnp.arange(t.shape[0]), y])
    influence = {}
    for name, batch in (("needle", needle_batch(seed + 4, samples, seq_len, vocab)),
                        ("filler", filler_batch(seed + 5, samples, seq_len, vocab))):
        t, y = batch[0], jnp.asarray(batch[1])
        base = loss(model, t, y, jnp.zeros((L, H), bool))
        influence[name] = np.asarray(attention_influence(base, loss(model, t, y, ablate)))
    both = np.concatenate([influence["needle"], influence["filler"]])
    top = np.argsort(-both)[:samples]
    return dict(scores=scores, accuracy=table, influence=influence,
                needle_share_of_top=float(np.mean(top < samples)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-dir", default="runs/attention_influence")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--probe", type=int, default=128)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--draws", type=int, default=20)
    args = parser.parse_args(argv)
    config = needle_config(args.train_dir, args.steps, seq_len=args.seq_len, vocab_size=args.vocab)
    task = build_task(config["task"])
    start = time.time()
    result = train(config, build_model(config["model"], task, int(config["seed"])), task, quiet=True)
    out = run(result.model(), seq_len=args.seq_len, vocab=args.vocab, probe=args.probe, samples=args.samples,
              draws=args.draws)
    print(f"needle LM trained {args.steps} steps ({time.time() - start:.0f} s in all)")
    print("retrieval score per (layer, head):\n" + np.array2string(out["scores"], precision=2))
    print("| ablated heads | needle accuracy |\n|---|---|")
    for name, (mean, spread) in out["accuracy"].items():
        print(f"| {name} | {mean:.3f}" + (f" ± {spread:.3f}" if spread else "") + " |")
    for name, values in out["influence"].items():
        print(f"AttentionInfluence ({name}): mean {values.mean():.3f}, median {np.median(values):.3f}")
    print(f"share of needle prompts among the top half by influence: {out['needle_share_of_top']:.2f}")
    return out


if __name__ == "__main__":
    main()
