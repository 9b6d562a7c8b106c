"""P39 PAINT: "Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large Vision-Language
Models" (official code ``hasanar1f/PAINT``, ``modPAI/attention.py`` and ``.../clip_encoder.py``; built on PAI;
the computation follows ``papers/P25-P49.md``).

A pre-softmax score modifier for a decoder that attends over ``[image tokens, text tokens]``:

1. **Informed visual tokens** (:func:`select_informed_visual_tokens`) from the *vision encoder's* maps:
   - *local* tokens: the top ``local_ratio`` (25%) of the patches by their attention score in the **first**
     encoder layer (summed over heads);
   - *summary* tokens: the IQR outliers of the score in the **penultimate** encoder layer:
     ``score > Q3 + 1.5 IQR`` (quartiles by linear interpolation, numpy's / ``torch.quantile``'s default);
   - ``local <- local \\ summary``.

   The paper's score is CLIP's CLS -> patch attention. **Deliberate deviation**: an encoder without a class
   token (the tiny VLM's ViT) has no CLS row, so the score of patch ``j`` is the **mean attention it receives**
   from every patch, summed over heads: ``score_j = sum_h mean_i A[h, i, j]`` (the column mean; the CLS row is
   one such query, the mean is over all of them). A model with a CLS token passes its CLS row instead: a
   ``[B, H, N]`` input is taken as per-(head, patch) scores directly (``attn[:, :, 0, 1:]``).
2. **Boost** (:func:`boost_logits`, :func:`paint_score_mod`): on the query row of the token being generated
   (the last row; with a KV cache it is the only row of a decode step), before the softmax,
   ``logit_j += alpha |logit_j|`` for local keys and ``+= beta |logit_j|`` for summary keys. All heads alike.
   As a ``score_mod`` it is a per-key piecewise-linear factor ``s * (1 + a_j sign(s))`` (``a_j`` = alpha, beta
   or 0), so it fuses into the flash kernel. A decoder that re-runs the whole sequence every greedy step (no
   KV cache, like :func:`jattn.nn.vlm.greedy_decode`) must boost *every* generated row — each row was "the
   last row" when its token was produced, and the prefix mask keeps later rows from changing it — which
   ``rows=`` (a bool query mask) expresses.

Defaults from the official code: ``alpha = 0.7, beta = 0.3, local_ratio = 0.25``; decoder layers ``[2, 32)`` of
LLaVA's 32 (the layer choice is the caller's; see ``train/vlm_paint_dymu.py``). PAI's CFG logit contrast
(``gamma``) is off by default in PAINT and not implemented. Decode-only, no training.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["patch_scores", "iqr_outliers", "select_informed_visual_tokens", "boost_logits", "paint_score_mod",
           "DEFAULT_ALPHA", "DEFAULT_BETA", "DEFAULT_LOCAL_RATIO"]

DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_LOCAL_RATIO = 0.7, 0.3, 0.25


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    return f"shape {tuple(shape)} dtype {getattr(x, 'dtype', None)}" if shape is not None else type(x).__name__


def _float_array(name, x, ndims):
    if not hasattr(x, "shape") or not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array, got {_describe(x)}")
    if x.ndim not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dims, got {_describe(x)}")
    return jnp.asarray(x, jnp.float32)


def _nonneg(name, x):
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) or not float(x) >= 0:
        raise ValueError(f"{name} must be a float >= 0, got {x!r}")
    return float(x)


def patch_scores(attn):
    """Per-patch scores ``[B, N]``: ``attn [B, H, N, N]`` (an encoder map without CLS) -> the mean attention each
    patch receives, summed over heads, ``sum_h mean_i attn[b, h, i, j]``; ``attn [B, H, N]`` (CLS -> patch rows)
    -> the sum over heads."""
    attn = _float_array("attn", attn, (3, 4))
    if attn.ndim == 4:
        if attn.shape[-1] != attn.shape[-2]:
            raise ValueError(f"attn must be a square self-attention map [B, H, N, N], got {_describe(attn)}")
        attn = attn.mean(axis=2)
    return attn.sum(axis=1)


def iqr_outliers(scores, k: float = 1.5):
    """``scores [B, N] > Q3 + k * (Q3 - Q1)`` per row (quartiles by linear interpolation, as ``np.quantile``)."""
    scores = _float_array("scores", scores, (2,))
    k = _nonneg("k", k)
    q1, q3 = jnp.quantile(scores, 0.25, axis=-1, keepdims=True), jnp.quantile(scores, 0.75, axis=-1, keepdims=True)
    return scores > q3 + k * (q3 - q1)


def select_informed_visual_tokens(vit_attn_first, vit_attn_penult, local_ratio: float = DEFAULT_LOCAL_RATIO,
                                  *, iqr_k: float = 1.5):
    """``(local, summary)`` bool ``[B, N]`` visual-token sets (see the module docstring).

    ``vit_attn_first`` / ``vit_attn_penult``: the first / penultimate encoder layer's maps ``[B, H, N, N]`` (no
    CLS: the column-mean score) or CLS -> patch rows ``[B, H, N]``. ``local`` = the top ``floor(local_ratio * N)``
    patches by the first-layer score (ties broken by position), minus ``summary`` = the IQR outliers of the
    penultimate-layer score."""
    if isinstance(local_ratio, bool) or not isinstance(local_ratio, (int, float)) or not 0.0 <= local_ratio <= 1.0:
        raise ValueError(f"local_ratio must be a float in [0, 1], got {local_ratio!r}")
    first, penult = patch_scores(vit_attn_first), patch_scores(vit_attn_penult)
    if first.shape != penult.shape:
        raise ValueError(f"vit_attn_first and vit_attn_penult must describe the same [B, N] patches, got scores "
                         f"{first.shape} and {penult.shape}")
    B, N = first.shape
    k = int(np.floor(local_ratio * N))
    order = jnp.argsort(-first, axis=-1, stable=True)                      # descending, ties by position
    rank = jnp.argsort(order, axis=-1)
    local = rank < k
    summary = iqr_outliers(penult, iqr_k)
    return local & ~summary, summary


def _key_masks(local, summary, S=None):
    local, summary = jnp.asarray(local), jnp.asarray(summary)
    for name, m in (("local", local), ("summary", summary)):
        if m.dtype != jnp.bool_ or m.ndim != 2:
            raise ValueError(f"{name} must be a bool array [B, N], got {_describe(m)}")
    if local.shape != summary.shape:
        raise ValueError(f"local and summary must have the same shape [B, N], got {local.shape} and {summary.shape}")
    if S is not None and local.shape[1] > S:
        raise ValueError(f"local/summary cover N={local.shape[1]} keys but the scores have only S={S}")
    return local, summary


def _rows(rows, T):
    if isinstance(rows, (int, np.integer)) and not isinstance(rows, bool):
        if not -T <= int(rows) < T:
            raise ValueError(f"rows must be a query index in [-{T}, {T}) or a bool mask [T={T}], got {rows!r}")
        return jnp.arange(T) == (int(rows) % T)
    rows = jnp.asarray(rows)
    if rows.dtype != jnp.bool_ or rows.shape != (T,):
        raise ValueError(f"rows must be a query index or a bool mask [T={T}], got {_describe(rows)}")
    return rows


def _key_factor(local, summary, S, alpha, beta, key_offset):
    """``[B, S]`` per-key boost coefficient: alpha on local, beta on summary keys (image keys start at
    ``key_offset``), 0 elsewhere."""
    B, N = local.shape
    if key_offset < 0 or key_offset + N > S:
        raise ValueError(f"key_offset={key_offset} puts the N={N} image keys outside the S={S} keys")
    coef = alpha * local.astype(jnp.float32) + beta * summary.astype(jnp.float32)
    return jnp.zeros((B, S), jnp.float32).at[:, key_offset:key_offset + N].set(coef)


def boost_logits(scores, local, summary, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA, rows=-1, *,
                 key_offset: int = 0):
    """``scores [B, H, T, S]`` (pre-softmax logits) with ``logit += alpha |logit|`` at local keys and
    ``beta |logit|`` at summary keys, on the query ``rows`` only (an index, default the last row, or a bool
    mask ``[T]``). ``local, summary``: bool ``[B, N]`` image keys, at key positions ``key_offset ..
    key_offset + N``. A key in both sets gets both boosts (:func:`select_informed_visual_tokens` never makes
    one)."""
    scores = _float_array("scores", scores, (4,))
    alpha, beta = _nonneg("alpha", alpha), _nonneg("beta", beta)
    B, H, T, S = scores.shape
    local, summary = _key_masks(local, summary, S)
    if local.shape[0] not in (1, B):
        raise ValueError(f"local/summary have batch {local.shape[0]}, the scores {B}")
    coef = _key_factor(local, summary, S, alpha, beta, int(key_offset))        # [B, S]
    row = _rows(rows, T).astype(jnp.float32)                                   # [T]
    return scores + coef[:, None, None, :] * row[None, None, :, None] * jnp.abs(scores)


def paint_score_mod(local, summary, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA, rows=None, *,
                    num_keys: int | None = None, key_offset: int = 0):
    """The boost as a ``score_mod(score, b, h, q_idx, kv_idx)`` for :func:`jattn.attention` (FlexAttention's
    contract; fused per key: ``score + a[b, kv] * row[q] * |score|``). ``rows``: bool ``[T]`` query mask (None:
    every row; an int is not available here since ``T`` is unknown to the mod — pass the mask).
    ``num_keys``: S, the attention's key count (default ``key_offset + N``)."""
    alpha, beta = _nonneg("alpha", alpha), _nonneg("beta", beta)
    local, summary = _key_masks(local, summary)
    N = local.shape[1]
    S = key_offset + N if num_keys is None else int(num_keys)
    coef = _key_factor(local, summary, S, alpha, beta, int(key_offset))
    if rows is not None:
        rows = jnp.asarray(rows)
        if rows.dtype != jnp.bool_ or rows.ndim != 1:
            raise ValueError(f"rows must be a bool query mask [T] or None, got {_describe(rows)}")
        row = rows.astype(jnp.float32)
    batched = coef.shape[0] > 1

    def score_mod(score, b, h, q_idx, kv_idx):
        a = coef[b if batched else 0, kv_idx]
        if rows is not None:
            a = a * row[q_idx]
        return score + a * jnp.abs(score)

    return score_mod
