"""Statistics of attention maps ``A [..., T, S]`` (rows = queries) for the training-free methods.

``sink_metric`` is P50's (sail-sg/Attention-Sink ``eval_sink_open_source.py``); ``attention_entropy`` and
``topk_recall`` are what entropy scaling and sparse-attention selectors read.

``key_columns`` and ``streamed_sink_metric`` read the same statistics from an attention *core* instead of a
materialised map: values that are one-hot over the first keys make the core's output the map's first
columns (``(A @ V)[t, j] = A[t, j]`` when ``V[s, j] = 1[s = j]``). So the metric runs on the path the model
really uses (its fused ``score_mod`` / ``prob_mod``, flash or Pallas), under ``jit``, in ``O(T)`` memory per
column rather than ``O(T * S)``. ``jattn.nn.capture.records_sink_metric`` applies it to every layer of a model.
"""
from __future__ import annotations

import jax.numpy as jnp

from jattn.core import checks


def _check_maps(attn):
    checks.check_float_array("attn_probs", attn)
    if attn.ndim < 2:
        raise ValueError(f"attn_probs must be [..., T, S], got {checks.describe(attn)}")


def key_importance(attn):
    """``alpha_k = 1/(T - k) * sum_{i >= k} A[i, k]`` for a causal map ``[..., T, T]``: the mean attention
    that the queries able to see key ``k`` give it. Returns ``[..., T]``."""
    _check_maps(attn)
    T = attn.shape[-1]
    if attn.shape[-2] != T:
        raise ValueError(f"the sink metric needs square causal maps [..., T, T], got {checks.describe(attn)}")
    visible = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
    column_sums = jnp.sum(jnp.where(visible, attn.astype(jnp.float32), 0.0), axis=-2)
    return column_sums / (T - jnp.arange(T))


def sink_metric(attn, eps: float = 0.3, position: int = 0):
    """P50's ``Sink_eps``: ``100 * mean over every leading axis (samples, layers, heads) of
    1[alpha_position > eps]``. Returns ``(alpha [..., T], sink_pct)``."""
    eps = checks.check_positive_float("eps", eps, allow_none=False)
    alpha = key_importance(attn)
    if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < alpha.shape[-1]:
        raise ValueError(f"position must be an int in [0, {alpha.shape[-1]}), got {position!r}")
    return alpha, 100.0 * jnp.mean((alpha[..., position] > eps).astype(jnp.float32))


def key_columns(attend, q, k, columns: int):
    """``A[b, h, t, j]`` for the first ``columns`` keys, from one call of an attention core.

    Args:
      attend: ``attend(q, k, v) -> out [B, T, H, D]`` (``v`` has q's head dim ``D``), any core whose output is its probability map times
        ``v`` (softmax attention with any mask, ``score_mod`` or ``prob_mod``: ``jattn.attention`` partially
        applied, or a registered method's core).
      q: ``[B, T, H, D]``.
      k: ``[B, S, Hkv, D]``.
      columns: how many leading keys, in ``[1, S]``.

    Returns:
      float32 ``[B, T, H, columns]``: entry ``j`` is the probability query ``t`` of head ``h`` gives key ``j``
      (``ceil(columns / D)`` calls of ``attend``).
    """
    checks.check_float_array("q", q, 4)
    checks.check_float_array("k", k, 4)
    S = k.shape[1]
    if isinstance(columns, bool) or not isinstance(columns, int) or not 1 <= columns <= S:
        raise ValueError(f"columns must be an int in [1, S={S}], got {columns!r}")
    B, _, Hkv, D = k.shape
    parts = []
    for start in range(0, columns, D):     # v keeps q's head dim D (some cores require it): D columns per call
        one_hot = jnp.eye(S, D, -start, dtype=q.dtype)                            # [S, D]: 1 at s = start + j
        v = jnp.broadcast_to(one_hot[None, :, None, :], (B, S, Hkv, D))
        parts.append(attend(q, k, v)[..., :min(D, columns - start)].astype(jnp.float32))
    return jnp.concatenate(parts, axis=-1)


def streamed_sink_metric(attend, q, k, eps: float = 0.3, position: int = 0):
    """P50's ``Sink_eps`` of a causal self-attention core, without its ``[T, T]`` map (see ``key_columns``).

    Returns ``(alpha [B, H], sink_pct)``: ``alpha = 1/(T - position) * sum_{t >= position} A[t, position]``
    per sample and head, and ``100 * mean(alpha > eps)``; equal to ``sink_metric`` of the core's map."""
    eps = checks.check_positive_float("eps", eps, allow_none=False)
    T = q.shape[1]
    if k.shape[1] != T:
        raise ValueError(f"the sink metric needs causal self-attention (k's length = q's T={T}), got k "
                         f"{checks.describe(k)}")
    if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < T:
        raise ValueError(f"position must be an int in [0, {T}), got {position!r}")
    column = key_columns(attend, q, k, position + 1)[..., position]                 # [B, T, H]
    alpha = jnp.sum(column[:, position:], axis=1) / (T - position)
    return alpha, 100.0 * jnp.mean((alpha > eps).astype(jnp.float32))


def attention_entropy(attn, eps: float = 1e-12):
    """Shannon entropy (nats) of each row: ``[..., T]``. Rows are taken as given (normalised maps)."""
    _check_maps(attn)
    p = attn.astype(jnp.float32)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, eps)), 0.0), axis=-1)


def topk_recall(attn, k: int):
    """Attention mass each row keeps on its ``k`` largest entries (1 = a k-sparse selector is exact): ``[..., T]``."""
    _check_maps(attn)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= attn.shape[-1]:
        raise ValueError(f"k must be an int in [1, S={attn.shape[-1]}], got {k!r}")
    p = attn.astype(jnp.float32)
    top = -jnp.sort(-p, axis=-1)[..., :k]
    return jnp.sum(top, -1) / jnp.maximum(jnp.sum(p, -1), 1e-30)
