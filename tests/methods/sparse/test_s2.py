"""P15 S2-Attention: the per-head shard rule against a literal loop, the BlockMask expansion, exactness against
dense masked attention (xla + pallas, fwd + grads, GQA, odd length), vert_stride=1 is dense causal, the union
of heads covers the context iff the shards hit every residue, and the KV-cache property."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.core.masks import materialize
from jattn.core.reference import reference_attention
from jattn.methods.sparse.s2 import s2_attention, s2_attention_mask, s2_block_mask, s2_coverage, s2_mask_fn
from jattn.ops.block_sparse import block_sparse_attention
from tests.conftest import (assert_close, assert_forward_and_grads_close, dense_vjp_run, numpy_qkv, random_like,
                            vjp_run)


reference = jax.jit(reference_attention, static_argnames=("causal",))   # one compile per shape


# ----------------------------------------------------------------------- literal transcription (spec)

def literal_block_rule(H, Hkv, nb, local, vs, dense, offset, causal, step=None):
    step = max(1, int(vs / H)) if step is None else step
    keep = np.zeros((H, nb, nb), bool)
    for h in range(H):
        hk = h // (H // Hkv)
        for i in range(nb):
            for j in range(nb):
                if hk >= Hkv - dense:
                    keep[h, i, j] = (j <= i) if causal else True
                elif causal:
                    keep[h, i, j] = j <= i and (i - j < local or (j + hk * step + offset) % vs == 0)
                else:
                    left, right = (local, local) if isinstance(local, int) else local
                    d = max(i - j - left + 1, 0) + max(j - i - right + 1, 0)
                    keep[h, i, j] = d % vs == 0
    return keep


def literal_token_mask(H, Hkv, T, block, local, vs, dense, offset, causal):
    nb = math.ceil(T / block)
    tiles = literal_block_rule(H, Hkv, nb, local, vs, dense, offset, causal)
    mask = np.zeros((H, T, T), bool)
    for h in range(H):
        for q in range(T):
            for kv in range(T):
                mask[h, q, kv] = tiles[h, q // block, kv // block] and (kv <= q or not causal)
    return mask


def dense_mask_of(mask_fn, H, T):
    return np.asarray(jax.jit(lambda: materialize(mask_fn, 1, H, T, T))())[0]


def tiles_with_any(mask, block):
    H, T, _ = mask.shape
    nb = math.ceil(T / block)
    padded = np.zeros((H, nb * block, nb * block), bool)
    padded[:, :T, :T] = mask
    return padded.reshape(H, nb, block, nb, block).any(axis=(2, 4))


# (H, Hkv, T, block, local_blocks, vert_stride, num_dense_heads, head_offset, causal)
CONFIGS = [
    (4, 2, 75, 16, 2, 3, 0, 1, True),       # GQA, odd length, s = 1
    (8, 8, 64, 16, 1, 4, 2, 0, True),       # last two heads dense
    (2, 2, 96, 16, 1, 8, 0, 0, True),       # s = max(1, 8 // 2) = 4
    (4, 4, 70, 16, (1, 2), 3, 1, 0, False),  # bidirectional, relative positions
]


def kwargs_of(config):
    H, Hkv, T, block, local, vs, dense, offset, causal = config
    return dict(local_blocks=local, vert_stride=vs, num_dense_heads=dense, head_offset=offset, num_kv_heads=Hkv,
                causal=causal)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_mask_fn_and_block_map_equal_literal_rule(config):
    H, Hkv, T, block, local, vs, dense, offset, causal = config
    want = literal_token_mask(H, Hkv, T, block, local, vs, dense, offset, causal)
    assert 0.1 < want.mean() < 0.9
    got = dense_mask_of(s2_mask_fn(H, block, **kwargs_of(config)), H, T)
    np.testing.assert_array_equal(got, want)
    tiles = s2_block_mask(H, T, block, **kwargs_of(config))
    np.testing.assert_array_equal(tiles, literal_block_rule(H, Hkv, math.ceil(T / block), local, vs, dense, offset,
                                                            causal))


@pytest.mark.parametrize("config", CONFIGS[:2] + CONFIGS[3:], ids=str)
def test_block_mask_expands_to_token_mask(config):
    H, Hkv, T, block, local, vs, dense, offset, causal = config
    want = literal_token_mask(H, Hkv, T, block, local, vs, dense, offset, causal)
    bm = s2_attention_mask(H, T, block, **kwargs_of(config))
    assert bm.shape == (1, H, math.ceil(T / block), math.ceil(T / block))
    np.testing.assert_array_equal(np.asarray(bm.to_dense_mask(s2_mask_fn(H, block, **kwargs_of(config))))[0], want)
    # causal diagonal tiles are partial: the causal flag alone yields the same mask
    dense = np.asarray(bm.to_dense_mask())[0] & (np.tril(np.ones((T, T), bool)) if causal else True)
    np.testing.assert_array_equal(dense, want)
    np.testing.assert_array_equal(np.asarray(bm.to_dense_block_map())[0], tiles_with_any(want, block))


# ------------------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("impl, config", [("xla", CONFIGS[0]), ("pallas", CONFIGS[0]), ("xla", CONFIGS[3])],
                         ids=["xla-causal", "pallas-causal", "xla-bidirectional"])
def test_attention_equals_dense_masked_reference(impl, config):
    H, Hkv, T, block, local, vs, dense, offset, causal = config
    q, k, v = numpy_qkv(21, 2, T, T, H, Hkv, 16)
    w = random_like(22, q)
    mask = jnp.asarray(literal_token_mask(H, Hkv, T, block, local, vs, dense, offset, causal))[None]
    sparse = jax.jit(lambda q, k, v, w: vjp_run(lambda q, k, v: s2_attention(
        q, k, v, block=block, local_blocks=local, vert_stride=vs, num_dense_heads=dense, head_offset=offset,
        causal=causal, impl=impl), q, k, v, w))
    result = sparse(q, k, v, w)
    assert np.isfinite(np.asarray(result[0])).all()
    assert_forward_and_grads_close(result, dense_vjp_run(q, k, v, w, jnp.asarray(mask)))


def test_mask_fn_runs_inside_the_pallas_kernel():
    """Per-head arithmetic on the kernel's scalar head id: mask_fn on every tile equals the causal flag."""
    H, Hkv, T, block, local, vs, dense, offset, causal = CONFIGS[0]
    q, k, v = numpy_qkv(23, 1, T, T, H, Hkv, 16)
    kw = kwargs_of(CONFIGS[0])
    bm = s2_attention_mask(H, T, block, **kw)
    got = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, bm, mask_fn=s2_mask_fn(H, block, **kw),
                                                         impl="pallas"))(q, k, v)
    mask = jnp.asarray(literal_token_mask(H, Hkv, T, block, local, vs, dense, offset, causal))[None]
    assert_close(got, reference(q, k, v, mask=mask), what="pallas mask_fn")


