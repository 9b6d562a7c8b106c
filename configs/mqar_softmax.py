"""Multi-query associative recall (4 key-value pairs) with a 2-layer softmax decoder."""


def get_config():
    return {
        "name": "mqar_softmax",
        "task": {"kind": "mqar", "num_pairs": 4, "vocab_size": 32},
        "model": {"kind": "decoder_lm", "dim": 64, "num_layers": 2, "num_heads": 4, "method": "softmax",
                  "method_config": {}},
        "optim": {"lr": 1e-2, "warmup_steps": 50, "schedule": "cosine", "weight_decay": 0.0},
        "train": {"steps": 800, "batch_size": 64, "log_every": 100, "eval_batches": 8},
    }
