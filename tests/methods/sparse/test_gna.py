"""P48 GNA: token permutation on the block-sparse kernel, tile maps and the cost model."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.sparse.gna import (gna_attention, gna_attention_reference, gna_cost_model, gna_mask,
                                      gna_tile_map, token_permute)
from tests.conftest import assert_matches
from tests.ops.test_neighborhood import grid_qkv, natten_mask


def permuted_positions(shape, tile):
    """Row-major grid index of every permuted slot (-1 for padding), by permuting the index grid itself."""
    ids = jnp.arange(math.prod(shape), dtype=jnp.float32).reshape(1, *shape, 1, 1) + 1
    return np.asarray(token_permute(ids, tile)[0, :, 0, 0]).astype(int) - 1


def explicit_tile_counts(shape, kernel_size, stride, causal, q_tile, kv_tile):
    mask = natten_mask(shape, kernel_size, stride, (1,) * len(shape), causal)
    qpos, kpos = permuted_positions(shape, q_tile), permuted_positions(shape, kv_tile)
    permuted = np.zeros((len(qpos), len(kpos)), bool)
    real_q, real_k = qpos >= 0, kpos >= 0
    permuted[np.ix_(real_q, real_k)] = mask[np.ix_(qpos[real_q], kpos[real_k])]
    tiles = permuted.reshape(len(qpos) // math.prod(q_tile), math.prod(q_tile), len(kpos) // math.prod(kv_tile), -1)
    return tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))


@pytest.mark.parametrize("shape, kernel_size, stride, causal, q_tile, kv_tile", [
    ((30,), (7,), (1,), (False,), (8,), (4,)),
    ((10, 9), (5, 4), (2, 1), (False, True), (4, 4), (2, 8)),
    ((5, 6, 4), (3, 3, 2), (1, 3, 2), (True, False, False), (2, 2, 4), (4, 2, 2)),
])
def test_tile_map_and_cost_model_match_the_explicit_mask(shape, kernel_size, stride, causal, q_tile, kv_tile):
    visited, full = explicit_tile_counts(shape, kernel_size, stride, causal, q_tile, kv_tile)
    tile_map = gna_tile_map(shape, kernel_size, stride, 1, causal, q_tile=q_tile, kv_tile=kv_tile)
    np.testing.assert_array_equal(tile_map.block_map, visited)
    np.testing.assert_array_equal(tile_map.full_map, full)
    cost = gna_cost_model(shape, kernel_size, stride, 1, causal, q_tile=q_tile, kv_tile=kv_tile)
    assert cost["total_pairs"] == visited.size
    assert cost["visited_pairs"] == visited.sum() and cost["full_pairs"] == full.sum()
    assert cost["speedup_bound"] == pytest.approx(visited.size / visited.sum())


def test_kv_ranges_are_the_visited_tiles_per_axis():
    tile_map = gna_tile_map((40, 24), (9, 5), q_tile=(8, 4), kv_tile=(4, 8))
    rows = tile_map.block_map.reshape(5, 6, 10, 3)  # [q0, q1, k0, k1]
    for a, ranges in enumerate(tile_map.kv_ranges):
        axis_visited = rows.any(axis=(1, 3)) if a == 0 else rows.any(axis=(0, 2))
        for i, (first, last) in enumerate(ranges):
            expected = np.flatnonzero(axis_visited[i])
            assert (first, last) == (expected[0], expected[-1]) and len(expected) == last - first + 1


def test_stride_equal_to_tile_is_perfectly_block_sparse():
    cost = gna_cost_model((64, 32), (16, 8), stride=(16, 8), q_tile=(16, 8), kv_tile=(16, 8))
    assert cost["perfectly_block_sparse"] and cost["partial_pairs"] == 0
    assert cost["speedup_bound"] == pytest.approx(4 * 4)


def test_cost_model_sums_dilation_groups():
    cost = gna_cost_model((33,), 5, dilation=2, q_tile=4)
    by_group = [gna_cost_model((n,), 5, q_tile=4) for n in (17, 16)]
    assert cost["visited_pairs"] == sum(c["visited_pairs"] for c in by_group)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_gna_attention_equals_dense_reference(impl):
    shape, kernel_size, stride, dilation, causal = (13, 10), (5, 4), (2, 2), (2, 1), (False, True)
    q, k, v = grid_qkv(11, shape, H=4, Hkv=2)
    ours = lambda q, k, v: gna_attention(q, k, v, kernel_size, stride, dilation, causal, q_tile=(4, 4), impl=impl)
    oracle = lambda q, k, v: gna_attention_reference(q, k, v, kernel_size, stride, dilation, causal)
    assert_matches(ours, oracle, q, k, v, seed=2)


def test_gna_mask_is_the_natten_rule():
    for shape, kernel_size, stride in [((12, 7), (5, 3), (3, 2)), ((20,), (6,), (4,))]:
        np.testing.assert_array_equal(gna_mask(shape, kernel_size, stride),
                                      natten_mask(shape, kernel_size, stride, (1,) * len(shape), (False,) * len(shape)))


def test_tile_map_rejects_dilation():
    with pytest.raises(ValueError, match="dilation"):
        gna_tile_map((16,), 3, dilation=2, q_tile=4)
