"""P50 (attention-sink emergence): a 4-layer d=128 byte LM with softmax attention; Sink_0.3 on 64 tokens."""


def get_config():
    return {
        "name": "p50_sink_softmax",
        "task": {"kind": "text", "seq_len": 64, "max_bytes": 2_000_000},
        "model": {"kind": "decoder_lm", "dim": 128, "num_layers": 4, "num_heads": 4, "method": "softmax",
                  "method_config": {}},
        "optim": {"lr": 2e-3, "warmup_steps": 50, "schedule": "cosine"},
        "train": {"steps": 300, "batch_size": 16, "log_every": 50, "eval_batches": 4},
        "analysis": {"kind": "sink", "probe_tokens": 64, "samples": 16, "eps": 0.3},
    }
