"""The exact float32 oracle every attention impl in jattn is checked against.

Semantics (shared by every impl):

* logits ``s = scale * q @ k^T`` with GQA: query head ``h`` reads kv head ``h // (H // Hkv)``;
* ``softcap``: ``s = softcap * tanh(s / softcap)``, then ``bias`` is added, then ``score_mod(s, b, h,
  q_idx, kv_idx)`` rewrites each logit (``jattn.core.score_mod``; ``-inf`` masks the entry);
* a key is visible when ``mask`` (True = attend), ``causal`` (``j <= i``), ``window``
  (``i - left <= j <= i + right``) and ``segment_ids`` (same segment) all allow it; ``i`` and ``j``
  are positions in the query and key sequences (top-left aligned, as in ``jax.nn``);
* ``sinks[h]`` adds one value-less term ``exp(sinks[h])`` to each row's softmax denominator;
* ``prob_mod(probs) -> probs`` (dense path only) rewrites the normalised ``[B, H, T, S]`` probabilities before
  they weight ``v``; ``lse`` stays the softmax's;
* ``lse`` is the log of the denominator actually used (sink included), so
  ``out = sum_j exp(s_j - lse) v_j`` always holds; a fully masked row has ``out = 0`` and
  ``lse = -inf`` (or ``lse = sinks[h]`` when sinks are given), never NaN, forward and backward.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.core import checks
from jattn.core.score_mod import apply_score_mod, trace_score_mod

HIGHEST = jax.lax.Precision.HIGHEST


def visibility(T: int, S: int, *, mask=None, causal: bool = False, window=None, segments=None):
    """The boolean ``[B|1, H|1, T, S]`` visibility of every (query, key) pair, or None if all visible."""
    q_pos = jnp.arange(T)[:, None]
    k_pos = jnp.arange(S)[None, :]
    visible = None

    def both(a, b):
        return b if a is None else a & b

    if causal:
        visible = both(visible, (k_pos <= q_pos)[None, None])
    if window is not None:
        left, right = window
        visible = both(visible, ((k_pos >= q_pos - left) & (k_pos <= q_pos + right))[None, None])
    if segments is not None:
        q_ids, kv_ids = segments
        visible = both(visible, (q_ids[:, None, :, None] == kv_ids[:, None, None, :]))
    if mask is not None:
        visible = both(visible, jnp.reshape(mask, (1,) * (4 - mask.ndim) + tuple(mask.shape)))
    return visible


def attention_logits(q, k, *, scale: float, softcap=None, bias=None, score_mod=None):
    """float32 logits ``[B, H, T, S]`` after scale, softcap, bias and ``score_mod`` (before masking)."""
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    qg = q.astype(jnp.float32).reshape(B, T, Hkv, H // Hkv, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32), precision=HIGHEST)
    s = s.reshape(B, H, T, S) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    if score_mod is not None:
        traced, consts = trace_score_mod(score_mod)
        s = apply_score_mod(traced, consts, s, jnp.arange(B)[:, None, None, None], jnp.arange(H)[None, :, None, None],
                            jnp.arange(T)[None, None, :, None], jnp.arange(S)[None, None, None, :])
    return s


def softmax_rows(s, sink=None):
    """Row softmax of masked float32 logits ``s [..., S]`` (``-inf`` = masked), optionally with a value-less
    ``sink`` logit broadcastable to ``[..., 1]`` in each row's denominator.

    Returns ``(probs [..., S], lse [...])``. Only an exactly empty row (denominator 0) is special: probs 0
    and lse ``-inf``; a NaN row stays NaN in both. The max is a stabiliser (no gradient flows through it).
    """
    row_max = jnp.max(s, axis=-1, keepdims=True)
    if sink is not None:
        row_max = jnp.maximum(row_max, sink)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    p = jnp.exp(s - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if sink is not None:
        denom = denom + jnp.exp(sink - row_max)
    empty = denom == 0
    safe_denom = jnp.where(empty, 1.0, denom)
    return p / safe_denom, jnp.where(empty, -jnp.inf, row_max + jnp.log(safe_denom))[..., 0]


def check_prob_mod(prob_mod, shape) -> None:
    """A ``prob_mod`` must map float32 probabilities ``shape`` to a float array of the same shape (checked
    abstractly, before anything runs)."""
    if not callable(prob_mod):
        raise TypeError(f"prob_mod must be a function probs [B, H, T, S] -> probs, got {type(prob_mod).__name__}")
    out = jax.eval_shape(prob_mod, jax.ShapeDtypeStruct(tuple(shape), jnp.float32))
    if not hasattr(out, "shape") or tuple(out.shape) != tuple(shape) or not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"prob_mod must return float probabilities of the shape it gets, {list(shape)}, got {out}")


def apply_prob_mod(prob_mod, probs):
    check_prob_mod(prob_mod, probs.shape)
    return prob_mod(probs).astype(jnp.float32)


def reference_attention(q, k, v, *, bias=None, mask=None, causal: bool = False, window=None,
                        segment_ids=None, scale=None, softcap=None, sinks=None, score_mod=None, prob_mod=None,
                        return_lse: bool = False, return_probs: bool = False):
    """Dense attention in float32. Returns ``out [B, T, H, D]`` (q's dtype), plus ``lse [B, T, H]``
    (float32) and ``probs [B, H, T, S]`` (float32) when asked, in that order."""
    (B, T, S, H, Hkv, D), window, segments, scale = checks.check_attention_args(
        q, k, v, bias=bias, mask=mask, window=window, segment_ids=segment_ids, scale=scale,
        softcap=softcap, sinks=sinks)
    s = attention_logits(q, k, scale=scale, softcap=softcap, bias=bias, score_mod=score_mod)
    visible = visibility(T, S, mask=mask, causal=causal, window=window, segments=segments)
    if visible is not None:
        visible = jnp.broadcast_to(visible, s.shape)
        s = jnp.where(visible, s, -jnp.inf)
    probs, lse = softmax_rows(s, None if sinks is None else sinks.astype(jnp.float32)[None, :, None, None])
    if prob_mod is not None:
        probs = apply_prob_mod(prob_mod, probs)
    vg = v.astype(jnp.float32)
    probs_g = probs.reshape(B, Hkv, H // Hkv, T, S)
    out = jnp.einsum("bkgts,bskd->btkgd", probs_g, vg, precision=HIGHEST).reshape(B, T, H, v.shape[-1])
    results = [out.astype(q.dtype)]
    if return_lse:
        results.append(jnp.transpose(lse, (0, 2, 1)))
    if return_probs:
        results.append(probs)
    return results[0] if len(results) == 1 else tuple(results)
