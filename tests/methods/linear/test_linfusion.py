"""P20 LinFusion: explicit formula, permutation equivariance, resolution (duplication) invariance, module."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.linear.linfusion import LinFusionAttention, generalized_linear_attention


def rand(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_equals_explicit_quadratic_formula_with_eps():
    q, k, v = rand(0, 2, 17, 2, 4), rand(1, 2, 17, 2, 4), rand(2, 2, 17, 2, 3)
    phi = lambda x: np.where(x > 0, x + 1, np.exp(x))
    w = np.einsum("bihd,bjhd->bhij", phi(np.asarray(q)), phi(np.asarray(k))) / 17
    want = np.einsum("bhij,bjhe->bihe", w, v) / (w.sum(-1).transpose(0, 2, 1)[..., None] + 1e-4)
    np.testing.assert_allclose(generalized_linear_attention(q, k, v), want, rtol=1e-5, atol=1e-5)


def test_permutation_equivariant_and_duplication_invariant():
    q, k, v = rand(3, 1, 12, 2, 4), rand(4, 1, 12, 2, 4), rand(5, 1, 12, 2, 4)
    out = generalized_linear_attention(q, k, v)
    perm = np.random.default_rng(0).permutation(12)
    np.testing.assert_allclose(generalized_linear_attention(q[:, perm], k[:, perm], v[:, perm]), out[:, perm],
                               atol=1e-5)
    doubled = [jnp.concatenate([x, x], axis=1) for x in (q, k, v)]
    np.testing.assert_allclose(generalized_linear_attention(*doubled)[:, :12], out, atol=1e-5)


@pytest.mark.parametrize("eps", [0.5, 3.0])
def test_duplication_invariance_holds_with_a_large_eps(eps):
    """Means, not sums: duplicating every token (a 2x "resolution") leaves each output unchanged even when
    eps is comparable to the normaliser. With sums the normaliser doubles while eps does not, so the output
    moves by O(eps / normaliser); at the default eps=1e-4 that is below float32 tolerance, which is why the
    plain duplication check above cannot tell the two apart.

    Mutation caught: ``scale=1.0 / q.shape[1]`` replaced by ``scale=1.0`` (summing instead of averaging)."""
    q, k, v = rand(6, 1, 12, 2, 4), rand(7, 1, 12, 2, 4), rand(8, 1, 12, 2, 3)
    out = generalized_linear_attention(q, k, v, eps=eps)
    doubled = [jnp.concatenate([x, x], axis=1) for x in (q, k, v)]
    got = generalized_linear_attention(*doubled, eps=eps)
    np.testing.assert_allclose(got[:, :12], out, atol=1e-5)
    np.testing.assert_allclose(got[:, 12:], out, atol=1e-5)
    # the explicit mean formula at this eps (so the invariance is not of some other function)
    phi = lambda x: np.where(x > 0, x + 1, np.exp(x))
    w = np.einsum("bihd,bjhd->bhij", phi(np.asarray(q, np.float64)), phi(np.asarray(k, np.float64))) / 12
    want = np.einsum("bhij,bjhe->bihe", w, v) / (w.sum(-1).transpose(0, 2, 1)[..., None] + eps)
    np.testing.assert_allclose(out, want, atol=1e-5)
    # power check: the summed form at 12 vs 24 tokens differs by far more than the tolerance (normaliser ~80)
    summed = lambda n: np.einsum("bhij,bjhe->bihe", w * n, v) / ((w * n).sum(-1).transpose(0, 2, 1)[..., None] + eps)
    assert np.abs(summed(12) - summed(24)).max() > 1e-3       # 100x the tolerance


def test_module_loads_softmax_weights_and_runs():
    module = LinFusionAttention(16, 2, rngs=nnx.Rngs(0))
    weights = [rand(i, 16, 16) for i in range(4)]
    module.load_softmax_weights(*weights)
    np.testing.assert_array_equal(module.wq.kernel[...], weights[0])
    x = rand(9, 2, 10, 16)
    y = jax.jit(lambda x: module(x))(x)
    assert y.shape == x.shape and np.all(np.isfinite(y))
    with pytest.raises(ValueError, match="weight must have shape"):
        module.load_softmax_weights(weights[0][:8], *weights[1:])
    with pytest.raises(ValueError, match="feature_map must be one of"):
        generalized_linear_attention(x[..., None], x[..., None], x[..., None], feature_map="tanh")
