"""P16 — AttentionInfluence: Adopting Attention Head Influence for Weak-to-Strong Pretraining Data Selection.

Training-free data scoring by head ablation:

1. **Retrieval heads** (``retrieval_head_scores``). While the model reads the answer of a key -> value
   retrieval prompt, head ``h`` *copies* a value token ``w`` at answer step ``t`` when the position its
   attention peaks on, ``argmax_j A_h[t, j]`` over the visible keys, holds ``w`` and ``w`` belongs to the target
   value. ``score_h = |copied ∩ value| / |value|`` per sample, averaged over samples; the top 5 % of heads
   (``top_heads``) are the retrieval heads.
2. **Reference model**: the base model with those heads ablated, their attention weights replaced by uniform
   ones. The spec's reading for causal models (the paper says ``1/L``): uniform over the visible keys,
   ``1 / (t + 1)``, so an ablated head outputs the running mean of ``v`` (``uniform_head_ablation``: no
   softmax, one cumulative sum), or as a ``prob_mod`` on the dense path (``head_ablation_prob_mod``).
3. ``attention_influence = (L_ref - L_base) / L_base`` per document (mean token cross-entropy); documents are
   ranked by it within a domain and the top 20 % kept.

No official code was found; this follows the paper text as the spec transcribes it.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jattn.core import checks
from jattn.ops.attention import attention

__all__ = ["uniform_head_ablation", "head_ablation_prob_mod", "causal_mean", "retrieval_head_scores",
           "top_heads", "attention_influence"]


def _check_head_mask(head_mask, H: int):
    head_mask = jnp.asarray(head_mask)
    if head_mask.shape != (H,) or head_mask.dtype != jnp.bool_:
        raise ValueError(f"head_mask must be bool [H={H}] (True = ablate the head), got {checks.describe(head_mask)}")
    return head_mask


def causal_mean(v: Float[Array, "B T H D"]) -> Float[Array, "B T H D"]:
    """``out[t] = mean_{j <= t} v[j]``: what a head with uniform causal attention outputs."""
    counts = jnp.arange(1, v.shape[1] + 1, dtype=jnp.float32)[None, :, None, None]
    return (jnp.cumsum(v.astype(jnp.float32), axis=1) / counts).astype(v.dtype)


def uniform_head_ablation(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"],
                          head_mask: Bool[Array, "H"], *, causal: bool = True, **attention_kwargs):
    """Attention whose heads in ``head_mask`` attend uniformly over their visible keys (``1/(t+1)`` causal,
    ``1/S`` otherwise): their output is the running (or global) mean of ``v``; other heads are
    ``jattn.attention(q, k, v, causal=causal, **attention_kwargs)`` unchanged."""
    checks.check_bool("causal", causal)
    H, Hkv = q.shape[2], k.shape[2]
    head_mask = _check_head_mask(head_mask, H)
    out = attention(q, k, v, causal=causal, **attention_kwargs)
    v_heads = jnp.repeat(v, H // Hkv, axis=2)
    uniform = causal_mean(v_heads) if causal else jnp.broadcast_to(jnp.mean(v_heads, axis=1, keepdims=True),
                                                                   v_heads.shape)
    return jnp.where(head_mask[None, None, :, None], uniform.astype(out.dtype), out)


def head_ablation_prob_mod(head_mask: Bool[Array, "H"], *, causal: bool = True):
    """The same ablation as a ``prob_mod`` for ``jattn.attention(..., prob_mod=...)`` (dense path): the
    masked heads' rows become uniform over the visible keys (the causal lower triangle, or every key)."""
    checks.check_bool("causal", causal)
    head_mask = jnp.asarray(head_mask)
    if head_mask.ndim != 1 or head_mask.dtype != jnp.bool_:
        raise ValueError(f"head_mask must be bool [H] (True = ablate the head), got {checks.describe(head_mask)}")

    def prob_mod(p):
        _check_head_mask(head_mask, p.shape[1])
        T, S = p.shape[-2:]
        if causal:
            visible = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]
            uniform = visible / jnp.sum(visible, axis=-1, keepdims=True)
        else:
            uniform = jnp.full((T, S), 1.0 / S)
        return jnp.where(head_mask[None, :, None, None], uniform.astype(p.dtype), p)
    return prob_mod


