"""P06 ULSAM: literal numpy transcription of the official SubSpace/ULSAM forward and the spec's properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.vision.ulsam import ULSAM, subspace_softmax, ulsam_apply, ulsam_combine


def _randn(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


_call = nnx.jit(lambda mm, x: mm(x))
_maps = nnx.jit(lambda mm, x: mm.maps(x))


def _randomize(m, seed, kind=nnx.Param):
    state = nnx.state(m, kind)
    leaves, tdef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(rng.uniform(0.5, 1.5, l.shape) if kind is nnx.BatchStat and i % 2 else
                       rng.standard_normal(l.shape) * 0.8, jnp.float32) for i, l in enumerate(leaves)]
    nnx.update(m, jax.tree.unflatten(tdef, new))


def _np_ulsam(m, x, train):
    """Per group: DW 1x1 + bias -> BN -> ReLU -> maxpool 3x3/1/1 -> PW 1x1 + bias -> BN -> ReLU -> softmax_HW ->
    A*F + F; concat. Literal loops over groups, as in the official code."""
    x = np.asarray(x, np.float64)
    c, g = m.channels, m.num_groups
    cg = c // g
    p = lambda v: np.asarray(v[...], np.float64)
    dw_w, dw_b = p(m.dw.kernel).reshape(c), p(m.dw.bias)
    pw_w, pw_b = p(m.pw.kernel).reshape(cg, g), p(m.pw.bias)

    def bn(h, bnm, idx):
        if train:
            mu, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
        else:
            mu, var = p(bnm.mean)[idx], p(bnm.var)[idx]
        return (h - mu) / np.sqrt(var + 1e-5) * p(bnm.scale)[idx] + p(bnm.bias)[idx]

    outs, maps = [], []
    for n in range(g):
        sl = slice(n * cg, (n + 1) * cg)
        f = x[..., sl]
        h = np.maximum(bn(f * dw_w[sl] + dw_b[sl], m.bn_dw, sl), 0)
        b, hh, ww, _ = h.shape
        pad = np.full((b, hh + 2, ww + 2, cg), -np.inf)
        pad[:, 1:-1, 1:-1] = h
        h = np.max([pad[:, i:i + hh, j:j + ww] for i in range(3) for j in range(3)], axis=0)
        h = (h @ pw_w[:, n] + pw_b[n])[..., None]
        h = np.maximum(bn(h, m.bn_pw, slice(n, n + 1)), 0)
        e = np.exp(h.reshape(b, -1) - h.reshape(b, -1).max(1, keepdims=True))
        a = (e / e.sum(1, keepdims=True)).reshape(b, hh, ww, 1)
        outs.append(a * f + f)
        maps.append(a)
    return np.concatenate(outs, -1), np.concatenate(maps, -1)


@pytest.mark.parametrize("train", [True, False])
def test_matches_numpy_transcription(train):
    """Random conv/BN parameters (and running stats in eval mode). Catches: a dropped residual (+F), the maxpool,
    a ReLU, the DW bias (eval), softmax over channels instead of H*W, groups interleaved instead of contiguous."""
    m = ULSAM(8, 2, rngs=nnx.Rngs(0))
    _randomize(m, 1)
    if not train:
        _randomize(m, 2, nnx.BatchStat)
        m.eval()
    x = _randn(3, (2, 5, 4, 8), 1.5)
    ref_out, ref_a = _np_ulsam(m, x, train)
    np.testing.assert_allclose(_maps(m, x), ref_a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_call(m, x), ref_out, rtol=1e-4, atol=1e-5)


def test_maps_sum_to_one_and_output_is_x_times_one_plus_a():
    """Per group A sums to 1 over H*W; out = x * (1 + A). Catches: out = x * A (dropped residual)."""
    m = ULSAM(8, 4, rngs=nnx.Rngs(1))
    _randomize(m, 4)
    x = _randn(5, (2, 4, 6, 8))
    a = _maps(m, x)
    assert a.shape == (2, 4, 6, 4)
    np.testing.assert_allclose(a.sum((1, 2)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(_call(m, x), x * (1 + jnp.repeat(a, 2, axis=-1)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ulsam_combine(x, a), _call(m, x), rtol=1e-6)


def test_transpose_equivariance_and_pure_apply():
    """1x1 convs, a symmetric 3x3 max pool and a softmax over all H*W positions commute with swapping H and W; the
    pure ulsam_apply (jitted, graphdef static) gives the module's output and BN update. Catches: a pool or softmax
    over one spatial axis only."""
    m = ULSAM(8, 2, rngs=nnx.Rngs(5))
    _randomize(m, 14)
    _randomize(m, 15, nnx.BatchStat)
    m.eval()
    x = _randn(16, (2, 5, 5, 8))
    t = lambda a: jnp.swapaxes(a, 1, 2)
    np.testing.assert_allclose(_call(m, t(x)), t(_call(m, x)), rtol=1e-5, atol=1e-6)
    m.train()
    graphdef, state = nnx.split(m)
    out, new_state = jax.jit(ulsam_apply, static_argnums=0)(graphdef, state, x)
    np.testing.assert_allclose(out, _call(m, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state["bn_dw"]["mean"][...], m.bn_dw.mean[...], rtol=1e-5, atol=1e-6)


def test_single_group_shares_one_map():
    """g=1: one map shared by every channel. Catches: per-channel maps."""
    m = ULSAM(6, 1, rngs=nnx.Rngs(2))
    _randomize(m, 6)
    x = _randn(7, (2, 3, 4, 6))
    ratio = _call(m, x) / x - 1.0
    np.testing.assert_allclose(ratio, jnp.broadcast_to(ratio[..., :1], ratio.shape), rtol=1e-4, atol=1e-5)


def test_parameter_count():
    """Convs 3C + g (DW 2C, PW C + g), BN affine 2C + 2g. Catches: a full (non-depthwise) DW conv or PW to C."""
    c, g = 16, 4
    m = ULSAM(c, g, rngs=nnx.Rngs(0))
    n = lambda mod: sum(v.size for v in jax.tree.leaves(nnx.state(mod, nnx.Param)))
    assert n(m.dw) + n(m.pw) == 3 * c + g
    assert n(m.bn_dw) + n(m.bn_pw) == 2 * c + 2 * g
    assert n(m) == 5 * c + 3 * g


def test_batchnorm_momentum_is_pytorch_point_nine():
    """One training call moves the running mean 90% of the way to the batch mean (PyTorch momentum 0.9).
    Catches: flax momentum 0.9 (which would move it only 10%)."""
    m = ULSAM(4, 2, rngs=nnx.Rngs(0))
    _randomize(m, 8)
    x = _randn(9, (3, 4, 4, 4))
    h = m.dw(x)
    _call(m, x)
    np.testing.assert_allclose(m.bn_dw.mean[...], 0.9 * h.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_gradients_finite_and_nonzero():
    """Eval mode: every parameter gets a finite nonzero gradient. Train mode: the conv biases feeding a BN get
    exactly zero (BN removes them, as in the official code). Catches: a parameter cut from the graph."""
    m = ULSAM(8, 2, rngs=nnx.Rngs(3))
    _randomize(m, 10)
    _randomize(m, 11, nnx.BatchStat)
    x = _randn(12, (2, 4, 4, 8))
    r = _randn(13, x.shape)
    loss = lambda mm: jnp.sum(mm(x) * r)
    grad = nnx.jit(nnx.grad(loss))
    m.eval()
    for leaf in jax.tree.leaves(grad(m)):
        assert bool(jnp.all(jnp.isfinite(leaf))) and float(jnp.max(jnp.abs(leaf))) > 0
    m.train()
    g = grad(m)
    top = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(g))
    assert top > 0
    assert float(jnp.max(jnp.abs(g.dw.bias[...]))) <= 1e-4 * top
    assert float(jnp.max(jnp.abs(g.pw.bias[...]))) <= 1e-4 * top


def test_jit_traces_once():
    """Two calls with equal shapes trace once (train mode, BN stats updated in place)."""
    n = [0]
    m = ULSAM(4, 2, rngs=nnx.Rngs(0))

    @nnx.jit
    def f(mm, x):
        n[0] += 1
        return mm(x)

    f(m, _randn(0, (2, 3, 3, 4)))
    f(m, _randn(1, (2, 3, 3, 4)))
    assert n[0] == 1


def test_bad_inputs_raise():
    """Wrong layout, channel count or group count name the argument."""
    m = ULSAM(8, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels"):
        m(jnp.ones((1, 8, 4, 4)))            # channels-first
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        m(jnp.ones((2, 4, 8)))
    with pytest.raises(ValueError, match="num_groups"):
        ULSAM(6, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels"):
        ULSAM(0, 1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="maps"):
        ulsam_combine(jnp.ones((1, 2, 2, 6)), jnp.ones((1, 2, 2, 4)))
    with pytest.raises(TypeError, match="graphdef"):
        ulsam_apply(*nnx.split(nnx.Linear(2, 2, rngs=nnx.Rngs(0))), jnp.ones((1, 2, 2, 2)))
    with pytest.raises(ValueError, match="logits"):
        subspace_softmax(jnp.ones((2, 3)))
