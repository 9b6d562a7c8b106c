"""P38 — FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence Inference.

A dynamic selector for causal prefill (``T == S``). Per (batch, query head), with blocks of ``b =
block_size`` tokens, ``nb = ceil(T / b)`` blocks, ``d`` the head dim and GQA query head ``h`` reading kv
head ``h // (H // Hkv)``:

1. ``A = softmax(q_last K^T / sqrt(d))`` for the last ``b' = min(b, T)`` queries (causal: query ``t`` of
   them, at position ``T - b' + t``, sees keys ``<= T - b' + t``).
2. Token scores: vertical ``v_j = mean_t A[t, j]``; slash ``s_o = (1 / b') sum_t A[t, pos_t - o]`` (the
   mass on the diagonal at offset ``o = query - key``).
3. Token budgets: ``cover(x, gamma) = #{sorted-descending prefix sums <= gamma} + 1`` entries; in blocks
   ``cover // b + 1``, clamped to ``[min_blocks, max_blocks]`` with ``min_blocks = ceil(min_budget / b)``
   and ``max_blocks = min(ceil(max_budget / b), nb)`` (``nb`` when ``max_budget`` is None).
4. Block scores: ``V_c = sum_{j in kv block c} v_j``; ``S_c = sum_{o in [c b, (c+1) b)} s_o``.
   Pattern test: ``a = softmax(mean_t(q_last / sqrt(d)) . Kbar^T)`` with ``Kbar`` the per-block mean key;
   ``dist = sqrt(JSD(a, V))``. If ``dist < tau`` the head is *query-aware*: ``Qbar`` (per q-block mean
   query) times ``Kbar^T / sqrt(d)``, block-causal, row softmax, flattened to ``nb * nb`` values; the tiles
   whose descending prefix sums are ``<= gamma * nb`` are kept, and the vertical/slash budgets drop to
   ``min_blocks``. Otherwise (*vertical-slash* head) the budgets of step 3 apply.
5. Vertical: the top ``k_v`` kv blocks by ``V`` (block 0 always, its score is set to +inf), each active
   for every q block ``i >= c``. Slash: the top ``k_s`` block offsets by ``S`` (offset 0, the diagonal,
   always), offset ``c`` active at tiles ``(i, i - c)``. The union (plus the query-aware tiles) is the
   head's tile set; attention is ``jattn.block_sparse_attention(..., causal=True)`` on it.
6. Dense fallback: when ``T <= max(2 b, ceil(min_budget / b) * b)`` every causal tile is kept.

Defaults (paper README): ``gamma=0.9, tau=0.1, min_budget=512`` tokens, ``max_budget=None``,
``block_size=128`` (the benchmark scripts use ``gamma=0.95, min_budget=1024``).

Follows the official ``bytedance/FlexPrefill`` (``flex_prefill/ops/flex_prefill_attention.py``:
``get_active_blocks``, ``score_cover_topk``, ``score_cover_idx``, ``sum_all_diagonal_matrix``,
``transform_veritcal_slash_idx``) where the paper is ambiguous: the ``+1`` of the cover count; the
query-aware cover without the ``+1`` (``score_cover_idx`` keeps prefix sums ``<= gamma * nb``); query-aware
heads still keep ``min_blocks`` vertical and slash blocks; ties go to the lower index (``topk``).

Quirks and deviations, all deliberate:

* The official code converts token budgets to blocks with a hard-coded ``// 128 + 1``, whatever the
  block size; that is a bug for ``b != 128``. jattn uses ``// block_size + 1`` (identical at ``b = 128``).
* The official slash pooling groups token offsets by ``floor((T - 1 - o) / b)`` counted from the end of a
  reversed, end-padded array, so when ``b`` does not divide ``T`` the groups shift by the padding. jattn
  groups offsets ``[c b, (c+1) b)`` into block offset ``c`` (identical when ``b`` divides ``T``).
* A block offset ``c`` marks only the tiles ``(i, i - c)``, as the official code does, although a token
  diagonal with offset in ``(c b, (c+1) b)`` also crosses the tiles ``(i, i - c - 1)``: the official block
  approximation is kept.
* The official ``sqrt(JSD)`` computes ``p log(p / m)`` literally (NaN on a zero probability); jattn
  uses ``0 log 0 = 0``.
* At ``gamma = 1`` the official query-aware cover may also keep zero-probability (non-causal) tiles; jattn
  intersects every head's tiles with the block-causal ones (the kernel masks them anyway).
* The official code supports batch 1 only and drops to Python per query-aware head; jattn computes both
  patterns for every head with static shapes and selects per head, so the selector is one jit-able
  program (its cost is ``O(b T)`` for the scores plus ``O(nb^2 log nb)`` per head for the query-aware cover).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.ops.block_sparse import block_sparse_attention

HIGHEST = jax.lax.Precision.HIGHEST

__all__ = ["flexprefill_attention", "flexprefill_block_mask", "flexprefill_select", "jsd", "cover_count",
           "block_budget", "last_block_scores", "pattern_distance", "query_aware_block_map",
           "vertical_slash_block_map", "dense_fallback"]


# ---------------------------------------------------------------------------------------- validation

def _check_selector_args(q, k, gamma, tau, min_budget, max_budget, block_size) -> tuple[int, int, int, int, int]:
    """Validates the selector's inputs; returns ``(B, T, H, Hkv, D)``."""
    B, T, H, Hkv, D = checks.check_self_attention_qk(q, k, "FlexPrefill (causal prefill)")
    checks.check_float_in("gamma", gamma, 0.0, 1.0, low_open=True)
    checks.check_float_in("tau", tau, 0.0, 1.0)
    checks.check_int("min_budget", min_budget, 1)
    if max_budget is not None:
        checks.check_int("max_budget", max_budget, 1)
    checks.check_block_size("block_size", block_size, minimum=16)
    if block_size is None:
        raise TypeError("block_size must be an int (a power of two >= 16), got None")
    return B, T, H, Hkv, D


