"""``python -m train.duo_gates``: DuoAttention's (P45) gate optimisation on synthetic passkey data.

The spec's toy: "a small model where some heads are made local drives those alpha -> 0".

1. **A model with local heads.** A small :class:`jattn.nn.DecoderLM` whose designated kv heads are local by
   construction: they always run Λ (sink + recent) attention, the other heads full causal attention. It is
   first trained on passkey retrieval (:class:`Passkey`: one passkey token hidden at a random depth in
   filler, asked for at the end), so a full head learns to fetch it from outside every local window.
2. **Gate training, as DuoAttention.** The model is frozen; one gate ``alpha[l, g]`` per layer and kv head,
   initialised to 1. Every head of the student mixes its own attention with streaming attention
   (``mixed_duo_attention``); the loss is ``duo_distillation_loss`` between the final hidden states of the
   model and of the student on the passkey-answer tokens, plus ``lam * mean|alpha|``. AdamW (lr 0.02, no
   weight decay), alpha clamped to ``[0, 1]`` after every step. A local head's own attention already is the
   streaming attention, so the distillation cannot see its gate and the L1 term drives it to 0; a full head
   that retrieves keeps its gate up while the distillation gradient beats ``lam``.

Prints the learned gates per layer and kv head, which heads are local, which ``sparsify_heads`` (threshold 0.5)
calls retrieval heads, and whether every local head's gate went to 0. The default run takes about a minute on
a 2-core CPU. ``--help`` lists the sizes; ``--impl`` is the attention impl of both branches (default
``"reference"``, the dense fp32 oracle, fastest at these 40-token shapes; ``"xla"`` runs the streaming branch
on the block-sparse path, about 3x slower here).

The student forward re-uses the model's own modules (projections with RoPE, norms, MLPs); it goes through
``Attention.project`` and ``Attention.finish``, the layer's halves around its attention core.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jattn.methods.kv.duo_attention import duo_distillation_loss, mixed_duo_attention, sparsify_heads
from jattn.nn.models import DecoderLM
from train.data import batch_rng

DEFAULTS = dict(vocab=32, key_vocab=8, seq_len=40, dim=64, layers=2, heads=4, kv_heads=2, local="0:1,1:1", sink=2,
                recent=6, pretrain_steps=150, pretrain_lr=3e-3, batch=32, gate_steps=150, gate_lr=0.02, lam=0.05,
                block=16, impl="reference", seed=0)


class Passkey:
    """Passkey retrieval: ``seq_len - 1`` filler tokens from ``[2, vocab - key_vocab)`` with one passkey token
    from the top ``key_vocab`` ids at a random depth, then ``QUERY``; the target after ``QUERY`` (the only one
    scored) is the passkey. Batches are pure functions of ``(seed, step)``, as ``train.tasks``'."""

    QUERY = 1

    def __init__(self, seq_len: int = 40, vocab_size: int = 32, key_vocab: int = 8):
        if not (isinstance(seq_len, int) and seq_len >= 3):
            raise ValueError(f"seq_len must be an int >= 3, got {seq_len!r}")
        if not (isinstance(key_vocab, int) and 1 <= key_vocab <= vocab_size - 3):
            raise ValueError(f"key_vocab must be an int in [1, vocab_size - 3 = {vocab_size - 3}], got {key_vocab!r}")
        self.seq_len, self.vocab_size, self.key_vocab = seq_len, vocab_size, key_vocab

    def batch(self, seed: int, step: int, batch_size: int, split: str = "train") -> dict[str, np.ndarray]:
        rng = batch_rng(seed, step, stream=50 if split == "train" else 51)
        filler_top = self.vocab_size - self.key_vocab
        sequences = rng.integers(2, filler_top, size=(batch_size, self.seq_len + 1))
        key = rng.integers(filler_top, self.vocab_size, size=batch_size)
        sequences[np.arange(batch_size), rng.integers(0, self.seq_len - 1, size=batch_size)] = key
        sequences[:, -2], sequences[:, -1] = self.QUERY, key
        scored = np.zeros(sequences.shape, np.float32)
        scored[:, -1] = 1.0
        return {"inputs": sequences[:, :-1].astype(np.int32), "targets": sequences[:, 1:].astype(np.int32),
                "loss_mask": scored[:, 1:]}


