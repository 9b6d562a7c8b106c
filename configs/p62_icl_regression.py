"""P62: in-context linear regression with one layer of multi-head softmax attention (d=5, n=20, H=4)."""


def get_config():
    return {
        "name": "p62_icl_h4",
        "task": {"kind": "icl_regression", "dim": 5, "num_context": 20, "noise": 0.0},
        "model": {"kind": "icl_mhsa", "num_heads": 4, "init_scale": 0.1},
        "optim": {"lr": 1e-2, "warmup_steps": 100, "schedule": "cosine", "weight_decay": 0.0,
                  "clip_norm": 1.0, "b2": 0.999},
        "train": {"steps": 3000, "batch_size": 256, "log_every": 200, "eval_batches": 4},
        "analysis": {"kind": "icl", "samples": 4096},
    }
