"""P70 — SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context Large Language Models.

**S²-Attn** (LongLoRA's shifted sparse attention, as in the official ``llama_attn_replace.py``
``forward_noflashattn``). Group size ``G`` (default ``int(N * 1/4)``), shift ``s = G // 2``. Heads
``h >= H // 2`` roll q, k, v along the sequence by ``-s`` (``torch.roll``: rolled slot ``t`` holds token
``(t + s) mod N``); every head runs causal attention inside consecutive groups of ``G`` slots; the shifted
heads' outputs are rolled back by ``+s``. In original positions, with ``s_h = s if h >= H // 2 else 0``::

    t_h(i) = (i - s_h) mod N
    allowed_S2(h, i, j) = t_h(i) // G == t_h(j) // G  and  t_h(j) <= t_h(i)

The last group of a shifted head wraps around (for ``N`` a multiple of ``G`` it holds the last ``G - s``
tokens followed by the first ``s``), so the first ``s`` queries see the end of the sequence: S²-Attn is
not causal in original positions.

**SF-Attn** (paper; not in the public code, so from the spec): "segmentation and reassembly" puts the
wrapped segment back in place, so a shifted head's groups are cut at ``s, s + G, s + 2G, ...`` without
wrapping (segments ``[0, s), [s, s + G), ..., [.., N)``); and the first ``n_sink`` tokens (default 4) are
"sink attention tokens" every query sees::

    g_h(i) = (i + G - s_h) // G
    allowed_SF(h, i, j) = j <= i  and  (g_h(i) == g_h(j)  or  j < n_sink)

(LongLoRA's flash-attention path already partitions shifted heads this way, by cumulative lengths.)

Implementation: ``shifted_sparse_attention`` (S²-Attn; named after LongLoRA's "shifted sparse attention"
so it stays distinct from P15's ``s2_*``) rolls q, k, v and runs the one block-diagonal causal
``BlockMask`` shared by all heads on the block-sparse kernel (k, v are repeated to the query heads when a
GQA group straddles the shifted/unshifted boundary), then rolls back. ``sf_attention`` runs the per-head
mask above directly (diagonal group tiles plus the sink column tiles). Every mask function is pure index
arithmetic, so the Pallas kernel evaluates it in-kernel. Lengths need not be multiples of ``G`` (the
last group is shorter; the official code requires ``N % G == 0``). The official code rolls by ``-G // 2``
and back by ``G // 2``, which disagree by one for odd ``G``; here both use ``s = G // 2``.

The H2O KV-cache eviction SinkLoRA uses at inference is ``jattn.methods.kv.h2o``; the fine-tuning recipe is
not implemented.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jattn.core import checks, masks
from jattn.core.block_mask import BlockMask
from jattn.ops.block_sparse import block_sparse_attention

DEFAULT_BLOCK = 64
DEFAULT_GROUP_RATIO = 0.25
DEFAULT_NUM_SINKS = 4


# ------------------------------------------------------------------------------------------ validation

def _block(name: str, value) -> int:
    return DEFAULT_BLOCK if value is None else checks.check_block_size(name, value, minimum=16)


def shifted_group_size(seq_len: int, group_ratio: float = DEFAULT_GROUP_RATIO) -> int:
    """``G = int(seq_len * group_ratio)`` as in LongLoRA (``group_size_ratio = 1/4``), at least 1."""
    seq_len = checks.check_int("seq_len", seq_len, 1)
    ratio = checks.check_float_in("group_ratio", group_ratio, 0, 1, low_open=True)
    return max(1, int(seq_len * ratio))


def _group(seq_len: int, group_size) -> int:
    group_size = checks.check_int("group_size", group_size, 1)
    if group_size > seq_len:
        raise ValueError(f"group_size must be <= the sequence length {seq_len}, got {group_size}")
    return group_size


def _resolve_group(seq_len: int, group_size, group_ratio) -> int:
    return shifted_group_size(seq_len, group_ratio) if group_size is None else _group(seq_len, group_size)


# ------------------------------------------------------------------------------------------ masks

@dataclasses.dataclass(frozen=True)
class ShiftedSparseMaskFn:
    """S²-Attn in original positions (roll semantics, wrap-around included); hashable."""
    seq_len: int
    num_heads: int
    group_size: int

    def __call__(self, b, h, q_idx, kv_idx):
        shift = jnp.where(h >= self.num_heads // 2, self.group_size // 2, 0)
        # Adding seq_len keeps the operands of % non-negative (the kernel's ints are int32).
        t_q = (q_idx - shift + self.seq_len) % self.seq_len
        t_k = (kv_idx - shift + self.seq_len) % self.seq_len
        return (t_q // self.group_size == t_k // self.group_size) & (t_k <= t_q)


@dataclasses.dataclass(frozen=True)
class SFMaskFn:
    """SF-Attn: causal, inside the head's (possibly shifted, non-wrapped) group, or a sink key; hashable."""
    num_heads: int
    group_size: int
    num_sinks: int

    def __call__(self, b, h, q_idx, kv_idx):
        G = self.group_size
        shift = jnp.where(h >= self.num_heads // 2, G // 2, 0)
        same_group = (q_idx + G - shift) // G == (kv_idx + G - shift) // G
        return (kv_idx <= q_idx) & (same_group | (kv_idx < self.num_sinks))


def shifted_sparse_mask_fn(seq_len: int, num_heads: int, group_size: int) -> ShiftedSparseMaskFn:
    """Mask function of S²-Attn on original positions (``h`` is the query head)."""
    seq_len = checks.check_int("seq_len", seq_len, 1)
    return ShiftedSparseMaskFn(seq_len, checks.check_int("num_heads", num_heads, 1), _group(seq_len, group_size))


def sf_mask_fn(num_heads: int, group_size: int, num_sinks: int = DEFAULT_NUM_SINKS) -> SFMaskFn:
    """Mask function of SF-Attn (``h`` is the query head)."""
    return SFMaskFn(checks.check_int("num_heads", num_heads, 1), checks.check_int("group_size", group_size, 1),
                    checks.check_int("num_sinks", num_sinks, 0))


def shifted_sparse_attention_mask(seq_len: int, num_heads: int, group_size: int):
    """Dense bool ``[H, N, N]`` S²-Attn mask in original positions."""
    return masks.materialize(shifted_sparse_mask_fn(seq_len, num_heads, group_size), 1, num_heads, seq_len, seq_len)[0]


def sf_attention_mask(seq_len: int, num_heads: int, group_size: int, num_sinks: int = DEFAULT_NUM_SINKS):
    """Dense bool ``[H, N, N]`` SF-Attn mask."""
    seq_len = checks.check_int("seq_len", seq_len, 1)
    fn = sf_mask_fn(num_heads, _group(seq_len, group_size), num_sinks)
    return masks.materialize(fn, 1, num_heads, seq_len, seq_len)[0]


def _tiles(mask_fn, H: int, seq_len: int, block_q, block_k) -> BlockMask:
    bq, bk = _block("block_q", block_q), _block("block_k", block_k)
    # Static pattern: build the tables eagerly even under jit, so they keep their true (narrow) widths.
    with jax.ensure_compile_time_eval():
        return BlockMask.from_mask_fn(mask_fn, 1, H, seq_len, seq_len, bq, bk)


def shifted_sparse_block_mask(seq_len: int, num_heads: int, group_size: int, *, block_q: int | None = None,
                              block_k: int | None = None) -> BlockMask:
    """Per-head ``BlockMask`` ``[1, H, nQ, nK]`` of the S²-Attn mask in original positions (use it with
    ``mask_fn=shifted_sparse_mask_fn(...)``; ``shifted_sparse_attention`` itself rolls and uses
    ``group_causal_block_mask``)."""
    fn = shifted_sparse_mask_fn(seq_len, num_heads, group_size)
    return _tiles(fn, fn.num_heads, fn.seq_len, block_q, block_k)


def sf_block_mask(seq_len: int, num_heads: int, group_size: int, num_sinks: int = DEFAULT_NUM_SINKS, *,
                  block_q: int | None = None, block_k: int | None = None) -> BlockMask:
    """Per-head ``BlockMask`` of SF-Attn: the diagonal group tiles plus the sink column tiles."""
    seq_len = checks.check_int("seq_len", seq_len, 1)
    fn = sf_mask_fn(num_heads, _group(seq_len, group_size), num_sinks)
    return _tiles(fn, fn.num_heads, seq_len, block_q, block_k)


@functools.lru_cache(maxsize=None)
def group_causal_mask_fn(group_size: int):
    """Causal attention inside consecutive groups of ``group_size`` positions (the rolled-space mask).

    Cached per size so repeated calls share one mask function (and its compiled tile map)."""
    return masks.and_masks(masks.causal_mask(), masks.chunked_mask(checks.check_int("group_size", group_size, 1)))


def group_causal_block_mask(seq_len: int, group_size: int, *, block_q: int | None = None,
                            block_k: int | None = None) -> BlockMask:
    """``BlockMask`` (shared by heads) of causal attention inside groups of ``group_size``."""
    seq_len = checks.check_int("seq_len", seq_len, 1)
    return _tiles(group_causal_mask_fn(_group(seq_len, group_size)), 1, seq_len, block_q, block_k)


# ------------------------------------------------------------------------------------------ attention

def _roll_heads(x, first: int, shift: int):
    """Rolls heads ``first..`` of ``x [B, N, h, D]`` by ``shift`` along the sequence (``torch.roll``)."""
    if shift == 0 or first >= x.shape[2]:
        return x
    return jnp.concatenate([x[:, :, :first], jnp.roll(x[:, :, first:], shift, axis=1)], axis=2)


def shifted_sparse_attention(q, k, v, *, group_size: int | None = None,
                             group_ratio: float = DEFAULT_GROUP_RATIO, block_q: int | None = None,
                             block_k: int | None = None, scale: float | None = None, impl: str = "auto"):
    """S²-Attn: ``q [B, N, H, D]``, ``k, v [B, N, Hkv, D]`` -> ``[B, N, H, D]``.

    ``group_size`` (default ``int(N * group_ratio)``); heads ``h >= H // 2`` are shifted by
    ``group_size // 2``. Computed as in LongLoRA: roll, group-causal block-diagonal attention, roll back.
    """
    B, N, H, Hkv, D = checks.check_self_attention_qkv(q, k, v, "shifted_sparse_attention")
    G = _resolve_group(N, group_size, group_ratio)
    shift, first = G // 2, H // 2
    per_kv = H // Hkv
    if first % per_kv:          # a kv head serves both shifted and unshifted query heads: give each its own
        k, v = jnp.repeat(k, per_kv, axis=2), jnp.repeat(v, per_kv, axis=2)
        kv_first = first
    else:
        kv_first = first // per_kv
    block_mask = group_causal_block_mask(N, G, block_q=block_q, block_k=block_k)
    rolled = block_sparse_attention(_roll_heads(q, first, -shift), _roll_heads(k, kv_first, -shift),
                                    _roll_heads(v, kv_first, -shift), block_mask,
                                    mask_fn=group_causal_mask_fn(G), scale=scale, impl=impl)
    return _roll_heads(rolled, first, shift)


def sf_attention(q, k, v, *, group_size: int | None = None, group_ratio: float = DEFAULT_GROUP_RATIO,
                 num_sinks: int = DEFAULT_NUM_SINKS, block_q: int | None = None, block_k: int | None = None,
                 scale: float | None = None, impl: str = "auto"):
    """SF-Attn: S²-Attn's groups without the wrap-around segment, plus ``num_sinks`` global sink keys.

    ``q [B, N, H, D]``, ``k, v [B, N, Hkv, D]`` -> ``[B, N, H, D]``. Every row sees at least itself.
    """
    B, N, H, Hkv, D = checks.check_self_attention_qkv(q, k, v, "sf_attention")
    G = _resolve_group(N, group_size, group_ratio)
    mask_fn = sf_mask_fn(H, G, num_sinks)
    block_mask = _tiles(mask_fn, H, N, block_q, block_k)
    return block_sparse_attention(q, k, v, block_mask, mask_fn=mask_fn, scale=scale, impl=impl)
