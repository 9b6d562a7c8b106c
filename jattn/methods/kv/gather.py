"""Decode attention over a per-head list of cache positions: the kernel TokenSelect (P44) and TidalDecode
(P71) share.

Query head ``h`` of sequence ``b`` attends only the cache rows ``idx[b, h, :]`` of its kv head
``h // (H / Hkv)`` (jattn's GQA convention, as ``jattn.core.reference``). Entry ``j`` is visible to new token
``t`` (at position ``p_t = lengths[b] - Tq + t``, the decode rule of ``jattn.decode_attention``) iff

    valid[b, h, j]  and  idx[b, h, j] <= p_t

(and ``idx >= 0``), so with one new token every valid entry in ``[0, lengths[b])`` is visible, and a chunk
of ``Tq`` new tokens stays causal by original position. Over the visible entries the softmax is exact,
accumulated in float32:

    out[b, t, h] = sum_j softmax_j(scale * q[b, t, h] . k[b, h // G, idx[b, h, j]]) v[b, h // G, idx[b, h, j]]

A row with no visible entry gives 0 (never NaN). With unique valid entries this equals dense decode
attention restricted to the one-hot mask of ``idx`` (``selection_mask``); a duplicated entry is counted
twice.

RoPE on the fly (``rope_theta`` given; for caches that hold keys *without* RoPE, TokenSelect's layout): q and
the gathered keys are rotated (``jattn.nn.apply_rope``, rotate-half) at

* ``positions="contiguous"``: the gathered list's own order, as FlashInfer's ``pos_encoding_mode=ROPE_LLAMA``
  over an index list does in TokenSelect's official code: valid entry ``j`` gets its rank among the row's
  valid entries, and new token ``t`` gets ``m - Tq + t`` (``m`` = the row's valid count; FlashInfer's
  decode kernel rotates q at ``kv_len - 1``), i.e. the query sits at its own key's slot when the new
  tokens close the list (TokenSelect's local window always ends with them);
* ``positions="original"``: key ``idx`` at position ``idx``, token ``t`` at ``p_t``: rotating un-rotated
  keys this way reproduces a model that caches rotated keys.

Only ``K`` rows per head are read (``take_along_axis`` on the cache), so the cost is ``O(K)``, not
``O(S_max)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jattn.core import checks
from jattn.core.reference import HIGHEST, softmax_rows

POSITIONS = ("contiguous", "original")


def check_index_array(name: str, x, shape: tuple, *, kind: str) -> None:
    """``x`` must be an ``"int"`` or ``"bool"`` array of exactly ``shape``."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if kind == "int" and not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got {checks.describe(x)}")
    if kind == "bool" and x.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a bool array (True = a real entry), got {checks.describe(x)}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {checks.describe(x)}")


def check_step_tokens(q, k_new, v_new, k_cache, v_cache) -> None:
    """Validates one decode step against head-major caches ``[B, Hkv, S, D|Dv]``: ``q [B, H, D]`` (H a multiple
    of Hkv) and the new token's ``k_new [B, Hkv, D]``, ``v_new [B, Hkv, Dv]`` in the caches' dtype."""
    B, Hkv, _, D = k_cache.shape
    checks.check_float_array("q", q, 3)
    if q.shape[0] != B or q.shape[2] != D or q.shape[1] % Hkv:
        raise ValueError(f"q must be [B={B}, H (a multiple of Hkv={Hkv}), D={D}], got {checks.describe(q)}")
    for name, x, dim in (("k_new", k_new, D), ("v_new", v_new, v_cache.shape[3])):
        checks.check_float_array(name, x, 3)
        if x.shape != (B, Hkv, dim):
            raise ValueError(f"{name} must be [B={B}, Hkv={Hkv}, {dim}], got {checks.describe(x)}")
        if x.dtype != k_cache.dtype:
            raise TypeError(f"{name} must have the cache's dtype {k_cache.dtype}, got {checks.describe(x)}")


def check_decode_caches(q, k_cache, v_cache, lengths) -> tuple[int, int, int, int, int]:
    """Validates ``q [B, H, D] | [B, Tq, H, D]``, head-major ``k_cache, v_cache [B, Hkv, S, D]`` and
    ``lengths [B]``; returns ``(B, Tq, H, Hkv, S)``."""
    checks.check_float_array("q", q)
    if q.ndim not in (3, 4):
        raise ValueError(f"q must be [B, H, D] (one new token) or [B, Tq, H, D], got {checks.describe(q)}")
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    Tq = 1 if q.ndim == 3 else q.shape[1]
    checks.check_float_array("k_cache", k_cache, 4)
    checks.check_float_array("v_cache", v_cache, 4)
    if k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"k_cache must be head-major [B={B}, Hkv, S_max, D={D}], got {checks.describe(k_cache)}")
    if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
        raise ValueError(f"v_cache must match k_cache in all but the last dim, got k_cache "
                         f"{checks.describe(k_cache)} and v_cache {checks.describe(v_cache)}")
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if H % Hkv:
        raise ValueError(f"q's heads H={H} must be a multiple of the caches' kv heads Hkv={Hkv}")
    check_index_array("lengths", lengths, (B,), kind="int")
    if not checks.is_traced(lengths):
        values = np.asarray(lengths)
        if values.min(initial=0) < 0 or values.max(initial=0) > S:
            raise ValueError(f"lengths must lie in [0, S_max={S}], got {values.tolist()}")
    return B, Tq, H, Hkv, S


