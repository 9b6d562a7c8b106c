"""CPU ratio benchmark for softmax attention: jattn xla vs jax.nn.dot_product_attention vs PyTorch SDPA.

Causal, f32, B=1, H=8, D=64 at T = 1K, 4K, 8K; all three run side by side in one process, their runs
interleaved (one of each per round) so that load from other processes hits them alike. Time is the best
of `--reps` rounds after a warm-up; memory is the compiled executable's temp allocation
(``.lower().compile().memory_analysis()``). PyTorch (its fused CPU flash kernel) is optional: install it
for the benchmark only (``pip install torch==2.13.0``); without it its columns read n/a.

FLOP rate: causal attention counts ``4 * T * T * D * H / 2`` FLOPs (two matmuls over half the logits);
the machine's own f32 matmul rate is measured in the same rounds with a 2048x2048x2048 ``jnp.dot``, and
``of matmul`` is jattn's rate over it.

    python benchmarks/cpu.py [--lengths 1024 4096 8192] [--reps 5]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from jattn import attention

B, H, D = 1, 8, 64


MATMUL_N = 2048


def best_times(cases: dict, reps: int) -> dict:
    """Best wall time of each case over `reps` rounds, one run of every case per round (after a warm-up)."""
    for fn in cases.values():
        fn()
    best = {name: float("inf") for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def jax_case(fn, q, k, v):
    compiled = jax.jit(fn).lower(q, k, v).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    return (lambda: compiled(q, k, v).block_until_ready()), temp


def torch_case(q, k, v):
    try:
        import numpy as np
        import torch
    except ImportError:
        return None
    tq, tk, tv = (torch.from_numpy(np.array(x)).permute(0, 2, 1, 3).contiguous() for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run():
        with torch.no_grad():
            sdpa(tq, tk, tv, is_causal=True)
    return run


def matmul_case():
    a = jax.random.normal(jax.random.PRNGKey(0), (MATMUL_N, MATMUL_N), jnp.float32)
    dot = jax.jit(jnp.dot).lower(a, a).compile()
    return lambda: dot(a, a).block_until_ready()


def attention_flops(T: int) -> float:
    return 4 * T * T * D * H / 2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}, jax {jax.__version__}, B={B} H={H} D={D} causal f32")
    rows = []
    for T in args.lengths:
        keys = jax.random.split(jax.random.PRNGKey(T), 3)
        q, k, v = (jax.random.normal(key, (B, T, H, D), jnp.float32) for key in keys)
        cases = {"matmul": matmul_case()}
        cases["jattn"], ours_mem = jax_case(lambda q, k, v: attention(q, k, v, causal=True, impl="xla"), q, k, v)
        cases["jax.nn"], base_mem = jax_case(
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"), q, k, v)
        torch_run = torch_case(q, k, v)
        if torch_run is not None:
            cases["torch"] = torch_run
        best = best_times(cases, args.reps)
        rows.append((T, best, ours_mem, base_mem))
        print(f"  T={T} done", flush=True)
    print()
    header = (f"{'T':>6} | {'jattn xla s':>11} | {'jax.nn s':>9} | {'torch s':>8} | {'time/jax.nn':>11} | "
              f"{'time/torch':>10} | {'jattn GF/s':>10} | {'torch GF/s':>10} | {'matmul GF/s':>11} | "
              f"{'of matmul':>9} | {'jattn MiB':>9} | {'jax.nn MiB':>10} | {'mem ratio':>9}")
    print(header)
    print("-" * len(header))
    for T, best, ours_mem, base_mem in rows:
        ours, base, torch_time = best["jattn"], best["jax.nn"], best.get("torch")
        flops = attention_flops(T)
        matmul_rate = 2 * MATMUL_N**3 / best["matmul"] / 1e9
        t_str = f"{torch_time:8.3f}" if torch_time is not None else f"{'n/a':>8}"
        vs_torch = f"{ours / torch_time:10.2f}" if torch_time is not None else f"{'n/a':>10}"
        torch_rate = f"{flops / torch_time / 1e9:10.1f}" if torch_time is not None else f"{'n/a':>10}"
        print(f"{T:>6} | {ours:11.3f} | {base:9.3f} | {t_str} | {ours / base:11.3f} | {vs_torch} | "
              f"{flops / ours / 1e9:10.1f} | {torch_rate} | {matmul_rate:11.1f} | "
              f"{flops / ours / 1e9 / matmul_rate:9.2f} | "
              f"{ours_mem / 2**20:9.1f} | {base_mem / 2**20:10.1f} | {ours_mem / max(base_mem, 1):9.4f}")


if __name__ == "__main__":
    main()
