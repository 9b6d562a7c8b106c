"""P14 VAR: sink detection on rms-normalised hidden states, image-centric row selection and the
row-sum-preserving redistribution (tiny shapes, fresh random inputs, hand-built rows)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.generative.var import (detect_sink_tokens, image_centric_rows, massive_dims, rms_normalize,
                                          scaled_tau, var_prob_mod, var_redistribute)

K, N = 7, 4                                       # keys: 4 image then 3 text
IS_IMAGE = np.arange(K) < N


def _probs(seed, B=2, H=3, Q=5):
    return jax.nn.softmax(jax.random.normal(jax.random.key(seed), (B, H, Q, K)) * 1.5, axis=-1)


def _sink(B=2):
    s = np.zeros((B, K), bool)
    s[:, 1] = True                                # a visual sink
    s[:, 4] = True                                # a text sink (the first text token)
    return jnp.asarray(s)


_vr = jax.jit(var_redistribute, static_argnames=("rho", "alpha", "p"))


def test_row_sums_preserved_and_p1_is_identity():
    """Rows still sum to 1 after redistribution (catches moving (1 - p) of the whole row, or of only the visual
    sinks while scaling all sinks); p = 1 returns the map unchanged (catches a budget that is not (1 - p))."""
    A = _probs(0)
    out = np.asarray(_vr(A, IS_IMAGE, _sink(), rho=1.0, alpha=0.0, p=0.6))
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-6)
    assert not np.allclose(out, np.asarray(A))
    np.testing.assert_allclose(np.asarray(_vr(A, IS_IMAGE, _sink(), rho=1.0, alpha=0.0, p=1.0)), np.asarray(A),
                               atol=1e-7)


def test_mass_moves_only_to_visual_non_sinks_in_proportion():
    """Sinks keep exactly p of their weight; non-sink text tokens are untouched; every visual non-sink token is
    multiplied by the same factor, and what they gain equals (1 - p) of the sinks' weight (catches a uniform
    instead of proportional split, or text tokens receiving mass)."""
    A = np.asarray(_probs(1))
    sink = np.asarray(_sink())
    out = np.asarray(_vr(jnp.asarray(A), IS_IMAGE, jnp.asarray(sink), rho=1.0, alpha=0.0, p=0.6))
    np.testing.assert_allclose(out[..., sink[0]], 0.6 * A[..., sink[0]], rtol=1e-6)
    text_plain = ~IS_IMAGE & ~sink[0]
    np.testing.assert_array_equal(out[..., text_plain], A[..., text_plain])
    receivers = IS_IMAGE & ~sink[0]
    ratio = out[..., receivers] / A[..., receivers]
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[..., :1], ratio.shape), rtol=1e-5)
    gained = (out[..., receivers] - A[..., receivers]).sum(-1)
    np.testing.assert_allclose(gained, 0.4 * A[..., sink[0]].sum(-1), rtol=1e-5, atol=1e-7)


def test_rows_failing_the_criteria_are_unchanged():
    """Hand-built rows: a row with little image attention (< alpha) and a row whose image attention sits on the
    visual sink (portion > rho) are left alone; an image-centric row is changed (catches a flipped
    inequality, or the portion taken over the whole row instead of the image span)."""
    rows = np.array([
        [0.02, 0.03, 0.02, 0.03, 0.5, 0.2, 0.2],     # image sum 0.1 < alpha
        [0.05, 0.6, 0.05, 0.1, 0.1, 0.05, 0.05],     # visual sink holds 0.6 / 0.8 > rho of the image
        [0.2, 0.1, 0.2, 0.2, 0.2, 0.05, 0.05],       # image-centric: 0.7 >= alpha, 0.1 / 0.7 <= rho
    ], np.float32)
    A = jnp.asarray(rows[None, None])
    sink = _sink(1)
    sel = np.asarray(image_centric_rows(A, IS_IMAGE, sink, rho=0.5, alpha=0.2))[0, 0]
    np.testing.assert_array_equal(sel, [False, False, True])
    out = np.asarray(var_redistribute(A, IS_IMAGE, sink, rho=0.5, alpha=0.2, p=0.6))[0, 0]
    np.testing.assert_array_equal(out[:2], rows[:2])
    omega = 0.4 * (0.1 + 0.2)
    want = rows[2].copy()
    want[[1, 4]] *= 0.6
    want[[0, 2, 3]] += omega * rows[2, [0, 2, 3]] / 0.6
    np.testing.assert_allclose(out[2], want, rtol=1e-6)


def test_query_mask_and_prob_mod():
    """Rows outside ``query_mask`` (the image rows) are untouched; the prob_mod form equals the function
    (catches the query mask applied to keys)."""
    A = _probs(2)
    qm = np.array([False, False, True, True, True])
    out = np.asarray(var_redistribute(A, IS_IMAGE, _sink(), rho=1.0, alpha=0.0, p=0.5, query_mask=qm))
    np.testing.assert_array_equal(out[:, :, :2], np.asarray(A)[:, :, :2])
    assert not np.allclose(out[:, :, 2:], np.asarray(A)[:, :, 2:])
    mod = var_prob_mod(IS_IMAGE, _sink(), rho=1.0, alpha=0.0, p=0.5, query_mask=qm)
    np.testing.assert_allclose(np.asarray(mod(A)), out, atol=1e-7)


def test_no_receivers_leaves_the_row_unchanged():
    """Every image token a sink: nothing can receive the budget, so the row keeps its mass (catches a row
    that silently loses (1 - p) of the sinks' weight)."""
    A = _probs(3)
    sink = jnp.asarray(np.broadcast_to(IS_IMAGE, (2, K)).copy())
    out = np.asarray(var_redistribute(A, IS_IMAGE, sink, rho=1.0, alpha=0.0, p=0.5))
    np.testing.assert_allclose(out, np.asarray(A), atol=1e-7)


def test_sink_detection_on_rms_normalised_states():
    """A token with a massive value in a sink dim is flagged, a token with the same value in another dim is not;
    scaling h by a constant changes nothing (catches a missing rms normalisation or max over all dims);
    massive_dims finds the planted dim; scaled_tau keeps tau at LLaMA's width."""
    h = np.array(jax.random.normal(jax.random.key(4), (2, 6, 64)))
    h[:, 2, 5] = 60.0
    h[:, 3, 9] = 60.0
    flags = np.asarray(detect_sink_tokens(jnp.asarray(h), [5, 7], tau=4.0))
    np.testing.assert_array_equal(flags, np.broadcast_to([False, False, True, False, False, False], (2, 6)))
    np.testing.assert_array_equal(np.asarray(detect_sink_tokens(jnp.asarray(h * 30.0), [5, 7], tau=4.0)), flags)
    np.testing.assert_allclose(np.asarray(jnp.mean(rms_normalize(jnp.asarray(h)) ** 2, -1)), 1.0, rtol=1e-4)
    assert massive_dims(jnp.asarray(h), top_k=2).tolist()[:2] in ([5, 9], [9, 5])
    assert scaled_tau(4096) == 20.0 and abs(scaled_tau(64) - 2.5) < 1e-9


def test_bad_arguments_raise_naming_the_argument():
    A = _probs(5)
    with pytest.raises(ValueError, match="is_image"):
        var_redistribute(A, np.ones(K, np.int32), _sink())
    with pytest.raises(ValueError, match="sink"):
        var_redistribute(A, IS_IMAGE, jnp.ones((2, K + 1), bool))
    with pytest.raises(ValueError, match="query_mask"):
        var_redistribute(A, IS_IMAGE, _sink(), query_mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="p must"):
        var_redistribute(A, IS_IMAGE, _sink(), p=1.5)
    with pytest.raises(ValueError, match="rho"):
        image_centric_rows(A, IS_IMAGE, _sink(), rho=-0.1)
    with pytest.raises(ValueError, match="probs"):
        var_redistribute(A[0], IS_IMAGE, _sink())
    with pytest.raises(ValueError, match="sink_dims"):
        detect_sink_tokens(jnp.ones((1, 2, 8)), [8])
    with pytest.raises(ValueError, match="tau"):
        detect_sink_tokens(jnp.ones((1, 2, 8)), [1], tau=0.0)
    with pytest.raises(ValueError, match="top_k"):
        massive_dims(jnp.ones((1, 2, 8)), top_k=9)
