"""train.segmentation: the shapes segmentation task, mean IoU and the U-Net with each context module."""
import glob
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train import segmentation as S
from train.config import config_runner, read_config
from train.images import shapes


def test_targets_label_each_object_by_kind():
    """Catches: kinds off by one (background clashing with circles), a mask ignored."""
    data = shapes(3, seed=1)
    labels = S.segmentation_targets(data)
    for i in range(3):
        for j in range(data.counts[i]):
            assert np.all(labels[i][data.masks[i, j]] == 1 + data.kinds[i, j])
        assert np.all(labels[i][~data.masks[i].any(0)] == 0)


def test_mean_iou_on_hand_built_maps():
    """Per-class IoU |A and B| / |A or B|, absent classes count 1. Catches: a mean over pixels (accuracy) or a
    per-image mean, intersection over the prediction only."""
    labels = np.array([[0, 0, 1, 1], [2, 2, 0, 0]])
    predicted = np.array([[0, 1, 1, 1], [2, 0, 0, 0]])
    miou, per_class = S.mean_iou(predicted, labels)
    np.testing.assert_allclose(per_class, [3 / 5, 2 / 3, 1 / 2, 1.0])
    assert miou == pytest.approx(np.mean([3 / 5, 2 / 3, 1 / 2, 1.0]))
    assert S.mean_iou(labels, labels)[0] == 1.0


@pytest.mark.parametrize("variant", S.VARIANTS)
def test_every_variant_keeps_the_grid(variant):
    model = S.SegUNet(variant, width=8, rngs=nnx.Rngs(0))
    model.eval()
    assert model(jnp.ones((1, 16, 16, 3))).shape == (1, 16, 16, S.NUM_CLASSES)


def test_controls_match_their_modules_parameters():
    """The parameter-matched controls stay within 5 % of the module they control (and SE/gates of plain)."""
    count = {v: S.parameter_count(S.SegUNet(v, width=8, rngs=nnx.Rngs(0))) for v in S.VARIANTS}
    for a, b in (("se", "plain"), ("gates", "plain"), ("convs2", "dappm"), ("convs4", "dual"), ("bfp", "sdanet"),
                 ("pw2", "psa"), ("pw2", "psa_seq")):
        assert abs(count[a] / count[b] - 1) < 0.05, (a, b, count)