# ---------------------------------------------------------------------------------------- pure pieces

def jsd(p: Float[Array, "... n"], q: Float[Array, "... n"]) -> Float[Array, "..."]:
    """Jensen-Shannon divergence (natural log) of two distributions along the last axis.

    Args:
      p: probabilities (non-negative, summing to 1 along the last axis).
      q: probabilities of the same shape.

    Returns:
      ``0.5 KL(p || m) + 0.5 KL(q || m)`` with ``m = (p + q) / 2`` and ``0 log 0 = 0``; in ``[0, log 2]``.
    """
    m = (p + q) / 2
    safe_m = jnp.where(m > 0, m, 1.0)
    kl = lambda x: jnp.sum(jnp.where(x > 0, x * jnp.log(jnp.where(x > 0, x, 1.0) / safe_m), 0.0), axis=-1)
    return 0.5 * kl(p) + 0.5 * kl(q)


def cover_count(scores: Float[Array, "... n"], gamma: float) -> Int[Array, "..."]:
    """Official ``score_cover_topk``: how many of the largest ``scores`` reach a total of ``gamma``.

    Args:
      scores: non-negative scores along the last axis.
      gamma: the target total.

    Returns:
      int32 ``#{prefix sums of the descending scores <= gamma} + 1``.
    """
    prefix = jnp.cumsum(-jnp.sort(-scores, axis=-1), axis=-1)
    return jnp.sum(prefix <= gamma, axis=-1, dtype=jnp.int32) + 1


def block_budget(token_count: Int[Array, "..."], *, block_size: int, min_blocks: int,
                 max_blocks: int) -> Int[Array, "..."]:
    """Token count -> number of blocks, ``count // block_size + 1`` clamped to ``[min_blocks, max_blocks]``.

    The official code divides by a hard-coded 128; this uses ``block_size`` (the same at 128). As in the
    official code the lower clamp is applied first, so ``max_blocks`` wins when they conflict.

    Args:
      token_count: int token counts.
      block_size: tokens per block.
      min_blocks: lower clamp.
      max_blocks: upper clamp.

    Returns:
      int32 block counts.
    """
    blocks = token_count // block_size + 1
    return jnp.minimum(jnp.maximum(blocks, min_blocks), max_blocks).astype(jnp.int32)


