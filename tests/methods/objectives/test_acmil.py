"""P40 ACMIL: STKIM (count, top-k only, training only), branch diversity, the loss and the K=1 reduction to ABMIL."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.objectives import acmil
from jattn.methods.objectives.abmil import GatedAttentionMILPool, abmil_loss, masked_softmax

SIZES = (12, 7, 3, 1)
stkim = jax.jit(acmil.stochastic_topk_mask, static_argnums=(1, 2))


def _inputs(seed, N=12, F=6):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(len(SIZES), N, F)), jnp.float32)
    mask = jnp.asarray(np.arange(N)[None] < np.array(SIZES)[:, None])
    return x, mask


def test_stkim_masks_exactly_int_min_k_n_times_drop_of_the_top_k_valid_instances():
    """Catches masking k*drop instead of int(min(k, n)*drop) in short bags, rounding instead of truncation,
    masking outside the top-k, masking padding, and the same choice in every branch."""
    rng = np.random.default_rng(0)
    K, N = 5, 12
    logits = rng.normal(size=(len(SIZES), K, N)).astype(np.float32)
    _, mask = _inputs(0)
    for k, drop in ((10, 0.6), (3, 0.7), (12, 1.0)):
        dropped = np.asarray(stkim(logits, k, drop, jax.random.key(k), mask))
        for b, n in enumerate(SIZES):
            want = int(min(k, n) * drop)
            assert acmil.num_masked(n, k, drop) == want
            assert np.all(dropped[b].sum(-1) == want), (k, drop, n)
            assert not dropped[b][:, n:].any()  # never a padded instance
            order = np.argsort(-logits[b, :, :n], axis=-1)[:, :min(k, n)]
            for j in range(K):
                assert set(np.flatnonzero(dropped[b, j])) <= set(order[j])
    assert int(1.0 * 0.7 * 10) == 7 and acmil.num_masked(10, 10, 0.7) == 7  # float product truncated as Python
    # different branches / keys draw different subsets (random, not the first of the top-k)
    d = np.asarray(stkim(logits, 10, 0.6, jax.random.key(1), mask))
    assert len({tuple(np.flatnonzero(row)) for row in d[0]}) > 1


def test_stkim_choice_is_uniform_over_the_top_k():
    """Catches a biased choice (always the largest logits): each of the top-4 is masked ~half the time."""
    logits = jnp.asarray(np.arange(8.0)[None, None], jnp.float32)
    keys = jax.random.split(jax.random.key(3), 400)
    hits = jax.vmap(lambda key: acmil.stochastic_topk_mask(logits, 4, 0.5, key))(keys)
    freq = np.asarray(hits).mean(0)[0, 0]
    assert np.all(freq[:4] == 0.0)
    np.testing.assert_allclose(freq[4:], 0.5, atol=0.1)


def test_stkim_only_in_training_and_masked_instances_get_zero_weight():
    """Catches STKIM applied at inference, or masked logits not reaching the softmax (weight not ~0 while the
    rest renormalise)."""
    x, mask = _inputs(1)
    model = acmil.ACMIL(6, inner_dim=16, hidden=8, branches=3, n_masked=4, mask_drop=0.5, rngs=nnx.Rngs(0))
    _, A_clean = model.logits(x, mask)
    out_eval = model(x, mask, rng=jax.random.key(0))  # train=False: rng ignored, no masking
    np.testing.assert_array_equal(out_eval[2], A_clean)
    _, _, A = model(x, mask, rng=jax.random.key(0), train=True)
    dropped = np.asarray(A) == acmil.STKIM_VALUE
    for b, n in enumerate(SIZES):
        assert np.all(dropped[b].sum(-1) == int(min(4, n) * 0.5))
    np.testing.assert_array_equal(np.where(dropped, 0.0, A), np.where(dropped, 0.0, A_clean))
    p = np.asarray(masked_softmax(A, mask))
    assert np.all(p[dropped] < 1e-30)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="rng"):
        model(x, mask, train=True)


def test_branch_diversity_hand_cases():
    """Catches cosine of raw logits instead of softmax weights, a sum instead of a mean over pairs, and pairs
    counted twice: identical branches give 1, disjoint-support branches 0, a hand case 0.6 / 3 pairs."""
    big = 60.0
    one_hot = jnp.array([[[big, 0, 0, 0], [0, big, 0, 0], [0, 0, big, 0]]])  # ~disjoint softmax supports
    np.testing.assert_allclose(acmil.branch_diversity(one_hot), 0.0, atol=1e-12)
    same = jnp.asarray(np.random.default_rng(2).normal(size=(2, 1, 6)), jnp.float32).repeat(4, axis=1)
    np.testing.assert_allclose(acmil.branch_diversity(same), 1.0, rtol=1e-6)
    assert float(acmil.branch_diversity(same[:, :1])) == 0.0  # K = 1: no pairs
    # uniform over 2 of 2 valid instances vs one-hot: cos = 1/sqrt(2); pairs (u, e1), (u, e1), (e1, e1) -> mean
    two = jnp.array([[[0.0, 0.0, 9.0], [big, 0.0, 5.0], [big, 0.0, -3.0]]])
    mask = jnp.array([[True, True, False]])
    want = (2 / np.sqrt(2) + 1.0) / 3
    np.testing.assert_allclose(acmil.branch_diversity(two, mask), want, rtol=1e-6)
    rand = acmil.branch_diversity(jnp.asarray(np.random.default_rng(3).normal(size=(3, 5, 9)), jnp.float32))
    assert -1.0 <= float(rand) <= 1.0


def test_one_branch_without_masking_equals_abmil():
    """Catches a slide path that differs from ABMIL pooling (e.g. pooling the pre-softmax logits, averaging
    before the softmax) and a K=1 loss with an extra branch or diversity term."""
    x, mask = _inputs(4)
    base = GatedAttentionMILPool(6, inner_dim=16, hidden=8, rngs=nnx.Rngs(1))
    model = acmil.ACMIL(6, inner_dim=16, hidden=8, branches=1, n_masked=0, rngs=nnx.Rngs(2))
    model.reduce, model.attention, model.slide_classifier = base.reduce, base.attention, base.classifier
    branch, slide, A = model(x, mask, rng=jax.random.key(0), train=True)
    bag, a = base(x, mask)
    np.testing.assert_allclose(slide, bag, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(A[:, 0], a, rtol=1e-6)
    np.testing.assert_allclose(model.slide_attention(x, mask), masked_softmax(a, mask), rtol=1e-6)
    labels = jnp.array([1, 0, 1, 0])
    np.testing.assert_allclose(acmil.acmil_loss(branch, slide, labels, A, mask), abmil_loss(bag, labels),
                               rtol=1e-6)
    # mask_drop = 0 with n_masked > 0 also leaves the logits alone
    model.n_masked, model.mask_drop = 10, 0.0
    np.testing.assert_array_equal(model(x, mask, rng=jax.random.key(0), train=True)[2], A)


def test_loss_is_slide_plus_mean_branch_ce_plus_diversity():
    """Catches a branch CE summed over branches instead of averaged, or the diversity term dropped."""
    x, mask = _inputs(5)
    model = acmil.ACMIL(6, inner_dim=16, hidden=8, branches=3, rngs=nnx.Rngs(3))
    branch, slide, A = model(x, mask)
    labels = jnp.array([1, 1, 0, 0])
    want = (abmil_loss(slide, labels) + np.mean([abmil_loss(branch[:, j], labels) for j in range(3)])
            + acmil.branch_diversity(A, mask))
    np.testing.assert_allclose(acmil.acmil_loss(branch, slide, labels, A, mask), want, rtol=1e-6)
    np.testing.assert_allclose(slide, model.slide_classifier(
        jnp.einsum("bn,bnl->bl", model.slide_attention(x, mask), jax.nn.relu(model.reduce(x)))), rtol=1e-5,
        atol=1e-6)


def test_bad_arguments_raise():
    """Catches a drop ratio outside [0, 1] or a negative k accepted silently."""
    logits = jnp.ones((2, 5))
    with pytest.raises(ValueError, match="mask_drop"):
        acmil.stochastic_topk_mask(logits, 3, 1.5, jax.random.key(0))
    with pytest.raises(ValueError, match="k must"):
        acmil.stochastic_topk_mask(logits, -1, 0.5, jax.random.key(0))
    with pytest.raises(ValueError, match="branches"):
        acmil.ACMIL(4, branches=0, rngs=nnx.Rngs(0))
