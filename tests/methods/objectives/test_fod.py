"""P54 FOD: the Gaussian prior target, the correlation losses, the I2Correlation layer and the anomaly score.

Each test's docstring names the mutation it catches.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.objectives import fod

EPS = fod.KL_EPS


def _maps(key, B=2, H=2, L=4, layers=2):
    ks = jax.random.split(key, 4 * layers)
    mk = lambda k: jax.nn.softmax(2 * jax.random.normal(k, (B, H, L, L)), -1)
    return {name: [mk(ks[4 * i + j]) for i in range(layers)]
            for j, name in enumerate(("intra_probs", "intra_targets", "inter_probs", "inter_targets"))}


def test_target_rows_normalise_and_peak_at_the_centre():
    """Rows of T sum to 1 and each row's maximum is its own patch (the centre), decreasing with distance.
    Catches: a missing row normalisation; offsets measured from the wrong patch (transposed / unsquared
    distances); sigma_y and sigma_x swapped (checked with an anisotropic width)."""
    key = jax.random.PRNGKey(0)
    sy = 0.3 + jax.random.uniform(key, (2, 3, 12))
    sx = 0.3 + jax.random.uniform(jax.random.PRNGKey(1), (2, 3, 12))
    t = fod.gaussian_prior_attention_target(sy, sx, (3, 4))
    np.testing.assert_allclose(np.asarray(t.sum(-1)), 1.0, rtol=1e-5)
    assert np.all(np.argmax(np.asarray(t), -1) == np.arange(12))
    # anisotropic: wide in y, narrow in x -> the vertical neighbour gets more mass than the horizontal one
    t1 = fod.gaussian_prior_attention_target(jnp.full((12,), 2.0), jnp.full((12,), 0.5), (3, 4))
    i = 5  # row 1, col 1: neighbours 1 (up) and 4 (left)
    assert t1[i, 1] > t1[i, 4]
    # hand value: unnormalised T for sigma 1 at offset (1, 0) is exp(-1/2) / (2 pi)
    raw = fod.gaussian_prior_attention_target(jnp.ones(12), jnp.ones(12), (3, 4), normalize=False)
    np.testing.assert_allclose(float(raw[0, 4]), math.exp(-0.5) / (2 * math.pi), rtol=1e-6)
    np.testing.assert_allclose(float(raw[0, 5]), math.exp(-1.0) / (2 * math.pi), rtol=1e-6)


def test_small_sigma_gives_one_hot_and_sigma_range():
    """sigma -> small makes T the identity; sigma_from_logits spans (1e-5-ish, 2). Catches: a missing '- 1' or a
    base other than 3 in the width map; T not collapsing (a floor on sigma)."""
    s = fod.sigma_from_logits(jnp.array([-10.0, 0.0, 10.0]))
    np.testing.assert_allclose(np.asarray(s), [3 ** 1e-5 - 1, 3 ** 0.50001 - 1, 3 ** 1.00001 - 1], rtol=1e-4, atol=1e-7)
    t = fod.gaussian_prior_attention_target(jnp.full((6,), 0.05), jnp.full((6,), 0.05), (2, 3))
    np.testing.assert_allclose(np.asarray(t), np.eye(6), atol=1e-6)


def test_kl_hand_built_2x2_and_symmetry():
    """Hand-built 2x2: p = identity rows, q = uniform rows. KL(p||q) = log((1+e)/(.5+e)) per row, the reverse
    .5 log((.5+e)/(1+e)) + .5 log((.5+e)/e); KL_sym is their sum, >= 0 and 0 iff equal. Catches: summing over
    the query axis; dropping the reverse term; the eps placed outside the log."""
    p = jnp.eye(2)
    q = jnp.full((2, 2), 0.5)
    fwd = math.log((1 + EPS) / (0.5 + EPS))
    rev = 0.5 * math.log((0.5 + EPS) / (1 + EPS)) + 0.5 * math.log((0.5 + EPS) / EPS)
    np.testing.assert_allclose(np.asarray(fod.kl_div(p, q)), [fwd, fwd], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fod.kl_div(q, p)), [rev, rev], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fod.sym_kl(p, q)), [fwd + rev] * 2, rtol=1e-6)
    a = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(2), (3, 5, 5)), -1)
    b = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(3), (3, 5, 5)), -1)
    assert np.all(np.asarray(fod.sym_kl(a, b)) > 0)
    np.testing.assert_allclose(np.asarray(fod.sym_kl(a, b)), np.asarray(fod.sym_kl(b, a)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fod.sym_kl(a, a)), 0.0, atol=1e-7)
    with pytest.raises(ValueError, match="p and q"):
        fod.kl_div(a, b[..., :4])


def test_entropy_of_uniform_and_one_hot():
    """Uniform rows over L keys have entropy -log(1/L + e) ~ log L; one-hot rows ~0. Hand 2x2: uniform gives
    -log(.5 + e). Catches: a missing minus sign; mean instead of sum over keys."""
    for L in (2, 7):
        u = jnp.full((3, L, L), 1.0 / L)
        np.testing.assert_allclose(np.asarray(fod.row_entropy(u)), -math.log(1 / L + EPS), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fod.row_entropy(jnp.eye(4))), -math.log(1 + EPS), atol=1e-7)


def test_rec_loss_hand_built():
    """x = e1, out = e2 (2 tokens, 2 channels): MSE = 1, 1 - cos = 1, rec = 2; out = 2 x: MSE = mean x^2,
    1 - cos = 0. Catches: cosine over the token axis; MSE summed instead of averaged; the cosine term dropped."""
    x = jnp.array([[[1.0, 0.0], [1.0, 0.0]]])
    out = jnp.array([[[0.0, 1.0], [0.0, 1.0]]])
    assert float(fod.rec_loss(out, x)) == pytest.approx(2.0)
    y = jax.random.normal(jax.random.PRNGKey(4), (2, 3, 4))
    assert float(fod.rec_loss(2 * y, y)) == pytest.approx(float(jnp.mean(y ** 2)), rel=1e-5)
    np.testing.assert_allclose(np.asarray(fod.rec_score(out, x)), [[1.0 + 1.0, 1.0 + 1.0]], rtol=1e-6)


def test_loss_weights_zero_is_plain_reconstruction_and_terms_hand_built():
    """lambda1 = lambda2 = 0 gives total == rec exactly (the baseline); with weights, loss1 and loss2 equal the
    hand-assembled official combination, with the KL / entropy terms averaged over layers. Catches: a sign flip
    on any term; lambda2 applied to KL terms; total = loss1 + loss2 (not halved) so weight 0 doubles rec."""
    key = jax.random.PRNGKey(5)
    maps = _maps(key)
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 4, 3))
    out = x + 0.3 * jax.random.normal(jax.random.PRNGKey(7), x.shape)
    base = fod.fod_losses(out, x, maps, lambda1=0.0, lambda2=0.0)
    assert float(base["total"]) == float(fod.rec_loss(out, x))
    got = jax.jit(functools.partial(fod.fod_losses, lambda1=0.5, lambda2=0.25))(out, x, maps)
    m = lambda f, a, b=None: np.mean([float(jnp.mean(f(*z))) for z in zip(a, b)] if b is not None
                                     else [float(jnp.mean(f(z))) for z in a])
    ikl = m(fod.sym_kl, maps["intra_targets"], maps["intra_probs"])
    ekl = m(fod.sym_kl, maps["inter_targets"], maps["inter_probs"])
    ient, eent = m(fod.row_entropy, maps["intra_probs"]), m(fod.row_entropy, maps["inter_probs"])
    rec = float(fod.rec_loss(out, x))
    assert float(got["loss1"]) == pytest.approx(rec + 0.5 * ikl - 0.5 * ekl, rel=1e-5)
    assert float(got["loss2"]) == pytest.approx(rec - 0.5 * ikl - 0.25 * ient + 0.5 * ekl + 0.25 * eent, rel=1e-5)
    assert float(got["total"]) == pytest.approx(0.5 * (float(got["loss1"]) + float(got["loss2"])), rel=1e-6)
    with pytest.raises(TypeError, match="lambda1"):
        fod.fod_losses(out, x, maps, lambda1="0.5")


def test_minimax_gradient_directions():
    """The attention maps get loss2's gradient: for S_intra it points to *increase* KL_sym(T, S_intra) (minus
    sign), for S_inter to decrease it; the targets get loss1's (intra pulled toward S, inter pushed away).
    Catches: stop-gradients on the wrong side (maps trained by loss1); swapped intra/inter signs."""
    maps = _maps(jax.random.PRNGKey(8), layers=1)
    x = jax.random.normal(jax.random.PRNGKey(9), (2, 4, 3))

    def total(m):
        return fod.fod_losses(x, x, m, lambda1=0.5, lambda2=0.0)["total"]

    g = jax.grad(total)(maps)
    for name, sign in (("intra_probs", -1), ("inter_probs", +1)):
        kl_grad = jax.grad(lambda p: jnp.mean(fod.sym_kl(maps[name.replace("probs", "targets")][0], p)))(maps[name][0])
        # total's gradient on the maps is sign * 0.5 * lambda1 * d KL
        np.testing.assert_allclose(np.asarray(g[name][0]), sign * 0.25 * np.asarray(kl_grad), rtol=1e-4, atol=1e-7)
    for name, sign in (("intra_targets", +1), ("inter_targets", -1)):
        kl_grad = jax.grad(lambda t: jnp.mean(fod.sym_kl(t, maps[name.replace("targets", "probs")][0])))(maps[name][0])
        np.testing.assert_allclose(np.asarray(g[name][0]), sign * 0.25 * np.asarray(kl_grad), rtol=1e-4, atol=1e-7)


def test_i2correlation_layer_is_intra_minus_inter():
    """With the inter branch's weights equal to the intra branch's and ref == x, intra - inter = 0, so the
    layer's pre-norm input is 0 and the output is LN2(LN1(0) + FFN(LN1(0))); a different ref changes it.
    Probabilities and targets are [B, H, L, L] row-stochastic. Catches: new = x + intra - inter (residual kept);
    ref ignored by the inter branch; probs on the wrong axis."""
    d, H, grid = 8, 2, (2, 3)
    p = fod.init_i2correlation_layer(jax.random.PRNGKey(10), d, H)
    p = dict(p, inter=p["intra"])
    x = jax.random.normal(jax.random.PRNGKey(11), (2, 6, d))
    layer = jax.jit(functools.partial(fod.i2correlation_layer, num_heads=H, grid_hw=grid))
    out, ip, it, ep, et = layer(x, x, p)
    z = fod._layer_norm(p["norm1"], jnp.zeros_like(x))
    want = fod._layer_norm(p["norm2"], z + fod._apply(p["ffn2"], jax.nn.gelu(fod._apply(p["ffn1"], z),
                                                                               approximate=False)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)
    for m in (ip, it, ep, et):
        assert m.shape == (2, H, 6, 6)
        np.testing.assert_allclose(np.asarray(m.sum(-1)), 1.0, rtol=1e-5)
    ref = jax.random.normal(jax.random.PRNGKey(12), (1, 6, d))
    out2 = layer(x, ref, p)[0]
    assert float(jnp.max(jnp.abs(out2 - out))) > 1e-3
    with pytest.raises(ValueError, match="ref"):
        fod.i2correlation_layer(x, ref[:, :5], p, num_heads=H, grid_hw=grid)
    with pytest.raises(ValueError, match="grid_hw"):
        fod.i2correlation_layer(x, x, p, num_heads=H, grid_hw=(2,))


def test_attention2d_matches_manual_softmax_and_out_projection_switch():
    """probs = softmax((d/H)^-1/2 q k^T) per head; use_out_projection=False returns the unprojected heads (the
    official code's output). Catches: scale 1/sqrt(d) instead of 1/sqrt(d/H); the projection applied twice."""
    d, H = 8, 2
    p = fod.init_attention2d(jax.random.PRNGKey(13), d, H)
    x = jax.random.normal(jax.random.PRNGKey(14), (1, 4, d))
    out, probs, _ = fod.attention2d(p, x, x, x, num_heads=H, grid_hw=(2, 2), use_out_projection=False)
    q = fod._apply(p["q"], x).reshape(1, 4, H, 4)
    k = fod._apply(p["k"], x).reshape(1, 4, H, 4)
    v = fod._apply(p["v"], x).reshape(1, 4, H, 4)
    want_p = jax.nn.softmax(jnp.einsum("blhe,bshe->bhls", q, k) / 2.0, -1)
    np.testing.assert_allclose(np.asarray(probs), np.asarray(want_p), rtol=1e-5, atol=1e-6)
    want_o = jnp.einsum("bhls,bshd->blhd", want_p, v).reshape(1, 4, d)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_o), rtol=1e-5, atol=1e-6)
    out_p = fod.attention2d(p, x, x, x, num_heads=H, grid_hw=(2, 2))[0]
    np.testing.assert_allclose(np.asarray(out_p), np.asarray(fod._apply(p["out"], want_o)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="d_model"):
        fod.attention2d(p, x, x, x, num_heads=3, grid_hw=(2, 2))


def test_anomaly_score_hand_built():
    """Two patches, one layer, one head: the patch whose inter map departs from its target gets the larger
    inter score; pi = softmax(-KL) so inter_score = max(pi) - pi is 0 on the best-matching patch and
    rec * inter_score is exact. Catches: softmax over the batch axis; using +KL; max(pi) taken over the batch."""
    t = jnp.eye(2)[None, None]                     # [1, 1, 2, 2]
    s = jnp.array([[[[1.0, 0.0], [0.5, 0.5]]]])   # patch 0 matches, patch 1 does not
    maps = {"inter_probs": [s], "inter_targets": [t]}
    x = jnp.array([[[1.0, 0.0], [1.0, 0.0]]])
    out = jnp.array([[[0.0, 1.0], [0.0, 1.0]]])   # rec_score 2 on both patches
    kl = np.asarray(fod.sym_kl(s, t))[0, 0]
    pi = np.exp(-kl) / np.exp(-kl).sum()
    want = 2.0 * (pi.max() - pi)
    got = np.asarray(fod.fod_anomaly_score(out, x, maps))[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[0] == 0.0 and got[1] > 0
    # batch of two different images: each image's own max
    s2 = jnp.array([[[[0.5, 0.5], [0.0, 1.0]]]])   # image 2: patch 1 matches
    maps2 = {"inter_probs": [jnp.concatenate([s, s2])], "inter_targets": [jnp.concatenate([t, t])]}
    got2 = np.asarray(fod.fod_anomaly_score(jnp.concatenate([out, out]), jnp.concatenate([x, x]), maps2))
    assert got2[0, 0] == 0.0 and got2[1, 1] == 0.0
    np.testing.assert_allclose(np.asarray(fod.fod_anomaly_score(out, x, maps, use_inter=False)), [[2.0, 2.0]])


def test_forward_shapes_and_jit():
    """The full reconstructor under jit: out has x's shape, one map per layer, and the loss is finite with
    nonzero gradients on the sigma projection (loss1's path). Catches: the targets detached everywhere."""
    grid, C = (2, 2), 3
    params = fod.init_fod(jax.random.PRNGKey(15), C, grid, d_model=8, num_heads=2, num_layers=2)
    x = jax.random.normal(jax.random.PRNGKey(16), (3, 4, C))
    ref = fod.reference_features(np.asarray(x))

    @jax.jit
    def loss(p):
        out, maps = fod.fod_forward(p, x, ref, num_heads=2, grid_hw=grid)
        return fod.fod_losses(out, x, maps)["total"], (out, maps)

    (val, (out, maps)), g = jax.value_and_grad(loss, has_aux=True)(params)
    assert out.shape == x.shape and len(maps["inter_probs"]) == 2 and np.isfinite(float(val))
    assert float(jnp.max(jnp.abs(g["layers"][0]["intra"]["sigma"]["w"]))) > 0
    with pytest.raises(ValueError, match="ref"):
        fod.fod_forward(params, x, ref[:3], num_heads=2, grid_hw=grid)


def test_reconstruction_only_layer_is_a_plain_residual_layer():
    """with_inter=False (the official rec-only ablation) gives LN2(z + FFN(z)) with z = LN1(x + intra): the inter
    branch and ref play no part, inter maps are None, and fod_losses / the score still work with no inter maps
    (inter terms 0, score = rec_score). Catches: the inter branch still subtracted; the residual x dropped."""
    d, H, grid = 8, 2, (2, 2)
    p = fod.init_i2correlation_layer(jax.random.PRNGKey(20), d, H)
    x = jax.random.normal(jax.random.PRNGKey(21), (1, 4, d))
    layer = jax.jit(functools.partial(fod.i2correlation_layer, num_heads=H, grid_hw=grid, with_inter=False))
    out, ip, it, ep, et = layer(x, 5.0 + x, p)
    intra = fod.attention2d(p["intra"], x, x, x, num_heads=H, grid_hw=grid)[0]
    z = fod._layer_norm(p["norm1"], x + intra)
    want = fod._layer_norm(p["norm2"], z + fod._apply(p["ffn2"], jax.nn.gelu(fod._apply(p["ffn1"], z),
                                                                               approximate=False)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)
    assert ep is None and et is None
    maps = {"intra_probs": [ip], "intra_targets": [it], "inter_probs": [], "inter_targets": []}
    y = x[..., :3]
    parts = fod.fod_losses(y + 0.1, y, maps, lambda1=0.0, lambda2=0.0)
    assert float(parts["total"]) == float(fod.rec_loss(y + 0.1, y)) and float(parts["inter_kl"]) == 0.0
    np.testing.assert_allclose(np.asarray(fod.fod_anomaly_score(y + 0.1, y, maps)),
                               np.asarray(fod.rec_score(y + 0.1, y)))
