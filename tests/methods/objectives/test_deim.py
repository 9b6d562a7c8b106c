"""P35 DEIM: the matchability-aware loss (MAL), VFL (its reference) and the Dense O2O utilities (mosaic, mixup).

Each test's docstring names the mutation it catches.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.objectives import deim


def _bce(x, t):
    return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


def _sig(x):
    return 1 / (1 + np.exp(-x))


def _inputs(key, B=2, Q=4, C=3):
    k1, k2, k3 = jax.random.split(key, 3)
    logits = jax.random.normal(k1, (B, Q, C)) * 2
    cls = jax.random.randint(k2, (B, Q), -1, C)
    ious = jax.random.uniform(k3, (B, Q), minval=0.1, maxval=0.95)
    return logits, cls, ious


def test_mal_hand_computed_value():
    """One image, 2 queries, 2 classes; query 0 matched to class 1 with IoU 0.6, query 1 unmatched.
    L = [BCE(x01, 0) p01^γ + BCE(x02, 0.6^γ) + BCE(x11, 0) p11^γ + BCE(x12, 0) p12^γ] / num_boxes (=1).
    Catches: target q instead of q^γ, weight p^γ on positives, (1-p)^γ on negatives, a mean instead of the
    official sum / num_boxes."""
    x = np.array([[[0.3, -1.2], [1.5, -0.4]]], np.float32)
    g = 1.5
    want = (_bce(x[0, 0, 0], 0) * _sig(x[0, 0, 0]) ** g + _bce(x[0, 0, 1], 0.6 ** g)
            + _bce(x[0, 1, 0], 0) * _sig(x[0, 1, 0]) ** g + _bce(x[0, 1, 1], 0) * _sig(x[0, 1, 1]) ** g)
    got = deim.matchability_aware_loss(jnp.asarray(x), jnp.array([[1, -1]]), jnp.array([[0.6, 0.9]]), gamma=g)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    got_a = deim.matchability_aware_loss(jnp.asarray(x), jnp.array([[1, 2]]), jnp.array([[0.6, 0.9]]), gamma=g,
                                         alpha=0.25)  # class 2 == C: unmatched too
    want_a = (0.25 * (_bce(x[0, 0, 0], 0) * _sig(x[0, 0, 0]) ** g + _bce(x[0, 1, 0], 0) * _sig(x[0, 1, 0]) ** g
                      + _bce(x[0, 1, 1], 0) * _sig(x[0, 1, 1]) ** g) + _bce(x[0, 0, 1], 0.6 ** g))
    np.testing.assert_allclose(got_a, want_a, rtol=1e-5)


def test_gamma_zero_is_plain_bce_to_one_hot_targets():
    """γ = 0 makes every weight 1 and every positive target q^0 = 1: MAL is plain sigmoid BCE to one-hot
    targets, summed / num_boxes, whatever the IoUs. (The spec's "plain BCE to IoU targets" is VFL's limit, next
    test.) Catches: a missing γ on the target or on the weight."""
    logits, cls, ious = _inputs(jax.random.PRNGKey(0))
    onehot = np.asarray(jax.nn.one_hot(cls, 3))
    want = _bce(np.asarray(logits), onehot).sum() / max(onehot.sum(), 1)
    np.testing.assert_allclose(deim.matchability_aware_loss(logits, cls, ious, gamma=0.0), want, rtol=1e-5)


def test_mal_and_vfl_differ_only_in_the_positive_weight_at_gamma_one():
    """At γ = 1 with α given, MAL and VFL share the target (q) and the negative weight (α p); on positives VFL
    weighs by q and MAL by 1, so VFL_pos = q * MAL_pos and the negatives agree. With α = 1, γ = 0, VFL is BCE to
    IoU targets with weight q on positives. Catches: VFL's weight q moved to MAL, the targets swapped."""
    logits, cls, ious = _inputs(jax.random.PRNGKey(1))
    mal = deim.matchability_aware_loss(logits, cls, ious, gamma=1.0, alpha=0.75, reduction="none")
    vfl = deim.varifocal_loss(logits, cls, ious, gamma=1.0, alpha=0.75, reduction="none")
    onehot = jax.nn.one_hot(cls, 3)
    np.testing.assert_allclose(vfl * (1 - onehot), mal * (1 - onehot), rtol=1e-6)
    np.testing.assert_allclose(vfl * onehot, mal * onehot * ious[..., None], rtol=1e-5, atol=1e-7)
    v0 = deim.varifocal_loss(logits, cls, ious, gamma=0.0, alpha=1.0, reduction="none")
    t = np.asarray(onehot * ious[..., None])
    w = np.where(np.asarray(onehot) > 0, t, 1.0)
    np.testing.assert_allclose(v0, _bce(np.asarray(logits), t) * w, rtol=1e-5)


