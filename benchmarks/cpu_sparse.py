"""CPU benchmark: block-sparse xla attention vs dense xla attention, side by side in one run.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/cpu_sparse.py [--seq 16384] [--density 0.1] [--reps 3]

B=1, H=8, D=64, float32, a random block map with the same number of kv blocks per q block (so the
padded table is not wider than the mean row). The ideal speedup is 1 / density (FLOPs); the target is
>= 7x at T=16K, ~10% density. Prints a table of forward times and their ratio.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core.block_mask import BlockMask
from jattn.ops.attention import attention
from jattn.ops.block_sparse import block_sparse_attention


def random_block_mask(seq: int, heads: int, block: int, density: float, seed: int = 0) -> BlockMask:
    n = math.ceil(seq / block)
    per_row = max(1, round(density * n))
    rng = np.random.default_rng(seed)
    chosen = np.stack([np.stack([rng.choice(n, per_row, replace=False) for _ in range(n)]) for _ in range(heads)])
    return BlockMask.from_topk_indices(jnp.asarray(chosen[None], jnp.int32), block_q=block, block_k=block,
                                       seq_q=seq, seq_k=seq)


def timed(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))                       # compile + warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    T, H, D = args.seq, args.heads, args.dim
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, T, H, D), np.float32)) for _ in range(3))
    bm = random_block_mask(T, H, args.block, args.density)
    density = bm.density

    sparse = jax.jit(lambda q, k, v, bm: block_sparse_attention(q, k, v, bm, impl="xla"))
    dense = jax.jit(lambda q, k, v: attention(q, k, v, impl="xla"))
    t_sparse = timed(sparse, q, k, v, bm, reps=args.reps)
    t_dense = timed(dense, q, k, v, reps=args.reps)
    flops_dense = 4 * H * T * T * D
    print(f"B=1 H={H} D={D} T={T} block={args.block} density={density:.4f} ({bm!r})")
    print(f"{'impl':<24}{'time [s]':>10}{'GFLOP/s':>10}{'speedup':>10}")
    print(f"{'dense xla attention':<24}{t_dense:>10.3f}{flops_dense / t_dense / 1e9:>10.1f}{1.0:>10.2f}")
    print(f"{'block-sparse xla':<24}{t_sparse:>10.3f}{density * flops_dense / t_sparse / 1e9:>10.1f}"
          f"{t_dense / t_sparse:>10.2f}")
    print(f"ideal speedup 1/density = {1 / density:.2f}; target >= 7x")


if __name__ == "__main__":
    main()
