"""KV-cache quantisation on synthetic attention: P24 ZipCache's saliency-based mixed precision against random
and accumulated-score selection at equal bits, and KIVI-style int8/int4/int2 caches.

Data (NumPy, one seed per run): a prompt of T tokens, Hkv kv heads, G query heads per kv head, head dim D.

* keys = a "content" part (standard normal) plus a few **outlier channels** (large, offset) that queries do
  not use: they stretch the per-channel quantisation ranges as real key outliers do;
* values = standard normal with a few larger channels;
* **attention structure**: every query attends to the sink token 0, to its 4 most recent tokens, and to 3
  "heavy" tokens drawn from a fixed set (5% of the positions, popularity-weighted, only those before it),
  by adding those keys' unit content directions to the query (logit gain ~6 per chosen key) plus noise;
  each query head draws its own heavy tokens.

The prompt's queries are ZipCache's probes (recent 5% + random 5%). The evaluation queries are Tf fresh
"next-token" queries at position T drawn from the same process; the error is the relative Frobenius error
``||o' - o|| / ||o||`` of ``jattn.decode_attention`` over the dequantised cache against the full-precision
cache, mean and std over the seeds. Selections compared at equal bits (same ``unimportant_ratio``, same bytes):
ZipCache's normalised score (``c_j / (T - j)``, the code's; and ``c_j / #visible probes``), the accumulated
score ``c_j`` (H2O-style), random scores, and an oracle (the evaluation queries' own attention).

    python benchmarks/kv_quantization.py [--seeds 5] [--tokens 1024]
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jattn import decode_attention
from jattn.methods.kv import quantized as kivi
from jattn.methods.kv import zipcache as zc

HKV, G, D = 2, 4, 64
H = HKV * G
FUTURE = 32
RATIOS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0)
SELECTIONS = ("normalised (T - j)", "normalised (visible)", "accumulated", "random", "oracle")


def make_data(seed: int, T: int):
    """``q [1, T, H, D]`` prompt queries, ``k, v [1, T, Hkv, D]``, ``q_future [Tf, H, D]`` (position T)."""
    rng = np.random.default_rng(seed)
    content = rng.standard_normal((T, HKV, D))
    unit = content / np.linalg.norm(content, axis=-1, keepdims=True)
    outliers = rng.choice(D, 3, replace=False)
    k = content.copy()
    k[:, :, outliers] = 6.0 * rng.standard_normal((T, HKV, 3)) + rng.uniform(4, 8, 3)
    v = rng.standard_normal((T, HKV, D))
    v[:, :, rng.choice(D, 2, replace=False)] *= 5.0
    heavy = rng.choice(np.arange(1, T), T // 20, replace=False)
    popularity = rng.exponential(size=heavy.size)

    def query(t):
        """One query per head at position t (sees keys < t for recency/heavy, and the sink)."""
        q = np.zeros((H, D))
        seen = heavy[heavy < t]
        for h in range(H):
            g = h // G
            direction = 5.0 * unit[0, g] + 3.0 * unit[max(t - 4, 0):t, g].sum(0)
            if seen.size:
                p = popularity[heavy < t] / popularity[heavy < t].sum()
                chosen = rng.choice(seen, min(3, seen.size), replace=False, p=p)
                direction = direction + 6.0 * unit[chosen, g].sum(0)
            q[h] = direction + 0.5 * rng.standard_normal(D)
        q[:, outliers] = 0.1 * rng.standard_normal((H, 3))
        return q

    q = np.stack([query(t) for t in range(T)])
    q_future = np.stack([query(T) for _ in range(FUTURE)])
    f32 = functools.partial(np.asarray, dtype=np.float32)
    return f32(q[None]), f32(k[None]), f32(v[None]), f32(q_future)


@functools.lru_cache(maxsize=None)
def attend_fn(T: int):
    """Decode attention of the Tf evaluation queries (a batch of one-token queries) over a head-major cache."""
    def attend(q_future, k_cache, v_cache):
        tile = lambda x: jnp.broadcast_to(x, (FUTURE,) + x.shape[1:])
        return decode_attention(q_future, tile(k_cache), tile(v_cache), jnp.full((FUTURE,), T, jnp.int32),
                                impl="xla")
    return jax.jit(attend)


@functools.lru_cache(maxsize=None)
def compress_fn(ratio: float):
    def compress(k, v, scores):
        return zc.compress_with_scores(k, v, scores, unimportant_ratio=ratio).dequantized()
    return jax.jit(compress)


_kivi_prefill = jax.jit(lambda cache, k, v: cache.append(k, v).dequantized())


def selection_scores(q, k, q_future, key):
    """``{selection: [1, Hkv, T] scores}`` from the prompt's probes (and the oracle from the evaluation)."""
    T = q.shape[1]
    positions = zc.probe_positions(key, seq_len=T)
    probe = functools.partial(zc.normalized_attention_score, q[:, positions], positions, k)
    future = zc.normalized_attention_score(q_future[None], jnp.full((FUTURE,), T - 1, jnp.int32), k,
                                           denominator="none")
    return {"normalised (T - j)": probe(denominator="remaining"), "normalised (visible)": probe(denominator="visible"),
            "accumulated": probe(denominator="none"),
            "random": jax.random.uniform(jax.random.fold_in(key, 1), (1, HKV, T)), "oracle": future}


