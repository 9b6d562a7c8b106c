"""P46 AdaInf: NT-Xent, the inflated (real-replicated) sampler and the augmentation presets.

Each test's docstring names the mutation it catches.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.objectives import adainf


def test_nt_xent_orthogonal_identical_views_known_value():
    """Two identical views of N orthonormal embeddings: each anchor's positive has cosine 1 and its 2N - 2
    negatives cosine 0, so the loss is log(1 + (2N - 2) exp(-1/t)). Catches: the self-similarity left in the
    denominator (adds exp(1/t)); the positive excluded from the denominator; only one view used as anchors."""
    for n, t in ((3, 0.5), (4, 0.2)):
        z = jnp.eye(n, 8)
        want = math.log(1 + (2 * n - 2) * math.exp(-1 / t))
        assert float(adainf.nt_xent_loss(z, z, t)) == pytest.approx(want, rel=1e-5)


def test_nt_xent_temperature_and_normalisation():
    """The loss is scale-invariant in z (cosine similarity) and equals the cross entropy of cos/t computed by hand
    for a random case; t -> large makes it approach log(2N - 1). Catches: dot products without normalisation;
    multiplying by t instead of dividing."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    z1, z2 = jax.random.normal(k1, (5, 6)), jax.random.normal(k2, (5, 6))
    a = float(adainf.nt_xent_loss(z1, z2, 0.3))
    assert float(adainf.nt_xent_loss(3.0 * z1, 0.5 * z2, 0.3)) == pytest.approx(a, rel=1e-5)
    z = np.concatenate([z1, z2]) / np.linalg.norm(np.concatenate([z1, z2]), axis=1, keepdims=True)
    s = z @ z.T / 0.3
    total = 0.0
    for i in range(10):
        pos = (i + 5) % 10
        others = [s[i, k] for k in range(10) if k != i]
        total += -(s[i, pos] - np.log(np.sum(np.exp(others))))
    assert a == pytest.approx(total / 10, rel=1e-4)
    assert float(adainf.nt_xent_loss(z1, z2, 1e4)) == pytest.approx(math.log(9), rel=1e-3)
    with pytest.raises(ValueError, match="temperature"):
        adainf.nt_xent_loss(z1, z2, 0.0)
    with pytest.raises(ValueError, match="z1 and z2"):
        adainf.nt_xent_loss(z1, z2[:4])


def test_inflated_sampler_proportions_are_exact_per_epoch():
    """Over one epoch each real index appears exactly dup times and each generated index once; the real fraction
    is dup N_r / (dup N_r + N_g). Catches: dup applied to the generated set; sampling with replacement
    (proportions only in expectation); the generated offset missing (indices colliding with real ones)."""
    n_r, n_g, dup, bs = 7, 12, 3, 11
    s = adainf.weighted_real_generated_sampler(n_r, n_g, dup, batch_size=bs, seed=4)
    assert s.size == 33 and s.batches_per_epoch == 3
    epoch = np.concatenate([s.batch(t) for t in range(3)])
    counts = np.bincount(epoch, minlength=n_r + n_g)
    np.testing.assert_array_equal(counts[:n_r], dup)
    np.testing.assert_array_equal(counts[n_r:], 1)
    assert adainf.real_fraction(n_r, n_g, dup) == pytest.approx(21 / 33)
    # a new epoch is a new permutation of the same multiset; a batch is a pure function of (seed, step)
    nxt = np.concatenate([s.batch(t) for t in range(3, 6)])
    assert not np.array_equal(nxt, epoch)
    np.testing.assert_array_equal(np.bincount(nxt, minlength=n_r + n_g), counts)
    s2 = adainf.InflatedSampler(n_r, n_g, dup, batch_size=bs, seed=4)
    np.testing.assert_array_equal(s2.batch(4), s.batch(4))
    with pytest.raises(ValueError, match="dup"):
        adainf.InflatedSampler(n_r, n_g, 0, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        adainf.InflatedSampler(2, 1, 1, batch_size=4)


def test_presets_are_the_papers_numbers():
    """AdaInf weakens crop (0.08 -> 0.2), jitter probability (0.8 -> 0.4) and strengths (halved), and keeps
    grayscale 0.2 and blur 0.5. Catches: a preset typo (e.g. min scale 0.02)."""
    assert adainf.STRONG.crop_min_scale == 0.08 and adainf.ADAINF.crop_min_scale == 0.2
    assert (adainf.STRONG.jitter_prob, adainf.ADAINF.jitter_prob) == (0.8, 0.4)
    assert (adainf.ADAINF.brightness, adainf.ADAINF.contrast, adainf.ADAINF.saturation, adainf.ADAINF.hue) == \
        (0.4, 0.4, 0.4, 0.1)
    assert adainf.ADAINF.gray_prob == adainf.STRONG.gray_prob == 0.2
    assert adainf.ADAINF.blur_prob == adainf.STRONG.blur_prob == 0.5
    assert adainf.DUP == 10


def test_weaker_augmentation_is_monotone_in_distortion():
    """The mean |view - image| over many draws rises monotonically along NONE -> ADAINF -> STRONG (and along
    interpolate_presets(NONE, STRONG, t) for t = 0, 0.5, 1); NONE is the identity. Catches: the crop scale
    drawn from (0, min_scale) instead of (min_scale, 1); jitter applied regardless of its probability."""
    rng = np.random.default_rng(0)
    img = jnp.asarray(rng.uniform(size=(64, 8, 8, 1)).astype(np.float32))
    img = jnp.asarray(np.clip(np.cumsum(np.asarray(img), 1) / 4, 0, 1))  # smooth-ish, not constant
    fn = jax.jit(lambda k, x, cfg: adainf.augment_batch(k, x, cfg))
    def dist(cfg):
        cfg = adainf.AugmentConfig(*[jnp.float32(v) for v in cfg])
        return float(jnp.mean(jnp.abs(fn(jax.random.PRNGKey(1), img, cfg) - img)))
    none, weak, strong = dist(adainf.NONE), dist(adainf.ADAINF), dist(adainf.STRONG)
    assert none < 1e-5 < weak < strong
    half = dist(adainf.interpolate_presets(adainf.NONE, adainf.STRONG, 0.5))
    assert none < half < strong
    with pytest.raises(ValueError, match="t must"):
        adainf.interpolate_presets(adainf.NONE, adainf.STRONG, 1.5)
    with pytest.raises(TypeError, match="cfg"):
        adainf.augment(jax.random.PRNGKey(0), img[0], {"crop_min_scale": 0.2})
