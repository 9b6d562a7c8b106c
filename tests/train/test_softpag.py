"""Machinery of ``train.softpag`` (P07 HeadHunter + SoftPAG on the DiT): a tiny untrained TinyDiT and an untrained
classifier, two sampler steps (never the trained checkpoint)."""
import os

import jax
import numpy as np
from flax import nnx

from jattn.nn.dit import TinyDiT
from train.diffusion import DiffusionSubject, make_noise_schedule
from train.digit_classifier import DigitCNN
from train.softpag import GuidedSampler, all_heads, run_experiment, score_images


_CACHE = {}


def _sampler():
    """One subject and compiled sampler shared by the tests (compilation dominates their time)."""
    if "sampler" not in _CACHE:
        _CACHE["sampler"] = GuidedSampler(_subject())
    return _CACHE["sampler"]


def _subject():
    model = TinyDiT(rngs=nnx.Rngs(0), image_size=8, patch_size=4, dim=16, depth=1, num_heads=2)
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    # random weights everywhere (adaLN-Zero would otherwise make every block the identity and eps = 0)
    nnx.update(model, jax.tree.unflatten(tree, [l + 0.2 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]))
    return DiffusionSubject(model, make_noise_schedule("linear", 20), {})


def test_sampler_u0_equals_cfg_and_u1_differs():
    """The PAG path with u=0 reproduces plain CFG from the same noise, and u=1 on all heads changes the samples
    (catches the perturbed branch not reaching the sampler, or the guidance term with a wrong sign of zero)."""
    sampler = _sampler()
    labels = np.arange(10, dtype=np.int32)
    heads = all_heads(sampler.depth, sampler.num_heads)
    cfg = sampler.sample(labels, seed=3, steps=2, w_cfg=2.0)
    u0 = sampler.sample(labels, seed=3, steps=2, w_cfg=2.0, w_pag=1.5, heads=heads, u=0.0)
    u1 = sampler.sample(labels, seed=3, steps=2, w_cfg=2.0, w_pag=1.5, heads=heads, u=1.0)
    np.testing.assert_allclose(u0, cfg, rtol=1e-5, atol=1e-5)
    assert np.abs(u1 - cfg).max() > 1e-3
    assert cfg.shape == (10, 8, 8, 1) and cfg.min() >= 0 and cfg.max() <= 1


def test_score_images_hand_values():
    """Log-prob and accuracy of a classifier whose logits are known (catches scoring the argmax instead of the
    target class)."""
    class Fixed:
        def __call__(self, images):
            return np.tile(np.log(np.array([0.7, 0.2, 0.1], np.float32)), (len(images), 1))

    out = score_images(Fixed(), np.zeros((2, 8, 8, 1)), np.array([0, 1]))
    np.testing.assert_allclose(out["logp"], (np.log(0.7) + np.log(0.2)) / 2, rtol=1e-5)
    assert out["accuracy"] == 0.5 and out["per_class"] == [1.0, 0.0]


def test_run_experiment_end_to_end(tmp_path):
    """The whole experiment runs on a tiny subject: HeadHunter selects rounds*k heads, every condition reports
    accuracies in [0, 1] with the right network-evaluation counts, and the before/after grid is written."""
    sampler = _sampler()
    classifier = DigitCNN(rngs=nnx.Rngs(2), image_size=8)
    grid = os.path.join(tmp_path, "g.png")
    report = run_experiment(sampler.subject, classifier, steps=2, rounds=1, k=1, search_per_class=1, per_class=1,
                            seeds=1, grid=grid, log=lambda s: None, sampler=sampler)
    assert len(report["search"]["selected"]) == 1 and report["search"]["evaluations"] == 2
    res = report["results"]
    assert set(res) == {"cfg", "cfg_hi", "cfg_eqnfe", "cfg_pag_all", "cfg_softpag_hh"}
    assert res["cfg"]["nfe_per_image"] == 4 and res["cfg_pag_all"]["nfe_per_image"] == 6
    assert res["cfg_eqnfe"]["steps"] == 3 and res["cfg_pag_all"]["heads"] == 2
    assert all(0.0 <= r["accuracy_mean"] <= 1.0 for r in res.values())
    assert os.path.getsize(grid) > 0
