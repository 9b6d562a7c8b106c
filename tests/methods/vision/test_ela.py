"""P12 ELA: literal numpy transcription of the paper's pseudocode and the spec's properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.vision.ela import ELA, ela_variant, strip_pool


def _randn(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _randomize(m, seed):
    rng = np.random.default_rng(seed)
    m.conv.kernel[...] = jnp.asarray(rng.standard_normal(m.conv.kernel.shape) * 0.5, jnp.float32)
    m.gn_scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, m.channels) * rng.choice([-1, 1], m.channels), jnp.float32)
    m.gn_bias[...] = jnp.asarray(rng.standard_normal(m.channels) * 0.5, jnp.float32)


def _np_ela(m, x):
    """x_h = mean over W, x_w = mean over H; sigmoid(GN(conv1d(.))) with the same conv/GN; x * y_h * y_w."""
    x = np.asarray(x, np.float64)
    kern = np.asarray(m.conv.kernel[...], np.float64)          # [k, C/groups, C]
    k, cpg, c = kern.shape
    pad = k // 2
    gs, gb = np.asarray(m.gn_scale[...], np.float64), np.asarray(m.gn_bias[...], np.float64)

    def branch(z):                                              # z [B, L, C]
        b, l, _ = z.shape
        zp = np.zeros((b, l + 2 * pad, c))
        zp[:, pad:pad + l] = z
        y = np.zeros((b, l, c))
        for o in range(c):
            gi = o // (c // m.conv_groups)
            for j in range(k):
                for ci in range(cpg):
                    y[:, :, o] += zp[:, j:j + l, gi * cpg + ci] * kern[j, ci, o]
        out = np.zeros_like(y)
        per = c // m.gn_groups
        for gi in range(m.gn_groups):
            blk = y[:, :, gi * per:(gi + 1) * per]
            mu = blk.mean(axis=(1, 2), keepdims=True)
            var = blk.var(axis=(1, 2), keepdims=True)
            out[:, :, gi * per:(gi + 1) * per] = (blk - mu) / np.sqrt(var + 1e-5)
        return 1.0 / (1.0 + np.exp(-(out * gs + gb)))

    y_h, y_w = branch(x.mean(axis=2)), branch(x.mean(axis=1))
    return x * y_h[:, :, None, :] * y_w[:, None, :, :], y_h, y_w


@pytest.mark.parametrize("kernel,conv_groups,gn_groups", [(5, 16, 4), (3, 2, 8)])
def test_matches_numpy_transcription(kernel, conv_groups, gn_groups):
    """Random conv/GN parameters, depthwise (groups=C) and grouped (groups=C/8). Catches: separate weights per
    direction, a dropped GN affine, max instead of mean pooling, H and W pooling swapped, GN over the wrong axes."""
    m = ELA(16, kernel, conv_groups, gn_groups, rngs=nnx.Rngs(0))
    _randomize(m, kernel)
    x = _randn(kernel, (2, 5, 7, 16), 1.3)
    ref, ref_h, ref_w = _np_ela(m, x)
    y_h, y_w = m.gates(x)
    np.testing.assert_allclose(y_h, ref_h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y_w, ref_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m(x), ref, rtol=1e-5, atol=1e-6)


def test_gates_in_unit_interval_and_shape():
    """Gates lie in (0, 1); output keeps the shape. Catches: a missing sigmoid."""
    m = ELA(8, 3, gn_groups=2, rngs=nnx.Rngs(1))
    _randomize(m, 1)
    x = _randn(2, (2, 4, 6, 8), 3.0)
    y_h, y_w = m.gates(x)
    assert y_h.shape == (2, 4, 8) and y_w.shape == (2, 6, 8) and m(x).shape == x.shape
    for y in (y_h, y_w):
        assert bool(jnp.all((y > 0) & (y < 1)))


def test_transpose_equivariance_square():
    """Square input: ELA(x^T) = ELA(x)^T because conv and GN are shared. Catches: separate H and W weights."""
    m = ELA(8, 5, gn_groups=4, rngs=nnx.Rngs(2))
    _randomize(m, 3)
    x = _randn(4, (2, 6, 6, 8))
    t = lambda a: jnp.swapaxes(a, 1, 2)
    np.testing.assert_allclose(m(t(x)), t(m(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,per", [("T", 1), ("B", 1), ("S", 8), ("L", 8)])
def test_parameter_count_and_variants(name, per):
    """Params = C * (C / conv_groups) * k + 2C; T/S use k=5, B/L k=7. Catches: a conv bias, a full conv."""
    c = 16
    m = ela_variant(name, c, rngs=nnx.Rngs(0))
    k = 5 if name in "TS" else 7
    assert m.kernel == k and m.conv_groups == c // per
    assert sum(v.size for v in jax.tree.leaves(nnx.state(m, nnx.Param))) == c * per * k + 2 * c


def test_constant_input_gives_uniform_interior_gates():
    """Per-channel constant input: pooled strips are constant, so gates are uniform along H and W away from the
    zero-padded borders (k=1: uniform everywhere). Catches: positional terms in the gate. Note: the spec's "uniform
    gates" holds only in the interior for k > 1, since the conv zero-pads the strip ends."""
    x = jnp.broadcast_to(_randn(5, (2, 1, 1, 8)), (2, 9, 9, 8))
    m1 = ELA(8, 1, gn_groups=2, rngs=nnx.Rngs(3))
    _randomize(m1, 6)
    y_h, y_w = m1.gates(x)
    np.testing.assert_allclose(y_h, jnp.broadcast_to(y_h[:, :1], y_h.shape), rtol=1e-5)
    m5 = ELA(8, 5, gn_groups=2, rngs=nnx.Rngs(3))
    _randomize(m5, 7)
    y_h, _ = m5.gates(x)
    inner = y_h[:, 2:-2]
    np.testing.assert_allclose(inner, jnp.broadcast_to(inner[:, :1], inner.shape), rtol=1e-5)


def test_gradients_finite_and_nonzero():
    """Every parameter (conv kernel, GN scale and bias) gets a finite, nonzero gradient."""
    m = ELA(8, 3, gn_groups=2, rngs=nnx.Rngs(4))
    _randomize(m, 8)
    x = _randn(9, (2, 5, 4, 8))
    r = _randn(10, x.shape)
    grads = nnx.jit(nnx.grad(lambda mm: jnp.sum(mm(x) * r)))(m)
    for leaf in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(leaf))) and float(jnp.max(jnp.abs(leaf))) > 0


def test_jit_traces_once():
    """Two calls with equal shapes trace once."""
    n = [0]
    m = ELA(8, 3, gn_groups=2, rngs=nnx.Rngs(0))

    @nnx.jit
    def f(mm, x):
        n[0] += 1
        return mm(x)

    f(m, _randn(0, (2, 3, 4, 8)))
    f(m, _randn(1, (2, 3, 4, 8)))
    assert n[0] == 1


def test_bad_inputs_raise():
    """Wrong layout, channel or group counts name the argument."""
    m = ELA(16, 5, gn_groups=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[B, H, W, 16\]"):
        m(jnp.ones((1, 16, 5, 5)))
    with pytest.raises(ValueError, match="gn_groups"):
        ELA(12, 5, gn_groups=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="conv_groups"):
        ELA(12, 5, conv_groups=5, gn_groups=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel"):
        ELA(8, 4, gn_groups=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="name"):
        ela_variant("X", 16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x must be"):
        strip_pool(jnp.ones((2, 3, 4)))
