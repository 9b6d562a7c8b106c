"""P63 CLEAR: the circular-window mask against a literal transcription, its BlockMask, attention ==
dense reference (fwd + grads, xla and pallas, GQA, pooled branch, 2-D tiles), the spec's identities, the
module and the errors."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.core.reference import reference_attention
from jattn.methods.sparse import clear as cl
from tests.conftest import assert_close, assert_forward_and_grads_close, forward_and_grads, random_array


def joint_qkv(seed, B, L, H, Hkv, D):
    return random_array(seed, B, L, H, D), random_array(seed + 1, B, L, Hkv, D), random_array(seed + 2, B, L, Hkv, D)


def clear_mask_loop(hw, text_len, radius, n_pooled=0):
    """Literal transcription of the official rule over row-major [text ; image ; pooled] indices."""
    h, w = hw
    image_end = text_len + h * w
    mask = np.zeros((image_end, image_end + n_pooled), bool)
    for i in range(image_end):
        for j in range(image_end + n_pooled):
            if i < text_len:                                    # text query: text and image keys
                mask[i, j] = j < image_end
            elif j < text_len or j >= image_end:                # image query: all text, all pooled
                mask[i, j] = True
            else:
                (yq, xq), (yk, xk) = divmod(i - text_len, w), divmod(j - text_len, w)
                mask[i, j] = (yq - yk) ** 2 + (xq - xk) ** 2 < radius ** 2
    return mask


def layout_order(hw, text_len, tile, n_pooled=0):
    """Row-major token id at each position of the (tiled) layout."""
    image = np.asarray(cl.to_tile_major(jnp.arange(hw[0] * hw[1])[None], hw, tile))[0] + text_len
    return np.concatenate([np.arange(text_len), image, np.arange(n_pooled) + text_len + hw[0] * hw[1]])


MASK_CASES = [  # hw, text_len, radius, down_factor, tile
    ((6, 10), 8, 3, None, None),
    ((6, 10), 5, 2.5, 2, (3, 5)),
    ((8, 8), 0, 1, 4, (4, 4)),
]


@pytest.mark.parametrize("hw,text_len,radius,down_factor,tile", MASK_CASES)
def test_mask_fn_matches_literal_rule(hw, text_len, radius, down_factor, tile):
    n_pooled = cl.num_pooled(hw, down_factor)
    expected = clear_mask_loop(hw, text_len, radius, n_pooled)
    order_q = layout_order(hw, text_len, tile)
    order_k = layout_order(hw, text_len, tile, n_pooled)
    dense = jax.jit(cl.clear_mask, static_argnums=(0, 1, 2), static_argnames=("down_factor", "tile"))(
        hw, text_len, radius, down_factor=down_factor, tile=tile)
    np.testing.assert_array_equal(np.asarray(dense)[0, 0], expected[np.ix_(order_q, order_k)])


@pytest.mark.parametrize("hw,text_len,radius,down_factor,tile", MASK_CASES[1:2])
def test_block_mask_expands_exactly_and_lists_only_visible_tiles(hw, text_len, radius, down_factor, tile):
    bq, bk = 16, 32
    block_mask = cl.clear_block_mask(hw, text_len, radius, down_factor=down_factor, tile=tile, block_q=bq,
                                     block_k=bk)
    dense = np.asarray(cl.clear_mask(hw, text_len, radius, down_factor=down_factor, tile=tile))[0, 0]
    mask_fn = cl.clear_mask_fn(hw, text_len, radius, tile=tile)
    np.testing.assert_array_equal(np.asarray(block_mask.to_dense_mask(mask_fn))[0, 0], dense)
    T, S = dense.shape
    padded = np.zeros((-(-T // bq) * bq, -(-S // bk) * bk), bool)
    padded[:T, :S] = dense
    tiles = padded.reshape(padded.shape[0] // bq, bq, padded.shape[1] // bk, bk)
    np.testing.assert_array_equal(np.asarray(block_mask.to_dense_block_map())[0, 0], tiles.any(axis=(1, 3)))


def test_block_mask_tables_are_concrete_and_narrow_under_jit():
    widths = []

    @jax.jit
    def trace(x):
        widths.append(cl.clear_block_mask((16, 16), 0, 2, block_q=16, block_k=16).max_kv_blocks)
        return x
    trace(1.0)
    assert widths == [3]   # each 16-token row band sees its own and the two adjacent bands, not all 16 blocks


ATTENTION_CASES = [  # impl, hw, text_len, radius, down_factor, tile   (all GQA H=4, Hkv=2)
    ("xla", (6, 10), 8, 3, 2, None),
    ("pallas", (8, 8), 16, 2.5, 2, (4, 4)),
]


@pytest.mark.parametrize("impl,hw,text_len,radius,down_factor,tile", ATTENTION_CASES)
def test_attention_equals_dense_reference(impl, hw, text_len, radius, down_factor, tile):
    L = text_len + hw[0] * hw[1]
    q, k, v = joint_qkv(1, 2, L, 4, 2, 16)
    weights = random_array(5, down_factor, down_factor) if down_factor else None
    pool = lambda x: [cl.downsample_kv(x, hw, text_len, down_factor, weights)] if down_factor else []
    mask = jnp.asarray(clear_mask_loop(hw, text_len, radius, cl.num_pooled(hw, down_factor)))

    def reference(q, k, v):
        return reference_attention(q, jnp.concatenate([k, *pool(k)], 1), jnp.concatenate([v, *pool(v)], 1),
                                   mask=mask)

    def clear(q, k, v):
        down = (pool(k)[0], pool(v)[0]) if down_factor else (None, None)
        return cl.clear_attention(q, k, v, hw, text_len, radius, *down, tile=tile, block_q=16, block_k=16,
                                  impl=impl)

    assert_forward_and_grads_close(forward_and_grads(clear, q, k, v), forward_and_grads(reference, q, k, v))


def test_spec_identities_full_radius_text_rows_and_key_count():
    hw, text_len, radius = (5, 7), 6, 2
    L = text_len + 35
    q, k, v = joint_qkv(2, 1, L, 4, 2, 8)
    mask = jnp.asarray(clear_mask_loop(hw, text_len, radius))

    @jax.jit
    def outputs(q, k, v):
        attend = lambda r, tile: cl.clear_attention(q, k, v, hw, text_len, r, tile=tile, block_q=16, block_k=16,
                                                    impl="xla")
        return (reference_attention(q, k, v), reference_attention(q, k, v, mask=mask),
                attend(math.hypot(*hw), None), attend(radius, None), attend(radius, (5, 7)))
    full, masked, wide, local, local_tiled = outputs(q, k, v)
    assert_close(local, masked, what="no pooled branch == dense masked reference")
    assert_close(local_tiled, masked, what="2-D tiled layout")
    assert_close(wide, full, what="r >= sqrt(h^2 + w^2)")
    assert_close(local[:, :text_len], full[:, :text_len], what="text rows")
    assert float(jnp.abs(local[:, text_len:] - full[:, text_len:]).max()) > 1e-3   # image rows are local
    # image keys of an interior query: #{(dy, dx): dy^2 + dx^2 < r^2} (25 for r = 3, 21 for r = 2.5)
    assert (cl.window_key_count(3), cl.window_key_count(2.5), cl.window_key_count(1)) == (25, 21, 1)
    hw, text_len = (12, 13), 3
    for radius in (3, 2.5):
        mask = np.asarray(clear_mask_loop(hw, text_len, radius))
        row = text_len + 6 * hw[1] + 6                                   # (6, 6): interior for r <= 3
        assert mask[row, text_len:].sum() == cl.window_key_count(radius)
        assert mask[row, :text_len].all()


def test_pooled_branch_with_f1_and_unit_weights_duplicates_image_keys():
    hw, text_len, radius = (4, 6), 4, 2
    L = text_len + 24
    q, k, v = joint_qkv(3, 1, L, 2, 2, 8)
    # image queries: text keys once; in-disc image keys twice (local + pooled copy), the others once (pooled)
    local = clear_mask_loop(hw, text_len, radius)
    image_rows = np.arange(L)[:, None] >= text_len
    bias = jnp.asarray(np.where(image_rows & local & (np.arange(L)[None, :] >= text_len), np.log(2.0), 0.0),
                       jnp.float32)

    @jax.jit
    def outputs(q, k, v):
        ones = jnp.ones((1, 1))
        k_down, v_down = (cl.downsample_kv(x, hw, text_len, 1, ones) for x in (k, v))
        out = cl.clear_attention(q, k, v, hw, text_len, radius, k_down, v_down, block_q=16, block_k=16,
                                 impl="xla")
        return k_down, out, reference_attention(q, k, v, bias=bias)
    k_down, out, expected = outputs(q, k, v)
    assert_close(k_down, k[:, text_len:])
    assert_close(out, expected)


def test_downsample_kv_is_a_weighted_cell_sum():
    hw, text_len, f = (4, 6), 3, 2
    x = random_array(4, 2, text_len + 24, 2, 3)
    weights = random_array(5, f, f)
    pooled = np.asarray(cl.downsample_kv(x, hw, text_len, f, weights))
    image = np.asarray(x)[:, text_len:].reshape(2, 4, 6, 2, 3)
    for Y, X in itertools.product(range(2), range(3)):
        cell = sum(float(weights[dy, dx]) * image[:, Y * f + dy, X * f + dx] for dy in range(f) for dx in range(f))
        np.testing.assert_allclose(pooled[:, Y * 3 + X], cell, atol=1e-5)
    default = np.asarray(cl.downsample_kv(x, hw, text_len, f))
    np.testing.assert_allclose(default[:, 0], image[:, :2, :2].mean(axis=(1, 2)), atol=1e-6)


def test_proportional_scale_and_distillation_loss():
    assert cl.proportional_scale(4608, 64) == pytest.approx(0.125)
    assert cl.proportional_scale(4608, 64, pooled=True) == pytest.approx(math.sqrt(math.log(46080, 4608) / 64))
    s, t = random_array(6, 2, 5), random_array(7, 2, 5)
    a = [random_array(8, 3, 4), random_array(9, 3, 4)]
    b = [random_array(10, 3, 4), random_array(11, 3, 4)]
    mse = lambda x, y: float(np.mean((np.asarray(x) - np.asarray(y)) ** 2))
    expected = 1.5 + 0.5 * mse(s, t) + 0.5 * (mse(a[0], b[0]) + mse(a[1], b[1])) / 2
    assert float(cl.clear_distillation_loss(1.5, s, t, a, b)) == pytest.approx(expected, rel=1e-5)


def test_module_equals_its_composition_and_trains_pool_weights():
    hw, text_len, radius, f = (4, 4), 4, 2, 2
    module = cl.CLEARAttention(16, 2, hw, text_len, radius, down_factor=f, block_q=16, block_k=16, impl="xla",
                               rngs=nnx.Rngs(0))
    x = random_array(12, 2, text_len + 16, 16)

    @nnx.jit
    def run(module, x):
        heads = lambda t: t.reshape(2, text_len + 16, 2, 8)
        q, k, v = heads(module.to_q(x)), heads(module.to_k(x)), heads(module.to_v(x))
        w = module.pool_weights[...]
        keys = jnp.concatenate([k, cl.downsample_kv(k, hw, text_len, f, w)], 1)
        values = jnp.concatenate([v, cl.downsample_kv(v, hw, text_len, f, w)], 1)
        attn = reference_attention(q, keys, values, mask=cl.clear_mask(hw, text_len, radius, down_factor=f))
        grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(module)
        return module(x), module.to_out(attn.reshape(x.shape)), grads
    out, by_hand, grads = run(module, x)
    assert_close(out, by_hand)
    assert float(jnp.abs(grads.pool_weights[...]).sum()) > 0
    np.testing.assert_allclose(module.pool_weights[...], np.full((f, f), 0.25))


def test_bad_inputs_raise_clear_errors():
    hw, text_len = (4, 4), 2
    q, k, v = joint_qkv(13, 1, 18, 2, 2, 8)
    with pytest.raises(ValueError, match="18 tokens|= 19"):
        cl.clear_attention(q, k, v, hw, 3, 2)
    with pytest.raises(ValueError, match="radius must be a finite number > 0"):
        cl.clear_attention(q, k, v, hw, text_len, 0)
    with pytest.raises(TypeError, match="hw must be a pair"):
        cl.clear_attention(q, k, v, (4, 4, 1), text_len, 2)
    with pytest.raises(ValueError, match="k_down and v_down must be given together"):
        cl.clear_attention(q, k, v, hw, text_len, 2, k[:, :4])
    with pytest.raises(ValueError, match="k_down must have shape"):
        cl.clear_attention(q, k, v, hw, text_len, 2, k[:, :4, :1], v[:, :4, :1])
    with pytest.raises(ValueError, match="tile=\\(3, 2\\) must divide"):
        cl.clear_attention(q, k, v, hw, text_len, 2, tile=(3, 2))
    with pytest.raises(ValueError, match="down_factor=3 must divide"):
        cl.downsample_kv(k, hw, text_len, 3)
    with pytest.raises(ValueError, match="weights must have shape"):
        cl.downsample_kv(k, hw, text_len, 2, jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="text_len must be an int >= 0"):
        cl.clear_mask_fn(hw, -1, 2)
    with pytest.raises(ValueError, match="x must have text_len"):
        nnx.eval_shape(lambda: cl.CLEARAttention(16, 2, hw, text_len, 2, rngs=nnx.Rngs(0)))(jnp.ones((1, 17, 16)))
