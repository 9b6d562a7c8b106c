"""P18 VAN's LKA: 23x23 receptive field, explicit composition, translation equivariance, module."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.scipy.signal import convolve2d

from jattn.methods.linear.lka import LKA, VANAttention, init_lka_params, lka, lka_gate


def params(C=3, seed=0):
    p = init_lka_params(jax.random.PRNGKey(seed), C)
    return {**p, "dw5_bias": jnp.full((C,), 0.1), "dw7_bias": jnp.full((C,), -0.2), "pw_bias": jnp.full((C,), 0.3)}


def test_impulse_response_support_is_23x23():
    p = params()
    delta = jnp.zeros((1, 41, 41, 3)).at[0, 20, 20, 1].set(1.0)
    response = np.asarray(lka_gate(delta, p) - lka_gate(jnp.zeros_like(delta), p))
    rows, cols = np.nonzero(np.abs(response[0]).sum(-1) > 1e-7)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (9, 31, 9, 31)


def test_equals_explicit_composition_of_per_channel_convolutions():
    p, u = params(), jnp.asarray(np.random.default_rng(1).standard_normal((1, 12, 10, 3)), jnp.float32)
    dilated = np.zeros((19, 19, 3))
    dilated[::3, ::3] = np.asarray(p["dw7"])
    flip = lambda w: w[::-1, ::-1]  # convolve2d flips; lax convs correlate
    x = np.stack([convolve2d(u[0, ..., c], flip(p["dw5"][..., c]), mode="same") for c in range(3)], -1) + 0.1
    x = np.stack([convolve2d(x[..., c], flip(dilated[..., c]), mode="same") for c in range(3)], -1) - 0.2
    want = np.asarray(u[0]) * (x @ np.asarray(p["pw"]) + 0.3)
    np.testing.assert_allclose(lka(u, p)[0], want, atol=1e-4)


def test_circular_padding_is_translation_equivariant():
    p, u = params(), jnp.asarray(np.random.default_rng(2).standard_normal((1, 16, 16, 3)), jnp.float32)
    shift = lambda x: jnp.roll(x, (3, -5), axis=(1, 2))
    np.testing.assert_allclose(lka(shift(u), p, padding="circular"), shift(lka(u, p, padding="circular")), atol=1e-5)
    assert not np.allclose(lka(shift(u), p), shift(lka(u, p)), atol=1e-3)  # zero padding is not


def test_modules_and_errors():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 8, 8, 4)), jnp.float32)
    assert LKA(4, rngs=nnx.Rngs(0))(x).shape == x.shape
    assert VANAttention(4, rngs=nnx.Rngs(0))(x).shape == x.shape
    with pytest.raises(ValueError, match="dw5"):
        lka(x, {**params(4), "dw5": jnp.ones((3, 3, 4))})
    with pytest.raises(ValueError, match="padding must be one of"):
        lka(x, params(4), padding="reflect")