def retrieval_head_scores(probs: Float[Array, "... B H T S"], tokens: Int[Array, "B S"],
                          answer_steps: Bool[Array, "B T"], value_tokens: Int[Array, "B V"]) -> Float[Array, "... H"]:
    """The retrieval score of every head, averaged over the ``B`` samples.

    Args:
      probs: attention maps ``[..., B, H, T, S]`` (leading axes, e.g. layers, are kept), rows = queries.
      tokens: ``[B, S]`` the token at each key position.
      answer_steps: ``[B, T]`` True at the query positions that read the answer (decoding steps).
      value_tokens: ``[B, V]`` the target value's tokens, ``-1`` = padding (a sample's value is the set of its
        non-negative entries).

    Returns:
      float32 ``[..., H]``: mean over samples of ``|copied ∩ value| / |value|``.
    """
    checks.check_float_array("probs", probs)
    B, S = tokens.shape
    if probs.ndim < 4 or probs.shape[-4] != B or probs.shape[-1] != S:
        raise ValueError(f"probs must be [..., B={B}, H, T, S={S}] for tokens {checks.describe(tokens)}, got "
                         f"{checks.describe(probs)}")
    T = probs.shape[-2]
    if answer_steps.shape != (B, T) or value_tokens.ndim != 2 or value_tokens.shape[0] != B:
        raise ValueError(f"answer_steps must be bool [B={B}, T={T}] and value_tokens int [B={B}, V], got "
                         f"{checks.describe(answer_steps)} and {checks.describe(value_tokens)}")
    peak = jnp.argmax(probs, axis=-1)                                         # [..., B, H, T]
    pointed = jnp.take_along_axis(jnp.broadcast_to(tokens[:, None, None, :], peak.shape + (S,)),
                                  peak[..., None], axis=-1)[..., 0]           # token at the peak
    valid = value_tokens >= 0                                                 # [B, V]
    hits = (pointed[..., None] == value_tokens[:, None, None, :]) & valid[:, None, None, :]
    hits = hits & answer_steps[:, None, :, None]                              # [..., B, H, T, V]
    copied = jnp.any(hits, axis=-2)                                           # each value slot copied at some step
    first = _first_occurrence(value_tokens) & valid                           # count each distinct token once
    per_sample = jnp.sum(copied & first[:, None, :], -1) / jnp.maximum(jnp.sum(first, -1), 1)[:, None]
    return jnp.mean(per_sample, axis=-2).astype(jnp.float32)


def _first_occurrence(value_tokens):
    """``[B, V]`` True at the first slot of each distinct token (a value is a set)."""
    V = value_tokens.shape[1]
    earlier = jnp.arange(V)[None, :] < jnp.arange(V)[:, None]                 # [i, j]: j before i
    same = value_tokens[:, :, None] == value_tokens[:, None, :]
    return ~jnp.any(same & earlier[None], axis=-1)


def top_heads(scores: Float[Array, "... H"], fraction: float = 0.05, *, minimum: int = 1) -> np.ndarray:
    """Bool mask of the top ``fraction`` of all heads by score (at least ``minimum``), same shape as ``scores``;
    ties go to the earlier head."""
    checks.check_float_in("fraction", fraction, 0.0, 1.0, low_open=True)
    flat = np.asarray(scores, np.float64).reshape(-1)
    count = max(int(minimum), int(round(fraction * flat.size)))
    order = np.lexsort((np.arange(flat.size), -flat))[:count]
    mask = np.zeros(flat.size, bool)
    mask[order] = True
    return mask.reshape(np.shape(scores))


def attention_influence(loss_base: Float[Array, "N"], loss_ref: Float[Array, "N"]) -> Float[Array, "N"]:
    """``(L_ref - L_base) / L_base`` per document: how much ablating the retrieval heads hurts it."""
    loss_base, loss_ref = jnp.asarray(loss_base, jnp.float32), jnp.asarray(loss_ref, jnp.float32)
    if loss_base.shape != loss_ref.shape:
        raise ValueError(f"loss_base and loss_ref must have the same shape, got {loss_base.shape} and "
                         f"{loss_ref.shape}")
    return (loss_ref - loss_base) / loss_base
