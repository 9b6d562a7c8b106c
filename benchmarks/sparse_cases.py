"""GPU suite cases for the block-sparse kernel (protocol: see the docstring of benchmarks/gpu_suite.py).

Shapes match the suite's dense flash cases (B=2, T=8192, H=8, D=128, bf16) so that ``baseline`` can
name them: the table's ratio is TFLOP/s(sparse) / TFLOP/s(dense flash) with the sparse FLOPs counted
as density x dense FLOPs. Target: block-sparse time <= 1.3 x density x dense flash time, i.e.
ratio >= 1 / 1.3 = 0.77. The 100%-density case measures the table/loop overhead alone.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core.block_mask import BlockMask
from jattn.ops.block_sparse import block_sparse_attention


def _random_block_mask(seq: int, heads: int, block: int, density: float) -> BlockMask:
    n = math.ceil(seq / block)
    per_row = max(1, round(density * n))
    rng = np.random.default_rng(0)
    chosen = np.stack([np.stack([rng.choice(n, per_row, replace=False) for _ in range(n)]) for _ in range(heads)])
    return BlockMask.from_topk_indices(jnp.asarray(chosen[None], jnp.int32), block_q=block, block_k=block,
                                       seq_q=seq, seq_k=seq)


def _forward(impl):
    return jax.jit(lambda q, k, v, bm: block_sparse_attention(q, k, v, bm, impl=impl))


def _forward_backward(impl):
    def loss(q, k, v, bm, d_out):
        return jnp.sum(block_sparse_attention(q, k, v, bm, impl=impl).astype(jnp.float32) * d_out)
    return jax.jit(lambda q, k, v, d_out, bm: jax.grad(loss, argnums=(0, 1, 2))(q, k, v, bm, d_out))


def gpu_cases(smoke: bool) -> list[dict]:
    if smoke:
        B, T, H, D, block, impl = 1, 64, 2, 32, 16, "pallas"          # interpret mode on CPU
    else:
        B, T, H, D, block, impl = 2, 8192, 8, 128, 128, "pallas"
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, d_out = (jax.random.normal(key, (B, T, H, D), jnp.float32).astype(jnp.bfloat16) for key in keys)
    dense_fwd = 4 * B * H * T * T * D
    cases = []
    for density in (0.1, 0.5, 1.0):
        bm = _random_block_mask(T, H, block, density)
        kept = bm.density
        tag = f"{round(100 * kept)}%"
        cases.append(dict(name=f"sparse/block_sparse/fwd/{tag}", fn=_forward(impl), args=(q, k, v, bm),
                          flops=kept * dense_fwd, baseline="flash/fwd/full"))
        cases.append(dict(name=f"sparse/block_sparse/fwd+bwd/{tag}", fn=_forward_backward(impl),
                          args=(q, k, v, d_out, bm), flops=kept * dense_fwd * 3.5,
                          baseline="flash/fwd+bwd/full"))
    return cases
