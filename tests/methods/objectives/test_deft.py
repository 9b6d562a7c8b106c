"""P25 DEFT: the smooth density loss, the exact density measure, LoRA and the sowing MLP."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.objectives import deft
from jattn.nn.models import BertEncoder, DecoderLM


def _rand(seed, shape, scale=1.0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * scale


def _tiny_bert(seed=0):
    return BertEncoder(64, 32, 2, 4, mlp_dim=48, max_position=16, rngs=nnx.Rngs(seed))


def test_density_surrogate_of_a_hand_built_tensor():
    """Catches: a sum instead of the mean over (t, f), eps added to the numerator, |a| instead of a^2,
    or the mean taken over the batch (the result is per sample)."""
    eps = 0.25
    acts = jnp.asarray([[[0.0, 0.5], [1.0, -0.5]],
                        [[2.0, 0.0], [0.0, 0.0]]], jnp.float32)
    # a^2/(a^2+eps): 0 -> 0, +-0.5 -> 0.25/0.5 = 0.5, 1 -> 1/1.25 = 0.8, 2 -> 4/4.25
    want = np.asarray([(0 + 0.5 + 0.8 + 0.5) / 4, (4 / 4.25) / 4])
    np.testing.assert_allclose(np.asarray(deft.density_surrogate(acts, eps)), want, rtol=1e-6)


def test_density_loss_is_the_mean_over_samples_and_layers_and_lies_in_0_1():
    """Catches: a sum over layers (the official code takes .mean() over the [B, L] matrix) or a weighted mean
    by width (layers of different F count equally)."""
    a = _rand(0, (3, 5, 8))
    b = _rand(1, (3, 5, 16), 0.01)
    eps = 1e-4
    want = np.mean(np.stack([np.asarray(deft.density_surrogate(a, eps)), np.asarray(deft.density_surrogate(b, eps))]))
    got = float(deft.density_loss([a, b], eps))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert 0.0 <= got <= 1.0


def test_surrogate_tends_to_the_exact_density_as_eps_goes_to_0():
    """Catches: a surrogate that does not approximate 1[a != 0] (e.g. a^2 alone or a sign error on eps)."""
    acts = _rand(2, (2, 7, 11)) * (jax.random.uniform(jax.random.key(3), (2, 7, 11)) > 0.4)
    exact = np.asarray(deft.activation_density(acts))
    errors = [np.max(np.abs(np.asarray(deft.density_surrogate(acts, e)) - exact)) for e in (1e-1, 1e-4, 1e-8)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3


def test_activation_density_on_a_known_tensor():
    """Catches: counting zeros instead of non-zeros, >= tol instead of > tol, ignoring the sign (|a|)
    or the padding mask."""
    acts = jnp.asarray([[[0.0, 0.2, -0.3], [0.05, 0.0, 0.0]]], jnp.float32)  # B=1, T=2, F=3
    np.testing.assert_allclose(np.asarray(deft.activation_density(acts)), [3 / 6])
    np.testing.assert_allclose(np.asarray(deft.activation_density(acts, tol=0.2)), [1 / 6])
    np.testing.assert_allclose(np.asarray(deft.positive_fraction(acts)), [2 / 6])
    mask = jnp.asarray([[1, 0]])
    np.testing.assert_allclose(np.asarray(deft.activation_density(acts, mask=mask)), [2 / 3])
    np.testing.assert_allclose(np.asarray(deft.density_surrogate(acts, 1e-12, mask=mask)), [2 / 3], rtol=1e-5)


def test_weight_zero_equals_the_plain_peft_loss_exactly():
    """Catches: the density term added with weight 0 still changing the total (e.g. a NaN from it leaking, or
    weight applied to the task loss)."""
    task = jnp.float32(0.123456789)
    acts = [_rand(4, (2, 3, 5)), _rand(5, (2, 3, 5))]
    total, density = deft.deft_loss(task, acts, weight=0.0)
    assert total is task or bool(total == task)
    total1, _ = deft.deft_loss(task, acts, weight=1.0)
    np.testing.assert_allclose(float(total1), float(task) + float(density), rtol=1e-6)
    assert float(total1) > float(task)


def test_lora_b_zero_init_leaves_the_model_bit_identical():
    """Catches: a random B init, the alpha/r scale applied to the base path, or a DeftMLP that computes the
    MLP differently from jattn.nn.models.MLP."""
    model = _tiny_bert()
    ids = jax.random.randint(jax.random.key(6), (2, 9), 0, 64)
    mask = jnp.ones((2, 9), jnp.int32).at[1, 6:].set(0)
    before = model(ids, mask)
    deft.apply_deft(model, targets=("query", "key", "value", "out", "up", "down"), seed=3)
    after = model(ids, mask)
    assert np.array_equal(np.asarray(before), np.asarray(after))
    acts = deft.pop_activations(model)
    assert len(acts) == 2 and acts[0].shape == (2, 9, 48)
    assert not hasattr(model.blocks[0].mlp, "activation")


def test_lora_adds_the_scaled_low_rank_update():
    """Catches: a missing alpha/rank scale, the product taken as B A, or the update not added."""
    base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    lora = deft.LoRALinear(base, rank=2, alpha=3.0, rngs=nnx.Rngs(1))
    lora.lora_b[...] = _rand(7, (2, 5))
    x = _rand(8, (4, 6))
    want = base(x) + (x @ lora.lora_a[...]) @ lora.lora_b[...] * 1.5
    np.testing.assert_allclose(np.asarray(lora(x)), np.asarray(want), rtol=1e-5, atol=1e-6)
    bound = 1 / math.sqrt(6)
    assert float(jnp.max(jnp.abs(lora.lora_a[...]))) <= bound and float(jnp.std(lora.lora_a[...])) > 0.1 * bound


def test_only_lora_params_receive_gradients():
    """Catches: a trainable filter that selects every nnx.Param (the backbone would train) or LoRA applied to
    the wrong matrices (official DEFT: query and value)."""
    model = deft.apply_deft(_tiny_bert(1), seed=0)
    graphdef, lora, rest = nnx.split(model, deft.TRAINABLE, ...)
    names = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(lora)}
    assert names and all(n.split("/")[-1] in ("lora_a", "lora_b") for n in names)
    assert {n.split("/")[3] for n in names} == {"query", "value"}
    assert len(names) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    ids = jax.random.randint(jax.random.key(9), (2, 7), 0, 64)

    def loss(lora, ids):
        m = nnx.merge(graphdef, lora, rest)
        m(ids)
        return deft.density_loss(deft.pop_activations(m), 1e-3)

    grads = jax.jit(jax.grad(loss))(lora, ids)
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(grads)}
    assert set(flat) == names
    # B=0: the gradient flows to B, not yet to A
    assert all(float(jnp.max(jnp.abs(v[...]))) > 0 for n, v in flat.items() if n.endswith("lora_b"))
    assert all(float(jnp.max(jnp.abs(v[...]))) == 0 for n, v in flat.items() if n.endswith("lora_a"))


def test_gradient_steps_lower_the_density_loss_of_a_small_lm():
    """Catches: a density loss whose gradient points the wrong way (e.g. a sign flip, or eps in the
    numerator) or that does not reach the LoRA weights of the MLP inputs."""
    model = deft.apply_deft(DecoderLM(32, 32, 1, 4, mlp="swiglu", rngs=nnx.Rngs(2)), targets=("gate",), seed=1)
    graphdef, lora, rest = nnx.split(model, deft.TRAINABLE, ...)
    tokens = jax.random.randint(jax.random.key(10), (4, 12), 0, 32)

    def loss(lora, tokens):
        m = nnx.merge(graphdef, lora, rest)
        m(tokens)
        return deft.density_loss(deft.pop_activations(m), 1e-4)

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    first, _ = value_and_grad(lora, tokens)
    for _ in range(5):
        last, grads = value_and_grad(lora, tokens)
        lora = jax.tree.map(lambda w, g: w - 0.05 * g, lora, grads)
    assert float(last) < float(first) - 1e-3


@pytest.mark.parametrize("call, match", [
    (lambda: deft.density_surrogate(jnp.ones((2, 3)), 1e-7), "rank 3"),
    (lambda: deft.density_surrogate(jnp.ones((2, 3, 4)), 0.0), "eps"),
    (lambda: deft.density_surrogate(jnp.ones((2, 3, 4), jnp.int32), 1e-7), "floating"),
    (lambda: deft.activation_density(jnp.ones((2, 3, 4)), -1.0), "tol"),
    (lambda: deft.activation_density(jnp.ones((2, 3, 4)), mask=jnp.ones((2, 4))), "mask"),
    (lambda: deft.density_loss([]), "acts_list"),
    (lambda: deft.density_loss([jnp.ones((2, 3, 4)), jnp.ones((1, 3, 4))]), r"acts_list\[1\]"),
    (lambda: deft.deft_loss(0.0, [jnp.ones((1, 2, 3))], weight=-1.0), "weight"),
    (lambda: deft.LoRALinear(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), rank=0, rngs=nnx.Rngs(0)), "rank"),
    (lambda: deft.apply_deft(_tiny_bert(), targets=("qkv",)), "targets"),
    (lambda: deft.apply_deft(_tiny_bert(), targets=("gate",)), "gate"),
    (lambda: deft.apply_deft(deft.apply_deft(_tiny_bert())), "already"),
    (lambda: deft.pop_activations(_tiny_bert()), "DeftMLP"),
])
def test_bad_arguments_raise_naming_them(call, match):
    """Catches: silent acceptance of a wrong rank, eps <= 0, an int tensor, a mismatched mask or batch,
    an unknown LoRA target, a double application."""
    with pytest.raises((ValueError, TypeError), match=match):
        call()
