"""P64 PARO: the permutations against a literal loop transcription, round trip, equivariance, permuted
block-sparse attention == dense attention with the mask mapped back (xla and pallas, forward and
gradients, GQA, odd lengths), calibration and order selection on synthetic 3-D-local maps, and INT8."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.core.block_mask import BlockMask
from jattn.core.reference import reference_attention
from jattn.methods.sparse.paro import (PARO_ORDERS, calibrate_block_mask, dequantize_int8_per_block,
                                       paro_attention, paro_block_mass, paro_inverse_permutation,
                                       paro_mask_to_original, paro_order_costs, paro_permutation, paro_permute,
                                       paro_unpermute, quantize_int8_per_block, select_paro_order)
from tests.conftest import assert_close, assert_matches, masked_reference, random_qkv

FHW, NUM_TEXT = (3, 4, 5), 5            # N = 65: not a multiple of the 16-token blocks


def literal_permutation(F, H, W, order, num_text):
    """Nested loops over the axes in ``order`` (outermost first); text tokens stay in front."""
    sizes = {"f": F, "h": H, "w": W}
    perm = list(range(num_text))
    outer, middle, inner = order
    for x in range(sizes[outer]):
        for y in range(sizes[middle]):
            for z in range(sizes[inner]):
                at = {outer: x, middle: y, inner: z}
                perm.append(num_text + at["f"] * H * W + at["h"] * W + at["w"])
    return np.array(perm)


@pytest.mark.parametrize("order", PARO_ORDERS)
def test_permutation_equals_literal_loops_and_round_trips(order):
    perm = paro_permutation(FHW, order, num_text=NUM_TEXT)
    np.testing.assert_array_equal(perm, literal_permutation(*FHW, order, NUM_TEXT))
    np.testing.assert_array_equal(np.sort(perm), np.arange(NUM_TEXT + 60))
    np.testing.assert_array_equal(perm[paro_inverse_permutation(FHW, order, num_text=NUM_TEXT)],
                                  np.arange(NUM_TEXT + 60))


def test_per_head_permute_and_unpermute_are_inverse():
    orders = ("hwf", "fhw", "wfh")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 65, 3, 8))
    xp = paro_permute(x, FHW, orders, num_text=NUM_TEXT)
    for h, order in enumerate(orders):
        np.testing.assert_array_equal(xp[:, :, h], x[:, literal_permutation(*FHW, order, NUM_TEXT), h])
    np.testing.assert_array_equal(paro_unpermute(xp, FHW, orders, num_text=NUM_TEXT), x)
    np.testing.assert_array_equal(paro_permute(paro_unpermute(x, FHW, "whf", num_text=NUM_TEXT), FHW, "whf",
                                               num_text=NUM_TEXT), x)


def expand_tiles(block_map, block, N):
    return np.repeat(np.repeat(block_map, block, -2), block, -1)[..., :N, :N]


def literal_mask_back(mask_perm, orders):
    """M[h, perm[a], perm[b]] = M_perm[h, a, b], by loops."""
    H, N, _ = mask_perm.shape
    out = np.zeros_like(mask_perm)
    for h in range(H):
        perm = literal_permutation(*FHW, orders[h], NUM_TEXT)
        for a in range(N):
            for b in range(N):
                out[h, perm[a], perm[b]] = mask_perm[h, a, b]
    return out


def random_block_map(seed, H, n, density=0.4):
    rng = np.random.default_rng(seed)
    block_map = rng.random((H, n, n)) < density
    block_map[:, np.arange(n), rng.integers(0, n, n)] = True        # every q block keeps a tile
    return block_map


def test_mask_mapped_back_equals_literal_and_block_mask_expands_to_its_tiles():
    orders = ("hwf", "fwh")
    block_map = random_block_map(1, 2, 5)
    bm = BlockMask.from_dense_block_map(jnp.asarray(block_map[None]), block_q=16, block_k=16, seq_q=65, seq_k=65,
                                        full_map=jnp.asarray(block_map[None]))
    mask_perm = expand_tiles(block_map, 16, 65)
    np.testing.assert_array_equal(bm.to_dense_mask()[0], mask_perm)       # tiles = the mask, all entries live
    np.testing.assert_array_equal(np.asarray(bm.to_dense_block_map()[0]), block_map)
    np.testing.assert_array_equal(paro_mask_to_original(mask_perm, FHW, orders, num_text=NUM_TEXT),
                                  literal_mask_back(mask_perm, orders))


@pytest.mark.parametrize("impl,orders", [
    ("xla", ("hwf", "whf", "fhw", "wfh")),     # GQA group 2 mixes orders: k, v repeated per query head
    ("pallas", ("hwf", "hwf", "wfh", "wfh")),  # each GQA group shares its order: k, v permuted per kv head
])
def test_permuted_block_sparse_equals_dense_with_mask_mapped_back(impl, orders):
    q, k, v = random_qkv(2, 2, 65, 65, 4, 2, 16)
    block_map = random_block_map(3, 4, 5)
    bm = BlockMask.from_dense_block_map(jnp.asarray(block_map[None]), block_q=16, block_k=16, seq_q=65, seq_k=65,
                                        full_map=jnp.asarray(block_map[None]))
    mask = jnp.asarray(literal_mask_back(expand_tiles(block_map, 16, 65), orders))
    fn = lambda q, k, v: paro_attention(q, k, v, bm, fhw=FHW, orders=orders, num_text=NUM_TEXT, impl=impl)
    assert_matches(fn, masked_reference(mask), q, k, v, seed=4)


def test_full_mask_is_permutation_equivariant():
    q, k, v = random_qkv(5, 1, 65, 65, 3, 3, 16)
    full = BlockMask.from_dense_block_map(jnp.ones((1, 1, 5, 5), bool), block_q=16, block_k=16, seq_q=65, seq_k=65,
                                          full_map=jnp.ones((1, 1, 5, 5), bool))
    run = jax.jit(lambda q, k, v: (
        paro_attention(q, k, v, full, fhw=FHW, orders=("whf", "hfw", "fwh"), num_text=NUM_TEXT, impl="xla"),
        reference_attention(q, k, v)))
    got, want = run(q, k, v)
    assert_close(got, want, what="permute -> attend -> unpermute vs attend")


def synthetic_maps(F=4, H=4, W=4, sharpness=8.0, seed=0):
    """Two heads of softmax maps: a temporal head (same (h, w), any frame) and a spatial head (same frame,
    4-neighbourhood), plus a little noise."""
    f, h, w = (a.reshape(-1) for a in np.meshgrid(np.arange(F), np.arange(H), np.arange(W), indexing="ij"))
    temporal = (h[:, None] == h[None]) & (w[:, None] == w[None])
    spatial = (f[:, None] == f[None]) & (np.abs(h[:, None] - h[None]) + np.abs(w[:, None] - w[None]) <= 1)
    noise = np.random.default_rng(seed).random((2, F * H * W, F * H * W)) * 0.1
    logits = sharpness * np.stack([temporal, spatial]).astype(np.float64) + noise
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def test_order_selection_finds_the_block_diagonal_order_for_3d_local_maps():
    maps, fhw = synthetic_maps(), (4, 4, 4)
    orders = select_paro_order(maps, fhw, block=16, recall=0.9)
    costs = paro_order_costs(maps, fhw, block=16, recall=0.9)
    # Temporal head: a 16-token block must hold whole (h, w) columns, so frames must not be outermost;
    # the four such orders tie and the first of PARO_ORDERS wins. Spatial head: whole frames, FHW.
    block_diagonal = [o for o in PARO_ORDERS if o[0] != "f"]
    assert all(costs[o][0][0] <= 0.25 for o in block_diagonal)
    assert orders == (block_diagonal[0], "fhw")
    assert costs[orders[0]][0][0] <= 0.25 < costs["fhw"][0][0]         # fewer tiles at equal mass than FHW
    assert costs[orders[0]][1][0] < costs["fhw"][1][0]                 # and more coherent tiles
    mixed = select_paro_order(maps, fhw, block=16, alpha=0.5)       # noise may break the ties differently
    assert mixed[0] in block_diagonal and mixed[1][0] == "f"
    # At a fixed density of 25% the chosen order keeps far more of the mass than FHW.
    kept = {}
    for name, head_orders in (("paro", orders), ("fhw", "fhw")):
        bm = calibrate_block_mask(maps, fhw=fhw, orders=head_orders, block=16, density=0.25)
        mass = paro_block_mass(maps, fhw, head_orders, block=16)
        kept[name] = (mass * np.asarray(bm.to_dense_block_map()[0])).sum(axis=(1, 2)) / mass.sum(axis=(1, 2))
        assert bm.density == pytest.approx(0.25)
    assert kept["paro"][0] > 0.99 and kept["fhw"][0] < 0.5
    # Threshold mode on the chosen orders gives the same block diagonal.
    bm = calibrate_block_mask(maps, fhw=fhw, orders=orders, block=16, threshold=0.5)
    np.testing.assert_array_equal(np.asarray(bm.to_dense_block_map()[0]), np.broadcast_to(np.eye(4, dtype=bool),
                                                                                           (2, 4, 4)))


def test_calibrated_mask_runs_on_the_kernel_and_matches_dense():
    maps, fhw = synthetic_maps(seed=1), (4, 4, 4)
    orders = select_paro_order(maps, fhw, block=16)
    bm = calibrate_block_mask(maps, fhw=fhw, orders=orders, block=16, density=0.3)
    assert (np.asarray(bm.kv_counts) >= 1).all()                      # no q block without keys
    q, k, v = random_qkv(6, 1, 64, 64, 2, 1, 16)
    mask = paro_mask_to_original(bm.to_dense_mask(heads=2)[0], fhw, orders)
    fn = lambda q, k, v: paro_attention(q, k, v, bm, fhw=fhw, orders=orders, impl="xla")
    assert_matches(fn, masked_reference(mask), q, k, v, seed=7)


def test_int8_quantization_and_int8_path_within_tolerance_of_fp():
    x = jax.random.normal(jax.random.PRNGKey(8), (2, 65, 3, 16)) * 3.0
    codes, scales = quantize_int8_per_block(x, 32)
    assert codes.dtype == jnp.int8 and scales.shape == (2, 3, 3)
    assert int(jnp.max(jnp.abs(codes.astype(jnp.int32)))) == 127
    back = dequantize_int8_per_block(codes, scales, 32)
    bound = jnp.repeat(scales, 32, axis=1)[:, :65, :, None] / 2
    assert bool(jnp.all(jnp.abs(back - x) <= bound * (1 + 1e-6)))
    q, k, v = random_qkv(9, 1, 65, 65, 2, 2, 16)
    full = BlockMask.from_dense_block_map(jnp.ones((1, 1, 5, 5), bool), block_q=16, block_k=16, seq_q=65, seq_k=65)
    run = jax.jit(lambda q, k, v, int8: paro_attention(q, k, v, full, fhw=FHW, orders="hwf", num_text=NUM_TEXT,
                                                       impl="xla", qk_int8=int8), static_argnums=3)
    fp, i8 = run(q, k, v, False), run(q, k, v, True)
    err = float(jnp.max(jnp.abs(i8 - fp))) / float(jnp.max(jnp.abs(fp)))
    assert 0 < err < 2e-2
    dq = jax.grad(lambda q: jnp.sum(run(q, k, v, True) ** 2))(q)    # straight-through: finite, non-zero
    assert np.isfinite(np.asarray(dq)).all() and float(jnp.abs(dq).sum()) > 0


def test_bad_inputs_raise_clear_errors():
    q, k, v = random_qkv(10, 1, 65, 65, 2, 2, 16)
    full = BlockMask.from_dense_block_map(jnp.ones((1, 1, 5, 5), bool), block_q=16, block_k=16, seq_q=65, seq_k=65)
    with pytest.raises(ValueError, match="num_text \\+ F\\*H\\*W = 0 \\+ 60 = 60 tokens"):
        paro_attention(q, k, v, full, fhw=(3, 4, 5), orders="fhw")
    with pytest.raises(ValueError, match="order must be one of"):
        paro_attention(q, k, v, full, fhw=FHW, orders="xyz", num_text=NUM_TEXT)
    with pytest.raises(ValueError, match="sequence of 2"):
        paro_attention(q, k, v, full, fhw=FHW, orders=("fhw",) * 3, num_text=NUM_TEXT)
    with pytest.raises(TypeError, match="fhw must be a triple"):
        paro_permute(q, (60,), "fhw")
    with pytest.raises(TypeError, match="block_mask must be a jattn BlockMask"):
        paro_attention(q, k, v, np.ones((5, 5), bool), fhw=FHW, orders="fhw", num_text=NUM_TEXT)
    maps = synthetic_maps()
    with pytest.raises(ValueError, match="exactly one of density or threshold"):
        calibrate_block_mask(maps, fhw=(4, 4, 4), orders="fhw", block=16)
    with pytest.raises(ValueError, match="attn_maps must be \\[heads, N, N\\]"):
        calibrate_block_mask(maps[:, :10], fhw=(4, 4, 4), orders="fhw", block=16, density=0.5)
    with pytest.raises(ValueError, match="block must be a power of two"):
        calibrate_block_mask(maps, fhw=(4, 4, 4), orders="fhw", block=24, density=0.5)
    with pytest.raises(ValueError, match="alpha must be"):
        select_paro_order(maps, (4, 4, 4), block=16, alpha=2.0)


def test_all_six_orders_are_distinct_permutations():
    perms = {tuple(paro_permutation((2, 3, 4), o)) for o in PARO_ORDERS}
    assert len(perms) == 6
    assert set(itertools.permutations("fhw")) == {tuple(o) for o in PARO_ORDERS}
