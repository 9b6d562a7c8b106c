"""P58: a TransNormerLLM-style LM (lightning attention with SiLU features, TNL decay, SRMSNorm output,
output gate, SGLU, SRMSNorm pre-norms) on the byte corpus. Compare with p58_softmax.py (same size)."""


def get_config():
    return {
        "name": "p58_tnl",
        "task": {"kind": "text", "seq_len": 256, "max_bytes": 2_000_000},
        "model": {"kind": "decoder_lm", "dim": 128, "num_layers": 4, "num_heads": 4, "method": "lightning",
                  "method_config": {"feature_map": "silu", "decay": "alibi", "chunk_size": 64},
                  "output_gate": True, "mlp": "sglu", "norm": "srms", "rope": False, "mlp_dim": 352},
        "optim": {"lr": 2e-3, "warmup_steps": 50, "schedule": "cosine"},
        "train": {"steps": 300, "batch_size": 8, "log_every": 50, "eval_batches": 8},
    }
