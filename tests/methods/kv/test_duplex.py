"""P22 Duplex: the Op/B model equals the FLOPs XLA counts for jattn's decode and the bytes of the cache.

Mutations caught: FLOPs per query head instead of per group (drops G), K only in the bytes (drops the 2),
bytes counted per query head (Op/B stuck at 1).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.kv import decode_cost
from jattn.ops.decode_xla import attend_contiguous


@pytest.mark.parametrize("heads, kv_heads", [(8, 8), (32, 8), (32, 4)])
def test_op_per_byte_is_the_group_size_for_fp16_and_one_token(heads, kv_heads):
    cost = decode_cost(batch=2, heads=heads, kv_heads=kv_heads, head_dim=128, context=4096)
    assert cost.op_per_byte == heads // kv_heads


@pytest.mark.optimized
@pytest.mark.parametrize("heads, kv_heads, new_tokens", [(8, 2, 1), (4, 4, 3)])
def test_flops_match_what_xla_counts_for_the_decode_path(heads, kv_heads, new_tokens):
    B, L, d = 2, 512, 64
    q = jnp.zeros((B, new_tokens, heads, d), jnp.float32)
    cache = jnp.zeros((B, kv_heads, L, d), jnp.float32)
    # the path's math; decode_attention_xla wraps it in a stale-row guard whose rare fallback branch XLA also counts
    lowered = jax.jit(lambda q, k, v: attend_contiguous((None, None, 0.1), q, k, v, None, jnp.full((B,), L), 0)).lower(
        q, cache, cache)
    counted = lowered.compile().cost_analysis()
    counted = counted[0] if isinstance(counted, (list, tuple)) else counted
    cost = decode_cost(batch=B, heads=heads, kv_heads=kv_heads, head_dim=d, context=L, new_tokens=new_tokens,
                       bytes_per_element=4)
    # the two matmuls dominate; softmax and masking add a few FLOPs per logit (< 5% at d = 64)
    np.testing.assert_allclose(counted["flops"], cost.flops, rtol=0.05)
    assert cost.bytes == 2 * B * kv_heads * L * d * 4


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        decode_cost(batch=1, heads=6, kv_heads=4, head_dim=64, context=10)
    with pytest.raises((ValueError, TypeError), match="context"):
        decode_cost(batch=1, heads=4, kv_heads=4, head_dim=64, context=0)


def _pages_the_tpu_kernel_fetches(cfg, lengths, table, B: int, Hkv: int) -> int:
    """Replays the decode kernel's TPU K index map (``pallas_kernels.decode._tpu_page``, what Mosaic's pipeline
    evaluates each grid step) over its grid in order; the pipeline DMAs a page when the block index changes."""
    from pallas_kernels.decode import _tpu_page
    fetched, previous = 0, None
    for b in range(B):
        for g in range(Hkv):
            for split in range(cfg.num_splits):
                for t in range(cfg.tiles_per_split):
                    index = (b, g, int(_tpu_page(cfg, lengths, table, b, split, t)))
                    fetched += index != previous
                    previous = index
    return fetched


@pytest.mark.parametrize("heads, kv_heads, lengths", [(8, 2, (128, 128)), (2, 2, (128, 128)), (6, 2, (37, 100)),
                                                      (4, 1, (0, 128))])
def test_bytes_match_the_pages_the_decode_kernel_fetches(heads, kv_heads, lengths):
    """P22 against the decode kernel rather than XLA's count: the K/V pages the TPU structure DMAs, replayed from
    its own index map, are each kv head's pages once, whatever the group size: ``decode_cost``'s bytes at full
    lengths, exactly the pages each length needs when ragged (a length-0 sequence still costs its first page: the
    block index must name one). Catches a kernel (or model) that reads K/V once per query head (G times the
    bytes), past the lengths, or again for a split that needs no tile."""
    from jattn.ops.decode import split_plan
    from pallas_kernels.decode import DecodeConfig
    B, S, P, d = len(lengths), 128, 16, 64
    splits, per_split = split_plan(B, kv_heads, S // P, 2)
    cfg = DecodeConfig(new_tokens=1, group=heads // kv_heads, rows=16, page_size=P, num_splits=splits,
                       tiles_per_split=per_split, scale=0.1, softcap=None, window=None, per_sequence=True,
                       target="mosaic", interpret=True, poison_outputs=False)
    table = jnp.broadcast_to(jnp.arange(S // P, dtype=jnp.int32), (B, S // P))
    fetched = _pages_the_tpu_kernel_fetches(cfg, jnp.asarray(lengths, jnp.int32), table, B, kv_heads)
    pages = [max(1, -(-n // P)) for n in lengths]                     # pages each length needs (1 for 0)
    assert fetched == kv_heads * sum(pages)
    if min(lengths) == S:
        cost = decode_cost(batch=B, heads=heads, kv_heads=kv_heads, head_dim=d, context=S, bytes_per_element=2)
        assert 2 * fetched * P * d * 2 == cost.bytes
