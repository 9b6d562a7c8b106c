"""P46 AdaInf (Wang et al., ICLR 2024, "Do Generated Data Always Help Contrastive Learning?"; official code
PKU-ML/adainf: solo-learn ``scripts/pretrain/cifar/augmentations/{symmetric,asymmetric}_adainf.yaml``, README's
``data.extra_data`` / ``data.dup``).

Data inflation trains a contrastive learner on real ∪ generated images. AdaInf changes two things and nothing
else (the SSL loss is untouched):

1. **Reweighting** (:class:`InflatedSampler`, :func:`weighted_real_generated_sampler`): the real set is replicated
   ``dup`` times (official default ``dup = 10``) before it is concatenated with the generated set, so one epoch
   of the inflated set holds each real image ``dup`` times and each generated image once; the real fraction is
   ``dup * N_real / (dup * N_real + N_gen)`` (:func:`real_fraction`). Batches are consecutive slices of one
   permutation per epoch, so the proportions are exact over every epoch.
2. **Weaker augmentation** (:data:`STRONG` -> :data:`ADAINF`): RandomResizedCrop min scale 0.08 -> 0.2;
   colour-jitter probability 0.8 -> 0.4 and strength (brightness, contrast, saturation, hue)
   (0.8, 0.8, 0.8, 0.2) -> (0.4, 0.4, 0.4, 0.1); grayscale 0.2 and blur 0.5 unchanged.

The paper's learner is SimCLR (also MoCo, BYOL, Barlow); :func:`nt_xent_loss` is SimCLR's NT-Xent
(temperature 0.2 in solo-learn's CIFAR configs, 0.5 in the SimCLR paper; the default here is 0.5).

Augmentations are pure JAX (:func:`augment`, vmapped by :func:`augment_batch`), with the preset's numbers as
*arrays* (so one compiled step serves every preset). Deliberate deviations for 1-channel images (the project's
digits): saturation and hue jitter and grayscale are no-ops on one channel (kept in the presets, ignored by
:func:`augment`); colour jitter applies brightness then contrast (torchvision draws a random order);
horizontal flip is off (digits are not flip-symmetric); the Gaussian blur has sigma ~ U(0.1, 1.0) pixels
(torchvision's ImageNet 0.1..2.0 at 224 px is far wider than a 16 px image). Nothing here is attention: the
spec recommends this stays an example-level utility.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["AugmentConfig", "STRONG", "ADAINF", "NONE", "interpolate_presets", "augment", "augment_batch",
           "nt_xent_loss", "real_fraction", "InflatedSampler", "weighted_real_generated_sampler", "DUP"]

DUP = 10


class AugmentConfig(NamedTuple):
    """SimCLR augmentation numbers (solo-learn names): RandomResizedCrop ``crop_min_scale`` (max 1.0, aspect
    3/4..4/3), colour jitter applied with ``jitter_prob`` at strengths (brightness, contrast, saturation, hue),
    ``gray_prob``, ``blur_prob``, ``flip_prob``, and the crop's aspect range ``exp(+-max_log_aspect)``
    (torchvision's 3/4..4/3 in both presets; 0 in :data:`NONE`, which is then the identity). Leaves may be
    floats or arrays."""
    crop_min_scale: float
    jitter_prob: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    gray_prob: float
    blur_prob: float
    flip_prob: float
    max_log_aspect: float = math.log(4 / 3)


STRONG = AugmentConfig(0.08, 0.8, 0.8, 0.8, 0.8, 0.2, 0.2, 0.5, 0.0)
ADAINF = AugmentConfig(0.2, 0.4, 0.4, 0.4, 0.4, 0.1, 0.2, 0.5, 0.0)
NONE = AugmentConfig(1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def interpolate_presets(a: AugmentConfig, b: AugmentConfig, t: float) -> AugmentConfig:
    """``(1 - t) a + t b`` field by field (``t`` in [0, 1]): a one-parameter family of augmentation strengths."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be a float in [0, 1], got {t!r}")
    return AugmentConfig(*[(1 - t) * x + t * y for x, y in zip(a, b)])


def _as_arrays(cfg) -> AugmentConfig:
    if not isinstance(cfg, AugmentConfig):
        raise TypeError(f"cfg must be an AugmentConfig, got {type(cfg).__name__}")
    return AugmentConfig(*[jnp.asarray(v, jnp.float32) for v in cfg])


def _random_resized_crop(key, image, min_scale, max_log_aspect):
    """torchvision's RandomResizedCrop (one draw, no retry loop): area fraction ~ U(min_scale, 1), log aspect
    ~ U(-max_log_aspect, max_log_aspect) (torchvision: log 3/4 .. log 4/3, nearly symmetric), clipped to the
    image; bilinear resample back to the input size."""
    S, W = image.shape[0], image.shape[1]
    k1, k2, k3, k4 = jax.random.split(key, 4)
    area = jax.random.uniform(k1, (), minval=min_scale, maxval=1.0) * S * W
    log_r = jax.random.uniform(k2, (), minval=-max_log_aspect, maxval=max_log_aspect)
    r = jnp.exp(log_r)
    cw = jnp.clip(jnp.sqrt(area * r), 1.0, W)
    ch = jnp.clip(jnp.sqrt(area / r), 1.0, S)
    y0 = jax.random.uniform(k3, ()) * (S - ch)
    x0 = jax.random.uniform(k4, ()) * (W - cw)
    ys = y0 + (jnp.arange(S) + 0.5) * ch / S - 0.5
    xs = x0 + (jnp.arange(W) + 0.5) * cw / W - 0.5
    yy, xx = jnp.meshgrid(ys, xs, indexing="ij")
    sample = lambda ch_img: jax.scipy.ndimage.map_coordinates(ch_img, [yy, xx], order=1, mode="nearest")
    return jnp.stack([sample(image[..., c]) for c in range(image.shape[-1])], -1)


