"""P30 AFA on the tiny DiT (issue 16): two experts trained on disjoint digit halves (classes 0-4 / 5-9),
frozen, then ensembled by the adaptive feature aggregators; held-out denoising MSE on the union.

``python -m train.afa`` reads this config (see ``train/afa.py``; results in ``docs/afa.md``). The experts are
``configs/dit_digits.py``'s TinyDiT at half width and depth (16x16 digits, patch 4 -> 16 tokens, dim 32,
2 blocks, 2 heads) at a small budget, so that one seed (two experts and the aggregator) costs a few CPU
minutes on the shared 2-core machine. ``union_steps > 0`` adds a single DiT trained on the union
(``--union-steps 300`` = both experts' steps together).
"""

RUNNER = "train.afa"


def get_config():
    return {
        "name": "afa_digits",
        "seed": 0,
        "seeds": [0, 1, 2],
        "split": "classes",
        "model": {"kind": "dit", "image_size": 16, "channels": 1, "patch_size": 4, "dim": 32, "depth": 2,
                  "num_heads": 2, "num_classes": 10, "mlp_ratio": 4.0, "pos_embed": "sincos",
                  "method": "softmax", "method_config": {}},
        "diffusion": {"schedule": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                      "p_uncond": 0.1},
        "expert": {"steps": 150, "batch_size": 64,
                   "optim": {"lr": 2e-3, "schedule": "cosine", "warmup_steps": 30, "weight_decay": 0.0,
                             "clip_norm": 1.0, "min_lr_ratio": 0.1}},
        "aggregator": {"steps": 80, "batch_size": 32, "hidden": 16, "num_heads": 2,
                       "optim": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 15, "weight_decay": 0.01,
                                 "b2": 0.999, "clip_norm": 1.0, "min_lr_ratio": 0.1}},
        "union_steps": 0,
        "eval": {"draws": 2, "batch_size": 360},
    }
