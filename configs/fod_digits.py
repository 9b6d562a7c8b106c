"""P54 FOD on one-class digits(16): ``python -m train.anomaly --config configs/fod_digits.py``.

Normal class = each of ``task.classes`` in turn (trained on its training images only); test = every test image;
metric = image AUROC (mean patch score). Variants ``plain`` (the official rec-only model: x + self-attention
layers), ``rec`` (the same I2Correlation transformer, loss weights 0, reconstruction score) and ``fod``
(lambda1 = lambda2 = 0.5, rec * inter score) at equal steps and batches.
"""


def get_config():
    return {
        "name": "fod_digits",
        "task": {"kind": "one_class_digits", "size": 16, "patch": 6, "stride": 4, "classes": "0,1,2,3,4,5,6,7,8,9",
                 "seeds": "0,1,2", "reduce": "mean", "bias": 1.0},
        "model": {"kind": "fod_i2correlation", "d_model": 32, "heads": 4, "layers": 2, "lambda1": 0.5,
                  "lambda2": 0.5},
        "optim": {"lr": 1e-3},
        "train": {"steps": 200, "batch_size": 16},
    }
