"""train.dit_editing: the shapes diffusion task, the background reconstruction, the partial denoiser with blending,
and the P34 / P72 experiment machinery end to end on a tiny untrained TinyDiT (never a trained checkpoint)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.config import merge
from train.diffusion import DiffusionSubject, build_model, build_schedule
from train.dit_editing import (ShapesDiffusionTask, background_image, check_config, default_config, denoise_from,
                               dilate, drag_set, object_pixels, partial_timesteps, paste, run_drag, run_leakage,
                               run_removal)
from train.images import shapes


def _tiny_config():
    return merge(default_config(), {
        "model": {"image_size": 16, "patch_size": 4, "dim": 16, "depth": 2, "num_heads": 2},
        "diffusion": {"num_steps": 50},
        "data": {"num_train": 8, "heldout_start": 100},
        "experiment": {"num_images": 2, "seeds": [0], "t_start": 20, "sample_steps": 2, "aas_layers": [1, 2],
                       "aas_steps": [0, 2], "ss_steps": 0, "drag_offset": [4, 0]}})


def _tiny_subject(config):
    model = build_model(config["model"], 0)
    from flax import nnx
    for i, blk in enumerate(model.blocks):                      # not the identity: random adaLN / output
        blk.adaLN.kernel[...] = jax.random.normal(jax.random.key(i), blk.adaLN.kernel.shape) * 0.2
    model.final_linear.kernel[...] = jax.random.normal(jax.random.key(9), model.final_linear.kernel.shape) * 0.2
    return DiffusionSubject(model, build_schedule(config["diffusion"]), config)


def test_background_image_matches_shapes_outside_objects():
    """The reconstructed background equals the shapes image wherever no object lies (catches a generator drawn
    in a different order, i.e. a background that is not the image's own)."""
    batch = shapes(3, 5, size=32, start=40)
    for i in range(3):
        bg = background_image(5, 40 + i, 32)
        free = ~batch.masks[i].any(0)
        np.testing.assert_allclose(bg[free], batch.images[i][free], atol=1e-6)
        assert np.abs(bg[batch.masks[i, 0]] - batch.images[i][batch.masks[i, 0]]).mean() > 0.05


def test_task_batch_is_deterministic_and_in_range():
    """A batch is a pure function of (seed, step), images in [-1, 1], label 0 (catches unscaled images)."""
    config = _tiny_config()
    task = ShapesDiffusionTask(build_schedule(config["diffusion"]), size=16, num_train=8, heldout_start=100,
                               num_eval=4)
    a, b = task.batch(0, 3, 4), task.batch(0, 3, 4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["x0"].min() >= -1 and a["x0"].max() <= 1 and a["x0"].min() < -0.1
    assert np.all(a["labels"] == 0) and a["t"].max() < 50


def test_partial_timesteps_and_blending_keeps_known_region_exactly():
    """Timesteps descend from t_start to 0; with known=all-True the result is x0 exactly (catches a blend to the
    noisy latent at the last step instead of x0)."""
    ts = partial_timesteps(20, 5)
    assert ts[0] == 20 and ts[-1] == 0 and np.all(np.diff(ts) < 0)
    config = _tiny_config()
    schedule = build_schedule(config["diffusion"])
    x0 = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(1), x0.shape)
    out = denoise_from(lambda i, x, t: jnp.zeros_like(x), x0, np.ones((2, 16, 16), bool), schedule, t_start=20,
                       steps=4, noise=noise)
    np.testing.assert_allclose(out, np.asarray(x0), atol=1e-6)


def test_check_config_rejects_overlapping_heldout():
    """Held-out indices overlapping training raise naming the key."""
    with pytest.raises(ValueError, match="heldout_start"):
        check_config(merge(_tiny_config(), {"data": {"num_train": 200, "heldout_start": 100}}))
    with pytest.raises(ValueError, match="channels"):
        check_config(merge(_tiny_config(), {"model": {"channels": 1}}))


def test_paste_and_object_pixels():
    """Pasting copies the object to the moved mask and keeps the old place (catches the shift applied the wrong
    way): the object colour is found in both places."""
    config = merge(_tiny_config(), {"model": {"image_size": 32}, "experiment": {"drag_offset": [8, 0]}})
    images, masks, moved, colours, offsets = drag_set(config, 0)
    target = paste(images, masks, moved, offsets)
    obj = object_pixels(target, colours)
    assert (obj & moved).sum() >= 0.9 * moved.sum()
    assert (obj & masks).sum() >= 0.9 * masks.sum()


def test_experiments_run_end_to_end_on_a_tiny_model():
    """Removal, leakage and drag run on a tiny untrained model and give finite numbers; blended methods preserve
    the outside better than plain denoising (catches the blend mask inverted)."""
    config = _tiny_config()
    subject = _tiny_subject(config)
    rem = run_removal(subject, config)
    for m in ("plain", "blend", "aas", "aas_sarg"):
        assert np.isfinite(rem[m]["inside"]["mean"]) and np.isfinite(rem[m]["outside"]["mean"])
    assert rem["blend"]["outside"]["mean"] < rem["plain"]["outside"]["mean"]
    leak = run_leakage(subject, config, t=10)
    assert len(leak["leakage_per_layer_mean"]) == 2
    assert all(0 < x < 1 for x in leak["leakage_per_layer_mean"])
    drag = run_drag(subject, config)
    for m in ("paste_plain", "paste_blend", "diffuhaul"):
        assert 0 <= drag[m]["iou"]["mean"] <= 1
