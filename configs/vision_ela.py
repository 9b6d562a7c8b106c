"""Issue 18 vision table row: P12 ELA (k=7, depthwise conv, GN 16 groups) after each stage.

``python -m train.vision_modules --config configs/vision_ela.py`` -- digits(16) top-1, 3 seeds; the knob
(``hidden``) is set by ``train.vision_modules.match_params`` to reach ``target_params`` within 5%.
The cnn backbone has BatchNorm after each conv (``norm``; see train/vision_modules.py).
"""


# Run by `python -m train.vision_modules`, which reads the keys below (not the generic `python -m train --config`).
RUNNER = "train.vision_modules"


def get_config():
    return {
        "name": "vision_ela",
        "backbone": "cnn", "module": "ela", "width": 16, "target_params": 11500,
        "steps": 150, "batch_size": 32, "lr": 3e-3, "seeds": (0, 1, 2), "size": 16, "norm": "batch",
    }
