"""P46 AdaInf on digits(16) with SimCLR: ``python -m train.contrastive --config configs/adainf_digits.py``.

Variants real / naive (1:1 real:generated, strong aug) / adainf (real x dup, weak aug) / real_weak, at equal
steps; metric = ridge linear-probe accuracy on the digits test split.
"""


def get_config():
    return {
        "name": "adainf_digits",
        "task": {"kind": "simclr_digits", "gen_factor": 1, "dup": 10, "seeds": "0,1,2",
                 "variants": "real,naive,adainf,real_weak"},
        "model": {"kind": "simclr_cnn", "width": 16, "temperature": 0.5},
        "optim": {"lr": 2e-3},
        "train": {"steps": 500, "batch_size": 64},
    }
