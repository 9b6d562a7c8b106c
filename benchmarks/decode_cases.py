"""Benchmark cases for the decode kernels (issue 13's GPU rows), for the GPU suite.

Decode is memory bound, so each row carries the bytes it must read (``"bytes"``: the suite reports GB/s):
the K/V cache once, and for a quantised cache its packed codes plus their scales and minima. Rows, all
with one new token per sequence, B=8, H=32, Hkv=8, D=128, a 32K context, bf16:

* ``decode/xla/...``: ``jattn.decode_attention(impl="xla")``, XLA's own fusion of the same math (baseline);
* ``decode/pallas/contiguous/...`` and ``decode/pallas/paged/...``: the split-K, GQA-packed kernel over a
  contiguous cache and over a page pool whose table is a random permutation;
* ``decode/quantized/int8/...`` and ``decode/quantized/int4/...``: ``QuantizedKVCache.attend`` (the kernel
  that dequantises packed key groups in place), against the bf16 kernel: equal FLOPs, so the ratio column
  reads time(bf16 kernel) / time(quantised kernel).

With ``smoke=True`` the shapes are tiny and the kernels run in interpret mode (any machine).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jattn.methods.kv.quantized import QuantizedKVCache
from jattn.ops.decode import decode_attention


def decode_flops(B, H, S, D) -> float:
    """q k^T and p v over every cached key, one new token per sequence."""
    return 4.0 * B * H * S * D


def quantized_bytes(cache: QuantizedKVCache) -> int:
    """Bytes a quantised decode reads: the codes, the key groups' statistics and the values' statistics."""
    return sum(int(x.size) * x.dtype.itemsize for x in (cache.k_codes, cache.k_scale, cache.k_min, cache.v_codes,
                                                         cache.v_scale, cache.v_min))


def gpu_cases(smoke: bool) -> list[dict]:
    if smoke:
        B, H, Hkv, D, S, group, interpret = 1, 4, 2, 32, 256, 16, True
    else:
        B, H, Hkv, D, S, group, interpret = 8, 32, 8, 128, 32768, 32, None
    dtype = jnp.bfloat16
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, H, D)), dtype)
    k = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), dtype)
    lengths = jnp.full((B,), S, jnp.int32)
    page = 16 if smoke else 128
    pages = S // page
    order = jnp.asarray(rng.permutation(B * pages).reshape(B, pages), jnp.int32)
    pool = lambda x: jnp.zeros((Hkv, B * pages, page, D), dtype).at[:, order.reshape(-1)].set(  # noqa: E731
        jnp.moveaxis(x.reshape(B, Hkv, pages, page, D), 1, 0).reshape(Hkv, B * pages, page, D))
    k_pool, v_pool = pool(k), pool(v)
    kernel = dict(impl="pallas", interpret=interpret)
    xla = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, impl="xla"))
    contiguous = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, **kernel))
    paged = jax.jit(lambda q, k, v, n, t: decode_attention(q, k, v, n, page_table=t, **kernel))
    tag = f"S{S // 1024}K" if S >= 1024 else f"S{S}"
    flops = decode_flops(B, H, S, D)
    float_bytes = 2 * B * Hkv * S * D * jnp.dtype(dtype).itemsize
    base, bf16_kernel = f"decode/xla/bf16/{tag}", f"decode/pallas/contiguous/bf16/{tag}"
    cases = [
        dict(name=base, fn=xla, args=(q, k, v, lengths), flops=flops, bytes=float_bytes),
        dict(name=bf16_kernel, fn=contiguous, args=(q, k, v, lengths), flops=flops, bytes=float_bytes, baseline=base),
        dict(name=f"decode/pallas/paged/bf16/{tag}", fn=paged, args=(q, k_pool, v_pool, lengths, order), flops=flops,
             bytes=float_bytes, baseline=base),
    ]
    tokens_k, tokens_v = (jnp.swapaxes(x, 1, 2) for x in (k, v))   # [B, S, Hkv, D], as append takes them
    for bits in (8, 4):
        cache = QuantizedKVCache.create(B, Hkv, S, D, bits=bits, group_size=group, page_size=page, dtype=dtype)
        cache = jax.jit(lambda c, a, b: c.append(a, b))(cache, tokens_k, tokens_v)
        attend = jax.jit(lambda q, c: c.attend(q, **kernel))
        cases.append(dict(name=f"decode/quantized/int{bits}/{tag}", fn=attend, args=(q, cache), flops=flops,
                          bytes=quantized_bytes(cache), baseline=bf16_kernel))
    return cases
