"""P45 — DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads.

**Streaming (Λ) attention.** Query ``i`` sees key ``j`` iff ``j <= i`` and (``j < sink`` or
``j > i - recent``): the ``sink`` first tokens plus the last ``recent`` tokens, the query's own included (the
official ``generate_streaming_mask``; ``jattn.core.masks.sink_local_mask(sink, recent)``). For a sequence of
``L <= sink + recent`` tokens it is plain causal attention.

**Training the gates.** One gate ``alpha[l, g]`` per layer and kv head, initialised to 1. The batch runs twice
through the frozen model: once with full attention, once with every query head ``h`` of kv group ``g`` mixed as

    o_h = alpha_g * full_h + (1 - alpha_g) * streaming_h                               (mixed_duo_attention)

and the loss on the final hidden states of the supervised (passkey-answer) tokens is

    sum over labels of ||h_full - h_mixed||^2 / d  /  #labels  +  lam * mean |alpha|   (duo_distillation_loss)

Only ``alpha`` trains (AdamW, lr 0.02, no weight decay), clamped to ``[0, 1]`` after every step
(``train/duo_gates.py``).

**Deployment.** Kv head ``g`` is a retrieval head iff ``alpha_g >= threshold`` (0.5), or, given a target
``sparsity``, all but the ``ceil(sparsity * (n - 1))`` lowest gates (``sparsify_heads``). Retrieval heads keep
full attention and the full KV cache; streaming heads run Λ attention and keep a constant ``sink + recent``
ring cache (``DuoKVCache``).

Follows mit-han-lab/duo-attention: ``duo_attn/patch/streaming_attn.py`` (the mask),
``duo_attn/patch/llama.py`` (``llama_duo_attention_forward_two_way``: the mixing, per kv head expanded to its
query heads), ``duo_attn/train.py`` (the loss, the clamp, ``AdamW(weight_decay=0)``), ``duo_attn/loss.py``
(``mean |alpha|`` over every layer's gates) and ``duo_attn/utils.py`` (``sparsify_attention_heads``).
Choices and quirks:

* The official training's default streaming kernel (``streaming_attn_implementation="blocksparse"``,
  ``block_streaming_attn_func``) rounds ``sink`` and ``recent`` up to whole 128-token blocks (a tile-granular Λ);
  its ``"sdpa"`` path uses the token-exact ``generate_streaming_mask``. Here the mask is token-exact (the
  ``BlockMask``'s partial tiles apply the mask function), so the block size never changes the result.
* The official forward also clamps ``alpha`` to ``[0, 1]`` inside the mix; here the mix is linear in ``alpha``
  (the clamp after each step keeps it in ``[0, 1]``), so ``mixed_duo_attention`` is exact for any alpha.
* ``sparsify_attention_heads`` breaks ties with uniform noise in ``[0, 1e-6)`` (not reproducible) and
  thresholds at ``np.quantile(alpha, sparsity)``; with distinct gates that makes the
  ``ceil(sparsity * (n - 1))`` lowest gates streaming, which is what ``sparsify_heads`` does, ties broken by
  flat index (lower index first) instead of noise. The official function also raises ``TypeError`` when
  only ``threshold`` is given (it compares ``None >= 1``); here the threshold mode works.
* The official deployment prefills the whole prompt with full attention in every head and lets a streaming
  head's decode step see ``sink + recent`` cached tokens plus itself (one recent key more than its training
  mask). Here a streaming head uses the training Λ mask in prefill and in decode, so prefill followed by any
  number of decode steps equals ``duo_attention`` over the whole sequence, and the ring holds exactly
  ``sink + recent`` keys, the new token's included.
* Kernels: streaming heads run on the block-sparse kernel (``jattn.block_sparse_attention`` over the Λ
  ``BlockMask``: sink column tiles plus the diagonal band); retrieval heads on ``jattn.attention`` (flash);
  decode on ``jattn.decode_attention`` over the full cache and over the ring (keys in the ring carry their
  RoPE already, so their order there does not matter). The Pallas decode kernel needs cache lengths a power
  of two >= 16 divides (the official 64 + 256 and powers of two do); otherwise pass ``impl="xla"``.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from jattn.core import checks, masks
from jattn.core.block_mask import BlockMask
from jattn.ops.attention import attention
from jattn.ops.block_sparse import block_sparse_attention
from jattn.ops.decode import decode_attention

DEFAULT_BLOCK = 64
DEFAULT_THRESHOLD = 0.5


# ------------------------------------------------------------------------------------------ validation

def _window(sink, recent) -> tuple[int, int]:
    return checks.check_int("sink", sink, 0), checks.check_int("recent", recent, 1)


def _block(name: str, value) -> int:
    return DEFAULT_BLOCK if value is None else checks.check_block_size(name, value, minimum=16)


def _concrete_flags(is_retrieval, kv_heads: int) -> tuple[bool, ...] | None:
    """``is_retrieval`` as a tuple of Python bools, or None when it is traced; checks its length and dtype."""
    if isinstance(is_retrieval, (tuple, list)):
        flags = tuple(is_retrieval)
        if not all(isinstance(f, (bool, np.bool_)) for f in flags):
            raise TypeError(f"is_retrieval must hold bools (one per kv head), got {is_retrieval!r}")
    else:
        if not hasattr(is_retrieval, "dtype") or is_retrieval.dtype != jnp.bool_:
            raise TypeError(f"is_retrieval must be a bool array [Hkv] or a tuple of bools, got "
                            f"{checks.describe(is_retrieval)}")
        if checks.is_traced(is_retrieval):
            if tuple(is_retrieval.shape) != (kv_heads,):
                raise ValueError(f"is_retrieval must have shape [Hkv] = ({kv_heads},), got "
                                 f"{checks.describe(is_retrieval)}")
            return None
        flags = tuple(np.asarray(is_retrieval).reshape(-1)) if np.ndim(is_retrieval) == 1 else ()
    if len(flags) != kv_heads:
        raise ValueError(f"is_retrieval must have one entry per kv head (Hkv={kv_heads}), got "
                         f"{checks.describe(is_retrieval) if hasattr(is_retrieval, 'shape') else is_retrieval!r}")
    return tuple(bool(f) for f in flags)


# ------------------------------------------------------------------------------------------ masks

@functools.lru_cache(maxsize=None)
def _streaming_mask_fn(sink: int, recent: int):
    return masks.sink_local_mask(sink, recent)


def streaming_mask_fn(sink: int, recent: int):
    """The Λ mask function ``mask_fn(b, h, q_idx, kv_idx)``: causal, and ``kv < sink`` or ``kv > q - recent``.

    Args:
      sink: leading tokens every query sees (>= 0).
      recent: most recent tokens each query sees, its own included (>= 1).

    Returns:
      the mask function (``jattn.core.masks.sink_local_mask(sink, recent)``), one object per ``(sink, recent)``
      so BlockMasks and compiled programs built from it are shared.
    """
    return _streaming_mask_fn(*_window(sink, recent))


def streaming_mask(L: int, sink: int, recent: int) -> Bool[Array, "L L"]:
    """The dense Λ mask, as the official ``generate_streaming_mask``.

    Args:
      L: sequence length.
      sink: leading tokens every query sees (>= 0).
      recent: most recent tokens each query sees, its own included (>= 1).

    Returns:
      ``[L, L]`` bool, True = attend.
    """
    L = checks.check_int("L", L)
    return masks.materialize(streaming_mask_fn(sink, recent), 1, 1, L, L)[0, 0]


def streaming_block_mask(L: int, sink: int, recent: int, *, block_q: int | None = None,
                         block_k: int | None = None) -> BlockMask:
    """The Λ ``BlockMask`` for the block-sparse kernel: per query block, the sink column tiles and the diagonal
    band of ``recent`` keys.

    Args:
      L: sequence length (queries and keys).
      sink: leading tokens every query sees (>= 0).
      recent: most recent tokens each query sees, its own included (>= 1).
      block_q: query tile (power of two >= 16; default 64).
      block_k: key tile (power of two >= 16; default 64).

    Returns:
      a ``BlockMask`` ``[1, 1, nQ, nK]`` (shared by every batch row and head) carrying ``streaming_mask_fn``.
    """
    L = checks.check_int("L", L)
    fn = streaming_mask_fn(sink, recent)
    bq, bk = _block("block_q", block_q), _block("block_k", block_k)
    with jax.ensure_compile_time_eval():       # static pattern: concrete tables even under jit
        return BlockMask.from_mask_fn(fn, 1, 1, L, L, bq, bk)


# ------------------------------------------------------------------------------------------ attention

def streaming_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"], *,
                        sink: int, recent: int, block_q: int | None = None, block_k: int | None = None,
                        scale: float | None = None, impl: str = "auto"):
    """Λ (sink + recent) causal attention on the block-sparse kernel: ``[B, T, H, D]`` out.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]`` (H a multiple of Hkv).
      v: ``[B, T, Hkv, D]``.
      sink: leading tokens every query sees (>= 0).
      recent: most recent tokens each query sees, its own included (>= 1).
      block_q: query tile (power of two >= 16; default 64).
      block_k: key tile (power of two >= 16; default 64).
      scale: logit scale (default ``D ** -0.5``).
      impl: "auto" | "xla" | "pallas" | "reference".

    Returns:
      ``[B, T, H, D]`` in q's dtype.

    Raises:
      TypeError, ValueError: a shape, dtype or size is wrong (named).
    """
    B, T, H, Hkv, D = checks.check_self_attention_qkv(q, k, v, "streaming_attention")
    block_mask = streaming_block_mask(T, sink, recent, block_q=block_q, block_k=block_k)
    return block_sparse_attention(q, k, v, block_mask, scale=scale, impl=impl)


def _full_attention(q, k, v, scale, impl):
    return attention(q, k, v, causal=True, scale=scale, impl=impl)


def _per_query_head(x, group: int):
    """``[..., Hkv]`` -> ``[1, 1, H, 1]``: each kv head's value for its query heads."""
    return jnp.repeat(x, group)[None, None, :, None]


