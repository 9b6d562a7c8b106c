"""Issue 18 segmentation table row ``psa_seq``: P42 polarized self-attention after the bottleneck, sequential
layout. Its control row: ``configs/segmentation_pw2.py``.

``python -m train --config configs/segmentation_psa_seq.py`` (= ``python -m train.segmentation --config
configs/segmentation_psa_seq.py``) -- the shapes set (32x32), held-out mIoU over 3 seeds; see docs/segmentation.md.
``--img docs/img`` also writes ``docs/img/seg_psa_seq.png`` (its maps on one held-out image, seed 0's model).
"""


# Run by `python -m train.segmentation`, which reads the keys below (not the generic `python -m train --config`).
RUNNER = "train.segmentation"


def get_config():
    return {
        "name": "segmentation_psa_seq",
        "variants": "psa_seq", "width": 8, "steps": 300, "batch": 16, "lr": 3e-3, "train_images": 1024,
        "eval_images": 256, "size": 32, "seeds": (0, 1, 2),
    }
