"""P37 — AdaSpa: Training-free and Adaptive Sparse Attention for Efficient Long Video Generation.

A dynamic selector for *non-causal* video DiT full attention over ``L = f h w + n_text`` tokens (``T ==
S``), blocks of ``b = block_size`` tokens, ``nb = ceil(L / b)`` (the last block may be short). Per (batch,
query head ``h``), GQA head ``h`` reading kv head ``h // (H // Hkv)``, ``scale = D ** -0.5``:

1. ``LSE_i`` of every query (``jattn.attention(..., return_lse=True)``: a FlashAttention pass).
2. Block mass (``block_attention_mass``): ``W[p, c] = sum_{i in block p, j in block c} exp(scale q_i . k_j
   - LSE_i)``, one query block at a time (never a ``[L, L]`` matrix). With the exact LSE each row of ``W``
   sums to its block's number of queries and ``sum W = L``. (The paper's pseudocode ``Log(qk - LSE)`` is a
   typo for this.)
3. Blockified "precise" mask (``rowwise_topk_block_mask``): every query block keeps the same number
   ``keep = clip(round((1 - s) nb), 1, nb)`` of kv blocks, those with the largest ``W[p, :]`` (ties to the
   lower index), plus the *text sink*: every tile whose query block or kv block holds a text token (the
   last ``text_len`` tokens: video -> text, text -> video, text -> text) is always kept.
4. Head-adaptive sparsity (``head_adaptive_sparsity``, per layer = one call, per batch element): the
   recall of head ``h`` at sparsity ``s`` is its kept mass ``/ L``; with ``n`` = the number of heads whose
   recall ``> thr``, ``n' = min(n, floor(H / 2))``, the ``n'`` highest-recall heads get sparsity
   ``(1 + s) / 2``, the ``n'`` lowest ``(3 s - 1) / 2``, the rest keep ``s``. The mean sparsity is
   preserved (``n' (1 + s) / 2 + n' (3 s - 1) / 2 = 2 n' s``) whenever ``s >= 1/3`` (below, ``(3 s -
   1) / 2`` is clamped at 0).
5. Attention: ``jattn.block_sparse_attention(..., causal=False)`` over the mask's tiles.
6. Schedule over denoising steps (``AdaSpaSchedule``, ``AdaSpaState``, ``adaspa_attention``): steps before
   the first search step ``t_w = search_steps[0]`` run dense attention (warm-up); at ``t_w`` the *fused
   online search* runs dense attention that also returns the LSE (the step's output is that dense
   output), caches the LSE and builds the mask from ``W``; at each later step of ``search_steps`` the
   *LSE-cached search* computes ``W`` in one pass from the current q, k and the cached LSE, builds a new
   mask and attends sparsely with it; every other step reuses the stored mask.

Defaults (paper): sparsity 0.8, block 64, search steps ``{10, 30}`` of 50 (warm-up 10), recall threshold
0.8, head-adaptive on. No official code was found (the paper names an ``adaspa_attention_handler`` over
Block-Sparse-Attention); the choices below are jattn's reading of the paper text:

* ``keep`` rounds ``(1 - s) nb`` to the nearest int (at least 1); the top-k ranks every kv block, text
  blocks included, and the text sink is OR-ed in afterwards (it does not consume the budget).
* Text tokens are the *last* ``text_len`` tokens (``L = f h w + t`` in the paper; HunyuanVideo's order);
  put text last before calling.
* Heads with ``n > H / 2`` (the overlap case the paper leaves open) are capped at ``floor(H / 2)`` per
  group so the two groups never overlap and the mean stays ``s``.
* The recall used by the head-adaptive rule is measured on ``W`` at the uniform sparsity ``s`` with the
  text sink included; the rule is applied at every search (fused and cached).
* The LSE is cached once, at the fused search, and reused by every later search (as the paper's
  "LSE-cached" name says); ``W`` from a stale LSE no longer has rows summing to the block size, but only
  its row ranking and the per-head recall (relative to ``L``) are used.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.ops.attention import attention
from jattn.ops.block_sparse import block_sparse_attention

HIGHEST = jax.lax.Precision.HIGHEST

__all__ = ["adaspa_attention", "adaspa_block_mask", "adaspa_select", "adaspa_dense_step", "block_attention_mass",
           "rowwise_topk_block_mask", "text_sink_blocks", "keep_count", "head_recall", "head_adaptive_sparsity",
           "AdaSpaSchedule", "AdaSpaState", "adaspa_init_state", "adaspa_phase"]


# ---------------------------------------------------------------------------------------- validation

def _check_sparsity(name: str, sparsity) -> float:
    """Sparsity in ``[0, 1)``: the kept fraction ``1 - s`` (the budget) is in ``(0, 1]``."""
    s = checks.check_float_in(name, sparsity, 0.0, 1.0)
    if s >= 1.0:
        raise ValueError(f"{name} must be in [0, 1) (the kept fraction 1 - {name} must be in (0, 1]), got {sparsity!r}")
    return s


def _check_lse(lse, B, T, H):
    checks.check_float_array("lse", lse, 3)
    if lse.shape != (B, T, H):
        raise ValueError(f"lse must have shape [B={B}, T={T}, H={H}], got {checks.describe(lse)}")


def _check_selector_args(q, k, block_size, sparsity, text_len, recall_threshold, head_adaptive):
    B, T, H, Hkv, D = checks.check_self_attention_qk(q, k, "AdaSpa (video)")
    checks.check_block_size("block_size", block_size, minimum=16)
    if block_size is None:
        raise TypeError("block_size must be an int (a power of two >= 16), got None")
    _check_sparsity("sparsity", sparsity)
    checks.check_int("text_len", text_len, 0)
    if text_len > T:
        raise ValueError(f"text_len={text_len} must be at most the sequence length T={T}")
    checks.check_float_in("recall_threshold", recall_threshold, 0.0, 1.0)
    checks.check_bool("head_adaptive", head_adaptive)
    return B, T, H, Hkv, D


# ---------------------------------------------------------------------------------------- pure pieces

def block_attention_mass(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], lse: Float[Array, "B T H"], *,
                         block_size: int, scale: float | None = None) -> Float[Array, "B H nb nb"]:
    """``W[p, c] = sum_{i in block p, j in block c} exp(scale q_i . k_j - LSE_i)`` (non-causal), float32.

    Computed one query block at a time (``[B, H, block_size, T]`` logits per step).

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]`` (GQA: H a multiple of Hkv).
      lse: ``[B, T, H]`` the rows' log-sum-exp (exact, or a cached one).
      block_size: tokens per block (the last block may be short).
      scale: logit scale (default ``D ** -0.5``).

    Returns:
      ``[B, H, nb, nb]`` float32; with the exact LSE each row sums to its block's number of queries.
    """
    B, T, H, Hkv, D = checks.check_self_attention_qk(q, k, "AdaSpa (video)")
    _check_lse(lse, B, T, H)
    block_size = checks.check_int("block_size", block_size, 1)
    scale = D ** -0.5 if scale is None else checks.check_positive_float("scale", scale)
    nb = -(-T // block_size)
    pad = nb * block_size - T
    qb = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, nb, block_size, Hkv,
                                                                                    H // Hkv, D)
    # Padded query rows get lse = +inf: exp(s - inf) = 0, so they add nothing.
    lb = jnp.pad(lse.astype(jnp.float32), ((0, 0), (0, pad), (0, 0)), constant_values=jnp.inf)
    lb = lb.reshape(B, nb, block_size, Hkv, H // Hkv)
    kp = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    key_valid = jnp.arange(nb * block_size) < T

    def one_block(p):
        s = jnp.einsum("bqkgd,bskd->bkgqs", qb[:, p], kp, precision=HIGHEST) * scale
        probs = jnp.where(key_valid, jnp.exp(s - jnp.moveaxis(lb[:, p], 1, 3)[..., None]), 0.0)
        return jnp.sum(probs, 3).reshape(B, H, nb, block_size).sum(-1)              # [B, H, nb]
    return jnp.moveaxis(jax.lax.map(one_block, jnp.arange(nb)), 0, 2)


def text_sink_blocks(T: int, *, block_size: int, text_len: int) -> Bool[Array, "nb nb"]:
    """``[nb, nb]`` bool: tiles whose query block or kv block holds one of the last ``text_len`` tokens."""
    nb = -(-T // block_size)
    ends = jnp.minimum((jnp.arange(nb) + 1) * block_size, T)
    has_text = ends > T - text_len if text_len else jnp.zeros(nb, bool)
    return has_text[:, None] | has_text[None, :]


def keep_count(sparsity: Float[Array, "..."], nb: int) -> Int[Array, "..."]:
    """Kv blocks kept per query block: ``clip(round((1 - sparsity) nb), 1, nb)`` (int32)."""
    return jnp.clip(jnp.floor((1.0 - sparsity) * nb + 0.5), 1, nb).astype(jnp.int32)


def rowwise_topk_block_mask(wsum: Float[Array, "B H nb nb"], keep: Int[Array, "B H"],
                            forced: Bool[Array, "nb nb"]) -> Bool[Array, "B H nb nb"]:
    """Each row keeps its ``keep[b, h]`` largest ``wsum`` tiles (ties to the lower index), OR ``forced``.

    Args:
      wsum: ``[B, H, nb, nb]`` block mass.
      keep: ``[B, H]`` int tiles per row (the same for every row of a head).
      forced: ``[nb, nb]`` tiles always kept (the text sink).

    Returns:
      ``[B, H, nb, nb]`` bool.
    """
    order = jnp.argsort(-wsum, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    return (rank < keep[..., None, None]) | forced


def head_recall(wsum: Float[Array, "B H nb nb"], block_map: Bool[Array, "B H nb nb"], T: int) -> Float[Array, "B H"]:
    """Kept mass over ``L = T``: ``sum(W where kept) / T``."""
    return jnp.sum(jnp.where(block_map, wsum, 0.0), axis=(-2, -1)) / T


def head_adaptive_sparsity(recall: Float[Array, "... H"], sparsity: float,
                           recall_threshold: float = 0.8) -> Float[Array, "... H"]:
    """The paper's per-layer head-adaptive rule (step 4 of the module docstring).

    Args:
      recall: ``[..., H]`` per-head recall at the uniform ``sparsity``.
      sparsity: the layer's sparsity ``s``.
      recall_threshold: heads with recall ``> recall_threshold`` count toward ``n``.

    Returns:
      ``[..., H]`` float32 per-head sparsities: the ``min(n, H // 2)`` highest-recall heads ``(1 + s) / 2``,
      as many lowest-recall heads ``max((3 s - 1) / 2, 0)``, the others ``s`` (ties by head index).
    """
    H = recall.shape[-1]
    n = jnp.minimum(jnp.sum(recall > recall_threshold, axis=-1), H // 2)[..., None]
    rank = jnp.argsort(jnp.argsort(-recall, axis=-1, stable=True), axis=-1, stable=True)   # 0 = highest
    high, low = (1.0 + sparsity) / 2, max((3.0 * sparsity - 1.0) / 2, 0.0)
    out = jnp.where(rank < n, high, jnp.where(rank >= H - n, low, sparsity))
    return out.astype(jnp.float32)


def _mask_from_mass(wsum, *, T, block_size, sparsity, text_len, recall_threshold, head_adaptive):
    """Steps 3-4: the uniform-sparsity mask, the recall, then (optionally) the head-adaptive mask."""
    B, H, nb, _ = wsum.shape
    forced = text_sink_blocks(T, block_size=block_size, text_len=text_len)
    uniform = rowwise_topk_block_mask(wsum, jnp.broadcast_to(keep_count(jnp.float32(sparsity), nb), (B, H)), forced)
    if not head_adaptive:
        return uniform, jnp.full((B, H), sparsity, jnp.float32)
    per_head = head_adaptive_sparsity(head_recall(wsum, uniform, T), sparsity, recall_threshold)
    return rowwise_topk_block_mask(wsum, keep_count(per_head, nb), forced), per_head


def _lse_of(q, k):
    """Each query's log-sum-exp from one FlashAttention pass (``jattn.attention``; v = k, only lse is used)."""
    return attention(q, k, k, return_lse=True)[1]


# ---------------------------------------------------------------------------------------- selector

def adaspa_select(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], lse: Float[Array, "B T H"] | None = None,
                  *, block_size: int = 64, sparsity: float = 0.8, text_len: int = 0, head_adaptive: bool = True,
                  recall_threshold: float = 0.8) -> tuple[Bool[Array, "B H nb nb"], Float[Array, "B H"]]:
    """AdaSpa's tile choice (steps 1-4): the blockified top-k mask from the exact block mass.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]`` (GQA: H a multiple of Hkv).
      lse: ``[B, T, H]`` cached LSE, or None to compute it (one FlashAttention pass).
      block_size: block size (power of two >= 16).
      sparsity: the layer's sparsity ``s`` in ``[0, 1)`` (kept fraction ``1 - s``).
      text_len: the last ``text_len`` tokens are text (text-sink tiles always kept).
      head_adaptive: apply the head-adaptive rule.
      recall_threshold: the rule's recall threshold in ``[0, 1]``.

    Returns:
      ``(block_map [B, H, nb, nb] bool, per-head sparsity [B, H] float32)``.

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: an argument is out of range or the shapes disagree (the message names it).
    """
    B, T, H, _, _ = _check_selector_args(q, k, block_size, sparsity, text_len, recall_threshold, head_adaptive)
    if lse is None:
        lse = _lse_of(q, k)
    else:
        _check_lse(lse, B, T, H)
    wsum = block_attention_mass(q, k, lse, block_size=block_size)
    return _mask_from_mass(wsum, T=T, block_size=block_size, sparsity=sparsity, text_len=text_len,
                           recall_threshold=recall_threshold, head_adaptive=head_adaptive)