def test_vert_stride_one_is_dense_causal():
    T, block = 80, 16
    tiles = s2_block_mask(4, T, block, local_blocks=1, vert_stride=1)
    np.testing.assert_array_equal(tiles, np.broadcast_to(np.tril(np.ones((5, 5), bool)), tiles.shape))
    q, k, v = numpy_qkv(24, 1, T, T, 4, 2, 16)
    got = jax.jit(lambda q, k, v: s2_attention(q, k, v, block=block, local_blocks=1, vert_stride=1,
                                               impl="xla"))(q, k, v)
    assert_close(got, reference(q, k, v, causal=True), what="vert_stride=1")


# ------------------------------------------------------------------------------------- properties

@pytest.mark.parametrize("H, Hkv, vs, dense, covers", [
    (8, 8, 8, 0, True),      # 8 sparse KV heads, s = 1: every residue
    (8, 4, 4, 0, True),      # GQA: 4 sparse KV heads >= vert_stride 4
    (8, 8, 4, 4, True),      # 4 sparse + 4 dense heads
    (8, 4, 8, 0, False),     # only 4 sparse KV heads < vert_stride 8
    (2, 2, 8, 0, False),     # s = 4: residues 0 and 4 only
])
def test_union_of_heads_covers_the_context(H, Hkv, vs, dense, covers):
    tiles = s2_block_mask(H, 64 * 16, 16, local_blocks=2, vert_stride=vs, num_dense_heads=dense, num_kv_heads=Hkv)
    union, fraction = s2_coverage(tiles)
    assert union.shape == (64, 64)
    assert (fraction == 1.0) == covers
    causal = np.tril(np.ones((64, 64), bool))
    if covers:
        np.testing.assert_array_equal(union, causal)
    else:   # beyond the band (i - j >= 2) key block j is seen iff it is one of the sparse heads' residues
        step = max(1, int(vs / H))
        residues = {(-(hk * step)) % vs for hk in range(Hkv - dense)}
        assert len(residues) < vs
        for j in range(62):
            far = union[j + 2:, j]
            assert far.all() if j % vs in residues else not far.any(), j


def test_kv_cache_property_absolute_positions():
    """Per head, beyond the diagonal a key block's visibility over later query blocks never comes back once
    lost: the stored set for a head does not depend on the query position (the band slides, shards stay)."""
    tiles = s2_block_mask(8, 48 * 16, 16, local_blocks=3, vert_stride=5, num_kv_heads=4, num_dense_heads=1,
                          head_offset=2)
    for h in range(8):
        for j in range(48):
            column = tiles[h, j:, j].astype(int)          # query blocks i >= j
            assert np.all(np.diff(column) <= 0), (h, j)
    # the relative-position (bidirectional) pattern does not have it: holes move with the query
    rel = s2_block_mask(1, 48 * 16, 16, local_blocks=1, vert_stride=3, causal=False)[0]
    assert any(np.any(np.diff(rel[j:, j].astype(int)) > 0) for j in range(48))


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(local_blocks=0, vert_stride=2), ValueError, "local_blocks"),
    (dict(local_blocks=1, vert_stride=0), ValueError, "vert_stride"),
    (dict(local_blocks=1, vert_stride=2, num_dense_heads=3), ValueError, "num_dense_heads"),
    (dict(local_blocks=1, vert_stride=2, block=48), ValueError, "block"),
    (dict(local_blocks=1.0, vert_stride=2), TypeError, "local_blocks"),
    (dict(local_blocks=1, vert_stride=2, causal=1), TypeError, "causal"),
    (dict(local_blocks=(1, 2, 3), vert_stride=2, causal=False), ValueError, "local_blocks"),
    (dict(local_blocks=1, vert_stride=2, impl="cuda"), ValueError, "impl"),
])
def test_validation_errors_name_the_argument(kwargs, error, word):
    q, k, v = numpy_qkv(0, 1, 32, 32, 4, 2, 16)
    with pytest.raises(error, match=word):
        s2_attention(q, k, v, **{"block": 16, **kwargs})


def test_length_mismatch_and_bad_coverage_input():
    q, _, _ = numpy_qkv(0, 1, 32, 32, 4, 2, 16)
    _, k, v = numpy_qkv(1, 1, 48, 48, 4, 2, 16)
    with pytest.raises(ValueError, match="T == S"):
        s2_attention(q, k, v, block=16, local_blocks=1, vert_stride=2)
    with pytest.raises(ValueError, match="block_map"):
        s2_coverage(np.ones((4, 4), bool))
