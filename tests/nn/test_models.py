"""Blocks and models: causality, decoding, padding invariance, ViT/BERT shapes, TNL pieces."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.nn import MLP, BertEncoder, DecoderLM, TransformerBlock, ViT, mean_pool, srms_norm

REF = {"impl": "reference"}


def _call(model, *args, **kwargs):
    """Runs a module call under nnx.jit (eager dispatch of every op is far slower on CPU)."""
    return nnx.jit(lambda m, *a: m(*a, **kwargs))(model, *args)


def _tokens(B=2, T=10, vocab=40, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, vocab)


def test_decoder_lm_is_causal_and_decodes_like_its_forward():
    model = DecoderLM(40, 32, 2, 4, num_kv_heads=2, method_config=REF, rngs=nnx.Rngs(0))
    tokens = _tokens()
    logits = _call(model, tokens)
    assert logits.shape == (2, 10, 40) and logits.dtype == jnp.float32
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 40)
    changed_logits = _call(model, changed)
    np.testing.assert_allclose(changed_logits[:, :7], logits[:, :7], atol=1e-5)
    assert float(jnp.max(jnp.abs(changed_logits[:, 7:] - logits[:, 7:]))) > 1e-4
    model.init_cache(2, 12)
    decode = nnx.jit(lambda m, t: m(t, decode=True))
    decoded = jnp.concatenate([decode(model, tokens[:, :4])]
                              + [decode(model, tokens[:, t:t + 1]) for t in range(4, 10)], axis=1)
    np.testing.assert_allclose(decoded, logits, atol=2e-5, rtol=2e-5)


def test_decoder_lm_returns_one_attention_map_per_layer_and_accepts_hybrid_layers():
    model = DecoderLM(40, 32, 2, 4, rngs=nnx.Rngs(1),
                      layer_methods=[("softmax", REF), ("sliding_window", {"window": 2, **REF})])
    logits, maps = _call(model, _tokens(), return_probs=True)
    assert len(maps) == 2 and maps[1].shape == (2, 4, 10, 10)
    # window=2: the query and the 2 keys before it, so exactly 3 keys on every row after the second
    assert int(jnp.max(jnp.sum(maps[1] > 0, -1))) == 3
    with pytest.raises(ValueError, match="layer_methods"):
        DecoderLM(40, 32, 2, 4, rngs=nnx.Rngs(1), layer_methods=[("softmax", {})])


def test_bert_encoder_ignores_padding_and_mean_pool_skips_it():
    model = BertEncoder(40, 32, 2, 4, max_position=16, method_config=REF, rngs=nnx.Rngs(2))
    tokens = _tokens(B=1, T=6)
    hidden = _call(model, tokens, jnp.ones_like(tokens))
    padded = jnp.concatenate([tokens, jnp.zeros((1, 3), tokens.dtype)], axis=1)
    mask = jnp.concatenate([jnp.ones((1, 6), jnp.int32), jnp.zeros((1, 3), jnp.int32)], axis=1)
    hidden_padded, maps = _call(model, padded, mask, return_probs=True)
    np.testing.assert_allclose(hidden_padded[:, :6], hidden, atol=1e-5)
    np.testing.assert_allclose(mean_pool(hidden_padded, mask), jnp.mean(hidden, axis=1), atol=1e-5)
    assert float(jnp.max(maps[0][..., 6:])) == 0.0       # nobody attends to padding
    with pytest.raises(ValueError, match="attention_mask"):
        model(tokens, jnp.ones((1, 5), jnp.int32))


def test_vit_classifies_images_and_trains_on_the_attention_method():
    model = ViT(8, 4, 3, 5, 32, 2, 4, method_config=REF, rngs=nnx.Rngs(3))
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    logits, maps = _call(model, images, return_probs=True)
    assert logits.shape == (2, 5) and maps[0].shape == (2, 4, 5, 5)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(images) ** 2)))(model)
    assert float(jnp.sum(jnp.abs(grads.blocks[0].attention.query.kernel[...]))) > 0
    with pytest.raises(ValueError, match="images must be"):
        model(jnp.ones((2, 9, 9, 3)))


def test_srms_norm_has_unit_rms_and_sglu_has_no_activation():
    x = jax.random.normal(jax.random.key(4), (3, 16)) * 5
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(srms_norm(x) ** 2, -1)), 1.0, rtol=1e-5)
    mlp = MLP(8, 16, kind="sglu", rngs=nnx.Rngs(0))
    y = jax.random.normal(jax.random.key(5), (2, 8))
    expected = ((y @ mlp.gate.kernel[...]) * (y @ mlp.up.kernel[...])) @ mlp.down.kernel[...]
    np.testing.assert_allclose(mlp(y), expected, atol=1e-5)
    # homogeneous of degree 2: a property no activation-based MLP has
    np.testing.assert_allclose(mlp(2 * y), 4 * mlp(y), rtol=1e-5, atol=1e-5)


def test_post_norm_block_output_is_layer_normalised():
    block = TransformerBlock(16, 2, norm="layer", norm_position="post", mlp="gelu", rngs=nnx.Rngs(6), **REF)
    out = _call(block, jax.random.normal(jax.random.key(7), (1, 5, 16)))
    np.testing.assert_allclose(jnp.mean(out, -1), 0.0, atol=1e-5)