def gather_rows(cache: Float[Array, "B Hkv S D"], idx: Int[Array, "B H K"]) -> Float[Array, "B H K D"]:
    """``cache[b, h // G, idx[b, h, j]]`` for every query head ``h`` (``G = H / Hkv``); indices are clipped
    into ``[0, S)``, so padded entries read a real row (mask them)."""
    B, Hkv, S, D = cache.shape
    H, K = idx.shape[1], idx.shape[2]
    grouped = jnp.clip(idx, 0, S - 1).reshape(B, Hkv, (H // Hkv) * K)   # heads h = kv * G + g, so h // G = kv
    rows = jnp.take_along_axis(cache, grouped[..., None], axis=2)
    return rows.reshape(B, H, K, D)


def selection_mask(idx: Int[Array, "B H K"], valid: Bool[Array, "B H K"], capacity: int) -> Bool[Array, "B H S"]:
    """The one-hot ``[B, H, capacity]`` mask of the valid entries of ``idx`` (True = selected)."""
    hits = (idx[..., None] == jnp.arange(capacity)) & valid[..., None]
    return jnp.any(hits, axis=-2)


def rope_rows(x, positions, theta: float):
    """``x [..., N, D]`` rotated at ``positions [..., N]`` with jattn.nn's RoPE (rotate-half layout)."""
    # Imported here: jattn.nn imports jattn.methods, so a module-level import could become circular.
    from jattn.nn.attention import apply_rope
    lead, (N, D) = x.shape[:-2], x.shape[-2:]
    flat = x.reshape(-1, N, 1, D)
    return apply_rope(flat, positions.reshape(-1, N), theta=theta).reshape(*lead, N, D)


def rope_positions(idx, valid, lengths, new_tokens: int, positions: str):
    """``(key positions [B, H, K], query positions [B, H, Tq])`` for on-the-fly RoPE (see the module doc)."""
    t = jnp.arange(new_tokens)
    if positions == "original":
        q_pos = lengths[:, None, None] - new_tokens + t
        return idx, jnp.broadcast_to(q_pos, idx.shape[:2] + (new_tokens,))
    rank = jnp.cumsum(valid, axis=-1) - 1
    count = jnp.sum(valid, axis=-1, keepdims=True)
    return jnp.where(valid, rank, 0), count - new_tokens + t


def gathered_decode_attention(q: Float[Array, "B *Tq H D"], k_cache: Float[Array, "B Hkv S D"],
                              v_cache: Float[Array, "B Hkv S Dv"], idx: Int[Array, "B H K"],
                              valid: Bool[Array, "B H K"], lengths: Int[Array, "B"], *, scale: float | None = None,
                              rope_theta: float | None = None, positions: str = "contiguous"):
    """Exact softmax attention of the new tokens over the cache rows listed per query head.

    Args:
      q: ``[B, H, D]`` (one new token) or ``[B, Tq, H, D]`` (a chunk, already appended to the cache).
      k_cache: head-major ``[B, Hkv, S_max, D]``; H a multiple of Hkv (head ``h`` reads kv head ``h // G``).
      v_cache: ``[B, Hkv, S_max, Dv]``.
      idx: ``[B, H, K]`` int cache positions each query head attends (unique among its valid entries).
      valid: ``[B, H, K]`` bool, False for padding entries.
      lengths: ``[B]`` int valid keys per sequence, the new tokens included.
      scale: logit scale, default ``D ** -0.5``.
      rope_theta: RoPE base; None (default) applies no rotation (the cache holds rotated keys or none).
      positions: ``"contiguous"`` or ``"original"``: the RoPE positions when ``rope_theta`` is given.

    Returns:
      ``[B, H, Dv]`` or ``[B, Tq, H, Dv]`` (q's shape with Dv) in q's dtype; rows with no visible entry are 0.

    Raises:
      ValueError: a shape or a choice is wrong (named, before any compute).
      TypeError: a dtype is wrong.
    """
    B, Tq, H, Hkv, S = check_decode_caches(q, k_cache, v_cache, lengths)
    K = idx.shape[-1] if hasattr(idx, "shape") and len(idx.shape) == 3 else None
    check_index_array("idx", idx, (B, H, K if K is not None else "K"), kind="int")
    check_index_array("valid", valid, (B, H, K), kind="bool")
    checks.check_choice("positions", positions, POSITIONS)
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else checks.check_positive_float("scale", scale, allow_none=False)
    if rope_theta is not None:
        rope_theta = checks.check_positive_float("rope_theta", rope_theta, allow_none=False)
        if D % 2:
            raise ValueError(f"rope_theta needs an even head dim, got D={D}")

    q_rows = jnp.swapaxes(q[:, None] if q.ndim == 3 else q, 1, 2).astype(jnp.float32)   # [B, H, Tq, D]
    keys = gather_rows(k_cache, idx).astype(jnp.float32)
    values = gather_rows(v_cache, idx).astype(jnp.float32)
    if rope_theta is not None:
        key_pos, q_pos = rope_positions(idx, valid, lengths, Tq, positions)
        keys = rope_rows(keys, key_pos, rope_theta)
        q_rows = rope_rows(q_rows, q_pos, rope_theta)
    logits = jnp.einsum("bhtd,bhkd->bhtk", q_rows, keys, precision=HIGHEST) * scale
    newest = lengths[:, None, None, None] - Tq + jnp.arange(Tq)[:, None]              # p_t, [B, 1, Tq, 1]
    visible = valid[:, :, None, :] & (idx[:, :, None, :] >= 0) & (idx[:, :, None, :] <= newest)
    probs, _ = softmax_rows(jnp.where(visible, logits, -jnp.inf))
    out = jnp.einsum("bhtk,bhkd->bthd", probs, values, precision=HIGHEST).astype(q.dtype)
    return out[:, 0] if q.ndim == 3 else out
