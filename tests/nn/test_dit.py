"""TinyDiT (jattn.nn.dit): shapes, adaLN-Zero identity at init, the attention hooks, bad arguments."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.core.reference import reference_attention
from jattn.nn.attention import Attention
from jattn.nn.dit import DiTBlock, TinyDiT, modulate, sincos_pos_embed_2d, timestep_embedding

SMALL = dict(image_size=8, channels=1, patch_size=2, dim=16, depth=2, num_heads=2, num_classes=3)


def _inputs(seed=0, B=2, size=8, classes=3):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (B, size, size, 1))
    t = jax.random.randint(k2, (B,), 0, 1000)
    y = jax.random.randint(k3, (B,), 0, classes + 1)
    return x, t, y


def _randomize_zero_inits(model, seed=1, std=0.3):
    """Gives the zero-initialised modulation and output layers random weights (a 'trained' model)."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    layers = [b.adaLN for b in model.blocks] + [model.final_adaLN, model.final_linear]
    for layer in layers:
        layer.kernel.value = jax.random.normal(next(keys), layer.kernel.value.shape) * std
        layer.bias.value = jax.random.normal(next(keys), layer.bias.value.shape) * std
    return model


def test_shapes_of_output_maps_and_features():
    """Catches a wrong patchify/unpatchify shape or a missing per-layer map/feature."""
    model = TinyDiT(rngs=nnx.Rngs(0), **SMALL)
    x, t, y = _inputs()
    eps, maps, feats = model(x, t, y, return_probs=True, return_features=True)
    assert eps.shape == x.shape
    assert len(maps) == 2 and all(m.shape == (2, 2, 16, 16) for m in maps)
    np.testing.assert_allclose(np.asarray(maps[0]).sum(-1), 1.0, atol=1e-5)
    assert len(feats) == 2 and all(f.shape == (2, 16, 16) for f in feats)
    assert model.null_class == 3


def test_patchify_then_unpatchify_is_the_identity():
    """Catches a transposition mismatch between patchify and unpatchify (pixels would be scrambled)."""
    model = TinyDiT(rngs=nnx.Rngs(0), **SMALL)
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
    np.testing.assert_array_equal(model.unpatchify(model.patchify(x)), x)
    # patch (0, 1) holds pixels rows 0..1, cols 2..3
    np.testing.assert_array_equal(model.patchify(x)[0, 1], x[0, 0:2, 2:4, 0].reshape(-1))


def test_adaln_zero_makes_every_block_the_identity_and_the_output_zero_at_init():
    """Catches a missing zero-init of the modulation (or of the final layer) or a missing gate."""
    model = TinyDiT(rngs=nnx.Rngs(0), **SMALL)
    x, t, y = _inputs(1)
    c = model.condition(t, y)
    h = jax.random.normal(jax.random.key(5), (2, 16, 16))
    for block in model.blocks:
        np.testing.assert_array_equal(block(h, c), h)
    np.testing.assert_array_equal(model(x, t, y), jnp.zeros_like(x))
    # the property can fail: with random modulation weights the block is no longer the identity
    _randomize_zero_inits(model)
    assert float(jnp.max(jnp.abs(model.blocks[0](h, c) - h))) > 1e-2


def test_zero_gates_alone_make_the_block_the_identity():
    """Catches a block that drops a gate (a branch added without gate1/gate2 multiplying it)."""
    block = DiTBlock(16, 2, rngs=nnx.Rngs(0))
    key = jax.random.key(2)
    kernel = jax.random.normal(key, block.adaLN.kernel.value.shape) * 0.5
    dim = 16   # chunks: shift1, scale1, gate1, shift2, scale2, gate2
    for gate in (2, 5):
        kernel = kernel.at[:, gate * dim:(gate + 1) * dim].set(0.0)
    block.adaLN.kernel.value = kernel
    h, c = jax.random.normal(jax.random.key(3), (2, 5, 16)), jax.random.normal(jax.random.key(4), (2, 16))
    np.testing.assert_allclose(block(h, c), h, atol=1e-6)


def test_modulate_and_embeddings_match_hand_values():
    """Catches ``x * scale`` instead of ``x * (1 + scale)``, or swapped sin/cos halves."""
    x = jnp.ones((1, 2, 3))
    np.testing.assert_allclose(modulate(x, jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[0.0, 1.0, -1.0]])),
                               [[[2.0, 4.0, 3.0], [2.0, 4.0, 3.0]]])
    emb = timestep_embedding(jnp.array([0, 3]), 8)
    np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-7)
    freqs = 10000.0 ** (-np.arange(4) / 4)
    np.testing.assert_allclose(emb[1], np.concatenate([np.cos(3 * freqs), np.sin(3 * freqs)]), rtol=1e-5)
    pos = sincos_pos_embed_2d(8, 3)
    assert pos.shape == (9, 8)
    omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
    row, col = 1, 2      # token index 5
    np.testing.assert_allclose(pos[5], np.concatenate([np.sin(row * omega), np.cos(row * omega),
                                                       np.sin(col * omega), np.cos(col * omega)]), rtol=1e-6)


def test_class_label_changes_the_prediction_of_a_trained_like_model():
    """Catches a class embedding that is never added to the conditioning vector."""
    model = _randomize_zero_inits(TinyDiT(rngs=nnx.Rngs(0), **SMALL))
    x, t, _ = _inputs(2)
    a = model(x, t, jnp.array([0, 0]))
    b = model(x, t, jnp.array([1, 1]))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4


