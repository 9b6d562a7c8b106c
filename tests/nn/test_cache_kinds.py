"""``Attention.init_cache`` kinds beyond the exact caches: int8 / int4 (KIVI-style quantised), H2O (P70) and
DuoAttention (P45), through ``Attention`` decoding and ``DecoderLM.generate``.

Mutations caught: a kind ignored (the exact cache used instead: the quantised outputs would equal it, the
selecting ones would not evict), int4 given for int8 (error over the int8 bound), the selecting caches'
per-token step given the wrong positions (RoPE), scale or token, their prefill skipped, and options passed
to the wrong kind or dropped.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.kv.duo_attention import DuoKVCache
from jattn.methods.kv.h2o import H2OCache
from jattn.nn import Attention, DecoderLM
from jattn.nn import models

DIM, HEADS, KV_HEADS = 32, 4, 2
PROMPT, NEW = 9, 4


SCALE = 0.3                            # not the default D ** -0.5, so a step that drops the layer's scale shows


def layer():
    return Attention(DIM, HEADS, num_kv_heads=KV_HEADS, rngs=nnx.Rngs(0), rope=True, causal=True, scale=SCALE)


def tokens():
    return jax.random.normal(jax.random.key(1), (2, PROMPT + NEW, DIM))


def decode(attn, x, kind, **options):
    """The layer's output for every token: the prompt prefilled, then one decode call per new token."""
    attn.init_cache(2, PROMPT + NEW, kind=kind, **options)
    outs = [attn(x[:, :PROMPT], decode=True, prefill=True)]
    outs += [attn(x[:, t:t + 1], decode=True) for t in range(PROMPT, PROMPT + NEW)]
    return jnp.concatenate(outs, axis=1)


def selecting_cache_by_hand(attn, x, prefill):
    """The same computation written directly on the cache class: project at absolute positions, prefill,
    ``step`` per token, then the layer's output half."""
    q, k, v = attn.project(x, jnp.arange(x.shape[1])[None])
    out, cache = prefill(q[:, :PROMPT], k[:, :PROMPT], v[:, :PROMPT])
    outs = [out]
    for t in range(PROMPT, PROMPT + NEW):
        step_out, cache = cache.step(q[:, t], k[:, t], v[:, t], scale=SCALE)
        outs.append(step_out[:, None])
    return attn.finish(x, jnp.concatenate(outs, axis=1))


@pytest.mark.parametrize("bits, bound", [(8, 0.02), (4, 0.3)])
def test_quantised_kinds_decode_near_the_exact_cache_and_not_equal_to_it(bits, bound):
    attn, x = layer(), tokens()
    exact = decode(attn, x, "contiguous")
    quantised = decode(attn, x, f"int{bits}", group_size=4)     # 3 complete key groups, then the residual
    new = slice(PROMPT, None)          # the prompt's own attention is exact in every kind
    np.testing.assert_allclose(quantised[:, :PROMPT], exact[:, :PROMPT], rtol=1e-5, atol=1e-5)
    error = float(jnp.linalg.norm(quantised[:, new] - exact[:, new]) / jnp.linalg.norm(exact[:, new]))
    assert 0 < error < bound, error
    if bits == 8:                      # int4 for int8 would pass the int8 bound
        assert error < 0.02


def test_int8_and_int4_errors_are_ordered():
    attn, x = layer(), tokens()
    exact = decode(attn, x, "contiguous")[:, PROMPT:]
    err = {b: float(jnp.linalg.norm(decode(attn, x, f"int{b}", group_size=4)[:, PROMPT:] - exact)) for b in (8, 4)}
    assert err[8] < err[4] / 4, err


def test_h2o_kind_equals_the_h2o_cache_driven_by_hand_and_evicts():
    attn, x = layer(), tokens()
    got = decode(attn, x, "h2o", n_hh=2, n_recent=3)
    want = selecting_cache_by_hand(attn, x, lambda q, k, v: H2OCache.prefill(q, k, v, n_hh=2, n_recent=3,
                                                                                   scale=SCALE))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    exact = decode(attn, x, "contiguous")
    assert float(jnp.max(jnp.abs(got[:, PROMPT:] - exact[:, PROMPT:]))) > 1e-3   # 5 of 9+ tokens kept


