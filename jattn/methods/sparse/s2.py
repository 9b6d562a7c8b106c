"""P15 — S2-Attention: Hardware-Aware Context Sharding Among Attention Heads (DKernel).

Every head sees a local band of blocks plus a strided *shard* of the older blocks, and different heads
take different shards, so together they cover the context while each reads only ``1 / vert_stride`` of it.
With ``b = block``, query block ``i``, key block ``j``, query head ``h`` and its KV head
``hk = h // (H // Hkv)``:

    causal (absolute positions, the default):
        keep(h, i, j) = j <= i  AND  ( i - j < local_blocks  OR  (j + hk * s + head_offset) % vert_stride == 0 )
    bidirectional (relative positions, ``causal=False``; ``local_blocks = (left, right)`` or one int):
        d = max(i - j - left + 1, 0) + max(j - i - right + 1, 0)
        keep(h, i, j) = d % vert_stride == 0

with the head sliding step ``s = max(1, int(vert_stride / H))`` (``H`` the number of *query* heads, as in
the official ``dkernel.utils.get_sparse_attn_mask``) and the last ``num_dense_heads`` KV heads dense. Token
level: ``keep(h, q // b, kv // b)`` and, when causal, ``kv <= q``. Heads of one GQA group share their KV
head's pattern. Because the causal shards use absolute block positions, a key block is either needed by a
head for every later query or only inside the local band: the KV cache can drop it once it leaves the band.

Beyond the local band, the union over heads covers every causal block exactly when some KV head is dense
or the residues ``{-(hk * s + head_offset) mod vert_stride}`` of the sparse KV heads hit all ``vert_stride``
classes (for example ``#sparse KV heads >= vert_stride`` with ``s = 1``); ``s2_coverage`` reports it.

Never a fully masked row: ``local_blocks >= 1`` keeps each query's own block.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.ops.block_sparse import block_sparse_attention


@dataclasses.dataclass(frozen=True)
class S2Pattern:
    """Validated static description of one S2 pattern (block units)."""
    num_heads: int
    num_kv_heads: int
    block: int
    local_left: int
    local_right: int
    vert_stride: int
    num_dense_heads: int
    head_offset: int
    head_sliding_step: int
    causal: bool

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def num_sparse_kv_heads(self) -> int:
        return self.num_kv_heads - self.num_dense_heads


def _pattern(num_heads, block, local_blocks, vert_stride, num_dense_heads, head_offset, num_kv_heads,
             head_sliding_step, causal) -> S2Pattern:
    num_heads = checks.check_int("num_heads", num_heads, 1)
    num_kv_heads = num_heads if num_kv_heads is None else checks.check_int("num_kv_heads", num_kv_heads, 1)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    causal = checks.check_bool("causal", causal)
    if causal:
        left, right = checks.check_int("local_blocks", local_blocks, 1), 1
    elif isinstance(local_blocks, (tuple, list)):
        if len(local_blocks) != 2:
            raise ValueError(f"local_blocks must be an int or a pair (left, right), got {local_blocks!r}")
        left, right = (checks.check_int("local_blocks", x, 1) for x in local_blocks)
    else:
        left = right = checks.check_int("local_blocks", local_blocks, 1)
    vert_stride = checks.check_int("vert_stride", vert_stride, 1)
    num_dense_heads = checks.check_int("num_dense_heads", num_dense_heads, 0)
    if num_dense_heads > num_kv_heads:
        raise ValueError(f"num_dense_heads must be <= num_kv_heads={num_kv_heads}, got {num_dense_heads}")
    step = (max(1, int(vert_stride / num_heads)) if head_sliding_step is None
            else checks.check_int("head_sliding_step", head_sliding_step, 0))
    return S2Pattern(num_heads=num_heads, num_kv_heads=num_kv_heads, block=checks.check_int("block", block, 1),
                     local_left=left, local_right=right, vert_stride=vert_stride, num_dense_heads=num_dense_heads,
                     head_offset=checks.check_int("head_offset", head_offset, 0), head_sliding_step=step, causal=causal)


def _keep(p: S2Pattern, kv_head, q_block, kv_block, xp):
    """The block rule on broadcastable integer arrays (numpy or jnp: ``xp``)."""
    dense_head = kv_head >= p.num_sparse_kv_heads
    if p.causal:
        local = q_block - kv_block < p.local_left
        strided = (kv_block + kv_head * p.head_sliding_step + p.head_offset) % p.vert_stride == 0
        return (kv_block <= q_block) & (local | strided | dense_head)
    left = xp.maximum(q_block - kv_block - p.local_left + 1, 0)
    right = xp.maximum(kv_block - q_block - p.local_right + 1, 0)
    return ((left + right) % p.vert_stride == 0) | dense_head


def s2_block_mask(num_heads: int, T: int, block: int = 64, *, local_blocks, vert_stride: int,
                  num_dense_heads: int = 0, head_offset: int = 0, num_kv_heads: int | None = None,
                  head_sliding_step: int | None = None, causal: bool = True) -> np.ndarray:
    """Per-query-head tile map: numpy bool ``[num_heads, nb, nb]`` with ``nb = ceil(T / block)``.

    ``num_kv_heads`` (default ``num_heads``) groups query heads onto KV-head patterns;
    ``head_sliding_step`` defaults to ``max(1, int(vert_stride / num_heads))``.
    """
    p = _pattern(num_heads, block, local_blocks, vert_stride, num_dense_heads, head_offset, num_kv_heads,
                 head_sliding_step, causal)
    nb = math.ceil(checks.check_int("T", T, 1) / p.block)
    kv_head = (np.arange(p.num_heads) // p.group)[:, None, None]
    blocks = np.arange(nb)
    keep = _keep(p, kv_head, blocks[None, :, None], blocks[None, None, :], np)
    return np.broadcast_to(keep, (p.num_heads, nb, nb)).copy()


def s2_mask_fn(num_heads: int, block: int = 64, *, local_blocks, vert_stride: int, num_dense_heads: int = 0,
               head_offset: int = 0, num_kv_heads: int | None = None, head_sliding_step: int | None = None,
               causal: bool = True):
    """The token-level S2 mask as ``mask_fn(b, h, q_idx, kv_idx)``; ``h`` is the query head. Pure index
    arithmetic on ``h`` (usable inside the Pallas kernel)."""
    p = _pattern(num_heads, block, local_blocks, vert_stride, num_dense_heads, head_offset, num_kv_heads,
                 head_sliding_step, causal)

    def mask_fn(b, h, q_idx, kv_idx):
        keep = _keep(p, h // p.group, q_idx // p.block, kv_idx // p.block, jnp)
        return keep & (kv_idx <= q_idx) if p.causal else keep

    return mask_fn


def s2_attention_mask(num_heads: int, T: int, block: int = 64, *, local_blocks, vert_stride: int,
                      num_dense_heads: int = 0, head_offset: int = 0, num_kv_heads: int | None = None,
                      head_sliding_step: int | None = None, causal: bool = True) -> BlockMask:
    """The per-head ``BlockMask`` ``s2_attention`` runs (``Hm = num_heads``, ``block x block`` tiles).

    Every kept tile is full except the causal diagonal, which is partial; the BlockMask carries
    ``s2_mask_fn(...)`` for it, so ``to_dense_mask()`` is the token mask.
    """
    tiles = s2_block_mask(num_heads, T, block, local_blocks=local_blocks, vert_stride=vert_stride,
                          num_dense_heads=num_dense_heads, head_offset=head_offset, num_kv_heads=num_kv_heads,
                          head_sliding_step=head_sliding_step, causal=causal)
    nb = tiles.shape[-1]
    full = tiles & ~np.eye(nb, dtype=bool) if causal else tiles
    with jax.ensure_compile_time_eval():  # static: concrete tables even when called under jit
        return BlockMask.from_dense_block_map(
            jnp.asarray(tiles)[None], full_map=jnp.asarray(full)[None], block_q=block, block_k=block, seq_q=T,
            seq_k=T, mask_fn=s2_mask_fn(num_heads, block, local_blocks=local_blocks, vert_stride=vert_stride,
                                        num_dense_heads=num_dense_heads, head_offset=head_offset,
                                        num_kv_heads=num_kv_heads, head_sliding_step=head_sliding_step,
                                        causal=causal))


def s2_coverage(block_map, *, causal: bool = True) -> tuple[np.ndarray, float]:
    """Union over heads of a ``[H, nb, nb]`` tile map and the fraction of the context blocks it covers
    (all causal blocks ``j <= i`` when ``causal``, else all blocks); 1.0 means every block is seen."""
    block_map = np.asarray(block_map)
    if block_map.dtype != bool or block_map.ndim != 3 or block_map.shape[1] != block_map.shape[2]:
        raise ValueError(f"block_map must be a bool array [H, nb, nb], got {checks.describe(block_map)}")
    union = block_map.any(axis=0)
    nb = union.shape[0]
    context = np.tril(np.ones((nb, nb), bool)) if causal else np.ones((nb, nb), bool)
    return union, float((union & context).sum() / context.sum())


def s2_attention(q, k, v, *, block: int = 64, local_blocks, vert_stride: int, num_dense_heads: int = 0,
                 head_offset: int = 0, head_sliding_step: int | None = None, causal: bool = True,
                 scale: float | None = None, impl: str = "auto"):
    """S2 attention: ``q [B, T, H, D]``, ``k, v [B, T, Hkv, D]``; each query head attends its KV head's
    shard (see the module docstring). Exact on ``jattn.block_sparse_attention``; all but q, k, v static.
    ``block`` is the pattern block and the kernel tile (a power of two >= 16)."""
    B, T, H, Hkv, D = checks.check_self_attention_qkv(q, k, v, "s2_attention")
    checks.check_block_size("block", block, minimum=16)
    checks.check_choice("impl", impl, checks.IMPLS)
    block_mask = s2_attention_mask(H, T, block, local_blocks=local_blocks, vert_stride=vert_stride,
                                   num_dense_heads=num_dense_heads, head_offset=head_offset, num_kv_heads=Hkv,
                                   head_sliding_step=head_sliding_step, causal=causal)
    return block_sparse_attention(q, k, v, block_mask, causal=causal, scale=scale, impl=impl)
