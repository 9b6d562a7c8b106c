"""jattn.attention: every impl against the fp32 reference, forward and gradients, plus validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jattn.core.reference import reference_attention
from jattn.ops.attention import attention
from pallas_kernels import common
from tests.conftest import assert_close, random_qkv

GROUPINGS = [(1, 1), (4, 1), (8, 4), (6, 2)]


def make_inputs(seed, B, T, S, H, Hkv, D, dtype=jnp.float32, *, mask=None, bias=None, sinks=False,
                segments=False, **static):
    """Random q, k, v plus the requested optional arguments, split into (differentiable, static)."""
    q, k, v = random_qkv(seed, B, T, S, H, Hkv, D, dtype)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1000), 4)
    diff, static = {}, dict(static)
    if bias is not None:
        diff["bias"] = jax.random.normal(keys[0], bias(B, H, T, S), jnp.float32)
    if sinks:
        diff["sinks"] = jax.random.normal(keys[1], (H,), jnp.float32)
    if mask is not None:
        static["mask"] = jax.random.bernoulli(keys[2], 0.5, mask(B, H, T, S))
    if segments:
        static["segment_ids"] = (jnp.sort(jax.random.randint(keys[3], (B, T), 0, 3), -1),
                                 jnp.sort(jax.random.randint(keys[3], (B, S), 0, 3), -1))
    return (q, k, v), diff, static


def loss_fn(impl, static, **blocks):
    """A loss that uses out and lse, so both cotangents flow."""
    def loss(q, k, v, diff):
        out, lse = attention(q, k, v, impl=impl, return_lse=True, **diff, **static, **blocks)
        return jnp.sum(out.astype(jnp.float32) * jnp.cos(out.astype(jnp.float32))) + 0.1 * jnp.sum(
            jnp.where(jnp.isfinite(lse), lse, 0.0))
    return loss


def check_against_reference(impl, qkv, diff, static, dtype=jnp.float32, **blocks):
    out, lse = attention(*qkv, impl=impl, return_lse=True, **diff, **static, **blocks)
    ref_out, ref_lse = reference_attention(*qkv, return_lse=True, **diff, **static)
    assert out.dtype == qkv[0].dtype and lse.dtype == jnp.float32
    assert_close(out, ref_out, dtype, what="out")
    assert_close(lse, ref_lse, dtype, what="lse")
    grads = jax.grad(loss_fn(impl, static, **blocks), argnums=(0, 1, 2, 3))(*qkv, diff)
    ref_grads = jax.grad(loss_fn("reference", static), argnums=(0, 1, 2, 3))(*qkv, diff)
    for name, g, rg in zip("qkv", grads[:3], ref_grads[:3]):
        assert_close(g, rg, dtype, factor=2, what=f"d{name}")
    for name in diff:
        assert_close(grads[3][name], ref_grads[3][name], dtype, factor=2, what=f"d{name}")


FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window": (9, 4)},
    "causal_window_sinks": {"causal": True, "window": (20, 0), "sinks": True},
    "bias_full_softcap": {"bias": lambda B, H, T, S: (B, H, T, S), "softcap": 3.0},
    "bias_key_padding": {"bias": lambda B, H, T, S: (B, 1, 1, S), "causal": True},
    "mask_per_batch": {"mask": lambda B, H, T, S: (B, 1, T, S)},
    "mask_per_head_and_bias": {"mask": lambda B, H, T, S: (1, H, T, S), "bias": lambda B, H, T, S: (1, H, T, S)},
    "segments_causal": {"segments": True, "causal": True},
}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("H,Hkv", [(1, 1), (6, 2)])
def test_xla_matches_reference_f32(feature, H, Hkv):
    qkv, diff, static = make_inputs(1, 2, 45, 37, H, Hkv, 16, **FEATURES[feature])
    check_against_reference("xla", qkv, diff, static, block_q=16, block_k=16)


@pytest.mark.parametrize("feature", ["causal", "bias_full_softcap", "causal_window_sinks"])
def test_xla_matches_reference_bf16(feature):
    qkv, diff, static = make_inputs(2, 1, 40, 40, 4, 2, 32, jnp.bfloat16, **FEATURES[feature])
    check_against_reference("xla", qkv, diff, static, jnp.bfloat16, block_q=16, block_k=32)


@settings(max_examples=6)
@given(T=st.integers(1, 70), S=st.integers(1, 70), grouping=st.sampled_from(GROUPINGS),
       block_q=st.sampled_from([16, 32]), block_k=st.sampled_from([16, 64]), causal=st.booleans(),
       left=st.one_of(st.none(), st.integers(0, 40)), use_mask=st.booleans(), seed=st.integers(0, 999))
def test_xla_property_over_shapes_groupings_masks_and_blocks(T, S, grouping, block_q, block_k, causal, left,
                                                             use_mask, seed):
    H, Hkv = grouping
    options = {"causal": causal}
    if left is not None:
        options["window"] = (left, left // 2)
    if use_mask:
        options["mask"] = lambda B, H, T, S: (B, 1, T, S)
    qkv, diff, static = make_inputs(seed, 1, T, S, H, Hkv, 16, **options)
    # Forward and lse only: gradients of every feature are covered by the parametrized tests above.
    out, lse = attention(*qkv, impl="xla", return_lse=True, block_q=block_q, block_k=block_k, **static)
    ref_out, ref_lse = reference_attention(*qkv, return_lse=True, **static)
    assert_close(out, ref_out, what="out")
    assert_close(lse, ref_lse, what="lse")


def test_fully_masked_rows_are_zero_with_minus_inf_lse_and_finite_grads():
    q, k, v = random_qkv(3, 2, 33, 33, 4, 2, 16)
    mask = jnp.ones((2, 1, 33, 33), bool).at[0, :, 5].set(False).at[1, :, 20:].set(False)
    out, lse = attention(q, k, v, mask=mask, impl="xla", return_lse=True, block_q=16, block_k=16)
    assert np.all(np.asarray(out[0, 5]) == 0) and np.all(np.asarray(out[1, 20:]) == 0)
    assert np.all(np.isneginf(np.asarray(lse[0, 5]))) and np.all(np.isneginf(np.asarray(lse[1, 20:])))
    assert not np.any(np.isnan(np.asarray(out)))
    grads = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, mask=mask, impl="xla", block_q=16,
                                                       block_k=16) ** 2), (0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    # A window that sees nothing: every row is empty.
    out = attention(q, k, v, causal=True, window=(0, 0), mask=jnp.zeros((1, 1, 1, 33), bool), impl="xla")
    assert np.all(np.asarray(out) == 0)


def test_xla_is_deterministic():
    qkv, diff, static = make_inputs(4, 1, 50, 50, 4, 2, 16, causal=True, sinks=True)
    f = jax.jit(lambda q, k, v, d: jax.value_and_grad(loss_fn("xla", static, block_q=16, block_k=16),
                                                      argnums=(0, 1, 2, 3))(q, k, v, d))
    first, second = f(*qkv, diff), f(*qkv, diff)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def brute_force_tiles(T, S, bq, bk, causal, window):
    i, j = np.meshgrid(np.arange(T), np.arange(S), indexing="ij")
    visible = np.ones((T, S), bool)
    if causal:
        visible &= j <= i
    if window is not None:
        visible &= (j >= i - window[0]) & (j <= i + window[1])
    nq, nk = -(-T // bq), -(-S // bk)
    padded = np.zeros((nq * bq, nk * bk), bool)
    padded[:T, :S] = visible
    real = np.zeros_like(padded)
    real[:T, :S] = True
    tiles = padded.reshape(nq, bq, nk, bk)
    real_tiles = real.reshape(nq, bq, nk, bk)
    any_visible = tiles.any(axis=(1, 3))
    # Full: every real query row sees every key of the tile and the tile has no padded keys.
    rows_real = real_tiles[:, :, 0, 0]
    full = np.array([[tiles[a, rows_real[a], b].all() and real_tiles[0, 0, b].all() for b in range(nk)]
                     for a in range(nq)])
    return any_visible, full


@given(T=st.integers(1, 90), S=st.integers(1, 90), bq=st.sampled_from([16, 32]), bk=st.sampled_from([16, 32]),
       causal=st.booleans(), window=st.one_of(st.none(), st.tuples(st.integers(0, 50), st.integers(0, 50))),
       extra_blocks=st.integers(0, 2))
def test_tile_ranges_skip_exactly_the_empty_tiles(T, S, bq, bk, causal, window, extra_blocks):
    """``common.tile_ranges`` (the xla path and the Pallas flash kernel, both sides); ``extra_blocks`` pads the
    block count the way the Pallas kernel does when its other block size is larger."""
    any_visible, full = brute_force_tiles(T, S, bq, bk, causal, window)
    geometry = dict(causal=causal, window=window, block_q=bq, block_k=bk, seq_q=T, seq_k=S)
    for over, visible, full_tiles in (("kv", any_visible, full), ("q", any_visible.T, full.T)):
        n_rows, n_real = visible.shape
        n_cols = n_real + extra_blocks
        for row in range(n_rows):
            ranges = common.tile_ranges(row, over=over, num_blocks=n_cols, **geometry)
            lo, full_lo, full_hi, hi = (int(x) for x in ranges)
            assert 0 <= lo <= full_lo <= full_hi <= hi <= n_cols, (over, row, ranges)
            visited = np.zeros(n_cols, bool)
            visited[lo:hi] = True
            assert np.array_equal(visited[:n_real], visible[row]) and not visited[n_real:].any(), (over, row, lo, hi)
            assert full_tiles[row, full_lo:full_hi].all(), (over, row, full_lo, full_hi)


def test_auto_lowers_the_xla_path_on_cpu_and_reference_impl_is_the_reference():
    """"auto" is decided at lowering time: the CPU program holds no Pallas kernel (no interpreter loop)."""
    q, k, v = random_qkv(5, 1, 8, 8, 2, 1, 16)
    def lowered(impl):
        fn = jax.jit(lambda q, k, v: attention(q, k, v, causal=True, impl=impl))
        return fn.lower(q, k, v).as_text(debug_info=True)
    cpu_text, pallas_text = lowered("auto"), lowered("pallas")
    assert "jattn_flash" not in cpu_text and "flash_attention_xla" in cpu_text
    assert "jattn_flash" in pallas_text
    q, k, v = random_qkv(5, 1, 8, 8, 2, 1, 16)
    assert np.array_equal(np.asarray(attention(q, k, v, impl="reference", causal=True)),
                          np.asarray(reference_attention(q, k, v, causal=True)))


def test_jit_with_default_blocks_and_long_odd_length():
    q, k, v = random_qkv(6, 1, 700, 531, 4, 4, 32)
    out = jax.jit(lambda q, k, v: attention(q, k, v, causal=True, impl="xla"))(q, k, v)
    assert_close(out, reference_attention(q, k, v, causal=True))


q0, k0, v0 = random_qkv(0, 2, 8, 6, 4, 2, 16)
BAD_CALLS = [
    (dict(q=q0[0]), ValueError, "q must have rank 4"),
    (dict(q=q0.astype(jnp.int32)), TypeError, "q must have a floating dtype"),
    (dict(k=k0[:1]), ValueError, "batch sizes differ"),
    (dict(k=k0[..., :8], v=v0[..., :8]), ValueError, "k must have head dim D=16"),
    (dict(v=v0[:, :5]), ValueError, "k and v must share"),
    (dict(k=jnp.concatenate([k0, k0, k0], 2), v=jnp.concatenate([v0, v0, v0], 2)), ValueError,
     "multiple of k/v heads"),
    (dict(window=(-1, 2)), ValueError, "window sizes must be >= 0"),
    (dict(window=(1, 2, 3)), TypeError, "window must be an int n"),
    (dict(mask=jnp.ones((2, 4, 8, 5), bool)), ValueError, "mask must be broadcastable"),
    (dict(mask=jnp.ones((2, 4, 8, 6))), TypeError, "mask must be a bool array"),
    (dict(bias=jnp.ones((3, 1, 8, 6))), ValueError, "bias must be broadcastable"),
    (dict(sinks=jnp.ones((3,))), ValueError, r"sinks must have shape \[H\]"),
    (dict(segment_ids=jnp.zeros((2, 8), jnp.int32)), ValueError, "needs T == S"),
    (dict(segment_ids=(jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 5), jnp.int32))), ValueError,
     r"segment_ids \(kv\) must have shape"),
    (dict(segment_ids=(jnp.zeros((2, 8)), jnp.zeros((2, 6)))), TypeError, "must be an integer array"),
    (dict(softcap=0.0), ValueError, "softcap must be a finite number > 0"),
    (dict(scale=-1.0), ValueError, "scale must be a finite number > 0"),
    (dict(impl="cuda"), ValueError, "impl must be one of"),
    (dict(block_q=24), ValueError, "block_q must be a power of two >= 16"),
    (dict(block_k=8), ValueError, "block_k must be a power of two >= 16"),
    (dict(block_k=16.0), TypeError, "block_k must be an int"),
]


@pytest.mark.parametrize("override,error,message", BAD_CALLS, ids=[c[2][:30] for c in BAD_CALLS])
@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_bad_arguments_raise_naming_the_argument(override, error, message, impl):
    args = dict(q=q0, k=k0, v=v0, impl=impl)
    args.update(override)
    if impl == "reference" and "block" in message:
        args["impl"] = "xla"
    with pytest.raises(error, match=message):
        attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize("feature", ["causal_window_sinks", "mask_per_head_and_bias", "segments_causal"])
def test_pallas_impl_through_the_public_entry_point(feature):
    qkv, diff, static = make_inputs(7, 1, 29, 21, 4, 2, 16, **FEATURES[feature])
    check_against_reference("pallas", qkv, diff, static, block_q=16, block_k=16)


@pytest.mark.parametrize("T,S", [(1, 9), (3, 1), (1, 1)])
def test_xla_handles_lengths_shorter_than_the_smallest_block(T, S):
    qkv, diff, static = make_inputs(8, 2, T, S, 4, 1, 16, causal=True, sinks=True)
    check_against_reference("xla", qkv, diff, static)
