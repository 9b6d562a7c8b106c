"""train.diffusion and train.digit_classifier: schedule, q(x_t|x_0), DDIM/DDPM updates, guidance, class
dropout, a short training run, the load_dit round trip, the classifier, bad arguments."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.nn.dit import TinyDiT
from train import diffusion as D
from train import digit_classifier as C
from train.loop import read_jsonl

TINY_MODEL = {"kind": "dit", "image_size": 16, "channels": 1, "patch_size": 4, "dim": 16, "depth": 1,
              "num_heads": 2, "num_classes": 10}


def _oracle(x0, alpha_bars):
    """The epsilon a perfect model predicts when the data is the single point ``x0``."""
    ab = jnp.asarray(alpha_bars, jnp.float32)

    def eps_fn(x, t):
        a = ab[t].reshape(-1, 1, 1, 1)
        return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
    return eps_fn


@pytest.mark.parametrize("kind", D.SCHEDULE_KINDS)
def test_alpha_bar_is_monotone_in_zero_one(kind):
    """Catches betas accumulated as a sum (or alphas not multiplied): alpha_bar must fall strictly."""
    s = D.make_noise_schedule(kind, 200)
    ab = s.alpha_bars
    assert np.all(np.diff(ab) < 0) and 0 < ab[-1] < ab[0] < 1
    np.testing.assert_allclose(ab, np.cumprod(1 - s.betas))
    if kind == "linear":
        np.testing.assert_allclose(s.betas[[0, -1]], [1e-4, 0.02])
    else:
        assert ab[-1] < 1e-3


def test_q_sample_matches_the_closed_form():
    """Catches sqrt dropped from alpha_bar, or the noise weighted by beta instead of sqrt(1 - alpha_bar)."""
    s = D.make_noise_schedule("linear", 1000)
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (3, 4, 4, 1)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 499, 999])
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(D.q_sample(s.alpha_bars, x0, t, noise), np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise,
                               rtol=1e-5, atol=1e-6)
    # and the marginal's variance over many noises is 1 - alpha_bar (x0 = 0)
    many = D.q_sample(s.alpha_bars, np.zeros((4000, 1, 1, 1), np.float32), np.full(4000, 300),
                      rng.standard_normal((4000, 1, 1, 1)).astype(np.float32))
    np.testing.assert_allclose(np.var(many), 1 - s.alpha_bars[300], rtol=0.08)


def test_ddim_with_an_oracle_epsilon_recovers_x0_exactly():
    """Catches a wrong DDIM update (e.g. sqrt(1 - ab_t) instead of sqrt(1 - ab_prev) on eps, or a missing
    sqrt on ab_prev): with the true eps every step lands on q(x_prev | x0) and the end is x0."""
    s = D.make_noise_schedule("linear", 1000)
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.uniform(-0.9, 0.9, (2, 4, 4, 1)), jnp.float32)
    x_T = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    out = D.ddim_sample(_oracle(x0, s.alpha_bars), x_T, s, steps=10, clip=False)
    np.testing.assert_allclose(out, x0, atol=2e-4)
    # one step: x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps, the same eps
    eps = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    a, a_prev = 0.3, 0.7
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    x_prev, x0_hat = D.ddim_step(x_t, eps, a, a_prev)
    np.testing.assert_allclose(x0_hat, x0, atol=1e-5)
    np.testing.assert_allclose(x_prev, np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps, atol=1e-5)


def test_ddpm_step_is_the_gaussian_posterior_and_the_oracle_chain_ends_at_x0():
    """Catches wrong posterior coefficients or variance in the ancestral step: compared with the posterior
    q(x_{t-1} | x_t, x0) derived independently by Gaussian conditioning."""
    s = D.make_noise_schedule("linear", 100)
    rng = np.random.default_rng(2)
    x0 = jnp.asarray(rng.uniform(-0.9, 0.9, (2, 4, 4, 1)), jnp.float32)
    t = 40
    beta, ab, ab_prev = s.betas[t], s.alpha_bars[t], s.alpha_bars[t - 1]
    x_t = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    eps = _oracle(x0, s.alpha_bars)(x_t, jnp.full((2,), t))
    var = 1.0 / (1.0 / (1 - ab_prev) + (1 - beta) / beta)
    mean = var * (np.sqrt(ab_prev) * x0 / (1 - ab_prev) + np.sqrt(1 - beta) * x_t / beta)
    np.testing.assert_allclose(D.ddpm_step(x_t, eps, beta, ab, ab_prev, clip=False), mean, rtol=1e-4, atol=1e-5)
    z = jnp.ones_like(x0)
    np.testing.assert_allclose(D.ddpm_step(x_t, eps, beta, ab, ab_prev, noise=z, clip=False) - mean,
                               np.sqrt(var) * z, rtol=1e-3, atol=1e-5)
    out = D.ddpm_sample(_oracle(x0, s.alpha_bars), x_t, s, key=jax.random.key(0), clip=False)
    np.testing.assert_allclose(out, x0, atol=5e-4)   # float32: the last step divides by 1 - ab_0 = 1e-4


def _trained_like_dit(seed=0):
    model = TinyDiT(rngs=nnx.Rngs(seed), **{k: v for k, v in TINY_MODEL.items() if k != "kind"})
    keys = iter(jax.random.split(jax.random.key(seed + 1), 16))
    for layer in [b.adaLN for b in model.blocks] + [model.final_adaLN, model.final_linear]:
        layer.kernel.value = jax.random.normal(next(keys), layer.kernel.value.shape) * 0.3
    return model


def test_guidance_zero_and_one_are_the_unconditional_and_conditional_predictions():
    """Catches a swapped guidance formula (w weighting the unconditional term) or a wrong null label."""
    model = _trained_like_dit()
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((3, 16, 16, 1)), jnp.float32)
    t, y = jnp.array([5, 500, 900]), jnp.array([1, 4, 7])
    cond, uncond = model(x, t, y), model(x, t, jnp.full((3,), 10))
    assert float(jnp.max(jnp.abs(cond - uncond))) > 1e-4
    np.testing.assert_allclose(D.model_eps_fn(model, y, 0.0)(x, t), uncond, atol=1e-5)
    np.testing.assert_allclose(D.model_eps_fn(model, y, 1.0)(x, t), cond, atol=1e-5)
    np.testing.assert_allclose(D.model_eps_fn(model, y, 3.0)(x, t), uncond + 3 * (cond - uncond), atol=1e-4)


def test_class_dropout_rate_and_batches():
    """Catches class dropout at the wrong rate (or to the wrong label), and batches that are not a pure
    function of (seed, step)."""
    np.testing.assert_array_equal(D.drop_labels(np.array([1, 2, 3]), np.array([0.05, 0.5, 0.09]), 0.1, 10),
                                  [10, 2, 10])
    task = D.DigitDiffusionTask(D.make_noise_schedule("linear", 1000), p_uncond=0.1)
    labels = np.concatenate([task.batch(0, s, 500)["labels"] for s in range(4)])
    assert abs(np.mean(labels == 10) - 0.1) < 0.03
    batch = task.batch(0, 7, 8)
    assert batch["x0"].shape == (8, 16, 16, 1) and batch["x0"].min() >= -1 and batch["x0"].max() <= 1
    assert batch["x0"].min() < -0.99 and batch["x0"].max() > 0.5   # scaled from [0, 1] to [-1, 1]
    for key, value in task.batch(0, 7, 8).items():
        np.testing.assert_array_equal(value, batch[key])
    none = D.DigitDiffusionTask(D.make_noise_schedule("linear", 1000), p_uncond=0.0)
    assert not np.any(none.batch(0, 0, 500)["labels"] == 10)


def test_training_lowers_the_loss_and_load_dit_round_trips(tmp_path):
    """Catches a loss that does not train (wrong target, detached model) and a checkpoint that loses or
    mixes up parameters."""
    config = {"seed": 0, "name": "dit_test", "model": TINY_MODEL,
              "diffusion": {"schedule": "linear", "num_steps": 100, "p_uncond": 0.1},
              "optim": {"lr": 3e-3, "warmup_steps": 0, "weight_decay": 0.0},
              "train": {"steps": 30, "batch_size": 32, "log_every": 1, "checkpoint_every": 0,
                        "eval_batches": 0, "progress": False}}
    subject = D.train_dit(config, str(tmp_path / "dit"), quiet=True)
    losses = [r["loss"] for r in read_jsonl(str(tmp_path / "dit" / "metrics.jsonl")) if r["split"] == "train"]
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
    loaded = D.load_dit(str(tmp_path / "dit"))
    assert loaded.schedule.num_steps == 100 and loaded.config["model"] == TINY_MODEL
    for a, b in zip(jax.tree.leaves(nnx.state(subject.model, nnx.Param)),
                    jax.tree.leaves(nnx.state(loaded.model, nnx.Param)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    images = loaded.sample(np.array([0, 3]), seed=1, guidance=2.0, steps=3)
    assert images.shape == (2, 16, 16, 1) and 0 <= images.min() and images.max() <= 1


def test_classifier_beats_chance_after_a_short_fit_and_scores_per_class(tmp_path):
    """Catches a classifier that does not learn, a lost save/load, and per-class accuracy on the wrong axis."""
    clf = C.fit_classifier(steps=40, seed=0)
    assert clf.test_accuracy > 0.4        # chance is 0.1
    C.save_classifier(clf, str(tmp_path / "clf"))
    loaded = C.load_classifier(str(tmp_path / "clf"))
    assert loaded.test_accuracy == clf.test_accuracy
    data = C.digits(16)
    images, labels = data.test_images[:60], data.test_labels[:60]
    np.testing.assert_array_equal(loaded.predict(images), clf.predict(images))
    acc = C.classify_samples(images, labels, loaded)
    assert acc.shape == (10,)
    correct = clf.predict(images) == labels
    for c in range(10):
        np.testing.assert_allclose(acc[c], correct[labels == c].mean())
    # samples generated "for" a wrong class score 0 where the classifier is right
    wrong = C.classify_samples(images[:1], np.array([(labels[0] + 1) % 10]), loaded)
    assert np.nansum(wrong) == 0.0 and np.isnan(wrong).sum() == 9


def test_save_grid_writes_one_row_per_class(tmp_path):
    """Catches a grid of the wrong layout (rows and columns swapped)."""
    from PIL import Image
    images = np.random.default_rng(0).uniform(0, 1, (6, 4, 4, 1))
    path = D.save_grid(images, str(tmp_path / "g.png"), nrow=2, scale=2, pad=1)
    assert Image.open(path).size == (2 * (3 * 5 + 1), 2 * (2 * 5 + 1))


def test_bad_arguments_raise_naming_them(tmp_path):
    """Catches silently accepted bad schedules, samplers, guidance, paths and labels."""
    with pytest.raises(ValueError, match="kind"):
        D.make_noise_schedule("quadratic")
    with pytest.raises(ValueError, match="num_steps"):
        D.make_noise_schedule("linear", 1)
    with pytest.raises(ValueError, match="beta_start"):
        D.make_noise_schedule("linear", 10, beta_start=0.5, beta_end=0.1)
    with pytest.raises(ValueError, match="steps"):
        D.ddim_timesteps(10, 11)
    with pytest.raises(ValueError, match="p_uncond"):
        D.drop_labels(np.array([1]), np.array([0.5]), 1.5, 10)
    with pytest.raises(TypeError, match="schedule"):
        D.DigitDiffusionTask("linear")
    model = _trained_like_dit()
    s = D.make_noise_schedule("linear", 10)
    with pytest.raises(ValueError, match="sampler"):
        D.sample(model, s, np.array([1]), sampler="euler")
    with pytest.raises(ValueError, match="guidance"):
        D.sample(model, s, np.array([1]), guidance=-1.0)
    with pytest.raises(ValueError, match="labels"):
        D.sample(model, s, np.array([11]))
    with pytest.raises(ValueError, match="key"):
        D.ddpm_sample(lambda x, t: x, jnp.zeros((1, 2, 2, 1)), s, key=None)
    with pytest.raises(FileNotFoundError, match="path"):
        D.load_dit(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="labels"):
        C.classify_samples(np.zeros((2, 16, 16, 1)), np.array([0, 10]), C.DigitCNN(rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="steps"):
        C.fit_classifier(steps=0)
    with pytest.raises(ValueError, match="nrow"):
        D.save_grid(np.zeros((2, 4, 4, 1)), str(tmp_path / "x.png"), nrow=0)
