"""Benchmark cases for the chunked linear-attention kernel (P58 / P74), for the CPU script and the GPU suite.

GPU target (protocol: see the docstring of benchmarks/gpu_suite.py): the Pallas lightning forward at
T=32K is >= 5x faster than cuDNN causal softmax attention (Lightning-2 reports 9.2x against
FlashAttention-2). Shapes follow the Lightning-2 README benchmark: B=4, H=32, D=E=128, bf16, ALiBi decay.

The suite's ratio column is TFLOP/s(case) / TFLOP/s(baseline). Linear and softmax attention do different
work, so two lightning rows are listed: ``.../fwd`` with its own FLOPs (an honest TFLOP/s), and
``.../fwd/speedup`` with the *baseline's* FLOPs, so that its ratio column reads
time(cuDNN) / time(lightning), the number the target is about (>= 5).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.core.decay import alibi_log_decay
from jattn.ops.linear import linear_attention


def linear_attention_flops(B, T, H, D, E, *, chunk: int) -> float:
    """Chunked form: intra-chunk q k^T and (.)v over full C x C tiles, inter-chunk q S and k^T v."""
    intra = 2.0 * chunk * D + 2.0 * chunk * E
    inter = 2.0 * D * E + 2.0 * D * E
    return B * H * T * (intra + inter)


def softmax_causal_flops(B, T, H, D) -> float:
    return 4.0 * B * H * T * T * D * 0.5


def gpu_cases(smoke: bool) -> list[dict]:
    if smoke:
        B, T, H, D, chunk, impl, baseline_impl = 1, 128, 2, 32, 16, "pallas", "xla"
    else:
        B, T, H, D, chunk, impl, baseline_impl = 4, 32768, 32, 128, 64, "pallas", "cudnn"
    dtype = jnp.bfloat16
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (B, T, H, D), jnp.float32).astype(dtype) for key in keys)
    decay = alibi_log_decay(H)
    lightning = jax.jit(lambda q, k, v, a: linear_attention(q, k, v, log_decay=a, chunk_size=chunk, impl=impl))
    softmax = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                   implementation=baseline_impl))
    tag = f"T{T // 1024}K" if T >= 1024 else f"T{T}"
    base_name = f"linear/{baseline_impl}-softmax/fwd/causal/{tag}"
    linear_flops = linear_attention_flops(B, T, H, D, D, chunk=chunk)
    softmax_flops = softmax_causal_flops(B, T, H, D)
    return [
        dict(name=base_name, fn=softmax, args=(q, k, v), flops=softmax_flops),
        dict(name=f"linear/lightning/fwd/{tag}", fn=lightning, args=(q, k, v, decay), flops=linear_flops,
             baseline=base_name),
        dict(name=f"linear/lightning/fwd/speedup/{tag}", fn=lightning, args=(q, k, v, decay), flops=softmax_flops,
             baseline=base_name),
    ]
