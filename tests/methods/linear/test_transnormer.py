"""P58 TransNormerLLM / P74 Lightning-2: slopes, SRMSNorm, LRPE, the NNX block, the paper entry points."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.linear.lightning2 import (alibi_slopes, decayed_linear_attention_quadratic, lightning_attention,
                                             lightning_decode_step, lightning_prefill_with_state)
from jattn.methods.linear.transnormer import TNLBlock, TNLGatedLinearAttention, lrpe, lrpe_init_theta, srms_norm
from jattn.ops.linear import linear_attention


def rand(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_slopes_are_the_alibi_list_for_8_heads():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -i for i in range(1, 9)], rtol=1e-6)


def test_srms_norm_gives_unit_rms():
    y = srms_norm(3.0 * rand(0, 4, 7, 24) + 1.0)
    np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(y) ** 2, axis=-1)), 1.0, rtol=1e-4)


def test_lrpe_inner_product_is_relative_cosine():
    q, k, theta = rand(1, 1, 6, 2, 4), rand(2, 1, 6, 2, 4), lrpe_init_theta(2, 4) * 7.0
    lq, lk = lrpe(q, theta, offset=3), lrpe(k, theta, offset=3)
    got = np.einsum("bthd,bshd->bhts", lq, lk)
    t = np.arange(6)
    angle = np.asarray(theta)[None, :, None, None, :] * (t[:, None] - t[None, :])[None, None, :, :, None]
    want = np.einsum("bthd,bshd,bhtsd->bhts", q, k, np.cos(angle))
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_lightning_entry_points_prefill_decode_and_quadratic_agree():
    q, k, v = rand(3, 1, 20, 2, 8), rand(4, 1, 20, 2, 8), rand(5, 1, 20, 2, 6)
    decay = -alibi_slopes(2)
    full = jax.jit(decayed_linear_attention_quadratic)(q, k, v, decay)
    chunked = jax.jit(lambda q, k, v, a: lightning_attention(q, k, v, a, chunk_size=8, impl="xla"))
    np.testing.assert_allclose(chunked(q, k, v, decay), full, atol=1e-5)
    prefill = jax.jit(lambda q, k, v, a: lightning_prefill_with_state(q, k, v, None, a, chunk_size=4, impl="xla"))
    out, kv = prefill(q[:, :15], k[:, :15], v[:, :15], decay)
    np.testing.assert_allclose(out, full[:, :15], atol=1e-5)
    step = jax.jit(lightning_decode_step)
    for t in range(15, 20):
        o_t, kv = step(q[:, t], k[:, t], v[:, t], kv, decay)
        np.testing.assert_allclose(o_t, full[:, t], atol=1e-5)


def test_gated_linear_attention_matches_explicit_computation():
    layer = TNLGatedLinearAttention(16, 2, layer=1, num_layers=3, chunk_size=8, impl="xla", rngs=nnx.Rngs(0))
    x = rand(6, 2, 13, 16)
    q, k, v, u = np.split(np.asarray(x @ layer.qkvu.kernel[...]), 4, axis=-1)
    silu = lambda z: z / (1 + np.exp(-z))
    heads = lambda z: jnp.asarray(z.reshape(2, 13, 2, 8))
    slopes = 2.0 ** -np.array([4.0, 8.0]) * (1 - 1 / 2 + 1e-5)
    o = jax.jit(lambda q, k, v, a: linear_attention(q, k, v, log_decay=a, impl="reference"))(
        heads(silu(q)), heads(silu(k)), heads(v), jnp.asarray(-slopes, jnp.float32)).reshape(2, 13, 16)
    o = np.asarray(o) / np.sqrt(np.mean(np.asarray(o) ** 2, -1, keepdims=True) + 1e-6)
    want = (o * u) @ np.asarray(layer.out.kernel[...])
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, x), want, atol=2e-5)


def test_block_is_causal_and_keeps_shape_with_lrpe():
    block = TNLBlock(16, 2, 32, layer=0, num_layers=2, use_lrpe=True, chunk_size=8, impl="xla", rngs=nnx.Rngs(1))
    x = rand(7, 1, 11, 16)
    forward = nnx.jit(lambda m, x: m(x))
    y = forward(block, x)
    assert y.shape == x.shape and np.all(np.isfinite(y))
    y2 = forward(block, x.at[:, 7:].set(rand(8, 1, 4, 16)))
    np.testing.assert_allclose(y2[:, :7], y[:, :7], atol=1e-5)  # future tokens do not leak back
    assert not np.allclose(y2[:, 7:], y[:, 7:])


def test_lrpe_rejects_wrong_theta():
    with pytest.raises(ValueError, match="theta must have shape"):
        lrpe(rand(0, 1, 4, 2, 4), jnp.ones((2, 3)))
