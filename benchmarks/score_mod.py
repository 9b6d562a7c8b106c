"""What a fused ``score_mod`` costs on the CPU's xla path: ALiBi via ``score_mod`` against plain causal
attention and against ALiBi as a dense ``[H, T, S]`` bias, side by side in one run.

Reports, per row: the best forward time over ``--repeats`` runs (after one compile), its ratio to plain
causal attention, the FLOP rate of the causal attention (``2 * 2 * B * H * D * T * (T + 1) / 2`` flops), and
the compiled program's temporary memory (``memory_analysis().temp_size_in_bytes``) next to the bytes of
one ``[B, H, T, S]`` float32 array. The dense-bias row needs that array as an input, so it runs only while it
fits ``--max-bias-gib``.

    python benchmarks/score_mod.py [--lengths 2048 8192] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import jattn
from jattn import score_mods
from jattn.core.decay import alibi_slopes

B, H, D = 1, 8, 64


def best_seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def temp_bytes(fn, args) -> int:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def rows(T: int, repeats: int, max_bias_gib: float):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (B, T, H, D), jnp.float32) for key in keys)
    plain = jax.jit(lambda q, k, v: jattn.attention(q, k, v, causal=True, impl="xla"))
    alibi = jax.jit(lambda q, k, v: jattn.attention(q, k, v, causal=True, impl="xla", score_mod=score_mods.alibi(H)))
    cases = [("causal", plain, (q, k, v)), ("ALiBi via score_mod", alibi, (q, k, v))]
    dense_bytes = B * H * T * T * 4
    if dense_bytes <= max_bias_gib * 2 ** 30:
        positions = jnp.arange(T)
        bias = (alibi_slopes(H)[:, None, None] * (positions[None, :] - positions[:, None]))[None]
        dense = jax.jit(lambda q, k, v, bias: jattn.attention(q, k, v, causal=True, impl="xla", bias=bias))
        cases.append(("ALiBi as a dense bias", dense, (q, k, v, bias)))
    flops = 2 * 2 * B * H * D * T * (T + 1) / 2
    base = None
    for name, fn, args in cases:
        seconds = best_seconds(fn, args, repeats)
        base = base or seconds
        yield dict(T=T, name=name, seconds=seconds, ratio=seconds / base, gflops=flops / seconds / 1e9,
                   temp=temp_bytes(fn, args), dense=dense_bytes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-bias-gib", type=float, default=0.6)
    args = parser.parse_args()
    print(f"B={B} H={H} D={D} f32, causal, impl='xla', {jax.devices()[0].platform}, best of {args.repeats}")
    print(f"{'T':>6}  {'variant':<24}{'seconds':>9}{'ratio':>7}{'GFLOP/s':>9}{'temp MiB':>10}{'[B,H,T,S] MiB':>15}")
    for T in args.lengths:
        for row in rows(T, args.repeats, args.max_bias_gib):
            print(f"{row['T']:>6}  {row['name']:<24}{row['seconds']:>9.3f}{row['ratio']:>7.2f}{row['gflops']:>9.1f}"
                  f"{row['temp'] / 2 ** 20:>10.1f}{row['dense'] / 2 ** 20:>15.1f}")


if __name__ == "__main__":
    main()