def _blur(key, image):
    sigma = jax.random.uniform(key, (), minval=0.1, maxval=1.0)
    taps = jnp.arange(-2, 3, dtype=jnp.float32)
    k = jnp.exp(-taps ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    pad = jnp.pad(image, ((2, 2), (2, 2), (0, 0)), mode="edge")
    rows = sum(k[i] * pad[i:i + image.shape[0]] for i in range(5))
    return sum(k[i] * rows[:, i:i + image.shape[1]] for i in range(5))


def augment(key, image, cfg: AugmentConfig):
    """One SimCLR view of ``image [S, S, C]`` in [0, 1] under ``cfg`` (see the module docstring)."""
    cfg = _as_arrays(cfg)
    image = jnp.asarray(image, jnp.float32)
    if image.ndim != 3:
        raise ValueError(f"image must be [S, S, C], got shape {image.shape}")
    kc, kj, kb, kcn, kbl, kbp, kf = jax.random.split(key, 7)
    x = _random_resized_crop(kc, image, cfg.crop_min_scale, cfg.max_log_aspect)
    do_jitter = jax.random.uniform(kj, ()) < cfg.jitter_prob
    b = jax.random.uniform(kb, (), minval=1 - cfg.brightness, maxval=1 + cfg.brightness)
    c = jax.random.uniform(kcn, (), minval=1 - cfg.contrast, maxval=1 + cfg.contrast)
    jittered = jnp.clip(x * jnp.maximum(b, 0.0), 0, 1)
    mean = jnp.mean(jittered)
    jittered = jnp.clip((jittered - mean) * jnp.maximum(c, 0.0) + mean, 0, 1)
    x = jnp.where(do_jitter, jittered, x)
    x = jnp.where(jax.random.uniform(kbp, ()) < cfg.blur_prob, _blur(kbl, x), x)
    x = jnp.where(jax.random.uniform(kf, ()) < cfg.flip_prob, x[:, ::-1], x)
    return x


def augment_batch(key, images, cfg: AugmentConfig):
    """:func:`augment` over ``images [N, S, S, C]`` with independent keys."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, S, S, C], got shape {images.shape}")
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(augment, in_axes=(0, 0, None))(keys, images, cfg)


def nt_xent_loss(z1, z2, temperature: float = 0.5):
    """SimCLR's NT-Xent over ``2N`` views: ``z1[i]`` and ``z2[i]`` are positives, every other view a negative.

    ``l_i = -log(exp(s_ip / t) / sum_{k != i} exp(s_ik / t))`` with ``s`` the cosine similarity; mean over the
    ``2N`` anchors."""
    z1, z2 = jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32)
    if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[0] < 2:
        raise ValueError(f"z1 and z2 must both be [N, D] with N >= 2, got {z1.shape} and {z2.shape}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
    n = z1.shape[0]
    z = jnp.concatenate([z1, z2], 0)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    logits = z @ z.T / temperature
    logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
    positive = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(logp[jnp.arange(2 * n), positive])


def real_fraction(num_real: int, num_gen: int, dup: int) -> float:
    """The fraction of real images in the inflated set: ``dup * N_real / (dup * N_real + N_gen)``."""
    for name, v, lo in (("num_real", num_real, 1), ("num_gen", num_gen, 0), ("dup", dup, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return dup * num_real / (dup * num_real + num_gen)


class InflatedSampler:
    """Batches of indices into ``concat(real, generated)`` (generated index ``j`` is ``num_real + j``) from the
    inflated set: each real index ``dup`` times, each generated index once, shuffled once per epoch.

    ``batch(step)`` is a pure function of ``(seed, step)``: batches are consecutive slices of the epoch's
    permutation (an epoch's tail that does not fill a batch is dropped), so over one epoch every real image
    appears exactly ``dup`` times per generated image's once, up to the dropped tail."""

    def __init__(self, num_real: int, num_gen: int = 0, dup: int = DUP, *, batch_size: int, seed: int = 0):
        real_fraction(num_real, num_gen, dup)  # validates
        self.num_real, self.num_gen, self.dup, self.seed = int(num_real), int(num_gen), int(dup), int(seed)
        self.size = self.dup * self.num_real + self.num_gen
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= self.size:
            raise ValueError(f"batch_size must be an int in [1, {self.size}] (the inflated set's size), "
                             f"got {batch_size!r}")
        self.batch_size = batch_size
        self.batches_per_epoch = self.size // batch_size
        self._base = np.concatenate([np.tile(np.arange(self.num_real), self.dup),
                                     self.num_real + np.arange(self.num_gen)]).astype(np.int32)
        self._epoch, self._perm = None, None

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The whole shuffled inflated index list of ``epoch``."""
        return np.random.default_rng([self.seed, int(epoch), 46]).permutation(self._base)

    def batch(self, step: int) -> np.ndarray:
        epoch, pos = divmod(int(step), self.batches_per_epoch)
        if self._epoch != epoch:
            self._epoch, self._perm = epoch, self.epoch_indices(epoch)
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]


def weighted_real_generated_sampler(num_real: int, num_gen: int, dup: int = DUP, *, batch_size: int,
                                    seed: int = 0) -> InflatedSampler:
    """The spec's name for :class:`InflatedSampler` (AdaInf's reweighting: real data replicated ``dup`` times)."""
    return InflatedSampler(num_real, num_gen, dup, batch_size=batch_size, seed=seed)