def local_gates(layers: int, kv_heads: int, local: dict[int, tuple[int, ...]]) -> jnp.ndarray:
    """``[layers, kv_heads]`` float: 0 for a local head (``local[layer]`` lists them), 1 for a full head."""
    base = np.ones((layers, kv_heads), np.float32)
    for layer, heads in local.items():
        base[layer, list(heads)] = 0.0
    return jnp.asarray(base)


def parse_local(text: str) -> dict[int, tuple[int, ...]]:
    """``"0:1,1:0+1"`` -> ``{0: (1,), 1: (0, 1)}``: the local kv heads of each layer."""
    local: dict[int, tuple[int, ...]] = {}
    for item in filter(None, text.split(",")):
        layer, heads = item.split(":")
        local[int(layer)] = tuple(int(h) for h in heads.split("+"))
    return local


def build_model(*, vocab: int, dim: int, layers: int, heads: int, kv_heads: int, seed: int) -> DecoderLM:
    return DecoderLM(vocab, dim, layers, heads, num_kv_heads=kv_heads, rngs=nnx.Rngs(seed))


def duo_hidden(model: DecoderLM, tokens, alpha, *, sink: int, recent: int, block: int = 16, impl: str = "auto"):
    """The final (normed) hidden states ``[B, T, dim]`` with every layer's attention replaced by
    ``mixed_duo_attention`` under gates ``alpha [layers, Hkv]`` (1 = full, 0 = streaming)."""
    x = model.embed(tokens).astype(model.dtype)
    positions = jnp.arange(tokens.shape[1])[None]
    for layer, block_ in enumerate(model.blocks):
        attn = block_.attention
        normed = block_.attn_norm(x)
        q, k, v = attn.project(normed, positions)
        out = mixed_duo_attention(q, k, v, alpha[layer], sink=sink, recent=recent, block_q=block, block_k=block,
                                  scale=attn.scale, impl=impl)
        x = x + attn.finish(normed, out)
        x = x + block_.mlp(block_.mlp_norm(x))
    return model.final_norm(x)


def pretrain(model: DecoderLM, task, base, *, steps: int, lr: float, batch: int, seed: int, sink: int, recent: int,
             block: int = 16, impl: str = "auto", log=print) -> float:
    """Trains ``model`` (in place) on the passkey answers with its local heads Λ-masked; returns the held-out
    answer accuracy."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adamw(lr, weight_decay=0.0)
    opt_state = optimizer.init(params)

    def loss_fn(params, batch_):
        m = nnx.merge(graphdef, params, rest)
        hidden = duo_hidden(m, batch_["inputs"], base, sink=sink, recent=recent, block=block, impl=impl)
        logits = m.embed.attend(hidden).astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch_["targets"])
        weights = batch_["loss_mask"]
        accuracy = jnp.sum((jnp.argmax(logits, -1) == batch_["targets"]) * weights) / jnp.sum(weights)
        return jnp.sum(nll * weights) / jnp.sum(weights), accuracy

    @jax.jit
    def step(params, opt_state, batch_):
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    for i in range(steps):
        params, opt_state, loss, accuracy = step(params, opt_state, task.batch(seed, i, batch))
        if (i + 1) % max(1, steps // 5) == 0:
            log(f"  pretrain step {i + 1:4d}: answer loss {float(loss):.3f}, accuracy {float(accuracy):.2f}")
    nnx.update(model, params)
    held_out = task.batch(seed, 0, 4 * batch, split="eval")
    return float(jax.jit(loss_fn)(params, held_out)[1])


def answer_accuracy(model: DecoderLM, task, alpha, *, batch: int, seed: int, sink: int, recent: int,
                    block: int = 16, impl: str = "auto") -> float:
    """Held-out accuracy of the scored answers with every layer's attention mixed by ``alpha [layers, Hkv]``."""
    data = task.batch(seed, 0, batch, split="eval")

    @jax.jit
    def correct(tokens, targets, weights):
        hidden = duo_hidden(model, tokens, alpha, sink=sink, recent=recent, block=block, impl=impl)
        hits = jnp.argmax(model.embed.attend(hidden), -1) == targets
        return jnp.sum(hits * weights) / jnp.sum(weights)
    return float(correct(data["inputs"], data["targets"], data["loss_mask"]))


