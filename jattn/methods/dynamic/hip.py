"""P09 — HiP: Hierarchically Pruned Attention.

Training-free sub-quadratic attention by a hierarchical top-k search over key blocks.

A dynamic selector for causal self-attention (``T == S``). Queries are cut into blocks of ``block_q``,
keys into blocks of ``block_k``; ``K = k_budget / block_k`` key blocks are chosen per (batch, query head,
query block ``i``) by a coarse-to-fine search, then attention runs over them plus a sliding window:

1. Query block ``i`` holds queries ``[i b_q, e_i)`` (``e_i = min((i + 1) b_q, T)``). The *window* is keys
   ``[w_i, e_i)`` with ``w_i = max(0, i b_q - window)``; the *searched* range is keys ``[0, w_i)``, i.e.
   key blocks ``[0, m_i)`` with ``m_i = ceil(w_i / b_k)`` (keys ``>= w_i`` of the last one are masked).
2. If ``m_i <= K`` every searched block is kept. Otherwise ``K`` groups (branches) split the blocks into
   equal-width runs ``[floor(g m_i / K), floor((g + 1) m_i / K))``.
3. Repeat (a static ``ceil(log2(ceil(nK / K)))`` times, enough to reach single blocks): split each group
   ``[a, e)`` into ``[a, mid)`` and ``[mid, e)`` with ``mid = (a + e + 1) // 2`` (a one-block group splits
   into itself and an empty child). A child's score is the largest logit ``q_t . k_s`` between the block's
   queries ``t`` and the keys ``s < w_i`` of the child's *representative*, its first key block; an empty
   child scores ``-inf``. The ``K`` best children (ties to the lower child index ``2 g + side``) become
   the groups, kept in child-index order.
4. The kept tiles are the groups' first blocks plus the window tiles ``[w_i // b_k, (e_i - 1) // b_k]``
   (which hold the diagonal, so no row is empty); attention is ``jattn.block_sparse_attention(...,
   causal=True)`` over them (kept tiles entirely visible up to the causal mask).

Cost: the search reads ``2 K`` representative blocks per query block per iteration, ``O(T K log(T / K))``
logits, and never the full ``T x T`` score matrix; attention costs ``O(T (k_budget + window))``.

Follows the official ``DeepAuto-AI/hip-attention`` v1.1 draft (``attention2_draft_causal_batch.py``): branches
initialised as equal-width groups over the causal range excluding the sliding window, halving every
iteration, children scored by their first block, top-``K`` across all children. Deviations, deliberate:

* Child score: the max over *all* queries of the block (the official reads every other query,
  ``q[1::2]``, which is empty for one-query blocks) and all keys of the representative block (the
  official v1.1 default first pools keys in groups of 8 into elementwise min/max vectors, an estimate of
  the same maximum; not done here).
* Heads are searched independently (the official option to search a group of heads jointly is not built).
* The window is a tile cover of ``[w_i, e_i)`` (each query sees at least its ``window`` previous keys,
  sometimes up to one tile more), not an element-exact sliding window.
* The official ``-32000`` for empty children is ``-inf`` here; key blocks are tiles of the block-sparse
  kernel, so ``block_k`` is a kernel tile size (the paper's ``b_k = 2`` would make tiny tiles).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.ops.block_sparse import block_sparse_attention

HIGHEST = jax.lax.Precision.HIGHEST

__all__ = ["hip_attention", "hip_block_mask", "hip_select", "hip_iterations"]


def _check_args(q, k, k_budget, block_q, block_k, window):
    B, T, H, Hkv, D = checks.check_self_attention_qk(q, k, "HiP (causal)")
    block_q = checks.check_int("block_q", block_q, 1)
    block_k = checks.check_int("block_k", block_k, 1)
    k_budget = checks.check_int("k_budget", k_budget, 1)
    checks.check_int("window", window, 0)
    if k_budget % block_k:
        raise ValueError(f"k_budget={k_budget} must be a multiple of block_k={block_k} (it is a number of key "
                         f"blocks times block_k)")
    return B, T, H, Hkv, D


def hip_iterations(num_key_blocks: int, blocks_kept: int) -> int:
    """Halvings needed to bring groups of ``ceil(num_key_blocks / blocks_kept)`` blocks down to one block.

    Args:
      num_key_blocks: key blocks in the longest searched range.
      blocks_kept: ``K``, the number of groups.

    Returns:
      ``ceil(log2(ceil(num_key_blocks / blocks_kept)))`` (0 when every block fits).
    """
    widest = -(-num_key_blocks // blocks_kept)
    return max(0, math.ceil(math.log2(widest))) if widest > 1 else 0


def _initial_groups(m, K: int):
    """``m [...]`` searched blocks -> ``(start, end) [..., K]`` equal-width runs (or ``[g, g+1)`` if m <= K)."""
    g = jnp.arange(K)
    wide = m[..., None] > K
    start = jnp.where(wide, (g * m[..., None]) // K, g)
    end = jnp.where(wide, ((g + 1) * m[..., None]) // K, g + 1)
    return start, jnp.minimum(end, jnp.maximum(m[..., None], 0))


def _representative_scores(q_blocks, q_valid, k_blocks, reps, limit, *, block_k: int, group: int):
    """Max logit between each q block's real queries and each representative key block's keys ``< limit``.

    q_blocks ``[B, nQ, bq, H, D]``, q_valid ``[nQ, bq]``, k_blocks ``[B, nK, bk, Hkv, D]``, reps ``[B, H, nQ,
    C]``, limit ``[nQ]`` -> ``[B, H, nQ, C]``.
    """
    B, nQ, bq, H, D = q_blocks.shape
    nK = k_blocks.shape[1]
    kv_head = jnp.arange(H) // group
    keys = jnp.moveaxis(k_blocks, 3, 1)[:, kv_head]                            # [B, H, nK, bk, D]
    C = reps.shape[-1]
    flat = jnp.clip(reps, 0, nK - 1).reshape(B, H, nQ * C)
    gathered = jnp.take_along_axis(keys, flat[..., None, None], axis=2).reshape(B, H, nQ, C, block_k, D)
    logits = jnp.einsum("biqhd,bhickd->bhicqk", q_blocks, gathered, precision=HIGHEST)
    key_pos = reps[..., None] * block_k + jnp.arange(block_k)                  # [B, H, nQ, C, bk]
    valid = (key_pos < limit[None, None, :, None, None])[..., None, :] & q_valid[None, None, :, None, :, None]
    logits = jnp.where(valid, logits, -jnp.inf)
    return jnp.max(logits, axis=(-2, -1))


def hip_select(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], *, k_budget: int = 512, block_q: int = 32,
               block_k: int = 16, window: int = 128) -> Bool[Array, "B H nQ nK"]:
    """HiP's tile choice: hierarchically searched key blocks plus the sliding-window tiles.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]`` (GQA: H a multiple of Hkv).
      k_budget: keys kept per query block by the search (a multiple of ``block_k``).
      block_q: queries per block.
      block_k: keys per block.
      window: recent keys always attended (excluded from the search).

    Returns:
      ``[B, H, nQ, nK]`` bool tile map (causal tiles only).

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: an argument is out of range or the shapes disagree (the message names it).
    """
    B, T, H, Hkv, D = _check_args(q, k, k_budget, block_q, block_k, window)
    K = k_budget // block_k
    nQ, nK = -(-T // block_q), -(-T // block_k)
    q_start = jnp.arange(nQ) * block_q
    q_end = jnp.minimum(q_start + block_q, T)
    limit = jnp.maximum(q_start - window, 0)                                   # searched keys [0, limit)
    m = -(-limit // block_k)                                                   # searched key blocks
    qp = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, nQ * block_q - T), (0, 0), (0, 0)))
    kp = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, nK * block_k - T), (0, 0), (0, 0)))
    q_blocks = qp.reshape(B, nQ, block_q, H, D)
    k_blocks = kp.reshape(B, nK, block_k, Hkv, D)
    q_valid = (q_start[:, None] + jnp.arange(block_q)) < T                    # [nQ, bq]
    start, end = _initial_groups(jnp.broadcast_to(m, (B, H, nQ)), K)
    for _ in range(hip_iterations(int(math.ceil(max(0, (nQ - 1) * block_q - window) / block_k)), K)):
        mid = (start + end + 1) // 2
        child_start = jnp.stack([start, mid], axis=-1).reshape(B, H, nQ, 2 * K)
        child_end = jnp.stack([mid, end], axis=-1).reshape(B, H, nQ, 2 * K)
        scores = _representative_scores(q_blocks, q_valid, k_blocks, child_start, limit, block_k=block_k,
                                        group=H // Hkv)
        scores = jnp.where(child_end > child_start, scores, -jnp.inf)
        order = jnp.argsort(-scores, axis=-1, stable=True)[..., :K]
        keep = jnp.sort(order, axis=-1)
        start = jnp.take_along_axis(child_start, keep, axis=-1)
        end = jnp.take_along_axis(child_end, keep, axis=-1)
    chosen = jnp.where(end > start, start, nK)                                 # nK: dropped below
    b_ids = jnp.arange(B)[:, None, None, None]
    h_ids = jnp.arange(H)[None, :, None, None]
    i_ids = jnp.arange(nQ)[None, None, :, None]
    searched = jnp.zeros((B, H, nQ, nK), bool).at[b_ids, h_ids, i_ids, chosen].set(True, mode="drop")
    c = jnp.arange(nK)
    in_window = (c[None, :] >= (limit // block_k)[:, None]) & (c[None, :] <= ((q_end - 1) // block_k)[:, None])
    return searched | in_window


def hip_block_mask(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], *, k_budget: int = 512,
                   block_q: int = 32, block_k: int = 16, window: int = 128) -> BlockMask:
    """HiP's ``BlockMask`` ``[B, H, nQ, nK]`` (tiles fully visible; run it with ``causal=True``).

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      k_budget: keys kept per query block by the search (a multiple of ``block_k``).
      block_q: queries per block.
      block_k: keys per block.
      window: recent keys always attended.

    Returns:
      A ``BlockMask``.

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: an argument is out of range or the shapes disagree (the message names it).
    """
    tiles = hip_select(q, k, k_budget=k_budget, block_q=block_q, block_k=block_k, window=window)
    T = q.shape[1]
    return BlockMask.from_dense_block_map(tiles, block_q=block_q, block_k=block_k, seq_q=T, seq_k=T)


def hip_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"], *,
                  k_budget: int = 512, block_q: int = 32, block_k: int = 16, window: int = 128,
                  scale: float | None = None, impl: str = "auto") -> Float[Array, "B T H D"]:
    """HiP causal attention: ``hip_block_mask`` then ``jattn.block_sparse_attention(..., causal=True)``.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      v: ``[B, T, Hkv, D]``.
      k_budget: keys kept per query block by the search (a multiple of ``block_k``).
      block_q: queries per block.
      block_k: keys per block.
      window: recent keys always attended.
      scale: logit scale (default ``D ** -0.5``; the search ranks raw dot products, scale-free).
      impl: ``"auto" | "xla" | "pallas" | "reference"``.

    Returns:
      ``[B, T, H, D]`` in q's dtype.

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: an argument is out of range or the shapes disagree (the message names it).
    """
    checks.check_qkv(q, k, v)
    bm = hip_block_mask(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), k_budget=k_budget, block_q=block_q,
                        block_k=block_k, window=window)
    return block_sparse_attention(q, k, v, bm, causal=True, scale=scale, impl=impl)
