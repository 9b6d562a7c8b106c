"""The tiny captioning VLM of issue 16 (``jattn.nn.vlm.TinyVLM``) on shapes + digits captions, CPU-sized.

``python -m train.captioning --config configs/vlm_shapes.py`` trains it into ``train.out_dir`` (the cached
default ``runs/vlm_shapes`` that ``train.captioning.load_vlm()`` reads). ``model`` holds TinyVLM's keyword
arguments; ``task`` the data mix (``digit_fraction`` of each batch are sklearn digits, the rest shapes).
6,000 steps: 96.3% caption exact match on 512 held-out shapes images (31 min on 2 cores; 1,500 steps gave 45.9%,
4,000 gave 88.5%; docs/vlm.md).
"""


# Run by `python -m train.captioning`, which reads the keys below (not the generic `python -m train --config`).
RUNNER = "train.captioning"


def get_config():
    return {
        "name": "vlm_shapes",
        "seed": 0,
        "task": {"kind": "captioning", "max_objects": 3, "digit_fraction": 0.2, "data_seed": 0, "max_len": 16},
        "model": {"dim": 64, "mlp_dim": 128, "encoder_layers": 2, "decoder_layers": 2, "num_heads": 4,
                  "patch_size": 4, "stem_channels": 24, "stem_layers": 2,
                  "method": "softmax", "method_config": {}},
        "optim": {"lr": 3e-3, "warmup_steps": 50, "schedule": "cosine", "weight_decay": 0.05},
        "train": {"steps": 6000, "batch_size": 32, "log_every": 50, "eval_every": 500, "eval_batches": 2,
                  "checkpoint_every": 250, "out_dir": "runs/vlm_shapes", "progress": False},
        "eval": {"num_shapes": 512, "num_digits": 359, "batch_size": 128},
    }
