"""The default TinyDiT diffusion subject (issue 16): class-conditional DDPM on sklearn digits at 16x16.

``python -m train.diffusion`` trains it into ``runs/dit_digits`` once (later calls load it) and scores
guided DDIM samples with ``train.digit_classifier``; ``train.diffusion.load_dit("runs/dit_digits")`` loads it.
Patch 4 (16 tokens) keeps a training run within the CPU budget; patch 2 (64 tokens) is ~4x slower per step.
"""


# Run by `python -m train.diffusion`, which reads the keys below (not the generic `python -m train --config`).
RUNNER = "train.diffusion"


def get_config():
    return {
        "name": "dit_digits",
        "seed": 0,
        "model": {"kind": "dit", "image_size": 16, "channels": 1, "patch_size": 4, "dim": 64, "depth": 4,
                  "num_heads": 4, "num_classes": 10, "mlp_ratio": 4.0, "pos_embed": "sincos",
                  "method": "softmax", "method_config": {}},
        "diffusion": {"schedule": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                      "p_uncond": 0.1},
        "optim": {"lr": 2e-3, "schedule": "cosine", "warmup_steps": 100, "weight_decay": 0.0,
                  "clip_norm": 1.0, "min_lr_ratio": 0.1},
        "train": {"steps": 2000, "batch_size": 128, "log_every": 50, "eval_every": 0, "eval_batches": 2,
                  "checkpoint_every": 500, "progress": False},
    }
