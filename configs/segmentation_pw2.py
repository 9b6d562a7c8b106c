"""Issue 18 segmentation table row ``pw2``: 2 residual 1x1 conv-BN-ReLU layers after the bottleneck: the
parameter-matched control of psa / psa_seq.

``python -m train --config configs/segmentation_pw2.py`` (= ``python -m train.segmentation --config
configs/segmentation_pw2.py``) -- the shapes set (32x32), held-out mIoU over 3 seeds; see docs/segmentation.md.
"""


# Run by `python -m train.segmentation`, which reads the keys below (not the generic `python -m train --config`).
RUNNER = "train.segmentation"


def get_config():
    return {
        "name": "segmentation_pw2",
        "variants": "pw2", "width": 8, "steps": 300, "batch": 16, "lr": 3e-3, "train_images": 1024,
        "eval_images": 256, "size": 32, "seeds": (0, 1, 2),
    }
