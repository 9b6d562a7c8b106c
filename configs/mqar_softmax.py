"""Multi-query associative recall (4 key-value pairs, 15 keys, 15 values) with a 2-layer softmax decoder:
the demo's MQAR softmax run (``python -m train.demo`` trains the same model with the same schedule).

At lr 1e-3 the model leaves the copy plateau (0.30: it copies a random context value, ignoring the
key) after 400-1000 steps and ends at 1.000 accuracy (seeds 0-2); at lr 1e-2 (800 steps) or 2e-3 it
stayed on the plateau (docs/experiments.md)."""


def get_config():
    return {
        "name": "mqar_softmax",
        "task": {"kind": "mqar", "num_pairs": 4, "vocab_size": 32},
        "model": {"kind": "decoder_lm", "dim": 64, "num_layers": 2, "num_heads": 4, "method": "softmax",
                  "method_config": {}},
        "optim": {"lr": 1e-3, "warmup_steps": 200, "schedule": "cosine", "weight_decay": 0.0},
        "train": {"steps": 2000, "batch_size": 64, "log_every": 100, "eval_every": 100, "eval_batches": 8},
    }