def relative_error(out, reference) -> float:
    return float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    T, start = args.tokens, time.time()
    scores_fn = jax.jit(selection_scores)
    zip_errors = {}       # (ratio, selection) -> [errors]
    kivi_errors, kivi_stored = {}, {}
    for seed in range(args.seeds):
        q, k, v, q_future = make_data(seed, T)
        attend = attend_fn(T)
        reference = attend(q_future, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
        scores = scores_fn(q, k, q_future, jax.random.PRNGKey(seed))
        for ratio in RATIOS:
            for selection in (SELECTIONS if 0 < ratio < 1 else SELECTIONS[:1]):
                k_hat, v_hat = compress_fn(ratio)(k, v, scores[selection])
                zip_errors.setdefault((ratio, selection), []).append(
                    relative_error(attend(q_future, k_hat, v_hat), reference))
        for bits in (8, 4, 2):
            cache = kivi.QuantizedKVCache.create(1, HKV, T, D, bits=bits, group_size=32)
            k_hat, v_hat = _kivi_prefill(cache, k, v)
            kivi_errors.setdefault(bits, []).append(relative_error(attend(q_future, k_hat, v_hat), reference))
            kivi_stored[bits] = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(cache))

    fp16 = 2 * HKV * D * 2
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; T={T} prompt tokens, Hkv={HKV}, H={H}, D={D}, "
          f"{FUTURE} evaluation queries, {args.seeds} seeds; fp16 KV = {fp16} bytes/token/layer\n")
    print("ZipCache quantisers (keys channel-wise, values channel-separable token-wise), 4-bit salient / 2-bit "
          "rest;\nKV bytes/token = zipcache_bytes_per_token (fp16 scales), identical for every selection at a "
          "ratio.\n")
    print("| unimportant ratio r | avg bits | KV bytes/token | vs fp16 | selection | rel. output error (mean ± std) |")
    print("|---|---|---|---|---|---|")
    for ratio in RATIOS:
        bytes_ = zc.zipcache_bytes_per_token(head_dim=D, kv_heads=HKV, length=T, unimportant_ratio=ratio)
        avg_bits = 4 * (1 - zc.unimportant_count(T, ratio) / T) + 2 * zc.unimportant_count(T, ratio) / T
        for selection in (SELECTIONS if 0 < ratio < 1 else SELECTIONS[:1]):
            errors = np.asarray(zip_errors[(ratio, selection)])
            name = {0.0: "all 4-bit", 1.0: "all 2-bit"}.get(ratio, selection)
            print(f"| {ratio:.1f} | {avg_bits:.2f} | {bytes_:.1f} | {fp16 / bytes_:.2f}x | {name} | "
                  f"{errors.mean():.4f} ± {errors.std():.4f} |")
    print("\nPaired by seed (same data for every selection): seeds where ZipCache's normalised score (T - j) has "
          "the lower error than")
    print("\n| r | accumulated | random |\n|---|---|---|")
    for ratio in RATIOS[1:-1]:
        ours = np.asarray(zip_errors[(ratio, SELECTIONS[0])])
        wins = [int(np.sum(ours < np.asarray(zip_errors[(ratio, other)]))) for other in ("accumulated", "random")]
        print(f"| {ratio:.1f} | {wins[0]}/{args.seeds} | {wins[1]}/{args.seeds} |")
    print("\nKIVI-style QuantizedKVCache (keys per channel in groups of 32 + fp residual, values per token):\n")
    print("| bits | formula bytes/token (fp16 scales) | vs fp16 | stored here (f32 scales + residual) / T "
          "| formula (scale_bytes=4, capacity=T) | rel. output error (mean ± std) |")
    print("|---|---|---|---|---|---|")
    for bits in (8, 4, 2):
        formula = kivi.bytes_per_token(head_dim=D, kv_heads=HKV, bits=bits)
        stored = kivi_stored[bits] / T
        formula_f32 = kivi.bytes_per_token(head_dim=D, kv_heads=HKV, bits=bits, scale_bytes=4, capacity=T,
                                           element_bytes=4)
        errors = np.asarray(kivi_errors[bits])
        print(f"| {bits} | {formula:.1f} | {fp16 / formula:.2f}x | {stored:.2f} | {formula_f32:.2f} | "
              f"{errors.mean():.4f} ± {errors.std():.4f} |")
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
