"""train.afa (P30 experiment) machinery: the config checker, the disjoint halves, the subset task, and a tiny
end-to-end seed (two experts, the aggregator, the union model, the evaluation) with a few steps."""
import copy

import numpy as np
import pytest

from train import afa


def tiny_config():
    config = copy.deepcopy(afa.default_config())
    config["model"].update(image_size=8, patch_size=4, dim=8, depth=1, num_heads=2)
    config["expert"].update(steps=2, batch_size=4)
    config["aggregator"].update(steps=2, batch_size=4, hidden=4, num_heads=2)
    config["union_steps"] = 2          # = the experts' steps: the union model reuses their compiled step
    config["eval"].update(draws=1, batch_size=360)
    return config


def test_shipped_config_passes_and_bad_keys_are_named():
    """Catches a checker that accepts typos (they would be silently ignored by the run)."""
    config = afa.check_config(afa.default_config())
    assert config["split"] in afa.SPLITS and len(config["seeds"]) >= 3
    with pytest.raises(ValueError, match="stepz"):
        afa.check_config({**config, "expert": {**config["expert"], "stepz": 3}})
    with pytest.raises(ValueError, match="unknown config keys"):
        afa.check_config({**config, "extra": 1})
    with pytest.raises(ValueError, match="split"):
        afa.check_config({**config, "split": "halves"})
    with pytest.raises(ValueError, match="seeds"):
        afa.check_config({**config, "seeds": []})
    with pytest.raises(ValueError, match="lrr"):
        afa.check_config({**config, "aggregator": {**config["aggregator"], "optim": {"lrr": 1.0}}})


@pytest.mark.parametrize("split", afa.SPLITS)
def test_halves_are_disjoint_and_cover_the_train_split(split):
    """Catches overlapping halves (the experts would share data) and the class split using the wrong rule."""
    labels = np.random.default_rng(0).integers(0, 10, 101)
    a, b = afa.split_halves(labels, split, seed=3)
    assert not set(a) & set(b) and len(a) + len(b) == 101
    if split == "classes":
        assert labels[a].max() < 5 and labels[b].min() >= 5
    else:
        assert abs(len(a) - len(b)) <= 1 and set(labels[a]) == set(range(10))


def test_subset_task_draws_only_its_half():
    """Catches a subset task that samples the whole train split (expert B would see classes 0-4)."""
    from train.diffusion import make_noise_schedule

    task = afa.SubsetDiffusionTask(make_noise_schedule("linear", 50), np.array([3, 7]), size=8)
    batch = task.batch(0, 0, 16)
    allowed = {task.data.train_labels[3], task.data.train_labels[7], task.num_classes}
    assert set(batch["labels"].tolist()) <= allowed
    images = (batch["x0"] + 1) / 2
    for img in images:
        assert min(np.abs(img - task.data.train_images[i]).max() for i in (3, 7)) < 1e-6


def test_a_tiny_seed_runs_end_to_end():
    """Every compared model is scored, per half too; AFA at init differs from the output average (it averages
    features, not outputs) and the report is finite. Catches a model missing from the comparison."""
    report = afa.Runner(tiny_config()).run_seed(0)
    assert set(report["mse"]) == set(afa.MODELS)
    for key in ("mse", "mse_classes_0_4", "mse_classes_5_9"):
        assert all(np.isfinite(v) and v > 0 for v in report[key].values())
    summary = afa.summarize([report, report])
    assert summary["mse"]["afa"] == [report["mse"]["afa"], 0.0]
