"""P05 — VMoBA: Mixture-of-Block Attention for Video Diffusion Models.

A dynamic selector for *non-causal* (bidirectional) video DiT self-attention (``T == S``). Tokens arrive
in ``(t, h, w)`` raster order, ``S = t * h * w``; per (batch, query head ``h``), GQA query head ``h``
reading kv head ``h // (H // Hkv)``:

1. Layer-wise recurrent partition (``layer_chunk``: layer ``l`` uses ``chunks[l % 3]``, cycling 1-D ->
   2-D -> 3-D as the paper orders them; the official repo leaves the cycle to the caller). The tokens are
   permuted so each key chunk is contiguous (``video_block_partition``):
   * 1-D, ``chunk = c_t`` (an int): ``c_t`` whole frames, no permutation, ``c_t h w`` tokens a chunk (the
     last chunk is shorter when ``c_t`` does not divide ``t``, as in the official ``calc_chunks``);
   * 2-D, ``chunk = (c_h, c_w)``: ``(t nch ch ncw cw) -> (nch ncw t ch cw)``: a ``c_h x c_w`` spatial tile
     across all frames, ``t c_h c_w`` tokens a chunk;
   * 3-D, ``chunk = (c_t, c_h, c_w)``: ``(nct ct nch ch ncw cw) -> (nct nch ncw ct ch cw)``: a cube.
   The output is un-permuted (``video_block_unpartition``).
2. Chunk key ``kbar_c`` = the mean of chunk ``c``'s keys (fp32, valid tokens only); the gate is the raw
   dot product ``gate[c, s] = q_s . kbar_c`` (no ``1/sqrt(d)``: the official code has none).
3. Selection (``vmoba_select``), per token ``s``, whose own chunk is ``s // chunk_size``:
   * ``"threshold"`` (default): min-max normalise the gates within the group (``"query_head"``: over the
     chunks of one (head, query); ``"head_global"``: over all (chunk, query) of one head, the paper's
     global block selection), ``n = (g - min) / (max - min)`` (denominator 1 when ``<= 1e-6``). With
     ``self`` the group's self-chunk sum and ``total`` its sum, ``need = max(tau - self / (total + eps),
     0)``; the other entries (self entries set to 0) are sorted descending, and the sorted prefix up to
     the first position whose cumulative sum ``/ (total + eps) >= need`` is selected (all of them when
     none reaches it), plus every self chunk. ``eps = 1e-6``.
   * ``"topk"``: the self chunk plus the ``topk - 1`` best others per (head, query) (``"query_head"``), or
     the ``topk * S`` best (chunk, query) entries per head with every self entry ranked first
     (``"head_global"``; the official ``+1e9``).
4. Attention = softmax over the union {own chunk} U {selected chunks}: ``jattn.block_sparse_attention(...,
   causal=False)`` on the permuted sequence with ``block_k = chunk_size`` (tiles = chunks) and, by
   default, ``block_q = 1`` (one query a tile row), which is exactly the official two-FlashAttention LSE
   merge (self branch + varlen MoBA branch with the self chunk excluded). With ``block_q > 1`` a tile row
   keeps the *union* of its queries' chunks: a superset (more mass, never less), usable by kernels that
   need tall tiles (Pallas wants ``block_q >= 16``).

Defaults (official ``moba_attn_varlen``): ``select="threshold"``, ``tau = simsum_threshold = 0.25`` (the
demo uses 0.3), ``mode = threshold_type = "query_head"`` (the paper's global selection is
``"head_global"``). Chunk sizes in the demo are about ``S / 72``.

Official code read: ``KwaiVGI/VMoBA`` ``src/vmoba.py`` (``_select_threshold_query_head``,
``_select_threshold_head_global``, ``process_moba_input/output``, the ``topk`` branch). Where it is
ambiguous or differs from the paper, jattn follows the code:

* the threshold cut includes the entry that first reaches ``need``, so even when the self chunk alone
  reaches ``tau`` (``need = 0``) one other chunk (the best) is still selected;
* the sort is stable (ties to the lower chunk index; for ``head_global`` the flat index ``c * S + s``);
  the official ``torch.sort`` is unstable.

Deviations, deliberate: ``topk`` larger than the number of chunks is a ``ValueError`` (the official code
clamps); ``tau`` must be in ``(0, 1]`` (``tau = 1`` selects everything: dense attention); the official
``"block"`` and ``"overall"`` threshold groups are not built; the 1-D chunk is an int number of frames
(the official code also accepts a float). Training uses the block-sparse kernel's exact VJP (no custom
VMoBA backward is needed).
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
EPS = 1e-6
MODES = ("query_head", "head_global")
SELECTS = ("threshold", "topk")

__all__ = ["vmoba_attention", "vmoba_block_mask", "vmoba_select", "vmoba_gates", "video_block_partition",
           "video_block_unpartition", "video_chunk_size", "layer_chunk", "threshold_select_query_head",
           "threshold_select_head_global"]


# ---------------------------------------------------------------------------------------- partition

def _check_partition(thw, chunk) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    thw = checks.check_int_tuple("thw", thw, 3, what="(t, h, w)")
    if isinstance(chunk, (int,)) and not isinstance(chunk, bool):
        chunk = (checks.check_int("chunk", chunk, 1),)
    elif isinstance(chunk, (tuple, list)) and len(chunk) in (2, 3):
        chunk = checks.check_int_tuple("chunk", chunk, len(chunk))
    else:
        raise TypeError(f"chunk must be an int (1-D: frames), a pair (c_h, c_w) (2-D) or a triple "
                        f"(c_t, c_h, c_w) (3-D), got {chunk!r}")
    t, h, w = thw
    if len(chunk) == 1 and chunk[0] > t:
        raise ValueError(f"chunk={chunk[0]} frames must be at most t={t} (thw={thw})")
    dims = thw[1:] if len(chunk) == 2 else thw
    if len(chunk) > 1 and any(d % c for d, c in zip(dims, chunk)):
        raise ValueError(f"chunk={chunk} must divide the {'spatial ' if len(chunk) == 2 else ''}grid "
                         f"{dims} of thw={thw}")
    return thw, chunk


def video_chunk_size(thw: tuple[int, int, int], chunk) -> int:
    """Tokens per key chunk: ``c_t h w`` (1-D), ``t c_h c_w`` (2-D) or ``c_t c_h c_w`` (3-D).

    Args:
      thw: ``(t, h, w)`` latent video grid.
      chunk: an int (1-D, frames), ``(c_h, c_w)`` (2-D) or ``(c_t, c_h, c_w)`` (3-D).

    Returns:
      A Python int.
    """
    (t, h, w), chunk = _check_partition(thw, chunk)
    if len(chunk) == 1:
        return chunk[0] * h * w
    if len(chunk) == 2:
        return t * chunk[0] * chunk[1]
    return math.prod(chunk)


def _split_shape(thw, chunk):
    """The 6-D split of ``(t, h, w)`` and the axis order that makes each chunk contiguous."""
    t, h, w = thw
    if len(chunk) == 2:
        ch, cw = chunk
        return (t, 1, h // ch, ch, w // cw, cw), (1, 2, 4, 0, 3, 5)      # (nch ncw t ch cw), nct = 1
    ct, ch, cw = chunk
    return (t // ct, ct, h // ch, ch, w // cw, cw), (0, 2, 4, 1, 3, 5)   # (nct nch ncw ct ch cw)


def video_block_partition(x: Float[Array, "B S ..."], thw: tuple[int, int, int], chunk) -> Float[Array, "B S ..."]:
    """Permutes ``(t h w)``-ordered tokens so each VMoBA key chunk is contiguous.

    Args:
      x: ``[B, S, ...]`` with ``S = t h w`` in raster ``(t, h, w)`` order.
      thw: ``(t, h, w)``.
      chunk: an int (1-D: frames, no permutation), ``(c_h, c_w)`` (2-D) or ``(c_t, c_h, c_w)`` (3-D).

    Returns:
      ``x`` with its token axis permuted (chunk ``c`` = tokens ``[c n, (c + 1) n)``, ``n =
      video_chunk_size(thw, chunk)``).

    Raises:
      TypeError, ValueError: ``x``, ``thw`` or ``chunk`` is malformed (the message names it).
    """
    thw, chunk = _check_partition(thw, chunk)
    if not hasattr(x, "shape") or x.ndim < 2 or x.shape[1] != math.prod(thw):
        raise ValueError(f"x must be [B, S={math.prod(thw)} (= t h w of thw={thw}), ...], got {checks.describe(x)}")
    if len(chunk) == 1:
        return x
    split, order = _split_shape(thw, chunk)
    rest = x.shape[2:]
    y = x.reshape(x.shape[0], *split, *rest)
    y = jnp.transpose(y, (0, *(1 + a for a in order), *range(7, 7 + len(rest))))
    return y.reshape(x.shape)


def video_block_unpartition(x: Float[Array, "B S ..."], thw: tuple[int, int, int], chunk) -> Float[Array, "B S ..."]:
    """The inverse of ``video_block_partition`` (same arguments): back to ``(t h w)`` order."""
    thw, chunk = _check_partition(thw, chunk)
    if not hasattr(x, "shape") or x.ndim < 2 or x.shape[1] != math.prod(thw):
        raise ValueError(f"x must be [B, S={math.prod(thw)} (= t h w of thw={thw}), ...], got {checks.describe(x)}")
    if len(chunk) == 1:
        return x
    split, order = _split_shape(thw, chunk)
    rest = x.shape[2:]
    permuted = tuple(split[a] for a in order)
    y = x.reshape(x.shape[0], *permuted, *rest)
    inverse = tuple(order.index(a) for a in range(6))
    y = jnp.transpose(y, (0, *(1 + a for a in inverse), *range(7, 7 + len(rest))))
    return y.reshape(x.shape)


def layer_chunk(layer: int, chunks: tuple) -> int | tuple[int, ...]:
    """The layer-wise recurrent partition: layer ``l`` uses ``chunks[l % len(chunks)]``.

    Args:
      layer: the layer index (>= 0).
      chunks: the cycle, e.g. ``(c_t, (c_h, c_w), (c_t, c_h, c_w))`` for 1-D -> 2-D -> 3-D (the paper's order).

    Returns:
      The chunk spec for ``video_block_partition``.
    """
    checks.check_int("layer", layer, 0)
    if not isinstance(chunks, (tuple, list)) or not chunks:
        raise TypeError(f"chunks must be a non-empty tuple of chunk specs, got {chunks!r}")
    return chunks[layer % len(chunks)]


# ---------------------------------------------------------------------------------------- validation

def _check_selector_args(q, k, chunk_size, tau, mode, select, topk, block_q):
    B, S, H, Hkv, D = checks.check_self_attention_qk(q, k, "VMoBA (video)")
    chunk_size = checks.check_int("chunk_size", chunk_size, 1)
    if chunk_size > S:
        raise ValueError(f"chunk_size={chunk_size} must be at most the sequence length S={S}")
    checks.check_choice("mode", mode, MODES)
    checks.check_choice("select", select, SELECTS)
    checks.check_float_in("tau", tau, 0.0, 1.0, low_open=True)
    C = -(-S // chunk_size)
    if select == "topk":
        if topk is None:
            raise TypeError("topk must be an int in [1, number of chunks] when select='topk', got None")
        topk = checks.check_int("topk", topk, 1)
        if topk > C:
            raise ValueError(f"topk={topk} is larger than the number of chunks C={C} (S={S}, chunk_size={chunk_size})")
    checks.check_int("block_q", block_q, 1)
    return B, S, H, Hkv, D, C


# ---------------------------------------------------------------------------------------- pure pieces

def _chunk_mean_keys(k, chunk_size: int):
    """``[B, S, Hkv, D]`` -> ``[B, C, Hkv, D]`` float32: each chunk's mean key over its actual tokens."""
    B, S = k.shape[:2]
    C = -(-S // chunk_size)
    padded = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, C * chunk_size - S), (0, 0), (0, 0)))
    sizes = jnp.minimum(chunk_size, S - jnp.arange(C) * chunk_size).astype(jnp.float32)
    return padded.reshape(B, C, chunk_size, *k.shape[2:]).sum(2) / sizes[None, :, None, None]


