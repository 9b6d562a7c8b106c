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
