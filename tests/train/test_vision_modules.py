"""Machinery of issue 18's vision table (train/vision_modules.py): backbones, SE baseline, parameter matching,
a few-step run, config validation."""
import glob

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train import vision_modules as vm


def _images(b=2, seed=0):
    return jax.random.uniform(jax.random.key(seed), (b, 16, 16, 1), jnp.float32)


@pytest.mark.parametrize("module", vm.CNN_MODULES)
def test_cnn_backbone_with_each_module_gives_logits(module):
    """Catches a module that changes the feature shape (wrong channel count / axis) or breaks the backbone."""
    model = vm.GatedCNN(module, width=8, hidden=8, rngs=nnx.Rngs(0))
    model.eval()  # traced abstractly (no compile): batch statistics must not be written from a tracer
    assert jax.eval_shape(lambda x: model(x), _images()).shape == (2, 10)


@pytest.mark.parametrize("kind", vm.TOKEN_BLOCKS)
def test_token_backbone_with_each_block_gives_logits(kind):
    """Catches a token block wired with the wrong grid (tokens vs image layout) or the wrong head."""
    model = vm.TokenNet(kind, dim=16, depth=1, heads=2, mlp_hidden=8, rngs=nnx.Rngs(0))
    out = jax.eval_shape(lambda x: model(x), _images())
    assert out.shape == (2, 10)


def test_se_is_x_times_sigmoid_of_excitation_hand_built():
    """Hand-built SE: catches a dropped sigmoid, sum instead of mean over H*W, pooling over channels instead
    of space, or a missing relu."""
    x = jax.random.uniform(jax.random.key(1), (1, 3, 3, 2), jnp.float32) + 0.5
    w1 = jnp.array([[1.0], [-2.0]])      # C=2 -> hidden 1
    b1 = jnp.array([0.3])
    w2 = jnp.array([[1.5, -0.5]])        # hidden 1 -> C=2
    b2 = jnp.array([0.1, 0.2])
    s = np.asarray(x).mean(axis=(1, 2))[0]                 # [2]
    h = max(0.0, s[0] * 1.0 + s[1] * -2.0 + 0.3)
    gate = 1 / (1 + np.exp(-(h * np.array([1.5, -0.5]) + np.array([0.1, 0.2]))))
    expected = np.asarray(x) * gate
    np.testing.assert_allclose(np.asarray(vm.squeeze_excite(x, w1, b1, w2, b2)), expected, rtol=1e-6, atol=1e-6)
    # relu matters here: pre-activation is negative, so hidden is 0 and the gate is sigmoid(b2)
    assert s[0] - 2 * s[1] + 0.3 < 0
    np.testing.assert_allclose(gate, 1 / (1 + np.exp(-np.array([0.1, 0.2]))), rtol=1e-6)


def test_se_gate_nonzero_hidden_case():
    """A positive pre-activation: catches a relu placed after the second layer instead of the first."""
    x = jax.random.uniform(jax.random.key(2), (2, 4, 4, 2), jnp.float32)
    w1, b1 = jnp.array([[2.0], [1.0]]), jnp.array([0.5])
    w2, b2 = jnp.array([[-1.0, 3.0]]), jnp.array([0.0, -1.0])
    s = np.asarray(x).mean(axis=(1, 2))
    h = np.maximum(0, s @ np.array([[2.0], [1.0]]) + 0.5)
    gate = 1 / (1 + np.exp(-(h @ np.array([[-1.0, 3.0]]) + np.array([0.0, -1.0]))))
    np.testing.assert_allclose(np.asarray(vm.se_gate(x, w1, b1, w2, b2))[:, 0, 0], gate, rtol=1e-6)


@pytest.mark.parametrize("path", sorted(glob.glob("configs/vision_*.py")))
def test_shipped_configs_match_their_target_within_5_percent(path):
    """Catches a row whose parameter count drifts from the table's common target (unfair comparison)."""
    cfg = vm.check_config(vm.load_config(path))
    hidden, params = vm.match_params(cfg)
    assert abs(params - cfg["target_params"]) <= 0.05 * cfg["target_params"]
    assert params == vm.count_params(nnx.eval_shape(lambda: vm.build_model(cfg, hidden)))


def test_shipped_configs_cover_every_module():
    """Catches a module of the table with no config (a blank row)."""
    names = {vm.load_config(p)["module"] for p in glob.glob("configs/vision_*.py")}
    assert names == set(vm.CNN_MODULES) | set(vm.TOKEN_BLOCKS)


def test_match_params_raises_when_target_unreachable():
    """Catches a matcher that silently returns a far-off count."""
    with pytest.raises(ValueError, match="target_params"):
        vm.match_params({"backbone": "cnn", "module": "plain", "width": 16, "target_params": 100})


def test_few_step_run_lowers_the_loss():
    """Catches a training step that does not update the parameters (or updates the wrong way)."""
    cfg = vm.check_config({"backbone": "tokens", "module": "vit", "width": 16, "depth": 1, "hidden": 16,
                           "steps": 40, "batch_size": 32, "lr": 1e-2, "seeds": (0,)})
    _, res = vm.train_one(cfg, 0)
    assert res["final_loss"] < res["first_loss"] - 0.2
    assert 0.0 <= res["test_top1"] <= 1.0


