"""P22 — Duplex: A Device for Large Language Models with Mixture of Experts, Grouped Query Attention, and
Continuous Batching.

Not new attention math: the paper's argument is the arithmetic intensity (Op/B, FLOPs per DRAM byte) of
decode attention. With GQA, the ``G = H / Hkv`` query heads of a kv head share its K/V, so a kernel that
loads each K/V tile once for the whole group (as ``pallas_kernels/decode.py`` does: the group's rows are
packed into one tile) does ``4 * G * Tq * L * d`` FLOPs per ``2 * L * d`` K/V elements: Op/B = ``G`` for
fp16 caches and one new token, which is why decode attention is memory bound (Op/B 4-8) and belongs on
near-memory compute in the paper. ``decode_cost`` is that model; the PIM hardware itself is out of scope.
"""
from __future__ import annotations

from typing import NamedTuple

from jattn.core import checks


class DecodeCost(NamedTuple):
    flops: int            # the two matmuls: q k^T and p v
    bytes: int            # K and V read once (each tile loaded once per kv-head group)
    op_per_byte: float


def decode_cost(*, batch: int, heads: int, kv_heads: int, head_dim: int, context: int, new_tokens: int = 1,
                bytes_per_element: int = 2) -> DecodeCost:
    """The Op/B model of GQA decode attention (P22, Sec. 3).

    Args:
      batch: sequences decoded together.
      heads: query heads H.
      kv_heads: kv heads Hkv (H a multiple of it).
      head_dim: d.
      context: keys L each new token attends to.
      new_tokens: Tq new tokens per sequence.
      bytes_per_element: of the cache (2: fp16/bf16).

    Returns:
      ``DecodeCost(flops, bytes, op_per_byte)``; ``op_per_byte = G * Tq`` at 2 bytes per element.
    """
    for name, value in (("batch", batch), ("heads", heads), ("kv_heads", kv_heads), ("head_dim", head_dim),
                        ("context", context), ("new_tokens", new_tokens), ("bytes_per_element", bytes_per_element)):
        checks.check_int(name, value)
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    flops = 4 * batch * heads * new_tokens * context * head_dim
    cache_bytes = 2 * batch * kv_heads * context * head_dim * bytes_per_element
    return DecodeCost(flops, cache_bytes, flops / cache_bytes)
