"""A small byte-level decoder LM with softmax attention on the stdlib corpus (CPU-sized)."""


def get_config():
    return {
        "name": "lm_softmax",
        "task": {"kind": "text", "seq_len": 128},
        "model": {"kind": "decoder_lm", "dim": 64, "num_layers": 2, "num_heads": 4, "method": "softmax",
                  "method_config": {}},
        "optim": {"lr": 3e-3, "warmup_steps": 20, "schedule": "cosine"},
        "train": {"steps": 200, "batch_size": 16, "log_every": 20, "eval_every": 100, "checkpoint_every": 100},
    }
