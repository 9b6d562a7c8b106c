"""P51: DAUNet's position / channel attention and AGUNet's additive attention gate."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.vision import dual_attention as D


def _normal(key, shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


@pytest.mark.parametrize("spatial", [(3, 5), (2, 3, 2)])
def test_pam_is_unscaled_dense_softmax_attention_over_positions(spatial):
    """PAM equals a numpy softmax(Cq B^T) D over the flattened positions, plus the residual; 2-D and 3-D grids.
    Catches: a 1/sqrt(d) scale slipped in, a softmax over the query axis, a dropped residual, gamma unused."""
    x = _normal(0, (2, *spatial, 8))
    q, k, v = _normal(1, (2, *spatial, 2)), _normal(2, (2, *spatial, 2)), _normal(3, (2, *spatial, 8))
    got = D.position_attention(x, q, k, v, 0.7)
    flat = lambda y: np.asarray(y, np.float64).reshape(2, -1, y.shape[-1])
    logits = np.einsum("bnc,bmc->bnm", flat(q), flat(k))
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    want = 0.7 * np.einsum("bnm,bmc->bnc", weights, flat(v)).reshape(x.shape) + np.asarray(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cam_follows_the_official_order_and_row_softmax():
    """CAM = gamma * A softmax_row(A^T A) + x, with S_c rows summing to one. Catches: DANet's S A^T order (a
    transposed S), a column softmax, a dropped residual."""
    x = _normal(4, (2, 4, 3, 5)) * 0.5
    weights = np.asarray(D.channel_attention_weights(x))
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    a = np.asarray(x, np.float64).reshape(2, -1, 5)
    energy = np.einsum("bnc,bnd->bcd", a, a)
    s = np.exp(energy - energy.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    want = 0.3 * np.einsum("bnc,bcd->bnd", a, s).reshape(x.shape) + np.asarray(x)
    np.testing.assert_allclose(D.channel_attention(x, 0.3), want, rtol=1e-5, atol=1e-5)
    transposed = 0.3 * np.einsum("bcd,bnd->bnc", s, a).reshape(x.shape) + np.asarray(x)
    assert np.abs(want - transposed).max() > 1e-3  # the two orders differ on this input


def test_modules_start_as_the_identity_and_gamma_learns():
    """gamma = 0 at init makes PAM and CAM the identity (the paper's init); a gradient reaches gamma.
    Catches: gamma initialised to 1, a stop-gradient on gamma."""
    x = _normal(5, (2, 4, 4, 16))
    pam, cam = D.PositionAttention(16, rngs=nnx.Rngs(0)), D.ChannelAttention()
    np.testing.assert_array_equal(pam(x), x)
    np.testing.assert_array_equal(cam(x), x)
    graphdef, params = nnx.split(pam, nnx.Param)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2))(params)
    assert float(jnp.abs(grads["gamma"][...])) > 0


def test_gate_is_a_sigmoid_of_additive_features_and_scales_the_skip():
    """alpha in (0, 1), gated = alpha * x, and alpha matches a numpy transcription with g resized bilinearly.
    Catches: a multiplicative (not additive) combination, psi's bias dropped, the gate applied to g."""
    x, g = _normal(6, (2, 4, 4, 3)), _normal(7, (2, 2, 2, 5))
    wx, wg, b, psi, pb = _normal(8, (3, 4)), _normal(9, (5, 4)), _normal(10, (4,)), _normal(11, (4, 1)), 0.3
    gated, alpha = D.additive_attention_gate(x, g, wx, wg, b, psi, jnp.array([pb]))
    assert alpha.shape == (2, 4, 4, 1) and float(alpha.min()) > 0 and float(alpha.max()) < 1
    np.testing.assert_allclose(gated, alpha * x, rtol=1e-6)
    g_up = np.asarray(jax.image.resize(g, (2, 4, 4, 5), "bilinear"))
    hidden = np.maximum(np.asarray(x) @ np.asarray(wx) + g_up @ np.asarray(wg) + np.asarray(b), 0)
    want = 1 / (1 + np.exp(-(hidden @ np.asarray(psi) + pb)))
    np.testing.assert_allclose(alpha, want, rtol=1e-5, atol=1e-6)


def test_bottleneck_keeps_shape_trains_and_is_deterministic_in_eval():
    """The DAUNet bottleneck maps [B, h, w, C] to itself; in eval mode (running BN, no dropout) two calls agree,
    in train mode spatial dropout makes them differ. Catches: dropout left on at inference."""
    block = D.DualAttentionBottleneck(16, rngs=nnx.Rngs(params=0, dropout=1))
    x = _normal(12, (2, 4, 4, 16))
    block.train()
    a, b = block(x), block(x)
    assert a.shape == x.shape and float(jnp.abs(a - b).max()) > 0
    block.eval()
    np.testing.assert_array_equal(block(x), block(x))


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="x must be a channels-last"):
        D.position_attention(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((2, 3)), 0.0)
    with pytest.raises(ValueError, match="query and key"):
        D.position_attention(jnp.ones((1, 2, 2, 4)), jnp.ones((1, 2, 2, 1)), jnp.ones((1, 2, 2, 2)),
                             jnp.ones((1, 2, 2, 4)), 0.0)
    with pytest.raises(ValueError, match="multiple of reduction"):
        D.PositionAttention(12, rngs=nnx.Rngs(0))
    gate = D.AttentionGate(3, 5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x must have 3 channels"):
        gate(jnp.ones((1, 4, 4, 4)), jnp.ones((1, 2, 2, 5)))
