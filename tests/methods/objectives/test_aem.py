"""P59 AEM: attention entropy, the entropy regulariser and its lam = 0 reduction to ABMIL."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.objectives import aem
from jattn.methods.objectives.abmil import GatedAttentionMILPool, abmil_loss


def _logits(seed, shape=(4, 9), scale=2.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def test_uniform_attention_has_entropy_log_n_and_is_the_optimum():
    """Catches log2 instead of ln, a missing minus sign, or an entropy not maximal at uniform: uniform logits give
    H = log n, the AEM term there is -lam log n (its minimum) with zero gradient, and any random logits score
    higher (worse)."""
    lam = 0.3
    for n in (1, 5, 12):
        flat = jnp.full((2, n), 0.7)
        np.testing.assert_allclose(aem.attention_entropy(flat), math.log(n), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(aem.aem_loss(flat, lam), -lam * math.log(n), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(jax.grad(lambda a: aem.aem_loss(a, lam))(flat), 0.0, atol=1e-7)
    for seed in range(3):
        assert float(aem.aem_loss(_logits(seed, (2, 12)), lam)) > -lam * math.log(12)


def test_entropy_matches_hand_formula_and_respects_padding():
    """Catches padding counted as instances (entropy of [a, pad] != entropy of [a]) or p log p with the wrong p."""
    logits = _logits(1, (3, 6))
    mask = jnp.asarray(np.arange(6)[None] < np.array([[6], [3], [1]]))
    got = aem.attention_entropy(logits, mask)
    for b, n in enumerate((6, 3, 1)):
        p = np.asarray(jax.nn.softmax(logits[b, :n]), np.float64)
        np.testing.assert_allclose(got[b], -np.sum(p * np.log(p)), rtol=1e-5, atol=1e-6)
    assert float(got[2]) == 0.0  # one instance: no uncertainty
    # the same bag padded with arbitrary logits gives the same entropy
    noisy = jnp.where(mask, logits, 50.0)
    np.testing.assert_allclose(aem.attention_entropy(noisy, mask), got, rtol=1e-6)


def test_entropy_shift_invariant_and_axis():
    """Catches entropy computed on raw logits instead of softmax (not shift-invariant) or over the wrong axis."""
    a = _logits(2, (3, 5, 7))
    np.testing.assert_allclose(aem.attention_entropy(a + 4.0), aem.attention_entropy(a), rtol=1e-5)
    np.testing.assert_allclose(aem.attention_entropy(a, axis=1), aem.attention_entropy(jnp.swapaxes(a, 1, 2)),
                               rtol=1e-6)


def test_gradient_step_pushes_logits_toward_equal():
    """Catches a sign error (lam * entropy instead of lam * negative entropy) that would sharpen attention."""
    a = _logits(3, (2, 10))
    g = jax.grad(lambda x: aem.aem_loss(x, 0.5))(a)
    stepped = a - 0.1 * g
    assert np.all(np.std(np.asarray(stepped), -1) < np.std(np.asarray(a), -1))
    assert np.all(np.asarray(aem.attention_entropy(stepped)) > np.asarray(aem.attention_entropy(a)))


def test_lam_zero_equals_abmil_exactly_and_lam_scales_linearly():
    """Catches a leaked term (an entropy term not multiplied by lam, or a constant) and a lam applied twice."""
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 8, 6)), jnp.float32)
    mask = jnp.asarray(np.arange(8)[None] < np.array([[8], [5], [2]]))
    model = GatedAttentionMILPool(6, inner_dim=12, hidden=8, rngs=nnx.Rngs(0))
    bag, a = model(x, mask)
    labels = jnp.array([1, 0, 1])
    assert float(aem.aem_total_loss(bag, labels, a, 0.0, mask)) == float(abmil_loss(bag, labels))
    d1 = aem.aem_total_loss(bag, labels, a, 0.1, mask) - abmil_loss(bag, labels)
    d2 = aem.aem_total_loss(bag, labels, a, 0.2, mask) - abmil_loss(bag, labels)
    np.testing.assert_allclose(d2, 2 * d1, rtol=1e-5)
    np.testing.assert_allclose(d1, -0.1 * jnp.mean(aem.attention_entropy(a, mask)), rtol=1e-5)


def test_bad_arguments_raise():
    """Catches a negative lam (entropy minimisation) accepted silently and a bad axis or dtype."""
    with pytest.raises(ValueError, match="lam"):
        aem.aem_loss(_logits(5), -0.1)
    with pytest.raises(ValueError, match="axis"):
        aem.attention_entropy(_logits(5), axis=2)
    with pytest.raises(TypeError, match="logits"):
        aem.attention_entropy(jnp.ones((2, 3), jnp.int32))
