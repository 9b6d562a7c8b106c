"""P39 PAINT: informed visual token selection (IQR outliers, column-mean score without CLS) and the logit boost
on the generated row, as an array function and as a fused score_mod."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.methods.generative import paint


def _rand(seed, shape, scale=1.0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32) * scale


def _masks(B=2, N=6, seed=0):
    rng = np.random.default_rng(seed)
    local = rng.random((B, N)) < 0.4
    summary = (rng.random((B, N)) < 0.3) & ~local
    local[:, 0], summary[:, 1], local[:, 1] = True, True, False           # at least one of each
    return jnp.asarray(local), jnp.asarray(summary)


def test_alpha_beta_zero_is_identity():
    """alpha = beta = 0 returns the scores bit for bit, and so does the score_mod (catches a boost term added
    unconditionally, e.g. ``+ |s|`` without the coefficient)."""
    s = _rand(1, (2, 3, 5, 9), 2.0)
    local, summary = _masks(2, 6)
    np.testing.assert_array_equal(np.asarray(paint.boost_logits(s, local, summary, 0.0, 0.0, rows=-1)), np.asarray(s))
    q, k, v = _rand(2, (2, 5, 3, 8)), _rand(3, (2, 9, 3, 8)), _rand(4, (2, 9, 3, 8))
    mod = paint.paint_score_mod(local, summary, 0.0, 0.0, num_keys=9, key_offset=2)
    np.testing.assert_allclose(np.asarray(jattn.attention(q, k, v, score_mod=mod, impl="xla")),
                               np.asarray(jattn.attention(q, k, v, impl="xla")), rtol=1e-6, atol=1e-6)


def test_boost_is_hand_computed_on_the_last_row_only():
    """Hand-built logits: local keys get ``s + alpha |s|``, summary keys ``s + beta |s|`` (negative logits move
    toward 0), other keys and every row but the last are unchanged (catches ``alpha * s`` instead of
    ``alpha * |s|``, swapped alpha/beta, the boost on every row, or the key offset ignored)."""
    s = jnp.asarray([[[[2.0, -2.0, 1.0, -1.0, 3.0], [1.0, 1.0, 1.0, 1.0, 1.0]]]])      # [1, 1, 2, 5]
    local = jnp.asarray([[True, False, False, False]])
    summary = jnp.asarray([[False, True, False, True]])
    out = np.asarray(paint.boost_logits(s, local, summary, 0.5, 0.25, rows=-1, key_offset=1))
    np.testing.assert_allclose(out[0, 0, 0], [2.0, -2.0, 1.0, -1.0, 3.0])
    np.testing.assert_allclose(out[0, 0, 1], [1.0, 1.5, 1.25, 1.0, 1.25])
    out0 = np.asarray(paint.boost_logits(s, local, summary, 0.5, 0.25, rows=0, key_offset=1))
    np.testing.assert_allclose(out0[0, 0, 0], [2.0, -2.0 + 1.0, 1.25, -1.0, 3.75])


def test_rows_not_selected_are_untouched():
    """With a bool row mask only the selected query rows change; the others are bit-identical (catches the
    mask applied on the key axis or broadcast over rows)."""
    s = _rand(5, (2, 4, 7, 10), 3.0)
    local, summary = _masks(2, 10, seed=2)
    rows = jnp.asarray([False, True, False, False, True, False, True])
    out = np.asarray(paint.boost_logits(s, local, summary, 0.7, 0.3, rows=rows))
    np.testing.assert_array_equal(out[:, :, ~np.asarray(rows)], np.asarray(s)[:, :, ~np.asarray(rows)])
    assert not np.allclose(out[:, :, np.asarray(rows)], np.asarray(s)[:, :, np.asarray(rows)])


def test_boosted_probability_rises_monotonically_in_alpha():
    """The softmax mass on the boosted keys of the last row rises strictly with alpha (and a single boosted key's
    probability too) (catches a boost of the wrong sign or one applied after the softmax normalisation)."""
    s = _rand(6, (1, 2, 3, 12), 2.0)
    local = jnp.zeros((1, 12), bool).at[0, jnp.asarray([1, 4, 7])].set(True)
    summary = jnp.zeros((1, 12), bool)
    masses, single = [], []
    for alpha in (0.0, 0.2, 0.5, 0.9, 1.5):
        p = jax.nn.softmax(paint.boost_logits(s, local, summary, alpha, 0.0), -1)[0, :, -1]
        masses.append(np.asarray(p[:, np.asarray(local[0])].sum(-1)))
        lone = jnp.zeros((1, 12), bool).at[0, 4].set(True)
        single.append(np.asarray(jax.nn.softmax(paint.boost_logits(s, lone, summary, alpha, 0.0), -1)[0, :, -1, 4]))
    assert np.all(np.diff(np.stack(masses), axis=0) > 0)
    assert np.all(np.diff(np.stack(single), axis=0) > 0)


def test_score_mod_equals_boosted_reference():
    """``jattn.attention(score_mod=paint_score_mod(...))`` equals ``softmax(boost_logits(q k^T * scale)) v`` on
    the selected rows, per batch (catches the batch index dropped from the per-key table, or the mod applied
    before the scale)."""
    B, T, S, H, D = 2, 5, 11, 2, 8
    q, k, v = _rand(7, (B, T, H, D)), _rand(8, (B, S, H, D)), _rand(9, (B, S, H, D))
    local, summary = _masks(B, 6, seed=4)
    rows = jnp.asarray([False, False, True, True, True])
    mod = paint.paint_score_mod(local, summary, 0.7, 0.3, rows=rows, num_keys=S, key_offset=3)
    scores = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") * D ** -0.5
    want = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(paint.boost_logits(scores, local, summary, 0.7, 0.3,
                                                                            rows=rows, key_offset=3), -1), v,
                      precision="highest")
    np.testing.assert_allclose(np.asarray(jattn.attention(q, k, v, score_mod=mod, impl="xla")), np.asarray(want),
                               rtol=1e-5, atol=1e-5)


def test_iqr_outlier_rule_matches_numpy():
    """``iqr_outliers`` equals ``x > Q3 + 1.5 (Q3 - Q1)`` computed with numpy's default quantiles (catches a
    nearest-rank quantile, ``>=``, or the rule over the whole batch instead of per row)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 37)).astype(np.float32)
    x[:, 5] += 6.0
    x[1, 9] += 4.0
    x[3] *= 5.0
    q1, q3 = np.quantile(x, 0.25, axis=-1, keepdims=True), np.quantile(x, 0.75, axis=-1, keepdims=True)
    want = x > q3 + 1.5 * (q3 - q1)
    got = np.asarray(paint.iqr_outliers(jnp.asarray(x)))
    np.testing.assert_array_equal(got, want)
    assert got[:, 5].all() and got.sum() < x.size // 4


