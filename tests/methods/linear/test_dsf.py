"""P57 DSF: materialised matrices, the Jacobian, normalised linear attention as a Lambda = eta ratio
recurrence, SSD == decayed linear attention, S6 per-channel systems and the equivalence condition."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.linear.dsf import (DSF, dsf_attention_matrix, dsf_recurrent, dsf_to_linear_attention,
                                      linear_attention_dsf, normalized_linear_attention_quadratic,
                                      normalized_linear_attention_recurrent, s6_dsf, ssd_dsf)
from jattn.ops.linear import linear_attention


def rand(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_normalized_linear_attention_recurrence_equals_quadratic_form():
    q, k, v = rand(0, 2, 15, 4), rand(1, 2, 15, 4), rand(2, 2, 15, 3)
    np.testing.assert_allclose(normalized_linear_attention_recurrent(q, k, v),
                               normalized_linear_attention_quadratic(q, k, v), atol=1e-5)


def test_lightning_is_the_dsf_with_isotropic_decay_and_matrix_is_the_jacobian():
    q, k, v = rand(3, 1, 12, 1, 4), rand(4, 1, 12, 1, 4), rand(5, 1, 12, 1, 3)
    log_decay = -jnp.abs(rand(6, 1))
    mixer = lambda v: linear_attention(q, k, v, log_decay=log_decay, impl="xla", chunk_size=4)[0, :, 0]
    dsf = linear_attention_dsf(q[0, :, 0], k[0, :, 0], log_decay[0])
    np.testing.assert_allclose(dsf.decay, np.exp(log_decay[0]) * np.ones((12, 4)), rtol=1e-6)
    matrix = jax.jit(dsf_attention_matrix)(dsf)
    np.testing.assert_allclose(matrix @ v[0, :, 0], jax.jit(mixer)(v), atol=1e-5)
    jacobian = jax.jit(jax.jacfwd(mixer))(v)[:, 0, 0, :, 0, 0]  # d y[i, e=0] / d v[j, e=0]
    np.testing.assert_allclose(jacobian, matrix, atol=1e-5)
    np.testing.assert_allclose(jax.jit(dsf_recurrent)(dsf, v[0, :, 0]), jax.jit(mixer)(v), atol=1e-5)


def test_ssd_converts_to_linear_attention_with_learned_decay():
    a, b, c, u = -jnp.abs(rand(7, 2, 10)), rand(8, 2, 10, 4), rand(9, 2, 10, 4), rand(10, 2, 10, 3)
    dsf = ssd_dsf(a, b, c)
    q, k, log_decay = dsf_to_linear_attention(dsf)
    to_bthd = lambda x: jnp.moveaxis(x, 0, 1)[None]  # head axis from the leading dim
    out = jax.jit(lambda q, k, u, a: linear_attention(q, k, u, log_decay=a, impl="xla", chunk_size=4))(
        to_bthd(q), to_bthd(k), to_bthd(u), jnp.moveaxis(log_decay, 0, 1)[None])
    np.testing.assert_allclose(jnp.moveaxis(out[0], 1, 0), jax.jit(dsf_recurrent)(dsf, u), atol=1e-5)


def test_s6_per_channel_system_matches_a_loop_and_is_not_a_linear_attention():
    T, E, n = 7, 3, 4
    delta, A = jax.nn.softplus(rand(11, T, E)), -jnp.exp(rand(12, E, n))
    b, c, d, u = rand(13, T, n), rand(14, T, n), rand(15, E), rand(16, T, E)
    dsf = s6_dsf(delta, A, b, c, d)
    y = dsf_recurrent(dsf, jnp.moveaxis(u, -1, 0)[..., None])[..., 0].T  # [T, E]
    h, want = np.zeros((E, n)), np.zeros((T, E))
    for t in range(T):
        h = np.exp(np.asarray(delta[t])[:, None] * np.asarray(A)) * h + np.asarray(delta[t])[:, None] * np.asarray(b[t]) * np.asarray(u[t])[:, None]
        want[t] = h @ np.asarray(c[t]) + np.asarray(d) * np.asarray(u[t])
    np.testing.assert_allclose(y, want, atol=1e-5)
    np.testing.assert_allclose(jnp.einsum("etj,je->te", dsf_attention_matrix(dsf), u), want, atol=1e-5)
    with pytest.raises(ValueError, match="not isotropic"):
        dsf_to_linear_attention(dsf)


def test_bad_dsf_arguments():
    with pytest.raises(TypeError, match="dsf must be a DSF"):
        dsf_recurrent((1, 2, 3, 4), rand(0, 3, 1))
    dsf = linear_attention_dsf(rand(0, 5, 2), rand(1, 5, 2))
    with pytest.raises(ValueError, match="u must have shape"):
        dsf_recurrent(dsf, rand(2, 4, 1))
    with pytest.raises(ValueError, match="dsf arrays"):
        dsf_attention_matrix(DSF(dsf.decay, dsf.input[:, :1], dsf.output, dsf.skip))
