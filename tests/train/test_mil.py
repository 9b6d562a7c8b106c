"""train/mil.py: digit bags, the exact AUC, the attention metrics and one short training run per method."""
import numpy as np
import pytest

from train import mil


def test_roc_auc_known_cases():
    """Catches ties counted as wins (or losses), flipped orientation, and a normalisation by n instead of P*N."""
    assert mil.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)  # sklearn's doc example
    assert mil.roc_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert mil.roc_auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert mil.roc_auc([5, 5, 5], [0, 1, 1]) == 0.5
    # hand count: positives {3, 2}, negatives {2, 1, 0}: pairs 3>all (3), 2>1, 2>0, 2=2 (0.5) -> 5.5 / 6
    assert mil.roc_auc([3, 2, 2, 1, 0], [1, 1, 0, 0, 0]) == pytest.approx(5.5 / 6)
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 4, 50).astype(float), rng.integers(0, 2, 50)
    pairs = [(a > b) + 0.5 * (a == b) for a, ya in zip(s, y) if ya for b, yb in zip(s, y) if not yb]
    assert mil.roc_auc(s, y) == pytest.approx(np.mean(pairs))
    with pytest.raises(ValueError, match="both classes"):
        mil.roc_auc([1, 2], [1, 1])


def test_bags_are_pure_functions_and_labelled_by_the_target_digit():
    """Catches bags that depend on call order, train bags drawn from the test split, and a bag label that is not
    'contains the target digit'."""
    a = mil.digit_bags(20, seed=3, split="train")
    b = mil.digit_bags(20, seed=3, split="train")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    one = mil.make_bag(3, 7, "train")
    np.testing.assert_array_equal(one[0], a["x"][7])
    assert one[2] == a["label"][7]
    n = a["mask"].sum(1)
    assert n.min() >= 8 and n.max() <= 16 and 0 < a["label"].mean() < 1
    np.testing.assert_array_equal(a["label"], a["inst"].max(1))
    assert np.all(a["x"][~a["mask"]] == 0) and np.all(a["inst"][~a["mask"]] == 0)
    from train.images import digits
    d = digits(8)
    test_rows = {r.tobytes() for r in d.test_images.reshape(-1, 64)}
    train_rows = {r.tobytes() for r in d.train_images.reshape(-1, 64)}
    rows = [r.tobytes() for r in a["x"][a["mask"]]]
    assert all(r in train_rows for r in rows) and sum(r in test_rows and r not in train_rows for r in rows) == 0
    t = mil.digit_bags(5, seed=3, split="test")
    assert all(r.tobytes() in test_rows for r in t["x"][t["mask"]])


def test_attention_metrics_hand_case():
    """Catches entropy over padding, top-1 mass not per bag, localisation AUC on negative bags."""
    w = np.array([[0.5, 0.5, 0.0], [0.1, 0.9, 0.0]])
    mask = np.array([[True, True, False], [True, True, True]])
    inst = np.array([[0, 0, 0], [0, 1, 0]])
    out = mil.attention_metrics(w, mask, inst, np.array([0, 1]))
    assert out["inst_auc"] == 1.0
    assert out["top1_mass"] == pytest.approx(0.7)
    h1 = -(0.1 * np.log(0.1) + 0.9 * np.log(0.9))
    assert out["entropy"] == pytest.approx((np.log(2) + h1) / 2)
    assert out["norm_entropy"] == pytest.approx((1.0 + h1 / np.log(3)) / 2)


@pytest.mark.parametrize("method", mil.METHODS)
def test_short_training_beats_chance(method):
    """Catches a broken training step (no gradient reaching the attention or classifier): 60 steps lift test bag
    AUC well above 0.5 for every method."""
    config = mil.load_config(f"configs/mil_{method}.py")
    config["task"].update(train_bags=48, test_bags=60)
    config["train"].update(steps=60, batch_size=8)
    out = mil.run(config, seed=0)
    assert out["bag_auc"] > 0.7, out
    assert 0 <= out["norm_entropy"] <= 1 and 0 < out["top1_mass"] <= 1
