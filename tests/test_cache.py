"""jattn.cache: contiguous and paged KV caches hold exactly the appended tokens, and decoding through either
equals dense attention over the same keys.

Mutations caught: append writing at the wrong offset (length - 1), a fresh page taken without updating the
reference count (two sequences then share a page), fork without copy-on-write (the source's page is
overwritten), free leaving reference counts up (the pool runs dry), growth not rounding to the page size.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.cache import ContiguousKVCache, PagedKVCache
from tests.conftest import assert_close

B, HKV, D = 2, 2, 16


def tokens(seed, T, batch=B):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((batch, T, HKV, D), np.float32)),
            jnp.asarray(rng.standard_normal((batch, T, HKV, D), np.float32)))


def held(cache, b):
    """Sequence b's keys and values, [length, Hkv, D], as the cache holds them."""
    n = int(cache.lengths[b])
    k, v = cache.contiguous()
    return jnp.swapaxes(k[b, :, :n], 0, 1), jnp.swapaxes(v[b, :, :n], 0, 1)


def make(kind):
    if kind == "contiguous":
        return ContiguousKVCache.create(B, HKV, 64, D, page_size=16)
    return PagedKVCache.create(B, HKV, num_pages=12, page_size=16, max_pages=4, head_dim=D)


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_appends_hold_exactly_the_tokens_and_decode_equals_dense(kind):
    cache = make(kind)
    k1, v1 = tokens(0, 20)
    k2, v2 = tokens(1, 1)
    cache = jax.jit(type(cache).append)(cache, k1, v1)
    cache = jax.jit(type(cache).append)(cache, k2, v2)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [21, 21])
    want_k, want_v = jnp.concatenate([k1, k2], 1), jnp.concatenate([v1, v2], 1)
    for b in range(B):
        k, v = held(cache, b)
        np.testing.assert_array_equal(np.asarray(k), np.asarray(want_k[b]))
        np.testing.assert_array_equal(np.asarray(v), np.asarray(want_v[b]))
    q = jnp.asarray(np.random.default_rng(2).standard_normal((B, 4, D), np.float32))
    out = cache.attend(q, impl="xla")
    from jattn import attention
    dense = attention(q[:, None], want_k, want_v, impl="reference")[:, 0]
    assert_close(out, dense, what=kind)


@jax.jit
def decode_step(paged, contiguous, k, v, q):
    paged, contiguous = paged.append(k, v), contiguous.append(k, v)
    return paged, contiguous, paged.attend(q, impl="xla"), contiguous.attend(q, impl="xla")


def test_paged_and_contiguous_decode_agree_token_by_token():
    paged, contiguous = make("paged"), make("contiguous")
    rng = np.random.default_rng(5)
    for step in range(18):   # crosses a page boundary at 16
        q = jnp.asarray(rng.standard_normal((B, 4, D), np.float32))
        paged, contiguous, out_paged, out_contiguous = decode_step(paged, contiguous, *tokens(10 + step, 1), q)
        assert_close(out_paged, out_contiguous, what=f"step {step}")
    assert_close(paged.attend(q, impl="pallas", interpret=True), out_contiguous, what="kernel over the pages")


def test_fork_shares_pages_and_copies_on_write():
    cache = make("paged")
    k, v = tokens(0, 20, batch=B)
    cache = cache.append(k, v)
    pages_before = int(cache.free_pages())
    forked = cache.fork(0, 1)
    assert int(forked.free_pages()) == pages_before + 2   # sequence 1's two pages came back; 0's are shared
    np.testing.assert_array_equal(np.asarray(held(forked, 1)[0]), np.asarray(k[0]))
    k_new, v_new = tokens(3, 1)
    after = forked.append(k_new, v_new)
    # sequence 0 keeps its own token 20; sequence 1's write went to a copy of the shared second page
    np.testing.assert_array_equal(np.asarray(held(after, 0)[0][20]), np.asarray(k_new[0, 0]))
    np.testing.assert_array_equal(np.asarray(held(after, 1)[0][20]), np.asarray(k_new[1, 0]))
    np.testing.assert_array_equal(np.asarray(held(after, 1)[0][:20]), np.asarray(k[0]))
    assert int(after.page_table[0, 1]) != int(after.page_table[1, 1])
    assert int(after.page_table[0, 0]) == int(after.page_table[1, 0])   # the untouched first page stays shared


def test_free_returns_pages_and_an_empty_pool_raises():
    cache = PagedKVCache.create(1, HKV, num_pages=2, page_size=16, max_pages=4, head_dim=D)
    k, v = tokens(0, 32, batch=1)
    cache = cache.append(k, v)
    assert int(cache.free_pages()) == 0
    with pytest.raises(ValueError, match="no free page"):
        cache.append(*tokens(1, 1, batch=1))
    assert int(cache.free(0).free_pages()) == 2


def test_traced_overflow_marks_the_sequence_instead_of_overwriting():
    cache = ContiguousKVCache.create(B, HKV, 16, D, page_size=16)
    cache = cache.append(*tokens(0, 15))
    full = jax.jit(ContiguousKVCache.append)(cache, *tokens(1, 2))
    assert np.all(np.asarray(full.lengths) == 17)                  # capacity + 1: overflowed
    np.testing.assert_array_equal(np.asarray(full.k), np.asarray(cache.k))   # nothing written
    q = jnp.ones((B, 4, D))
    assert np.isnan(np.asarray(jax.jit(lambda c: c.attend(q, impl="xla"))(full))).all()


def test_contiguous_policies():
    cache = ContiguousKVCache.create(B, HKV, 16, D, page_size=16)
    with pytest.raises(ValueError, match="passes the capacity 16"):
        cache.append(*tokens(0, 17))
    grown = ContiguousKVCache.create(B, HKV, 16, D, page_size=16, policy="grow").append(*tokens(0, 17))
    assert grown.capacity == 32 and int(grown.lengths[0]) == 17
    with pytest.raises(ValueError, match="k_new must be"):
        cache.append(jnp.ones((B, 1, HKV + 1, D)), jnp.ones((B, 1, HKV + 1, D)))
    with pytest.raises(ValueError, match="policy must be one of"):
        ContiguousKVCache.create(B, HKV, 16, D, policy="wrap")
