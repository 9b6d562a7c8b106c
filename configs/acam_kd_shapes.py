"""P17 ACAM-KD on the tiny DETR: ``python -m train.acam_kd --config configs/acam_kd_shapes.py``.

Teacher: TinyDETR dim 128, 2 encoder blocks (vs the student's 64 and 1), trained once with the DETR set loss
and cached under runs/acam_kd/. Students: the configs/detr_shapes.py model for 300 steps, (a) no KD, (b) plain
feature KD (MSE of the 1x1-projected encoder memory), (c) ACAM-KD, same initial weights and batches per seed;
mAP@0.5 on 200 held-out images.
"""


# Run by `python -m train.acam_kd`, which reads the keys below (not the generic `python -m train --config`).
RUNNER = "train.acam_kd"


def get_config():
    return {
        "name": "acam_kd_shapes",
        "variants": "none,feature,acam",
        "seeds": "0,1,2",
        "data": {"size": 32, "pool": 2000, "data_seed": 0, "test_images": 200, "test_seed": 1, "max_targets": 12},
        "student": {"dim": 64, "heads": 4, "queries": 64, "encoder_layers": 1, "decoder_layers": 2,
                    "query_mode": "tokens"},
        "teacher": {"dim": 128, "heads": 4, "queries": 64, "encoder_layers": 2, "decoder_layers": 2,
                    "query_mode": "tokens", "steps": 600, "seed": 100},
        "optim": {"lr": 1e-3, "warmup": 20, "clip": 1.0, "weight_decay": 1e-4},
        "train": {"steps": 300, "batch_size": 16, "eval_at": [100, 200, 300]},
        "kd": {"weight": 1.0, "num_masks": 4, "num_heads": 1, "div_weight": 1.0, "combine": "separate"},
    }
