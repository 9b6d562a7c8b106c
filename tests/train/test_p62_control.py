"""P62's linear-attention control (``python -m train.p62_control``)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.nn.icl import OneLayerMHSoftmax
from train import p62_control as p62
from train.tasks import ICLRegression


def _tokens(key, B=3, n=5, d=3):
    return jax.random.normal(key, (B, n + 1, d + 1))


@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_the_control_is_exactly_linear_attention(normalize):
    """Hand-computed ``sum_h e^T OV_h sum_l z_l (z_l^T KQ_h z_q) / c`` with explicit per-head weights
    (catches a softmax left in, a transposed KQ, or the wrong normaliser)."""
    d, H, n = 3, 2, 5
    model = p62.OneLayerMHLinear(d, H, rngs=nnx.Rngs(0), normalize=normalize, init_scale=1.0)
    tokens = np.asarray(_tokens(jax.random.PRNGKey(1), n=n, d=d), np.float64)
    wq, wk, wv, wo = (np.asarray(w[...], np.float64) for w in (model.w_q, model.w_k, model.w_v, model.w_o))
    want = np.zeros(tokens.shape[0])
    for b in range(tokens.shape[0]):
        z_q = tokens[b, -1]
        for h in range(H):
            kq, ov = wk[h].T @ wq[h], wo[h] @ wv[h]
            for l in range(n):
                z = tokens[b, l]
                want[b] += (ov @ z)[-1] * (z @ kq @ z_q) / (n if normalize == "mean" else 1)
    np.testing.assert_allclose(model(jnp.asarray(tokens, jnp.float32)), want, rtol=1e-4, atol=1e-5)


def test_repeating_the_context_doubles_the_sum_form_and_leaves_mean_and_softmax_unchanged():
    """The defining difference in length behaviour: a context shown twice doubles ``sum`` linear attention's
    output, while the ``1/n`` form and softmax (a weighted average) are unchanged."""
    tokens = _tokens(jax.random.PRNGKey(2))
    doubled = jnp.concatenate([tokens[:, :-1], tokens[:, :-1], tokens[:, -1:]], axis=1)
    lin_sum = p62.OneLayerMHLinear(3, 2, rngs=nnx.Rngs(3), normalize="sum")
    lin_mean = p62.OneLayerMHLinear(3, 2, rngs=nnx.Rngs(3), normalize="mean")
    soft = OneLayerMHSoftmax(3, 2, rngs=nnx.Rngs(3))
    np.testing.assert_allclose(lin_sum(doubled), 2 * lin_sum(tokens), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lin_mean(doubled), lin_mean(tokens), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(soft(doubled), soft(tokens), rtol=1e-5, atol=1e-6)


def test_evaluation_at_another_length_runs_and_least_squares_is_exact_without_noise():
    """Evaluation at the training length and at twice it; OLS recovers beta exactly at noise 0 (catches a
    least-squares baseline fitted on the wrong columns)."""
    data = ICLRegression(3, 8, 0.0)
    model = p62.OneLayerMHLinear(3, 2, rngs=nnx.Rngs(4))
    out = p62.evaluate_lengths(model, data, seed=0, lengths=(8, 16), samples=64, train_n=8)
    assert set(out) == {8, 16}
    for n in (8, 16):
        assert np.isfinite(out[n]["model"]) and out[n]["least_squares"] < 1e-6 < out[n]["zero"]
        assert out[n]["debiased_gd_best_scale"] <= out[n]["debiased_gd_train_scale"] + 1e-7
    with pytest.raises(ValueError, match="normalize"):
        p62.OneLayerMHLinear(3, 2, rngs=nnx.Rngs(0), normalize="max")


def test_the_short_run_trains_every_arm_and_writes_the_summary(tmp_path):
    """Three steps of each arm, evaluated at n = 40 and 80: rows, per-length summary, JSON."""
    out = tmp_path / "p62.json"
    assert p62.main(["--seeds", "0", "--steps", "3", "--samples", "32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["arm"] for r in result["rows"]] == ["softmax", "linear_sum", "linear_mean"]
    for arm in ("softmax", "linear_sum", "linear_mean"):
        assert set(result["summary"][arm]) == {"40", "80"}
        assert np.isfinite(result["summary"][arm]["80"]["model_mean"])
