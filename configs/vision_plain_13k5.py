"""Issue 18 vision table row: the plain small CNN re-matched to 13,500 parameters, the control of the P10 SDANet and
P47 FDConv rows (their modules add ~4.6k / 4.9k parameters, more than the 11,500 target leaves room for).

``python -m train.vision_modules --config configs/vision_plain_13k5.py`` -- digits(16) top-1, 3 seeds.
The cnn backbone has BatchNorm after each conv (``norm``; see train/vision_modules.py).
"""


# Run by `python -m train.vision_modules`, which reads the keys below (not the generic `python -m train --config`).
RUNNER = "train.vision_modules"


def get_config():
    return {
        "name": "vision_plain_13k5",
        "backbone": "cnn", "module": "plain", "width": 16, "target_params": 13500,
        "steps": 150, "batch_size": 32, "lr": 3e-3, "seeds": (0, 1, 2), "size": 16, "norm": "batch",
    }