def _grouped(q, Hkv):
    B, T, H, D = q.shape
    return q.reshape(B, T, Hkv, H // Hkv, D)


def _to_heads(x):
    """``[B, Hkv, G, ...]`` -> ``[B, H, ...]`` with ``h = kv * G + g``."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def last_block_scores(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], *,
                      block_size: int) -> tuple[Float[Array, "B H T"], Float[Array, "B H T"]]:
    """Vertical and slash token scores from the causal attention of the last ``block_size`` queries.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      block_size: how many of the last queries are read (``min(block_size, T)``).

    Returns:
      ``(vertical [B, H, T], slash [B, H, T])`` float32: ``vertical[j]`` the mean attention to key ``j``,
      ``slash[o]`` the mean over the last queries of the attention at offset ``o = query - key``.
    """
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    n_last = min(block_size, T)
    q_last = _grouped(q[:, T - n_last:].astype(jnp.float32), Hkv) / math.sqrt(D)
    logits = jnp.einsum("btkgd,bskd->bkgts", q_last, k.astype(jnp.float32), precision=HIGHEST)
    positions = T - n_last + jnp.arange(n_last)                                  # [n_last]
    keys = jnp.arange(T)
    logits = jnp.where(keys[None, :] <= positions[:, None], logits, -jnp.inf)
    probs = _to_heads(jax.nn.softmax(logits, axis=-1))                           # [B, H, n_last, T]
    vertical = jnp.mean(probs, axis=2)
    key_at_offset = positions[:, None] - jnp.arange(T)[None, :]                  # [n_last, T (offset)]
    on_diagonal = jnp.take_along_axis(probs, jnp.broadcast_to(jnp.maximum(key_at_offset, 0), probs.shape),
                                      axis=-1)
    slash = jnp.sum(jnp.where(key_at_offset >= 0, on_diagonal, 0.0), axis=2) / n_last
    return vertical, slash


def _block_sum(x, block_size: int):
    """Sums the last axis over consecutive groups of ``block_size`` (the last group may be short)."""
    n = x.shape[-1]
    nb = -(-n // block_size)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * block_size - n)])
    return x.reshape(*x.shape[:-1], nb, block_size).sum(-1)


def _block_mean_tokens(x, block_size: int):
    """``[B, T, h, D]`` -> ``[B, nb, h, D]``: the mean of each block's actual tokens."""
    B, T = x.shape[:2]
    nb = -(-T // block_size)
    padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * block_size - T), (0, 0), (0, 0)))
    sizes = jnp.minimum(block_size, T - jnp.arange(nb) * block_size).astype(jnp.float32)
    return padded.reshape(B, nb, block_size, *x.shape[2:]).sum(2) / sizes[None, :, None, None]


def pattern_distance(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], vertical_blocks: Float[Array, "B H nb"],
                     *, block_size: int) -> Float[Array, "B H"]:
    """``sqrt(JSD(softmax(mean(q_last) . Kbar^T / sqrt(d)), V))``: small = the head is query-aware.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      vertical_blocks: ``[B, H, nb]`` block-summed vertical scores ``V``.
      block_size: block size ``b`` (the last ``min(b, T)`` queries are averaged).

    Returns:
      ``[B, H]`` float32 distances in ``[0, sqrt(log 2)]``.
    """
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    n_last = min(block_size, T)
    mean_q = _grouped(jnp.mean(q[:, T - n_last:].astype(jnp.float32), axis=1, keepdims=True), Hkv)[:, 0]
    mean_k = _block_mean_tokens(k, block_size)                                 # [B, nb, Hkv, D]
    logits = jnp.einsum("bkgd,bckd->bkgc", mean_q / math.sqrt(D), mean_k, precision=HIGHEST)
    estimate = _to_heads(jax.nn.softmax(logits, axis=-1))
    return jnp.sqrt(jnp.maximum(jsd(estimate, vertical_blocks), 0.0))


def _block_causal(nb: int):
    return jnp.arange(nb)[:, None] >= jnp.arange(nb)[None, :]