def test_identity_prob_mod_and_reimplemented_core_reproduce_the_plain_forward():
    """Catches a hook path that changes the layer's projections, scale or output projection."""
    model = _randomize_zero_inits(TinyDiT(rngs=nnx.Rngs(0), **SMALL))
    x, t, y = _inputs(3)
    plain = model(x, t, y)
    with_mod = model(x, t, y, prob_mods={0: lambda p: p, 1: lambda p: p})
    np.testing.assert_allclose(with_mod, plain, atol=1e-5)
    core = model(x, t, y, attn_fns={1: lambda q, k, v: reference_attention(q, k, v)})
    np.testing.assert_allclose(core, plain, atol=1e-5)


def test_prob_mod_to_identity_equals_an_attention_that_returns_v():
    """SoftPAG's u=1 (probabilities replaced by I) must equal a core returning V; catches a hook applied to
    the wrong layer or ignored, and return_probs not reporting the modified map."""
    model = _randomize_zero_inits(TinyDiT(rngs=nnx.Rngs(0), **SMALL))
    x, t, y = _inputs(4)
    eye = lambda p: jnp.broadcast_to(jnp.eye(p.shape[-1]), p.shape)
    out_mod, maps = model(x, t, y, prob_mods={1: eye}, return_probs=True)
    out_v = model(x, t, y, attn_fns={1: lambda q, k, v: v})
    np.testing.assert_allclose(out_mod, out_v, atol=1e-5)
    np.testing.assert_allclose(maps[1], jnp.broadcast_to(jnp.eye(16), maps[1].shape), atol=1e-6)
    assert float(jnp.max(jnp.abs(out_mod - model(x, t, y)))) > 1e-4
    _, maps_v = model(x, t, y, attn_fns={1: lambda q, k, v: v}, return_probs=True)
    assert maps_v[1] is None and maps_v[0] is not None


def test_a_blocks_attention_is_replaceable_by_another_attention_module():
    """``blocks[i].attn`` is the layer: a copy with the same weights gives the same output; another
    method changes it (catches a model that does not route through the attribute)."""
    model = _randomize_zero_inits(TinyDiT(rngs=nnx.Rngs(0), **SMALL))
    x, t, y = _inputs(5)
    plain = model(x, t, y)
    old = model.blocks[0].attn
    new = Attention(16, 2, method="sigmoid", causal=False, use_bias=True, rngs=nnx.Rngs(9))
    nnx.update(new, nnx.state(old))
    model.blocks[0].attn = new
    assert float(jnp.max(jnp.abs(model(x, t, y) - plain))) > 1e-4
    same = Attention(16, 2, method="softmax", causal=False, use_bias=True, rngs=nnx.Rngs(9))
    nnx.update(same, nnx.state(old))
    model.blocks[0].attn = same
    np.testing.assert_allclose(model(x, t, y), plain, atol=1e-6)


def test_learned_position_embedding_is_a_parameter_and_runs_under_jit():
    """Catches a learned position table that is not trainable (not an nnx.Param)."""
    model = TinyDiT(rngs=nnx.Rngs(0), pos_embed="learned", **SMALL)
    assert isinstance(model.pos_embed, nnx.Param)
    assert not isinstance(TinyDiT(rngs=nnx.Rngs(0), **SMALL).pos_embed, nnx.Param)
    x, t, y = _inputs(6)
    out = nnx.jit(lambda m, x, t, y: m(x, t, y))(model, x, t, y)
    assert out.shape == x.shape


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=10, patch_size=4), "image_size"),
    (dict(pos_embed="rope"), "pos_embed"),
    (dict(dim=0), "dim"),
    (dict(mlp_ratio=-1.0), "mlp_ratio"),
    (dict(method="nope"), "method"),
    (dict(method_config=[1]), "method_config"),
])
def test_bad_constructor_arguments_raise_naming_them(kwargs, match):
    """Catches silent acceptance of a malformed configuration."""
    with pytest.raises((ValueError, TypeError), match=match):
        TinyDiT(rngs=nnx.Rngs(0), **{**SMALL, **kwargs})


def test_bad_call_arguments_raise_naming_them():
    """Catches silent broadcasting of t or y, out-of-range labels and malformed hooks."""
    model = TinyDiT(rngs=nnx.Rngs(0), **SMALL)
    x, t, y = _inputs(7)
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :4], t, y)
    with pytest.raises(ValueError, match="t must be"):
        model(x, t[:1], y)
    with pytest.raises(ValueError, match="y must"):
        model(x, t, jnp.array([0, 4]))
    with pytest.raises(ValueError, match="y must"):
        model(x, t, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="prob_mods"):
        model(x, t, y, prob_mods={2: lambda p: p})
    with pytest.raises(TypeError, match="attn_fns"):
        model(x, t, y, attn_fns={0: "v"})
    with pytest.raises(ValueError, match="one hook per layer"):
        model(x, t, y, prob_mods={0: lambda p: p}, attn_fns={0: lambda q, k, v: v})
    with pytest.raises(ValueError, match="attn_fn must return"):
        model(x, t, y, attn_fns={0: lambda q, k, v: v[..., :1]})
