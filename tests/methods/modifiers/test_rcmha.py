"""P31 RCMHA: depthwise causal convolution of Q/K/V plus Transformer-XL relative attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn.methods.modifiers import rcmha as R


def _normal(key, shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def _literal_xl(q, k, v, rel, u, vb, scale):
    """A loop transcription of A_ij = (q_i + u).k_j + (q_i + v).R_{i-j}, causal softmax, times V."""
    q, k, v, rel, u, vb = (np.asarray(a, np.float64) for a in (q, k, v, rel, u, vb))
    b_, t, h, d = q.shape
    out = np.zeros_like(q)
    for b in range(b_):
        for hh in range(h):
            for i in range(t):
                logits = np.array([((q[b, i, hh] + u[hh]) @ k[b, j, hh]
                                    + (q[b, i, hh] + vb[hh]) @ rel[t - 1 - (i - j), hh]) * scale
                                   for j in range(i + 1)])
                p = np.exp(logits - logits.max())
                out[b, i, hh] = (p / p.sum()) @ v[b, :i + 1, hh]
    return out


@pytest.mark.parametrize("t", [1, 5, 8])
def test_rel_shift_equals_the_explicit_distance_gather(t):
    """Catches: a rel_shift that slides by one too many (distance i-j+1) or pads on the wrong side."""
    x = _normal(t, (2, 3, t, t))
    lower = np.tril(np.ones((t, t), bool))
    np.testing.assert_array_equal(np.where(lower, R.rel_shift(x), 0), R.relative_gather(x))


def test_relative_attention_matches_a_loop_transcription():
    """Catches: u and v swapped, the distance read as j-i, the relative term left unscaled, a non-causal mask."""
    b, t, h, d = 2, 7, 3, 4
    q, k, v = (_normal(i, (b, t, h, d)) for i in range(3))
    rel, u, vb = _normal(3, (t, h, d)), _normal(4, (h, d)), _normal(5, (h, d))
    got = R.relative_attention_xl(q, k, v, rel, u, vb)
    np.testing.assert_allclose(got, _literal_xl(q, k, v, rel, u, vb, d ** -0.5), rtol=2e-5, atol=2e-5)


def test_delta_kernels_and_zero_relative_terms_give_causal_mha():
    """The spec's reduction: a delta convolution with W_R = 0 and u = v = 0 is standard causal MHA.
    Catches: a convolution that is not the identity at a delta kernel, a bias leaking in when R = 0."""
    b, t, h, d = 2, 9, 2, 8
    q, k, v = (_normal(10 + i, (b, t, h, d)) for i in range(3))
    delta = jnp.zeros((3, 3, h, d)).at[:, -1].set(1.0)
    cq, ck, cv = R.dconv_qkv(q, k, v, delta)
    zeros = jnp.zeros((h, d))
    got = R.relative_attention_xl(cq, ck, cv, jnp.zeros((t, h, d)), zeros, zeros)
    np.testing.assert_allclose(got, jattn.attention(q, k, v, causal=True, impl="reference"), rtol=1e-6, atol=1e-6)


def test_depthwise_conv_matches_numpy_and_is_causal():
    """Catches: kernel taps applied in reverse order (kernel[0] on the current position), channels mixed, a
    right-padded (future-seeing) convolution."""
    x, kernel = _normal(20, (2, 6, 3, 4)), _normal(21, (3, 3, 4))
    got = np.asarray(R.causal_depthwise_conv(x, kernel))
    xn, kn = np.asarray(x), np.asarray(kernel)
    want = np.zeros_like(xn)
    for t in range(6):
        for j in range(3):
            src = t - 2 + j
            if src >= 0:
                want[:, t] += kn[j] * xn[:, src]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    bumped = np.asarray(R.causal_depthwise_conv(x.at[:, 4].add(1.0), kernel))
    np.testing.assert_array_equal(bumped[:, :4], got[:, :4])


def test_relative_scores_are_shift_equivariant():
    """With the same query at every position and u = v = 0, the score between i and j depends only on i - j
    (a Toeplitz lower triangle). Catches: absolute positions leaking into the relative term."""
    t, h, d = 6, 1, 4
    q = jnp.broadcast_to(_normal(30, (1, 1, h, d)), (1, t, h, d))
    k = jnp.broadcast_to(_normal(31, (1, 1, h, d)), (1, t, h, d))
    rel = _normal(32, (t, h, d))
    _, probs = R.relative_attention_xl(q, k, k, rel, jnp.zeros((h, d)), jnp.zeros((h, d)), return_probs=True)
    with np.errstate(divide="ignore"):  # the masked upper triangle is log(0)
        logits = np.log(np.asarray(probs[0, 0]))
    logits -= logits[:, :1]  # per-row constants cancel; compare differences along each diagonal
    for offset in range(1, t):
        diagonal = [logits[i, i - offset] - logits[i, i] for i in range(offset, t)]
        np.testing.assert_allclose(diagonal, diagonal[0], rtol=1e-5, atol=1e-5)


def test_module_is_causal_and_every_parameter_learns():
    """Catches: a convolution or relative term that sees the future, a parameter cut from the graph (a stopped
    gradient to u, v, the kernels or W_R)."""
    layer = R.RCMHA(16, 2, rngs=nnx.Rngs(0))
    layer.u[...] = _normal(40, layer.u.shape)
    layer.v_bias[...] = _normal(41, layer.v_bias.shape)
    x = _normal(42, (2, 7, 16))
    out = layer(x)
    bumped = layer(x.at[:, 5].add(1.0))
    np.testing.assert_allclose(bumped[:, :5], out[:, :5], rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(bumped[:, 5:] - out[:, 5:]).max()) > 1e-3

    graphdef, params = nnx.split(layer, nnx.Param)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)))(params)
    for name in ("u", "v_bias", "conv_kernels"):
        assert float(jnp.abs(grads[name][...]).max()) > 0, name
    assert float(jnp.abs(grads["rel_proj"]["kernel"][...]).max()) > 0


def test_lm_trains_a_step_and_returns_maps():
    """The LM wiring: every block is RCMHA and a gradient step lowers the loss on a fixed batch."""
    import optax

    model = R.rcmha_lm(32, 16, 1, 2, rngs=nnx.Rngs(1))
    assert all(isinstance(b.attention, R.RCMHA) for b in model.blocks)
    tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, 32)
    logits, maps = model(tokens, return_probs=True)
    assert maps[0].shape == (2, 2, 9, 9)
    np.testing.assert_allclose(np.asarray(maps[0]).sum(-1), 1.0, rtol=1e-5)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        nnx.merge(graphdef, p, rest)(tokens[:, :-1]), tokens[:, 1:]))
    before, grads = jax.jit(jax.value_and_grad(loss))(params)
    after = jax.jit(loss)(jax.tree.map(lambda p, g: p - 0.05 * g, params, grads))
    assert float(after) < float(before)


def test_bad_inputs_name_the_argument():
    layer = R.RCMHA(16, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x must be"):
        layer(jnp.ones((2, 5, 8)))
    with pytest.raises(ValueError, match="mask and positions"):
        layer(jnp.ones((2, 5, 16)), mask=jnp.ones((5, 5), bool))
    with pytest.raises(ValueError, match="decoding cache"):
        layer(jnp.ones((2, 5, 16)), decode=True)
    with pytest.raises(ValueError, match="even size"):
        R.RCMHA(12, 4, rngs=nnx.Rngs(0))
    q = jnp.ones((1, 4, 2, 4))
    with pytest.raises(ValueError, match="kernels must be"):
        R.dconv_qkv(q, q, q, jnp.ones((3, 3, 2, 5)))
    with pytest.raises(ValueError, match="rel must be"):
        R.relative_attention_xl(q, q, q, jnp.ones((3, 2, 4)), jnp.ones((2, 4)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="causal only"):
        R.relative_attention_xl(q, q, q, jnp.ones((4, 2, 4)), jnp.ones((2, 4)), jnp.ones((2, 4)), causal=False)


def test_nan_in_gives_nan_out():
    q = _normal(50, (1, 4, 1, 4)).at[0, 1, 0, 0].set(jnp.nan)
    out = R.relative_attention_xl(q, q, q, _normal(51, (4, 1, 4)), jnp.zeros((1, 4)), jnp.zeros((1, 4)))
    assert bool(jnp.isnan(out[0, 1:]).any())
