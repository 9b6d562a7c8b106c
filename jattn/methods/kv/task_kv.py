"""P49 — Task-KV: Task-aware KV Cache Optimization via Semantic Differentiation of Attention Heads.

**Hypothesis-level.** Only the paper's abstract (arXiv 2501.15113) could be read (the method section was not
reachable; no official code was found), so this is the spec's plausible reading; every piece marked
*(unverified)* is a choice, not the paper's stated rule. What the abstract does state: heads far from the
"semantic center" (heterogeneous heads) keep the full KV cache; the other heads keep attention sinks, recent
tokens and "middle activations"; a "semantic separator" tells the two apart by distance from the center.

Per layer, after the prompt (``T`` tokens; observation window = its last ``W`` tokens):

1. semantic vector of head ``h`` *(unverified)*: its attention output over the window projected through its
   slice of the output projection, averaged over the window:
   ``s_h = mean_t o_h[t] @ W_O[h*Dh:(h+1)*Dh, :]`` (``head_semantic_vectors``);
2. semantic center ``c = mean_h s_h``, distance ``d_h = ||s_h - c||_2`` *(Euclidean: unverified)*;
3. separator *(selection rule unverified)*: heterogeneous iff ``d_h`` is among the ``round(ratio * H)``
   largest (ties: lower head index first), or iff ``d_h > threshold`` (``semantic_separator``); a kv head is
   heterogeneous when any of its query heads is (``kv_head_flags``);
4. middle activations *(SnapKV-like, unverified)*: per kv head, the ``k`` positions in ``[sink, T - recent)``
   with the largest attention mass from the window's queries (summed over the window rows and the group's
   query heads; ties: lower position) (``middle_activation_indices``);
5. cache: a heterogeneous head keeps every token; any other keeps the ``sink`` first tokens, its ``k`` middle
   activations (fixed after the prompt) and a sliding window of the ``recent`` newest tokens (the new one
   included) *(decode-time policy unverified: a ring, as DuoAttention's streaming heads)*. The prompt itself
   runs full causal attention; compression applies to what decoding sees.

Decode over per-head caches of different lengths (``TaskKVCache``): one head-major buffer
``[B, Hkv, capacity, D]`` holding each head's kept tokens compactly (heterogeneous: positions ``0..p``;
others: sinks, middles, then a ``recent``-slot ring) with per-(sequence, head) lengths ``[B, Hkv]``. Each
(sequence, kv head) is folded into the batch of ``jattn.decode_attention``, whose ``lengths`` then are the
per-head lengths, so the split-K decode kernel skips every head's unused tail. The selection is data (it
depends on the prompt), so everything is ``jit``-able; the contiguous buffer does not return the unused
slots' memory (a paged pool with a page table per (sequence, head) would).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jattn.core import checks
from jattn.core.reference import reference_attention
from jattn.methods.kv.gather import check_step_tokens
from jattn.ops.decode import decode_attention


# ------------------------------------------------------------------------------------------ selection

def head_semantic_vectors(head_outputs: Float[Array, "B W H Dh"], W_O: Float[Array, "HDh d"]) -> Float[Array, "B H d"]:
    """Each head's semantic vector: its outputs projected through its ``W_O`` slice, averaged over the window.

    Args:
      head_outputs: ``[B, W, H, Dh]`` per-head attention outputs of the observation window's tokens.
      W_O: ``[H * Dh, d]`` the layer's output projection (``x = concat_h o_h @ W_O``).

    Returns:
      ``[B, H, d]`` float32: ``s_h = mean_t o_h[t] @ W_O[h*Dh:(h+1)*Dh]``.

    Raises:
      TypeError, ValueError: a dtype or shape is wrong (named).
    """
    checks.check_float_array("head_outputs", head_outputs, 4)
    checks.check_float_array("W_O", W_O, 2)
    B, W, H, Dh = head_outputs.shape
    if W_O.shape[0] != H * Dh:
        raise ValueError(f"W_O must be [H * Dh = {H * Dh}, d] for head_outputs {checks.describe(head_outputs)}, "
                         f"got {checks.describe(W_O)}")
    per_head = W_O.astype(jnp.float32).reshape(H, Dh, W_O.shape[1])
    mean_output = jnp.mean(head_outputs.astype(jnp.float32), axis=1)               # [B, H, Dh]
    return jnp.einsum("bhe,hed->bhd", mean_output, per_head, precision=jax.lax.Precision.HIGHEST)


def semantic_distances(vectors: Float[Array, "*batch H d"]) -> Float[Array, "*batch H"]:
    """Each head's distance from the semantic center.

    Args:
      vectors: ``[..., H, d]`` semantic vectors.

    Returns:
      ``[..., H]`` float32 ``||s_h - mean_h s_h||_2``.
    """
    checks.check_float_array("vectors", vectors)
    if vectors.ndim < 2:
        raise ValueError(f"vectors must be [..., H, d], got {checks.describe(vectors)}")
    center = jnp.mean(vectors.astype(jnp.float32), axis=-2, keepdims=True)
    return jnp.linalg.norm(vectors.astype(jnp.float32) - center, axis=-1)


def semantic_separator(vectors: Float[Array, "*batch H d"], *, ratio: float | None = None,
                       threshold: float | None = None) -> Bool[Array, "*batch H"]:
    """Heterogeneous heads: the farthest from the semantic center.

    Args:
      vectors: ``[..., H, d]`` semantic vectors (``head_semantic_vectors``).
      ratio: in ``[0, 1]``: the ``round(ratio * H)`` heads with the largest distance (ties: lower index).
      threshold: instead of ``ratio``: heads whose distance exceeds it.

    Returns:
      ``[..., H]`` bool, True = heterogeneous (full cache). Permuting the heads permutes the result.

    Raises:
      ValueError: not exactly one of ``ratio`` and ``threshold`` is given, or it is out of range.
    """
    if (ratio is None) == (threshold is None):
        raise ValueError(f"give exactly one of ratio and threshold, got ratio={ratio!r}, threshold={threshold!r}")
    distances = semantic_distances(vectors)
    if threshold is not None:
        return distances > checks.check_finite_float("threshold", threshold)
    ratio = checks.check_float_in("ratio", ratio, 0.0, 1.0)
    H = vectors.shape[-2]
    count = math.floor(ratio * H + 0.5)
    order = jnp.argsort(-distances, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True) < count


def kv_head_flags(query_flags: Bool[Array, "*batch H"], kv_heads: int) -> Bool[Array, "*batch Hkv"]:
    """Query-head flags to kv-head flags: a kv head is heterogeneous when any query head of its group is.

    Args:
      query_flags: ``[..., H]`` bool.
      kv_heads: ``Hkv`` (H a multiple of it; query head ``h`` reads kv head ``h // (H // Hkv)``).

    Returns:
      ``[..., Hkv]`` bool.
    """
    kv_heads = checks.check_int("kv_heads", kv_heads)
    H = query_flags.shape[-1]
    if H % kv_heads:
        raise ValueError(f"query_flags' H={H} must be a multiple of kv_heads={kv_heads}")
    return jnp.any(query_flags.reshape(*query_flags.shape[:-1], kv_heads, H // kv_heads), axis=-1)


def middle_activation_indices(attn_window: Float[Array, "B Hkv W S"], k: int, *, sink: int = 0,
                              recent: int = 0) -> Int[Array, "B Hkv k"]:
    """The ``k`` middle positions with the largest attention mass from the observation window.

    Args:
      attn_window: ``[B, heads, W, S]`` attention probabilities of the window's queries over the ``S`` keys
        (already summed over a kv group's query heads, or per query head).
      k: middle activations per head (at most ``S - sink - recent``).
      sink: leading positions excluded (kept as sinks anyway).
      recent: trailing positions excluded (kept as recent tokens anyway).

    Returns:
      ``[B, heads, k]`` int32 positions in ``[sink, S - recent)``, ascending (ties: the lower position wins).

    Raises:
      TypeError, ValueError: a size or shape is wrong, or ``k`` does not fit (named).
    """
    checks.check_float_array("attn_window", attn_window, 4)
    k, sink = checks.check_int("k", k, 0), checks.check_int("sink", sink, 0)
    recent = checks.check_int("recent", recent, 0)
    S = attn_window.shape[-1]
    if k > S - sink - recent:
        raise ValueError(f"k={k} middle activations do not fit between sink={sink} and recent={recent} in S={S} "
                         f"keys (at most {max(S - sink - recent, 0)})")
    mass = jnp.sum(attn_window.astype(jnp.float32), axis=2)[..., sink:S - recent]
    _, picked = jax.lax.top_k(mass, k)                  # lax.top_k: equal values -> lower index first
    return jnp.sort(picked + sink, axis=-1).astype(jnp.int32)


def per_head_kv_compress(k: Float[Array, "B S Hkv D"], v: Float[Array, "B S Hkv Dv"], keep_idx: Int[Array, "B Hkv n"]):
    """Each kv head's kept tokens, gathered head-major.

    Args:
      k: ``[B, S, Hkv, D]``.
      v: ``[B, S, Hkv, Dv]``.
      keep_idx: ``[B, Hkv, n]`` int positions in ``[0, S)`` per kv head.

    Returns:
      ``(k_kept [B, Hkv, n, D], v_kept [B, Hkv, n, Dv])``.

    Raises:
      TypeError, ValueError: a dtype or shape is wrong (named).
    """
    checks.check_float_array("k", k, 4)
    checks.check_float_array("v", v, 4)
    if not hasattr(keep_idx, "dtype") or not jnp.issubdtype(keep_idx.dtype, jnp.integer) or keep_idx.ndim != 3 \
            or keep_idx.shape[:2] != (k.shape[0], k.shape[2]):
        raise ValueError(f"keep_idx must be an int array [B={k.shape[0]}, Hkv={k.shape[2]}, n], got "
                         f"{checks.describe(keep_idx)}")
    def gather(x):
        return jnp.take_along_axis(jnp.swapaxes(x, 1, 2), keep_idx[..., None], axis=2)
    return gather(k), gather(v)


# ------------------------------------------------------------------------------------------ cache

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TaskKVCache:
    """Per-(sequence, kv head) caches of different lengths in one head-major buffer.

    A heterogeneous head's slot ``j`` holds position ``j``. Any other head holds its ``sink`` sinks in slots
    ``[0, sink)``, its middle activations in ``[sink, fixed)`` and a ring of the ``recent`` newest tokens in
    ``[fixed, fixed + recent)`` (position ``p`` in slot ``fixed + p % recent``)."""
    k: jax.Array                # [B, Hkv, capacity, D]
    v: jax.Array                # [B, Hkv, capacity, D]
    lengths: jax.Array          # [B, Hkv] int32 valid slots per head (capacity + 1 once overflowed under jit)
    heterogeneous: jax.Array    # [B, Hkv] bool
    positions: jax.Array        # [B] int32 tokens seen
    fixed: int = dataclasses.field(default=0, metadata=dict(static=True))     # sink + middle slots
    recent: int = dataclasses.field(default=1, metadata=dict(static=True))

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @classmethod
    def prefill(cls, q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"],
                heterogeneous: Bool[Array, "B Hkv"], *, capacity: int, sink: int, recent: int, middle: int,
                window: int, scale: float | None = None):
        """Full causal attention over the prompt, then each head's cache.

        Args:
          q: ``[B, T, H, D]`` the prompt's queries.
          k: ``[B, T, Hkv, D]`` its keys.
          v: ``[B, T, Hkv, D]`` its values.
          heterogeneous: ``[B, Hkv]`` bool: kv heads that keep every token (``kv_head_flags`` of
            ``semantic_separator``).
          capacity: tokens a heterogeneous head can hold (``>= T``).
          sink: sink tokens of the other heads (>= 0).
          recent: recent tokens of the other heads, the newest included (>= 1; ``sink + recent <= T``).
          middle: middle activations of the other heads (>= 0; fewer when the prompt is short).
          window: observation window: the last ``window`` prompt queries score the middle activations.
          scale: logit scale (default ``D ** -0.5``).

        Returns:
          ``(out [B, T, H, D], cache)``.

        Raises:
          ValueError, TypeError: a shape, dtype or size is wrong (named).
        """
        B, T, S, H, Hkv, D = checks.check_qkv(q, k, v)
        if S != T:
            raise ValueError(f"prefill is self-attention: k must have q's length T={T}, got {checks.describe(k)}")
        capacity, window = checks.check_int("capacity", capacity), checks.check_int("window", window)
        sink, recent, middle = (checks.check_int("sink", sink, 0), checks.check_int("recent", recent),
                                checks.check_int("middle", middle, 0))
        if capacity < T or sink + recent > T or window > T:
            raise ValueError(f"need T={T} <= capacity={capacity}, sink + recent = {sink + recent} <= T and "
                             f"window={window} <= T")
        if not hasattr(heterogeneous, "dtype") or heterogeneous.dtype != jnp.bool_ \
                or tuple(heterogeneous.shape) != (B, Hkv):
            raise ValueError(f"heterogeneous must be a bool array [B={B}, Hkv={Hkv}], got "
                             f"{checks.describe(heterogeneous)}")
        scale = checks.check_positive_float("scale", scale)
        out, probs = reference_attention(q, k, v, causal=True, scale=scale, return_probs=True)
        attn_window = probs[:, :, T - window:].reshape(B, Hkv, H // Hkv, window, T).sum(axis=2)
        middle = min(middle, T - sink - recent)
        middles = middle_activation_indices(attn_window, middle, sink=sink, recent=recent)
        fixed = sink + middle
        # the other heads' kept positions, in slot order: sinks, middles, then the ring of the last `recent`
        ring = np.arange(T - recent, T)
        ring_order = ring[np.argsort(ring % recent)]
        kept = jnp.concatenate([jnp.broadcast_to(jnp.arange(sink, dtype=jnp.int32), (B, Hkv, sink)), middles,
                                jnp.broadcast_to(jnp.asarray(ring_order, jnp.int32), (B, Hkv, recent))], axis=-1)
        k_small, v_small = per_head_kv_compress(k, v, kept)                     # [B, Hkv, fixed + recent, D]
        pad = ((0, 0), (0, 0), (0, capacity - fixed - recent), (0, 0))
        full = ((0, 0), (0, 0), (0, capacity - T), (0, 0))
        flag = heterogeneous[:, :, None, None]
        k_cache = jnp.where(flag, jnp.pad(jnp.swapaxes(k, 1, 2), full), jnp.pad(k_small, pad))
        v_cache = jnp.where(flag, jnp.pad(jnp.swapaxes(v, 1, 2), full), jnp.pad(v_small, pad))
        lengths = jnp.where(heterogeneous, T, fixed + recent).astype(jnp.int32)
        return out, cls(k_cache, v_cache, lengths, heterogeneous, jnp.full((B,), T, jnp.int32), fixed, recent)

    def step(self, q: Float[Array, "B H D"], k_new: Float[Array, "B Hkv D"], v_new: Float[Array, "B Hkv D"], *,
             scale: float | None = None, impl: str = "auto"):
        """One decoding token: write it into every head's cache, then attend over each head's own length.

        Args:
          q: ``[B, H, D]`` the new token's queries.
          k_new: ``[B, Hkv, D]`` its key (the cache's dtype).
          v_new: ``[B, Hkv, D]`` its value.
          scale: logit scale (default ``D ** -0.5``).
          impl: ``jattn.decode_attention``'s impl.

        Returns:
          ``(out [B, H, D] in q's dtype, cache)``. Past the capacity a heterogeneous head's rows are NaN under
          ``jit``; with concrete positions it raises ``ValueError``.

        Raises:
          ValueError, TypeError: a shape or dtype is wrong, or the capacity is passed (concrete positions).
        """
        B, Hkv, capacity, D = self.k.shape
        Dv = self.v.shape[3]
        check_step_tokens(q, k_new, v_new, self.k, self.v)
        if not checks.is_traced(self.positions) and not checks.is_traced(self.heterogeneous):
            full_rows = np.any(np.asarray(self.heterogeneous), axis=1)
            if np.any(full_rows & (np.asarray(self.positions) >= capacity)):
                raise ValueError(f"a new token passes the heterogeneous heads' capacity {capacity} (positions "
                                 f"{np.asarray(self.positions).tolist()}); prefill with a larger capacity")
        H = q.shape[1]
        position = self.positions[:, None]                                      # [B, 1]
        fits = ~self.heterogeneous | (position < capacity)                       # [B, Hkv]
        slot = jnp.where(self.heterogeneous, jnp.minimum(position, capacity - 1), self.fixed + position % self.recent)
        rows, heads = jnp.arange(B)[:, None], jnp.arange(Hkv)[None, :]

        def write(buffer, new):          # one slot per (sequence, head), in place; a skipped write rewrites it
            return buffer.at[rows, heads, slot].set(jnp.where(fits[..., None], new, buffer[rows, heads, slot]))
        k_cache, v_cache = write(self.k, k_new), write(self.v, v_new)
        lengths = jnp.where(self.heterogeneous, position + 1, self.fixed + self.recent)
        lengths = jnp.where(fits, lengths, capacity + 1).astype(jnp.int32)
        # every (sequence, kv head) is its own decode sequence, with its own length
        folded = decode_attention(q.reshape(B * Hkv, H // Hkv, D), k_cache.reshape(B * Hkv, 1, capacity, D),
                                  v_cache.reshape(B * Hkv, 1, capacity, Dv), lengths.reshape(B * Hkv),
                                  scale=scale, impl=impl)
        cache = dataclasses.replace(self, k=k_cache, v=v_cache, lengths=lengths, positions=self.positions + 1)
        return folded.reshape(B, H, Dv), cache