def query_aware_block_map(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], *, gamma: float,
                          block_size: int) -> Bool[Array, "B H nb nb"]:
    """The query-aware tiles: the block-causal pooled attention's largest entries up to ``gamma * nb``.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      gamma: coverage; the kept entries' descending prefix sums stay ``<= gamma * nb``.
      block_size: block size ``b``.

    Returns:
      ``[B, H, nb, nb]`` bool (block-causal).
    """
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    nb = -(-T // block_size)
    mean_q = _grouped(_block_mean_tokens(q, block_size), Hkv)                 # [B, nb, Hkv, G, D]
    mean_k = _block_mean_tokens(k, block_size)
    logits = jnp.einsum("bikgd,bjkd->bkgij", mean_q / math.sqrt(D), mean_k, precision=HIGHEST)
    causal = _block_causal(nb)
    probs = _to_heads(jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)).reshape(B, H, nb * nb)
    order = jnp.argsort(-probs, axis=-1, stable=True)
    prefix = jnp.cumsum(jnp.take_along_axis(probs, order, axis=-1), axis=-1)
    kept_sorted = prefix <= gamma * nb
    kept = jnp.zeros_like(kept_sorted).at[jnp.arange(B)[:, None, None], jnp.arange(H)[None, :, None], order].set(
        kept_sorted)
    return kept.reshape(B, H, nb, nb) & causal


