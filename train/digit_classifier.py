"""A small CNN digit classifier on ``train.images.digits(16)``: the judge of generated digit samples.

``conv3x3(16) - relu - avgpool2 - conv3x3(32) - relu - avgpool2 - flatten - linear(64) - relu - linear(10)``
on ``[B, 16, 16, 1]`` images in [0, 1], trained with AdamW (lr 3e-3, batch 128, 400 steps) on the fixed
train split, with light Gaussian pixel noise (sigma 0.05) as augmentation so that slightly noisy samples are
judged by shape. Its held-out accuracy on the test split is saved with the parameters (orbax, through
:class:`train.checkpoint.Checkpointer`) and :func:`load_classifier` rebuilds it in one line;
:func:`default_classifier` trains it once into ``runs/digit_classifier`` (about half a minute on a CPU).

:func:`classify_samples` returns the per-class accuracy of images against the labels they were generated
for: ``acc[c] = mean(argmax f(x_i) == c | label_i = c)`` (NaN for a class with no sample).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train.checkpoint import Checkpointer
from train.data import batch_rng
from train.images import digits

DEFAULT_DIR = os.path.join("runs", "digit_classifier")


class DigitCNN(nnx.Module):
    """``images [B, S, S, C]`` in [0, 1] -> logits ``[B, num_classes]`` (see module docstring)."""

    def __init__(self, *, rngs: nnx.Rngs, image_size: int = 16, channels: int = 1, num_classes: int = 10,
                 width: int = 16):
        for name, value in (("image_size", image_size), ("channels", channels), ("num_classes", num_classes),
                            ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.conv1 = nnx.Conv(channels, width, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(2 * width * (image_size // 4) ** 2, 64, rngs=rngs)
        self.head = nnx.Linear(64, num_classes, rngs=rngs)

    def __call__(self, images):
        if not hasattr(images, "shape") or tuple(images.shape[1:]) != (self.image_size, self.image_size, self.channels):
            raise ValueError(f"images must be [B, {self.image_size}, {self.image_size}, {self.channels}], got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        x = nnx.avg_pool(jax.nn.relu(self.conv1(images)), (2, 2), strides=(2, 2))
        x = nnx.avg_pool(jax.nn.relu(self.conv2(x)), (2, 2), strides=(2, 2))
        return self.head(jax.nn.relu(self.fc(x.reshape(x.shape[0], -1))))


@dataclasses.dataclass
class Classifier:
    model: DigitCNN
    test_accuracy: float
    config: dict

    def predict(self, images) -> np.ndarray:
        return predict(self.model, images)


def predict(model, images, batch_size: int = 512) -> np.ndarray:
    """Predicted classes ``[N]`` for ``images [N, S, S, C]`` in [0, 1]."""
    images = np.asarray(images, np.float32)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x: jnp.argmax(nnx.merge(graphdef, s)(x), axis=-1))
    return np.concatenate([np.asarray(fn(state, images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)]) if len(images) else np.zeros(0, np.int32)


def fit_classifier(*, steps: int = 400, batch_size: int = 128, lr: float = 3e-3, noise: float = 0.05,
                   seed: int = 0, size: int = 16, width: int = 16) -> Classifier:
    """Trains :class:`DigitCNN` on ``digits(size)``'s train split; reports its test-split accuracy."""
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise ValueError(f"lr must be a float > 0, got {lr!r}")
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or noise < 0:
        raise ValueError(f"noise must be a float >= 0, got {noise!r}")
    data = digits(size)
    model = DigitCNN(rngs=nnx.Rngs(seed), image_size=size, width=width)
    graphdef, params = nnx.split(model)
    optimizer = optax.adamw(optax.cosine_decay_schedule(lr, steps, alpha=0.1), weight_decay=1e-4)
    opt_state = optimizer.init(params)

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for i in range(steps):
        rng = batch_rng(seed, i, stream=50)
        idx = rng.integers(0, len(data.train_labels), batch_size)
        x = data.train_images[idx] + noise * rng.standard_normal(data.train_images[idx].shape).astype(np.float32)
        params, opt_state, _ = step(params, opt_state, np.clip(x, 0, 1), data.train_labels[idx])
    model = nnx.merge(graphdef, params)
    accuracy = float(np.mean(predict(model, data.test_images) == data.test_labels))
    config = {"steps": steps, "batch_size": batch_size, "lr": lr, "noise": noise, "seed": seed, "size": size,
              "width": width}
    return Classifier(model, accuracy, config)


def save_classifier(classifier: Classifier, path: str = DEFAULT_DIR) -> str:
    with Checkpointer(path, max_to_keep=1) as ckpt:
        ckpt.delete_all()
        ckpt.save(0, nnx.state(classifier.model, nnx.Param),
                  {"config": classifier.config, "test_accuracy": classifier.test_accuracy})
    return path


def load_classifier(path: str = DEFAULT_DIR) -> Classifier:
    """The classifier saved at ``path`` by :func:`save_classifier` (or :func:`default_classifier`)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise FileNotFoundError(f"path={path!r} holds no saved digit classifier; run "
                                f"`python -m train.digit_classifier --out {path}`")
    with Checkpointer(path) as ckpt:
        meta = ckpt.read_meta()
        config = meta["config"]
        model = DigitCNN(rngs=nnx.Rngs(0), image_size=config["size"], width=config["width"])
        params, _ = ckpt.restore(nnx.state(model, nnx.Param))
    nnx.update(model, params)
    return Classifier(model, float(meta["test_accuracy"]), config)


def default_classifier(path: str = DEFAULT_DIR) -> Classifier:
    """Loads the classifier at ``path``, training and saving it first when absent."""
    if os.path.isdir(path) and os.listdir(path):
        return load_classifier(path)
    classifier = fit_classifier()
    save_classifier(classifier, path)
    return classifier


def classify_samples(samples, labels, classifier=None, num_classes: int = 10) -> np.ndarray:
    """Per-class accuracy ``[num_classes]`` of ``samples [N, S, S, C]`` (in [0, 1]) against the classes
    ``labels [N]`` they were generated for (NaN where a class has no sample). ``classifier``: a
    :class:`DigitCNN`, a :class:`Classifier`, or None for :func:`default_classifier`."""
    samples = np.asarray(samples, np.float32)
    labels = np.asarray(labels)
    if samples.ndim != 4:
        raise ValueError(f"samples must be [N, S, S, C] images, got shape {samples.shape}")
    if labels.shape != (samples.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an int array [N={samples.shape[0]}], got shape {labels.shape} "
                         f"dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}]")
    if classifier is None:
        classifier = default_classifier()
    model = classifier.model if isinstance(classifier, Classifier) else classifier
    if not isinstance(model, DigitCNN):
        raise TypeError(f"classifier must be a DigitCNN, a Classifier or None, got {type(classifier).__name__}")
    correct = predict(model, samples) == labels
    return np.array([correct[labels == c].mean() if np.any(labels == c) else np.nan for c in range(num_classes)])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="train and save the digit classifier")
    parser.add_argument("--out", default=DEFAULT_DIR)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    classifier = fit_classifier(steps=args.steps, seed=args.seed)
    save_classifier(classifier, args.out)
    report = {"out": args.out, "test_accuracy": classifier.test_accuracy, "seconds": round(time.perf_counter() - began, 1)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
