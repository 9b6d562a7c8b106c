"""P25 DEFT on all-MiniLM-L6-v2: LoRA (r=8, alpha=16, query+value, the official DEFT/adapters defaults) trained to
keep the frozen model's sentence embeddings (1 - cosine) plus ``weight`` x the smooth activation-density loss
(eps=1e-7). ``weight=0`` is the baseline (the same PEFT without DEFT). Run: ``python -m train.deft``."""


# Run by `python -m train.deft`, which reads the keys below (not the generic `python -m train --config`).
RUNNER = "train.deft"


def get_config():
    return {
        "name": "deft_minilm",
        "seed": 0,
        # text: English comment/docstring lines of the stdlib corpus; every 10th line held out;
        # train on the first train_sentences of the rest
        "data": {"seq_len": 32, "max_bytes": 2_000_000, "eval_every": 10, "train_sentences": 2048,
                 "eval_sentences": 256},
        "lora": {"rank": 8, "alpha": 16.0, "targets": ("query", "value")},
        # weight: lambda (official weight_l=1.0); tol: |a| > tol counts as active in the tol-density
        "deft": {"weight": 1.0, "eps": 1e-7, "tol": 1e-3, "mask_padding": True},
        # official: AdamW lr 3e-4 (torch defaults b2=0.999, weight decay 0.01), 6 % linear warmup, no clipping
        "optim": {"lr": 2e-3, "warmup_steps": 6, "schedule": "cosine", "weight_decay": 0.01, "b1": 0.9,
                  "b2": 0.999, "clip_norm": None, "min_lr_ratio": 0.0},
        "train": {"steps": 100, "batch_size": 16, "log_every": 50},
    }
