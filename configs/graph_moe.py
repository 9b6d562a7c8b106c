"""P53 graph-of-tokens MoE routing on the stdlib byte corpus: top-1 of 4 experts, standard vs attention-aware vs
similarity-aware gating at equal steps (train/graph_moe.py)."""

# Run by `python -m train.graph_moe --config configs/graph_moe.py` (not the generic `python -m train --config`).
RUNNER = "train.graph_moe"


def get_config():
    return {"seq_len": 64, "dim": 48, "layers": 2, "heads": 4, "experts": 4, "hidden": 96, "top_k": 1,
            "batch": 16, "steps": 120, "lr": 3e-3, "warmup": 20, "fluct_gap": 20, "eval_batches": 2,
            "eval_batch": 32, "seeds": "0,1,2", "variants": "standard,attention,similarity", "impl": "xla",
            "max_bytes": 400_000, "mix": "prob"}
