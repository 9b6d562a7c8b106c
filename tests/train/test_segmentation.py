"""train.segmentation: the shapes segmentation task, mean IoU and the U-Net with each context module."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train import segmentation as S
from train.images import shapes


def test_targets_label_each_object_by_kind():
    """Catches: kinds off by one (background clashing with circles), a mask ignored."""
    data = shapes(3, seed=1)
    labels = S.segmentation_targets(data)
    for i in range(3):
        for j in range(data.counts[i]):
            assert np.all(labels[i][data.masks[i, j]] == 1 + data.kinds[i, j])
        assert np.all(labels[i][~data.masks[i].any(0)] == 0)


def test_mean_iou_on_hand_built_maps():
    """Per-class IoU |A and B| / |A or B|, absent classes count 1. Catches: a mean over pixels (accuracy) or a
    per-image mean, intersection over the prediction only."""
    labels = np.array([[0, 0, 1, 1], [2, 2, 0, 0]])
    predicted = np.array([[0, 1, 1, 1], [2, 0, 0, 0]])
    miou, per_class = S.mean_iou(predicted, labels)
    np.testing.assert_allclose(per_class, [3 / 5, 2 / 3, 1 / 2, 1.0])
    assert miou == pytest.approx(np.mean([3 / 5, 2 / 3, 1 / 2, 1.0]))
    assert S.mean_iou(labels, labels)[0] == 1.0


@pytest.mark.parametrize("variant", S.VARIANTS)
def test_every_variant_keeps_the_grid(variant):
    model = S.SegUNet(variant, width=8, rngs=nnx.Rngs(0))
    model.eval()
    assert model(jnp.ones((1, 16, 16, 3))).shape == (1, 16, 16, S.NUM_CLASSES)


def test_controls_match_their_modules_parameters():
    """The parameter-matched controls stay within 5 % of the module they control (and SE/gates of plain)."""
    count = {v: S.parameter_count(S.SegUNet(v, width=8, rngs=nnx.Rngs(0))) for v in S.VARIANTS}
    for a, b in (("se", "plain"), ("gates", "plain"), ("convs2", "dappm"), ("convs4", "dual"), ("bfp", "sdanet"),
                 ("pw2", "psa"), ("pw2", "psa_seq")):
        assert abs(count[a] / count[b] - 1) < 0.05, (a, b, count)


def test_level_fusion_starts_as_the_identity_and_then_reaches_every_level():
    """``sdanet`` / ``bfp``: the zero-initialised back-projections make the fused levels equal the inputs at init
    (the variant starts as ``plain``); once they are non-zero every level changes, and the attention neck differs
    from the plain balanced pyramid. Catches: a level not redistributed, the neck skipped, a non-zero init."""
    levels = [jnp.asarray(np.random.default_rng(i).normal(size=(2, 16 // 2 ** i, 16 // 2 ** i, 4 * 2 ** i)),
                          jnp.float32) for i in range(3)]
    outs = {}
    for attention in (True, False):
        fusion = S.LevelFusion((4, 8, 16), 8, attention=attention, rngs=nnx.Rngs(0))
        for x, y in zip(levels, fusion(levels)):
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
        for i, back in enumerate(fusion.back):
            back.kernel[...] = jnp.asarray(np.random.default_rng(10 + i).normal(size=back.kernel.shape), jnp.float32)
        outs[attention] = fusion(levels)
        for x, y in zip(levels, outs[attention]):
            assert y.shape == x.shape and float(jnp.max(jnp.abs(y - x))) > 1e-3
    assert float(jnp.max(jnp.abs(outs[True][0] - outs[False][0]))) > 1e-3


def test_the_sdanet_neck_trains_a_few_steps():
    """The P10 neck inside the U-Net takes gradient steps through its back-projections, non-local attention and
    level gathering without NaN (the machinery only; the PSA variants are plain bottleneck modules, built and run by
    the grid test above)."""
    row = S.train_run("sdanet", seed=0, width=4, steps=2, batch=4, lr=1e-2, train_images=8, eval_images=8, size=16)
    assert np.isfinite(row["final_loss"]) and 0.0 <= row["miou"] <= 1.0


def test_a_short_run_runs_end_to_end():
    """The experiment's machinery: a few steps fall well below the uniform loss ln 4 and find the background
    (the real comparison is ``python -m train.segmentation``, a make target)."""
    row = S.train_run("plain", seed=0, width=4, steps=30, batch=8, lr=1e-2, train_images=32, eval_images=16,
                      size=16)
    assert row["final_loss"] < 0.5 * np.log(4) and row["per_class_iou"][0] > 0.8 and row["params"] > 0


def test_bad_variant_names_itself():
    with pytest.raises(ValueError, match="variant must be one of"):
        S.SegUNet("attention", rngs=nnx.Rngs(0))
