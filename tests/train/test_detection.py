"""train/detection.py: the mAP@0.5 evaluator on hand-built predictions, target packing and a few-step run.

Each test's docstring names the mutation it catches.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from train import detection as D

GT = np.array([[[0, 0, 10, 10], [20, 20, 30, 30]]], np.float32)
GC = np.array([[0, 0]])
GN = np.array([2])


def _map(boxes, scores, classes, gt=GT, gc=GC, gn=GN):
    return D.mean_average_precision(np.asarray(boxes, np.float32)[None], np.asarray(scores, np.float32)[None],
                                    np.asarray(classes)[None], gt, gc, gn, num_classes=3)


def test_perfect_predictions_give_map_one():
    """Exact boxes, right class: AP 1 for the class with ground truth; classes without GT are NaN and ignored.
    Catches: averaging over classes with no ground truth (would give 1/3)."""
    m, aps = _map([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [0, 0])
    assert m == pytest.approx(1.0)
    assert np.isnan(aps[1]) and np.isnan(aps[2])


def test_false_positive_ranked_first_lowers_ap_by_the_known_amount():
    """One GT, detections [FP 0.9, TP 0.8]: precision at recall 1 is 1/2, AP = 0.5. Two GTs with [FP, TP, TP]:
    interpolated precision 2/3 at both recall levels, AP = 2/3. A low-ranked FP after all TPs costs nothing.
    Catches: no score sorting, precision not made monotone (would give (1/2 + 2/3) / 2), an 11-point AP."""
    one = (GT[:, :1], GC[:, :1], np.array([1]))
    assert _map([[40, 40, 50, 50], [0, 0, 10, 10]], [0.9, 0.8], [0, 0], *one)[0] == pytest.approx(0.5)
    assert _map([[40, 40, 50, 50], [0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [0, 0, 0])[0] == \
        pytest.approx(2 / 3)
    assert _map([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0.9, 0.8, 0.1], [0, 0, 0])[0] == \
        pytest.approx(1.0)


def test_misses_duplicates_wrong_class_and_iou_threshold():
    """A missed GT halves recall (AP 0.5); a duplicate of a matched GT is a false positive; a right box with the
    wrong class scores 0; IoU just under 0.5 is a miss and just over is a hit. Catches: matching a GT twice,
    ignoring the class, a strict/loose threshold mix-up."""
    assert _map([[0, 0, 10, 10]], [0.9], [0])[0] == pytest.approx(0.5)
    dup = _map([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [0, 0, 0])[0]
    assert dup == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert _map([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [1, 1])[0] == pytest.approx(0.0)
    # IoU of [0,0,10,10] with [0,0,10,w]: w/10; 4.9 -> 0.49 miss, 5.1 -> 0.51 hit
    one = (GT[:, :1], GC[:, :1], np.array([1]))
    assert _map([[0, 0, 10, 4.9]], [0.9], [0], *one)[0] == 0.0
    assert _map([[0, 0, 10, 5.1]], [0.9], [0], *one)[0] == pytest.approx(1.0)


def test_to_targets_normalises_and_pads():
    """Pixel xyxy -> normalised cxcywh, classes padded with -1 to max_targets. Catches: boxes not divided by
    the image size, padded slots carrying real classes."""
    b, c, n = D.to_targets(np.array([[[0, 8, 16, 32], [0, 0, 0, 0]]]), np.array([[2, -1]]), np.array([1]), 32, 4)
    np.testing.assert_allclose(b[0, 0], [0.25, 0.625, 0.5, 0.75])
    np.testing.assert_array_equal(c, [[2, -1, -1, -1]])
    assert n.tolist() == [1]


def _cfg():
    return {"data": {"size": 16, "pool": 24, "data_seed": 0, "test_images": 8, "test_seed": 1, "max_targets": 8},
            "model": {"dim": 16, "heads": 2, "queries": 8, "encoder_layers": 1, "decoder_layers": 1},
            "optim": {"lr": 3e-3, "warmup": 1, "clip": 1.0, "weight_decay": 0.0},
            "train": {"steps": 3, "batch_size": 4, "eval_at": [3], "mosaic_prob": 1.0, "o2o_until": 1.0}}


def test_few_steps_on_a_fixed_batch_lower_the_loss_for_both_objectives():
    """Twelve steps on one fixed shapes batch lower the DETR loss and the MAL loss. Catches: gradients not
    flowing through the matched gather, the optimizer state not updated, a sign error in a loss."""
    from train.images import shapes
    cfg = _cfg()
    data = shapes(4, 0, size=16, max_objects=3)
    b, c, n = D.to_targets(data.boxes, data.kinds, data.counts, 16, 8)
    args = (jnp.asarray(data.images), jnp.asarray(b), jnp.asarray(c), jnp.asarray(n))
    for variant in ("detr", "mal"):
        model, opt = D.build(cfg, 0)
        losses = [float(D.train_step(model, opt, *args, variant)[0]) for _ in range(12)]
        assert np.isfinite(losses).all()
        assert min(losses[-3:]) < 0.8 * losses[0], (variant, losses)


def test_run_with_dense_o2o_reports_map_at_the_eval_steps():
    """The experiment driver runs a Dense-O2O variant end to end and reports mAP in [0, 1] at each eval step.
    Catches: a broken mosaic batch (wrong target padding), the eval not run."""
    r = D.run(_cfg(), "mal+o2o", 0)
    assert set(r["map"]) == {3} and 0.0 <= r["map"][3] <= 1.0 and len(r["loss"]) == 3
    with pytest.raises(ValueError, match="variant"):
        D.run(_cfg(), "focal", 0)