def vmoba_gates(q: Float[Array, "B S H D"], k: Float[Array, "B S Hkv D"], *, chunk_size: int) -> Float[Array, "B H S C"]:
    """``gate[b, h, s, c] = q[b, s, h] . kbar[b, c, h // G]`` with ``kbar`` the chunk's mean key (float32).

    Args:
      q: ``[B, S, H, D]`` (already partitioned).
      k: ``[B, S, Hkv, D]``.
      chunk_size: tokens per chunk (the last chunk may be shorter).

    Returns:
      ``[B, H, S, C]`` float32.
    """
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    kbar = _chunk_mean_keys(k, chunk_size)
    qg = q.astype(jnp.float32).reshape(B, S, Hkv, H // Hkv, D)
    gates = jnp.einsum("bskgd,bckd->bkgsc", qg, kbar, precision=HIGHEST)
    return gates.reshape(B, H, S, -1)


def _self_chunk(S: int, C: int, chunk_size: int):
    """``[S, C]`` bool: chunk ``c`` is query ``s``'s own chunk."""
    return (jnp.arange(S) // chunk_size)[:, None] == jnp.arange(C)[None, :]


def _min_max_normalise(gates, axes):
    low = jnp.min(gates, axis=axes, keepdims=True)
    span = jnp.max(gates, axis=axes, keepdims=True) - low
    return (gates - low) / jnp.where(span <= EPS, 1.0, span)


def _cut_sorted(others, total, need):
    """Selects, along the last axis, the descending-sorted prefix up to the first cumulative ratio >= need."""
    n = others.shape[-1]
    order = jnp.argsort(-others, axis=-1, stable=True)
    ratio = jnp.cumsum(jnp.take_along_axis(others, order, axis=-1), axis=-1) / (total + EPS)
    reached = ratio >= need
    cutoff = jnp.where(jnp.any(reached, axis=-1), jnp.argmax(reached, axis=-1), n - 1)
    kept_sorted = jnp.arange(n) <= cutoff[..., None]
    rank = jnp.argsort(order, axis=-1, stable=True)
    return jnp.take_along_axis(kept_sorted, rank, axis=-1)


def threshold_select_query_head(gates: Float[Array, "... S C"], own: Bool[Array, "S C"],
                                tau: float) -> Bool[Array, "... S C"]:
    """The official ``_select_threshold_query_head``: per (head, query), over chunks (step 3).

    Args:
      gates: ``[..., S, C]`` gate logits.
      own: ``[S, C]`` the self-chunk indicator.
      tau: the similarity-sum threshold in ``(0, 1]``.

    Returns:
      ``[..., S, C]`` bool: selected chunks (self chunk included).
    """
    if tau >= 1.0:  # exact arithmetic never reaches need: everything (float32 cumsums can round past it)
        return jnp.ones(gates.shape, bool)
    norm = _min_max_normalise(gates, -1)
    total = jnp.sum(norm, axis=-1)
    need = jnp.maximum(tau - jnp.sum(jnp.where(own, norm, 0.0), axis=-1) / (total + EPS), 0.0)
    others = jnp.where(own, 0.0, norm)
    return _cut_sorted(others, total[..., None], need[..., None]) | own


def threshold_select_head_global(gates: Float[Array, "... S C"], own: Bool[Array, "S C"],
                                 tau: float) -> Bool[Array, "... S C"]:
    """The official ``_select_threshold_head_global``: per head, over all (chunk, query) pairs (step 3).

    Args:
      gates: ``[..., S, C]`` gate logits (one head on the last two axes).
      own: ``[S, C]`` the self-chunk indicator.
      tau: the similarity-sum threshold in ``(0, 1]``.

    Returns:
      ``[..., S, C]`` bool: selected (query, chunk) pairs (self pairs included).
    """
    S, C = gates.shape[-2:]
    if tau >= 1.0:  # exact arithmetic never reaches need: everything (float32 cumsums can round past it)
        return jnp.ones(gates.shape, bool)
    norm = _min_max_normalise(gates, (-2, -1))
    total = jnp.sum(norm, axis=(-2, -1))
    need = jnp.maximum(tau - jnp.sum(jnp.where(own, norm, 0.0), axis=(-2, -1)) / (total + EPS), 0.0)
    others = jnp.swapaxes(jnp.where(own, 0.0, norm), -1, -2).reshape(*gates.shape[:-2], C * S)  # flat c*S+s
    kept = _cut_sorted(others, total[..., None], need[..., None])
    return jnp.swapaxes(kept.reshape(*gates.shape[:-2], C, S), -1, -2) | own


def _topk_select(gates, own, topk: int, mode: str):
    """Self chunk ranked first (the official ``+1e9``), then the best gates."""
    S, C = gates.shape[-2:]
    ranked = jnp.where(own, jnp.inf, gates)
    if mode == "head_global":
        ranked = jnp.swapaxes(ranked, -1, -2).reshape(*gates.shape[:-2], C * S)
        count = topk * S
    else:
        count = topk
    order = jnp.argsort(-ranked, axis=-1, stable=True)
    kept = jnp.argsort(order, axis=-1, stable=True) < count
    if mode == "head_global":
        kept = jnp.swapaxes(kept.reshape(*gates.shape[:-2], C, S), -1, -2)
    return kept


# ---------------------------------------------------------------------------------------- selector

def vmoba_select(q: Float[Array, "B S H D"], k: Float[Array, "B S Hkv D"], *, chunk_size: int, tau: float = 0.25,
                 mode: str = "query_head", select: str = "threshold",
                 topk: int | None = None) -> Bool[Array, "B H S C"]:
    """VMoBA's per-token chunk choice on an already partitioned sequence (steps 2-3).

    Args:
      q: ``[B, S, H, D]`` (partitioned: chunk ``c`` = tokens ``[c chunk_size, (c + 1) chunk_size)``).
      k: ``[B, S, Hkv, D]`` (GQA: H a multiple of Hkv).
      chunk_size: tokens per chunk (``video_chunk_size``).
      tau: similarity-sum threshold in ``(0, 1]`` (``select="threshold"``).
      mode: ``"query_head"`` or ``"head_global"``.
      select: ``"threshold"`` or ``"topk"``.
      topk: chunks per query, self included (``select="topk"``), at most the number of chunks.

    Returns:
      ``[B, H, S, C]`` bool: query ``s`` of head ``h`` attends chunk ``c``.

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: an argument is out of range or the shapes disagree (the message names it).
    """
    B, S, H, Hkv, D, C = _check_selector_args(q, k, chunk_size, tau, mode, select, topk, 1)
    gates = vmoba_gates(q, k, chunk_size=chunk_size)
    own = _self_chunk(S, C, chunk_size)
    if select == "topk":
        return _topk_select(gates, own, topk, mode)
    if mode == "head_global":
        return threshold_select_head_global(gates, own, tau)
    return threshold_select_query_head(gates, own, tau)


def vmoba_block_mask(q: Float[Array, "B S H D"], k: Float[Array, "B S Hkv D"], *, chunk_size: int,
                     tau: float = 0.25, mode: str = "query_head", select: str = "threshold",
                     topk: int | None = None, block_q: int = 1) -> BlockMask:
    """VMoBA's ``BlockMask`` on the partitioned sequence: tiles ``block_q x chunk_size`` (run non-causal).

    Args:
      q: ``[B, S, H, D]`` (partitioned).
      k: ``[B, S, Hkv, D]``.
      chunk_size: tokens per chunk; the kv tile size.
      tau: similarity-sum threshold in ``(0, 1]``.
      mode: ``"query_head"`` or ``"head_global"``.
      select: ``"threshold"`` or ``"topk"``.
      topk: chunks per query for ``select="topk"``.
      block_q: queries per tile row. 1 (default) is exact per-token selection; larger values keep the
        union of the row's queries' chunks (a superset).

    Returns:
      A ``BlockMask`` ``[B, H, ceil(S / block_q), C]`` (listed tiles fully visible).

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: an argument is out of range or the shapes disagree (the message names it).
    """
    B, S, H, _, _, C = _check_selector_args(q, k, chunk_size, tau, mode, select, topk, block_q)
    chosen = vmoba_select(q, k, chunk_size=chunk_size, tau=tau, mode=mode, select=select, topk=topk)
    nQ = -(-S // block_q)
    if block_q > 1:
        chosen = jnp.pad(chosen, ((0, 0), (0, 0), (0, nQ * block_q - S), (0, 0)))
        chosen = jnp.any(chosen.reshape(B, H, nQ, block_q, C), axis=3)
    return BlockMask.from_dense_block_map(chosen, block_q=block_q, block_k=chunk_size, seq_q=S, seq_k=S)


def vmoba_attention(q: Float[Array, "B S H D"], k: Float[Array, "B S Hkv D"], v: Float[Array, "B S Hkv D"], *,
                    thw: tuple[int, int, int], chunk, tau: float = 0.25, mode: str = "query_head",
                    select: str = "threshold", topk: int | None = None, block_q: int = 1,
                    scale: float | None = None, impl: str = "auto") -> Float[Array, "B S H D"]:
    """VMoBA attention on ``(t h w)``-ordered video tokens: partition, select, block-sparse, un-partition.

    Args:
      q: ``[B, S, H, D]`` with ``S = t h w``.
      k: ``[B, S, Hkv, D]``.
      v: ``[B, S, Hkv, D]``.
      thw: ``(t, h, w)``.
      chunk: this layer's partition (int = 1-D frames, ``(c_h, c_w)``, ``(c_t, c_h, c_w)``; ``layer_chunk``).
      tau: similarity-sum threshold in ``(0, 1]`` (1 = dense).
      mode: ``"query_head"`` or ``"head_global"``.
      select: ``"threshold"`` or ``"topk"``.
      topk: chunks per query for ``select="topk"``.
      block_q: queries per tile row (1 = exact per-token selection).
      scale: logit scale (default ``D ** -0.5``; the gates are raw dot products, scale-free).
      impl: ``"auto" | "xla" | "pallas" | "reference"`` (pallas needs ``block_q`` and the chunk size to be
        powers of two >= 16).

    Returns:
      ``[B, S, H, D]`` in q's dtype, in the input's ``(t h w)`` order.

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: an argument is out of range or the shapes disagree (the message names it).
    """
    checks.check_qkv(q, k, v)
    chunk_size = video_chunk_size(thw, chunk)
    qp, kp, vp = (video_block_partition(x, thw, chunk) for x in (q, k, v))
    # The selection is discrete: no gradient flows through it (only through the attention).
    bm = vmoba_block_mask(jax.lax.stop_gradient(qp), jax.lax.stop_gradient(kp), chunk_size=chunk_size, tau=tau,
                          mode=mode, select=select, topk=topk, block_q=block_q)
    out = block_sparse_attention(qp, kp, vp, bm, causal=False, scale=scale, impl=impl)
    return video_block_unpartition(out, thw, chunk)
