"""P35 DEIM vs the plain DETR loss on shapes(32): ``python -m train.detection --config configs/deim_shapes.py``.

Same model, data, batches and steps as configs/detr_shapes.py; variants: ``detr`` (baseline), ``mal``
(matchability-aware loss, γ=1.5, focal matching cost 2/5/2), ``detr+o2o`` (Dense O2O alone) and ``mal+o2o``
(DEIM: both). Dense O2O: each batch image is a 2x2 mosaic of four pool images with probability 0.5 during the
first 75% of steps (DEIM switches augmentation off before the end). mAP@0.5 on 200 held-out images.
"""


# Run by `python -m train.detection`, which reads the keys below (not the generic `python -m train --config`).
RUNNER = "train.detection"


def get_config():
    return {
        "name": "deim_shapes",
        "variants": "detr,mal,detr+o2o,mal+o2o",
        "seeds": "0,1,2",
        "data": {"size": 32, "pool": 2000, "data_seed": 0, "test_images": 200, "test_seed": 1, "max_targets": 12},
        "model": {"dim": 64, "heads": 4, "queries": 64, "encoder_layers": 1, "decoder_layers": 2,
                  "query_mode": "tokens"},
        "optim": {"lr": 1e-3, "warmup": 20, "clip": 1.0, "weight_decay": 1e-4},
        "train": {"steps": 300, "batch_size": 16, "eval_at": [100, 200, 300], "mosaic_prob": 0.5,
                  "o2o_until": 0.75},
    }
