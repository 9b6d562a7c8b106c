"""BlockMask: builders, converters, dense views, pytree behaviour and validation."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jattn.core import masks
from jattn.core.block_mask import BlockMask, same_mask_fn


def tiles_of(element_mask, block_q, block_k):
    """Brute force: ``[B, H, T, S]`` bool -> (any visible, all visible and not a tail) per tile."""
    B, H, T, S = element_mask.shape
    nQ, nK = math.ceil(T / block_q), math.ceil(S / block_k)
    padded = np.zeros((B, H, nQ * block_q, nK * block_k), bool)
    padded[:, :, :T, :S] = element_mask
    tiles = padded.reshape(B, H, nQ, block_q, nK, block_k)
    any_ = tiles.any(axis=(3, 5))
    inside = ((np.arange(1, nQ + 1) * block_q <= T)[:, None]) & ((np.arange(1, nK + 1) * block_k <= S)[None, :])
    all_ = tiles.all(axis=(3, 5)) & inside
    return any_, all_


def check_list_invariants(bm: BlockMask):
    """Rows ascending, padding repeats the last listed id, kv and q lists are transposes."""
    for idx, cnt, full in ((bm.kv_indices, bm.kv_counts, bm.kv_full), (bm.q_indices, bm.q_counts, bm.q_full)):
        idx, cnt, full = np.asarray(idx), np.asarray(cnt), np.asarray(full)
        assert idx.dtype == np.int32 and cnt.dtype == np.int32 and full.dtype == bool
        for row, c, f in zip(idx.reshape(-1, idx.shape[-1]), cnt.reshape(-1), full.reshape(-1, full.shape[-1])):
            assert np.all(np.diff(row[:c]) > 0)
            assert np.all(row[c:] == (row[c - 1] if c else 0))
            assert not f[c:].any()
    kv_idx, kv_cnt, kv_fl = (np.asarray(x) for x in (bm.kv_indices, bm.kv_counts, bm.kv_full))
    q_idx, q_cnt, q_fl = (np.asarray(x) for x in (bm.q_indices, bm.q_counts, bm.q_full))
    kv_map, q_map, kv_full, q_full = (np.zeros(bm.shape, bool) for _ in range(4))
    Bm, Hm, nQ, nK = bm.shape
    for b in range(Bm):
        for h in range(Hm):
            for r in range(nQ):
                listed = kv_idx[b, h, r, :kv_cnt[b, h, r]]
                kv_map[b, h, r, listed] = True
                kv_full[b, h, r, listed] = kv_fl[b, h, r, :kv_cnt[b, h, r]]
            for col in range(nK):
                listed = q_idx[b, h, col, :q_cnt[b, h, col]]
                q_map[b, h, listed, col] = True
                q_full[b, h, listed, col] = q_fl[b, h, col, :q_cnt[b, h, col]]
    np.testing.assert_array_equal(kv_map, q_map)
    np.testing.assert_array_equal(kv_full, q_full)
    np.testing.assert_array_equal(kv_map, np.asarray(bm.to_dense_block_map()))
    np.testing.assert_array_equal(kv_full, np.asarray(bm.to_dense_full_map()))


# ------------------------------------------------------------------------------------------ from_mask_fn

def test_causal_structure():
    bm = BlockMask.from_mask_fn(masks.causal_mask(), 1, 1, 64, 64, 16, 16)
    block_map = np.asarray(bm.to_dense_block_map()[0, 0])
    full_map = np.asarray(bm.to_dense_full_map()[0, 0])
    np.testing.assert_array_equal(block_map, np.tril(np.ones((4, 4), bool)))
    np.testing.assert_array_equal(full_map, np.tril(np.ones((4, 4), bool), -1))   # diagonal tiles partial
    np.testing.assert_array_equal(np.asarray(bm.kv_counts[0, 0]), [1, 2, 3, 4])
    np.testing.assert_array_equal(np.asarray(bm.q_counts[0, 0]), [4, 3, 2, 1])
    assert bm.max_kv_blocks == 4 and bm.density == pytest.approx(10 / 16)
    check_list_invariants(bm)


def test_causal_tail_tiles_are_partial():
    bm = BlockMask.from_mask_fn(masks.causal_mask(), 1, 1, 50, 50, 16, 16)
    full_map = np.asarray(bm.to_dense_full_map()[0, 0])
    assert not full_map[3].any() and not full_map[:, 3].any()      # the 48..49 tail row / column
    assert full_map[1, 0] and full_map[2, 1]


@pytest.mark.parametrize("name, mask_fn, B, H", [
    ("causal", masks.causal_mask(), 1, 1),
    ("window", masks.sliding_window_mask(9, 3), 1, 1),
    ("dilated", masks.dilated_mask(5, 2), 1, 1),
    ("per_head", lambda b, h, i, j: (j <= i + 7 * h) & (j >= i - 20 - 3 * b), 2, 3),
    ("document", masks.document_mask(jnp.array([[0] * 20 + [1] * 17, [0] * 5 + [1] * 32]),
                                     jnp.array([[0] * 30 + [1] * 23, [0] * 10 + [1] * 43])), 2, 1),
])
def test_from_mask_fn_matches_brute_force(name, mask_fn, B, H):
    T, S, bq, bk = 37, 53, 16, 8
    bm = BlockMask.from_mask_fn(mask_fn, B, H, T, S, bq, bk)
    dense = np.asarray(masks.materialize(mask_fn, B, H, T, S))
    any_, all_ = tiles_of(dense, bq, bk)
    np.testing.assert_array_equal(np.asarray(bm.to_dense_block_map()), any_)
    np.testing.assert_array_equal(np.asarray(bm.to_dense_full_map()), all_ & any_)
    np.testing.assert_array_equal(np.asarray(bm.to_dense_mask(mask_fn)), dense)
    assert bm.max_kv_blocks == int(any_.sum(-1).max())
    check_list_invariants(bm)


def test_to_dense_mask_skips_mask_fn_on_full_tiles():
    causal = BlockMask.from_mask_fn(masks.causal_mask(), 1, 1, 32, 32, 16, 16)
    nothing = lambda b, h, i, j: jnp.zeros(jnp.broadcast_shapes(jnp.shape(i), jnp.shape(j)), bool)
    with pytest.raises(ValueError, match="mask_fn"):          # it carries causal_mask: nothing conflicts
        causal.to_dense_mask(nothing)
    bm = BlockMask.from_dense_block_map(causal.to_dense_block_map(), full_map=causal.to_dense_full_map(),
                                        block_q=16, block_k=16, seq_q=32, seq_k=32)
    dense = np.asarray(bm.to_dense_mask(nothing, batch=2, heads=3))
    assert dense.shape == (2, 3, 32, 32)
    expected = np.zeros((32, 32), bool)
    expected[16:, :16] = True                                      # only the one full tile survives
    np.testing.assert_array_equal(dense, np.broadcast_to(expected, dense.shape))


# ------------------------------------------------------------------------------------------ dense maps

@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_from_dense_block_map_round_trip(data):
    # A few geometries (odd lengths, tails, rectangular tiles) so compiled helpers are re-used.
    Bm, Hm, T, S, bq, bk = data.draw(st.sampled_from([(1, 1, 37, 53, 16, 8), (2, 3, 16, 16, 8, 8),
                                                       (1, 3, 60, 9, 16, 16), (2, 1, 5, 40, 8, 16)]))
    nQ, nK = math.ceil(T / bq), math.ceil(S / bk)
    seed = data.draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)
    block_map = rng.random((Bm, Hm, nQ, nK)) < data.draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    full_map = rng.random((Bm, Hm, nQ, nK)) < 0.5
    bm = BlockMask.from_dense_block_map(jnp.asarray(block_map), block_q=bq, block_k=bk, seq_q=T, seq_k=S,
                                        full_map=jnp.asarray(full_map))
    np.testing.assert_array_equal(np.asarray(bm.to_dense_block_map()), block_map)
    inside = ((np.arange(1, nQ + 1) * bq <= T)[:, None]) & ((np.arange(1, nK + 1) * bk <= S)[None, :])
    np.testing.assert_array_equal(np.asarray(bm.to_dense_full_map()), block_map & full_map & inside)
    assert bm.max_kv_blocks == max(1, int(block_map.sum(-1).max()))
    assert bm.density == pytest.approx(block_map.mean())
    check_list_invariants(bm)


def test_from_dense_block_map_default_is_partial_and_expands():
    block_map = np.array([[[[True, False, True], [False, False, False]]]])
    bm = BlockMask.from_dense_block_map(jnp.asarray(block_map), block_q=4, block_k=2, seq_q=7, seq_k=6)
    assert not np.asarray(bm.kv_full).any()
    dense = np.asarray(bm.to_dense_mask())[0, 0]
    expected = np.zeros((7, 6), bool)
    expected[:4, 0:2] = True
    expected[:4, 4:6] = True
    np.testing.assert_array_equal(dense, expected)
    np.testing.assert_array_equal(np.asarray(bm.kv_counts[0, 0]), [2, 0])
    np.testing.assert_array_equal(np.asarray(bm.kv_indices[0, 0]), [[0, 2], [0, 0]])


# ------------------------------------------------------------------------------------------ converters

def test_from_topk_indices_unsorted_duplicates_padding():
    indices = jnp.array([[[[3, 0, -1], [1, 1, 2], [-1, -1, -1]]]], jnp.int32)
    bm = BlockMask.from_topk_indices(indices, block_q=16, block_k=16, seq_q=40, seq_k=64)
    expected = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(np.asarray(bm.to_dense_block_map()[0, 0]), expected)
    np.testing.assert_array_equal(np.asarray(bm.kv_indices[0, 0, 0, :2]), [0, 3])
    check_list_invariants(bm)


def test_from_topk_indices_under_jit_keeps_static_width():
    build = jax.jit(lambda i: BlockMask.from_topk_indices(i, block_q=16, block_k=16, seq_q=64, seq_k=128))
    indices = jnp.array([[[[5, 1], [7, -1], [0, 2], [3, 3]]]], jnp.int32)
    bm = build(indices)
    assert bm.max_kv_blocks == 2
    assert (bm.block_q, bm.block_k, bm.seq_q, bm.seq_k) == (16, 16, 64, 128)
    expected = np.zeros((4, 8), bool)
    for r, row in enumerate([[5, 1], [7], [0, 2], [3]]):
        expected[r, row] = True
    np.testing.assert_array_equal(np.asarray(bm.to_dense_block_map()[0, 0]), expected)


def test_from_flat_indices():
    nK = 3  # seq_k=40, block_k=16
    flat = jnp.array([[[0 * nK + 2, 1 * nK + 0, -1, 1 * nK + 0]], [[2 * nK + 1, -1, -1, -1]]], jnp.int32)
    bm = BlockMask.from_flat_indices(flat, block_q=8, block_k=16, seq_q=20, seq_k=40)
    expected = np.zeros((2, 1, 3, 3), bool)
    expected[0, 0, 0, 2] = expected[0, 0, 1, 0] = expected[1, 0, 2, 1] = True
    np.testing.assert_array_equal(np.asarray(bm.to_dense_block_map()), expected)
    check_list_invariants(bm)


def test_from_token_block_indices_union_per_q_block():
    T = 6  # two q blocks of 4: tokens 0..3 and 4..5
    per_token = jnp.array([[[[0, -1], [2, 0], [0, 0], [-1, -1], [1, -1], [3, 1]]]], jnp.int32)
    bm = BlockMask.from_token_block_indices(per_token, block_q=4, block_k=8, seq_q=T, seq_k=32)
    expected = np.array([[1, 0, 1, 0], [0, 1, 0, 1]], bool)
    np.testing.assert_array_equal(np.asarray(bm.to_dense_block_map()[0, 0]), expected)
    check_list_invariants(bm)


@pytest.mark.parametrize("causal", [False, True])
def test_from_vertical_slash_matches_line_cover(causal):
    T, S, bq, bk = 45, 50, 8, 16
    vertical = np.array([[[3, -1, 41, 20]], [[-1, -1, -1, 0]]], np.int32)          # [B=2, H=1, nV]
    slash = np.array([[[0, 17, -1], [5, 44, 49]]], np.int32)                       # [B=1, H=2, nS]
    bm = BlockMask.from_vertical_slash(jnp.asarray(vertical), jnp.asarray(slash), block_q=bq, block_k=bk,
                                       seq_q=T, seq_k=S, causal=causal)
    i, j = np.arange(T)[:, None], np.arange(S)[None, :]
    lines = np.zeros((2, 2, T, S), bool)
    for b in range(2):
        for h in range(2):
            for col in vertical[b, 0]:
                if col >= 0:
                    lines[b, h] |= (j == col) & ((i >= j) if causal else True)
            for off in slash[0, h]:
                if off >= 0:
                    lines[b, h] |= (i - j) == off
    any_, _ = tiles_of(lines, bq, bk)
    np.testing.assert_array_equal(np.asarray(bm.to_dense_block_map()), any_)
    check_list_invariants(bm)


# ------------------------------------------------------------------------------------------ pytree

def test_pytree_round_trip_and_jit():
    bm = BlockMask.from_mask_fn(masks.sliding_window_mask(20), 1, 2, 48, 48, 16, 16)
    leaves, treedef = jax.tree_util.tree_flatten(bm)
    assert len(leaves) == 6
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (again.block_q, again.block_k, again.seq_q, again.seq_k) == (16, 16, 48, 48)
    density = jax.jit(lambda m: jnp.sum(m.kv_counts))(bm)
    assert int(density) == int(np.asarray(bm.to_dense_block_map()).sum())
    text = repr(bm)
    assert "nQ=3" in text and "block=(16, 16)" in text and "density=" in text and "partial=" in text


def test_pytree_keeps_the_mask_fn_static_through_jit_tree_map_and_vmap():
    mask_fn = masks.sliding_window_mask(20)
    bm = BlockMask.from_mask_fn(mask_fn, 1, 2, 48, 48, 16, 16)
    assert bm.mask_fn is mask_fn and bm.partial_tiles == "mask_fn"
    leaves, treedef = jax.tree_util.tree_flatten(bm)
    assert len(leaves) == 6 and not any(leaf is mask_fn for leaf in leaves)      # static, not a leaf
    for again in (jax.tree_util.tree_unflatten(treedef, leaves), jax.tree_util.tree_map(lambda x: x + 0, bm),
                  jax.jit(lambda m: m)(bm)):
        assert again.mask_fn is mask_fn and again.partial_tiles == "mask_fn"
        np.testing.assert_array_equal(np.asarray(again.kv_indices), np.asarray(bm.kv_indices))
    seen = jax.vmap(lambda m, x: m.mask_fn(0, 0, x, x - 25), in_axes=(None, 0))(bm, jnp.arange(3))
    np.testing.assert_array_equal(np.asarray(seen), [False, False, False])
    visible = jax.jit(lambda m: m.to_dense_mask())(bm)                           # the carried mask applies
    np.testing.assert_array_equal(np.asarray(visible), np.asarray(masks.materialize(mask_fn, 1, 2, 48, 48)))


def test_builders_say_what_partial_tiles_mean():
    tiles = jnp.ones((1, 1, 2, 2), bool)
    geometry = dict(block_q=8, block_k=8, seq_q=16, seq_k=16)
    mask_fn = masks.causal_mask()
    selectors = [
        lambda **kw: BlockMask.from_dense_block_map(tiles, **geometry, **kw),
        lambda **kw: BlockMask.from_topk_indices(jnp.array([[[[0], [1]]]]), **geometry, **kw),
        lambda **kw: BlockMask.from_flat_indices(jnp.array([[[0, 3]]]), **geometry, **kw),
        lambda **kw: BlockMask.from_token_block_indices(jnp.zeros((1, 1, 16, 1), jnp.int32), **geometry, **kw),
        lambda **kw: BlockMask.from_vertical_slash(jnp.array([[[0]]]), jnp.array([[[0]]]), **geometry, **kw),
    ]
    for build in selectors:
        plain, carrying = build(), build(mask_fn=mask_fn)
        assert (plain.mask_fn, plain.partial_tiles) == (None, "visible")          # tiles are the pattern
        assert plain.resolve_mask_fn() is None and plain.resolve_mask_fn(mask_fn) is mask_fn
        assert (carrying.mask_fn, carrying.partial_tiles) == (mask_fn, "mask_fn")
        assert carrying.resolve_mask_fn() is mask_fn
    # A full_map that leaves listed tiles partial means "a mask function goes there": it must be given.
    half = BlockMask.from_dense_block_map(tiles, full_map=jnp.eye(2, dtype=bool)[None, None], **geometry)
    assert half.partial_tiles == "mask_fn"
    with pytest.raises(ValueError, match="mask_fn"):
        half.resolve_mask_fn()
    with pytest.raises(ValueError, match="mask_fn"):
        half.to_dense_mask()
    assert half.resolve_mask_fn(mask_fn) is mask_fn
    assert BlockMask.from_dense_block_map(tiles, full_map=jnp.eye(2, dtype=bool)[None, None], **geometry,
                                          partial_tiles="visible").resolve_mask_fn() is None
    # ... unless every listed tile is full: tail tiles (partial by construction) need nothing.
    covered = BlockMask.from_dense_block_map(jnp.ones((1, 1, 2, 2), bool), full_map=jnp.ones((1, 1, 2, 2), bool),
                                             block_q=8, block_k=8, seq_q=13, seq_k=15)
    assert covered.partial_tiles == "visible" and not np.asarray(covered.kv_full).all()
    assert np.asarray(covered.to_dense_mask()).all()


def test_raw_constructor_with_partial_tiles_and_no_mask_fn_raises():
    bm = BlockMask.from_mask_fn(masks.causal_mask(), 1, 1, 32, 32, 16, 16)
    tables = jax.tree_util.tree_leaves(bm)
    raw = BlockMask(*tables, block_q=16, block_k=16, seq_q=32, seq_k=32)          # partial_tiles="mask_fn"
    with pytest.raises(ValueError, match="mask_fn is needed: this BlockMask has partial tiles"):
        raw.resolve_mask_fn()
    with pytest.raises(ValueError, match="traced"):                              # cannot be checked under jit
        jax.jit(lambda *t: BlockMask(*t, block_q=16, block_k=16, seq_q=32, seq_k=32).to_dense_mask())(*tables)
    full_only = BlockMask.from_mask_fn(masks.full_mask(), 1, 1, 32, 32, 16, 16)
    raw_full = BlockMask(*jax.tree_util.tree_leaves(full_only), block_q=16, block_k=16, seq_q=32, seq_k=32)
    assert raw_full.resolve_mask_fn() is None                                    # no partial tile: nothing needed
    assert raw.with_mask_fn(masks.causal_mask()).resolve_mask_fn() is not None


def test_conflicting_mask_fn_raises_and_equal_ones_are_accepted():
    bm = BlockMask.from_mask_fn(masks.sliding_window_mask(64), 1, 1, 256, 256, 64, 64)
    assert bm.resolve_mask_fn(masks.sliding_window_mask(64)) is not None        # a new closure, same mask
    for other in (masks.sliding_window_mask(32), masks.causal_mask(), lambda b, h, i, j: i >= j):
        with pytest.raises(ValueError, match="mask_fn"):
            bm.resolve_mask_fn(other)
        with pytest.raises(ValueError, match="mask_fn"):
            bm.with_mask_fn(other)
    combined = masks.and_masks(masks.causal_mask(), masks.chunked_mask(16))
    assert same_mask_fn(combined, masks.and_masks(masks.causal_mask(), masks.chunked_mask(16)))
    assert not same_mask_fn(combined, masks.and_masks(masks.causal_mask(), masks.chunked_mask(8)))
    ids = jnp.array([[0, 0, 1, 1]])
    assert same_mask_fn(masks.document_mask(ids), masks.document_mask(jnp.array([[0, 0, 1, 1]])))
    assert not same_mask_fn(masks.document_mask(ids), masks.document_mask(jnp.array([[0, 1, 1, 1]])))
    assert not same_mask_fn(masks.causal_mask(), None)


# ------------------------------------------------------------------------------------------ validation

BAD_BUILDS = [
    (lambda: BlockMask.from_dense_block_map(jnp.ones((1, 1, 2, 2), jnp.int32), block_q=8, block_k=8, seq_q=16,
                                            seq_k=16), TypeError, "block_map"),
    (lambda: BlockMask.from_dense_block_map(jnp.ones((1, 1, 3, 2), bool), block_q=8, block_k=8, seq_q=16,
                                            seq_k=16), ValueError, "block_map"),
    (lambda: BlockMask.from_dense_block_map(jnp.ones((2, 2), bool), block_q=8, block_k=8, seq_q=16, seq_k=16),
     ValueError, "block_map"),
    (lambda: BlockMask.from_dense_block_map(jnp.ones((1, 1, 2, 2), bool), block_q=8, block_k=8, seq_q=16,
                                            seq_k=16, full_map=jnp.ones((1, 2, 2, 2), bool)), ValueError, "full_map"),
    (lambda: BlockMask.from_dense_block_map(jnp.ones((1, 1, 2, 2), bool), block_q=0, block_k=8, seq_q=16,
                                            seq_k=16), ValueError, "block_q"),
    (lambda: BlockMask.from_dense_block_map(jnp.ones((1, 1, 2, 2), bool), block_q=8.0, block_k=8, seq_q=16,
                                            seq_k=16), TypeError, "block_q"),
    (lambda: BlockMask.from_mask_fn("causal", 1, 1, 16, 16, 8, 8), TypeError, "mask_fn"),
    (lambda: BlockMask.from_mask_fn(masks.causal_mask(), 1, 1, 16, -3, 8, 8), ValueError, "seq_k"),
    (lambda: BlockMask.from_topk_indices(jnp.array([[[[0, 2]]]]), block_q=8, block_k=8, seq_q=8, seq_k=16),
     ValueError, "indices"),
    (lambda: BlockMask.from_topk_indices(jnp.array([[[[0.0]]]]), block_q=8, block_k=8, seq_q=8, seq_k=16),
     TypeError, "indices"),
    (lambda: BlockMask.from_topk_indices(jnp.array([[[0, 1]]]), block_q=8, block_k=8, seq_q=8, seq_k=16),
     ValueError, "indices"),
    (lambda: BlockMask.from_topk_indices(jnp.array([[[[0, -2]]]]), block_q=8, block_k=8, seq_q=8, seq_k=16),
     ValueError, "indices"),
    (lambda: BlockMask.from_flat_indices(jnp.array([[[4]]]), block_q=8, block_k=8, seq_q=16, seq_k=16),
     ValueError, "flat_indices"),
    (lambda: BlockMask.from_token_block_indices(jnp.array([[[[0]]]]), block_q=8, block_k=8, seq_q=4, seq_k=16),
     ValueError, "seq_q"),
    (lambda: BlockMask.from_vertical_slash(jnp.array([[[16]]]), jnp.array([[[0]]]), block_q=8, block_k=8,
                                           seq_q=16, seq_k=16), ValueError, "vertical_indices"),
    (lambda: BlockMask.from_vertical_slash(jnp.array([[[1]], [[2]]]), jnp.array([[[0]], [[0]], [[0]]]),
                                           block_q=8, block_k=8, seq_q=16, seq_k=16), ValueError, "agree"),
    (lambda: BlockMask.from_mask_fn(masks.causal_mask(), 1, 1, 16, 16, 8, 8).to_dense_mask(batch=0),
     ValueError, "batch"),
    (lambda: BlockMask.from_topk_indices(jnp.array([[[[0]]]]), block_q=8, block_k=8, seq_q=8, seq_k=16,
                                         mask_fn="causal"), TypeError, "mask_fn"),
    (lambda: BlockMask.from_dense_block_map(jnp.ones((1, 1, 2, 2), bool), block_q=8, block_k=8, seq_q=16,
                                            seq_k=16, partial_tiles="full"), ValueError, "partial_tiles"),
]


@pytest.mark.parametrize("build, error, word", BAD_BUILDS)
def test_validation_errors_name_the_argument(build, error, word):
    with pytest.raises(error, match=word):
        build()
