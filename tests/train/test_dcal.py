"""Machinery of the P23 DCAL digits experiment (train/dcal.py): config checking, the wrapped tokens ViT, a
two-step run of the full DCAL variant, the summary table."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train import dcal as T

TINY = {"width": 8, "depth": 1, "heads": 2, "hidden": 8, "patch": 4, "glca_ratio": 0.25, "steps": 2,
        "batch_size": 4, "seeds": (0,), "variants": ("plain", "dcal")}


def test_shipped_config_passes_the_checker_and_defaults_fill():
    """The shipped config is complete (catches a key the runner would silently ignore)."""
    cfg = T.check_config(T.load_config("configs/dcal_digits.py"))
    assert cfg["variants"] == ("plain", "glca", "pwca", "dcal") and len(cfg["seeds"]) >= 3
    assert T.check_config({"seeds": "0,1"})["seeds"] == (0, 1)


@pytest.mark.parametrize("bad, match", [
    ({"stpes": 3}, "unknown config key"),
    ({"variants": ("plain", "sa")}, "variants"),
    ({"heads": 3}, "heads"),
    ({"glca_ratio": 1.5}, "glca_ratio"),
    ({"batch_size": 1}, "batch_size"),
    ({"patch": 3}, "size"),
])
def test_bad_config_raises_naming_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        T.check_config(bad)


def test_wrapped_vit_shares_the_tokennet_blocks_and_classifies_from_cls():
    """The DCAL wrapper drives TokenNet's own blocks, norm and head (catches a copy with fresh weights, which
    would make the 'plain' row a different model from issue 18's ViT)."""
    cfg = T.check_config(TINY)
    model = T.DCALDigits("dcal", cfg, rngs=nnx.Rngs(0))
    assert model.dcal.blocks[0] is model.net.blocks[0] and model.dcal.head is model.net.head
    x = jax.random.uniform(jax.random.key(0), (3, 16, 16, 1))
    out = jax.eval_shape(lambda x: model.branch_logits(x, train=True), x)
    assert {k: v.shape for k, v in out.items()} == {"sa": (3, 10), "glca": (3, 10), "pwca": (3, 10)}
    assert jax.eval_shape(model, x).shape == (3, 10)


def test_two_step_run_and_table(monkeypatch):
    """A 2-step DCAL run gives finite losses, accuracies in [0, 1] and a table row per variant (catches a broken
    train step, e.g. PWCA given at test time or the loss weights not trained). Real digits, cut to 48 / 24 images
    so that prediction compiles one shape."""
    full = T.digits(16)
    small = types.SimpleNamespace(train_images=full.train_images[:48], train_labels=full.train_labels[:48],
                                  test_images=full.test_images[:24], test_labels=full.test_labels[:24])
    monkeypatch.setattr(T, "digits", lambda size: small)
    cfg = T.check_config(TINY)
    _, res = T.train_variant(cfg, "dcal", 0)
    assert np.isfinite(res["first_loss"]) and np.isfinite(res["final_loss"])
    assert 0.0 <= res["test_top1"] <= 1.0 and 0.0 <= res["train_top1"] <= 1.0
    assert set(res["final_ce"]) == {"sa", "glca", "pwca"} and any(w != 0.0 for w in res["loss_w"])
    summary = {"rows": {"dcal": {"runs": [res], "params_inference": res["params_inference"], "ms_per_step": 1.0,
                                 **{k: (res[k], 0.0) for k in ("test_top1", "test_top1_sa_head", "train_top1")},
                                 "gap": (0.0, 0.0)}}}
    table = T.format_table(summary)
    assert "| dcal |" in table and table.count("\n") == 2


def test_inference_flops_count_glca_but_never_pwca():
    """The FLOPs column is the inference pass: PWCA is training-only, so the pwca row costs exactly the plain row,
    and GLCA (one extra block on the selected queries) costs more. Catches: PWCA run at test time, GLCA left out
    of the inference scores."""
    cfg = T.check_config(TINY)
    flops = {v: T.forward_flops(T.DCALDigits(v, cfg, rngs=nnx.Rngs(0)), cfg["size"]) for v in ("plain", "pwca", "glca")}
    assert flops["pwca"] == flops["plain"] and flops["glca"] > flops["plain"] > 0


def test_glca_map_boxes_the_top_r_patches_of_the_rollout(tmp_path):
    """The cells the map boxes are the R = floor(16 * 0.25) = 4 largest entries of the rollout's CLS row over the
    patches (CLS itself excluded), and each block's CLS attention over the patches is a part of a softmax row
    (in (0, 1]). Catches: the CLS column ranked as a patch (an off-by-one in the grid cells), the wrong rollout row.
    Also writes the PNG."""
    cfg = T.check_config(TINY)
    model = T.DCALDigits("glca", cfg, rngs=nnx.Rngs(3))
    image = np.random.default_rng(0).uniform(0, 1, (16, 16, 1)).astype(np.float32)
    m = T.glca_maps(model, image)
    assert m["rollout"].shape == (4, 4) and len(m["selected"]) == 4 and len(m["cls_attention"]) == cfg["depth"]
    top = np.argsort(-m["rollout"].ravel())[:4]
    assert sorted(r * 4 + c for r, c in m["selected"]) == sorted(top.tolist())
    for att in m["cls_attention"]:
        assert att.shape == (4, 4) and 0 < att.sum() <= 1 + 1e-5
    T.save_glca_png({"glca": model}, cfg, str(tmp_path / "dcal_glca.png"))
    assert (tmp_path / "dcal_glca.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="GLCA branch"):
        T.glca_maps(T.DCALDigits("plain", cfg, rngs=nnx.Rngs(0)), image)
