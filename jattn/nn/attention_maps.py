"""Statistics of attention maps ``A [..., T, S]`` (rows = queries) for the training-free methods.

``sink_metric`` is P50's (sail-sg/Attention-Sink ``eval_sink_open_source.py``); ``attention_entropy`` and
``topk_recall`` are what entropy scaling and sparse-attention selectors read.
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