def mixed_duo_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"],
                        alpha: Float[Array, "Hkv"], *, sink: int, recent: int, block_q: int | None = None,
                        block_k: int | None = None, scale: float | None = None, impl: str = "auto"):
    """DuoAttention's training forward: ``alpha * full + (1 - alpha) * streaming`` per kv head (differentiable
    in q, k, v and alpha).

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      v: ``[B, T, Hkv, D]``.
      alpha: ``[Hkv]`` float gates (1 = full attention, 0 = streaming), shared by a kv head's query heads.
      sink: sink tokens of the streaming branch (>= 0).
      recent: recent tokens of the streaming branch, the query's own included (>= 1).
      block_q: the streaming branch's query tile (default 64).
      block_k: its key tile (default 64).
      scale: logit scale (default ``D ** -0.5``).
      impl: "auto" | "xla" | "pallas" | "reference" for both branches.

    Returns:
      ``[B, T, H, D]`` in q's dtype (mixed in float32).

    Raises:
      TypeError, ValueError: a shape, dtype or size is wrong (named).
    """
    B, T, H, Hkv, D = checks.check_self_attention_qkv(q, k, v, "mixed_duo_attention")
    checks.check_float_array("alpha", alpha, 1)
    if alpha.shape[0] != Hkv:
        raise ValueError(f"alpha must be [Hkv] = ({Hkv},), one gate per kv head, got {checks.describe(alpha)}")
    full = _full_attention(q, k, v, scale, impl).astype(jnp.float32)
    streaming = streaming_attention(q, k, v, sink=sink, recent=recent, block_q=block_q, block_k=block_k,
                                    scale=scale, impl=impl).astype(jnp.float32)
    gate = _per_query_head(alpha.astype(jnp.float32), H // Hkv)
    return (gate * full + (1.0 - gate) * streaming).astype(q.dtype)


def _select_kv_heads(x, heads: tuple[int, ...], group: int):
    """Query-side ``[B, T, H, D]`` (``group`` heads per kv head) or kv-side (``group=1``) heads of ``heads``."""
    B, T, H, D = x.shape
    return x.reshape(B, T, H // group, group, D)[:, :, list(heads)].reshape(B, T, len(heads) * group, D)


def _merge_kv_heads(parts, order: tuple[int, ...], group: int):
    """Inverse of ``_select_kv_heads``: ``parts`` hold the kv heads ``order`` (concatenated) -> head order."""
    x = jnp.concatenate(parts, axis=2)
    B, T, _, D = x.shape
    x = x.reshape(B, T, len(order), group, D)[:, :, list(np.argsort(order))]
    return x.reshape(B, T, len(order) * group, D)


def duo_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"],
                  is_retrieval, *, sink: int, recent: int, block_q: int | None = None, block_k: int | None = None,
                  scale: float | None = None, impl: str = "auto"):
    """DuoAttention's deployment attention: full causal attention in retrieval heads, Λ attention in the others.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      v: ``[B, T, Hkv, D]``.
      is_retrieval: ``[Hkv]`` bool (an array or a tuple of bools): True = retrieval (full) head. A concrete
        value splits the heads between the flash kernel and the block-sparse kernel (each head computed once);
        a traced one computes both per head and selects.
      sink: sink tokens of the streaming heads (>= 0).
      recent: recent tokens of the streaming heads, the query's own included (>= 1).
      block_q: the streaming heads' query tile (default 64).
      block_k: their key tile (default 64).
      scale: logit scale (default ``D ** -0.5``).
      impl: "auto" | "xla" | "pallas" | "reference".

    Returns:
      ``[B, T, H, D]`` in q's dtype.

    Raises:
      TypeError, ValueError: a shape, dtype or size is wrong (named).
    """
    B, T, H, Hkv, D = checks.check_self_attention_qkv(q, k, v, "duo_attention")
    _window(sink, recent)
    flags = _concrete_flags(is_retrieval, Hkv)
    G = H // Hkv
    streaming_kwargs = dict(sink=sink, recent=recent, block_q=block_q, block_k=block_k, scale=scale, impl=impl)
    if flags is None:
        gate = _per_query_head(is_retrieval, G)
        return jnp.where(gate, _full_attention(q, k, v, scale, impl), streaming_attention(q, k, v, **streaming_kwargs))
    full_heads = tuple(g for g in range(Hkv) if flags[g])
    streaming_heads = tuple(g for g in range(Hkv) if not flags[g])
    parts = []
    if full_heads:
        parts.append(_full_attention(_select_kv_heads(q, full_heads, G), _select_kv_heads(k, full_heads, 1),
                                     _select_kv_heads(v, full_heads, 1), scale, impl))
    if streaming_heads:
        parts.append(streaming_attention(_select_kv_heads(q, streaming_heads, G),
                                         _select_kv_heads(k, streaming_heads, 1),
                                         _select_kv_heads(v, streaming_heads, 1), **streaming_kwargs))
    return _merge_kv_heads(parts, full_heads + streaming_heads, G)


# ------------------------------------------------------------------------------------------ head selection

def sparsify_heads(alpha: Float[Array, "..."], *, sparsity: float | None = None,
                   threshold: float = DEFAULT_THRESHOLD) -> Bool[Array, "..."]:
    """Which heads are retrieval heads, from trained gates.

    Args:
      alpha: gates of any shape (e.g. ``[layers, Hkv]``); with ``sparsity`` the ranking spans all of them.
      sparsity: target fraction of streaming heads in ``[0, 1]``: the ``ceil(sparsity * (n - 1))`` lowest
        gates become streaming (``n = alpha.size``; 0 keeps every head, 1 none), ties broken by flat index.
        None: use ``threshold``.
      threshold: without ``sparsity``, retrieval iff ``alpha >= threshold``.

    Returns:
      bool array of alpha's shape, True = retrieval head.

    Raises:
      TypeError, ValueError: ``alpha`` is not a float array, or ``sparsity``/``threshold`` is out of range.
    """
    checks.check_float_array("alpha", alpha)
    if sparsity is None:
        return alpha >= checks.check_finite_float("threshold", threshold)
    sparsity = checks.check_float_in("sparsity", sparsity, 0.0, 1.0)
    n = math.prod(alpha.shape)
    streaming = n if sparsity >= 1.0 else min(n, math.ceil(sparsity * (n - 1)))
    order = jnp.argsort(jnp.ravel(alpha), stable=True)
    rank = jnp.argsort(order, stable=True)
    return (rank >= streaming).reshape(alpha.shape)


def duo_distillation_loss(hidden_full: Float[Array, "B T d"], hidden_mixed: Float[Array, "B T d"],
                          label_mask: Bool[Array, "B T"], alpha, lam: float):
    """DuoAttention's gate loss: ``sum_labels ||h_full - h_mixed||^2 / d / #labels + lam * mean|alpha|``.

    Args:
      hidden_full: ``[B, T, d]`` final hidden states with full attention (the target).
      hidden_mixed: ``[B, T, d]`` final hidden states with the mixed attention.
      label_mask: ``[B, T]`` bool (or 0/1) marking the supervised tokens.
      alpha: the gates: one array or a sequence of arrays (e.g. one per layer); ``mean |alpha|`` is over all.
      lam: the L1 weight (>= 0; the paper uses 0.05).

    Returns:
      the scalar float32 loss (0 labels count as 1: only the L1 term remains).

    Raises:
      TypeError, ValueError: a shape or dtype is wrong, or ``lam < 0`` (named).
    """
    checks.check_float_array("hidden_full", hidden_full, 3)
    checks.check_float_array("hidden_mixed", hidden_mixed, 3)
    if hidden_mixed.shape != hidden_full.shape:
        raise ValueError(f"hidden_mixed must have hidden_full's shape {tuple(hidden_full.shape)}, got "
                         f"{checks.describe(hidden_mixed)}")
    if not hasattr(label_mask, "shape") or tuple(label_mask.shape) != tuple(hidden_full.shape[:2]):
        raise ValueError(f"label_mask must be [B, T] = {tuple(hidden_full.shape[:2])}, got "
                         f"{checks.describe(label_mask)}")
    if not checks.is_traced(lam) and checks.check_finite_float("lam", lam) < 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    gates = jax.tree_util.tree_leaves(alpha)
    if not gates:
        raise ValueError("alpha must hold at least one gate array")
    for gate in gates:
        checks.check_float_array("alpha", gate)
    labels = label_mask.astype(jnp.float32)
    diff = hidden_full.astype(jnp.float32) - hidden_mixed.astype(jnp.float32)
    distill = jnp.sum(jnp.mean(jnp.square(diff), axis=-1) * labels) / jnp.maximum(jnp.sum(labels), 1.0)
    l1 = jnp.mean(jnp.abs(jnp.concatenate([jnp.ravel(g).astype(jnp.float32) for g in gates])))
    return distill + lam * l1


# ------------------------------------------------------------------------------------------ KV cache

def duo_kv_bytes(seq_len: int, *, num_retrieval: int, num_streaming: int, sink: int, recent: int, head_dim: int,
                 itemsize: int = 2, batch: int = 1) -> int:
    """Bytes of one layer's ``DuoKVCache`` holding ``seq_len`` tokens (divide by ``seq_len`` for bytes per token):

        batch * itemsize * 2 * head_dim * (num_retrieval * seq_len + num_streaming * (sink + recent))

    Args:
      seq_len: tokens a retrieval head stores (the cache's capacity).
      num_retrieval: retrieval (full-cache) kv heads.
      num_streaming: streaming kv heads: a ring of ``sink + recent`` slots each, whatever the length.
      sink: sink slots per streaming head.
      recent: recent slots per streaming head.
      head_dim: ``D`` of keys and of values.
      itemsize: bytes per element (2 for bf16/fp16).
      batch: sequences.

    Returns:
      the bytes of K and V, as an int.
    """
    seq_len = checks.check_int("seq_len", seq_len)
    sink, recent = _window(sink, recent)
    num_retrieval, num_streaming = checks.check_int("num_retrieval", num_retrieval, 0), \
        checks.check_int("num_streaming", num_streaming, 0)
    head_dim = checks.check_int("head_dim", head_dim)
    per_slot = checks.check_int("batch", batch) * checks.check_int("itemsize", itemsize) * 2 * head_dim   # K and V
    return per_slot * (num_retrieval * seq_len + num_streaming * (sink + recent))


def ring_slot(position, sink: int, recent: int):
    """A streaming head's ring slot for a token.

    Args:
      position: int array of token positions.
      sink: sink slots.
      recent: recent slots.

    Returns:
      ``position`` below ``sink``, else ``sink + (position - sink) % recent``.
    """
    return jnp.where(position < sink, position, sink + (position - sink) % recent)


def _ring_positions(T: int, sink: int, recent: int) -> np.ndarray:
    """The position each ring slot holds after ``T`` tokens (-1 = empty): the sinks and the last ``recent``."""
    held = np.full(sink + recent, -1, np.int64)
    for p in range(T):
        if p < sink or p >= T - recent:
            held[p if p < sink else sink + (p - sink) % recent] = p
    return held


def _check_token(name: str, x, B: int, heads: int, dim: int, dtype):
    checks.check_float_array(name, x, 3)
    if x.shape != (B, heads, dim):
        raise ValueError(f"{name} must be [B={B}, {heads}, {dim}], got {checks.describe(x)}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must have the cache's dtype {dtype}, got {checks.describe(x)}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DuoKVCache:
    """One layer's DuoAttention cache: retrieval kv heads keep every token, streaming kv heads a ring of
    ``sink + recent`` slots (slot of position ``p``: ``p`` if ``p < sink``, else ``sink + (p - sink) % recent``)."""
    full_k: jax.Array       # [B, H_retrieval, capacity, D]
    full_v: jax.Array       # [B, H_retrieval, capacity, D]
    ring_k: jax.Array       # [B, H_streaming, sink + recent, D]
    ring_v: jax.Array       # [B, H_streaming, sink + recent, D]
    lengths: jax.Array      # [B] int32 tokens seen (capacity + 1 once a retrieval cache overflowed under jit)
    retrieval_heads: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    streaming_heads: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    sink: int = dataclasses.field(default=0, metadata=dict(static=True))
    recent: int = dataclasses.field(default=1, metadata=dict(static=True))

    @classmethod
    def create(cls, batch: int, is_retrieval, capacity: int, head_dim: int, *, sink: int, recent: int,
               dtype=jnp.float32) -> "DuoKVCache":
        """An empty cache.

        Args:
          batch: sequences.
          is_retrieval: ``[Hkv]`` concrete bools (array or tuple): which kv heads keep the full cache.
          capacity: tokens a retrieval head can hold.
          head_dim: key dim ``D``.
          sink: sink slots of a streaming head (>= 0).
          recent: recent slots of a streaming head (>= 1).
          dtype: K/V dtype.

        Returns:
          the ``DuoKVCache``.

        Raises:
          TypeError, ValueError: a size is wrong, or ``is_retrieval`` is traced or has the wrong length.
        """
        for name, value in (("batch", batch), ("capacity", capacity), ("head_dim", head_dim)):
            checks.check_int(name, value)
        sink, recent = _window(sink, recent)
        kv_heads = len(is_retrieval) if isinstance(is_retrieval, (tuple, list)) else int(np.size(is_retrieval))
        flags = _concrete_flags(is_retrieval, kv_heads)
        if flags is None:
            raise TypeError("is_retrieval must be concrete for DuoKVCache.create (it fixes the cache's layout)")
        full = tuple(g for g in range(kv_heads) if flags[g])
        streaming = tuple(g for g in range(kv_heads) if not flags[g])
        ring = sink + recent
        return cls(jnp.zeros((batch, len(full), capacity, head_dim), dtype),
                   jnp.zeros((batch, len(full), capacity, head_dim), dtype),
                   jnp.zeros((batch, len(streaming), ring, head_dim), dtype),
                   jnp.zeros((batch, len(streaming), ring, head_dim), dtype),
                   jnp.zeros((batch,), jnp.int32), full, streaming, sink, recent)

    @property
    def kv_heads(self) -> int:
        return len(self.retrieval_heads) + len(self.streaming_heads)

    @property
    def capacity(self) -> int:
        return self.full_k.shape[2]

    @property
    def dtype(self):
        return self.full_k.dtype

    @property
    def is_retrieval(self) -> tuple[bool, ...]:
        return tuple(g in self.retrieval_heads for g in range(self.kv_heads))

    @property
    def nbytes(self) -> int:
        """Bytes of the stored K/V buffers."""
        return sum(int(x.nbytes) for x in (self.full_k, self.full_v, self.ring_k, self.ring_v))

    def prefill(self, q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"], *,
                block_q: int | None = None, block_k: int | None = None, scale: float | None = None,
                impl: str = "auto"):
        """``duo_attention`` over a prompt written into this empty cache.

        Args:
          q: ``[B, T, H, D]`` the prompt's queries.
          k: ``[B, T, Hkv, D]`` its keys (the cache's dtype).
          v: ``[B, T, Hkv, D]`` its values.
          block_q: the streaming heads' query tile (default 64).
          block_k: their key tile (default 64).
          scale: logit scale (default ``D ** -0.5``).
          impl: "auto" | "xla" | "pallas" | "reference".

        Returns:
          ``(out [B, T, H, D], cache)``: retrieval heads hold the ``T`` tokens, streaming heads the sinks and
          the last ``recent``.

        Raises:
          ValueError: the cache is not empty (concrete lengths), ``T`` passes the capacity, or a shape is wrong.
          TypeError: a dtype is wrong.
        """
        B, T, H, Hkv, D = checks.check_self_attention_qkv(q, k, v, "DuoKVCache.prefill")
        if Hkv != self.kv_heads or B != self.lengths.shape[0] or D != self.full_k.shape[3]:
            raise ValueError(f"k must be [B={self.lengths.shape[0]}, T, Hkv={self.kv_heads}, D={self.full_k.shape[3]}] "
                             f"for this cache, got {checks.describe(k)}")
        if k.dtype != self.full_k.dtype or v.dtype != self.full_k.dtype:
            raise TypeError(f"k and v must have the cache's dtype {self.full_k.dtype}, got {checks.describe(k)}, "
                            f"{checks.describe(v)}")
        if self.retrieval_heads and T > self.capacity:
            raise ValueError(f"the prompt's T={T} tokens pass the cache's capacity {self.capacity}")
        if not checks.is_traced(self.lengths) and np.any(np.asarray(self.lengths) != 0):
            raise ValueError(f"prefill needs an empty cache, got lengths {np.asarray(self.lengths).tolist()}")
        out = duo_attention(q, k, v, self.is_retrieval, sink=self.sink, recent=self.recent, block_q=block_q,
                            block_k=block_k, scale=scale, impl=impl)
        kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)             # head-major [B, Hkv, T, D]
        full, streaming = list(self.retrieval_heads), list(self.streaming_heads)
        full_k = self.full_k.at[:, :, :T].set(kh[:, full])
        full_v = self.full_v.at[:, :, :T].set(vh[:, full])
        held = _ring_positions(T, self.sink, self.recent)
        taken = np.maximum(held, 0)
        occupied = jnp.asarray(held >= 0)[None, None, :, None]
        ring_k = jnp.where(occupied, kh[:, streaming][:, :, taken], self.ring_k)
        ring_v = jnp.where(occupied, vh[:, streaming][:, :, taken], self.ring_v)
        cache = dataclasses.replace(self, full_k=full_k, full_v=full_v, ring_k=ring_k, ring_v=ring_v,
                                    lengths=jnp.full_like(self.lengths, T))
        return out, cache

    def step(self, q: Float[Array, "B H D"], k_new: Float[Array, "B Hkv D"], v_new: Float[Array, "B Hkv D"], *,
             scale: float | None = None, impl: str = "auto"):
        """One decoding token: write ``k_new, v_new``, then attend (retrieval heads over every token, streaming
        heads over the ring: the sinks and the last ``recent`` tokens, the new one included).

        Args:
          q: ``[B, H, D]`` the new token's queries.
          k_new: ``[B, Hkv, D]`` its key (the cache's dtype).
          v_new: ``[B, Hkv, D]`` its value.
          scale: logit scale (default ``D ** -0.5``).
          impl: ``jattn.decode_attention``'s impl.

        Returns:
          ``(out [B, H, D] in q's dtype, cache)``. Under ``jit`` a sequence past a retrieval head's capacity
          gets NaN rows (never a silent overwrite); with concrete lengths it raises ``ValueError``.

        Raises:
          ValueError, TypeError: a shape or dtype is wrong, or the capacity is passed (concrete lengths).
        """
        B = self.lengths.shape[0]
        Hkv, D, Dv = self.kv_heads, self.full_k.shape[3], self.full_v.shape[3]
        checks.check_float_array("q", q, 3)
        if q.shape[0] != B or q.shape[2] != D or q.shape[1] % Hkv:
            raise ValueError(f"q must be [B={B}, H (a multiple of Hkv={Hkv}), D={D}], got {checks.describe(q)}")
        _check_token("k_new", k_new, B, Hkv, D, self.full_k.dtype)
        _check_token("v_new", v_new, B, Hkv, Dv, self.full_v.dtype)
        if self.retrieval_heads and not checks.is_traced(self.lengths) \
                and np.any(np.asarray(self.lengths) >= self.capacity):
            raise ValueError(f"a new token passes the retrieval heads' capacity {self.capacity} "
                             f"(lengths {np.asarray(self.lengths).tolist()}); create the cache with a larger capacity")
        H = q.shape[1]
        G = H // Hkv
        position = self.lengths
        fits = (position < self.capacity) if self.retrieval_heads else jnp.ones_like(position, bool)
        rows = jnp.arange(B)
        full, streaming = list(self.retrieval_heads), list(self.streaming_heads)
        at = jnp.minimum(position, max(self.capacity - 1, 0))

        def write(buffer, new, slot):
            old = buffer[rows, :, slot]                                        # [B, heads, D]
            return buffer.at[rows, :, slot].set(jnp.where(fits[:, None, None], new, old))

        cache = self
        if full:
            cache = dataclasses.replace(cache, full_k=write(self.full_k, k_new[:, full], at),
                                        full_v=write(self.full_v, v_new[:, full], at))
        ring = self.sink + self.recent
        if streaming:
            slot = ring_slot(position, self.sink, self.recent)
            cache = dataclasses.replace(cache, ring_k=write(self.ring_k, k_new[:, streaming], slot),
                                        ring_v=write(self.ring_v, v_new[:, streaming], slot))
        lengths = jnp.where(fits, position + 1, self.capacity + 1).astype(jnp.int32)
        cache = dataclasses.replace(cache, lengths=lengths)
        grouped = q.reshape(B, Hkv, G, D)
        parts = []
        if full:
            parts.append(decode_attention(grouped[:, full].reshape(B, len(full) * G, D), cache.full_k, cache.full_v,
                                          lengths, scale=scale, impl=impl))
        if streaming:
            ring_lengths = jnp.where(fits, jnp.minimum(position + 1, ring), ring + 1).astype(jnp.int32)
            parts.append(decode_attention(grouped[:, streaming].reshape(B, len(streaming) * G, D), cache.ring_k,
                                          cache.ring_v, ring_lengths, scale=scale, impl=impl))
        out = _merge_kv_heads([p[:, None] for p in parts], tuple(full) + tuple(streaming), G)[:, 0]
        return out, cache
