"""P10 SDANet: the selective dense attention neck's defining properties against numpy transcriptions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.vision.sdanet import (DenseAttentionModule, SelectiveDenseAttentionNeck, channel_select_attention,
                                         gather_levels, nonlocal_block, resize_to, spatial_attention)


def _randn(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _softmax(z, axis):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def test_channel_select_matches_numpy_and_weights_sum_to_one_over_levels():
    """U = SUM over levels, s = GAP(U), relu squeeze, per-level heads, softmax ACROSS LEVELS. Catches: softmax over
    channels instead of levels (weights would not sum to 1 per channel over levels), mean instead of sum for U (s
    scaled by 1/L changes the relu/softmax), a missing ReLU, one shared head for all levels."""
    L, B, H, W, C, d = 3, 2, 4, 4, 6, 5
    f = _randn(0, (L, B, H, W, C))
    w_s, b_s = _randn(1, (C, d)), _randn(2, (d,))
    w_l, b_l = _randn(3, (L, d, C)), _randn(4, (L, C))
    v, a = channel_select_attention(f, w_s, b_s, w_l, b_l)
    fn = np.asarray(f, np.float64)
    s = fn.sum(0).mean(axis=(1, 2))
    z = np.maximum(s @ np.asarray(w_s, np.float64) + np.asarray(b_s), 0)
    logits = np.stack([z @ np.asarray(w_l[l], np.float64) + np.asarray(b_l[l]) for l in range(L)], axis=1)
    a_ref = _softmax(logits, axis=1)
    v_ref = np.einsum("blc,lbhwc->bhwc", a_ref, fn)
    np.testing.assert_allclose(np.asarray(a), a_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(v), v_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(a).sum(1), 1.0, atol=1e-6)
    assert np.std(np.asarray(a)) > 1e-3                     # non-trivial weights: the test can fail


def test_single_level_channel_select_is_identity():
    """With one level the softmax over levels is 1: V = F exactly. Catches a softmax over channels (a = 1/C)."""
    f = _randn(5, (1, 2, 3, 3, 4))
    v, a = channel_select_attention(f, _randn(6, (4, 8)), _randn(7, (8,)), _randn(8, (1, 8, 4)), _randn(9, (1, 4)))
    np.testing.assert_allclose(np.asarray(a), 1.0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(v), np.asarray(f[0]), atol=1e-6)


def test_spatial_gate_in_unit_interval_and_hand_built_kernel():
    """g = sigmoid(conv([mean_C, max_C]) + b) in (0, 1). A centre-tap kernel on the MAX channel only gives
    g = sigmoid(max_C x + b). Catches: mean/max channels swapped, a missing sigmoid, gate not multiplied."""
    x = _randn(10, (2, 5, 6, 3))
    kern = np.zeros((7, 7, 2, 1), np.float32)
    kern[3, 3, 1, 0] = 1.0
    out, g = spatial_attention(x, jnp.asarray(kern), jnp.asarray([0.3], jnp.float32))
    g_ref = 1.0 / (1.0 + np.exp(-(np.asarray(x).max(-1, keepdims=True) + 0.3)))
    np.testing.assert_allclose(np.asarray(g), g_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x) * g_ref, rtol=1e-5, atol=1e-6)
    _, g2 = spatial_attention(x, _randn(11, (7, 7, 2, 1)), jnp.zeros((1,)))
    assert float(g2.min()) > 0.0 and float(g2.max()) < 1.0 and float(g2.std()) > 1e-3


def _nl_params(seed, C, Ci, zero_out=False):
    p = {n: (_randn(seed + i, (C, Ci), 0.5), _randn(seed + 10 + i, (Ci,), 0.1)) for i, n in
         enumerate(("theta", "phi", "g"))}
    p["out"] = ((jnp.zeros((Ci, C)), jnp.zeros((C,))) if zero_out else (_randn(seed + 20, (Ci, C)),
                                                                         _randn(seed + 21, (C,))))
    return p


def test_nonlocal_zero_output_projection_is_identity():
    """mmcv zero-initialises conv_out, so the block starts as the identity. Catches a missing residual (x + ...)."""
    x = _randn(12, (2, 4, 3, 6))
    np.testing.assert_allclose(np.asarray(nonlocal_block(x, _nl_params(13, 6, 3, zero_out=True))), np.asarray(x),
                               atol=1e-6)


def test_nonlocal_matches_numpy_embedded_gaussian():
    """x + W_out softmax(theta phi^T / sqrt(C')) g over all H*W positions. Catches: missing 1/sqrt(C') scale,
    softmax over queries instead of keys, theta/phi swapped with g."""
    B, H, W, C, Ci = 2, 3, 4, 6, 3
    x = _randn(14, (B, H, W, C))
    p = _nl_params(15, C, Ci)
    t = np.asarray(x, np.float64).reshape(B, H * W, C)
    pr = {k: (np.asarray(w, np.float64), np.asarray(b, np.float64)) for k, (w, b) in p.items()}
    q, k, v = (t @ pr[n][0] + pr[n][1] for n in ("theta", "phi", "g"))
    att = _softmax(np.einsum("bnd,bmd->bnm", q, k) / np.sqrt(Ci), axis=-1)
    ref = t + np.einsum("bnm,bmd->bnd", att, v) @ pr["out"][0] + pr["out"][1]
    np.testing.assert_allclose(np.asarray(nonlocal_block(x, p)), ref.reshape(B, H, W, C), rtol=1e-4, atol=1e-4)


def test_resize_max_pools_down_and_repeats_up():
    """Gather = adaptive MAX pool for larger levels, NEAREST for smaller ones. Catches average pooling / bilinear."""
    x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
    np.testing.assert_array_equal(np.asarray(resize_to(x, (2, 2)))[0, ..., 0], [[5, 7], [13, 15]])
    up = np.asarray(resize_to(x[:, :2, :2], (4, 4)))[0, ..., 0]
    np.testing.assert_array_equal(up, [[0, 0, 1, 1], [0, 0, 1, 1], [4, 4, 5, 5], [4, 4, 5, 5]])
    with pytest.raises(ValueError, match="size"):
        resize_to(jnp.ones((1, 6, 6, 1)), (4, 4))


def test_neck_five_levels_shapes_and_shared_residual():
    """Five FPN levels (16..1) gathered at refine level 2; every output is F_l + resize(R): the residuals of the
    smaller levels are the max-pooled refine-level residual. Catches: no residual add, a per-level refinement,
    redistribution to the wrong size."""
    C = 8
    neck = SelectiveDenseAttentionNeck(C, 5, refine_level=2, rngs=nnx.Rngs(0))
    neck.out.w[...] = _randn(16, neck.out.w.shape, 0.3)                     # non-trivial non-local
    feats = [_randn(20 + i, (2, 16 // 2 ** i, 16 // 2 ** i, C)) for i in range(5)]
    outs = neck(feats)
    assert [o.shape for o in outs] == [f.shape for f in feats]
    res = [np.asarray(o - f) for o, f in zip(outs, feats)]
    r = res[2]
    np.testing.assert_allclose(res[3], np.asarray(resize_to(jnp.asarray(r), (2, 2))), atol=1e-5)
    np.testing.assert_allclose(res[0], np.asarray(resize_to(jnp.asarray(r), (16, 16))), atol=1e-5)
    assert np.abs(r).max() > 1e-2
    a, g = neck.maps(feats)
    assert a.shape == (2, 5, C) and g.shape == (2, 4, 4, 1)
    np.testing.assert_allclose(np.asarray(a).sum(1), 1.0, atol=1e-6)
    assert gather_levels(feats, (4, 4)).shape == (5, 2, 4, 4, C)


def test_module_neutral_gates_give_documented_residual():
    """Zero spatial conv and bias -> gate 1/2; non-local W_out zero (its init) -> identity; one level -> channel
    select is the identity. So DenseAttentionModule(scales=(1,)) is exactly x + x / 2; with (1, 2, 4) it is
    x + V / 2 with V the level mix. Catches a missing residual, a gate that is not applied, a non-zero NL init."""
    C = 4
    x = _randn(30, (2, 4, 4, C))
    m1 = DenseAttentionModule(C, scales=(1,), rngs=nnx.Rngs(1))
    m1.neck.sa_kernel[...] = jnp.zeros_like(m1.neck.sa_kernel[...])
    np.testing.assert_allclose(np.asarray(m1(x)), 1.5 * np.asarray(x), rtol=1e-5, atol=1e-6)
    m3 = DenseAttentionModule(C, rngs=nnx.Rngs(2))
    m3.neck.sa_kernel[...] = jnp.zeros_like(m3.neck.sa_kernel[...])
    lv = m3.levels(x)
    assert [l.shape[1] for l in lv] == [4, 2, 1]
    nk = m3.neck
    v, _ = channel_select_attention(gather_levels(lv, (4, 4)), nk.w_s[...], nk.b_s[...], nk.w_l[...], nk.b_l[...])
    np.testing.assert_allclose(np.asarray(m3(x)), np.asarray(x + 0.5 * v), rtol=1e-5, atol=1e-5)
    g = m3.gates(x)[1]
    np.testing.assert_allclose(np.asarray(g), 0.5, atol=1e-7)


def test_module_trains_gradients_reach_every_parameter():
    """Every parameter gets a gradient once W_out is non-zero; at init (W_out = 0) W_out itself gets one, so the
    non-local branch can leave the identity. Catches a stop-gradient or a parameter that is never used."""
    m = DenseAttentionModule(4, rngs=nnx.Rngs(3))
    x = _randn(31, (2, 4, 4, 4))

    def grads():
        graphdef, params = nnx.split(m, nnx.Param)
        return jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)))(params)

    assert float(jnp.abs(grads()["neck"]["out"]["w"][...]).max()) > 0
    m.neck.out.w[...] = _randn(32, m.neck.out.w.shape, 0.3)
    for path, g in jax.tree_util.tree_leaves_with_path(grads()):
        assert float(jnp.abs(g).max()) > 0, path


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="x must have 8 channels"):
        DenseAttentionModule(8, rngs=nnx.Rngs(0))(jnp.ones((2, 8, 8, 4)))
    with pytest.raises(ValueError, match="divisible"):
        DenseAttentionModule(8, rngs=nnx.Rngs(0))(jnp.ones((2, 6, 6, 8)))
    with pytest.raises(ValueError, match="scales"):
        DenseAttentionModule(8, scales=(2, 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="refine_level"):
        SelectiveDenseAttentionNeck(8, 3, refine_level=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="feats must be a list of 3"):
        SelectiveDenseAttentionNeck(8, 3, rngs=nnx.Rngs(0))([jnp.ones((1, 4, 4, 8))])
    with pytest.raises(ValueError, match="w_l must be"):
        channel_select_attention(jnp.ones((2, 1, 2, 2, 4)), jnp.ones((4, 3)), jnp.ones((3,)), jnp.ones((1, 3, 4)),
                                 jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="kernel must be"):
        spatial_attention(jnp.ones((1, 4, 4, 2)), jnp.ones((4, 4, 2, 1)), jnp.zeros((1,)))
