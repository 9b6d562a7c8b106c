"""CPU decode benchmark: jattn's xla decode path vs PyTorch SDPA with a 1-token query, and the machine's
memory-copy bandwidth, side by side in one process (runs interleaved, best of ``--reps`` rounds).

Shape (issue 13): B=1, H=32, Hkv=8, D=128, float32, one new token, contexts 8K/32K/128K. Decode is memory
bound: the KV cache is read once (``2 * S * Hkv * D * 4`` bytes), so the figure of merit is the KV read
rate. The reference rate is a large NumPy copy (``np.copyto`` of a 512 MiB buffer), counted as bytes read
plus bytes written per second, the same accounting as STREAM's copy. Both libraries read the same
head-major ``[B, Hkv, S, D]`` cache (jattn's cache layout and PyTorch's), PyTorch with ``enable_gqa=True``.

    python benchmarks/cpu_decode.py [--contexts 8192 32768 131072] [--reps 7]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from cpu import best_times  # the interleaved best-of-rounds timer (run as a script: benchmarks/ is on the path)
from jattn import decode_attention

B, H, HKV, D = 1, 32, 8, 128
COPY_BYTES = 512 * 2**20


def copy_case():
    src = np.random.default_rng(0).standard_normal(COPY_BYTES // 4, np.float32)
    dst = np.empty_like(src)
    return lambda: np.copyto(dst, src)


def jattn_case(q, k, v, lengths):
    fn = jax.jit(lambda q, k, v, lengths: decode_attention(q, k, v, lengths, impl="xla"))
    compiled = fn.lower(q, k, v, lengths).compile()
    return lambda: compiled(q, k, v, lengths).block_until_ready()


def torch_case(q, k, v):
    try:
        import torch
    except ImportError:
        return None
    tq = torch.from_numpy(np.array(q)).reshape(B, H, 1, D)
    tk, tv = (torch.from_numpy(np.array(x)) for x in (k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run():
        with torch.no_grad():
            sdpa(tq, tk, tv, enable_gqa=True)
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; B={B} H={H} Hkv={HKV} D={D} f32, 1 new token")
    print(f"{'S':>7} {'KV MiB':>7} {'jattn ms':>9} {'torch ms':>9} {'jattn/torch':>11} {'jattn GB/s':>10} "
          f"{'copy GB/s':>9} {'of copy':>7}")
    rng = np.random.default_rng(0)
    for S in args.contexts:
        q = jnp.asarray(rng.standard_normal((B, H, D), np.float32))
        k = jnp.asarray(rng.standard_normal((B, HKV, S, D), np.float32))
        v = jnp.asarray(rng.standard_normal((B, HKV, S, D), np.float32))
        lengths = jnp.full((B,), S, jnp.int32)
        cases = {"copy": copy_case(), "jattn": jattn_case(q, k, v, lengths)}
        torch_run = torch_case(q, k, v)
        if torch_run is not None:
            cases["torch"] = torch_run
        best = best_times(cases, args.reps)
        kv_bytes = 2 * B * S * HKV * D * 4
        jattn_rate = kv_bytes / best["jattn"] / 1e9
        copy_rate = 2 * COPY_BYTES / best["copy"] / 1e9
        torch_ms = best["torch"] * 1e3 if "torch" in best else float("nan")
        print(f"{S:>7} {kv_bytes / 2**20:>7.0f} {best['jattn'] * 1e3:>9.2f} {torch_ms:>9.2f} "
              f"{best['jattn'] * 1e3 / torch_ms:>11.2f} {jattn_rate:>10.1f} {copy_rate:>9.1f} "
              f"{jattn_rate / copy_rate:>7.2f}")


if __name__ == "__main__":
    main()
