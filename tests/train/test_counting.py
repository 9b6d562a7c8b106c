"""The counting experiment's machinery (train/counting.py): data, heads, parameter matching, a few steps, the table."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import counting
from train.images import shape_image


def test_density_integrates_to_the_object_count():
    """Each visible object carries unit mass, so the (pooled) density sums to the image's count. Catches: mass per
    pixel instead of per object (sum = total area), pooling that averages instead of sums."""
    for index in range(4):
        *_, masks, _, _, n = shape_image(3, index, 32, 6)
        dens = counting.density_from_masks(masks, 32)
        assert dens.shape == (16, 16)
        np.testing.assert_allclose(dens.sum(), n, rtol=1e-5)
    images, dens, counts = counting.counting_data(3, 3, 0, 32, 6)
    assert images.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(dens.sum((1, 2)), counts, rtol=1e-5)


def test_config_checker_names_the_bad_key():
    with pytest.raises(ValueError, match="unknown config key"):
        counting.check_config({"module": "hmode", "stpes": 3})
    with pytest.raises(ValueError, match="'module' must be one of"):
        counting.check_config({"module": "cbam"})
    with pytest.raises(ValueError, match="'lr'"):
        counting.check_config({"module": "se", "lr": 0})
    assert counting.check_config({"module": "plain"})["name"] == "counting_plain"


def test_heads_are_parameter_matched_within_five_percent():
    """plain / SE rows land within 5% of the HMoDE row's count through the density-head knob. Catches: a knob that
    does not change the parameter count, a mismatch silently accepted."""
    target = counting.match_params({"module": "hmode", "width": 4, "gate_width": 4})[1]
    for module in ("plain", "se"):
        hidden, params = counting.match_params({"module": module, "width": 4, "target_params": target})
        assert abs(params - target) <= 0.05 * target and hidden > 32
    with pytest.raises(ValueError, match="cannot match"):
        counting.match_params({"module": "hmode", "width": 4, "target_params": 10})


def test_plain_head_is_the_mean_of_its_experts_and_counts_its_density():
    """Plain = HMoDE with equal constant gates: the final map is the mean of D1..D3 and the count its sum. Catches:
    a sum of the experts (3x the count), a count read from one expert."""
    model = counting.build_model(counting.check_config({"module": "plain", "width": 4}), seed=1)
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)), jnp.float32)
    out = jax.jit(lambda x: model(x))(x)                 # one compile instead of one per eager op
    np.testing.assert_allclose(np.asarray(out["density"][..., 0]), np.asarray(out["experts"]).mean(-1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["count"]), np.asarray(out["density"]).sum((1, 2, 3)), rtol=1e-5)


def test_a_few_steps_run_and_the_table_prints(tmp_path):
    """Three steps of the HMoDE row (with the relative loss on) on 8 images: finite loss, MAE and expert MAEs,
    JSON written, and the markdown row carries the params, seeds and MAE."""
    cfg = {"module": "hmode", "width": 4, "gate_width": 4, "gate2_depth": 2, "steps": 3, "batch_size": 4,
           "num_train": 8, "num_test": 6, "seeds": (0,), "rel_weight": 0.1}
    summary = counting.run_config(cfg, out_dir=str(tmp_path))
    run = summary["runs"][0]
    assert np.isfinite(run["first_loss"]) and np.isfinite(run["final_loss"]) and np.isfinite(summary["mae_mean"])
    assert len(summary["expert_mae"]) == 3 and summary["steps"] == 3
    assert json.loads((tmp_path / "counting_hmode.json").read_text())["params"] == summary["params"]
    table = counting.markdown_table([summary])
    assert table.splitlines()[0].startswith("| head |") and f"{summary['params']:,}" in table.splitlines()[-1]


def test_compiled_flops_counts_only_the_selected_outputs():
    """``compiled_flops`` (the FLOPs column of the counting, segmentation and DCAL tables) on hand-built layers: a
    Linear(8 -> 16) on one row is 2*8*16 multiply-adds plus 16 bias adds; selecting one output of a two-output
    model counts that branch only (XLA drops the other). Catches: a count of the whole dict when one output is
    selected (the counting table would count HMoDE's training-only outputs), a per-batch instead of per-image
    count."""
    from flax import nnx

    from train.vision_modules import compiled_flops

    class Two(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(8, 64, rngs=rngs)

        def __call__(self, x):
            return {"a": self.a(x), "b": self.b(x)}

    x = jnp.ones((1, 8), jnp.float32)
    assert 2 * 8 * 16 <= compiled_flops(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), x) <= 2 * 8 * 16 + 16
    two = Two(nnx.Rngs(0))
    only_a = compiled_flops(two, x, select=lambda out: out["a"])
    assert 2 * 8 * 16 <= only_a <= 2 * 8 * 16 + 16
    assert compiled_flops(two, x) >= only_a + 2 * 8 * 64


def test_hmode_maps_rebuild_the_final_density_and_the_png_is_written(tmp_path):
    """The effective expert weights of the HMoDE map, ``sum_j w2_j w1_j[expert]``, sum to 1 per pixel and
    ``sum_i weight_i D_i`` equals the final density map (the mixture is linear in the experts). Catches: a pair
    slot mapped to the wrong expert (G2 = {D1, D3}), gates read before their softmax. Also writes the PNG."""
    cfg = counting.check_config({"module": "hmode", "width": 4, "gate_width": 4, "gate2_depth": 2, "num_test": 2})
    model = counting.build_model(cfg, seed=2)
    image = np.random.default_rng(1).uniform(0, 1, (32, 32, 3)).astype(np.float32)
    m = counting.hmode_maps(model, image)
    assert m["attention"].shape == (4, 4) and m["experts"].shape == (16, 16, 3)
    np.testing.assert_allclose(m["effective"].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose((m["effective"] * m["experts"]).sum(-1), m["density"], rtol=1e-4, atol=1e-4)
    counting.save_hmode_png(model, cfg, str(tmp_path / "counting_hmode.png"))
    assert (tmp_path / "counting_hmode.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="'hmode' row"):
        counting.hmode_maps(counting.build_model(counting.check_config({"module": "plain", "width": 4})), image)