def adaspa_block_mask(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], lse: Float[Array, "B T H"] | None = None,
                      *, block_size: int = 64, sparsity: float = 0.8, text_len: int = 0, head_adaptive: bool = True,
                      recall_threshold: float = 0.8) -> BlockMask:
    """AdaSpa's ``BlockMask`` ``[B, H, nb, nb]`` (tiles fully visible; run it with ``causal=False``).

    Args: as ``adaspa_select``.

    Returns:
      A ``BlockMask``.

    Raises:
      TypeError, ValueError: an argument is malformed (the message names it).
    """
    block_map, _ = adaspa_select(q, k, lse, block_size=block_size, sparsity=sparsity, text_len=text_len,
                                 head_adaptive=head_adaptive, recall_threshold=recall_threshold)
    T = q.shape[1]
    return BlockMask.from_dense_block_map(block_map, block_q=block_size, block_k=block_size, seq_q=T, seq_k=T)


# ---------------------------------------------------------------------------------------- schedule

class AdaSpaSchedule(NamedTuple):
    """Static (hashable) configuration of the denoising-step schedule and the selector."""
    search_steps: tuple[int, ...] = (10, 30)     # first = t_w (fused search); later = LSE-cached searches
    block_size: int = 64
    sparsity: float = 0.8
    text_len: int = 0
    head_adaptive: bool = True
    recall_threshold: float = 0.8