def test_negative_gradient_scales_as_p_to_gamma_and_weights_are_detached():
    """For a negative entry d/dx [p^γ BCE(x, 0)] with p detached is p^γ σ(x) = p^(γ+1); IoUs get no gradient.
    Catches: the weight not stop-gradient'ed (gradient would gain a γ p^γ (1-p) BCE term), IoU not detached."""
    logits, cls, ious = _inputs(jax.random.PRNGKey(2))
    g = 1.5
    gx, gi = jax.grad(lambda x, i: deim.matchability_aware_loss(x, cls, i, gamma=g, reduction="none").sum(),
                      (0, 1))(logits, ious)
    p = jax.nn.sigmoid(logits)
    neg = 1 - jax.nn.one_hot(cls, 3)
    np.testing.assert_allclose(gx * neg, p ** g * p * neg, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(gi).max()) == 0.0


def test_positive_with_iou_one_gets_target_one_for_any_gamma():
    """IoU = 1: the positive term is BCE(x, 1) for every γ. Catches: target γ*q or q/γ-style mistakes."""
    x = jnp.array([[[0.7, -0.3, 1.1]]])
    for g in (0.5, 1.5, 3.0):
        terms = deim.matchability_aware_loss(x, jnp.array([[2]]), jnp.array([[1.0]]), gamma=g, reduction="none")
        np.testing.assert_allclose(terms[0, 0, 2], _bce(1.1, 1.0), rtol=1e-6)


def test_official_reduction_is_total_sum_over_num_boxes():
    """``loss.mean(1).sum() * Q / num_boxes``: the sum of all terms divided by num_boxes (given or = positives).
    Catches: a mean over classes (divides by C) or over the batch."""
    logits, cls, ious = _inputs(jax.random.PRNGKey(3))
    terms = deim.matchability_aware_loss(logits, cls, ious, reduction="none")
    np.testing.assert_allclose(deim.matchability_aware_loss(logits, cls, ious, num_boxes=5.0),
                               terms.sum() / 5.0, rtol=1e-5)
    npos = float((cls >= 0).sum())
    np.testing.assert_allclose(deim.matchability_aware_loss(logits, cls, ious), terms.sum() / npos, rtol=1e-5)


