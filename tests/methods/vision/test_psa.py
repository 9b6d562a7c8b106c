"""P42 PSA: literal numpy transcription (paper form and the official PSA_p / PSA_s forms) and the spec's properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.vision.psa import PolarizedSelfAttention, psa_channel, psa_spatial


def _randn(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _randomize(m, seed):
    state = nnx.state(m, nnx.Param)
    leaves, tdef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    nnx.update(m, jax.tree.unflatten(tdef, [jnp.asarray(rng.standard_normal(l.shape) * 0.6, jnp.float32)
                                            for l in leaves]))


def _sm(z, axis):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _ln(z, s, b):
    return (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5) * s + b


def _np_psa(m, x):
    """Channel-first matrix form of the paper / official code: X as [B, C, HW], 1x1 convs as W^T X."""
    p = lambda name: np.asarray(getattr(m, name)[...], np.float64)
    x = np.asarray(x, np.float64)
    b, hh, ww, c = x.shape

    def channel(xx):
        X = xx.reshape(b, hh * ww, c).transpose(0, 2, 1)                    # [B, C, HW]
        mask = _sm(np.einsum("co,bcn->bon", p("ch_wq"), X), -1)               # [B, 1, HW]
        V = np.einsum("ci,bcn->bin", p("ch_wv"), X)                           # [B, Ci, HW]
        ctx = np.matmul(V, mask.transpose(0, 2, 1))[..., 0]                   # [B, Ci]
        if m.variant == "code_s":
            z = np.maximum(_ln(ctx @ p("up_w1") + p("up_b1"), p("ln_scale"), p("ln_bias")), 0)
            z = z @ p("up_w2") + p("up_b2")
        else:
            z = ctx @ p("ch_wz")
            if m.variant == "paper":
                z = _ln(z, p("ln_scale"), p("ln_bias"))
        return xx * (1 / (1 + np.exp(-z)))[:, None, None, :]

    def spatial(xx):
        X = xx.reshape(b, hh * ww, c).transpose(0, 2, 1)
        G = np.einsum("ci,bcn->bin", p("sp_wq"), X).mean(-1)                  # [B, Ci]  (GAP)
        T = np.einsum("ci,bcn->bin", p("sp_wv"), X)                           # [B, Ci, HW]
        if m.variant == "paper":
            s = np.matmul(_sm(G, -1)[:, None, :], T)                          # [B, 1, HW]
        elif m.variant == "code_p":
            s = _sm(np.matmul(G[:, None, :], T), -1)
        else:
            s = np.matmul(G[:, None, :], _sm(T, -1))
        return xx * (1 / (1 + np.exp(-s))).reshape(b, hh, ww, 1)

    if m.layout == "parallel":
        return channel(x) + spatial(x)
    return spatial(channel(x))


@pytest.mark.parametrize("variant", ["paper", "code_p", "code_s"])
@pytest.mark.parametrize("layout", ["parallel", "sequential"])
def test_matches_numpy_transcription(variant, layout):
    """Random weights, LN affine and biases. Catches: a dropped LN (paper) or LN affine, softmax over the wrong axis
    (Ci vs HW), the PSA_s bottleneck biases or ReLU, parallel <-> sequential composition, a missing sigmoid."""
    m = PolarizedSelfAttention(16, layout=layout, variant=variant, rngs=nnx.Rngs(0))
    _randomize(m, hash((variant, layout)) % 1000)
    x = _randn(1, (2, 3, 5, 16), 1.2)
    np.testing.assert_allclose(m(x), _np_psa(m, x), rtol=2e-5, atol=2e-6)


def test_official_defaults_and_gates_in_unit_interval():
    """Fresh (kaiming) init: shape kept, both gates in (0, 1), A_ch [B,1,1,C], A_sp [B,H,W,1]."""
    for variant in ("paper", "code_p", "code_s"):
        m = PolarizedSelfAttention(16, variant=variant, rngs=nnx.Rngs(2))
        x = _randn(3, (2, 4, 4, 16))
        a_ch, a_sp = m.gates(x)
        assert m(x).shape == x.shape and a_ch.shape == (2, 1, 1, 16) and a_sp.shape == (2, 4, 4, 1)
        for a in (a_ch, a_sp):
            assert bool(jnp.all((a > 0) & (a < 1)))


@pytest.mark.parametrize("variant", ["paper", "code_p", "code_s"])
def test_permutation_invariance_and_equivariance(variant):
    """Permuting pixels leaves A_ch unchanged and permutes A_sp the same way. Catches: a positional term, or a
    spatial softmax taken over a fixed axis order (e.g. over H only)."""
    m = PolarizedSelfAttention(16, variant=variant, rngs=nnx.Rngs(4))
    _randomize(m, 5)
    x = _randn(6, (2, 3, 4, 16))
    perm = np.random.default_rng(7).permutation(12)
    xp = x.reshape(2, 12, 16)[:, perm].reshape(2, 3, 4, 16)
    a_ch, a_sp = m.gates(x)
    b_ch, b_sp = m.gates(xp)
    np.testing.assert_allclose(b_ch, a_ch, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b_sp.reshape(2, 12), a_sp.reshape(2, 12)[:, perm], rtol=1e-5, atol=1e-6)


def test_zero_query_gives_mean_pooling():
    """W_q = 0: the HW softmax is uniform, so the channel context is the mean of x W_v. Catches: a sum-pool or a
    softmax over channels in the channel branch."""
    x = _randn(8, (2, 3, 4, 8))
    wv, wz = _randn(9, (8, 4)), _randn(10, (4, 8))
    _, a = psa_channel(x, jnp.zeros((8, 1)), wv, wz)
    ref = jax.nn.sigmoid(jnp.mean(x @ wv, axis=(1, 2)) @ wz)
    np.testing.assert_allclose(a[:, 0, 0], ref, rtol=1e-5)
    # spatial branch, paper form with W_q' = 0: uniform softmax over Ci -> A_sp = sigmoid(mean_Ci(x W_v'))
    _, s = psa_spatial(x, jnp.zeros((8, 4)), wv)
    np.testing.assert_allclose(s[..., 0], jax.nn.sigmoid(jnp.mean(x @ wv, -1)), rtol=1e-5)


@pytest.mark.parametrize("variant,count", [("paper", lambda c: 2 * c * c + 3 * c), ("code_p", lambda c: 2 * c * c + c),
                                           ("code_s", lambda c: c + 3 * c * c // 2 + (c // 2) * (c // 8)
                                            + 3 * (c // 8) + (c // 8) * c + c)])
def test_parameter_count(variant, count):
    """Paper: W_q (C), W_v, W_z (C*C/2 each), LN (2C), spatial W_q', W_v' (C*C/2 each). Catches: an extra bias or a
    wrong inner width (C instead of C/2)."""
    m = PolarizedSelfAttention(32, variant=variant, rngs=nnx.Rngs(0))
    assert sum(v.size for v in jax.tree.leaves(nnx.state(m, nnx.Param))) == count(32)


@pytest.mark.parametrize("variant", ["paper", "code_s"])
def test_gradients_finite_and_nonzero(variant):
    """Every parameter gets a finite, nonzero gradient (sequential layout: both branches on the path). C=32, since at
    C=16 PSA_s's LayerNorm over C/8 = 2 channels outputs only +-1 and passes no gradient to the channel branch."""
    m = PolarizedSelfAttention(32, layout="sequential", variant=variant, rngs=nnx.Rngs(11))
    _randomize(m, 12)
    x = _randn(13, (2, 3, 3, 32))
    r = _randn(14, x.shape)
    grads = nnx.jit(nnx.grad(lambda mm: jnp.sum(mm(x) * r)))(m)
    for leaf in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(leaf))) and float(jnp.max(jnp.abs(leaf))) > 0


def test_jit_traces_once():
    """Two calls with equal shapes trace once."""
    n = [0]
    m = PolarizedSelfAttention(8, rngs=nnx.Rngs(0))

    @nnx.jit
    def f(mm, x):
        n[0] += 1
        return mm(x)

    f(m, _randn(0, (2, 3, 3, 8)))
    f(m, _randn(1, (2, 3, 3, 8)))
    assert n[0] == 1


def test_bad_inputs_raise():
    """Wrong layout, channel count, variant or weights name the argument."""
    m = PolarizedSelfAttention(8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="8 channels"):
        m(jnp.ones((1, 8, 3, 3)))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        m(jnp.ones((2, 3, 8)))
    with pytest.raises(ValueError, match="channels"):
        PolarizedSelfAttention(7, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="layout"):
        PolarizedSelfAttention(8, layout="serial", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="variant"):
        PolarizedSelfAttention(8, variant="code", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="code_s"):
        PolarizedSelfAttention(12, variant="code_s", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="wq"):
        psa_channel(jnp.ones((1, 2, 2, 8)), jnp.ones((8, 2)), jnp.ones((8, 4)), jnp.ones((4, 8)))
