"""DecoderLM.generate: greedy tokens through either KV cache equal greedy decoding by recomputing the whole
sequence each step; the compiled step is traced once per input shape, not once per token.

Mutations caught: the cache append offset off by one, RoPE positions not advanced by the cache index,
the decode kernel's causal rule within the prefilled prompt, a paged cache whose new page is not recorded.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.core import masks
from jattn.nn import DecoderLM
from jattn.nn import models

VOCAB = 40


def lm(method="softmax", **config):
    return DecoderLM(VOCAB, 32, 2, 4, num_kv_heads=2, rngs=nnx.Rngs(0), method=method, method_config=config or None)


def assert_greedy(model, prompt, generated):
    """``generated`` is what greedy decoding by recomputing the whole sequence gives: by causality, one
    forward pass over prompt + generated holds every step's logits, and each token is the argmax before it."""
    sequence = jnp.concatenate([prompt, generated], axis=1)
    logits = nnx.jit(lambda model, tokens: model(tokens))(model, sequence)
    want = jnp.argmax(logits[:, prompt.shape[1] - 1:-1], axis=-1)
    np.testing.assert_array_equal(np.asarray(generated), np.asarray(want))


PROMPT = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 7)), jnp.int32)


@pytest.mark.parametrize("method, config", [
    ("softmax", {}), ("sliding_window", dict(window=4)),
    ("masked", dict(mask_fn=masks.sink_local_mask(2, 3)))], ids=["softmax", "sliding_window", "dense-mask path"])
def test_generate_equals_recomputing_the_whole_sequence(method, config):
    model = lm(method, **config)
    contiguous, paged = model.generate(PROMPT, 6, cache="contiguous"), model.generate(PROMPT, 6, cache="paged")
    np.testing.assert_array_equal(np.asarray(contiguous), np.asarray(paged))
    assert_greedy(model, PROMPT, contiguous)


def test_generation_compiles_once_per_shape():
    model = lm()
    models.GENERATION_TRACES.clear()
    model.generate(PROMPT, 9)
    assert dict(models.GENERATION_TRACES) == {(2, 7): 1, (2, 1): 1}


def test_generate_names_bad_arguments():
    model = lm()
    with pytest.raises(ValueError, match="prompt must be an int array"):
        model.generate(jnp.ones((2, 3)), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(PROMPT, 0)
    with pytest.raises(ValueError, match="kind must be one of"):
        model.generate(PROMPT, 2, cache="ring")


def test_prefill_runs_the_methods_own_path_and_fills_the_cache_like_decoding():
    """The prompt goes through the method's prefill ``apply`` over its own K/V (T x T), not the decode path
    over the whole cache; its logits and the cache it leaves equal the decode path's. Catches generate not
    passing prefill=True, and a prefill that skips the cache append."""
    from jattn.core.reference import reference_attention
    from jattn.nn import AttentionMethod, register_method, unregister_method
    seen = []

    def spy(q, k, v, *, causal, mask, scale, return_probs):
        seen.append((q.shape[1], k.shape[1]))
        return reference_attention(q, k, v, causal=causal, mask=mask, scale=scale)

    register_method(AttentionMethod("test_prefill_spy", spy, lambda config: dict(config), cache="kv",
                                    decode_mask=lambda config: masks.full_mask(), supports_probs=False),
                    overwrite=True)
    try:
        model = lm("test_prefill_spy")
        model.generate(PROMPT, 3)
        assert (7, 7) in seen
        logits = {}
        for prefill in (False, True):
            model.init_cache(2, 16)
            logits[prefill] = model(PROMPT, decode=True, prefill=prefill)
            cache = model.blocks[0].attention.kv_cache.get_value()
            assert int(cache.lengths[0]) == 7
        np.testing.assert_allclose(logits[True], logits[False], atol=2e-5, rtol=2e-5)
        with pytest.raises(ValueError, match="prefill=True needs an empty cache"):
            model(PROMPT, decode=True, prefill=True)
    finally:
        unregister_method("test_prefill_spy")
