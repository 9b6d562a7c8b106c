"""P62 length-generalisation control: one-layer multi-head softmax attention (``get_config()``, the model of
``configs/p62_icl_regression.py`` trained at n = 40) against one-layer multi-head *linear* attention of the same
shape (``control()``), both evaluated at n = 40 and n = 80 by ``python -m train.p62_control``.

d = 5, H = 4, noise 0, x ~ N(0, I_d), beta ~ N(0, I_d / d). ``get_config()`` stays a plain ``train`` config.
"""


def get_config():
    return {
        "name": "p62_linear_control",
        "task": {"kind": "icl_regression", "dim": 5, "num_context": 40, "noise": 0.0},
        "model": {"kind": "icl_mhsa", "num_heads": 4, "init_scale": 0.1},
        "optim": {"lr": 1e-2, "warmup_steps": 100, "schedule": "cosine", "weight_decay": 0.0,
                  "clip_norm": 1.0, "b2": 0.999},
        "train": {"steps": 2000, "batch_size": 256, "log_every": 500, "eval_batches": 4, "progress": False},
    }


def control():
    """The linear-attention arms and the evaluation lengths. ``normalize``: ``"sum"`` is the softmax replaced by
    the identity (``sum_l``); ``"mean"`` divides by the context length ``n`` (the 1/n form of linear-transformer
    ICL theory). Both are run: length generalisation hinges on this choice."""
    return {
        "arms": {"softmax": None, "linear_sum": "sum", "linear_mean": "mean"},
        "eval_lengths": (40, 80),
        "eval_samples": 8192,
    }
