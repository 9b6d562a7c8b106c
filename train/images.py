"""Image data that needs no download: scikit-learn's bundled handwritten digits and a procedural shapes set.

- :func:`digits` — the 1,797 real 8x8 digit images of ``sklearn.datasets.load_digits``, scaled to [0, 1]
  and optionally upsampled (bilinear) to 16x16 or 32x32, with a fixed stratified train/test split.
- :func:`shapes` — coloured circles, squares and triangles on textured backgrounds, each image with
  per-object boxes, masks, classes, colours and a caption ("two red circles and a blue square").
  Every image is a pure function of ``(seed, index)``, so any subset is reproducible on its own.

Both return plain numpy arrays (channels last), so they feed JAX, tests and plots alike.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

SHAPE_NAMES = ("circle", "square", "triangle")
COLOUR_NAMES = ("red", "green", "blue", "yellow")
COLOUR_RGB = np.array([[0.9, 0.15, 0.15], [0.15, 0.8, 0.2], [0.2, 0.3, 0.95], [0.95, 0.85, 0.1]], np.float32)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMBER_WORDS = DIGIT_WORDS  # a caption may count up to max_objects (<= 9) objects of one colour and kind


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Digits:
    """Digit images ``[N, size, size, 1]`` in [0, 1] and labels ``[N]`` (int32), split into train and test."""
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``[N, h, w, C]`` images to ``[N, size, size, C]`` (half-pixel centres, edge clamp)."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, h, w, C], got shape {images.shape}")
    h, w = images.shape[1:3]

    def axis(n_in):
        pos = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    (y0, y1, fy), (x0, x1, fx) = axis(h), axis(w)
    rows = images[:, y0] * (1 - fy)[None, :, None, None] + images[:, y1] * fy[None, :, None, None]
    return rows[:, :, x0] * (1 - fx)[None, None, :, None] + rows[:, :, x1] * fx[None, None, :, None]


@functools.lru_cache(maxsize=4)
def digits(size: int = 8, test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """sklearn's digits as ``[N, size, size, 1]`` float32 in [0, 1]; a stratified split fixed by ``seed``.

    ``size`` 8 is the original resolution; 16 or 32 upsample bilinearly. The pixel values (0..16) are
    divided by 16.
    """
    from sklearn.datasets import load_digits

    size = _check_int("size", size, 8)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    data = load_digits()
    images = (data.images.astype(np.float32) / 16.0)[..., None]
    if size != 8:
        images = upsample(images, size)
    labels = data.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test[rng.choice(idx, int(round(len(idx) * test_fraction)), replace=False)] = True
    return Digits(images[~test], labels[~test], images[test], labels[test])


@dataclass(frozen=True)
class Shapes:
    """A batch of shapes images and their annotations (``M`` = max objects per image, padded).

    images ``[N, S, S, 3]`` in [0, 1]; boxes ``[N, M, 4]`` as (x0, y0, x1, y1) in pixels, exclusive ends;
    masks ``[N, M, S, S]`` bool (the object's visible pixels); kinds ``[N, M]`` index into SHAPE_NAMES,
    colours ``[N, M]`` into COLOUR_NAMES, both -1 for padding; counts ``[N]``; captions: list of str.
    """
    images: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray
    kinds: np.ndarray
    colours: np.ndarray
    counts: np.ndarray
    captions: list


def _shape_mask(kind: int, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if kind == 0:
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if kind == 1:
        return (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    # an upward triangle: apex at the top, base at the bottom of the bounding square
    top, bottom = cy - r, cy + r
    half_width = (yy - top) / (2 * r) * r
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)


def caption(kinds, colours) -> str:
    """'two red circles and a blue square': groups by (colour, kind) in first-appearance order."""
    groups: dict[tuple[int, int], int] = {}
    for kind, colour in zip(kinds, colours):
        if kind >= 0:
            groups[(int(colour), int(kind))] = groups.get((int(colour), int(kind)), 0) + 1
    parts = []
    for (colour, kind), n in groups.items():
        noun = SHAPE_NAMES[kind] + ("s" if n > 1 else "")
        parts.append(f"{'a' if n == 1 else NUMBER_WORDS[n]} {COLOUR_NAMES[colour]} {noun}")
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def shape_image(seed: int, index: int, size: int = 32, max_objects: int = 3, min_objects: int = 1):
    """One shapes image: a textured background and 1..max_objects non-overlapping shapes (boxes apart)."""
    rng = np.random.default_rng([int(seed), int(index), 7])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    freq, phase = rng.uniform(0.2, 0.6, 2), rng.uniform(0, 2 * np.pi, 2)
    base = rng.uniform(0.35, 0.6)
    texture = base + 0.08 * np.sin(freq[0] * xx + phase[0]) * np.cos(freq[1] * yy + phase[1])
    image = np.repeat(texture[..., None], 3, axis=-1) + rng.normal(0, 0.03, (size, size, 3))
    n = int(rng.integers(min_objects, max_objects + 1))
    boxes = np.zeros((max_objects, 4), np.int32)
    masks = np.zeros((max_objects, size, size), bool)
    kinds = -np.ones(max_objects, np.int32)
    colours = -np.ones(max_objects, np.int32)
    placed = 0
    for _ in range(50 * max_objects):
        if placed == n:
            break
        r = rng.uniform(size * 0.09, size * 0.16)
        cx, cy = rng.uniform(r + 1, size - r - 1, 2)
        box = np.array([np.floor(cx - r), np.floor(cy - r), np.ceil(cx + r), np.ceil(cy + r)], np.int32)
        if any(box[0] < b[2] + 1 and b[0] < box[2] + 1 and box[1] < b[3] + 1 and b[1] < box[3] + 1
               for b in boxes[:placed]):
            continue
        kind, colour = int(rng.integers(3)), int(rng.integers(len(COLOUR_NAMES)))
        mask = _shape_mask(kind, cx, cy, r, size)
        ys, xs = np.nonzero(mask)
        boxes[placed] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        masks[placed], kinds[placed], colours[placed] = mask, kind, colour
        image[mask] = COLOUR_RGB[colour] + rng.normal(0, 0.02, (mask.sum(), 3))
        placed += 1
    return np.clip(image, 0, 1).astype(np.float32), boxes, masks, kinds, colours, placed


def shapes(num: int, seed: int = 0, *, size: int = 32, max_objects: int = 3, min_objects: int = 1,
           start: int = 0) -> Shapes:
    """``num`` shapes images with indices ``start .. start+num-1`` of the stream fixed by ``seed``.

    Use disjoint index ranges (or seeds) for train and held-out sets.
    """
    num = _check_int("num", num, 1)
    size = _check_int("size", size, 16)
    max_objects = _check_int("max_objects", max_objects, 1)
    min_objects = _check_int("min_objects", min_objects, 0)
    if min_objects > max_objects:
        raise ValueError(f"min_objects ({min_objects}) must be <= max_objects ({max_objects})")
    items = [shape_image(seed, start + i, size, max_objects, min_objects) for i in range(num)]
    images, boxes, masks, kinds, colours, counts = (np.stack([it[j] for it in items]) for j in range(6))
    captions = [caption(k, c) for k, c in zip(kinds, colours)]
    return Shapes(images, boxes, masks, kinds, colours, counts.astype(np.int32), captions)
