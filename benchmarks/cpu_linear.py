"""CPU ratios for the chunked linear-attention form (P58 / P74), side by side in one run.

    JAX_PLATFORMS=cpu python benchmarks/cpu_linear.py [--quick]

Causal, B=1, H=8, D=E=64, float32, ALiBi per-head decay. Targets:
  1. time(T=32K) / time(T=4K) <= 8.5 for the chunked xla form (linear in T);
  2. at T=8K the chunked form >= 40x faster than the quadratic form (impl="reference", run head by head
     with lax.map so that its T x T matrices fit in memory; the FLOPs are the same);
  3. at T=32K >= 20x faster than jattn's own causal flash softmax attention
     (``jattn.ops.attention.attention(q, k, v, causal=True, impl="xla")``).
``--quick`` runs at 1/8 of the lengths (a smoke test of the script, not the targets).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from jattn.core.decay import alibi_log_decay  # noqa: E402
from jattn.ops.linear import linear_attention  # noqa: E402

B, H, D = 1, 8, 64


def inputs(T):
    """q, k, v and the per-head decay, all passed as arguments (constants would be folded at compile time)."""
    keys = jax.random.split(jax.random.PRNGKey(T), 3)
    return tuple(jax.random.normal(key, (B, T, H, D), jnp.float32) for key in keys) + (alibi_log_decay(H),)


def time_fn(fn, args, *, reps):
    """Compiles, runs once to warm up, returns the fastest of `reps` timed runs (seconds): the minimum is
    the estimate least disturbed by other processes sharing the cores."""
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def chunked(q, k, v, decay):
    return linear_attention(q, k, v, log_decay=decay, impl="xla", chunk_size=64)


def quadratic(q, k, v, decay):

    def one_head(args):
        qh, kh, vh, ah = args
        return linear_attention(qh[:, :, None], kh[:, :, None], vh[:, :, None], log_decay=ah[None],
                                impl="reference")[:, :, 0]

    heads = [jnp.moveaxis(x, 2, 0) for x in (q, k, v)]
    return jnp.moveaxis(jax.lax.map(one_head, (*heads, decay)), 0, 2)


def softmax_flash(q, k, v, decay):
    from jattn.ops.attention import attention
    return attention(q, k, v, causal=True, impl="xla")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    div = 8 if args.quick else 1
    t4k, t8k, t32k = 4096 // div, 8192 // div, 32768 // div
    print(f"jax {jax.__version__} on {jax.default_backend()}, B={B} H={H} D=E={D} causal float32, ALiBi decay")

    chunk_times = {T: time_fn(chunked, inputs(T), reps=args.reps) for T in (t4k, t8k, t32k)}
    quad_8k = time_fn(quadratic, inputs(t8k), reps=1)
    try:
        flash_32k = time_fn(softmax_flash, inputs(t32k), reps=1)
        flash_note = ""
    except Exception as error:  # the lead's module may not be importable yet
        flash_32k, flash_note = None, f"(jattn.ops.attention unavailable: {type(error).__name__}: {error})"

    rows = [
        ("chunked xla", f"T={t4k}", chunk_times[t4k]),
        ("chunked xla", f"T={t8k}", chunk_times[t8k]),
        ("chunked xla", f"T={t32k}", chunk_times[t32k]),
        ("quadratic (reference, per head)", f"T={t8k}", quad_8k),
        ("flash softmax attention (xla)", f"T={t32k}", flash_32k),
    ]
    print(f"\n{'form':34s} {'length':>8s} {'time (s)':>10s}")
    for form, length, seconds in rows:
        print(f"{form:34s} {length:>8s} {'n/a' if seconds is None else f'{seconds:10.4f}':>10s}")

    scaling = chunk_times[t32k] / chunk_times[t4k]
    vs_quadratic = quad_8k / chunk_times[t8k]
    print("\nratio                                            value    target  met")
    print(f"chunked time(T={t32k}) / time(T={t4k})          {scaling:8.2f}   <= 8.5  {scaling <= 8.5}")
    print(f"quadratic / chunked at T={t8k}                  {vs_quadratic:8.1f}   >= 40   {vs_quadratic >= 40}")
    if flash_32k is None:
        print(f"flash softmax / chunked at T={t32k}             n/a      >= 20   {flash_note}")
    else:
        vs_flash = flash_32k / chunk_times[t32k]
        print(f"flash softmax / chunked at T={t32k}             {vs_flash:8.1f}   >= 20   {vs_flash >= 20}")
    if args.quick:
        print("(--quick: 1/8 lengths; the targets are for the full run)")


if __name__ == "__main__":
    main()
