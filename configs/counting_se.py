"""Issue 18 counting table row: squeeze-excitation baseline: SE (r=4) on each
decoder scale before its density head, heads averaged.

``python -m train.counting --config configs/counting_se.py`` -- shapes (32x32, 1..6 objects) count MAE, 3 seeds;
the knob (``head_hidden``) is set by ``train.counting.match_params`` to reach ``target_params`` (the HMoDE
row's count at head_hidden=32) within 5%.
"""


# Run by `python -m train.counting`, which reads the keys below (not the generic `python -m train --config`).
RUNNER = "train.counting"


def get_config():
    return {
        "name": "counting_se",
        "module": "se", "width": 8, "head_hidden": 32, "gate_width": 8, "gate2_depth": 5, "target_params": 48589,
        "steps": 250, "batch_size": 32, "lr": 1e-3, "seeds": (0, 1, 2), "size": 32, "max_objects": 6,
        "num_train": 1500, "num_test": 500,
    }
