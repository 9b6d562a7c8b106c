"""The shapes TinyDiT (issue 16, P34 Attentive Eraser / P72 DiffUHaul subject): unconditional DDPM on the
procedural shapes set (``train.images.shapes``, 32x32 RGB, 1-3 objects on a textured background).

``python -m train.dit_editing --config configs/dit_shapes.py`` trains it into ``runs/dit_shapes`` once (later
calls load it) and runs the removal (P34) and masking / dragging (P72) experiments on held-out images.
Patch 4 on 32x32 gives an 8x8 token grid (64 tokens): an object covers about 1-4 tokens.
"""

# Run by `python -m train.dit_editing`, which reads the keys below (not the generic `python -m train --config`).
RUNNER = "train.dit_editing"


def get_config():
    return {
        "name": "dit_shapes",
        "seed": 0,
        "model": {"kind": "dit", "image_size": 32, "channels": 3, "patch_size": 4, "dim": 64, "depth": 4,
                  "num_heads": 4, "num_classes": 1, "mlp_ratio": 4.0, "pos_embed": "sincos",
                  "method": "softmax", "method_config": {}},
        "diffusion": {"schedule": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                      "p_uncond": 0.0},
        "data": {"seed": 0, "num_train": 4000, "heldout_start": 100000, "max_objects": 3},
        "optim": {"lr": 2e-3, "schedule": "cosine", "warmup_steps": 100, "weight_decay": 0.0,
                  "clip_norm": 1.0, "min_lr_ratio": 0.1},
        "train": {"steps": 1000, "batch_size": 64, "log_every": 50, "eval_every": 0, "eval_batches": 2,
                  "checkpoint_every": 250, "progress": False},
        "experiment": {"num_images": 16, "seeds": [0, 1, 2], "t_start": 300, "sample_steps": 25,
                       "aas_layers": [1, 4], "aas_steps": [0, 25], "ss_steps": 9, "ss_scale": 0.3,
                       "sarg_scale": 3.0, "drag_offset": [8, 0], "alpha_early": 0.5, "t_switch_frac": 0.5},
    }
