"""P21 entropy-guided attention on the small byte LM: the baseline of ``configs/lm_softmax.py`` at a shorter context
(64 bytes, so a run takes about a minute on a shared 2-core CPU), and the P21 settings ``python -m
train.entropy_guided`` adds on top (``entropy_guided()``; ``get_config()`` stays a plain ``train`` config).

The P21 arms start from the baseline's weights of the same seed (``t = 1`` is plain softmax) and see the same
batches for the same number of steps.
"""


def get_config():
    return {
        "name": "lm_entropy_guided",
        "task": {"kind": "text", "seq_len": 64},
        "model": {"kind": "decoder_lm", "dim": 64, "num_layers": 2, "num_heads": 4, "method": "softmax",
                  "method_config": {}},
        "optim": {"lr": 3e-3, "warmup_steps": 20, "schedule": "cosine"},
        "train": {"steps": 200, "batch_size": 16, "log_every": 50, "eval_every": 0, "eval_batches": 4,
                  "checkpoint_every": 0, "progress": False},
    }


def entropy_guided():
    """The P21 settings: spec defaults (gamma 0.2, lam 1e-5), per-(head, query) temperatures initialised to 1,
    thresholds to 0.5 E_max; ``arms`` are what the experiment compares to the baseline."""
    return {
        "gamma": 0.2,
        "lam": 1e-5,
        "init_temperature": 1.0,
        "init_threshold": 0.5,
        "per_position": True,
        # name -> (regulariser reduction or None for temperature only, lam)
        "arms": {"temp_only": (None, 0.0), "ega_paper": ("paper", 1e-5), "ega_code": ("code", 1e-5)},
    }
