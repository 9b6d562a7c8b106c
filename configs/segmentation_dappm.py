"""Issue 18 segmentation table row ``dappm``: P69 DDRNet's DAPPM after the bottleneck. Its control row:
``configs/segmentation_convs2.py``.

``python -m train --config configs/segmentation_dappm.py`` (= ``python -m train.segmentation --config
configs/segmentation_dappm.py``) -- the shapes set (32x32), held-out mIoU over 3 seeds; see docs/segmentation.md.
"""


# Run by `python -m train.segmentation`, which reads the keys below (not the generic `python -m train --config`).
RUNNER = "train.segmentation"


def get_config():
    return {
        "name": "segmentation_dappm",
        "variants": "dappm", "width": 8, "steps": 300, "batch": 16, "lr": 3e-3, "train_images": 1024,
        "eval_images": 256, "size": 32, "seeds": (0, 1, 2),
    }