def _batch(n, S=8, M=2, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(n, S, S, 3)).astype(np.float32)
    x0 = rng.integers(0, S // 2, (n, M))
    y0 = rng.integers(0, S // 2, (n, M))
    boxes = np.stack([x0, y0, x0 + rng.integers(1, S // 2 + 1, (n, M)), y0 + rng.integers(1, S // 2 + 1, (n, M))],
                     -1).astype(np.float32)
    counts = rng.integers(0, M + 1, n)
    classes = np.where(np.arange(M)[None] < counts[:, None], rng.integers(0, 3, (n, M)), -1)
    return images, boxes, classes, counts


def test_mosaic_keeps_every_box_inside_its_tile_and_tiles_are_halved_images():
    """Each mosaic holds the 4 images' boxes halved and shifted into their tile (all inside it), counts add up,
    and each tile is the 2x2-pooled source image. Catches: offsets swapped (x/y or tile order), boxes not scaled,
    boxes of padded slots included."""
    images, boxes, classes, counts = _batch(8)
    out, ob, oc, on = deim.mosaic(images, boxes, classes, counts)
    assert out.shape == (2, 8, 8, 3) and ob.shape == (2, 8, 4)
    np.testing.assert_array_equal(on, counts.reshape(2, 4).sum(1))
    for g in range(2):
        k = 0
        for t in range(4):
            i = 4 * g + t
            oy, ox = (t // 2) * 4, (t % 2) * 4
            np.testing.assert_allclose(out[g, oy:oy + 4, ox:ox + 4],
                                       images[i].reshape(4, 2, 4, 2, 3).mean((1, 3)), rtol=1e-6)
            for j in range(counts[i]):
                b = ob[g, k]
                np.testing.assert_allclose(b, boxes[i, j] / 2 + [ox, oy, ox, oy])
                assert ox <= b[0] < b[2] <= ox + 4 and oy <= b[1] < b[3] <= oy + 4
                assert oc[g, k] == classes[i, j]
                k += 1
        assert (oc[g, k:] == -1).all()


def test_mixup_blends_and_keeps_both_box_sets():
    """Pixel = 0.5 a + 0.5 b; boxes/classes are a's then b's. Catches: only one image's boxes kept."""
    images, boxes, classes, counts = _batch(2, seed=1)
    out, ob, oc, on = deim.mixup(images, boxes, classes, counts)
    np.testing.assert_allclose(out[0], 0.5 * images[0] + 0.5 * images[1], rtol=1e-6)
    assert on[0] == counts.sum()
    np.testing.assert_array_equal(oc[0, :on[0]], np.concatenate([classes[0, :counts[0]], classes[1, :counts[1]]]))


def test_dense_o2o_probability_limits():
    """mosaic_prob = 0 returns the first N images unchanged; = 1 makes every slot a mosaic of 4 pool images.
    Catches: the probability inverted, the pool indexed from the wrong place."""
    images, boxes, classes, counts = _batch(10, seed=2)
    rng = np.random.default_rng(0)
    plain = deim.dense_o2o(images, boxes, classes, counts, rng, mosaic_prob=0.0)
    np.testing.assert_array_equal(plain[0], images[:2])
    np.testing.assert_array_equal(plain[3], counts[:2])
    mos = deim.dense_o2o(images, boxes, classes, counts, rng, mosaic_prob=1.0)
    want = deim.mosaic(images[2:], boxes[2:], classes[2:], counts[2:], 8)
    for a, b in zip(mos, want):
        np.testing.assert_allclose(a, b)


def test_bad_arguments_raise():
    """Shapes, dtypes and ranges are checked with messages naming the argument."""
    logits, cls, ious = _inputs(jax.random.PRNGKey(4))
    with pytest.raises(ValueError, match="target_classes"):
        deim.matchability_aware_loss(logits, cls[:, :2], ious)
    with pytest.raises(TypeError, match="target_classes"):
        deim.matchability_aware_loss(logits, cls.astype(jnp.float32), ious)
    with pytest.raises(ValueError, match="gamma"):
        deim.matchability_aware_loss(logits, cls, ious, gamma=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        deim.varifocal_loss(logits, cls, ious, reduction="mean")
    images, boxes, classes, counts = _batch(6)
    with pytest.raises(ValueError, match="multiple of 4"):
        deim.mosaic(images, boxes, classes, counts)
    with pytest.raises(ValueError, match="5 N"):
        deim.dense_o2o(images, boxes, classes, counts, np.random.default_rng(0))
    with pytest.raises(ValueError, match="weight"):
        deim.mixup(images, boxes, classes, counts, weight=2.0)
