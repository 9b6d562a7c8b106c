"""P30 AFA: the per-pixel softmax over models (hand-built weights), the zero-initialised aggregator = the
experts' mean at every insertion point, identical experts = that expert under any weights, weights summing to
1 per token, the frozen-expert training step, and the errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jattn.methods.generative import afa
from jattn.nn.dit import TinyDiT, modulate
from tests.conftest import assert_close, build_module, random_array

SMALL = dict(image_size=8, channels=1, patch_size=4, dim=16, depth=2, num_heads=2, num_classes=3, freq_dim=16)


def expert(seed):
    """A TinyDiT with every parameter random (the zero-initialised adaLN/output layers included)."""
    return build_module(lambda: TinyDiT(rngs=nnx.Rngs(0), **SMALL), seed=seed, scale=0.3)


def inputs(seed=0, B=2):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((B, 8, 8, 1)), jnp.float32), jnp.asarray(rng.integers(0, 1000, B)),
            jnp.asarray(rng.integers(0, 4, B), jnp.int32))


def random_ensemble(seed, num_models=2):
    """An AFAEnsemble whose aggregators (logits head included) are random: weights far from uniform."""
    template = TinyDiT(rngs=nnx.Rngs(0), **SMALL)
    return build_module(lambda: afa.AFAEnsemble(template, num_models, hidden=8, num_heads=2, rngs=nnx.Rngs(0)),
                        seed=seed, scale=0.5)


def call(module, *args, **kwargs):
    """``module(*args, **kwargs)`` under nnx.jit (one compile beats eager dispatch of every small op)."""
    return nnx.jit(lambda m, *a: m(*a, **kwargs))(module, *args)


def test_zero_logits_give_exactly_the_mean_of_the_experts():
    """Catches a sum instead of a mean (weights not normalised) and a softmax over the channel axis."""
    features = random_array(0, 3, 2, 5, 4)
    mixed, weights = afa.spatial_softmax_aggregate(features, jnp.zeros((3, 2, 5)))
    assert_close(mixed, jnp.mean(features, axis=0))
    np.testing.assert_allclose(np.asarray(weights), 1 / 3, rtol=1e-6)


def test_hand_built_logits_weight_each_pixel_separately():
    """logits (0, log 3) at pixel 0 and (log 3, 0) at pixel 1 give weights 1/4, 3/4 and 3/4, 1/4 there.
    Catches weights shared across pixels (a per-image softmax) and a softmax over pixels instead of models."""
    features = random_array(1, 2, 1, 2, 3)
    logits = jnp.asarray([[[0.0, np.log(3.0)]], [[np.log(3.0), 0.0]]], jnp.float32)
    mixed, weights = afa.spatial_softmax_aggregate(features, logits)
    f = np.asarray(features)
    np.testing.assert_allclose(np.asarray(weights)[:, 0], [[0.25, 0.75], [0.75, 0.25]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mixed)[0, 0], 0.25 * f[0, 0, 0] + 0.75 * f[1, 0, 0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mixed)[0, 1], 0.75 * f[0, 0, 1] + 0.25 * f[1, 0, 1], rtol=1e-5)


def test_identical_features_pass_through_under_any_logits():
    """A convex combination of equal features is that feature (catches un-normalised or negative weights)."""
    one = random_array(2, 2, 6, 4)
    mixed, _ = afa.spatial_softmax_aggregate(jnp.stack([one, one, one]), 3.0 * random_array(3, 3, 2, 6))
    assert_close(mixed, one)


def test_fresh_aggregator_is_the_mean_and_a_trained_one_has_per_token_weights_summing_to_one():
    """A new SABWAggregator (zero logits head) returns the experts' mean with uniform weights; with a random
    head the weights differ across tokens yet sum to 1 per token (catches a non-zero initial head and a
    softmax over tokens)."""
    agg = afa.SABWAggregator(2, 16, hw=(2, 2), temb_dim=16, hidden=8, num_heads=2, rngs=nnx.Rngs(0))
    features, temb = random_array(4, 2, 3, 4, 16), random_array(5, 3, 16)
    mixed, weights = call(agg, features, temb)
    assert weights.shape == (3, 2, 4)
    assert_close(mixed, jnp.mean(features, axis=0))
    np.testing.assert_allclose(np.asarray(weights), 0.5, rtol=1e-6)
    agg.logits.kernel[...] = random_array(6, 8, 2)
    _, weights = call(agg, features, temb)
    np.testing.assert_allclose(np.asarray(weights.sum(axis=1)), 1.0, rtol=1e-5)
    assert float(jnp.std(weights[:, 0], axis=-1).min()) > 1e-3     # varies over the tokens of each image


def test_zero_init_ensemble_feeds_every_block_the_mean_of_the_experts_features():
    """A fresh AFAEnsemble equals the hand-written 'average the features after the embedding, after every
    block and on the output, feed the average to every expert' forward. Catches each expert continuing from
    its own hidden state, a missing aggregation point, or a mean of the final eps taken after unpatchify of
    only one expert."""
    experts = [expert(10), expert(11)]
    ensemble = afa.AFAEnsemble(experts[0], 2, hidden=8, num_heads=2, rngs=nnx.Rngs(1))
    x, t, y = inputs(1)
    conds = [e.condition(t, y) for e in experts]
    h = sum(e.patch_embed(e.patchify(x)) + e.pos_embed[...] for e in experts) / 2
    for i in range(SMALL["depth"]):
        h = sum(e.blocks[i](h, c) for e, c in zip(experts, conds)) / 2
    outs = []
    for e, c in zip(experts, conds):
        shift, scale = jnp.split(e.final_adaLN(c), 2, axis=-1)
        outs.append(e.final_linear(modulate(e.final_norm(h), shift, scale)))
    expected = experts[0].unpatchify(sum(outs) / 2)
    eps, weights = call(ensemble, experts, x, t, y, return_weights=True)
    assert_close(eps, expected)
    assert len(weights) == SMALL["depth"] + 2
    # ... and differs from the plain output average (feature averaging is not output averaging)
    assert float(jnp.abs(eps - 0.5 * (experts[0](x, t, y) + experts[1](x, t, y))).max()) > 1e-3


def test_identical_experts_give_that_expert_under_any_aggregator_weights():
    """Two copies of one DiT ensembled with random (non-uniform) aggregators reproduce the DiT exactly.
    Catches un-normalised weights anywhere in the chain and a temb that is not the experts' mean."""
    one = expert(12)
    ensemble = random_ensemble(13)
    x, t, y = inputs(2)
    eps, weights = call(ensemble, [one, one], x, t, y, return_weights=True)
    assert_close(eps, one(x, t, y), factor=10.0)
    assert float(jnp.abs(weights[1] - 0.5).max()) > 0.05           # the weights really are non-uniform


