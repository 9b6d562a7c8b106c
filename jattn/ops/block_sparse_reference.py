"""The block-sparse family's oracle, ``jattn.block_sparse_attention(impl="reference")``.

Block-sparse attention is exactly dense attention with the element mask the ``BlockMask`` expands to
(``BlockMask.to_dense_mask``: listed tile AND (full tile OR ``mask_fn``)), intersected with the causal
mask. This form materialises that mask and calls ``jattn.core.reference.reference_attention`` (the
library's semantics): quadratic in memory, for tests and tiny shapes. The fast forms are
``jattn.ops.block_sparse_xla`` (``impl="xla"``) and ``pallas_kernels.block_sparse`` (``impl="pallas"``).
"""
from __future__ import annotations

from typing import Callable

from jaxtyping import Array, Float

from jattn.core.block_mask import BlockMask
from jattn.core.reference import reference_attention


def block_sparse_reference(q: Float[Array, "B T H D"], k: Float[Array, "B S Hkv D"], v: Float[Array, "B S Hkv Dv"],
                           block_mask: BlockMask, *, mask_fn: Callable | None = None, causal: bool = False,
                           scale: float | None = None, softcap: float | None = None,
                           sinks: Float[Array, "H"] | None = None, score_mod: Callable | None = None,
                           return_lse: bool = False):
    """Dense float32 attention under the element mask of ``block_mask`` (and ``causal``).

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, S, Hkv, D]`` (H a multiple of Hkv).
      v: ``[B, S, Hkv, Dv]``.
      block_mask: a ``BlockMask`` for ``(seq_q, seq_k) = (T, S)``, batch dim 1 or B, head dim 1 or H.
      mask_fn: ``mask_fn(b, h, q_idx, kv_idx) -> bool`` for the partial tiles; None uses the one
        ``block_mask`` carries (``BlockMask.resolve_mask_fn``).
      causal: additionally require ``kv_idx <= q_idx``.
      scale: logit scale (default ``D ** -0.5``).
      softcap: ``s -> softcap * tanh(s / softcap)``.
      sinks: ``[H]`` logits of one value-less extra term in each row's softmax denominator.
      score_mod: ``(score, b, h, q_idx, kv_idx) -> score`` on each logit (``jattn.attention``).
      return_lse: also return the float32 log-sum-exp ``[B, T, H]``.

    Returns:
      ``out [B, T, H, Dv]`` in q's dtype (0 on rows with nothing visible), and ``lse [B, T, H]`` (sinks
      included; ``-inf`` on empty rows without sinks) when asked.

    Raises:
      ValueError: ``mask_fn`` conflicts with the carried one, or partial tiles need one and none is known.
    """
    B, H = q.shape[0], q.shape[2]
    dense = block_mask.to_dense_mask(mask_fn, batch=B, heads=H)
    return reference_attention(q, k, v, mask=dense, causal=causal, scale=scale, softcap=softcap, sinks=sinks,
                               score_mod=score_mod, return_lse=return_lse)
