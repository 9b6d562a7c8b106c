"""CPU benchmark: block-sparse xla attention vs dense xla attention, side by side in one run.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/cpu_sparse.py [--seq 16384] [--density 0.1] [--reps 3]

B=1, H=8, D=64, float32, 128x128 tiles, forward. Three block maps at the same ~10% density, each with
per-row tile counts that vary (as a dynamic selector's do), one per head:

* ``bernoulli``: every tile kept independently with probability ``density`` (rows of 0 to ~2x the mean);
* ``causal``: tiles on or below the diagonal kept with the probability that gives ``density`` overall,
  diagonal always kept, run with ``causal=True`` (row counts grow linearly down the map);
* ``vertical-slash``: MInference-style key columns and diagonals (``BlockMask.from_vertical_slash``,
  causal), run with ``causal=True``.

The baseline is dense xla attention (``jattn.attention(impl="xla")``, non-causal: the cost a dense
model pays). The ideal speedup is 1 / density (FLOPs); the target is >= 7x at T=16K, ~10% density on
the Bernoulli map. Times are the best of ``--reps`` runs, all in one process, alternating the impls.
Prints a table of forward times and ratios.
"""
from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core.block_mask import BlockMask
from jattn.ops.attention import attention
from jattn.ops.block_sparse import block_sparse_attention


def bernoulli_block_mask(seq: int, heads: int, block: int, density: float, seed: int = 0) -> BlockMask:
    n = math.ceil(seq / block)
    rng = np.random.default_rng(seed)
    block_map = rng.random((1, heads, n, n)) < density
    return BlockMask.from_dense_block_map(block_map, block_q=block, block_k=block, seq_q=seq, seq_k=seq)


def causal_block_mask(seq: int, heads: int, block: int, density: float, seed: int = 0) -> BlockMask:
    n = math.ceil(seq / block)
    rng = np.random.default_rng(seed)
    lower = np.tril(np.ones((n, n), bool))
    keep = (density * n * n - n) / (lower.sum() - n)              # the diagonal is always kept
    block_map = (rng.random((1, heads, n, n)) < keep) & lower
    block_map |= np.eye(n, dtype=bool)
    return BlockMask.from_dense_block_map(block_map, block_q=block, block_k=block, seq_q=seq, seq_k=seq)


def vertical_slash_block_mask(seq: int, heads: int, block: int, density: float, seed: int = 0) -> BlockMask:
    """Per head: key columns (biased to the start, as attention sinks are) and diagonals near the main
    one, equally many of each; the fewest that make the causal tile cover reach ``density``."""
    rng = np.random.default_rng(seed)
    most = 4 * math.ceil(seq / block)
    vertical = np.minimum(rng.exponential(seq / 6, (1, heads, most)), seq - 1).astype(np.int32)
    slash = np.minimum(rng.exponential(seq / 10, (1, heads, most)), seq - 1).astype(np.int32)

    def build(n: int) -> BlockMask:                     # the first n of each (fixed shapes: -1 pads)
        keep = np.arange(most) < n
        return BlockMask.from_vertical_slash(jnp.asarray(np.where(keep, vertical, -1)),
                                             jnp.asarray(np.where(keep, slash, -1)), block_q=block,
                                             block_k=block, seq_q=seq, seq_k=seq, causal=True)

    lo, hi = 1, most                                    # density grows with n: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if build(mid).density < density else (lo, mid)
    return build(lo)


def best_time(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))                               # compile + warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--maps", default="bernoulli,causal,vertical-slash")
    args = parser.parse_args()
    T, H, D = args.seq, args.heads, args.dim
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, T, H, D), np.float32)) for _ in range(3))
    builders = {"bernoulli": (bernoulli_block_mask, False), "causal": (causal_block_mask, True),
                "vertical-slash": (vertical_slash_block_mask, True)}
    cases = []
    for name in args.maps.split(","):
        build, causal = builders[name]
        bm = build(T, H, args.block, args.density)
        counts = np.asarray(bm.kv_counts)
        sparse = jax.jit(lambda q, k, v, bm, causal=causal: block_sparse_attention(q, k, v, bm, causal=causal,
                                                                                   impl="xla"))
        cases.append((name, bm, counts, sparse))
    dense = jax.jit(lambda q, k, v: attention(q, k, v, impl="xla"))

    # Alternate dense and sparse reps so that load from other processes hits both alike.
    best = {"dense": math.inf, **{name: math.inf for name, *_ in cases}}
    jax.block_until_ready(dense(q, k, v))
    for name, bm, _, sparse in cases:
        jax.block_until_ready(sparse(q, k, v, bm))
    for _ in range(args.reps):
        best["dense"] = min(best["dense"], best_time(dense, q, k, v, reps=1))
        for name, bm, _, sparse in cases:
            best[name] = min(best[name], best_time(sparse, q, k, v, bm, reps=1))

    flops_dense = 4 * H * T * T * D
    t_dense = best["dense"]
    print(f"B=1 H={H} D={D} T={T} block={args.block}x{args.block} f32 forward, best of {args.reps}")
    print(f"{'impl':<30}{'density':>9}{'rows min/mean/max':>20}{'time [s]':>10}{'GFLOP/s':>10}"
          f"{'speedup':>9}{'ideal':>8}")
    print(f"{'dense xla attention':<30}{1.0:>9.4f}{'':>20}{t_dense:>10.3f}{flops_dense / t_dense / 1e9:>10.1f}"
          f"{1.0:>9.2f}{1.0:>8.2f}")
    for name, bm, counts, _ in cases:
        t = best[name]
        rows = f"{counts.min()}/{counts.mean():.1f}/{counts.max()}"
        print(f"{'block-sparse xla, ' + name:<30}{bm.density:>9.4f}{rows:>20}{t:>10.3f}"
              f"{bm.density * flops_dense / t / 1e9:>10.1f}{t_dense / t:>9.2f}{1 / bm.density:>8.2f}")
    print("target: >= 7x vs dense on the bernoulli map at ~10% density")


if __name__ == "__main__":
    main()
