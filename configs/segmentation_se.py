"""Issue 18 segmentation table row ``se``: squeeze-excitation after the bottleneck (reduction 4), the channel-
attention baseline. Its control row: ``configs/segmentation_plain.py``.

``python -m train --config configs/segmentation_se.py`` (= ``python -m train.segmentation --config
configs/segmentation_se.py``) -- the shapes set (32x32), held-out mIoU over 3 seeds; see docs/segmentation.md.
``--img docs/img`` also writes ``docs/img/seg_se.png`` (its maps on one held-out image, seed 0's model).
"""


# Run by `python -m train.segmentation`, which reads the keys below (not the generic `python -m train --config`).
RUNNER = "train.segmentation"


def get_config():
    return {
        "name": "segmentation_se",
        "variants": "se", "width": 8, "steps": 300, "batch": 16, "lr": 3e-3, "train_images": 1024,
        "eval_images": 256, "size": 32, "seeds": (0, 1, 2),
    }
