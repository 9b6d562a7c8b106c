"""The byte-level decoder LM of lm_softmax.py with P04 Radial attention, chosen by name: every built mask
pattern is an ``Attention(method=NAME)`` whose config is plain literals (``jattn papers --methods`` lists
the names and keys). The same from the command line:
``python -m train --config configs/lm_softmax.py model.method=radial model.method_config.frames=8``.

T = 128 tokens read as 8 "frames" of 16: each query sees its own frame densely and frames further away
through a window that halves with every doubling of the frame distance, intersected with causal."""


def get_config():
    return {
        "name": "lm_radial",
        "task": {"kind": "text", "seq_len": 128},
        "model": {"kind": "decoder_lm", "dim": 64, "num_layers": 2, "num_heads": 4, "method": "radial",
                  "method_config": {"frames": 8, "block": 16}},
        "optim": {"lr": 3e-3, "warmup_steps": 20, "schedule": "cosine"},
        "train": {"steps": 200, "batch_size": 16, "log_every": 20, "eval_every": 100, "checkpoint_every": 100},
    }
