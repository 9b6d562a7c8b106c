"""Online-softmax state and the exact log-sum-exp merge of attention over disjoint key sets (P03, P65).

A partial result is ``(out, lse)``: ``out`` normalised over its own keys and ``lse`` the log of its
softmax denominator. Partials over disjoint key sets combine exactly and associatively; an empty or
fully masked partial (``lse = -inf``) is the identity.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

# A finite stand-in for -inf inside kernels (exp underflows to exactly 0, no inf - inf = NaN).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class OnlineSoftmax(NamedTuple):
    """Running state of a row-wise softmax-weighted sum: max ``m``, denominator ``l``, numerator ``acc``.

    ``m`` and ``l`` have shape ``[..., rows]``; ``acc`` has ``[..., rows, E]``.
    """
    m: jax.Array
    l: jax.Array
    acc: jax.Array

    @classmethod
    def init(cls, rows_shape, value_dim: int) -> "OnlineSoftmax":
        return cls(m=jnp.full(rows_shape, MASK_VALUE, jnp.float32),
                   l=jnp.zeros(rows_shape, jnp.float32),
                   acc=jnp.zeros((*rows_shape, value_dim), jnp.float32))

    def update(self, logits, values, precision=None) -> "OnlineSoftmax":
        """Folds in one block: ``logits [..., rows, cols]`` (masked entries = MASK_VALUE), ``values [..., cols, E]``."""
        m_new = jnp.maximum(self.m, jnp.max(logits, axis=-1))
        correction = jnp.exp(self.m - m_new)
        p = jnp.exp(logits - m_new[..., None])
        l_new = self.l * correction + jnp.sum(p, axis=-1)
        acc_new = self.acc * correction[..., None] + jnp.einsum(
            "...rc,...ce->...re", p, values.astype(jnp.float32), precision=precision)
        return OnlineSoftmax(m_new, l_new, acc_new)

    def add_sink(self, sink_logit) -> "OnlineSoftmax":
        """Adds a value-less term ``exp(sink_logit)`` to the denominator (GPT-OSS sinks)."""
        m_new = jnp.maximum(self.m, sink_logit)
        correction = jnp.exp(self.m - m_new)
        l_new = self.l * correction + jnp.exp(sink_logit - m_new)
        return OnlineSoftmax(m_new, l_new, self.acc * correction[..., None])

    def finalize(self):
        """Returns ``(out, lse)``; rows that saw no visible key give ``out = 0`` and ``lse = -inf``.

        Only an exactly zero denominator marks an empty row, so a row with a NaN logit stays NaN.
        """
        empty = self.l == 0
        safe_l = jnp.where(empty, 1.0, self.l)
        out = jnp.where(empty[..., None], 0.0, self.acc / safe_l[..., None])
        lse = jnp.where(empty, -jnp.inf, self.m + jnp.log(safe_l))
        return out, lse


def merge_two(out_a, lse_a, out_b, lse_b):
    """Exact combination of two partials; ``out [..., E]``, ``lse [...]``."""
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    # An empty partial (lse = -inf) weighs 0; a NaN partial keeps the merge NaN.
    w_a = jnp.where(jnp.isneginf(lse_a), 0.0, jnp.exp(lse_a - safe))
    w_b = jnp.where(jnp.isneginf(lse_b), 0.0, jnp.exp(lse_b - safe))
    out = w_a[..., None] * out_a.astype(jnp.float32) + w_b[..., None] * out_b.astype(jnp.float32)
    return out, lse


def merge_partials(outs: Sequence[jax.Array] | jax.Array, lses: Sequence[jax.Array] | jax.Array):
    """Merges partial attention results over disjoint key sets into the full result.

    ``outs``: a sequence of ``[..., E]`` arrays (or one array with a leading partial axis); ``lses``:
    the matching ``[...]`` log-sum-exps. Returns ``(out, lse)`` in float32. Exact: equals attention over
    the union of the key sets; fully masked partials (``lse = -inf``) contribute nothing.
    """
    outs = jnp.stack(list(outs)) if not isinstance(outs, jax.Array) else outs
    lses = jnp.stack(list(lses)) if not isinstance(lses, jax.Array) else lses
    if outs.shape[:-1] != lses.shape:
        raise ValueError(f"merge_partials: outs must be lses' shape plus a value dim, got outs "
                         f"{tuple(outs.shape)} and lses {tuple(lses.shape)}")
    lses = lses.astype(jnp.float32)
    lse = jax.nn.logsumexp(lses, axis=0)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    weights = jnp.where(jnp.isfinite(lses), jnp.exp(lses - safe), 0.0)
    out = jnp.sum(weights[..., None] * outs.astype(jnp.float32), axis=0)
    return out, lse


def merge_sinks(out, lse, sinks):
    """Folds ``exp(sinks[h])`` into each row's denominator: ``out [B, T, H, E]``, ``lse [B, T, H]``.

    An exact LSE merge with one value-less partial (``lse = sinks[h]``), so kernels never see sinks and the
    sinks' gradient flows through the kernels' lse cotangent. Empty rows (``lse = -inf``) stay 0 and get
    ``lse = sinks[h]``, as in the reference; a NaN row stays NaN. Returns float32 ``(out, lse)``.
    """
    sink = sinks.astype(jnp.float32)[None, None, :]
    new_lse = jnp.logaddexp(lse, sink)
    keep = jnp.where(jnp.isneginf(lse), 0.0, jnp.exp(lse - new_lse))
    return out.astype(jnp.float32) * keep[..., None], new_lse
