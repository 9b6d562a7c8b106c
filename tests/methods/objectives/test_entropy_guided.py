"""P21 entropy-guided attention: the regulariser, the temperature attention and the NNX layer."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn.methods.objectives.entropy_guided import (EntropyGuidedAttention, entropy_from_logits, entropy_penalty,
                                                     entropy_reg_loss, entropy_reg_penalty, head_entropy,
                                                     model_thresholds, temperature_softmax_attention,
                                                     use_entropy_guided)
from jattn.nn.attention_maps import attention_entropy
from jattn.nn.models import DecoderLM


def _maps(key, L=2, B=2, H=3, T=5, S=5, sharp=1.0):
    logits = sharp * jax.random.normal(key, (L, B, H, T, S))
    return [jax.nn.softmax(l, axis=-1) for l in logits]


def _qkv(key, B=2, T=6, H=2, D=8):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (B, T, H, D)), jax.random.normal(kk, (B, T, H, D)),
            jax.random.normal(kv, (B, T, H, D)))


def test_entropy_of_a_uniform_row_is_log_n():
    """Catches a wrong log base or a missing minus sign in the entropy the regulariser reads."""
    n = 7
    uniform = jnp.full((1, 2, 3, n), 1.0 / n)
    np.testing.assert_allclose(head_entropy(uniform), math.log(n), rtol=1e-6)
    np.testing.assert_allclose(entropy_from_logits(jax.random.normal(jax.random.PRNGKey(0), (4, n)) * 0.0),
                               math.log(n), rtol=1e-6)


def test_online_entropy_identity_equals_the_explicit_entropy_under_a_causal_mask():
    """``lse - sum p s`` must equal ``-sum p log p`` of the masked softmax (catches summing over masked keys)."""
    s = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (2, 3, 6, 6))
    causal = jnp.tril(jnp.ones((6, 6), bool))
    explicit = attention_entropy(jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1))
    np.testing.assert_allclose(entropy_from_logits(s, causal), explicit, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("reduction", ["paper", "code"])
def test_penalty_is_zero_at_the_target_and_within_the_margin(reduction):
    """Uniform maps with theta = 1 sit exactly at E_max; theta = 1 - 0.15 is inside gamma = 0.2: both cost 0
    (catches a penalty without the tolerance indicator, or one measured against E_max instead of theta E_max)."""
    maps = [jnp.full((2, 3, 5, 5), 0.2)] * 2
    assert float(entropy_reg_penalty(maps, jnp.ones((2, 3)), reduction=reduction)) == 0.0
    assert float(entropy_reg_penalty(maps, jnp.full((2, 3), 0.85), reduction=reduction)) == 0.0
    assert float(entropy_reg_penalty(maps, jnp.full((2, 3), 0.75), reduction=reduction)) > 0.0


def test_penalty_outside_the_margin_is_the_squared_deviation_with_each_reduction():
    """Hand-built: uniform maps (E = log S), theta = 0.5 so delta = 0.5 log S. ``paper`` averages over layers and
    heads (catches a sum); ``code`` sums rows over batch and queries then divides by H and L (catches a mean)."""
    L, B, H, T, S = 2, 3, 4, 5, 5
    maps = [jnp.full((B, H, T, S), 1.0 / S)] * L
    delta2 = (0.5 * math.log(S)) ** 2
    theta = jnp.full((L, H), 0.5)
    np.testing.assert_allclose(entropy_reg_penalty(maps, theta, reduction="paper"), delta2, rtol=1e-6)
    np.testing.assert_allclose(entropy_reg_penalty(maps, theta, reduction="code"), B * T * delta2, rtol=1e-6)
    np.testing.assert_allclose(entropy_reg_loss(maps, theta, lam=3e-2), 3e-2 * delta2, rtol=1e-6)


def test_paper_reduction_penalises_the_head_mean_not_each_row():
    """Two rows at E_max and near 0 average to the target: zero under ``paper``, positive under ``code``
    (catches the two readings being swapped)."""
    S = 4
    rows = jnp.stack([jnp.full((S,), 1.0 / S), jnp.array([1.0, 0.0, 0.0, 0.0])])   # entropies log S and 0
    maps = [rows[None, None]]                                                     # [1, 1, 2, S]
    theta = jnp.full((1, 1), 0.5)
    assert float(entropy_reg_penalty(maps, theta, reduction="paper")) == pytest.approx(0.0, abs=1e-10)
    np.testing.assert_allclose(entropy_reg_penalty(maps, theta, reduction="code"), 2 * (0.5 * math.log(S)) ** 2,
                               rtol=1e-5)


def test_weight_zero_equals_the_baseline_loss_exactly():
    """``CE + 0 * L_ent`` is bit-equal to CE (catches a term that leaks through with lam = 0)."""
    maps = _maps(jax.random.PRNGKey(2))
    ce = jnp.float32(2.3456)
    reg = entropy_reg_loss(maps, jax.random.uniform(jax.random.PRNGKey(3), (2, 3)), lam=0.0, reduction="code")
    assert float(ce + reg) == float(ce)


def test_temperature_one_equals_plain_softmax_attention_and_t_rescales_the_logits():
    """``t = 1`` is ``jattn.attention``; ``t = c`` per head is the scale divided by c (catches t multiplying)."""
    q, k, v = _qkv(jax.random.PRNGKey(4))
    plain = jax.jit(lambda q, k, v: jattn.attention(q, k, v, causal=True))(q, k, v)
    tempered = jax.jit(lambda q, k, v, t: temperature_softmax_attention(q, k, v, t, causal=True))
    np.testing.assert_allclose(tempered(q, k, v, jnp.ones((2, 6))), plain, rtol=1e-5, atol=1e-5)
    t = jnp.array([0.5, 2.0])
    got = tempered(q, k, v, t)
    for h in range(2):
        want = jattn.attention(q[:, :, h:h + 1], k[:, :, h:h + 1], v[:, :, h:h + 1], causal=True,
                               scale=8 ** -0.5 / float(t[h]))
        np.testing.assert_allclose(got[:, :, h:h + 1], want, rtol=1e-5, atol=1e-5)


def test_a_large_temperature_gives_uniform_rows():
    """t -> infinity flattens every row to uniform over its visible keys (entropy log(i + 1))."""
    q, k, v = _qkv(jax.random.PRNGKey(5))
    _, probs = temperature_softmax_attention(q, k, v, jnp.full((2, 6), 1e6), causal=True, return_probs=True)
    np.testing.assert_allclose(attention_entropy(probs), jnp.broadcast_to(jnp.log(jnp.arange(1, 7.0)), (2, 2, 6)),
                               rtol=1e-4, atol=1e-5)


def test_a_per_position_temperature_changes_only_its_query_row():
    """``t[h, i]`` reads the query index (catches indexing by the key index or ignoring the position)."""
    q, k, v = _qkv(jax.random.PRNGKey(6))
    t = jnp.ones((2, 6))
    tempered = jax.jit(lambda t: temperature_softmax_attention(q, k, v, t, causal=True))
    base, moved = tempered(t), tempered(t.at[1, 3].set(0.3))
    diff = jnp.abs(moved - base).max(axis=(0, 3))                 # [T, H]
    assert float(diff[3, 1]) > 1e-3
    assert float(diff.at[3, 1].set(0.0).max()) == 0.0


def _lm(seed=0):
    return DecoderLM(256, 32, 2, 4, rngs=nnx.Rngs(seed))


def test_swapped_layers_keep_the_model_at_temperature_one():
    """``use_entropy_guided`` copies the projections: at t = 1 the logits match the softmax model's."""
    tokens = jax.random.randint(jax.random.PRNGKey(7), (2, 12), 0, 256)
    forward = nnx.jit(lambda m, t: m(t))
    base = forward(_lm(), tokens)
    model = use_entropy_guided(_lm(), max_len=16)
    np.testing.assert_allclose(forward(model, tokens), base, rtol=1e-4, atol=1e-4)
    assert model_thresholds(model).shape == (2, 4)


