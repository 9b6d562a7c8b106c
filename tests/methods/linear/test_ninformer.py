"""P73 NiNformer: shapes, the MGU identity property, and token-position specificity of the mixer."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy.special import erf

from jattn.methods.linear.ninformer import MixerGatingUnit, NiNBlock, NiNformer, mixer_gating


def rand(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_mgu_is_identity_with_identity_projection_and_unit_mixer():
    x = rand(0, 2, 9, 6)
    np.testing.assert_array_equal(mixer_gating(x, lambda z: z, jnp.ones_like), x)


# ------------------------------------------------------------------------------------------------
# Independent float64 transcriptions of the official PyTorch modules (nn.LayerNorm eps 1e-5, exact GELU)


def randomized(module, seed, scale=0.5):
    """The same module with every parameter redrawn from N(0, scale^2) (LayerNorm scales/biases included)."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * scale, s.dtype), params)
    return nnx.merge(graphdef, params, rest)


def f64(x):
    return np.asarray(x[...], np.float64)


def layer_norm_np(x, norm, eps=1e-5):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * f64(norm.scale) + f64(norm.bias)


def gelu_np(x, exact=True):
    if exact:
        return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def linear_np(x, layer):
    return x @ f64(layer.kernel) + f64(layer.bias)


def mlp_np(x, mlp, exact=True):
    return linear_np(gelu_np(linear_np(x, mlp.fc1), exact), mlp.fc2)


def mixer_np(x, mixer, exact=True):
    """MLP-Mixer block: ``y = x + TokenMLP(LN(x)^T)^T``, ``y + ChannelMLP(LN(y))``."""
    y = x + np.swapaxes(mlp_np(np.swapaxes(layer_norm_np(x, mixer.token_norm), 1, 2), mixer.token_mlp, exact), 1, 2)
    return y + mlp_np(layer_norm_np(y, mixer.channel_norm), mixer.channel_mlp, exact)


def mgu_np(x, unit, exact=True):
    return linear_np(x, unit.gate) * mixer_np(x, unit.mixer, exact)


def nin_block_np(x, block, exact=True):
    """Official ``NiNBlock``: one LayerNorm shared by both sublayers."""
    x = x + mgu_np(layer_norm_np(x, block.norm), block.mgu, exact)
    return x + mlp_np(layer_norm_np(x, block.norm), block.ffn, exact)


def test_mixer_gating_multiplies_its_two_branches():
    """The pure form against a literal product of two different nonlinear branches."""
    x = rand(1, 2, 9, 6)
    w = np.random.default_rng(2).standard_normal((6, 6))
    got = mixer_gating(x, lambda z: z @ w, jnp.sin)
    np.testing.assert_allclose(got, (np.asarray(x, np.float64) @ w) * np.sin(np.asarray(x, np.float64)),
                               rtol=1e-5, atol=1e-5)


def test_mixer_block_and_mgu_equal_literal_composition():
    """MixerBlock and MGU against float64 transcriptions of the official code (not against their own
    sub-modules' outputs).

    Mutations caught: the token-mixing residual ``x +`` dropped from MixerBlock; the channel-mixing
    residual dropped; the tanh-approximate GELU instead of the exact one; Flax's LayerNorm eps 1e-6;
    the MGU adding instead of multiplying its branches."""
    unit = randomized(MixerGatingUnit(9, 6, 12, 10, rngs=nnx.Rngs(0)), seed=3)
    x = rand(4, 2, 9, 6) * 2.0
    got_mixer, got_mgu = nnx.jit(lambda u, x: (u.mixer(x), u(x)))(unit, x)
    xn = np.asarray(x, np.float64)
    want_mixer, want_mgu = mixer_np(xn, unit.mixer), mgu_np(xn, unit)
    scale = max(1.0, np.abs(want_mgu).max())
    np.testing.assert_allclose(got_mixer, want_mixer, atol=1e-6 * scale, rtol=0)
    np.testing.assert_allclose(got_mgu, want_mgu, atol=1e-6 * scale, rtol=0)
    # power check: the tanh-GELU variant lies far outside that tolerance on these inputs
    assert np.abs(mgu_np(xn, unit, exact=False) - want_mgu).max() > 1e-5 * scale


def test_nin_block_equals_literal_composition():
    """Mutations caught: either NiN residual dropped; separate (unshared) norms; approximate GELU."""
    block = randomized(NiNBlock(9, 6, 12, rngs=nnx.Rngs(1)), seed=5)
    x = rand(6, 2, 9, 6) * 2.0
    got = nnx.jit(lambda m, x: m(x))(block, x)
    want = nin_block_np(np.asarray(x, np.float64), block)
    scale = max(1.0, np.abs(want).max())
    np.testing.assert_allclose(got, want, atol=1e-6 * scale, rtol=0)


def test_token_mixing_is_not_permutation_equivariant():
    block = NiNBlock(9, 6, 12, rngs=nnx.Rngs(1))
    x = rand(2, 1, 9, 6)
    perm = np.random.default_rng(0).permutation(9)
    forward = nnx.jit(lambda m, x: m(x))
    y = forward(block, x)
    assert y.shape == x.shape
    assert not np.allclose(forward(block, x[:, perm]), y[:, perm], atol=1e-3)


def test_classifier_shape():
    model = NiNformer(image_size=8, patch=4, dim=16, hidden=16, depth=2, num_classes=5, dropout=0.0,
                      rngs=nnx.Rngs(2))
    assert nnx.jit(lambda m, x: m(x))(model, rand(3, 2, 8, 8, 3)).shape == (2, 5)
