"""Online-softmax state and the exact log-sum-exp merge of attention over disjoint key sets (P03, P65).

A partial result is ``(out, lse)``: ``out`` normalised over its own keys and ``lse`` the log of its
softmax denominator. Partials over disjoint key sets combine exactly and associatively; an empty or
fully masked partial (``lse = -inf``) is the identity.

The online-softmax math itself (the running max / denominator / accumulator update and the final
normalisation) has one home, ``pallas_kernels.common`` (``online_softmax_step``, ``finalize_rows``), shared
with the Pallas kernels and the pure-JAX paths; ``OnlineSoftmax`` is its state as a pytree.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels.common import MASK_VALUE, finalize_rows, is_unseen, online_softmax_step

__all__ = ["MASK_VALUE", "OnlineSoftmax", "merge_partials", "merge_sinks", "merge_two"]


class OnlineSoftmax(NamedTuple):
    """Running state of a row-wise softmax-weighted sum: max ``m``, denominator ``l``, numerator ``acc``.

    ``m`` and ``l`` have shape ``[..., rows]``; ``acc`` has ``[..., rows, E]``; all float32.
    """
    m: jax.Array
    l: jax.Array
    acc: jax.Array

    @classmethod
    def init(cls, rows_shape, value_dim: int) -> "OnlineSoftmax":
        """The empty state.

        Args:
          rows_shape: the shape ``[..., rows]`` of the row statistics.
          value_dim: ``E``, the value dim of the accumulator.

        Returns:
          ``m = MASK_VALUE``, ``l = 0``, ``acc = 0`` (float32).
        """
        return cls(m=jnp.full(rows_shape, MASK_VALUE, jnp.float32),
                   l=jnp.zeros(rows_shape, jnp.float32),
                   acc=jnp.zeros((*rows_shape, value_dim), jnp.float32))

    def update(self, logits: Float[Array, "*batch rows cols"], values: Float[Array, "*batch cols E"],
               precision=None) -> "OnlineSoftmax":
        """Folds in one block of keys (``pallas_kernels.common.online_softmax_step``).

        Args:
          logits: float ``[..., rows, cols]``; masked entries ``MASK_VALUE`` (or ``-inf``).
          values: ``[..., cols, E]`` (leading dims broadcast against ``logits``'); used in float32.
          precision: ``lax.Precision`` of the ``p @ values`` dot.

        Returns:
          The state after the block.
        """
        values = jnp.broadcast_to(values, (*logits.shape[:-2], *values.shape[-2:])).astype(jnp.float32)
        return OnlineSoftmax(*online_softmax_step(self.m, self.l, self.acc, logits, values, precision=precision))

    def add_sink(self, sink_logit) -> "OnlineSoftmax":
        """Adds a value-less term ``exp(sink_logit)`` to the denominator (GPT-OSS sinks).

        A row that saw no visible key (``is_unseen``: its ``l`` and ``acc`` count masked entries) is emptied
        first, so it finalises to ``out = 0`` and ``lse = sink_logit``, as in the reference.

        Args:
          sink_logit: the sink's logit, broadcastable to ``m``'s shape ``[..., rows]``.

        Returns:
          The state with the sink folded into ``m`` and ``l``.
        """
        unseen = is_unseen(self.m, self.l)
        l = jnp.where(unseen, 0.0, self.l)
        acc = jnp.where(unseen[..., None], 0.0, self.acc)
        m_new = jnp.maximum(self.m, sink_logit)
        correction = jnp.exp(self.m - m_new)
        l_new = l * correction + jnp.exp(sink_logit - m_new)
        return OnlineSoftmax(m_new, l_new, acc * correction[..., None])

    def finalize(self) -> tuple[Float[Array, "*batch rows E"], Float[Array, "*batch rows"]]:
        """The normalised result (``pallas_kernels.common.finalize_rows``).

        Returns:
          ``(out [..., rows, E], lse [..., rows])`` float32. A row that saw no visible key (an exactly zero
          denominator, or only masked entries) gives ``out = 0`` and ``lse = -inf``; a row with a NaN logit
          stays NaN.
        """
        return finalize_rows(self.m, self.l, self.acc)


def merge_two(out_a: Float[Array, "*rows E"], lse_a: Float[Array, "*rows"], out_b: Float[Array, "*rows E"],
              lse_b: Float[Array, "*rows"]) -> tuple[Float[Array, "*rows E"], Float[Array, "*rows"]]:
    """Exact combination of two partials over disjoint key sets.

    Args:
      out_a: the first partial's output ``[..., E]``.
      lse_a: its log-sum-exp ``[...]``.
      out_b: the second partial's output ``[..., E]``.
      lse_b: its log-sum-exp ``[...]``.

    Returns:
      ``(out, lse)`` float32. An empty partial (``lse = -inf``) weighs 0; a NaN partial keeps the merge NaN.
    """
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    # An empty partial (lse = -inf) weighs 0; a NaN partial keeps the merge NaN.
    w_a = jnp.where(jnp.isneginf(lse_a), 0.0, jnp.exp(lse_a - safe))
    w_b = jnp.where(jnp.isneginf(lse_b), 0.0, jnp.exp(lse_b - safe))
    out = w_a[..., None] * out_a.astype(jnp.float32) + w_b[..., None] * out_b.astype(jnp.float32)
    return out, lse


def merge_partials(outs: Sequence[Float[Array, "*rows E"]] | Float[Array, "P *rows E"],
                   lses: Sequence[Float[Array, "*rows"]] | Float[Array, "P *rows"]
                   ) -> tuple[Float[Array, "*rows E"], Float[Array, "*rows"]]:
    """Merges partial attention results over disjoint key sets into the full result.

    Exact: equals attention over the union of the key sets; fully masked partials (``lse = -inf``)
    contribute nothing. For attention outputs the rows are ``[B, T, H]`` (``lse [B, T, H]``).

    Args:
      outs: a sequence of ``[..., E]`` arrays, or one array with a leading partial axis ``[P, ..., E]``.
      lses: the matching ``[...]`` log-sum-exps (a sequence, or ``[P, ...]``).

    Returns:
      ``(out [..., E], lse [...])`` in float32.

    Raises:
      ValueError: ``outs`` is not ``lses``' shape plus a value dim.
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


def merge_sinks(out: Float[Array, "B T H E"], lse: Float[Array, "B T H"], sinks: Float[Array, "H"]
                ) -> tuple[Float[Array, "B T H E"], Float[Array, "B T H"]]:
    """Folds ``exp(sinks[h])`` into each row's softmax denominator.

    An exact LSE merge with one value-less partial (``lse = sinks[h]``), so kernels never see sinks and the
    sinks' gradient flows through the kernels' lse cotangent. Empty rows (``lse = -inf``) stay 0 and get
    ``lse = sinks[h]``, as in the reference; a NaN row stays NaN.

    Args:
      out: ``[B, T, H, E]`` attention output without the sinks.
      lse: ``[B, T, H]`` its float32 log-sum-exp.
      sinks: ``[H]`` one logit per query head.

    Returns:
      ``(out [B, T, H, E], lse [B, T, H])`` in float32, the sinks included.
    """
    sink = sinks.astype(jnp.float32)[None, None, :]
    new_lse = jnp.logaddexp(lse, sink)
    keep = jnp.where(jnp.isneginf(lse), 0.0, jnp.exp(lse - new_lse))
    return out.astype(jnp.float32) * keep[..., None], new_lse