def test_batchnorm_module_trains_and_updates_running_stats():
    """ULSAM and the cnn backbone have BatchNorm: catches a step that drops the updated running statistics, and a
    model left in training mode (batch statistics) at test time: after training, eval logits of one image must not
    depend on the other images in the batch."""
    cfg = vm.check_config({"backbone": "cnn", "module": "ulsam", "width": 8, "hidden": 8, "steps": 2,
                           "batch_size": 8, "seeds": (0,)})
    model, _ = vm.train_one(cfg, 0)
    assert not np.allclose(np.asarray(model.mod1.bn_dw.mean[...]), 0.0)
    assert not np.allclose(np.asarray(model.norm0.mean[...]), 0.0)
    x = _images(3, seed=4)
    np.testing.assert_allclose(np.asarray(model(x[:1])), np.asarray(model(x))[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, key", [({"backbone": "cnn", "module": "plain", "widht": 8}, "widht"),
                                      ({"backbone": "cnn", "module": "vit"}, "module"),
                                      ({"backbone": "mlp", "module": "plain"}, "backbone"),
                                      ({"module": "plain"}, "backbone"),
                                      ({"backbone": "cnn", "module": "se", "steps": 0}, "steps"),
                                      ({"backbone": "cnn", "module": "se", "lr": -1.0}, "lr")])
def test_bad_config_raises_naming_the_key(bad, key):
    """Catches a typo'd or invalid config entry being ignored."""
    with pytest.raises(ValueError, match=key):
        vm.check_config(bad)


def test_gate_map_of_cnn_module_is_spatial():
    """Catches a map taken over the wrong axis (channels instead of space)."""
    model = vm.GatedCNN("ela", width=16, hidden=8, rngs=nnx.Rngs(0))
    amap, label = vm.gate_map(model, np.asarray(_images(1))[0])
    assert amap.shape == (16, 16) and "ELA" in label
    with pytest.raises(ValueError, match="images"):
        model(jnp.ones((1, 8, 8, 1)))


def test_cnn_batchnorm_follows_each_conv_and_normalises_over_batch_and_space():
    """Catches BatchNorm missing from one of the three convs (param count off by 2C), normalising over the wrong
    axis (per-channel statistics over B, H, W are mean 0, variance 1 at init in training mode), or placed after
    the relu (its output would be >= 0)."""
    def params(norm):
        return vm.count_params(vm.GatedCNN("plain", width=16, hidden=8, norm=norm, rngs=nnx.Rngs(0)))
    assert params("batch") - params("none") == 2 * (16 + 16 + 32)
    model = vm.GatedCNN("plain", width=8, hidden=8, rngs=nnx.Rngs(1))
    model.train()
    x = _images(4, seed=3)
    z = np.asarray(model.norm1(model.conv1(model.stem_out(x))))
    np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.var(axis=(0, 1, 2)), 1.0, atol=1e-2)
    assert (z < 0).any()


def test_bad_norm_raises_naming_it():
    """Catches a typo'd norm silently falling back to no normalisation."""
    with pytest.raises(ValueError, match="norm"):
        vm.check_config({"backbone": "cnn", "module": "plain", "norm": "layer"})
    with pytest.raises(ValueError, match="norm"):
        vm.GatedCNN("plain", width=8, hidden=8, norm="batchnorm", rngs=nnx.Rngs(0))


def test_fdconv_options_only_for_an_fdconv_row():
    """Catches FDConv arguments silently ignored on a row without FDConv."""
    with pytest.raises(ValueError, match="fdconv_options"):
        vm.check_config({"backbone": "cnn", "module": "plain", "fdconv_options": {"dft_scale": "unit"}})
    cfg = vm.check_config({"backbone": "cnn", "module": "fdconv_adam", "fdconv_options": {"dft_scale": "code"}})
    model = vm.build_model(cfg, 8)
    assert (model.conv1.dft_scale, model.conv1.filter_gate_init) == ("code", "one")   # the row's, then overridden


def test_fdconv_ablation_builds_each_variant(monkeypatch):
    """Each ablation variant's FDConv arguments reach both stage convs of the model it trains, on the fdconv
    row's head width. Catches the arguments dropped or applied to one conv only."""
    from train import fdconv_ablation
    seen = []

    def fake_train_one(cfg, seed, *, hidden=None, **_):
        model = vm.build_model(cfg, hidden, seed)
        assert hidden == vm.match_params(vm.check_config(vm.load_config("configs/vision_fdconv.py")))[0]
        seen.append((model.conv1.dft_scale, model.conv2.filter_gate_init, model.conv2.modulation))
        return model, {"test_top1": 0.5 + 0.1 * seed, "final_loss": 1.0}

    monkeypatch.setattr(vm, "train_one", fake_train_one)
    row = fdconv_ablation.run_variant("unit_filter_one", [0, 1])
    assert seen == [("unit", "one", True)] * 2
    assert row["mean"] == 55.0 and row["top1"] == [50.0, 60.0]
    fdconv_ablation.run_variant("static_code", [0])
    assert seen[-1] == ("code", "code", False)
    with pytest.raises(ValueError, match="variant"):
        fdconv_ablation.run_variant("bogus", [0])
