"""Tiny DETR on shapes(32): ``python -m train.detection --config configs/detr_shapes.py``.

The plain Hungarian set loss (DETR: softmax CE with no-object weight 0.1, 5 L1, 2 GIoU) and the same with
Dense O2O mosaics, mAP@0.5 on 200 held-out images (a different shapes stream) at fixed steps.
"""


# Run by `python -m train.detection`, which reads the keys below (not the generic `python -m train --config`).
RUNNER = "train.detection"


def get_config():
    return {
        "name": "detr_shapes",
        "variants": "detr,detr+o2o",
        "seeds": "0,1,2",
        "data": {"size": 32, "pool": 2000, "data_seed": 0, "test_images": 200, "test_seed": 1, "max_targets": 12},
        "model": {"dim": 64, "heads": 4, "queries": 64, "encoder_layers": 1, "decoder_layers": 2,
                  "query_mode": "tokens"},
        "optim": {"lr": 1e-3, "warmup": 20, "clip": 1.0, "weight_decay": 1e-4},
        "train": {"steps": 300, "batch_size": 16, "eval_at": [100, 200, 300], "mosaic_prob": 0.5,
                  "o2o_until": 0.75},
    }
