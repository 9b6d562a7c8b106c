"""P36 BAM on the stdlib byte corpus: a dense seed LM branched into a code expert and a comments expert, then the
BAM-upcycled 2-expert MoE vs the parameter-averaged dense model at equal further steps (train/bam.py)."""

# Run by `python -m train.bam --config configs/bam.py` (not the generic `python -m train --config`).
RUNNER = "train.bam"


def get_config():
    return {"seq_len": 48, "dim": 48, "layers": 2, "heads": 4, "mlp_dim": 96, "batch": 16, "seed_steps": 50,
            "branch_steps": 60, "further_steps": 60, "early": 15, "lr": 3e-3, "warmup": 10, "eval_batches": 2,
            "eval_batch": 32, "seeds": "0,1,2", "variants": "avg,bam", "impl": "xla", "max_bytes": 600_000}
