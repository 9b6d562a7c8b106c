"""train.contrastive (the P46 AdaInf SimCLR digits experiment): data, probe, a few steps, the summary.

Mutations each test catches:
* test_generated_pool: the pool returning the real images unchanged (no "generated" shift) or the wrong count.
* test_ridge_probe_hand_built: the probe fitted on test features, or an unpenalised-bias bug that breaks a
  perfectly separable case.
* test_a_few_steps_train_and_report: adainf not replicating the real data (its real fraction seen must be near
  dup N / (dup N + N) = 10/11); naive not mixing 1:1; the summary's gap unpaired.
"""
import numpy as np
import pytest

from train.contrastive import generated_pool, ridge_probe_accuracy, summarize, train_run


def test_generated_pool():
    """gen_factor copies per image, in [0, 1], different from (but correlated with) their source."""
    yy, xx = np.mgrid[0:8, 0:8]
    imgs = np.stack([np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0) for cy, cx in ((3, 3), (4, 2), (2, 5))])
    imgs = imgs[..., None].astype(np.float32)  # smooth blobs: a small warp keeps them correlated
    gen = generated_pool(imgs, 2, seed=1)
    assert gen.shape == (6, 8, 8, 1) and gen.min() >= 0 and gen.max() <= 1
    assert np.mean(np.abs(gen[:3] - imgs)) > 0.02
    assert np.corrcoef(gen[:3].ravel(), imgs.ravel())[0, 1] > 0.5
    with pytest.raises(ValueError, match="gen_factor"):
        generated_pool(imgs, 0)


def test_ridge_probe_hand_built():
    """Features that are the one-hot label plus noise give accuracy 1; features independent of the label
    near chance."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 10, 200)
    h = np.eye(10)[y] + 0.05 * rng.normal(size=(200, 10))
    assert ridge_probe_accuracy(h[:150], y[:150], h[150:], y[150:]) == 1.0
    noise = rng.normal(size=(200, 10))
    assert ridge_probe_accuracy(noise[:150], y[:150], noise[150:], y[150:]) < 0.4


def test_a_few_steps_train_and_report():
    """Three steps of real, naive and adainf with a tiny encoder: finite losses, probe accuracy in [0, 1], the
    real fraction actually drawn matches each variant's mixing rule."""
    kw = dict(steps=3, batch=64, lr=1e-3, width=4)
    rows = [train_run(v, 0, **kw) for v in ("real", "naive", "adainf")]
    for r in rows:
        assert np.isfinite(r["final_loss"]) and 0.0 <= r["probe_acc"] <= 1.0
    assert rows[0]["real_fraction_seen"] == 1.0
    assert abs(rows[1]["real_fraction_seen"] - 0.5) < 0.12
    assert abs(rows[2]["real_fraction_seen"] - 10 / 11) < 0.08
    s = summarize(rows + [dict(rows[0], seed=1, probe_acc=0.5), dict(rows[2], seed=1, probe_acc=0.6)])
    assert s["gap_adainf_minus_real"]["n"] == 2
    assert s["gap_adainf_minus_real"]["mean"] == pytest.approx(
        ((rows[2]["probe_acc"] - rows[0]["probe_acc"]) + 0.1) / 2)
    with pytest.raises(ValueError, match="variant"):
        train_run("dup", 0, **kw)
