"""P50: sigmoid attention (normalised / not), kernel-feature attention, and the KV-bias sink slot."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.core.reference import reference_attention
from jattn.methods.linear.sigmoid import init_kernel_mlp, kernel_attention, kv_bias_attention, sigmoid_attention


def rand(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


Q, K, V = rand(0, 2, 13, 2, 8), rand(1, 2, 13, 2, 8), rand(2, 2, 13, 2, 8)


def scores():
    return np.einsum("bthd,bshd->bhts", Q, K) / np.sqrt(8)


def test_unnormalized_sigmoid_is_masked_sigmoid_times_v():
    w = np.tril(1 / (1 + np.exp(-scores())))
    np.testing.assert_allclose(sigmoid_attention(Q, K, V), np.einsum("bhts,bshd->bthd", w, V), atol=1e-5)


def test_elu_similarity_normalized():
    s = scores()
    w = np.tril(np.where(s > 0, s + 1, np.exp(s)))
    w = w / (w.sum(-1, keepdims=True) + 1e-8)
    np.testing.assert_allclose(sigmoid_attention(Q, K, V, sim="elu", normalize=True),
                               np.einsum("bhts,bshd->bthd", w, V), atol=1e-5)


def test_row_shift_changes_sigmoid_but_not_softmax():
    shift = rand(3, 2, 2, 13, 1) * 3.0  # a different constant per row
    softmax = lambda b: reference_attention(Q, K, V, causal=True, bias=b)
    sigmoid = lambda b: sigmoid_attention(Q, K, V, normalize=True, bias=b)
    zero = jnp.zeros((1, 1, 1, 1))
    np.testing.assert_allclose(softmax(shift), softmax(zero), atol=1e-5)
    assert np.max(np.abs(np.asarray(sigmoid(shift) - sigmoid(zero)))) > 1e-2


def kernel_attention_np(feature, params, normalize=True, scale=8 ** -0.5):
    """The official ``eager_scaled_dot_product_attention`` for kernel features, in float64:
    ``W = phi(q) phi(k)^T * scale * C``, then ``W / (rowsum + 1e-8)`` (elu) or ``W / max(|rowsum|, 1)``."""
    p = {name: np.asarray(value, np.float64) for name, value in (params or {}).items()}
    phi = {"identity": lambda x: x, "elu": lambda x: np.where(x > 0, x + 1, np.exp(x)),
           "mlp": lambda x: np.maximum(x @ p["w1"] + p.get("b1", 0.0), 0) @ p["w2"] + p.get("b2", 0.0)}[feature]
    w = np.tril(np.einsum("bthd,bshd->bhts", phi(np.asarray(Q, np.float64)), phi(np.asarray(K, np.float64))))
    w = w * scale
    if normalize:
        rowsum = w.sum(-1, keepdims=True)
        w = w / (rowsum + 1e-8 if feature == "elu" else np.maximum(np.abs(rowsum), 1.0))
    return np.einsum("bhts,bshd->bthd", w, np.asarray(V, np.float64))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("feature", ["identity", "elu", "mlp"])
def test_kernel_variants_equal_their_quadratic_formulas(feature, normalize):
    """Against the official formula with its ``1/sqrt(d_h)`` scale and bias-free kernel MLP.

    Mutations caught: the scale left out (identity/mlp normalised through the ``max(|rowsum|, 1)`` clamp, and
    every unnormalised variant); MLP biases added where the official layers have none."""
    params = init_kernel_mlp(jax.random.PRNGKey(0), 8)
    assert set(params) == {"w1", "w2"}                       # official configs: bias=False
    got = jax.jit(lambda q, k, v, p: kernel_attention(q, k, v, feature=feature, mlp_params=p, normalize=normalize,
                                                      chunk_size=4, impl="xla"))(Q, K, V, params)
    np.testing.assert_allclose(got, kernel_attention_np(feature, params, normalize), rtol=1e-4, atol=1e-4)


def test_kernel_scale_and_mlp_biases():
    """An explicit scale is the one used; ``bias=True`` MLP biases (non-zero here) enter the feature map."""
    params = init_kernel_mlp(jax.random.PRNGKey(1), 8, bias=True)
    params = {**params, "b1": rand(6, 8) * 0.5, "b2": rand(7, 8) * 0.5}
    for feature, scale in (("identity", 0.05), ("mlp", 0.3), ("mlp", None)):
        got = kernel_attention(Q, K, V, feature=feature, mlp_params=params, scale=scale, chunk_size=4, impl="xla")
        want = kernel_attention_np(feature, params, scale=8 ** -0.5 if scale is None else scale)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the identity kernel's clamp makes the scale visible in the normalised output
    assert not np.allclose(kernel_attention_np("identity", None, scale=1.0), kernel_attention_np("identity", None),
                           atol=1e-2)


def test_kv_bias_equals_dense_attention_on_the_concatenation_without_the_extra_row():
    k_bias, v_bias = rand(4, 2, 8), rand(5, 2, 8)
    slot = lambda x: jnp.broadcast_to(x, (2, 1, 2, 8))
    q_cat = jnp.concatenate([jnp.zeros((2, 1, 2, 8)), Q], axis=1)
    dense = reference_attention(q_cat, jnp.concatenate([slot(k_bias), K], 1), jnp.concatenate([slot(v_bias), V], 1),
                                causal=True)
    np.testing.assert_allclose(kv_bias_attention(Q, K, V, k_bias, v_bias), dense[:, 1:], atol=1e-5)
    zero_value = kv_bias_attention(Q, K, V, k_bias[0])  # shared key, fixed zero value
    assert zero_value.shape == Q.shape and np.all(np.isfinite(zero_value))


def test_argument_errors():
    with pytest.raises(ValueError, match="sim must be one of"):
        sigmoid_attention(Q, K, V, sim="tanh")
    with pytest.raises(ValueError, match="k_bias must have shape"):
        kv_bias_attention(Q, K, V, jnp.ones((3, 8)))
    with pytest.raises(TypeError, match="mlp_params"):
        kernel_attention(Q, K, V, feature="mlp")
    with pytest.raises(TypeError, match="mlp_params"):
        kernel_attention(Q, K, V, feature="mlp", mlp_params={"w1": jnp.ones((8, 8))})
    with pytest.raises(ValueError, match="scale must be"):
        kernel_attention(Q, K, V, scale=-1.0)
    with pytest.raises(ValueError, match="mask must be broadcastable"):
        sigmoid_attention(Q, K, V, mask=jnp.ones((5, 5), bool))
