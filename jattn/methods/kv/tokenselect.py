"""P44 — TokenSelect: Dynamic Token-Level KV Cache Selection.

Keys are cached *without* RoPE. For a chunk of ``Tq`` new query tokens (decode: 1; prefill: chunks), already
appended to a cache of ``n = lengths[b]`` tokens:

1. Fingerprint: ``q_bar = mean_t RoPE(q_t, n_local + t)`` ``[H, D]`` (the chunk's queries rotated at positions
   starting at ``n_local``, then averaged; no rotation when ``rope_theta`` is None).
2. Candidates ``C = [n_init, n - n_local)``. Per query head ``p_h = softmax_{j in C}(q_bar_h . k_{kv(h), j})``
   (no ``1/sqrt(d)``, as the official code), soft vote ``v_j = sum_h p_{h, j}``; ``topk(v, top_k)``
   sorted ascending.
3. Attended set ``[0, n_init) ∪ topk ∪ [n - n_local, n)``, the same for every head; when
   ``n_init + top_k + n_local >= n`` all ``n`` tokens (dense).
4. Attention over the set with RoPE applied on the fly at *contiguous* positions (``positions="contiguous"``:
   the set's ``i``-th token at ``i``, new token ``t`` at ``m - Tq + t`` for a set of ``m``: FlashInfer's
   ``ROPE_LLAMA`` over an index list, which is what the official code calls), or at original positions
   (``positions="original"``); ``jattn.methods.kv.gather.gathered_decode_attention``.

Selection Cache (``SelectionCache``, one per layer, functional): a sequence reuses its previous top-k of this
layer when ``cos(q_bar, q_bar_cached) >= threshold`` (over the whole ``H * D`` fingerprint, default 0.9); the
cache is refreshed only by a fresh sparse selection (a dense step neither reads nor writes it, as in the
code). The released ``patch()`` turns it off (``QUERY_CACHE=False``): ``tokenselect_indices`` is that path.

Follows pzs19/TokenSelect ``patcher/token_retrieval.py`` (``TokenRetriever.retrieval_indices``,
``get_topk_tokens``, ``patch()``: ``QUERY_ROTATE=True``, prefill chunk 512). Quirks and choices:

* KV-head map: the official Triton scorer reads kv head ``h % Hkv`` (interleaved) while its attention
  (FlashInfer) uses ``h // G``. jattn uses ``h // G`` (``head_map="grouped"``, default);
  ``head_map="interleaved"`` reproduces the scorer's quirk. Both only change which query heads vote with
  which kv head's keys.
* Scores are float32 here (bfloat16 in the code); the optional max-pool smoothing (off by default) is not
  implemented; tensor-parallel all-reduce of the votes is the plain sum over all heads.
* Chunk causality is by original position (``gathered_decode_attention``); the chunk must fit in the local
  window (``Tq <= n_local``, true of the official chunk 512 = ``n_local`` 512), so the chunk is the set's
  tail and list order and original order agree.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from jattn.core import checks
from jattn.core.reference import HIGHEST, softmax_rows
from jattn.methods.kv.gather import (POSITIONS, rope_rows, check_decode_caches, check_index_array,
                                     gathered_decode_attention)

HEAD_MAPS = ("grouped", "interleaved")


# ------------------------------------------------------------------------------------------ validation

def _check_sizes(n_init, n_local, top_k, new_tokens: int) -> tuple[int, int, int]:
    n_init = checks.check_int("n_init", n_init, minimum=0)
    n_local = checks.check_int("n_local", n_local, minimum=1)
    top_k = checks.check_int("top_k", top_k, minimum=1)
    if new_tokens > n_local:
        raise ValueError(f"the query chunk (Tq={new_tokens} tokens) must fit in the local window n_local="
                         f"{n_local}: the chunk is the attended set's tail")
    return n_init, n_local, top_k


def _check_options(rope_theta, head_map, head_dim: int) -> float | None:
    checks.check_choice("head_map", head_map, HEAD_MAPS)
    if rope_theta is None:
        return None
    rope_theta = checks.check_positive_float("rope_theta", rope_theta, allow_none=False)
    if head_dim % 2:
        raise ValueError(f"rope_theta needs an even head dim, got D={head_dim}")
    return rope_theta


def _check_fingerprint_input(q_chunk, k_cache_norope) -> int:
    """``q_chunk [B, H, D] | [B, Tq, H, D]`` against ``k_cache_norope [B, Hkv, S, D]``; returns Tq."""
    checks.check_float_array("q_chunk", q_chunk)
    if q_chunk.ndim not in (3, 4):
        raise ValueError(f"q_chunk must be [B, H, D] or [B, Tq, H, D], got {checks.describe(q_chunk)}")
    checks.check_float_array("k_cache_norope", k_cache_norope, 4)
    B, H, D = q_chunk.shape[0], q_chunk.shape[-2], q_chunk.shape[-1]
    if k_cache_norope.shape[0] != B or k_cache_norope.shape[3] != D or H % k_cache_norope.shape[1]:
        raise ValueError(f"k_cache_norope must be [B={B}, Hkv, S_max, D={D}] with H={H} a multiple of Hkv, "
                         f"got {checks.describe(k_cache_norope)}")
    return 1 if q_chunk.ndim == 3 else q_chunk.shape[1]


def _check_cache(cache, B: int, H: int, D: int, top_k: int) -> None:
    want = f"SelectionCache.create(batch={B}, heads={H}, head_dim={D}, top_k={top_k})"
    if not isinstance(cache, SelectionCache):
        raise TypeError(f"cache must be a {want}, got {type(cache).__name__}")
    if cache.fingerprint.shape != (B, H, D) or cache.top.shape != (B, top_k):
        raise ValueError(f"cache must be a {want}, got fingerprint {checks.describe(cache.fingerprint)} and "
                         f"top {checks.describe(cache.top)}")


# ------------------------------------------------------------------------------------------- selection

def selection_size(n_init: int, n_local: int, top_k: int, capacity: int) -> int:
    """Entries of the selection list: ``n_init + top_k + n_local``, or the whole cache when that is not less."""
    return min(n_init + top_k + n_local, capacity)


def query_fingerprint(q_chunk: Float[Array, "B *Tq H D"], *, n_local: int,
                      rope_theta: float | None = None) -> Float[Array, "B H D"]:
    """``q_bar = mean_t RoPE(q_t, n_local + t)`` in float32 (no rotation when ``rope_theta`` is None)."""
    q = (q_chunk[:, None] if q_chunk.ndim == 3 else q_chunk).astype(jnp.float32)     # [B, Tq, H, D]
    if rope_theta is not None:
        rows = jnp.swapaxes(q, 1, 2)                                                   # [B, H, Tq, D]
        positions = jnp.broadcast_to(n_local + jnp.arange(q.shape[1]), rows.shape[:3])
        q = jnp.swapaxes(rope_rows(rows, positions, rope_theta), 1, 2)
    return jnp.mean(q, axis=1)


def token_votes(fingerprint: Float[Array, "B H D"], k_cache_norope: Float[Array, "B Hkv S D"],
                lengths: Int[Array, "B"], *, n_init: int, n_local: int,
                head_map: str = "grouped") -> Float[Array, "B S"]:
    """Soft votes ``v_j = sum_h softmax_{j in C}(q_bar_h . k_{kv(h), j})`` over the candidates
    ``C = [n_init, n - n_local)``; ``-inf`` outside ``C``."""
    B, H, D = fingerprint.shape
    Hkv, S = k_cache_norope.shape[1], k_cache_norope.shape[2]
    G = H // Hkv
    if head_map == "grouped":        # head h = kv * G + g reads kv head h // G
        per_kv = fingerprint.reshape(B, Hkv, G, D)
    else:                            # the official scorer: head h = g * Hkv + kv reads kv head h % Hkv
        per_kv = jnp.swapaxes(fingerprint.reshape(B, G, Hkv, D), 1, 2)
    logits = jnp.einsum("bkgd,bksd->bkgs", per_kv, k_cache_norope.astype(jnp.float32), precision=HIGHEST)
    j = jnp.arange(S)
    candidate = (j >= n_init) & (j < (lengths - n_local)[:, None])                      # [B, S]
    probs, _ = softmax_rows(jnp.where(candidate[:, None, None], logits, -jnp.inf))
    return jnp.where(candidate, jnp.sum(probs, axis=(1, 2)), -jnp.inf)


def top_tokens(votes: Float[Array, "B S"], top_k: int) -> Int[Array, "B top_k"]:
    """The ``top_k`` positions of largest vote, sorted ascending."""
    return jnp.sort(lax.top_k(votes, top_k)[1], axis=-1).astype(jnp.int32)


def assemble_selection(top: Int[Array, "B top_k"], lengths: Int[Array, "B"], *, n_init: int, n_local: int,
                       capacity: int) -> tuple[Int[Array, "B M"], Bool[Array, "B M"]]:
    """``([0, n_init) ∪ top ∪ [n - n_local, n), valid)``, or the dense list ``[0, n)`` (padded, valid =
    ``i < n``) for sequences with ``n <= n_init + top_k + n_local``; ``M = selection_size(...)``."""
    B, top_k = top.shape
    size = selection_size(n_init, n_local, top_k, capacity)
    slots = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (B, size))
    dense_valid = slots < lengths[:, None]
    if size < n_init + top_k + n_local:       # the list covers the whole cache: every sequence is dense
        return slots, dense_valid
    sparse = jnp.concatenate([slots[:, :n_init], top,
                              (lengths[:, None] - n_local + jnp.arange(n_local)).astype(jnp.int32)], axis=1)
    dense = (lengths <= size)[:, None]
    return jnp.where(dense, slots, sparse), ~dense | dense_valid


def tokenselect_indices(q_chunk: Float[Array, "B *Tq H D"], k_cache_norope: Float[Array, "B Hkv S D"],
                        lengths: Int[Array, "B"], *, n_init: int, n_local: int, top_k: int,
                        rope_theta: float | None = None,
                        head_map: str = "grouped") -> tuple[Int[Array, "B M"], Bool[Array, "B M"]]:
    """TokenSelect's attended set for a query chunk (the released path: no Selection Cache).

    Args:
      q_chunk: ``[B, H, D]`` or ``[B, Tq, H, D]`` queries *without* RoPE, already appended to the cache.
      k_cache_norope: head-major ``[B, Hkv, S_max, D]`` keys cached without RoPE.
      lengths: ``[B]`` int tokens in the cache, the chunk included.
      n_init: always-kept initial tokens (sinks; official 128).
      n_local: always-kept most recent tokens (official 512); at least ``Tq``.
      top_k: tokens chosen by the soft vote (official 2048).
      rope_theta: RoPE base used to rotate the fingerprint; None for none.
      head_map: ``"grouped"`` (kv head ``h // G``) or ``"interleaved"`` (``h % Hkv``, the official scorer).

    Returns:
      ``(idx [B, M], valid [B, M])`` with ``M = min(n_init + top_k + n_local, S_max)``: sorted unique
      positions, every valid one below ``lengths[b]``.

    Raises:
      ValueError: a size or shape is wrong (named, before any compute).
      TypeError: a dtype or a size's type is wrong.
    """
    Tq = _check_fingerprint_input(q_chunk, k_cache_norope)
    n_init, n_local, top_k = _check_sizes(n_init, n_local, top_k, Tq)
    rope_theta = _check_options(rope_theta, head_map, q_chunk.shape[-1])
    B, S = k_cache_norope.shape[0], k_cache_norope.shape[2]
    check_index_array("lengths", lengths, (B,), kind="int")
    if selection_size(n_init, n_local, top_k, S) < n_init + top_k + n_local:
        return assemble_selection(jnp.zeros((B, top_k), jnp.int32), lengths, n_init=n_init, n_local=n_local,
                                  capacity=S)
    fingerprint = query_fingerprint(q_chunk, n_local=n_local, rope_theta=rope_theta)
    votes = token_votes(fingerprint, k_cache_norope, lengths, n_init=n_init, n_local=n_local, head_map=head_map)
    return assemble_selection(top_tokens(votes, top_k), lengths, n_init=n_init, n_local=n_local, capacity=S)


# ------------------------------------------------------------------------------------- selection cache

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SelectionCache:
    """One layer's Selection Cache: the fingerprint and top-k of each sequence's last fresh selection."""
    fingerprint: jax.Array      # [B, H, D] float32
    top: jax.Array              # [B, top_k] int32
    filled: jax.Array           # [B] bool: False until a first sparse selection

    @classmethod
    def create(cls, batch: int, heads: int, head_dim: int, top_k: int) -> "SelectionCache":
        """An empty cache (every sequence selects afresh on its first sparse step)."""
        for name, value in (("batch", batch), ("heads", heads), ("head_dim", head_dim), ("top_k", top_k)):
            checks.check_int(name, value)
        return cls(jnp.zeros((batch, heads, head_dim), jnp.float32), jnp.zeros((batch, top_k), jnp.int32),
                   jnp.zeros((batch,), bool))


def fingerprint_cosine(a: Float[Array, "B H D"], b: Float[Array, "B H D"], eps: float = 1e-8) -> Float[Array, "B"]:
    """``cos(a, b)`` over the flattened ``H * D`` fingerprint of each sequence (``torch.cosine_similarity``)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.sum(a * b, axis=-1) / jnp.maximum(norms, eps)


def tokenselect_select(q_chunk: Float[Array, "B *Tq H D"], k_cache_norope: Float[Array, "B Hkv S D"],
                       lengths: Int[Array, "B"], cache: SelectionCache, *, n_init: int, n_local: int, top_k: int,
                       threshold: float = 0.9, rope_theta: float | None = None, head_map: str = "grouped"):
    """``tokenselect_indices`` with the Selection Cache of one layer.

    A sequence whose selection would be sparse reuses ``cache.top`` when the cache is filled and
    ``cos(q_bar, cache.fingerprint) >= threshold``; otherwise it votes afresh and the cache takes the new
    fingerprint and top-k. When every sequence reuses, the vote is skipped (``lax.cond``). The cached top-k
    must come from the same sequences (lengths only grow), so its positions stay candidates.

    Args:
      q_chunk: as ``tokenselect_indices``.
      k_cache_norope: as ``tokenselect_indices``.
      lengths: as ``tokenselect_indices``.
      cache: this layer's ``SelectionCache`` (``SelectionCache.create(B, H, D, top_k)``).
      n_init: as ``tokenselect_indices``.
      n_local: as ``tokenselect_indices``.
      top_k: as ``tokenselect_indices``.
      threshold: reuse when the cosine similarity is at least this, in ``[-1, 1]`` (1: only an identical
        fingerprint, -1: always once filled).
      rope_theta: as ``tokenselect_indices``.
      head_map: as ``tokenselect_indices``.

    Returns:
      ``(idx [B, M], valid [B, M], new_cache, reused [B] bool)``.

    Raises:
      ValueError: a size, shape or the threshold is wrong.
      TypeError: a dtype or a size's type is wrong.
    """
    Tq = _check_fingerprint_input(q_chunk, k_cache_norope)
    n_init, n_local, top_k = _check_sizes(n_init, n_local, top_k, Tq)
    rope_theta = _check_options(rope_theta, head_map, q_chunk.shape[-1])
    threshold = checks.check_float_in("threshold", threshold, -1.0, 1.0)
    B, H, D = q_chunk.shape[0], q_chunk.shape[-2], q_chunk.shape[-1]
    check_index_array("lengths", lengths, (B,), kind="int")
    _check_cache(cache, B, H, D, top_k)
    S = k_cache_norope.shape[2]
    if selection_size(n_init, n_local, top_k, S) < n_init + top_k + n_local:
        idx, valid = tokenselect_indices(q_chunk, k_cache_norope, lengths, n_init=n_init, n_local=n_local,
                                         top_k=top_k)
        return idx, valid, cache, jnp.zeros((B,), bool)
    fingerprint = query_fingerprint(q_chunk, n_local=n_local, rope_theta=rope_theta)
    sparse = lengths > n_init + top_k + n_local
    reused = cache.filled & sparse & (fingerprint_cosine(fingerprint, cache.fingerprint) >= threshold)

    def vote():
        votes = token_votes(fingerprint, k_cache_norope, lengths, n_init=n_init, n_local=n_local, head_map=head_map)
        return top_tokens(votes, top_k)

    fresh = lax.cond(jnp.all(reused), lambda: cache.top, vote)
    top = jnp.where(reused[:, None], cache.top, fresh)
    refresh = sparse & ~reused
    new_cache = SelectionCache(jnp.where(refresh[:, None, None], fingerprint, cache.fingerprint),
                               jnp.where(refresh[:, None], fresh, cache.top), cache.filled | refresh)
    idx, valid = assemble_selection(top, lengths, n_init=n_init, n_local=n_local, capacity=S)
    return idx, valid, new_cache, reused


# -------------------------------------------------------------------------------------------- attention

def tokenselect_decode(q: Float[Array, "B *Tq H D"], k_cache_norope: Float[Array, "B Hkv S D"],
                       v_cache: Float[Array, "B Hkv S Dv"], lengths: Int[Array, "B"],
                       cache: SelectionCache | None = None, *, n_init: int, n_local: int, top_k: int,
                       rope_theta: float | None = None, positions: str = "contiguous", scale: float | None = None,
                       threshold: float = 0.9, head_map: str = "grouped"):
    """TokenSelect attention of new tokens over a cache of un-rotated keys.

    Args:
      q: ``[B, H, D]`` or ``[B, Tq, H, D]`` queries *without* RoPE (their K/V already appended).
      k_cache_norope: head-major ``[B, Hkv, S_max, D]`` keys without RoPE.
      v_cache: ``[B, Hkv, S_max, Dv]``.
      lengths: ``[B]`` int tokens in the cache, the new ones included.
      cache: this layer's ``SelectionCache``, or None (no reuse: the released configuration).
      n_init: always-kept initial tokens.
      n_local: always-kept recent tokens (at least ``Tq``).
      top_k: tokens chosen by the soft vote.
      rope_theta: RoPE base for the fingerprint and the attention; None for a model without RoPE.
      positions: ``"contiguous"`` (the paper's) or ``"original"``: the RoPE positions inside attention.
      scale: logit scale, default ``D ** -0.5``.
      threshold: the Selection Cache's cosine threshold (with ``cache``).
      head_map: ``"grouped"`` or ``"interleaved"``: which kv head each query head scores with.

    Returns:
      ``out`` (q's shape with Dv), or ``(out, new_cache)`` when ``cache`` is given.

    Raises:
      ValueError: a size, shape or choice is wrong (named, before any compute).
      TypeError: a dtype is wrong.
    """
    check_decode_caches(q, k_cache_norope, v_cache, lengths)
    checks.check_choice("positions", positions, POSITIONS)
    sizes = dict(n_init=n_init, n_local=n_local, top_k=top_k, rope_theta=rope_theta, head_map=head_map)
    if cache is None:
        idx, valid = tokenselect_indices(q, k_cache_norope, lengths, **sizes)
    else:
        idx, valid, cache, _ = tokenselect_select(q, k_cache_norope, lengths, cache, threshold=threshold, **sizes)
    H = q.shape[-2]
    per_head = (idx.shape[0], H, idx.shape[1])
    out = gathered_decode_attention(q, k_cache_norope, v_cache, jnp.broadcast_to(idx[:, None], per_head),
                                    jnp.broadcast_to(valid[:, None], per_head), lengths, scale=scale,
                                    rope_theta=rope_theta, positions=positions)
    return out if cache is None else (out, cache)
