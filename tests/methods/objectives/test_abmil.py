"""ABMIL gated-attention pooling (the baseline of P40 ACMIL and P59 AEM): masking, pooling, loss, module."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.objectives import abmil


def _bags(seed, B=3, N=7, F=10, sizes=(7, 4, 1)):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, N, F)), jnp.float32)
    mask = jnp.asarray(np.arange(N)[None] < np.array(sizes)[:, None])
    return x, mask


def test_padded_instances_get_exactly_zero_attention_and_rest_renormalise():
    """Catches padding left in the softmax (non-zero weight on pads, or valid weights not renormalised)."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 1, 7)) * 3, jnp.float32)
    _, mask = _bags(0)
    p = abmil.masked_softmax(logits, mask)
    assert np.all(np.asarray(p)[:, 0][~np.asarray(mask)] == 0.0)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p[1, 0, :4], jax.nn.softmax(logits[1, 0, :4]), rtol=1e-6)
    # a bag with no valid instance: all zero, never NaN
    empty = abmil.masked_softmax(logits[:1, 0], jnp.zeros((1, 7), bool))
    assert np.all(np.asarray(empty) == 0.0)


def test_attention_pool_is_weighted_sum():
    """Catches a pooling over the wrong axis or a missing weight (mean pooling)."""
    rng = np.random.default_rng(1)
    p = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32))
    h = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32)
    want = np.stack([[sum(float(p[b, k, n]) * np.asarray(h[b, n]) for n in range(5)) for k in range(3)]
                     for b in range(2)])
    np.testing.assert_allclose(abmil.attention_pool(p, h), want, rtol=1e-5, atol=1e-6)


def test_cross_entropy_hand_case():
    """Catches sum instead of mean over bags, or the wrong class picked."""
    logits = jnp.array([[0.0, 0.0], [2.0, 0.0]])
    got = abmil.abmil_loss(logits, jnp.array([0, 1]))  # bag 1, label 1: -log(e^0 / (e^2 + e^0))
    np.testing.assert_allclose(got, (np.log(2) + np.log(np.exp(2.0) + 1)) / 2, rtol=1e-6)


def test_module_ignores_padding_content_and_order_within_bag():
    """Catches pads leaking into the bag feature (changing pad values would change the output) and a
    position-dependent pooling (permuting valid instances would change it)."""
    x, mask = _bags(2)
    model = abmil.GatedAttentionMILPool(10, inner_dim=16, hidden=8, rngs=nnx.Rngs(0))
    bag, logits = model(x, mask)
    assert bag.shape == (3, 2) and logits.shape == (3, 7)
    noisy = jnp.where(mask[..., None], x, 100.0 * jnp.ones_like(x))
    np.testing.assert_allclose(model(noisy, mask)[0], bag, rtol=1e-5, atol=1e-6)
    perm = np.array([3, 1, 0, 2, 4, 5, 6])
    np.testing.assert_allclose(model(x[:, perm], mask)[0][1], bag[1], rtol=1e-5, atol=1e-6)


def test_gated_attention_formula():
    """Catches a missing gate (tanh only) or tanh/sigmoid swapped."""
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    att = abmil.GatedAttention(6, 4, 2, rngs=nnx.Rngs(1))
    want = att.W(jnp.tanh(att.V(h)) * jax.nn.sigmoid(att.U(h)))
    np.testing.assert_allclose(att(h), jnp.swapaxes(want, 1, 2), rtol=1e-6)
    assert att(h).shape == (2, 2, 5)


def test_bad_arguments_raise():
    """Catches silent broadcasting of a wrong mask and non-integer labels."""
    logits = jnp.ones((2, 1, 5))
    with pytest.raises(ValueError, match="mask"):
        abmil.masked_softmax(logits, jnp.ones((2, 4), bool))
    with pytest.raises(TypeError, match="mask"):
        abmil.masked_softmax(logits, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="labels"):
        abmil.abmil_loss(jnp.ones((2, 2)), jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="x must be"):
        abmil.GatedAttentionMILPool(4, rngs=nnx.Rngs(0))(jnp.ones((5, 4)))
