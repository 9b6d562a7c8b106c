"""CPU ratio benchmark for softmax attention: jattn xla vs jax.nn.dot_product_attention vs PyTorch SDPA.

Causal, f32, B=1, H=8, D=64 at T = 1K, 4K, 8K; all three run side by side in one process. Time is the
best of `--reps` runs after a warm-up; memory is the compiled executable's temp allocation
(``.lower().compile().memory_analysis()``). PyTorch (its fused CPU flash kernel) is optional: install it
for the benchmark only (``pip install torch==2.13.0``).

    python benchmarks/cpu.py [--lengths 1024 4096 8192] [--reps 3]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from jattn import attention

B, H, D = 1, 8, 64


def best_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def jax_case(fn, q, k, v, reps):
    compiled = jax.jit(fn).lower(q, k, v).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    return best_time(lambda: compiled(q, k, v).block_until_ready(), reps), temp


def torch_case(q, k, v, reps):
    try:
        import numpy as np
        import torch
    except ImportError:
        return None
    tq, tk, tv = (torch.from_numpy(np.asarray(x)).permute(0, 2, 1, 3).contiguous() for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        return best_time(lambda: sdpa(tq, tk, tv, is_causal=True), reps)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}, jax {jax.__version__}, B={B} H={H} D={D} causal f32")
    rows = []
    for T in args.lengths:
        keys = jax.random.split(jax.random.PRNGKey(T), 3)
        q, k, v = (jax.random.normal(key, (B, T, H, D), jnp.float32) for key in keys)
        ours, ours_mem = jax_case(lambda q, k, v: attention(q, k, v, causal=True, impl="xla"), q, k, v, args.reps)
        base, base_mem = jax_case(
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
            q, k, v, args.reps)
        torch_time = torch_case(q, k, v, args.reps)
        rows.append((T, ours, base, torch_time, ours_mem, base_mem))
        print(f"  T={T} done", flush=True)
    print()
    header = (f"{'T':>6} | {'jattn xla s':>11} | {'jax.nn s':>9} | {'torch s':>8} | {'time/jax.nn':>11} | "
              f"{'time/torch':>10} | {'jattn MiB':>9} | {'jax.nn MiB':>10} | {'mem ratio':>9}")
    print(header)
    print("-" * len(header))
    for T, ours, base, torch_time, ours_mem, base_mem in rows:
        t_str = f"{torch_time:8.3f}" if torch_time is not None else f"{'n/a':>8}"
        vs_torch = f"{ours / torch_time:10.2f}" if torch_time is not None else f"{'n/a':>10}"
        print(f"{T:>6} | {ours:11.3f} | {base:9.3f} | {t_str} | {ours / base:11.3f} | {vs_torch} | "
              f"{ours_mem / 2**20:9.1f} | {base_mem / 2**20:10.1f} | {ours_mem / max(base_mem, 1):9.4f}")


if __name__ == "__main__":
    main()