def test_selection_without_cls_uses_column_mean_and_excludes_summary():
    """Hand-built encoder maps: the patch score is the attention received (column mean) summed over heads; local
    is the top 25% of the first layer minus the penultimate layer's IQR outliers, the sets are disjoint; a CLS
    row ``[B, H, N]`` is taken as the score directly (catches the row mean (attention given) instead of the
    column mean, ``local_ratio`` ignored, or summary tokens left in local)."""
    B, H, N = 1, 2, 8
    received = np.array([0.05, 0.3, 0.05, 0.2, 0.1, 0.1, 0.15, 0.05])
    first = np.broadcast_to(received, (B, H, N, N)).copy()               # every row gives the same weights
    penult = np.full((B, H, N, N), 1.0 / N)
    penult[..., 3] += 2.0                                                # column 3 is the outlier
    penult /= penult.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(paint.patch_scores(jnp.asarray(first))), 2 * received[None], rtol=1e-6)
    local, summary = paint.select_informed_visual_tokens(jnp.asarray(first), jnp.asarray(penult), 0.25)
    np.testing.assert_array_equal(np.asarray(summary[0]), np.arange(N) == 3)
    np.testing.assert_array_equal(np.asarray(local[0]), np.arange(N) == 1)   # top-2 = {1, 3}, minus summary 3
    cls_local, _ = paint.select_informed_visual_tokens(jnp.asarray(first[:, :, 0]), jnp.asarray(penult[:, :, 0]), 0.5)
    assert int(cls_local.sum()) == 3 and not bool((cls_local & summary).any())
    transposed = jnp.asarray(np.swapaxes(first, -1, -2))                  # rows give, columns uniform
    assert np.allclose(np.asarray(paint.patch_scores(transposed)), 2.0 / N)


def test_bad_arguments_raise():
    """Bad shapes, dtypes and values name the argument."""
    s = _rand(1, (1, 1, 2, 4))
    local, summary = _masks(1, 4)
    with pytest.raises(ValueError, match="alpha"):
        paint.boost_logits(s, local, summary, -0.1, 0.3)
    with pytest.raises(ValueError, match="rows"):
        paint.boost_logits(s, local, summary, rows=5)
    with pytest.raises(ValueError, match="local"):
        paint.boost_logits(s, local.astype(jnp.int32), summary)
    with pytest.raises(ValueError, match="key_offset"):
        paint.boost_logits(s, local, summary, key_offset=2)
    with pytest.raises(ValueError, match="local_ratio"):
        paint.select_informed_visual_tokens(_rand(0, (1, 2, 4, 4)), _rand(1, (1, 2, 4, 4)), 1.5)
    with pytest.raises(TypeError, match="attn"):
        paint.patch_scores(jnp.ones((1, 2, 4, 4), jnp.int32))
    with pytest.raises(ValueError, match="square"):
        paint.patch_scores(_rand(0, (1, 2, 4, 5)))
