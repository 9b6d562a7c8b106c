"""GPU suite cases for neighborhood attention (protocol: see the docstring of benchmarks/gpu_suite.py).

* NA-1D, T=32K, window 2048 (B=1, H=8, D=128, bf16) on the token-permuted block-sparse Pallas kernel,
  against cuDNN dense attention over the same 32K tokens. Target: NA time <= dense time / 6. The
  table's ratio compares TFLOP/s with NA's FLOPs counted over its windows only (T x 2048 keys), so the
  time speedup is ``ratio x T / 2048 = ratio x 16``; the target is ratio >= 6 / 16 = 0.375.
* NA-2D, 128x128 tokens, kernel 13x13, same comparison (time speedup = ratio x 16384 / 169).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.ops.neighborhood import neighborhood_attention


def _dense(implementation):
    def run(q, k, v):
        flat = lambda x: x.reshape(x.shape[0], -1, *x.shape[-2:])
        return jax.nn.dot_product_attention(flat(q), flat(k), flat(v), implementation=implementation)
    return jax.jit(run)


def _na(kernel, impl):
    return jax.jit(lambda q, k, v: neighborhood_attention(q, k, v, kernel, impl=impl))


def gpu_cases(smoke: bool) -> list[dict]:
    if smoke:  # tiny shapes, Pallas interpreted on CPU, XLA dense baseline
        configs = [("1d", (256,), 32), ("2d", (16, 16), 5)]
        H, D, impl, dense_impl = 2, 32, "pallas", "xla"
    else:
        configs = [("1d", (32768,), 2048), ("2d", (128, 128), 13)]
        H, D, impl, dense_impl = 8, 128, "pallas", "cudnn"
    cases = []
    for tag, grid, kernel in configs:
        keys = jax.random.split(jax.random.PRNGKey(len(grid)), 3)
        q, k, v = (jax.random.normal(key, (1, *grid, H, D), jnp.float32).astype(jnp.bfloat16) for key in keys)
        tokens = 1
        for n in grid:
            tokens *= n
        window = kernel ** len(grid)
        dense_name = f"neighborhood/dense-{dense_impl}/{tag}"
        cases.append(dict(name=dense_name, fn=_dense(dense_impl), args=(q, k, v), flops=4.0 * H * tokens * tokens * D))
        cases.append(dict(name=f"neighborhood/na-{impl}/{tag}/k{kernel}", fn=_na(kernel, impl), args=(q, k, v),
                          flops=4.0 * H * tokens * window * D, baseline=dense_name))
    return cases