def test_gradient_reaches_the_temperatures_and_the_thresholds():
    """The regulariser's gradient is nonzero for the layer's ``t`` and ``theta`` (catches a stop-gradient or
    thresholds that are constants); temperatures of positions past the sequence get none."""
    layer = EntropyGuidedAttention(16, 2, rngs=nnx.Rngs(1), max_len=8, init_threshold=-1.0)
    x = jax.random.normal(jax.random.PRNGKey(8), (2, 6, 16))

    def loss(m):
        _, probs = m(x, return_probs=True)
        return entropy_reg_loss([probs], m.threshold[...][None], lam=1.0, reduction="code")

    grads = nnx.jit(nnx.grad(loss))(layer)
    t_grad, th_grad = grads["temperature"][...], grads["threshold"][...]
    assert float(jnp.abs(t_grad[:, 1:6]).min()) > 0 and float(jnp.abs(th_grad).min()) > 0
    assert float(jnp.abs(t_grad[:, 6:]).sum()) == 0.0


def test_bad_arguments_raise_naming_the_argument():
    maps = _maps(jax.random.PRNGKey(9))
    with pytest.raises(ValueError, match="theta must be"):
        entropy_reg_penalty(maps, jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="reduction"):
        entropy_reg_penalty(maps, jnp.ones((2, 3)), reduction="sum")
    with pytest.raises(ValueError, match="gamma"):
        entropy_penalty(jnp.ones(2), 0.5, 1.0, gamma=-1.0)
    with pytest.raises(ValueError, match="lam"):
        entropy_reg_loss(maps, jnp.ones((2, 3)), lam=-1.0)
    with pytest.raises(ValueError, match="return_probs"):
        entropy_reg_penalty([maps[0], None], jnp.ones((2, 3)))
    q, k, v = _qkv(jax.random.PRNGKey(10))
    with pytest.raises(ValueError, match="temperature must be"):
        temperature_softmax_attention(q, k, v, jnp.ones((3,)))
    layer = EntropyGuidedAttention(16, 2, rngs=nnx.Rngs(0), max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        layer(jnp.ones((1, 5, 16)))
    with pytest.raises(ValueError, match="max_len"):
        EntropyGuidedAttention(16, 2, rngs=nnx.Rngs(0), max_len=0)
    with pytest.raises(ValueError, match="method"):
        EntropyGuidedAttention(16, 2, rngs=nnx.Rngs(0), max_len=4, method="sigmoid")
