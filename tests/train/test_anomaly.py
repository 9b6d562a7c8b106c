"""train.anomaly (the P54 FOD one-class digits experiment): its features, split, a few steps and the summary.

Mutations each test catches:
* test_patch_features_layout: patches read column-major or at the wrong stride (token i not the patch at
  grid cell (i // g, i % g)); the zero padding dropped (grid 7x7 instead of 8x8).
* test_one_class_split: training on every class (not only the normal one); anomaly labels inverted.
* test_texture_set_masks_mark_the_pasted_square: the mask not matching the pasted region; normal images carrying
  a mask; the pasted texture identical in statistics to the background (nothing to detect).
* test_a_few_steps_train_and_report: the rec variant trained with the FOD weights (its loss1 != loss2); AUROC
  computed on the wrong labels (outside [0, 1] is impossible, but the fod run must also report its rec-score
  ablation); the summary's gap unpaired.
"""
import numpy as np
import pytest

from train.anomaly import one_class_split, patch_features, summarize, texture_images, train_run


def test_patch_features_layout():
    """8x8 grid of 4x4 patches at stride 2 with padding 1 on a 16x16 ramp: token (i, j) is the window
    rows 2i-1..2i+2, cols 2j-1..2j+2 (zeros outside)."""
    img = np.random.default_rng(0).uniform(size=(2, 16, 16, 1)).astype(np.float32)
    f = patch_features(img)
    assert f.shape == (2, 64, 16)
    pad = np.pad(img, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for i, j in ((0, 0), (3, 5), (7, 7)):
        np.testing.assert_array_equal(f[:, i * 8 + j], pad[:, 2 * i:2 * i + 4, 2 * j:2 * j + 4].reshape(2, -1))
    with pytest.raises(ValueError, match="patch - stride"):
        patch_features(img, patch=3, stride=2)


def test_one_class_split():
    """Train features are the normal class only; test labels mark the other classes as anomalies."""
    from train.images import digits
    tr, te, y, g = one_class_split(3)
    d = digits(16)
    assert g == 8 and len(tr) == int(np.sum(d.train_labels == 3)) and len(te) == len(d.test_labels)
    np.testing.assert_array_equal(y, (d.test_labels != 3).astype(np.int32))
    with pytest.raises(ValueError, match="normal_class"):
        one_class_split(10)


def test_a_few_steps_train_and_report():
    """Two steps of each variant on a tiny model: finite losses, AUROCs in [0, 1], rec's total equals its rec
    term (weights 0) while fod's does not, and the summary pairs gaps by (class, seed)."""
    kw = dict(steps=2, batch=8, lr=1e-3, d_model=8, heads=2, layers=1)
    rec = train_run("rec", 1, 0, **kw)
    fod = train_run("fod", 1, 0, **kw)
    assert rec["final"]["total"] == rec["final"]["rec"] and fod["final"]["total"] != fod["final"]["rec"]
    for r in (rec, fod):
        assert 0.0 <= r["auroc"] <= 1.0 and np.isfinite(r["final"]["total"])
    assert 0.0 <= fod["auroc_recscore"] <= 1.0
    s = summarize([rec, fod, dict(rec, seed=1, auroc=0.5), dict(fod, seed=1, auroc=0.7)])
    assert s["gap_fod_minus_rec"]["n"] == 2
    assert s["gap_fod_minus_rec"]["mean"] == pytest.approx(((fod["auroc"] - rec["auroc"]) + 0.2) / 2)
    with pytest.raises(ValueError, match="variant"):
        train_run("both", 1, 0, **kw)


def test_texture_set_masks_mark_the_pasted_square():
    """Normal textures have empty masks; each anomalous image has one square of side 4..6 whose pixels are
    rougher (larger neighbour differences) than the background; the set is a pure function of the seed."""
    normal, m0 = texture_images(6, 0)
    anom, m1 = texture_images(6, 0, anomalous=True)
    assert normal.shape == (6, 16, 16, 1) and not m0.any()
    for img, m in zip(anom[..., 0], m1):
        ys, xs = np.nonzero(m)
        side = ys.max() - ys.min() + 1
        assert 4 <= side <= 6 and m.sum() == side * (xs.max() - xs.min() + 1) == side * side
        inside = np.abs(np.diff(img[m].reshape(side, side), axis=1)).mean()
        outside = np.abs(np.diff(normal[0, ..., 0], axis=1)).mean()
        assert inside > outside
    np.testing.assert_array_equal(texture_images(6, 0, anomalous=True)[0], anom)
