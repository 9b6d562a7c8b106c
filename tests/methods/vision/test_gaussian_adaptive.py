"""P00 DAAM / P01 GAAM: the Gaussian adaptive gate against a literal numpy transcription and its properties."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.vision.gaussian_adaptive import (DensityBlock, MultiHeadDensityGate, daam, density_gate, gaam,
                                                    importance_factor, multi_head_density_gate)


def _randn(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _np_gate(x, delta, c, logits, axis, mode, eps=1e-8):
    """Literal transcription of the released code: per head chunk, loop over Gaussians, product or mixture."""
    x = np.asarray(x, np.float64)
    heads, ng = delta.shape
    outs, ws = [], []
    for h, xc in enumerate(np.split(x, heads, axis=axis)):
        mean = xc.mean(axis=axis, keepdims=True)
        var = xc.var(axis=axis, keepdims=True, ddof=1) + eps
        mix = np.ones_like(xc) if mode == "product" else np.zeros_like(xc)
        if mode == "mixture":
            pi = np.exp(logits[h]) / np.exp(logits[h]).sum()
        for i in range(ng):
            y = (xc - (mean + delta[h, i])) / np.sqrt(var)
            g = np.exp(-(y ** 2) / (2.0 * c[h, i] ** 2))
            if mode == "product":
                mix = mix * g / np.sqrt(2 * np.pi * c[h, i] ** 2)
            else:
                mix = mix + pi[i] * g
        mix = mix / np.maximum(mix.sum(axis=axis, keepdims=True), eps)
        outs.append(xc * mix)
        ws.append(mix)
    return np.concatenate(outs, axis=axis), np.concatenate(ws, axis=axis)


def _random_gate(mode, heads, ng, axis, seed, delta_scale=0.5):
    m = MultiHeadDensityGate(heads, ng, axis=axis, mode=mode, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 100)
    m.delta[...] = jnp.asarray(delta_scale * rng.standard_normal((heads, ng)), jnp.float32)
    m.c[...] = jnp.asarray(rng.uniform(0.8, 2.0, (heads, ng)) * rng.choice([-1.0, 1.0], (heads, ng)), jnp.float32)
    if mode == "mixture":
        m.mix_logits[...] = jnp.asarray(rng.standard_normal((heads, ng)), jnp.float32)
    return m


@pytest.mark.parametrize("mode", ["product", "mixture"])
@pytest.mark.parametrize("shape,axis", [((2, 3, 4, 8), -1), ((2, 6, 8), -1), ((2, 6, 5), 1)])
def test_matches_numpy_transcription(mode, shape, axis):
    """Literal formula on images and on 1-D sequences with random delta, c, logits. Catches: dropped delta, biased
    variance, sum<->product swap, missing softmax over the mixture logits, stats over the whole axis not per head."""
    heads = 2
    m = _random_gate(mode, heads, 3, axis, seed=len(shape) + (mode == "mixture"))
    x = jax.random.normal(jax.random.key(7), shape) * 2.0 + 0.3
    out = m(x)
    w = m.gate(x)
    logits = None if mode == "product" else np.asarray(m.mix_logits[...], np.float64)
    ref_out, ref_w = _np_gate(x, np.asarray(m.delta[...], np.float64), np.asarray(m.c[...], np.float64), logits,
                              axis, mode)
    np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(w, ref_w, rtol=2e-5, atol=1e-7)


def test_eps_clamp_keeps_unnormalised_small_mass():
    """Product mode with the 1/sqrt(2 pi c^2) factor and a tiny total: w / max(sum, eps) leaves w unnormalised.
    Catches: dropping the normalising constant or the eps clamp (both visible only when the sum is below eps)."""
    x = _randn(3, (2, 8))
    delta = jnp.full((1, 6), 0.1)
    c = jnp.full((1, 6), 40.0)                     # each factor ~ 1/(40 sqrt(2 pi)) ~ 1e-2; product ~ 1e-12
    _, w = multi_head_density_gate(x, delta, c, axis=-1)
    _, ref_w = _np_gate(x, np.asarray(delta, np.float64), np.asarray(c, np.float64), None, -1, "product")
    np.testing.assert_allclose(w, ref_w, rtol=1e-4)
    assert float(jnp.max(jnp.sum(w, -1))) < 1e-2


@pytest.mark.parametrize("mode", ["product", "mixture"])
def test_gate_sums_to_one_per_head_chunk(mode):
    """Each head's chunk of w sums to 1 along the axis (small offsets, so the product's total stays above eps and
    the clamp is inactive). Catches: normalising over the whole axis instead of per head."""
    m = _random_gate(mode, 4, 3, -1, seed=2, delta_scale=0.1)
    w = m.gate(_randn(1, (3, 5, 12)))
    np.testing.assert_allclose(w.reshape(3, 5, 4, 3).sum(-1), 1.0, rtol=1e-5)


def test_product_of_gaussians_closed_form():
    """delta=0: prod_i N(y; c_i) is prop. to one Gaussian with 1/c^2 = sum 1/c_i^2. Catches: mixing up c and c^2."""
    x = _randn(4, (2, 3, 10))
    c = jnp.array([0.7, 1.3, 2.1])
    _, w = density_gate(x, jnp.zeros(3), c, axis=-1)
    c_eff = 1.0 / jnp.sqrt(jnp.sum(1.0 / c ** 2))
    _, w1 = density_gate(x, jnp.zeros(1), c_eff[None], axis=-1)
    np.testing.assert_allclose(w, w1, rtol=1e-5)


@pytest.mark.parametrize("mode", ["product", "mixture"])
def test_shift_invariance(mode):
    """x + const leaves the gate unchanged (the mean moves with x). Catches: centring on a fixed 0 instead of mean."""
    m = _random_gate(mode, 2, 3, -1, seed=5)
    x = _randn(5, (2, 3, 8))
    np.testing.assert_allclose(m.gate(x + 3.7), m.gate(x), rtol=1e-4, atol=1e-6)


def test_mixture_with_one_gaussian_equals_product():
    """One Gaussian: mixture (no 1/sqrt(2 pi c^2), weight 1) equals product after normalising. Catches: a mixture
    weight not softmaxed (logit 1 would scale), or a different y in either mode."""
    x = _randn(6, (2, 4, 6))
    d, c = jnp.array([0.3]), jnp.array([1.4])
    o1, _ = density_gate(x, d, c, axis=-1, mode="product")
    o2, _ = density_gate(x, d, c, jnp.array([1.0]), axis=-1, mode="mixture")
    np.testing.assert_allclose(o1, o2, rtol=1e-5, atol=1e-7)


def test_parameter_counts_and_variants():
    """2 N_g per head (+ N_g mixture logits); daam = product/randn, gaam = mixture/c=2. Catches: shared (not per
    head) parameters, a wrong default."""
    count = lambda m: sum(v.size for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    d, g = daam(rngs=nnx.Rngs(0)), gaam(rngs=nnx.Rngs(0))
    assert count(d) == 4 * 2 * 24 and d.mode == "product"
    assert count(g) == 4 * 3 * 4 and g.mode == "mixture"
    np.testing.assert_array_equal(g.c[...], 2.0)
    np.testing.assert_array_equal(d.delta[...], 0.0)
    assert float(jnp.std(d.c[...])) > 0.3
    e = MultiHeadDensityGate(2, 3, c_init="exp_randn", rngs=nnx.Rngs(1))
    assert bool(jnp.all(e.c[...] > 0))


def test_density_block_residual_and_importance_factor():
    """DensityBlock = x + gate(x); importance factor sums to 1 along the axis. Catches: a dropped residual."""
    blk = DensityBlock(2, 3, mode="mixture", c_init=1.5, rngs=nnx.Rngs(0))
    x = _randn(8, (2, 3, 4, 6))
    np.testing.assert_allclose(blk(x), x + blk.gate(x), rtol=1e-6)
    imp = importance_factor(blk.gate.gate(x), axis=-1)
    assert imp.shape == (6,)
    np.testing.assert_allclose(jnp.sum(imp), 1.0, rtol=1e-6)


@pytest.mark.parametrize("mode", ["product", "mixture"])
def test_gradients_finite_and_nonzero(mode):
    """Every parameter gets a finite, nonzero gradient. Catches: a parameter cut from the graph (e.g. delta unused)."""
    m = _random_gate(mode, 2, 3, -1, seed=9)
    x = _randn(9, (2, 5, 8))
    r = _randn(10, x.shape)
    grads = nnx.jit(nnx.grad(lambda mm: jnp.sum(mm(x) * r)))(m)
    for leaf in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(leaf))) and float(jnp.max(jnp.abs(leaf))) > 0


def test_jit_traces_once():
    """Two calls with equal shapes trace once. Catches: Python-side state that retraces every call."""
    n = [0]
    m = gaam(2, 2, rngs=nnx.Rngs(0))

    @nnx.jit
    def f(mm, x):
        n[0] += 1
        return mm(x)

    f(m, _randn(0, (2, 3, 8)))
    f(m, _randn(1, (2, 3, 8)))
    assert n[0] == 1


def test_bad_inputs_raise():
    """Bad arguments name themselves."""
    m = daam(4, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_heads"):
        m(jnp.ones((2, 3, 6)))
    with pytest.raises(ValueError, match="rank"):
        m(jnp.ones((8,)))
    with pytest.raises(ValueError, match="axis"):
        density_gate(jnp.ones((2, 4)), jnp.zeros(1), jnp.ones(1), axis=3)
    with pytest.raises(ValueError, match="mode"):
        MultiHeadDensityGate(2, 2, mode="sum", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_gaussians"):
        MultiHeadDensityGate(2, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="weights"):
        density_gate(jnp.ones((2, 4)), jnp.zeros(2), jnp.ones(2), axis=-1, mode="mixture")
    with pytest.raises(ValueError, match="c_init"):
        MultiHeadDensityGate(2, 2, c_init=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="axis"):
        MultiHeadDensityGate(2, 2, axis=1.0, rngs=nnx.Rngs(0))
