"""P52 DaViT: window mask against a literal transcription, its block-diagonal BlockMask, window attention
== dense reference == direct window reshape (fwd + grads, xla and pallas, GQA, non-divisible grid),
channel group attention (explicit reference, channels-as-tokens attention, token-permutation
equivariance, linear FLOPs in N), the modules against the official formulas, errors."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.core.reference import reference_attention
from jattn.methods.sparse import davit as dv
from tests.conftest import (assert_close, assert_forward_and_grads_close, build_module, forward_and_grads,
                            random_array)


def flat(x):
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def window_mask_loop(hw, window):
    """Literal rule: tokens (y, x) and (y', x') attend each other iff they share the window (y // wh, x // ww)."""
    (Hgt, Wid), (wh, ww) = hw, window
    N = Hgt * Wid
    mask = np.zeros((N, N), bool)
    for i, j in itertools.product(range(N), range(N)):
        (yi, xi), (yj, xj) = divmod(i, Wid), divmod(j, Wid)
        mask[i, j] = yi // wh == yj // wh and xi // ww == xj // ww
    return mask


# ---------------------------------------------------------------------------------------- spatial windows

@pytest.mark.parametrize("hw,window", [((7, 10), (3, 4)), ((8, 8), (4, 4))])
def test_window_mask_fn_matches_literal_rule(hw, window):
    N = hw[0] * hw[1]
    dense = dv.window_mask_fn(hw, window)(0, 0, np.arange(N)[:, None], np.arange(N)[None, :])
    np.testing.assert_array_equal(np.asarray(dense), window_mask_loop(hw, window))


@pytest.mark.parametrize("hw,window,block", [((7, 10), (3, 4), 16), ((8, 8), (4, 4), 16)])
def test_block_mask_is_block_diagonal_and_expands_to_the_window_mask(hw, window, block):
    block_mask = dv.window_block_mask(hw, window, block)
    layout = np.asarray(block_mask.to_dense_mask(dv.window_layout_mask_fn(hw, window, block)))[0, 0]
    token_at = np.asarray(dv.to_window_major(jnp.arange(1, hw[0] * hw[1] + 1).reshape(1, *hw), window, block))[0] - 1
    pos = np.argsort(np.where(token_at < 0, np.iinfo(np.int32).max, token_at))[:hw[0] * hw[1]]
    assert np.array_equal(token_at[pos], np.arange(hw[0] * hw[1]))
    np.testing.assert_array_equal(layout[np.ix_(pos, pos)], window_mask_loop(hw, window))
    assert not layout[:, token_at < 0].any()                        # padding rows / outside the grid hidden
    n = layout.shape[0] // block
    tiles = layout.reshape(n, block, n, block).any(axis=(1, 3))
    np.testing.assert_array_equal(np.asarray(block_mask.to_dense_block_map())[0, 0], tiles)
    np.testing.assert_array_equal(tiles, np.eye(n, dtype=bool))


HW, WINDOW = (7, 10), (3, 4)   # not divisible: 3 x 3 windows, the last row / column partial


@pytest.fixture(scope="module")
def window_case():
    q, k, v = random_array(1, 2, *HW, 4, 16), random_array(2, 2, *HW, 2, 16), random_array(3, 2, *HW, 2, 16)  # GQA
    mask = jnp.asarray(window_mask_loop(HW, WINDOW))
    ref = lambda q, k, v: reference_attention(flat(q), flat(k), flat(v), mask=mask).reshape(q.shape)
    return (q, k, v), forward_and_grads(ref, q, k, v)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_window_attention_equals_dense_reference(impl, window_case):
    qkv, expected = window_case
    fn = lambda q, k, v: dv.window_attention_2d(q, k, v, WINDOW, impl=impl)
    assert_forward_and_grads_close(forward_and_grads(fn, *qkv), expected, f"window_attention_2d[{impl}]")


def test_direct_window_reshape_equals_dense_reference(window_case):
    qkv, expected = window_case
    fn = lambda q, k, v: dv.window_attention_2d_direct(q, k, v, WINDOW)
    assert_forward_and_grads_close(forward_and_grads(fn, *qkv), expected, "window_attention_2d_direct")


def test_window_covering_the_grid_is_full_attention():
    q, k, v = random_array(4, 1, 5, 6, 2, 8), random_array(5, 1, 5, 6, 2, 8), random_array(6, 1, 5, 6, 2, 8)

    @jax.jit
    def outputs(q, k, v):
        return dv.window_attention_2d(q, k, v, 7, impl="xla"), reference_attention(flat(q), flat(k), flat(v))
    out, full = outputs(q, k, v)
    assert_close(out, full.reshape(out.shape))


# ---------------------------------------------------------------------------------------- channel groups

def channel_attention_loop(q, k, v, groups, scale):
    """Per group: A = softmax(Q_g^T K_g * scale) [C_g, C_g], out_g = V_g A^T (GQA: kv group g // rep)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    cg = q.shape[2] // groups
    rep = groups // (k.shape[2] // cg)
    out = np.zeros_like(q)
    attention = np.zeros((q.shape[0], groups, cg, cg))
    for b, g in itertools.product(range(q.shape[0]), range(groups)):
        kg = (g // rep) * cg
        logits = q[b, :, g * cg:(g + 1) * cg].T @ k[b, :, kg:kg + cg] * scale
        a = np.exp(logits - logits.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        attention[b, g] = a
        out[b, :, g * cg:(g + 1) * cg] = v[b, :, kg:kg + cg] @ a.T
    return out, attention


@pytest.mark.parametrize("groups,kv_channels", [(4, 32), (4, 16)])   # MHA-style and GQA-style (2 kv groups)
def test_channel_attention_equals_explicit_reference(groups, kv_channels):
    q, k, v = random_array(7, 2, 30, 32), random_array(8, 2, 30, kv_channels), random_array(9, 2, 30, kv_channels)
    out, attention = jax.jit(dv.channel_group_attention, static_argnums=3,
                             static_argnames="return_attention")(q, k, v, groups, return_attention=True)
    ref_out, ref_attention = channel_attention_loop(q, k, v, groups, (32 // groups) ** -0.5)
    assert_close(out, ref_out)
    assert_close(attention, ref_attention)
    np.testing.assert_allclose(np.asarray(attention).sum(-1), 1.0, atol=1e-5)


def test_channel_attention_is_attention_over_channels_with_tokens_as_features():
    B, N, G, cg = 2, 24, 2, 8
    q, k, v = random_array(10, B, N, G * cg), random_array(11, B, N, G * cg), random_array(12, B, N, G * cg)
    as_tokens = lambda x: jnp.transpose(x.reshape(B, N, G, cg), (0, 3, 2, 1))   # [B, C_g tokens, G heads, N]
    ref = lambda q, k, v: jnp.transpose(reference_attention(as_tokens(q), as_tokens(k), as_tokens(v),
                                                            scale=cg ** -0.5), (0, 3, 2, 1)).reshape(B, N, G * cg)
    assert_forward_and_grads_close(forward_and_grads(lambda q, k, v: dv.channel_group_attention(q, k, v, G), q, k, v),
                forward_and_grads(ref, q, k, v), "channel_group_attention")


@pytest.mark.optimized
def test_channel_attention_is_token_permutation_equivariant_and_linear_in_tokens():
    q, k, v = random_array(13, 1, 40, 16), random_array(14, 1, 40, 16), random_array(15, 1, 40, 16)
    perm = np.random.default_rng(16).permutation(40)
    fn = jax.jit(lambda q, k, v: dv.channel_group_attention(q, k, v, 2, return_attention=True))
    out, attention = fn(q, k, v)
    out_p, attention_p = fn(q[:, perm], k[:, perm], v[:, perm])
    assert_close(out_p, out[:, perm])
    assert_close(attention_p, attention)

    def flops(N):
        x = jax.ShapeDtypeStruct((1, N, 32), jnp.float32)
        cost = jax.jit(lambda q, k, v: dv.channel_group_attention(q, k, v, 4)).lower(x, x, x).compile().cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    ratio = flops(1024) / flops(256)
    assert 3.6 < ratio < 4.4, ratio                                   # 4x the tokens -> ~4x the FLOPs


# ---------------------------------------------------------------------------------------- modules

def test_spatial_window_module_pads_like_the_official_block():
    module = build_module(lambda: dv.SpatialWindowAttention(16, 2, 3, impl="xla", rngs=nnx.Rngs(0)))
    x = random_array(17, 2, 5, 7, 16)                                # padded to 6 x 9 (2 x 3 windows)

    @nnx.jit
    def outputs(module, x):
        padded = jnp.pad(x, [(0, 0), (0, 1), (0, 2), (0, 0)])        # zeros BEFORE qkv: padded keys are real
        q, k, v = (t.reshape(2, 54, 2, 8) for t in jnp.split(module.qkv(padded), 3, axis=-1))
        attn = reference_attention(q, k, v, mask=jnp.asarray(window_mask_loop((6, 9), (3, 3))))
        return module(x), module.proj(attn.reshape(2, 6, 9, 16))[:, :5, :7]
    out, expected = outputs(module, x)
    assert_close(out, expected)


def test_channel_module_matches_the_official_role_assignment():
    module = build_module(lambda: dv.ChannelGroupAttention(16, 4, rngs=nnx.Rngs(1)), seed=1)
    x = random_array(18, 2, 3, 5, 16)
    out = nnx.jit(lambda m, x: m(x))(module, x)
    qkv = np.asarray(module.qkv(x.reshape(2, 15, 16)), np.float64).reshape(2, 15, 3, 4, 4).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv                                                    # [B, groups, N, C_g] each
    attention = np.einsum("bgnc,bgnd->bgcd", k * 4 ** -0.5, v)       # official: (k * scale)^T v
    attention = np.exp(attention - attention.max(-1, keepdims=True))
    attention /= attention.sum(-1, keepdims=True)
    official = np.einsum("bgcd,bgnd->bgnc", attention, q)            # (A q^T)^T
    official = official.transpose(0, 2, 1, 3).reshape(2, 15, 16)
    assert_close(out, module.proj(jnp.asarray(official, jnp.float32)).reshape(2, 3, 5, 16))


def test_davit_classifier_runs_and_dual_block_trains():
    # impl="reference" (the dense masked oracle) keeps compile time small; the kernels are checked above.
    model = build_module(lambda: dv.DaViT(num_classes=5, dims=(8, 16), heads=(1, 2), depths=(1, 1), window=2,
                                   impl="reference", rngs=nnx.Rngs(2)))
    images = random_array(19, 2, 15, 13, 3)                          # stem pads to 16 x 16 -> 4 x 4 -> 2 x 2
    logits = nnx.jit(lambda m, x: m(x))(model, images)
    assert logits.shape == (2, 5) and np.all(np.isfinite(logits))
    block = build_module(lambda: dv.DualAttentionBlock(8, 2, 3, impl="reference", rngs=nnx.Rngs(3)), seed=3)
    x = random_array(20, 1, 5, 4, 8)
    grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(jnp.sin(m(x)))))(block, x)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    for module in (grads.spatial, grads.channel):
        assert float(jnp.abs(module.attn.qkv.kernel[...]).sum()) > 0
        assert float(jnp.abs(module.cpe_kernels[...]).sum()) > 0


# ---------------------------------------------------------------------------------------- what the blocks compute

def layer_norm_np(x, norm, eps=1e-5):
    x = np.asarray(x, np.float64)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(norm.scale[...], np.float64) + np.asarray(norm.bias[...])


def gelu_exact_np(x):
    from scipy.special import erf
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def linear_np(x, layer):
    return np.asarray(x, np.float64) @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...])


def conv_np(x, kernel, bias, stride, pad, groups_depthwise=False):
    """Correlation of ``x [B, H, W, Cin]`` (zero ``pad`` on every side) with ``kernel [kh, kw, Cin, Cout]``, or
    depthwise with ``kernel [kh, kw, C]``; float64 loops over kernel offsets."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    kh, kw = kernel.shape[:2]
    x = np.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    Ho, Wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = 0.0
    for dy, dx in itertools.product(range(kh), range(kw)):
        patch = x[:, dy:dy + stride * (Ho - 1) + 1:stride, dx:dx + stride * (Wo - 1) + 1:stride]
        out = out + (patch * kernel[dy, dx] if groups_depthwise else patch @ kernel[dy, dx])
    return out + np.asarray(bias, np.float64)


def run(module, x):
    return np.asarray(nnx.jit(lambda m, x: m(x))(module, jnp.asarray(x, jnp.float32)), np.float64)


def davit_block_np(x, block):
    """The official SpatialBlock / ChannelBlock skeleton around the block's own attention module:
    ``x += DWConv3x3_0(x); x += attn(LN1 x); x += DWConv3x3_1(x); x += fc2(GELU(fc1(LN2 x)))``."""
    x = x + conv_np(x, block.cpe_kernels[0], block.cpe_biases[0], 1, 1, groups_depthwise=True)
    x = x + run(block.attn, layer_norm_np(x, block.norm1))
    x = x + conv_np(x, block.cpe_kernels[1], block.cpe_biases[1], 1, 1, groups_depthwise=True)
    return x + linear_np(gelu_exact_np(linear_np(layer_norm_np(x, block.norm2), block.fc1)), block.fc2)


def test_dual_block_equals_literal_composition():
    """DualAttentionBlock = ChannelBlock(SpatialBlock(x)), each block written out in float64.

    Mutations caught: a ConvPosEnc residual (``x +``) dropped; the attention or MLP residual dropped; norm1 and
    norm2 swapped; tanh-approximate GELU; the dual block running channel before spatial (or only one)."""
    block = build_module(lambda: dv.DualAttentionBlock(8, 2, 3, impl="reference", rngs=nnx.Rngs(3)), seed=4)
    x = np.random.default_rng(21).standard_normal((2, 5, 4, 8))
    spatial = davit_block_np(x, block.spatial)
    assert_close(run(block.spatial, x), spatial, what="spatial block")
    assert_close(run(block.channel, x), davit_block_np(x, block.channel), what="channel block")
    assert_close(run(block, x), davit_block_np(spatial, block.channel), what="dual block")


def test_davit_classifier_equals_literal_composition():
    """Stem (pad to /4, 7x7 stride-4 conv, LN), per stage LN + pad + 2x2 stride-2 conv then the dual blocks,
    global average pool, LN, head: written out in float64 around the model's own dual blocks.

    Mutations caught: the merge LayerNorm skipped; max pooling instead of the mean; the final norm skipped."""
    model = build_module(lambda: dv.DaViT(num_classes=5, dims=(8, 16), heads=(1, 2), depths=(1, 1), window=2,
                                   impl="reference", rngs=nnx.Rngs(2)), seed=5)
    images = np.random.default_rng(22).standard_normal((2, 15, 13, 3))
    logits = run(model, images)
    x = np.pad(images, [(0, 0), (0, 1), (0, 3), (0, 0)])                          # 16 x 16
    x = layer_norm_np(conv_np(x, model.stem.kernel[...], model.stem.bias[...], 4, 3), model.stem_norm)   # 4 x 4
    x = run(model.stages[0][0], x)
    x = conv_np(layer_norm_np(x, model.merge_norms[0]), model.merges[0].kernel[...], model.merges[0].bias[...], 2, 0)
    x = run(model.stages[1][0], x)                                                 # 2 x 2
    want = linear_np(layer_norm_np(x.mean(axis=(1, 2)), model.norm), model.head)
    assert_close(logits, want, what="DaViT logits")


def test_bad_inputs_raise_clear_errors():
    q, k, v = random_array(20, 1, 4, 4, 2, 8), random_array(21, 1, 4, 4, 2, 8), random_array(22, 1, 4, 4, 2, 8)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        dv.window_attention_2d(q, k, v, 0)
    with pytest.raises(TypeError, match="window must be an int or a pair"):
        dv.window_attention_2d(q, k, v, (2, 2, 2))
    with pytest.raises(ValueError, match="q must have rank 5"):
        dv.window_attention_2d(q[0], k, v, 2)
    with pytest.raises(ValueError, match="spatial shape"):
        dv.window_attention_2d(q, k[:, :3], v, 2)
    with pytest.raises(ValueError, match="block must hold a whole window"):
        dv.window_attention_2d(q, k, v, 4, block=8)
    with pytest.raises(ValueError, match="impl must be one of"):
        dv.window_attention_2d(q, k, v, 2, impl="cuda")
    x = random_array(23, 1, 6, 12)
    with pytest.raises(ValueError, match="multiple of groups=5"):
        dv.channel_group_attention(x, x, x, 5)
    with pytest.raises(ValueError, match="groups=4 must be a multiple of the k/v groups"):
        dv.channel_group_attention(x, x[..., :9], x[..., :9], 4)
    with pytest.raises(ValueError, match="k and v must both be"):
        dv.channel_group_attention(x, x[:, :5], x[:, :5], 4)
    with pytest.raises(ValueError, match="dim=16 must be a multiple of num_heads=3"):
        dv.ChannelGroupAttention(16, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x must be an image"):
        build_module(lambda: dv.SpatialWindowAttention(16, 2, 3, rngs=nnx.Rngs(0)))(jnp.ones((1, 4, 4, 8)))
