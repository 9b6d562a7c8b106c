"""Issue 18 vision table row: P47 FDConv with its two departures for Adam (``dft_scale="unit"``,
``filter_gate_init="one"``), otherwise ``configs/vision_fdconv.py``'s row.

``python -m train.vision_modules --config configs/vision_fdconv_adam.py`` -- digits(16) top-1, 3 seeds. The
code's FDConv stores its spectrum at a scale that makes Adam's steps 4-6x smaller in weight space than a plain
conv's, and starts its filter gates spread over (0, 2) (``jattn.methods.vision.fdconv.dft_parameter_scale``); this
row shows what the layer does without those two. Same target (13,500) and control as the fdconv row.
"""


# Run by `python -m train.vision_modules`, which reads the keys below (not the generic `python -m train --config`).
RUNNER = "train.vision_modules"


def get_config():
    return {
        "name": "vision_fdconv_adam",
        "backbone": "cnn", "module": "fdconv_adam", "width": 16, "target_params": 13500,
        "steps": 150, "batch_size": 32, "lr": 3e-3, "seeds": (0, 1, 2), "size": 16, "norm": "batch",
    }
