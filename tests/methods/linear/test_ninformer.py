"""P73 NiNformer: shapes, the MGU identity property, and token-position specificity of the mixer."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.methods.linear.ninformer import MixerGatingUnit, NiNBlock, NiNformer, mixer_gating


def rand(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_mgu_is_identity_with_identity_projection_and_unit_mixer():
    x = rand(0, 2, 9, 6)
    np.testing.assert_array_equal(mixer_gating(x, lambda z: z, jnp.ones_like), x)


def test_module_mgu_equals_projection_times_mixer():
    unit = MixerGatingUnit(9, 6, 12, 12, rngs=nnx.Rngs(0))
    x = rand(1, 2, 9, 6)
    got, gate, mixed = nnx.jit(lambda u, x: (u(x), u.gate(x), u.mixer(x)))(unit, x)
    np.testing.assert_allclose(got, gate * mixed, atol=1e-6)


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