def test_level_fusion_starts_as_the_identity_and_then_reaches_every_level():
    """``sdanet`` / ``bfp``: the zero-initialised back-projections make the fused levels equal the inputs at init
    (the variant starts as ``plain``); once they are non-zero every level changes, and the attention neck differs
    from the plain balanced pyramid. Catches: a level not redistributed, the neck skipped, a non-zero init."""
    levels = [jnp.asarray(np.random.default_rng(i).normal(size=(2, 16 // 2 ** i, 16 // 2 ** i, 4 * 2 ** i)),
                          jnp.float32) for i in range(3)]
    outs = {}
    for attention in (True, False):
        fusion = S.LevelFusion((4, 8, 16), 8, attention=attention, rngs=nnx.Rngs(0))
        for x, y in zip(levels, fusion(levels)):
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
        for i, back in enumerate(fusion.back):
            back.kernel[...] = jnp.asarray(np.random.default_rng(10 + i).normal(size=back.kernel.shape), jnp.float32)
        outs[attention] = fusion(levels)
        for x, y in zip(levels, outs[attention]):
            assert y.shape == x.shape and float(jnp.max(jnp.abs(y - x))) > 1e-3
    assert float(jnp.max(jnp.abs(outs[True][0] - outs[False][0]))) > 1e-3


def test_the_sdanet_neck_trains_a_few_steps():
    """The P10 neck inside the U-Net takes gradient steps through its back-projections, non-local attention and
    level gathering without NaN (the machinery only; the PSA variants are plain bottleneck modules, built and run by
    the grid test above)."""
    row = S.train_run("sdanet", seed=0, width=4, steps=2, batch=4, lr=1e-2, train_images=8, eval_images=8, size=16)
    assert np.isfinite(row["final_loss"]) and 0.0 <= row["miou"] <= 1.0


def test_a_short_run_runs_end_to_end():
    """The experiment's machinery: a few steps fall well below the uniform loss ln 4 and find the background
    (the real comparison is ``python -m train.segmentation``, a make target)."""
    row = S.train_run("plain", seed=0, width=4, steps=30, batch=8, lr=1e-2, train_images=32, eval_images=16,
                      size=16)
    assert row["final_loss"] < 0.5 * np.log(4) and row["per_class_iou"][0] > 0.8 and row["params"] > 0


def test_bad_variant_names_itself():
    with pytest.raises(ValueError, match="variant must be one of"):
        S.SegUNet("attention", rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- configs, CLI, FLOPs and maps (issue 18 table)
SEG_CONFIGS = sorted(glob.glob("configs/segmentation_*.py"))


def test_every_variant_has_one_config_that_names_it_with_the_table_settings():
    """Each configs/segmentation_<v>.py names train.segmentation as its RUNNER, selects exactly variant <v> and
    keeps the table's settings (DEFAULTS: 300 steps, seeds 0,1,2, ...). Catches: a config naming another variant
    (a copy-paste), a missing row, a setting that silently departs from the published table."""
    assert len(SEG_CONFIGS) == len(S.VARIANTS)
    named = set()
    for path in SEG_CONFIGS:
        assert config_runner(path) == "train.segmentation", path
        cfg = S.check_config(read_config(path))
        variant = path[len("configs/segmentation_"):-3]
        assert cfg["variants"] == variant and variant in S.VARIANTS, path
        assert {k: cfg[k] for k in S.DEFAULTS if k != "variants"} == \
            {k: v for k, v in S.DEFAULTS.items() if k != "variants"}, path
        named.add(variant)
    assert named == set(S.VARIANTS)


@pytest.mark.parametrize("bad, match", [({"stpes": 3}, "unknown config key"), ({"variants": "psa,attn"}, "variants"),
                                        ({"seeds": "0,x"}, "seeds"), ({"size": 30}, "size"), ({"lr": 0}, "lr")])
def test_bad_config_raises_naming_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        S.check_config(bad)


def test_python_m_train_config_runs_the_row_and_writes_its_map(tmp_path, monkeypatch):
    """``python -m train --config configs/segmentation_se.py`` reaches train.segmentation (RUNNER) and flags
    override the file: one seed of the se row only, with the overridden sizes, then a JSON row with FLOPs and the
    PNG. Catches: --config not read (all 12 variants would run), flags not overriding it, the map or FLOPs not
    produced. The training itself is stubbed (its compile takes tens of seconds; real steps are covered by
    test_a_short_run_runs_end_to_end): ``train_model`` returns a fresh model and records its arguments."""
    from train.cli import main as cli_main
    calls = []

    def fake_train_model(variant, *, seed, **kw):
        calls.append((variant, seed, kw))
        model = S.SegUNet(variant, width=kw["width"], rngs=nnx.Rngs(params=seed, dropout=seed + 1))
        model.eval()
        return model, {"variant": variant, "seed": seed, "miou": 0.5, "per_class_iou": [0.5] * 4, "final_loss": 1.0,
                       "params": S.parameter_count(model), "seconds": 0.1, "ms_per_step": 1.0}

    monkeypatch.setattr(S, "train_model", fake_train_model)
    out, img = tmp_path / "seg.json", tmp_path / "img"
    rc = cli_main(["--config", "configs/segmentation_se.py", "--steps", "2", "--seeds", "0", "--width", "4",
                   "--size", "16", "--out", str(out), "--img", str(img)])
    assert rc == 0
    assert calls == [("se", 0, {"width": 4, "steps": 2, "batch": 16, "lr": 3e-3, "train_images": 1024,
                                "eval_images": 256, "size": 16})]
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["rows"]] == ["se"] and result["args"]["name"] == "segmentation_se"
    assert result["summary"]["se"]["flops"] > 0
    assert (img / "seg_se.png").stat().st_size > 1000


def test_attention_maps_are_the_modules_own_distributions():
    """On a fresh model: AG coefficients lie in (0, 1) at each skip's size; PAM's attention row and CAM's affinity
    rows sum to 1 (softmax over positions / channels); SDANet's level weights sum to 1 over the 3 levels; PSA and SE
    gates lie in (0, 1) with one value per bottleneck channel. Catches: a softmax over the wrong axis, a map taken
    at the wrong level, a gate read before its sigmoid."""
    image = np.random.default_rng(0).uniform(0, 1, (16, 16, 3)).astype(np.float32)
    panels = {}
    for variant in S.MAP_VARIANTS:
        model = S.SegUNet(variant, width=4, rngs=nnx.Rngs(params=0, dropout=1))
        panels[variant] = S.attention_maps(model, image)
    a1, a2 = (p["map"] for p in panels["gates"])
    assert a1.shape == (16, 16) and a2.shape == (8, 8) and 0 < a1.min() and a1.max() < 1
    row, received, affinity = (p["map"] for p in panels["dual"])
    assert row.shape == (4, 4) and np.isclose(row.sum(), 1, atol=1e-5) and np.isclose(received.sum(), 1, atol=1e-5)
    np.testing.assert_allclose(affinity.sum(-1), 1, atol=1e-5)
    gate, levels = (p["map"] for p in panels["sdanet"])
    assert gate.shape == (8, 8) and levels.shape[0] == 3
    np.testing.assert_allclose(levels.sum(0), 1, atol=1e-5)
    for variant in ("psa", "psa_seq"):
        sp, ch = panels[variant]
        assert sp["map"].shape == (4, 4) and len(ch["bars"]) == 16 and 0 < ch["bars"].min() and ch["bars"].max() < 1
    assert len(panels["se"][0]["bars"]) == 16
    with pytest.raises(ValueError, match="variant must be one of"):
        S.attention_maps(S.SegUNet("plain", width=4, rngs=nnx.Rngs(0)), image)
