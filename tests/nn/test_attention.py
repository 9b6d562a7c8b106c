"""jattn.nn.Attention: the method registry, exactness against the reference, GQA, RoPE, decoding, probs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.core import masks
from jattn.core.reference import reference_attention
from jattn.nn import (Attention, apply_rope, available_methods, get_method, register_method, sigmoid_attention,
                      unregister_method)
from jattn.nn.methods import AttentionMethod

TOL = dict(atol=2e-5, rtol=2e-5)
# Module tests run the reference core (fast in eager mode); one test checks the default fused path.
REF = {"impl": "reference"}


def _x(B=2, T=12, dim=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, dim))


def _manual(attn: Attention, x, **ref_kwargs):
    """Projections by hand, then the fp32 reference, then the output projection."""
    B, T, _ = x.shape
    q = (x @ attn.query.kernel[...]).reshape(B, T, attn.num_heads, attn.head_dim)
    k = (x @ attn.key.kernel[...]).reshape(B, T, attn.num_kv_heads, attn.head_dim)
    v = (x @ attn.value.kernel[...]).reshape(B, T, attn.num_kv_heads, attn.head_dim)
    out = reference_attention(q, k, v, **ref_kwargs).reshape(B, T, -1)
    return out @ attn.out.kernel[...]


def test_registry_lists_the_wired_methods_and_rejects_unknown_names():
    assert {"softmax", "sliding_window", "masked", "sigmoid"} <= set(available_methods())
    with pytest.raises(ValueError, match="method must be one of"):
        get_method("not_a_method")
    with pytest.raises(ValueError, match="already registered"):
        register_method(get_method("softmax"))


def test_unknown_or_bad_method_config_names_the_argument():
    with pytest.raises(TypeError, match="unknown config"):
        Attention(16, 2, rngs=nnx.Rngs(0), method="softmax", window=3)
    with pytest.raises(ValueError, match="window"):
        Attention(16, 2, rngs=nnx.Rngs(0), method="sliding_window", window=-1)
    with pytest.raises(TypeError, match="window"):
        Attention(16, 2, rngs=nnx.Rngs(0), method="sliding_window", window=(1, 2, 3))
    with pytest.raises(TypeError, match="needs config 'window'"):
        Attention(16, 2, rngs=nnx.Rngs(0), method="sliding_window")
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(16, 4, num_kv_heads=3, rngs=nnx.Rngs(0))
    attn = Attention(16, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x must be"):
        attn(jnp.ones((2, 3, 8)))
    with pytest.raises(ValueError, match="init_cache"):
        attn(jnp.ones((2, 1, 16)), decode=True)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_softmax_attention_equals_reference_with_gqa(num_kv_heads):
    attn = Attention(32, 4, num_kv_heads=num_kv_heads, rngs=nnx.Rngs(1), **REF)
    x = _x()
    np.testing.assert_allclose(attn(x), _manual(attn, x, causal=True), **TOL)


def test_sliding_window_equals_reference_window_and_masked_pattern():
    x = _x(T=20)
    # one window convention: window=4 is jattn.attention's window=(4, 0) under causal (query + 4 keys before)
    sw = Attention(32, 4, rngs=nnx.Rngs(2), method="sliding_window", window=4, **REF)
    np.testing.assert_allclose(sw(x), _manual(sw, x, causal=True, window=(4, 0)), **TOL)
    masked = Attention(32, 4, rngs=nnx.Rngs(2), method="masked", mask_fn=masks.sliding_window_mask(4, 0), **REF)
    np.testing.assert_allclose(masked(x), sw(x), **TOL)
    # and it differs from full causal attention, so the window is really applied
    full = Attention(32, 4, rngs=nnx.Rngs(2), **REF)
    assert float(jnp.max(jnp.abs(full(x) - sw(x)))) > 1e-3


def test_default_fused_path_matches_the_reference_under_jit():
    x = _x(T=32)
    fused = Attention(32, 4, num_kv_heads=2, rngs=nnx.Rngs(1), method="sliding_window", window=8)
    ref = Attention(32, 4, num_kv_heads=2, rngs=nnx.Rngs(1), method="sliding_window", window=8, **REF)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(fused, x), ref(x), **TOL)


def test_return_probs_rows_are_causal_distributions():
    attn = Attention(32, 4, rngs=nnx.Rngs(3))
    out, probs = attn(_x(), return_probs=True)
    assert probs.shape == (2, 4, 12, 12)
    np.testing.assert_allclose(jnp.sum(probs, -1), 1.0, atol=1e-5)
    assert float(jnp.max(jnp.abs(jnp.triu(probs, k=1)))) == 0.0
    np.testing.assert_allclose(out, attn(_x()), **TOL)


@pytest.mark.parametrize("method,config", [
    ("softmax", REF), ("sliding_window", {"window": 4, **REF}),
    ("masked", {"mask_fn": masks.sink_local_mask(2, 3), **REF}), ("sigmoid", {"normalize": False}),
])
def test_decoding_with_a_cache_equals_the_full_forward(method, config):
    x = _x(T=11)
    attn = Attention(32, 4, num_kv_heads=2, rope=True, rngs=nnx.Rngs(4), method=method, **config)
    full = nnx.jit(lambda m, x: m(x))(attn, x)
    attn.init_cache(2, 16)
    decode = nnx.jit(lambda m, x: m(x, decode=True))
    prefix = decode(attn, x[:, :5])                     # a prompt chunk, then one token at a time
    steps = [decode(attn, x[:, t:t + 1]) for t in range(5, 11)]
    np.testing.assert_allclose(jnp.concatenate([prefix, *steps], 1), full, **TOL)
    assert int(attn.cache_index[...]) == 11


def test_rope_preserves_norms_and_depends_only_on_relative_position():
    q = jax.random.normal(jax.random.key(5), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(6), (1, 1, 1, 16))

    def score(i, j):
        return jnp.sum(apply_rope(q, jnp.array([[i]])) * apply_rope(k, jnp.array([[j]])))

    np.testing.assert_allclose(score(7, 3), score(107, 103), rtol=1e-4)
    assert abs(float(score(7, 3) - score(7, 5))) > 1e-4
    np.testing.assert_allclose(jnp.linalg.norm(apply_rope(q, jnp.array([[9]]))), jnp.linalg.norm(q), rtol=1e-5)


def test_unnormalised_sigmoid_is_sigmoid_scores_times_causal_mask_times_v():
    key = jax.random.split(jax.random.key(7), 3)
    q, k, v = (jax.random.normal(kk, (1, 6, 2, 8)) for kk in key)
    out, w = sigmoid_attention(q, k, v, causal=True, return_probs=True)
    s = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(8.0)
    expected_w = jax.nn.sigmoid(s) * jnp.tril(jnp.ones((6, 6)))
    np.testing.assert_allclose(w, expected_w, atol=1e-6)
    np.testing.assert_allclose(out, jnp.einsum("bhts,bshd->bthd", expected_w, v), atol=1e-5)


def test_softmax_is_shift_invariant_and_sigmoid_is_not():
    key = jax.random.split(jax.random.key(8), 3)
    q, k, v = (jax.random.normal(kk, (1, 6, 2, 8)) for kk in key)
    shift = jnp.full((1, 1, 6, 1), 3.0)  # the same constant added to every logit of a row
    np.testing.assert_allclose(reference_attention(q, k, v, bias=shift), reference_attention(q, k, v), atol=1e-5)
    for normalize in (False, True):
        plain = sigmoid_attention(q, k, v, causal=False, normalize=normalize)
        shifted = sigmoid_attention(q, k, v, causal=False, normalize=normalize, bias=3.0)
        assert float(jnp.max(jnp.abs(plain - shifted))) > 1e-3


def test_a_new_method_plugs_in_with_one_registry_entry():
    def doubled_softmax(q, k, v, *, causal, mask, scale, return_probs):
        return 2.0 * reference_attention(q, k, v, causal=causal, mask=mask, scale=scale)

    register_method(AttentionMethod("test_doubled", doubled_softmax, lambda config: dict(config),
                                    decode_mask=lambda config: masks.full_mask(), supports_probs=False),
                    overwrite=True)
    try:
        x = _x()
        custom = Attention(32, 4, rngs=nnx.Rngs(9), method="test_doubled")
        base = Attention(32, 4, rngs=nnx.Rngs(9), **REF)
        np.testing.assert_allclose(custom(x), 2.0 * base(x), **TOL)
        with pytest.raises(ValueError, match="return_probs"):
            custom(x, return_probs=True)
    finally:
        unregister_method("test_doubled")
    assert "test_doubled" not in available_methods()


@pytest.mark.skipif("lightning" not in available_methods(), reason="jattn.ops.linear is not importable")
def test_lightning_is_decayed_silu_linear_attention_with_srms_norm_and_decodes_through_its_state():
    from jattn.core.decay import alibi_log_decay
    B, T, dim, H = 2, 20, 32, 4
    x = _x(B=B, T=T)
    attn = Attention(dim, H, rngs=nnx.Rngs(10), method="lightning", layer_index=1, num_layers=3, chunk_size=8)
    q = jax.nn.silu((x @ attn.query.kernel[...]).reshape(B, T, H, 8))
    k = jax.nn.silu((x @ attn.key.kernel[...]).reshape(B, T, H, 8))
    v = (x @ attn.value.kernel[...]).reshape(B, T, H, 8)
    lam = jnp.exp(alibi_log_decay(H, layer=1, num_layers=3))
    t = jnp.arange(T)
    decay = jnp.where(t[:, None] >= t[None, :], lam[:, None, None] ** (t[:, None] - t[None, :]), 0.0)
    o = jnp.einsum("hts,bthd,bshd,bshe->bthe", decay, q, k, v).reshape(B, T, H * 8)
    o = o / jnp.sqrt(jnp.mean(o ** 2, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(attn, x), o @ attn.out.kernel[...], atol=5e-5, rtol=5e-5)
    full = nnx.jit(lambda m, x: m(x))(attn, x)
    attn.init_cache(B, 32)
    decode = nnx.jit(lambda m, x: m(x, decode=True))
    out = jnp.concatenate([decode(attn, x[:, :8])] + [decode(attn, x[:, s:s + 1]) for s in range(8, T)], 1)
    np.testing.assert_allclose(out, full, **TOL)
    with pytest.raises(ValueError, match="return_probs"):
        attn(x, return_probs=True)


@pytest.mark.skipif("block_sparse" not in available_methods(), reason="jattn.ops.block_sparse is not importable")
def test_block_sparse_pattern_equals_the_dense_masked_pattern_and_decodes():
    x = _x(T=40)
    pattern = masks.sink_local_mask(4, 16)
    sparse = Attention(32, 4, rngs=nnx.Rngs(11), method="block_sparse", mask_fn=pattern)
    dense = Attention(32, 4, rngs=nnx.Rngs(11), method="masked", mask_fn=pattern, **REF)
    full = nnx.jit(lambda m, x: m(x))(sparse, x)
    np.testing.assert_allclose(full, dense(x), **TOL)
    sparse.init_cache(2, 48)
    decode = nnx.jit(lambda m, x: m(x, decode=True))
    out = jnp.concatenate([decode(sparse, x[:, :20])] + [decode(sparse, x[:, s:s + 1]) for s in range(20, 40)], 1)
    np.testing.assert_allclose(out, full, **TOL)
