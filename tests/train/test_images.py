"""train.images: real digits and the procedural shapes set (boxes, masks and captions agree with the pixels)."""
import numpy as np
import pytest

from train import images


def test_digits_are_the_real_sklearn_images_split_stratified():
    """Catches: a wrong scale (pixels /16 dropped), a split that leaks test images into train, a lost class."""
    d = images.digits(8)
    assert d.train_images.shape[1:] == (8, 8, 1) and len(d.train_labels) + len(d.test_labels) == 1797
    assert 0.0 <= d.train_images.min() and d.train_images.max() == 1.0
    assert set(np.unique(d.test_labels)) == set(range(10))
    train_rows = {r.tobytes() for r in d.train_images.reshape(len(d.train_images), -1)}
    leaked = sum(r.tobytes() in train_rows for r in d.test_images.reshape(len(d.test_images), -1))
    assert leaked < 5  # the dataset itself holds a few duplicate images


def test_upsample_keeps_constant_images_and_means():
    """Catches: bilinear weights that do not sum to one, or a transposed axis."""
    x = np.random.default_rng(0).random((2, 8, 8, 1)).astype(np.float32)
    up = images.upsample(x, 16)
    assert up.shape == (2, 16, 16, 1)
    np.testing.assert_allclose(images.upsample(np.full((1, 8, 8, 1), 0.3), 32), 0.3, rtol=1e-6)
    np.testing.assert_allclose(up.mean((1, 2)), x.mean((1, 2)), atol=0.03)
    ramp = np.tile(np.arange(8, dtype=np.float32)[None, :], (8, 1))[None, ..., None]
    assert np.all(np.diff(images.upsample(ramp, 16)[0, 0, :, 0]) >= 0)
    assert np.all(np.diff(images.upsample(ramp, 16)[0, :, 0, 0]) == 0)


def test_shapes_annotations_match_pixels_and_are_reproducible():
    """Catches: a box that does not enclose its mask, masks that overlap, a caption that miscounts, a stream
    that is not a pure function of (seed, index)."""
    s = images.shapes(12, seed=3, size=32, max_objects=3)
    again = images.shapes(4, seed=3, size=32, max_objects=3, start=8)
    np.testing.assert_array_equal(s.images[8:], again.images)
    for i in range(12):
        n = s.counts[i]
        assert 1 <= n <= 3 and np.all(s.kinds[i, n:] == -1) and np.all(s.kinds[i, :n] >= 0)
        assert s.masks[i, :n].sum(0).max() == 1  # no overlaps
        for j in range(n):
            ys, xs = np.nonzero(s.masks[i, j])
            assert list(s.boxes[i, j]) == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            colour = images.COLOUR_RGB[s.colours[i, j]]
            assert np.abs(s.images[i][s.masks[i, j]].mean(0) - colour).max() < 0.05
        words = s.captions[i].replace(",", "").split()
        assert sum(w.rstrip("s") in images.SHAPE_NAMES for w in words) == len(set(zip(s.kinds[i, :n], s.colours[i, :n])))


def test_caption_groups_by_colour_and_kind():
    """Catches: plural or count words wrong, or groups merged across colours."""
    assert images.caption([0, 0, 1], [0, 0, 2]) == "two red circles and a blue square"
    assert images.caption([2, -1], [1, -1]) == "a green triangle"
    assert images.caption([0, 1, 2], [3, 3, 3]) == "a yellow circle, a yellow square and a yellow triangle"
    # up to nine of one colour and kind (counting sets use max_objects up to 6); an IndexError past "four" before
    assert images.caption([1] * 6, [2] * 6) == "six blue squares"


@pytest.mark.parametrize("kwargs, name", [({"num": 0}, "num"), ({"num": 2, "size": 8}, "size"),
                                          ({"num": 2, "min_objects": 4}, "min_objects")])
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        images.shapes(**kwargs)