def test_training_step_moves_only_the_aggregators_and_lowers_the_loss():
    """A few AdamW steps on one batch lower the epsilon MSE; the experts' arrays are untouched and the zero
    logits head has moved. Catches gradients reaching (or updates applied to) the experts and a step that
    never updates the head."""
    experts = [expert(20), expert(21)]
    before = [jax.tree.map(np.asarray, nnx.state(e)) for e in experts]
    ensemble = afa.AFAEnsemble(experts[0], 2, hidden=8, num_heads=2, rngs=nnx.Rngs(2))
    alpha_bars = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    step, params, opt_state, states = afa.make_afa_train_step(ensemble, experts, optax.adam(3e-2), alpha_bars)
    x, t, y = inputs(3, B=4)
    batch = {"x0": x, "labels": y, "t": t, "noise": random_array(7, 4, 8, 8, 1)}
    step = jax.jit(step)
    losses = []
    for _ in range(4):
        params, opt_state, loss = step(params, opt_state, states, batch)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    for e, old in zip(experts, before):
        for a, b in zip(jax.tree.leaves(nnx.state(e)), jax.tree.leaves(old)):
            np.testing.assert_array_equal(np.asarray(a), b)
    nnx.update(ensemble, params)
    assert float(jnp.abs(ensemble.aggregators[0].logits.kernel[...]).max()) > 0


def test_errors_name_the_argument():
    features = random_array(8, 2, 1, 4, 3)
    with pytest.raises(ValueError, match="logits"):
        afa.spatial_softmax_aggregate(features, jnp.zeros((2, 1, 4, 3)))
    agg = afa.SABWAggregator(2, 3, hw=(2, 2), temb_dim=4, hidden=8, num_heads=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="features"):
        agg(random_array(9, 3, 1, 4, 3), random_array(10, 1, 4))
    with pytest.raises(ValueError, match="temb"):
        agg(features, random_array(11, 2, 4))
    with pytest.raises(ValueError, match="num_heads"):
        afa.SABWAggregator(2, 3, hw=(2, 2), temb_dim=4, hidden=6, num_heads=4, rngs=nnx.Rngs(0))
    other = TinyDiT(rngs=nnx.Rngs(0), **{**SMALL, "dim": 8})
    one = TinyDiT(rngs=nnx.Rngs(0), **SMALL)
    with pytest.raises(ValueError, match="architecture"):
        afa.check_experts([one, other])
    with pytest.raises(TypeError, match="experts"):
        afa.check_experts([])
    ensemble = afa.AFAEnsemble(one, 2, hidden=8, num_heads=2, rngs=nnx.Rngs(0))
    x, t, y = inputs(4)
    with pytest.raises(ValueError, match="num_models"):
        ensemble([one], x, t, y)
