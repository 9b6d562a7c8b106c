"""P58 baseline: a softmax (RoPE, SwiGLU, RMSNorm) LM of about the same parameter count as p58_tnl.py."""


def get_config():
    return {
        "name": "p58_softmax",
        "task": {"kind": "text", "seq_len": 256, "max_bytes": 2_000_000},
        "model": {"kind": "decoder_lm", "dim": 128, "num_layers": 4, "num_heads": 4, "method": "softmax",
                  "method_config": {}, "mlp": "swiglu", "norm": "rms", "rope": True, "mlp_dim": 384},
        "optim": {"lr": 2e-3, "warmup_steps": 50, "schedule": "cosine"},
        "train": {"steps": 300, "batch_size": 8, "log_every": 50, "eval_batches": 8},
    }