class AdaSpaState(NamedTuple):
    """Explicit functional state carried across denoising steps (a pytree of arrays).

    ``lse [B, T, H]`` the cached LSE (from the fused search); ``block_map [B, H, nb, nb]`` the current mask;
    ``sparsity [B, H]`` its per-head sparsities; ``searches`` how many searches ran; ``step`` the last step.
    """
    lse: Float[Array, "B T H"]
    block_map: Bool[Array, "B H nb nb"]
    sparsity: Float[Array, "B H"]
    searches: Int[Array, ""]
    step: Int[Array, ""]


def adaspa_init_state(q: Float[Array, "B T H D"], schedule: AdaSpaSchedule = AdaSpaSchedule()) -> AdaSpaState:
    """The state before the first step: LSE 0, every tile kept, no search yet, step -1."""
    checks.check_float_array("q", q, 4)
    _check_schedule(schedule)
    B, T, H, _ = q.shape
    nb = -(-T // schedule.block_size)
    return AdaSpaState(lse=jnp.zeros((B, T, H), jnp.float32), block_map=jnp.ones((B, H, nb, nb), bool),
                       sparsity=jnp.zeros((B, H), jnp.float32), searches=jnp.int32(0), step=jnp.int32(-1))


def _check_schedule(schedule):
    if not isinstance(schedule, AdaSpaSchedule):
        raise TypeError(f"schedule must be an AdaSpaSchedule, got {type(schedule).__name__}")
    steps = schedule.search_steps
    if not isinstance(steps, tuple) or not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                                        for s in steps) or list(steps) != sorted(set(steps)):
        raise ValueError(f"schedule.search_steps must be a non-empty increasing tuple of ints >= 0, got {steps!r}")