def _top_counts(scores, counts):
    """``[..., n]`` bool: the ``counts[...]`` largest scores (ties to the lower index)."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    return rank < counts[..., None]


def vertical_slash_block_map(vertical_selected: Bool[Array, "B H nb"],
                             slash_selected: Bool[Array, "B H nb"]) -> Bool[Array, "B H nb nb"]:
    """Tiles of selected kv blocks ``c`` (q blocks ``i >= c``) and block offsets ``c`` (tiles ``(i, i - c)``).

    Args:
      vertical_selected: ``[B, H, nb]`` selected kv blocks.
      slash_selected: ``[B, H, nb]`` selected block offsets.

    Returns:
      ``[B, H, nb, nb]`` bool (block-causal).
    """
    nb = vertical_selected.shape[-1]
    causal = _block_causal(nb)
    offset = jnp.maximum(jnp.arange(nb)[:, None] - jnp.arange(nb)[None, :], 0)     # [nb, nb]
    slash_map = jnp.take(slash_selected, offset.reshape(-1), axis=-1).reshape(*slash_selected.shape[:-1], nb, nb)
    return (vertical_selected[..., None, :] | slash_map) & causal


def dense_fallback(T: int, *, block_size: int, min_budget: int) -> bool:
    """Whether FlexPrefill runs dense causal attention: ``T <= max(2 b, ceil(min_budget / b) * b)``.

    Args:
      T: sequence length.
      block_size: block size ``b``.
      min_budget: minimum budget in tokens.

    Returns:
      A Python bool (static).
    """
    return T <= max(2 * block_size, math.ceil(min_budget / block_size) * block_size)


# ---------------------------------------------------------------------------------------- selector

def flexprefill_select(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], *, gamma: float = 0.9,
                       tau: float = 0.1, min_budget: int = 512, max_budget: int | None = None,
                       block_size: int = 128) -> tuple[Bool[Array, "B H nb nb"], Bool[Array, "B H"]]:
    """FlexPrefill's tile choice (steps 1-5 of the module docstring), without the dense fallback.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]`` (GQA: H a multiple of Hkv).
      gamma: attention coverage in ``(0, 1]``.
      tau: query-aware threshold on ``sqrt(JSD)`` in ``[0, 1]``.
      min_budget: minimum vertical/slash budget in tokens (>= 1).
      max_budget: maximum vertical/slash budget in tokens, or None.
      block_size: block size (power of two >= 16).

    Returns:
      ``(block_map [B, H, nb, nb] bool, query_aware [B, H] bool)``.

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: an argument is out of range or the shapes disagree (the message names it).
    """
    _, T, _, _, _ = _check_selector_args(q, k, gamma, tau, min_budget, max_budget, block_size)
    nb = -(-T // block_size)
    min_blocks = math.ceil(min_budget / block_size)
    max_blocks = nb if max_budget is None else min(math.ceil(max_budget / block_size), nb)
    vertical, slash = last_block_scores(q, k, block_size=block_size)
    budget = dict(block_size=block_size, min_blocks=min_blocks, max_blocks=max_blocks)
    n_vertical = block_budget(cover_count(vertical, gamma), **budget)
    n_slash = block_budget(cover_count(slash, gamma), **budget)
    vertical_blocks = _block_sum(vertical, block_size)
    slash_blocks = _block_sum(slash, block_size)
    query_aware = pattern_distance(q, k, vertical_blocks, block_size=block_size) < tau
    n_vertical = jnp.where(query_aware, min_blocks, n_vertical)
    n_slash = jnp.where(query_aware, min_blocks, n_slash)
    vertical_blocks = vertical_blocks.at[..., 0].set(jnp.inf)        # the first kv block: attention sinks
    slash_blocks = slash_blocks.at[..., 0].set(jnp.inf)              # offset 0: the diagonal
    block_map = vertical_slash_block_map(_top_counts(vertical_blocks, n_vertical),
                                         _top_counts(slash_blocks, n_slash))
    block_map = block_map | (query_aware[..., None, None]
                             & query_aware_block_map(q, k, gamma=gamma, block_size=block_size))
    return block_map, query_aware


def flexprefill_block_mask(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], *, gamma: float = 0.9,
                           tau: float = 0.1, min_budget: int = 512, max_budget: int | None = None,
                           block_size: int = 128, return_pattern: bool = False):
    """FlexPrefill's ``BlockMask`` (per batch and query head), with the official dense fallback.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]`` (GQA: H a multiple of Hkv).
      gamma: attention coverage in ``(0, 1]``.
      tau: query-aware threshold on ``sqrt(JSD)`` in ``[0, 1]``.
      min_budget: minimum vertical/slash budget in tokens (>= 1).
      max_budget: maximum vertical/slash budget in tokens, or None.
      block_size: block size ``block_q = block_k`` (power of two >= 16).
      return_pattern: also return the per-head pattern type.

    Returns:
      A ``BlockMask`` of shape ``[B, H, nb, nb]`` (tiles fully visible; run it with ``causal=True``), and
      with ``return_pattern`` also ``query_aware [B, H]`` bool (False = vertical-slash head; all False on
      the dense fallback).

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: an argument is out of range or the shapes disagree (the message names it).
    """
    B, T, H, _, _ = _check_selector_args(q, k, gamma, tau, min_budget, max_budget, block_size)
    checks.check_bool("return_pattern", return_pattern)
    if dense_fallback(T, block_size=block_size, min_budget=min_budget):
        nb = -(-T // block_size)
        block_map = jnp.broadcast_to(_block_causal(nb), (B, H, nb, nb))
        query_aware = jnp.zeros((B, H), bool)
    else:
        block_map, query_aware = flexprefill_select(q, k, gamma=gamma, tau=tau, min_budget=min_budget,
                                                    max_budget=max_budget, block_size=block_size)
    bm = BlockMask.from_dense_block_map(block_map, block_q=block_size, block_k=block_size, seq_q=T, seq_k=T)
    return (bm, query_aware) if return_pattern else bm


def flexprefill_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"], *,
                          gamma: float = 0.9, tau: float = 0.1, min_budget: int = 512, max_budget: int | None = None,
                          block_size: int = 128, scale: float | None = None,
                          impl: str = "auto") -> Float[Array, "B T H D"]:
    """FlexPrefill causal prefill: ``flexprefill_block_mask`` then ``jattn.block_sparse_attention``.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      v: ``[B, T, Hkv, D]``.
      gamma: attention coverage in ``(0, 1]``.
      tau: query-aware threshold on ``sqrt(JSD)`` in ``[0, 1]``.
      min_budget: minimum vertical/slash budget in tokens.
      max_budget: maximum vertical/slash budget in tokens, or None.
      block_size: block size (power of two >= 16).
      scale: attention logit scale (default ``D ** -0.5``); the selection always uses ``D ** -0.5``.
      impl: ``"auto" | "xla" | "pallas" | "reference"``.

    Returns:
      ``[B, T, H, D]`` in q's dtype.

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: an argument is out of range or the shapes disagree (the message names it).
    """
    checks.check_qkv(q, k, v)
    # The selection is discrete: no gradient flows through it (only through the attention).
    bm = flexprefill_block_mask(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), gamma=gamma, tau=tau,
                                min_budget=min_budget, max_budget=max_budget, block_size=block_size)
    return block_sparse_attention(q, k, v, bm, causal=True, scale=scale, impl=impl)
