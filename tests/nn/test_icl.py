"""P62: the one-layer multi-head softmax model and its analysis statistics."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.nn.icl import (OneLayerMHSoftmax, debiased_gd_predictor, kq_diagonality, ov_last_entry_ratio,
                          ov_zero_sum_residual)
from train.tasks import ICLRegression


def test_statistics_on_hand_built_weights():
    d = 4
    kq = jnp.zeros((2, d + 1, d + 1)).at[:, :d, :d].set(jnp.eye(d) * jnp.array([1.5, -1.5])[:, None, None])
    np.testing.assert_allclose(kq_diagonality(kq, d), 1.0)
    assert float(kq_diagonality(jnp.ones((d + 1, d + 1)), d)) < 0.2
    ov = jnp.zeros((2, d + 1, d + 1)).at[:, -1, -1].set(jnp.array([0.8, -0.8]))
    np.testing.assert_allclose(ov_last_entry_ratio(ov), 1.0)
    np.testing.assert_allclose(ov_zero_sum_residual(ov), 0.0)
    np.testing.assert_allclose(ov_zero_sum_residual(jnp.abs(ov)), 1.0)


def test_debiased_gd_predictor_matches_its_closed_form():
    batch = ICLRegression(dim=3, num_context=7).batch(0, 0, 2)
    tokens = jnp.asarray(batch["tokens"])
    x, y, xq = np.asarray(tokens[:, :-1, :-1]), np.asarray(tokens[:, :-1, -1]), np.asarray(tokens[:, -1, :-1])
    for b in range(2):
        inner = x[b] @ xq[b]
        expected = 0.5 * np.mean(y[b] * (inner - inner.mean()))
        np.testing.assert_allclose(debiased_gd_predictor(tokens, 0.5)[b], expected, rtol=1e-5)


def test_a_plus_minus_omega_head_pair_is_debiased_gd_to_first_order():
    d, v = 4, 0.5
    tokens = jnp.asarray(ICLRegression(dim=d, num_context=16).batch(0, 1, 8)["tokens"])
    errors = []
    for omega in (0.1, 0.01):
        model = OneLayerMHSoftmax(d, 2, rngs=nnx.Rngs(0))
        eye = jnp.zeros((d + 1, d + 1)).at[:d, :d].set(jnp.eye(d))
        model.w_k[...] = jnp.stack([eye, eye])
        model.w_q[...] = jnp.stack([omega * eye, -omega * eye])
        model.w_v[...] = jnp.stack([jnp.eye(d + 1)] * 2)
        model.w_o[...] = jnp.zeros((2, d + 1, d + 1)).at[:, -1, -1].set(jnp.array([v, -v]))
        gd = debiased_gd_predictor(tokens, 2 * v * omega)
        errors.append(float(jnp.max(jnp.abs(model(tokens) - gd)) / jnp.max(jnp.abs(gd))))
    # relative error is O(omega): ten times smaller omega, about ten times smaller error
    assert errors[1] < 0.2 * errors[0] and errors[1] < 0.02
