"""Attention-map statistics: P50's sink metric, entropy, top-k recall."""
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.nn.attention_maps import attention_entropy, key_importance, sink_metric, topk_recall


def _sink_map(T=8, share=0.5):
    """Causal rows giving `share` to key 0 and the rest uniformly to the other visible keys."""
    rows = []
    for i in range(T):
        row = np.zeros(T)
        if i == 0:
            row[0] = 1.0
        else:
            row[0] = share
            row[1:i + 1] = (1 - share) / i
        rows.append(row)
    return jnp.asarray(np.stack(rows), jnp.float32)


def test_sink_metric_is_100_when_column_zero_gets_half_of_every_row():
    alpha, pct = sink_metric(_sink_map()[None, None])
    assert float(pct) == 100.0
    np.testing.assert_allclose(alpha[0, 0, 0], (1 + 0.5 * 7) / 8, rtol=1e-6)


def test_sink_metric_is_0_for_uniform_causal_attention_and_averages_over_heads():
    T = 16
    uniform = jnp.tril(jnp.ones((T, T))) / jnp.arange(1, T + 1)[:, None]
    _, pct = sink_metric(uniform[None])
    assert float(pct) == 0.0   # alpha_0 = H_T / T ~ 0.21 < 0.3
    _, mixed = sink_metric(jnp.stack([uniform, _sink_map(T)]))
    assert float(mixed) == 50.0


def test_key_importance_matches_the_definition():
    A = jnp.asarray(np.tril(np.random.default_rng(0).random((6, 6))), jnp.float32)
    alpha = key_importance(A)
    for k in range(6):
        np.testing.assert_allclose(alpha[k], A[k:, k].sum() / (6 - k), rtol=1e-6)
    with pytest.raises(ValueError, match="square"):
        key_importance(jnp.ones((3, 4)))


def test_entropy_and_topk_recall():
    uniform = jnp.full((1, 8), 1 / 8)
    np.testing.assert_allclose(attention_entropy(uniform), np.log(8), rtol=1e-6)
    np.testing.assert_allclose(topk_recall(uniform, 2), 0.25, rtol=1e-6)
    peaked = jnp.asarray([[0.7, 0.2, 0.1, 0.0]])
    np.testing.assert_allclose(topk_recall(peaked, 2), 0.9, rtol=1e-6)
    with pytest.raises(ValueError, match="k must be"):
        topk_recall(peaked, 5)
