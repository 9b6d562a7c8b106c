"""P61 BiFormer: routed-region mask, gather == block-sparse == dense reference (fwd + grads, xla and
pallas), full top-k, non-differentiable and scale-invariant routing, LCE, the NNX modules, errors."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.core.reference import reference_attention
from jattn.methods.sparse import biformer as bf
from tests.conftest import assert_close, assert_forward_and_grads_close, build_module, forward_and_grads


def image_qkv(seed, B, Hgt, Wid, H, Hkv, D):
    """Fresh normal q [B, Hgt, Wid, H, D], k, v [B, Hgt, Wid, Hkv, D]."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((B, Hgt, Wid, h, D)), jnp.float32) for h in (H, Hkv, Hkv))


route = jax.jit(bf.bra_route, static_argnums=(2, 3))


def flat(x):
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def random_idx(seed, B, n_win, topk):
    """Distinct random regions per query region (not sorted: routing order must not matter)."""
    rng = np.random.default_rng(seed)
    R = n_win * n_win
    return jnp.asarray(np.stack([[rng.permutation(R)[:topk] for _ in range(R)] for _ in range(B)]), jnp.int32)


def routed_mask_loop(idx, hw, n_win):
    """Literal transcription of the spec: M[b, i, j] = region(j) in topk(region(i))."""
    idx = np.asarray(idx)
    Hgt, Wid = hw
    rh, rw = Hgt // n_win, Wid // n_win
    N = Hgt * Wid
    mask = np.zeros((idx.shape[0], 1, N, N), bool)
    for b in range(idx.shape[0]):
        for i in range(N):
            region_i = ((i // Wid) // rh) * n_win + (i % Wid) // rw
            for j in range(N):
                region_j = ((j // Wid) // rh) * n_win + (j % Wid) // rw
                mask[b, 0, i, j] = region_j in list(idx[b, region_i])
    return mask


@pytest.mark.parametrize("hw,n_win,topk", [((8, 12), 2, 2), ((6, 6), 3, 4)])
def test_mask_fn_matches_literal_rule(hw, n_win, topk):
    idx = random_idx(1, 2, n_win, topk)
    dense = jax.jit(bf.bra_dense_mask, static_argnums=(1, 2))(idx, hw, n_win)
    np.testing.assert_array_equal(np.asarray(dense), routed_mask_loop(idx, hw, n_win))


@pytest.mark.parametrize("hw,n_win,block", [((8, 12), 2, 32), ((6, 6), 3, 16)])
def test_block_mask_expands_to_the_routed_mask(hw, n_win, block):
    B, topk = 2, 2
    idx = random_idx(2, B, n_win, topk)
    rh, rw = hw[0] // n_win, hw[1] // n_win
    block_mask = bf.bra_block_mask(idx, n_win, block)
    mask_fn = bf.region_padding_mask_fn(rh * rw, block)
    layout = np.asarray(block_mask.to_dense_mask(mask_fn, batch=B, heads=1))        # [B, 1, L, L]
    token_at = np.asarray(bf.to_region_major(jnp.arange(1, hw[0] * hw[1] + 1).reshape(1, *hw), n_win, block))[0] - 1
    pos = np.argsort(np.where(token_at < 0, np.iinfo(np.int32).max, token_at))[:hw[0] * hw[1]]
    assert np.array_equal(token_at[pos], np.arange(hw[0] * hw[1]))
    expected = routed_mask_loop(idx, hw, n_win)
    np.testing.assert_array_equal(layout[:, :, pos][:, :, :, pos], expected)
    assert not layout[:, :, :, token_at < 0].any()                                  # padding keys hidden
    listed = np.asarray(block_mask.to_dense_block_map())
    nQ = layout.shape[2] // block
    tiles_any = layout.reshape(B, 1, nQ, block, nQ, block).any(axis=(3, 5))
    np.testing.assert_array_equal(listed, tiles_any)      # listed tiles == tiles with >= 1 allowed entry
    assert listed.sum(-1).max() == topk


HW, N_WIN, TOPK, H, HKV, D = (8, 12), 2, 2, 4, 2, 16   # non-square, GQA, 24-token regions (pallas pads to 32)


@pytest.fixture(scope="module")
def routed_case():
    """Inputs, routing and the dense masked reference (forward and gradients), computed once."""
    q, k, v = image_qkv(3, 2, *HW, H, HKV, D)
    idx = route(q, k, N_WIN, TOPK)
    mask = jnp.asarray(routed_mask_loop(idx, HW, N_WIN))
    scale = (H * D) ** -0.5                                    # the official full-qk_dim scale
    ref = lambda q, k, v: reference_attention(flat(q), flat(k), flat(v), mask=mask, scale=scale).reshape(q.shape)
    return (q, k, v), idx, forward_and_grads(ref, q, k, v)


def check_against_reference(fn, routed_case, name):
    (q, k, v), _, expected = routed_case
    assert_forward_and_grads_close(forward_and_grads(fn, q, k, v), expected, name)


def test_gather_form_equals_dense_reference(routed_case):
    idx = routed_case[1]
    check_against_reference(lambda q, k, v: bf.bra_attention(q, k, v, idx, N_WIN), routed_case, "gather")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_block_sparse_form_equals_dense_reference(impl, routed_case):
    idx = routed_case[1]
    check_against_reference(lambda q, k, v: bf.bra_attention_block_sparse(q, k, v, idx, N_WIN, impl=impl),
                            routed_case, f"block_sparse[{impl}]")


def test_full_topk_is_full_attention():
    hw, n_win, H, D = (6, 8), 2, 2, 8
    q, k, v = image_qkv(4, 1, *hw, H, H, D)

    @jax.jit
    def outputs(q, k, v):
        full = reference_attention(flat(q), flat(k), flat(v), scale=0.3).reshape(q.shape)
        return full, [bf.bi_level_routing_attention(q, k, v, n_win, n_win * n_win, scale=0.3, form=form,
                                                    impl="xla") for form in bf.FORMS]
    full, outs = outputs(q, k, v)
    for form, out in zip(bf.FORMS, outs):
        assert_close(out, full, what=form)


def test_routing_matches_numpy_topk_and_ignores_score_scale():
    hw, n_win, topk = (6, 9), 3, 3
    q, k, _ = image_qkv(5, 2, *hw, 4, 2, 8)
    idx = np.asarray(route(q, k, n_win, topk))
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    rh, rw = hw[0] // n_win, hw[1] // n_win
    for b, p in itertools.product(range(2), range(n_win * n_win)):
        scores = []
        for r in range(n_win * n_win):
            region = lambda x, s: x[b, (s // n_win) * rh:(s // n_win + 1) * rh, (s % n_win) * rw:(s % n_win + 1) * rw]
            q_mean = region(qn, p).mean(axis=(0, 1))                       # [H, D]
            k_mean = np.repeat(region(kn, r).mean(axis=(0, 1)), 2, axis=0)  # GQA: head h reads kv head h // 2
            scores.append(np.sum(q_mean * k_mean))
        np.testing.assert_array_equal(idx[b, p], np.argsort(-np.asarray(scores), kind="stable")[:topk])
    for c in (0.05, 7.0):
        np.testing.assert_array_equal(np.asarray(route(q * c, k, n_win, topk)), idx)


def test_routing_is_not_differentiable():
    hw, n_win, topk = (4, 4), 2, 2
    q, k, v = image_qkv(6, 1, *hw, 2, 2, 8)
    idx = route(q, k, n_win, topk)
    routed = lambda q, k, v: jnp.sum(jnp.sin(bf.bi_level_routing_attention(q, k, v, n_win, topk, form="gather")))
    fixed = lambda q, k, v: jnp.sum(jnp.sin(bf.bra_attention(q, k, v, idx, n_win)))
    scores = lambda q, k: jnp.sum(bf.bra_region_scores(q, k, n_win) ** 2)

    @jax.jit
    def grads(q, k, v):
        return (jax.grad(scores, argnums=(0, 1))(q, k), jax.grad(routed, argnums=(0, 1, 2))(q, k, v),
                jax.grad(fixed, argnums=(0, 1, 2))(q, k, v))
    (dq_scores, dk_scores), through_routing, fixed_routing = grads(q, k, v)
    assert float(jnp.abs(dq_scores).max()) == 0.0 and float(jnp.abs(dk_scores).max()) == 0.0
    for a, b in zip(through_routing, fixed_routing):
        assert_close(a, b, factor=2.0)
        assert float(jnp.abs(a).max()) > 0


def test_lce_is_a_depthwise_same_convolution():
    rng = np.random.default_rng(7)
    v = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
    kernel = rng.standard_normal((5, 5, 3)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    padded = np.pad(v, [(0, 0), (2, 2), (2, 2), (0, 0)])
    expected = np.zeros_like(v)
    for b, y, x, c in itertools.product(range(2), range(5), range(6), range(3)):
        expected[b, y, x, c] = np.sum(padded[b, y:y + 5, x:x + 5, c] * kernel[:, :, c]) + bias[c]
    assert_close(bf.local_context_enhancement(jnp.asarray(v), jnp.asarray(kernel), jnp.asarray(bias)), expected)


def copy_with(module, **attributes):
    """A copy of ``module`` (same parameter values) with some static attributes changed."""
    copy = nnx.merge(*nnx.split(module))
    for name, value in attributes.items():
        setattr(copy, name, value)
    return copy


def test_module_equals_its_composition():
    module = build_module(lambda: bf.BiLevelRoutingAttention(16, 2, n_win=2, topk=2, form="gather", rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 8, 8, 16)), jnp.float32)

    @nnx.jit
    def outputs(module, x):
        # by hand: qkv -> route -> dense masked reference (scale dim^-0.5) -> + LCE(v) -> wo
        q, k, v = jnp.split(module.qkv(x), 3, axis=-1)
        heads = lambda t: t.reshape(2, 8, 8, 2, 8)
        idx = bf.bra_route(heads(q), heads(k), 2, 2)
        attn = reference_attention(flat(heads(q)), flat(heads(k)), flat(heads(v)), scale=16 ** -0.5,
                                   mask=bf.bra_dense_mask(idx, (8, 8), 2)).reshape(x.shape)
        lce = bf.local_context_enhancement(v, module.lepe_kernel[...], module.lepe_bias[...])
        return module(x), module.wo(attn + lce)
    out, by_hand = outputs(module, x)
    assert_close(out, by_hand)


def test_module_auto_pad_crops_and_trains():
    module = build_module(lambda: bf.BiLevelRoutingAttention(16, 2, n_win=2, topk=2, auto_pad=True, form="block_sparse",
                                                      impl="xla", rngs=nnx.Rngs(1)), seed=1)
    x = jnp.asarray(np.random.default_rng(9).standard_normal((1, 7, 5, 16)), jnp.float32)

    @nnx.jit
    def run(padding_module, plain_module, x):
        padded = jnp.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])   # zero pad to a multiple of n_win
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(padding_module)
        return padding_module(x), plain_module(padded)[:, :7, :5], grads
    out, expected, grads = run(module, copy_with(module, auto_pad=False), x)
    assert out.shape == x.shape
    assert_close(out, expected)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    assert float(jnp.abs(grads.lepe_kernel[...]).sum()) > 0 and float(jnp.abs(grads.qkv.kernel[...]).sum()) > 0


def layer_norm_np(x, norm, eps):
    x = np.asarray(x, np.float64)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(norm.scale[...], np.float64) + np.asarray(norm.bias[...])


def gelu_exact_np(x):
    from scipy.special import erf
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def depthwise_same_np(x, kernel, bias):
    """Zero-padded 'same' depthwise correlation of ``x [B, H, W, C]`` with ``kernel [k, k, C]`` (float64 loop)."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    ks = kernel.shape[0]
    padded = np.pad(x, [(0, 0), (ks // 2, ks // 2), (ks // 2, ks // 2), (0, 0)])
    H, W = x.shape[1:3]
    return sum(padded[:, dy:dy + H, dx:dx + W] * kernel[dy, dx] for dy in range(ks) for dx in range(ks)) + \
        np.asarray(bias, np.float64)


def test_biformer_block_equals_literal_composition():
    """``x += DWConv3x3(x); x += BRA(LN1 x); x += MLP(LN2 x)`` (LN eps 1e-6, exact GELU) written out in
    float64 around the block's own BRA (checked against its composition above).

    Mutations caught: any of the three residuals dropped; the two norms swapped; tanh-approximate GELU."""
    block = build_module(lambda: bf.BiFormerBlock(16, 2, n_win=2, topk=1, form="gather", rngs=nnx.Rngs(1)), seed=2)
    x = jnp.asarray(np.random.default_rng(10).standard_normal((1, 8, 8, 16)), jnp.float32)
    y = np.asarray(nnx.jit(lambda m, x: m(x))(block, x))
    assert y.shape == x.shape and np.all(np.isfinite(y))
    attn = nnx.jit(lambda m, x: m(x))
    x1 = np.asarray(x, np.float64) + depthwise_same_np(x, block.pos_kernel[...], block.pos_bias[...])
    x2 = x1 + np.asarray(attn(block.attn, jnp.asarray(layer_norm_np(x1, block.norm1, 1e-6), jnp.float32)))
    hidden = layer_norm_np(x2, block.norm2, 1e-6) @ np.asarray(block.fc1.kernel[...], np.float64) + \
        np.asarray(block.fc1.bias[...])
    want = x2 + gelu_exact_np(hidden) @ np.asarray(block.fc2.kernel[...], np.float64) + np.asarray(block.fc2.bias[...])
    assert_close(y, want, what="BiFormerBlock")


def test_bad_inputs_raise_clear_errors():
    q, k, v = image_qkv(10, 1, 4, 4, 2, 2, 8)
    idx = bf.bra_route(q, k, 2, 2)
    with pytest.raises(ValueError, match="divisible by n_win=3"):
        bf.bra_route(q, k, 3, 2)
    with pytest.raises(ValueError, match="topk must be <= n_win"):
        bf.bra_route(q, k, 2, 5)
    with pytest.raises(TypeError, match="topk must be an int"):
        bf.bra_route(q, k, 2, 1.5)
    with pytest.raises(ValueError, match="q must have rank 5"):
        bf.bra_attention(q[0], k, v, idx, 2)
    with pytest.raises(ValueError, match="idx must have shape"):
        bf.bra_attention(q, k, v, idx[:, :3], 2)
    with pytest.raises(TypeError, match="idx must be an integer array"):
        bf.bra_attention(q, k, v, idx.astype(jnp.float32), 2)
    with pytest.raises(ValueError, match="block must hold a whole region"):
        bf.bra_attention_block_sparse(q, k, v, idx, 2, block=2)
    with pytest.raises(ValueError, match="form must be one of"):
        bf.bi_level_routing_attention(q, k, v, 2, 2, form="dense")
    with pytest.raises(ValueError, match="spatial shape"):
        bf.bra_attention(q, k[:, :2], v, idx, 2)
    with pytest.raises(ValueError, match="topk must be <= n_win"):
        bf.BiLevelRoutingAttention(16, 2, n_win=2, topk=5, rngs=nnx.Rngs(0))
    module = build_module(lambda: bf.BiLevelRoutingAttention(16, 2, n_win=2, topk=2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="divisible by n_win=2"):
        module(jnp.ones((1, 5, 4, 16)))
    with pytest.raises(ValueError, match="dim=16"):
        module(jnp.ones((1, 4, 4, 8)))
