"""Attention-map statistics: P50's sink metric, entropy, top-k recall."""
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.nn.attention_maps import (attention_entropy, key_columns, key_importance, sink_metric, streamed_sink_metric,
                                       topk_recall)


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


# --------------------------------------------- P50 through an attention core (key_columns, streamed sink metric)

def _qk(seed, B=2, T=11, H=4, Hkv=2, D=4):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(2 * rng.standard_normal((B, T, H, D)), jnp.float32),
            jnp.asarray(2 * rng.standard_normal((B, T, Hkv, D)), jnp.float32))


def _dense_probs(q, k, **kwargs):
    """The reference map [B, H, T, S] of jattn.attention(q, k, ., **kwargs), from its probabilities."""
    from jattn.core.reference import reference_attention
    v = jnp.zeros(k.shape, k.dtype)
    return reference_attention(q, k, v, return_probs=True, **kwargs)[1]


@pytest.mark.parametrize("hook", ["causal", "score_mod", "prob_mod"])
def test_key_columns_are_the_cores_map_columns_in_chunks_of_d(hook):
    """One-hot values read A's leading columns (GQA, odd T, 6 columns over D=4: two calls). Catches the one-hot
    offset's sign (columns past D would be wrong), a missed chunk, and the hooks not being applied."""
    import functools
    import jattn
    q, k = _qk(0)
    kwargs = {"causal": dict(causal=True),
              "score_mod": dict(causal=True, score_mod=lambda s, b, h, qi, ki: s - 0.3 * (qi - ki)),
              "prob_mod": dict(causal=True, prob_mod=lambda p: p.at[..., 0].multiply(2.0))}[hook]
    attend = functools.partial(jattn.attention, impl="reference" if hook == "prob_mod" else "xla", **kwargs)
    columns = key_columns(attend, q, k, 6)
    want = _dense_probs(q, k, **kwargs)[..., :6]                                  # [B, H, T, 6]
    np.testing.assert_allclose(np.asarray(columns), np.asarray(jnp.moveaxis(want, 1, 2)), atol=2e-6)


@pytest.mark.parametrize("position", [0, 2])
def test_streamed_sink_metric_equals_the_metric_of_the_map(position):
    """Catches dividing by T instead of T - position (the number of queries that can see the key)."""
    import functools
    import jattn
    q, k = _qk(1, T=9)
    attend = functools.partial(jattn.attention, causal=True, impl="xla")
    alpha, pct = streamed_sink_metric(attend, q, k, eps=0.2, position=position)
    want_alpha, want_pct = sink_metric(_dense_probs(q, k, causal=True), eps=0.2, position=position)
    np.testing.assert_allclose(np.asarray(alpha), np.asarray(want_alpha[..., position]), atol=2e-6)
    assert float(pct) == float(want_pct)


def test_streamed_sink_metric_of_uniform_attention_is_the_harmonic_mean():
    """q = 0 makes causal attention uniform: alpha_0 = (1/T) sum_t 1/(t+1) (0.75 at T = 2, 100 %; 0.34 at T = 8)."""
    import functools
    import jattn
    attend = functools.partial(jattn.attention, causal=True, impl="xla")
    for T, pct in ((2, 100.0), (16, 0.0)):
        q = jnp.zeros((1, T, 2, 4))
        k = jnp.asarray(np.random.default_rng(T).standard_normal((1, T, 2, 4)), jnp.float32)
        alpha, got = streamed_sink_metric(attend, q, k, eps=0.3)
        np.testing.assert_allclose(np.asarray(alpha), sum(1 / (t + 1) for t in range(T)) / T, rtol=1e-6)
        assert float(got) == pct


def test_key_columns_and_streamed_metric_name_bad_arguments():
    import functools
    import jattn
    q, k = _qk(2, T=5)
    attend = functools.partial(jattn.attention, causal=True)
    with pytest.raises(ValueError, match="columns"):
        key_columns(attend, q, k, 6)
    with pytest.raises(ValueError, match="position"):
        streamed_sink_metric(attend, q, k, position=5)
    with pytest.raises(ValueError, match="causal self-attention"):
        streamed_sink_metric(attend, q, k[:, :4])
