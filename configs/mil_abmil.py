"""ABMIL (gated attention, Ilse et al. 2018) on digit bags: the baseline of P59 AEM and P40 ACMIL (train/mil.py)."""

TASK = {"target": 9, "min_size": 8, "max_size": 16, "max_positives": 2, "train_bags": 100, "test_bags": 500,
        "seed": 0}


# Run by `python -m train.mil`, which reads the keys below (not the generic `python -m train --config`).
RUNNER = "train.mil"


def get_config():
    return {
        "name": "mil_abmil",
        "method": "abmil",
        "task": dict(TASK),
        "model": {"inner_dim": 128, "hidden": 128},
        "optim": {"lr": 1e-3, "weight_decay": 1e-5},
        "train": {"steps": 600, "batch_size": 8},
    }