def train_gates(model: DecoderLM, task, base, *, steps: int, lr: float = 0.02, lam: float = 0.05, batch: int,
                seed: int, sink: int, recent: int, block: int = 16, impl: str = "auto", labels: str = "answers",
                log=None):
    """DuoAttention's gate optimisation on a frozen ``model`` whose heads run ``base [layers, Hkv]`` (1 = full,
    0 = local). Returns the learned gates ``[layers, Hkv]`` (NumPy) and the loss history.

    ``labels="answers"`` supervises the task's scored tokens; ``"all"`` every position."""
    graphdef, state = nnx.split(model)
    optimizer = optax.adamw(lr, weight_decay=0.0)
    alpha = jnp.ones_like(base)
    opt_state = optimizer.init(alpha)

    def loss_fn(alpha, state, batch_):
        m = nnx.merge(graphdef, state)
        tokens = batch_["inputs"]
        window = dict(sink=sink, recent=recent, block=block, impl=impl)
        target = jax.lax.stop_gradient(duo_hidden(m, tokens, base, **window))
        # a head's own attention is full (base 1) or streaming (base 0): alpha mixes it with streaming
        mixed = duo_hidden(m, tokens, alpha * base, **window)
        mask = batch_["loss_mask"] > 0 if labels == "answers" else jnp.ones(tokens.shape, bool)
        return duo_distillation_loss(target, mixed, mask, alpha, lam)

    @jax.jit
    def step(alpha, opt_state, state, batch_):
        loss, grad = jax.value_and_grad(loss_fn)(alpha, state, batch_)
        updates, opt_state = optimizer.update(grad, opt_state, alpha)
        return jnp.clip(optax.apply_updates(alpha, updates), 0.0, 1.0), opt_state, loss

    history = []
    for i in range(steps):
        alpha, opt_state, loss = step(alpha, opt_state, state, task.batch(seed + 1, i, batch))
        history.append(float(loss))
        if log is not None and (i + 1) % max(1, steps // 5) == 0:
            gates = np.array2string(np.asarray(alpha), precision=2, separator=", ").replace("\n", "")
            log(f"  gate step {i + 1:4d}: loss {history[-1]:.4f}, alpha {gates}")
    return np.asarray(alpha), history


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    local = parse_local(args["local"])
    base = local_gates(args["layers"], args["kv_heads"], local)
    task = Passkey(args["seq_len"], args["vocab"], args["key_vocab"])
    model = build_model(vocab=args["vocab"], dim=args["dim"], layers=args["layers"], heads=args["heads"],
                        kv_heads=args["kv_heads"], seed=args["seed"])
    window = dict(sink=args["sink"], recent=args["recent"], block=args["block"], impl=args["impl"])
    start = time.perf_counter()
    print(f"local kv heads (layer: heads): {local}; streaming window: sink {args['sink']} + recent {args['recent']}"
          f" of {args['seq_len']} tokens")
    accuracy = pretrain(model, task, base, steps=args["pretrain_steps"], lr=args["pretrain_lr"], batch=args["batch"],
                        seed=args["seed"], **window)
    print(f"pretrained passkey accuracy (held out): {accuracy:.3f}  [{time.perf_counter() - start:.0f} s]")
    alpha, history = train_gates(model, task, base, steps=args["gate_steps"], lr=args["gate_lr"], lam=args["lam"],
                                 batch=args["batch"], seed=args["seed"], log=print, **window)
    retrieval = np.asarray(sparsify_heads(jnp.asarray(alpha)))
    print(f"gate loss: first {history[0]:.4f}, last {history[-1]:.4f}  [{time.perf_counter() - start:.0f} s]")
    print("layer  kv head  kind   alpha  retrieval (alpha >= 0.5)")
    for layer in range(alpha.shape[0]):
        for head in range(alpha.shape[1]):
            kind = "local" if base[layer, head] == 0 else "full"
            print(f"{layer:5d}  {head:7d}  {kind:5s}  {alpha[layer, head]:.3f}  {bool(retrieval[layer, head])}")
    locals_ = np.asarray(base) == 0
    deployed = jnp.asarray(retrieval, jnp.float32) * base
    for name, gates in (("the retrieval heads kept (deployed)", deployed), ("every head streaming", 0.0 * base)):
        accuracy = answer_accuracy(model, task, gates, batch=4 * args["batch"], seed=args["seed"], **window)
        print(f"passkey accuracy with {name}: {accuracy:.3f}")
    print(f"every local head's alpha went to 0: {bool(np.all(alpha[locals_] == 0.0))}; "
          f"full heads kept as retrieval heads: {int(retrieval[~locals_].sum())} of {int((~locals_).sum())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