def test_duo_kind_equals_the_duo_cache_driven_by_hand():
    attn, x = layer(), tokens()
    flags = (True, False)
    got = decode(attn, x, "duo", is_retrieval=flags, sink=1, recent=3)
    cache = DuoKVCache.create(2, flags, PROMPT + NEW, DIM // HEADS, sink=1, recent=3)
    want = selecting_cache_by_hand(attn, x, functools.partial(cache.prefill, scale=SCALE))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    exact = decode(attn, x, "contiguous")
    assert float(jnp.max(jnp.abs(got[:, PROMPT:] - exact[:, PROMPT:]))) > 1e-3


@pytest.mark.parametrize("kind, options", [
    ("h2o", dict(n_hh=8, n_recent=8)),                               # budget 16 >= 13 tokens: nothing evicted
    ("duo", dict(is_retrieval=(True, True), sink=0, recent=1)),              # every head keeps everything
    ("duo", dict(is_retrieval=(False, False), sink=4, recent=16)),   # the ring holds every token
], ids=["h2o-full-budget", "duo-all-retrieval", "duo-ring-covers"])
def test_selecting_kinds_at_full_budget_are_the_exact_cache(kind, options):
    attn, x = layer(), tokens()
    np.testing.assert_allclose(decode(attn, x, kind, **options), decode(attn, x, "contiguous"),
                               rtol=2e-5, atol=2e-5)


def lm():
    return DecoderLM(40, DIM, 2, HEADS, num_kv_heads=KV_HEADS, rngs=nnx.Rngs(0))


PROMPT_IDS = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 7)), jnp.int32)


@pytest.mark.parametrize("cache, options", [
    ("int8", None),
    ("h2o", dict(n_hh=8, n_recent=8)),
    ("duo", [dict(is_retrieval=(True, False), sink=4, recent=16), dict(is_retrieval=(False, True), sink=4,
                                                                      recent=16)]),
], ids=["int8", "h2o", "duo-per-layer"])
def test_generate_with_each_kind_matches_the_exact_cache_and_compiles_once(cache, options):
    """At budgets that keep every token (and int8's small error) greedy tokens equal the exact cache's."""
    model = lm()
    want = model.generate(PROMPT_IDS, 6)
    models.GENERATION_TRACES.clear()
    got = model.generate(PROMPT_IDS, 6, cache=cache, cache_options=options)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert dict(models.GENERATION_TRACES) == {(2, 7): 1, (2, 1): 1}
    kinds = {type(block.attention.kv_cache.get_value()).__name__ for block in model.blocks}
    assert kinds == {dict(int8="QuantizedKVCache", h2o="H2OCache", duo="DuoKVCache")[cache]}


def test_cache_kinds_name_bad_options():
    attn = layer()
    with pytest.raises(ValueError, match=r"kind='h2o' needs the cache options \['n_recent'\]"):
        attn.init_cache(2, 16, kind="h2o", n_hh=2)
    with pytest.raises(ValueError, match=r"kind='contiguous' takes the cache options \(none\), got \['n_hh'\]"):
        attn.init_cache(2, 16, n_hh=2)
    with pytest.raises(ValueError, match="kind must be one of"):
        attn.init_cache(2, 16, kind="int3")
    window = Attention(DIM, HEADS, rngs=nnx.Rngs(0), method="sliding_window", window=4)
    with pytest.raises(ValueError, match="needs method='softmax', got method='sliding_window'"):
        window.init_cache(2, 16, kind="h2o", n_hh=2, n_recent=2)
    attn.init_cache(2, 16, kind="h2o", n_hh=2, n_recent=2)
    with pytest.raises(ValueError, match="return_probs must be False"):
        attn(tokens()[:, :3], decode=True, prefill=True, return_probs=True)
    with pytest.raises(ValueError, match="cache_options must be a dict or a list of 2 dicts"):
        lm().init_cache(2, 16, kind="h2o", cache_options=[dict(n_hh=2, n_recent=2)])
