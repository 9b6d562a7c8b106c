"""P56 HMoDE: pixel-wise expert gating, the two-level mixture, the head, cv^2 and the relative local count loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.vision.hmode import (PAIRS, HMoDEHead, cv_squared, expert_importance_loss, hierarchical_mixture,
                                        local_counts, pixelwise_expert_gate, relative_local_count_loss,
                                        relative_order_loss, upsample_nearest)


def _randn(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _rand_density(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).uniform(0.0, 2.0, shape), jnp.float32)


def _np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _np_nearest(x, size):
    f = size // x.shape[1]
    return x.repeat(f, axis=1).repeat(f, axis=2)


def test_pixelwise_gate_weights_sum_to_one_and_mix_per_pixel():
    """Weights sum to 1 over the expert axis at every pixel and the output is the per-pixel weighted sum. Catches:
    softmax over a spatial axis instead of the expert axis, an unnormalised (exp / sigmoid) gate, a mean of the
    experts that ignores the gate."""
    logits, experts = _randn(0, (2, 5, 6, 4), 2.0), _randn(1, (2, 5, 6, 4))
    out, w = pixelwise_expert_gate(logits, experts, axis=-1, return_weights=True)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-6)
    ref = (_np_softmax(np.asarray(logits), -1) * np.asarray(experts)).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
    # channels-first layout: the expert axis is an argument
    out1 = pixelwise_expert_gate(jnp.moveaxis(logits, -1, 1), jnp.moveaxis(experts, -1, 1), axis=1)
    np.testing.assert_allclose(np.asarray(out1)[:, 0], ref[..., 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("expert", [0, 2])
def test_one_hot_gate_selects_that_expert(expert):
    """A logit driven to +inf (here +60) on one expert returns exactly that expert everywhere. Catches: an expert
    axis off by one (selects a neighbour), a residual/average added to the mixture."""
    logits = _randn(2, (2, 4, 4, 3)).at[..., expert].set(60.0)
    experts = _randn(3, (2, 4, 4, 3))
    out = pixelwise_expert_gate(logits, experts)
    np.testing.assert_allclose(np.asarray(out[..., 0]), np.asarray(experts[..., expert]), atol=1e-6)


def test_hierarchical_mixture_matches_numpy_transcription_of_the_official_forward():
    """Random experts at 8x8, gate logits at 2x2 (nearest-upsampled softmax weights), pairs (D1,D2), (D1,D3),
    (D2,D3). Catches: the pairs wired differently, softmax over all 6 level-1 channels instead of per pair,
    bilinear instead of nearest upsampling, level-2 weights applied to the experts instead of G1..G3."""
    experts = _rand_density(4, (2, 8, 8, 3))
    l1, l2 = _randn(5, (2, 2, 2, 6), 2.0), _randn(6, (2, 2, 2, 3), 2.0)
    out = hierarchical_mixture(experts, l1, l2)
    e = np.asarray(experts)
    w12, w13, w23 = (_np_nearest(_np_softmax(np.asarray(l1)[..., 2 * i:2 * i + 2]), 8) for i in range(3))
    g1 = w12[..., 0] * e[..., 0] + w12[..., 1] * e[..., 1]
    g2 = w13[..., 0] * e[..., 0] + w13[..., 1] * e[..., 2]
    g3 = w23[..., 0] * e[..., 1] + w23[..., 1] * e[..., 2]
    w = _np_nearest(_np_softmax(np.asarray(l2)), 8)
    d = w[..., 0] * g1 + w[..., 1] * g2 + w[..., 2] * g3
    np.testing.assert_allclose(np.asarray(out["level1"]), np.stack([g1, g2, g3], -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["density"][..., 0]), d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["w1"]).sum(-1), 1.0, atol=1e-6)     # each pair sums to 1
    np.testing.assert_allclose(np.asarray(out["w2"]).sum(-1), 1.0, atol=1e-6)
    assert PAIRS == ((0, 1), (0, 2), (1, 2))


def test_one_hot_gates_route_the_final_map_to_one_expert():
    """Level 2 one-hot on G2 = {D1, D3} and G2's pair one-hot on its second member gives D3 exactly; on G3's first
    member, D2. Catches: a swapped pair order inside G2/G3, the level-2 gate indexing the wrong level-1 mixture."""
    experts = _rand_density(7, (1, 4, 4, 3))
    l1 = jnp.zeros((1, 1, 1, 6)).at[..., 3].set(60.0).at[..., 4].set(60.0)      # G2 -> D3, G3 -> D2
    out = hierarchical_mixture(experts, l1, jnp.zeros((1, 1, 1, 3)).at[..., 1].set(60.0))
    np.testing.assert_allclose(np.asarray(out["density"][..., 0]), np.asarray(experts[..., 2]), atol=1e-6)
    out = hierarchical_mixture(experts, l1, jnp.zeros((1, 1, 1, 3)).at[..., 2].set(60.0))
    np.testing.assert_allclose(np.asarray(out["density"][..., 0]), np.asarray(experts[..., 1]), atol=1e-6)


def test_count_is_a_convex_combination_of_expert_counts():
    """Per pixel min_e D_e <= D <= max_e D_e; with spatially constant gates the count is linear in the expert
    counts: count(D) = sum_e c_e count(D_e) with c_e >= 0 summing to 1, so min count <= count <= max count.
    Catches: summing the experts instead of mixing them (count exceeds the largest expert count), a gate that
    is not normalised."""
    experts = _rand_density(8, (2, 8, 8, 3)) * jnp.asarray([1.0, 3.0, 0.5])
    l1, l2 = _randn(9, (2, 1, 1, 6)), _randn(10, (2, 1, 1, 3))
    out = hierarchical_mixture(experts, l1, l2)
    d, e = np.asarray(out["density"][..., 0]), np.asarray(experts)
    assert np.all(d <= e.max(-1) + 1e-6) and np.all(d >= e.min(-1) - 1e-6)
    w1 = _np_softmax(np.asarray(l1)[:, 0, 0].reshape(2, 3, 2))
    w2 = _np_softmax(np.asarray(l2)[:, 0, 0])
    coef = np.zeros((2, 3))
    for g, (i, j) in enumerate(PAIRS):
        coef[:, i] += w2[:, g] * w1[:, g, 0]
        coef[:, j] += w2[:, g] * w1[:, g, 1]
    counts = e.sum((1, 2))
    np.testing.assert_allclose(coef.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(d.sum((1, 2)), (coef * counts).sum(-1), rtol=1e-5)
    assert np.all(d.sum((1, 2)) <= counts.max(-1) + 1e-4) and np.all(d.sum((1, 2)) >= counts.min(-1) - 1e-4)


def _head(seed=0, **kw):
    return HMoDEHead((4, 6, 8), 8, head_hidden=5, gate_width=4, gate2_depth=2, rngs=nnx.Rngs(seed), **kw)


def _features(seed):
    return (_randn(seed, (2, 8, 8, 4)), _randn(seed + 1, (2, 4, 4, 6)), _randn(seed + 2, (2, 2, 2, 8))), \
        jax.nn.relu(_randn(seed + 3, (2, 2, 2, 8)))


def test_head_density_integrates_to_the_reported_count_and_equals_the_mixture_of_its_experts():
    """The head's ``count`` is its density map summed over pixels; the density is ``hierarchical_mixture`` of
    its (non-negative, nearest-upsampled) experts with its own gate logits. Catches: a count taken from one
    expert or before the level-2 mixture, an expert not upsampled to D1's grid, negative densities."""
    head = _head(1)
    feats, x5 = _features(11)

    @jax.jit
    def run(feats, x5):                     # one compile instead of one per eager op
        out = head(feats, x5)
        logits1 = jax.nn.relu(head.gate1_out(jax.nn.relu(head.gate1[0](x5))))
        h = head.attention(x5) * x5
        for conv in head.gate2:
            h = jax.nn.relu(conv(h))
        ref = hierarchical_mixture(out["experts"], logits1, jax.nn.relu(head.gate2_out(h)))
        return out, ref["density"], head.heads[2](feats[2])

    out, ref, d3 = run(feats, x5)
    assert out["density"].shape == (2, 8, 8, 1) and out["experts"].shape == (2, 8, 8, 3)
    np.testing.assert_allclose(np.asarray(out["count"]), np.asarray(out["density"]).sum((1, 2, 3)), rtol=1e-5)
    assert np.all(np.asarray(out["experts"]) >= 0)
    np.testing.assert_allclose(np.asarray(out["experts"][:, :4, :4, 2]),         # D3 [2, 2, 2, 1]: 4x4 blocks
                               np.broadcast_to(np.asarray(d3[:, :1, :1, 0]), (2, 4, 4)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["density"]), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_head_with_forced_gates_outputs_the_selected_expert():
    """Gate output convs zeroed with a +60 bias on G2 (level 2) and on D3 within G2 (level 1): the head's density is
    exactly D3 upsampled. Catches: the head wiring its gates to the wrong experts or mixing before upsampling."""
    head = _head(2)
    for conv, hot in ((head.gate1_out, 3), (head.gate2_out, 1)):
        conv.kernel[...] = jnp.zeros_like(conv.kernel[...])
        conv.bias[...] = jnp.zeros_like(conv.bias[...]).at[hot].set(60.0)
    feats, x5 = _features(21)
    out = jax.jit(lambda f, x: head(f, x))(feats, x5)
    np.testing.assert_allclose(np.asarray(out["density"][..., 0]), np.asarray(out["experts"][..., 2]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["count"]), np.asarray(out["experts"][..., 2]).sum((1, 2)), rtol=1e-5)


def test_cv_squared_is_unbiased_variance_over_squared_mean():
    """[1, 2, 3]: Var (ddof 1) = 1, mean 2 -> 0.25; equal importances -> 0. Catches: population variance (1/6),
    a dropped square on the mean (0.5); importance summed over the wrong axis (uniform weights give 0)."""
    np.testing.assert_allclose(float(cv_squared(jnp.asarray([1.0, 2.0, 3.0]))), 0.25, rtol=1e-6)
    assert float(cv_squared(jnp.full((4,), 2.5))) == 0.0
    w = jax.nn.softmax(_randn(12, (2, 4, 4, 3)), -1)
    imp = np.asarray(w).reshape(-1, 3).sum(0)
    np.testing.assert_allclose(float(expert_importance_loss(w)), imp.var(ddof=1) / imp.mean() ** 2, rtol=1e-5)
    assert float(expert_importance_loss(jnp.full((2, 4, 4, 3), 1 / 3))) < 1e-10


def test_local_counts_are_sum_pooled():
    """A map of ones pooled at patch p has p^2 per region and the total is preserved. Catches: average pooling (the
    official multiplies the average by p^2), pooling with the wrong stride."""
    d = _rand_density(13, (2, 8, 12, 1))
    c = np.asarray(local_counts(d, 4))
    assert c.shape == (2, 2, 3)
    np.testing.assert_allclose(c.sum((1, 2)), np.asarray(d).sum((1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(local_counts(jnp.ones((1, 8, 8)), 4)), 16.0)


def test_relative_order_loss_is_zero_when_ordered_and_counts_each_inversion():
    """Sorted by GT descending and predicted descending -> 0. Triplet (p0, p1, p2) = (1, 3, 2) (start 0, i.e.
    entries 0, 3, 6): relu(3-1) + relu(2-1) + relu(2-3) = 3. Catches: a sign flip on d1/d2, contiguous
    triplets (entries 0, 1, 2) instead of the stride-3 interleave, a mean instead of a sum."""
    assert float(relative_order_loss(jnp.arange(9.0, 0.0, -1.0)[None])) == 0.0
    p = jnp.asarray([[1.0, 9, 9, 3, 8, 8, 2, 7, 7]])           # s=1: (9,8,7), s=2: (9,8,7) ordered
    np.testing.assert_allclose(float(relative_order_loss(p)), 3.0)
    np.testing.assert_allclose(float(relative_order_loss(jnp.concatenate([p, p]))), 6.0)


def _np_relloss(pred, gt, patch, k):
    """Literal numpy transcription of func.py's relloss (batch summed)."""
    B, H, W = pred.shape

    def pool(x):
        return x.reshape(B, H // patch, patch, W // patch, patch).sum((2, 4)).reshape(B, -1)

    err = pool((pred - gt) ** 2)
    total = 0.0
    for b in range(B):
        idx = np.argsort(-err[b], kind="stable")[:k]
        total += err[b, idx].sum()
        sp, sg = pool(pred)[b, idx], pool(gt)[b, idx]
        sp = sp[np.argsort(-sg, kind="stable")]
        for s in range(3):
            t = sp[s::3]
            d1, d2 = t[0] - t[1], t[0] - t[2]
            total += max(-d1, 0) + max(-d2, 0) + max(d1 - d2, 0)
    return total


def test_relative_local_count_loss_matches_numpy_and_vanishes_at_the_answer():
    """Random maps (16 regions of 4x4 at patch 4, k=9) match the transcription; pred == gt gives 0; pred = 2 gt
    keeps the GT order so the loss is the top-k error alone. Catches: selection by the smallest errors, the GT sort
    ascending, the order hinge applied to GT instead of predicted counts, mean pooling."""
    pred, gt = _rand_density(14, (2, 16, 16)), _rand_density(15, (2, 16, 16))
    np.testing.assert_allclose(float(relative_local_count_loss(pred, gt, patch=4, k=9)),
                               _np_relloss(np.asarray(pred, np.float64), np.asarray(gt, np.float64), 4, 9), rtol=1e-4)
    assert float(relative_local_count_loss(gt, gt, patch=4)) == 0.0
    err = np.sort(np.asarray(local_counts(gt ** 2, 4)).reshape(2, -1), axis=1)[:, -9:].sum()
    np.testing.assert_allclose(float(relative_local_count_loss(2 * gt, gt[..., None], patch=4)), err, rtol=1e-5)


def test_relative_loss_trains_the_hard_regions():
    """Deliberate deviation: the top-k error term carries a gradient (the official detaches it). Catches a
    stop_gradient on the gathered errors (the gradient would come from the hinge alone and vanish here, where
    pred = 2 gt is ordered)."""
    gt = _rand_density(16, (1, 16, 16))
    g = jax.grad(lambda p: relative_local_count_loss(p, gt, patch=4))(2 * gt)
    assert float(jnp.abs(g).sum()) > 0


def test_upsample_nearest_repeats_blocks():
    """Each input pixel becomes an f x f block. Catches: tiling (jnp.tile) instead of repeating."""
    x = _randn(17, (1, 2, 3, 2))
    y = np.asarray(upsample_nearest(x, (4, 6)))
    np.testing.assert_array_equal(y[0, 2:4, 4:6, 1], np.full((2, 2), float(x[0, 1, 2, 1])))


def test_bad_arguments_raise_naming_the_argument():
    """Shape mismatches and impossible settings are refused before any math."""
    with pytest.raises(ValueError, match="logits and experts"):
        pixelwise_expert_gate(jnp.ones((1, 2, 2, 3)), jnp.ones((1, 2, 2, 2)))
    with pytest.raises(ValueError, match="experts must have 3 channels"):
        hierarchical_mixture(jnp.ones((1, 4, 4, 2)), jnp.ones((1, 1, 1, 6)), jnp.ones((1, 1, 1, 3)))
    with pytest.raises(ValueError, match="logits6 must have 6"):
        hierarchical_mixture(jnp.ones((1, 4, 4, 3)), jnp.ones((1, 1, 1, 5)), jnp.ones((1, 1, 1, 3)))
    with pytest.raises(ValueError, match="size"):
        upsample_nearest(jnp.ones((1, 3, 3, 1)), (4, 4))
    with pytest.raises(ValueError, match="k=9 exceeds"):
        relative_local_count_loss(jnp.ones((1, 8, 8)), jnp.ones((1, 8, 8)), patch=4)
    with pytest.raises(ValueError, match="k must be an int >= 9"):
        relative_local_count_loss(jnp.ones((1, 16, 16)), jnp.ones((1, 16, 16)), patch=4, k=6)
    with pytest.raises(ValueError, match="patch=3 must divide"):
        local_counts(jnp.ones((1, 8, 8)), 3)
    with pytest.raises(ValueError, match="feature_channels"):
        HMoDEHead((4, 6), 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="v must be a 1-d"):
        cv_squared(jnp.ones((2, 3)))
