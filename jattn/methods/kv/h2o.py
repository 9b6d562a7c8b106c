"""P70 — SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context Large Language Models.

The H2O ("Heavy-Hitter Oracle", Zhang et al. 2023) KV-cache eviction SinkLoRA runs at inference (its
S²/SF attention is ``jattn.methods.sparse.sinklora``). A fixed budget ``n_hh + n_recent`` of KV slots per
(sequence, kv head) holds the ``n_recent`` most recent tokens plus the ``n_hh`` "heavy hitters": the tokens
with the largest accumulated attention

    score_j = sum over steps t, over the query heads h of the kv group:  A_h[t, j]

where ``A_h[t, :]`` is the softmax row that step ``t`` actually used (over the keys kept at that step).

* **prefill** (prompt of ``T`` tokens): full causal attention; ``score_j`` sums the prompt's probability
  columns; then, once, keep the last ``n_recent`` positions and the ``n_hh`` others with the largest score.
* **step** (one new token at position ``p``): attend over the kept slots plus the new token, add this row's
  probabilities to the scores (the new token starts at its own probability), then, when the ``budget + 1``
  entries exceed the budget, evict the one non-recent entry (position ``<= p - n_recent``) with the
  lowest score; the new token takes its slot. Ties: the oldest position is evicted.

Follows the official ``H2OKVCache_LayerWise`` (FMInference/H2O, ``h2o_hf/utils_real_drop/modify_llama.py``):
prompt scores from the full causal probabilities, scores accumulated from each step's probabilities over the
reduced cache, top-``n_hh`` by score among the non-recent entries plus the ``n_recent`` newest. Choices where
it is silent or specific: the official code sums scores over the batch too (it is written for batch 1) and
keeps them per query head (MHA only); here scores are per sequence and per **kv head**, summed over the
query heads of the group (summing or averaging ranks the same). Ties in ``torch.topk`` are unspecified;
here the newer token wins. Only one-token steps (as H2O's generation loop).

The cache is fixed-capacity and pure (``H2OCache``, a pytree like ``jattn.cache``'s caches): every
function is ``jit``-able, shapes never change, an empty slot has position ``-1``. Attention over the
``budget + 1`` candidates runs densely in float32 (``jattn.core.reference``), because H2O needs the
probabilities themselves, which the flash/decode kernels do not return; the prompt's attention is likewise
dense (``O(T^2)``), as in the official code.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jattn.core import checks
from jattn.core.reference import reference_attention
from jattn.methods.kv.gather import check_step_tokens

EMPTY = -1  # position of an empty slot


def _budget_sizes(n_hh, n_recent) -> tuple[int, int]:
    n_hh, n_recent = checks.check_int("n_hh", n_hh, 0), checks.check_int("n_recent", n_recent, 0)
    if n_hh + n_recent < 1:
        raise ValueError(f"the budget n_hh + n_recent must be >= 1, got n_hh={n_hh}, n_recent={n_recent}")
    return n_hh, n_recent


def h2o_keep_mask(scores: Float[Array, "*batch N"], positions: Int[Array, "*batch N"], *, n_hh: int,
                  n_recent: int) -> Bool[Array, "*batch N"]:
    """Which entries H2O keeps: the ``n_recent`` newest valid positions plus the ``n_hh`` others with the
    largest score (ties: the newer position wins).

    Args:
      scores: ``[..., N]`` accumulated attention of each entry.
      positions: ``[..., N]`` int original positions, ``-1`` for an empty entry (never kept). Valid
        positions are distinct along the last axis.
      n_hh: heavy hitters kept (>= 0).
      n_recent: most recent positions kept (>= 0): those ``> newest - n_recent``.

    Returns:
      ``[..., N]`` bool, True = kept: ``min(valid entries, n_hh + n_recent)`` entries per row when the valid
      positions are the contiguous most recent ones and ``n_recent`` of them lie in the window.

    Raises:
      TypeError, ValueError: a size, dtype or shape is wrong (named).
    """
    n_hh, n_recent = _budget_sizes(n_hh, n_recent)
    checks.check_float_array("scores", scores)
    if not hasattr(positions, "dtype") or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"positions must be an integer array, got {checks.describe(positions)}")
    if positions.shape != scores.shape:
        raise ValueError(f"positions must have scores' shape {tuple(scores.shape)}, got {checks.describe(positions)}")
    valid = positions >= 0
    newest = jnp.max(positions, axis=-1, keepdims=True)
    recent = valid & (positions > newest - n_recent)
    candidate = valid & ~recent
    ranked = jnp.where(candidate, scores.astype(jnp.float32), -jnp.inf)
    order = jnp.lexsort((-positions, -ranked), axis=-1)   # score descending, then newest first
    rank = jnp.argsort(order, axis=-1)
    return recent | (candidate & (rank < n_hh))


def _group_sum(probs, kv_heads: int):
    """``[B, H, ..., N]`` probabilities -> ``[B, Hkv, N]``: summed over each kv group's heads and the rows."""
    B, H, N = probs.shape[0], probs.shape[1], probs.shape[-1]
    return probs.reshape(B, kv_heads, H // kv_heads, -1, N).sum(axis=(2, 3))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class H2OCache:
    """H2O's fixed-budget KV cache: ``budget = n_hh + n_recent`` slots per (sequence, kv head)."""
    k: jax.Array            # [B, Hkv, budget, D]
    v: jax.Array            # [B, Hkv, budget, D]
    positions: jax.Array    # [B, Hkv, budget] int32 original position of each slot, -1 = empty
    scores: jax.Array       # [B, Hkv, budget] float32 accumulated attention
    lengths: jax.Array      # [B] int32 tokens seen (the next token's position)
    n_hh: int = dataclasses.field(default=0, metadata=dict(static=True))
    n_recent: int = dataclasses.field(default=1, metadata=dict(static=True))

    @property
    def budget(self) -> int:
        return self.k.shape[2]

    @property
    def dtype(self):
        return self.k.dtype

    @classmethod
    def create(cls, batch: int, kv_heads: int, head_dim: int, *, n_hh: int, n_recent: int,
               dtype=jnp.float32) -> "H2OCache":
        """An empty cache (every slot at position -1; ``step`` on it is H2O from the first token).

        Args:
          batch: sequences.
          kv_heads: ``Hkv``.
          head_dim: ``D``.
          n_hh: heavy-hitter slots (>= 0).
          n_recent: recent-token slots (>= 0); ``n_hh + n_recent >= 1``.
          dtype: K/V dtype.

        Returns:
          the ``H2OCache``.

        Raises:
          TypeError, ValueError: a size is wrong (named).
        """
        n_hh, n_recent = _budget_sizes(n_hh, n_recent)
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            checks.check_int(name, value)
        slots = (batch, kv_heads, n_hh + n_recent)
        return cls(jnp.zeros(slots + (head_dim,), dtype), jnp.zeros(slots + (head_dim,), dtype),
                   jnp.full(slots, EMPTY, jnp.int32), jnp.zeros(slots, jnp.float32),
                   jnp.zeros((batch,), jnp.int32), n_hh, n_recent)

    @classmethod
    def prefill(cls, q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"], *,
                n_hh: int, n_recent: int, scale: float | None = None):
        """Full causal attention over a prompt, then H2O's one-shot selection of what the cache keeps.

        Args:
          q: ``[B, T, H, D]`` the prompt's queries.
          k: ``[B, T, Hkv, D]`` its keys (H a multiple of Hkv).
          v: ``[B, T, Hkv, D]`` its values.
          n_hh: heavy-hitter slots (>= 0).
          n_recent: recent-token slots (>= 0); ``n_hh + n_recent >= 1``.
          scale: logit scale (default ``D ** -0.5``).

        Returns:
          ``(out [B, T, H, D], cache)``: the prompt's causal attention and an ``H2OCache`` holding the last
          ``n_recent`` positions and the ``n_hh`` other heaviest ones, in position order (empty slots last).

        Raises:
          TypeError, ValueError: a shape, dtype or size is wrong (named).
        """
        n_hh, n_recent = _budget_sizes(n_hh, n_recent)
        B, T, S, H, Hkv, D = checks.check_qkv(q, k, v)
        if S != T:
            raise ValueError(f"prefill is self-attention: k must have q's length T={T}, got {checks.describe(k)}")
        scale = checks.check_positive_float("scale", scale)
        out, probs = reference_attention(q, k, v, causal=True, scale=scale, return_probs=True)
        budget = n_hh + n_recent
        scores = _group_sum(probs, Hkv)                                          # [B, Hkv, T]
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, Hkv, T))
        kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)                  # head-major
        if T < budget:                                                          # pad with empty entries
            pad = budget - T
            scores = jnp.pad(scores, ((0, 0), (0, 0), (0, pad)))
            positions = jnp.pad(positions, ((0, 0), (0, 0), (0, pad)), constant_values=EMPTY)
            kh, vh = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (kh, vh))
        keep = h2o_keep_mask(scores, positions, n_hh=n_hh, n_recent=n_recent)
        big = jnp.iinfo(jnp.int32).max
        slots = jnp.argsort(jnp.where(keep, positions, big), axis=-1)[..., :budget]   # kept, in position order
        held = jnp.take_along_axis(keep, slots, axis=-1)

        def gather(x):
            return jnp.take_along_axis(x, slots[..., None], axis=2) * held[..., None].astype(x.dtype)

        cache = cls(gather(kh), gather(vh),
                    jnp.where(held, jnp.take_along_axis(positions, slots, axis=-1), EMPTY).astype(jnp.int32),
                    jnp.where(held, jnp.take_along_axis(scores, slots, axis=-1), 0.0).astype(jnp.float32),
                    jnp.full((B,), T, jnp.int32), n_hh, n_recent)
        return out, cache

    def step(self, q: Float[Array, "B H D"], k_new: Float[Array, "B Hkv D"], v_new: Float[Array, "B Hkv D"], *,
             scale: float | None = None):
        """One decoding step: attend over the kept slots plus the new token, accumulate, evict.

        Args:
          q: ``[B, H, D]`` the new token's queries (H a multiple of the cache's Hkv).
          k_new: ``[B, Hkv, D]`` its key (the cache's dtype).
          v_new: ``[B, Hkv, D]`` its value.
          scale: logit scale (default ``D ** -0.5``).

        Returns:
          ``(out [B, H, D] in q's dtype, cache)``: the new cache holds at most ``budget`` tokens, the
          ``n_recent`` newest always among them.

        Raises:
          TypeError, ValueError: a shape or dtype is wrong (named).
        """
        B, Hkv, budget, _ = self.k.shape
        check_step_tokens(q, k_new, v_new, self.k, self.v)
        scale = checks.check_positive_float("scale", scale)
        H = q.shape[1]
        new_position = jnp.broadcast_to(self.lengths[:, None, None], (B, Hkv, 1)).astype(jnp.int32)
        keys = jnp.concatenate([self.k, k_new[:, :, None]], axis=2)           # [B, Hkv, budget + 1, D]
        values = jnp.concatenate([self.v, v_new[:, :, None]], axis=2)
        positions = jnp.concatenate([self.positions, new_position], axis=2)
        visible = jnp.repeat(positions >= 0, H // Hkv, axis=1)[:, :, None, :]    # [B, H, 1, budget + 1]
        out, probs = reference_attention(q[:, None], jnp.swapaxes(keys, 1, 2), jnp.swapaxes(values, 1, 2),
                                         mask=visible, scale=scale, return_probs=True)
        scores = jnp.pad(self.scores, ((0, 0), (0, 0), (0, 1))) + _group_sum(probs, Hkv)
        keep = h2o_keep_mask(scores, positions, n_hh=self.n_hh, n_recent=self.n_recent)
        # The new token takes the first slot not kept (an empty one, or the evicted one); with n_recent = 0 it
        # may itself be the one evicted, and then nothing is written.
        slot = jnp.argmax(~keep[..., :budget], axis=-1)
        write = (jnp.arange(budget) == slot[..., None]) & keep[..., budget:]
        new_positions = jnp.where(write, new_position, self.positions)
        cache = dataclasses.replace(
            self, k=jnp.where(write[..., None], k_new[:, :, None], self.k),
            v=jnp.where(write[..., None], v_new[:, :, None], self.v), positions=new_positions,
            scores=jnp.where(new_positions >= 0, jnp.where(write, scores[..., budget:], scores[..., :budget]), 0.0),
            lengths=self.lengths + 1)
        return out[:, 0], cache
