"""P58: a TransNormerLLM LM built from ``TNLBlock`` (``train.tnl.TNLLM``): gated linear attention with SiLU
features, the official non-learnable decay, SRMSNorm, output gate, SGLU, SRMSNorm pre-norms, and LRPE in
the first layer only, as the paper does (no RoPE). Compare with p58_softmax.py (about the same size).

Run with ``python -m train.tnl --config configs/p58_tnl.py`` (``python -m train`` builds it too once
``train.build`` knows ``model.kind = "tnl_lm"``)."""


def get_config():
    return {
        "name": "p58_tnl",
        "task": {"kind": "text", "seq_len": 256, "max_bytes": 2_000_000},
        "model": {"kind": "tnl_lm", "dim": 128, "num_layers": 4, "num_heads": 4, "mlp_dim": 352,
                  "lrpe_layers": (0,), "chunk_size": 64},
        "optim": {"lr": 2e-3, "warmup_steps": 50, "schedule": "cosine"},
        "train": {"steps": 300, "batch_size": 8, "log_every": 50, "eval_batches": 8},
    }