WARMUP, FUSED_SEARCH, CACHED_SEARCH, REUSE = 0, 1, 2, 3


def adaspa_phase(step, search_steps: tuple[int, ...]) -> Int[Array, ""]:
    """0 warm-up (``step < t_w``), 1 fused search (``step == t_w``), 2 LSE-cached search (a later search
    step), 3 reuse the mask (every other step). ``step`` may be traced."""
    step = jnp.asarray(step, jnp.int32)
    later = jnp.any(step == jnp.asarray(search_steps[1:], jnp.int32)) if len(search_steps) > 1 else False
    return jnp.where(step < search_steps[0], WARMUP,
                     jnp.where(step == search_steps[0], FUSED_SEARCH, jnp.where(later, CACHED_SEARCH, REUSE)))


def adaspa_dense_step(q, k, v, *, scale=None, impl="auto"):
    """Dense non-causal attention and its LSE (the fused search's FlashAttention pass)."""
    return attention(q, k, v, return_lse=True, scale=scale, impl=impl)


def adaspa_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"],
                     state: AdaSpaState, step, schedule: AdaSpaSchedule = AdaSpaSchedule(), *,
                     scale: float | None = None, impl: str = "auto") -> tuple[Float[Array, "B T H D"], AdaSpaState]:
    """One denoising step of AdaSpa attention (step 6 of the module docstring).

    Args:
      q: ``[B, T, H, D]`` (text tokens last).
      k: ``[B, T, Hkv, D]``.
      v: ``[B, T, Hkv, D]``.
      state: the ``AdaSpaState`` from ``adaspa_init_state`` or the previous step.
      step: the denoising step index: a Python int (only that step's branch is traced) or a traced int32
        (``jax.lax.switch`` over the four phases: one compiled program for the whole loop).
      schedule: the static ``AdaSpaSchedule``.
      scale: attention logit scale (default ``D ** -0.5``); the mass always uses ``D ** -0.5``.
      impl: ``"auto" | "xla" | "pallas" | "reference"``.

    Returns:
      ``(out [B, T, H, D], new state)``.

    Raises:
      TypeError, ValueError: an argument is malformed (the message names it).
    """
    checks.check_qkv(q, k, v)
    _check_schedule(schedule)
    B, T, H, _, _ = _check_selector_args(q, k, schedule.block_size, schedule.sparsity, schedule.text_len,
                                         schedule.recall_threshold, schedule.head_adaptive)
    nb = -(-T // schedule.block_size)
    if not isinstance(state, AdaSpaState) or state.block_map.shape != (B, H, nb, nb):
        raise ValueError(f"state must be an AdaSpaState for B={B}, H={H}, nb={nb} (adaspa_init_state(q, "
                         f"schedule)), got {state!r:.200}")
    _check_lse(state.lse, B, T, H)
    select = dict(T=T, block_size=schedule.block_size, sparsity=schedule.sparsity, text_len=schedule.text_len,
                  recall_threshold=schedule.recall_threshold, head_adaptive=schedule.head_adaptive)
    qs, ks = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)

    def sparse(block_map):
        bm = BlockMask.from_dense_block_map(block_map, block_q=schedule.block_size, block_k=schedule.block_size,
                                            seq_q=T, seq_k=T)
        return block_sparse_attention(q, k, v, bm, causal=False, scale=scale, impl=impl)

    def warmup(st):
        return attention(q, k, v, scale=scale, impl=impl).astype(q.dtype), st

    def fused_search(st):
        out, lse = adaspa_dense_step(q, k, v, scale=scale, impl=impl)
        lse_sel = lse if scale is None else _lse_of(qs, ks)       # the mass uses the D ** -0.5 LSE
        wsum = block_attention_mass(qs, ks, jax.lax.stop_gradient(lse_sel), block_size=schedule.block_size)
        block_map, per_head = _mask_from_mass(wsum, **select)
        return out.astype(q.dtype), st._replace(lse=jax.lax.stop_gradient(lse_sel), block_map=block_map,
                                                sparsity=per_head, searches=st.searches + 1)

    def cached_search(st):
        wsum = block_attention_mass(qs, ks, st.lse, block_size=schedule.block_size)
        block_map, per_head = _mask_from_mass(wsum, **select)
        return sparse(block_map), st._replace(block_map=block_map, sparsity=per_head, searches=st.searches + 1)

    def reuse(st):
        return sparse(st.block_map), st

    branches = (warmup, fused_search, cached_search, reuse)
    if isinstance(step, (int, np.integer)) and not isinstance(step, bool):   # static step: trace one branch
        steps = schedule.search_steps
        phase = (WARMUP if step < steps[0] else FUSED_SEARCH if step == steps[0]
                 else CACHED_SEARCH if step in steps[1:] else REUSE)
        out, new_state = branches[phase](state)
    else:
        out, new_state = jax.lax.switch(adaspa_phase(step, schedule.search_steps), branches, state)
    return out, new_state._replace(step=jnp.asarray(step, jnp.int32))
