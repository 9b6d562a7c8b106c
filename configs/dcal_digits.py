"""P23 DCAL (GLCA + PWCA) on digits(16): the issue-18 tokens ViT plain vs +GLCA / +PWCA / +both at equal steps.

``python -m train.dcal --config configs/dcal_digits.py`` -- test top-1 (mean ± sd over seeds), SA-head top-1,
train-test gap; see train/dcal.py and docs/dcal.md.
"""


# Run by `python -m train.dcal`, which reads the keys below (not the generic `python -m train --config`).
RUNNER = "train.dcal"


def get_config():
    return {
        "name": "dcal_digits",
        "variants": ("plain", "glca", "pwca", "dcal"),
        "width": 32, "depth": 2, "heads": 2, "hidden": 64, "patch": 4, "glca_ratio": 0.25,
        "steps": 300, "batch_size": 32, "lr": 3e-3, "seeds": (0, 1, 2), "size": 16,
    }
