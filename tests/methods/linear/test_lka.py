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


def gelu_np(x, exact=True):
    """GELU in float64: exact ``x Phi(x)`` (erf) or the tanh approximation."""
    from scipy.special import erf
    if exact:
        return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def lka_np(u, p):
    """``u * pw(dw7_d3(dw5(u)))`` for one image ``u [H, W, C]`` in float64 (scipy's convolve2d)."""
    C = u.shape[-1]
    dilated = np.zeros((19, 19, C))
    dilated[::3, ::3] = np.asarray(p["dw7"])
    flip = lambda w: w[::-1, ::-1]
    x = np.stack([convolve2d(u[..., c], flip(np.asarray(p["dw5"])[..., c]), mode="same") for c in range(C)], -1)
    x = x + np.asarray(p["dw5_bias"])
    x = np.stack([convolve2d(x[..., c], flip(dilated[..., c]), mode="same") for c in range(C)], -1)
    x = x + np.asarray(p["dw7_bias"])
    return u * (x @ np.asarray(p["pw"], np.float64) + np.asarray(p["pw_bias"]))


def test_van_attention_equals_literal_composition_with_shortcut_and_exact_gelu():
    """``VANAttention(x) = x + proj2(LKA(GELU(proj1(x))))`` with exact (erf) GELU, as the official
    ``SpatialAttention``.

    Mutations caught: the shortcut ``x +`` dropped; the tanh-approximate GELU instead of the exact one."""
    C = 4
    graphdef, state = nnx.split(VANAttention(C, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(4)
    state = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.3, s.dtype), state)
    module = nnx.merge(graphdef, state)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 9, 11, C)) * 2.0, jnp.float32)
    got = np.asarray(nnx.jit(lambda m, x: m(x))(module, x))

    p = module.lka.params()
    xn = np.asarray(x, np.float64)
    hidden = xn @ np.asarray(module.proj1.kernel[...], np.float64) + np.asarray(module.proj1.bias[...])

    def want(exact):
        gated = np.stack([lka_np(g, p) for g in gelu_np(hidden, exact)])
        return xn + gated @ np.asarray(module.proj2.kernel[...], np.float64) + np.asarray(module.proj2.bias[...])

    exact = want(True)
    scale = max(1.0, np.abs(exact).max())
    np.testing.assert_allclose(got, exact, atol=1e-6 * scale, rtol=0)   # float32 error here: ~4e-8 * scale
    # power check: the tanh GELU (~4e-5 * scale away) and the missing shortcut are far outside that tolerance
    assert np.abs(want(False) - exact).max() > 1e-5 * scale
    assert np.abs(xn).max() > 1e-5 * scale
