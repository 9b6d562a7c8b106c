"""The softmax family's oracle, ``jattn.attention(impl="reference")``: dense float32 attention.

The whole public argument set of ``jattn.attention`` (bias, mask, causal, window, segment ids, scale,
softcap, sinks) mapped onto ``jattn.core.reference.reference_attention``, which defines the library's
semantics. Quadratic in memory: for tests and tiny shapes. The fast forms are ``jattn.ops.attention_xla``
(``impl="xla"``) and ``pallas_kernels.attention`` (``impl="pallas"``).
"""
from __future__ import annotations

from jaxtyping import Array, Bool, Float, Int

from jattn.core.reference import reference_attention


def attention_reference(q: Float[Array, "B T H D"], k: Float[Array, "B S Hkv D"], v: Float[Array, "B S Hkv Dv"],
                        *, bias: Float[Array, "..."] | None = None, mask: Bool[Array, "..."] | None = None,
                        causal: bool = False, window: int | tuple[int, int] | None = None,
                        segment_ids: Int[Array, "B T"] | tuple[Int[Array, "B T"], Int[Array, "B S"]] | None = None,
                        scale: float | None = None, softcap: float | None = None,
                        sinks: Float[Array, "H"] | None = None, score_mod=None, prob_mod=None,
                        return_lse: bool = False):
    """Dense float32 softmax attention with ``jattn.attention``'s arguments and semantics.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, S, Hkv, D]`` (H a multiple of Hkv: GQA/MQA).
      v: ``[B, S, Hkv, Dv]``.
      bias: float, broadcastable to ``[B, H, T, S]``, added to the logits (after softcap).
      mask: bool, broadcastable to ``[B, H, T, S]``; True = attend.
      causal: key ``j`` visible to query ``i`` only if ``j <= i``.
      window: ``(left, right)`` (keys ``i - left <= j <= i + right``) or an int ``n`` meaning ``(n, n)``.
      segment_ids: ``[B, T]`` (needs T == S) or a pair ``(q_ids [B, T], kv_ids [B, S])``.
      scale: logit scale, default ``D ** -0.5``.
      softcap: ``s -> softcap * tanh(s / softcap)``.
      sinks: ``[H]`` logits of one value-less extra term per row's softmax.
      score_mod: ``(score, b, h, q_idx, kv_idx) -> score`` on each logit after the bias (``jattn.attention``).
      prob_mod: ``probs [B, H, T, S] -> probs`` on the normalised probabilities (``jattn.attention``).
      return_lse: also return the float32 log-sum-exp ``[B, T, H]``.

    Returns:
      ``out [B, T, H, Dv]`` in q's dtype, and ``lse [B, T, H]`` (sinks included) when asked. A fully
      masked row gives ``out = 0`` and ``lse = -inf`` (``sinks[h]`` with sinks).

    Raises:
      TypeError, ValueError: an argument is malformed (``jattn.core.checks.check_attention_args``).
    """
    return reference_attention(q, k, v, bias=bias, mask=mask, causal=causal, window=window,
                               segment_ids=segment_ids, scale=scale, softcap=softcap, sinks=sinks,
                               score_mod=score_mod, prob_mod=prob_mod, return_lse=return_lse)
