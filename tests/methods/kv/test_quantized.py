"""Quantised KV caches (KIVI-style int8 / int4 / int2, jattn.methods.kv.quantized).

What each test catches (each mutation was applied to the code as one line and the named test failed; 14 in
all, none survived):

* ``test_quantize_error_is_at_most_half_a_step``: zero point dropped (``x' = code * scale``), levels
  ``2^bits`` instead of ``2^bits - 1`` (the max no longer maps to the top code), floor instead of round.
* ``test_pack_round_trip_and_byte_layout``: off-by-one in the pack shift (``i * bits + 1``), unpack mask one
  bit too narrow.
* ``test_chunked_appends_equal_quantising_the_whole_sequence``: key scales over the whole group instead of
  per channel (``axis=(2, 3)``), the group start off by one, the residual not carried into the next group,
  value scales shared across kv heads instead of per token.
* ``test_8bit_attend_is_within_the_derived_bound_of_full_precision``: the view reading the previous group's
  scale, the residual ignored in the view.
* ``test_bytes_per_token_is_what_the_pytree_stores``: the key (scale, min) overhead counted per token, the
  value overhead left out.
* ``test_overflow_raises_and_traced_overflow_writes_nothing``: the fits test ``<`` instead of ``<=``.

The 8-bit tolerance is derived, not tuned: each key element moves by at most ``dk / 2`` (``dk`` its channel's
group step), so each logit by at most ``eps = scale * sum_d |q_d| dk_d / 2``; every probability ratio
``p'_j / p_j`` then lies in ``[exp(-2 eps), exp(2 eps)]``, and since ``sum_j (p'_j - p_j) = 0``,
``|out' - out| <= (exp(2 eps) - 1) * (sum_j p_j |v_j - out| + dv) + dv`` with ``dv`` the largest value
half-step (``p`` and ``out`` the exact float64 attention). The test also asserts the bound is below 0.2 and
the error is not zero.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.kv.quantized import QuantizedKVCache, bytes_per_token, dequantize, pack, quantize, unpack

_append = jax.jit(lambda cache, k, v: cache.append(k, v))
_attend = jax.jit(lambda cache, q: cache.attend(q, impl="xla"))


def _normal(seed, shape, outlier_channels=()):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    for c in outlier_channels:       # key-like outlier channels: large and offset
        x[..., c] = 8.0 * x[..., c] + 5.0
    return x


QUANTIZE_CASES = [(bits, axis) for bits in (2, 4, 8) for axis in (2, 3, (1, 3))]
PACK_CASES = [(1, 13), (2, 7), (2, 8), (4, 5), (4, 6), (8, 3)]


def test_quantize_error_is_at_most_half_a_step():
    x = _normal(0, (2, 3, 19, 7), outlier_channels=(1,))
    @jax.jit
    def every_case(x):
        quantized = [quantize(x, bits=bits, axis=axis) for bits, axis in QUANTIZE_CASES]
        return [(codes, scale, minimum, dequantize(codes, scale, minimum)) for codes, scale, minimum in quantized]
    for (bits, axis), (codes, scale, minimum, back) in zip(QUANTIZE_CASES, every_case(jnp.asarray(x))):
        back, step = np.asarray(back), np.asarray(scale)
        assert codes.dtype == jnp.uint8 and codes.shape == x.shape
        assert np.all(np.abs(back - x) <= step / 2 * (1 + 1e-5) + 1e-6), (bits, axis)
        # the slice's min maps to code 0 and its max to the top code
        axes = axis if isinstance(axis, tuple) else (axis,)
        c = np.asarray(codes)
        assert np.all(c.min(axis=axes) == 0) and np.all(c.max(axis=axes) == 2 ** bits - 1), (bits, axis)
        np.testing.assert_allclose(np.asarray(minimum), x.min(axis=axes, keepdims=True))
    codes, back = jax.jit(lambda x: (lambda c, s, m: (c, dequantize(c, s, m)))(*quantize(x, bits=4, axis=1)))(
        jnp.full((3, 4), 2.5, jnp.float32))
    assert np.all(np.asarray(codes) == 0) and np.all(np.asarray(back) == 2.5)     # a constant slice is exact


def test_pack_round_trip_and_byte_layout():
    rng = np.random.default_rng(0)
    every_codes = [rng.integers(0, 2 ** bits, (3, 2, n)).astype(np.uint8) for bits, n in PACK_CASES]
    round_trip = jax.jit(lambda codes: [(p := pack(c, bits=bits), unpack(p, bits=bits, n=n))
                                        for c, (bits, n) in zip(codes, PACK_CASES)])
    results = round_trip([jnp.asarray(c) for c in every_codes])
    for codes, (bits, n), (packed, back) in zip(every_codes, PACK_CASES, results):
        assert packed.dtype == jnp.uint8 and packed.shape == (3, 2, -(-n * bits // 8))
        np.testing.assert_array_equal(np.asarray(back), codes)
        # literal layout: code j in byte j // (8 / bits) at bit offset (j % (8 / bits)) * bits
        per = 8 // bits
        expected = np.zeros(packed.shape, np.int64)
        for j in range(n):
            expected[..., j // per] += codes[..., j].astype(np.int64) << ((j % per) * bits)
        np.testing.assert_array_equal(np.asarray(packed), expected)


def test_pack_and_unpack_reject_bad_input():
    with pytest.raises(ValueError, match="bits"):
        pack(jnp.zeros((4,), jnp.uint8), bits=3)
    with pytest.raises(ValueError, match="codes must be < 2\\^bits = 4"):
        pack(jnp.array([1, 4], jnp.uint8), bits=2)
    with pytest.raises(TypeError, match="codes must be a uint8"):
        pack(jnp.zeros((4,), jnp.int32), bits=2)
    with pytest.raises(ValueError, match="packed must have last axis"):
        unpack(jnp.zeros((3,), jnp.uint8), bits=4, n=7)
    with pytest.raises(ValueError, match="bits"):
        quantize(jnp.ones((2, 2)), bits=3, axis=0)
    with pytest.raises(ValueError, match="axis"):
        quantize(jnp.ones((2, 2)), bits=4, axis=2)


def _numpy_kivi(k, v, length, bits, G):
    """Literal KIVI transcription for ``k, v [B, S, Hkv, D]``, ``length`` tokens: keys per channel per complete
    group of G, the partial group exact; values per token. Returns head-major ``[B, Hkv, length, D]``."""
    levels = 2 ** bits - 1
    kh = np.swapaxes(k[:, :length], 1, 2).astype(np.float64)
    vh = np.swapaxes(v[:, :length], 1, 2).astype(np.float64)

    def minmax(x, axis):
        lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
        step = (hi - lo) / levels
        code = np.clip(np.round((x - lo) / np.where(step > 0, step, 1)), 0, levels)
        return code * step + lo

    full = (length // G) * G
    k_out = kh.copy()
    B, Hkv, _, D = kh.shape
    k_out[:, :, :full] = minmax(kh[:, :, :full].reshape(B, Hkv, -1, G, D), 3).reshape(B, Hkv, full, D)
    return k_out, minmax(vh, 3)


def test_chunked_appends_equal_quantising_the_whole_sequence():
    B, Hkv, D, G, capacity, bits = 2, 2, 5, 8, 40, 4
    chunks = (1, 5, 17, 3)       # 1, 6, 23, 26 tokens: a partial group, two groups completed at once, ...
    k = _normal(10 + bits, (B, sum(chunks), Hkv, D), outlier_channels=(2,))
    v = _normal(20 + bits, (B, sum(chunks), Hkv, D))
    cache = QuantizedKVCache.create(B, Hkv, capacity, D, bits=bits, group_size=G, page_size=16)

    @jax.jit
    def append_in_chunks(cache, k, v):          # one compile for the whole sequence of appends
        states, start = [], 0
        for n in chunks:
            cache = cache.append(k[:, start:start + n], v[:, start:start + n])
            states.append((cache.lengths, *cache.dequantized()))
            start += n
        return states

    length = 0
    for n, (lengths, k_got, v_got) in zip(chunks, append_in_chunks(cache, jnp.asarray(k), jnp.asarray(v))):
        length += n
        k_got, v_got = np.asarray(k_got), np.asarray(v_got)
        assert np.all(np.asarray(lengths) == length)
        k_want, v_want = _numpy_kivi(k, v, length, bits, G)
        np.testing.assert_allclose(k_got[:, :, :length], k_want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v_got[:, :, :length], v_want, rtol=1e-5, atol=1e-5)
        # the partial group's tokens (KIVI's residual) are kept exactly; nothing past the length
        partial = slice((length // G) * G, length)
        np.testing.assert_array_equal(k_got[:, :, partial], np.swapaxes(k[:, partial], 1, 2))
        assert np.all(k_got[:, :, length:] == 0) and np.all(v_got[:, :, length:] == 0)


def _numpy_decode(q, k, v, length):
    """Dense float64 decode attention of ``q [B, Tq, H, D]`` (the last Tq of ``length`` tokens) over
    ``k, v [B, length, Hkv, D]``; returns ``(out [B, Tq, H, D], probs [B, Tq, H, length])``."""
    B, Tq, H, D = q.shape
    G = H // k.shape[2]
    kk, vv = np.repeat(k, G, axis=2).astype(np.float64), np.repeat(v, G, axis=2).astype(np.float64)
    s = np.einsum("bthd,bshd->bths", q.astype(np.float64), kk) * D ** -0.5
    position = length - Tq + np.arange(Tq)
    s = np.where(np.arange(length)[None, None, None, :] <= position[None, :, None, None], s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("bths,bshd->bthd", p, vv), p


@pytest.mark.parametrize("H, Hkv, Tq", [(4, 1, 1), (6, 2, 3)])
def test_8bit_attend_is_within_the_derived_bound_of_full_precision(H, Hkv, Tq):
    B, D, G, length, capacity = 2, 16, 8, 37, 48
    k = _normal(1, (B, length, Hkv, D), outlier_channels=(3, 11))
    v = _normal(2, (B, length, Hkv, D))
    q = _normal(3, (B, Tq, H, D))
    cache = QuantizedKVCache.create(B, Hkv, capacity, D, bits=8, group_size=G, page_size=16)
    cache = _append(cache, jnp.asarray(k), jnp.asarray(v))
    got = np.asarray(_attend(cache, jnp.asarray(q)))
    want, p = _numpy_decode(q, k, v, length)

    full = (length // G) * G                                           # the rest is the exact residual
    kh = np.swapaxes(k[:, :full], 1, 2).reshape(B, Hkv, -1, G, D)
    dk = (kh.max(axis=3) - kh.min(axis=3)) / 255                       # [B, Hkv, groups, D]
    qg = np.abs(q).reshape(B, Tq, Hkv, H // Hkv, D)
    eps = D ** -0.5 * np.einsum("btkgd,bknd->btkgn", qg, dk / 2).max(axis=-1).reshape(B, Tq, H)
    dv = ((v.max(axis=3) - v.min(axis=3)) / 255 / 2).max(axis=1)        # [B, Hkv]: the largest value half-step
    dv = np.repeat(dv, H // Hkv, axis=1)[:, None, :, None]
    vv = np.repeat(v, H // Hkv, axis=2)                                # [B, S, H, D]
    spread = np.einsum("bths,btshd->bthd", p, np.abs(vv[:, None] - want[:, :, None]))  # sum_j p_j |v_j - out|
    bound = np.expm1(2 * eps)[..., None] * (spread + dv) + dv
    err = np.abs(got - want)
    assert bound.max() < 0.2 and err.max() > 0          # tight enough to mean something; something was quantised
    assert np.all(err <= bound + 1e-5), float((err - bound).max())


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_bytes_per_token_is_what_the_pytree_stores(bits):
    B, Hkv, capacity, D, G = 3, 2, 64, 6, 16
    cache = QuantizedKVCache.create(B, Hkv, capacity, D, bits=bits, group_size=G, page_size=16)
    stored = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(cache))
    formula = bytes_per_token(head_dim=D, kv_heads=Hkv, bits=bits, group_size=G, scale_bytes=4, capacity=capacity,
                              element_bytes=4)
    assert stored / (B * capacity) == pytest.approx(formula, rel=1e-12)


def test_bytes_per_token_formula_against_fp16():
    # Hkv=8, D=128, 4 bits, groups of 32, fp16 scales: codes 2 * 8 * 64, key stats 2 * 8 * 128 * 2 / 32,
    # value stats 2 * 8 * 2
    assert bytes_per_token(head_dim=128, kv_heads=8, bits=4) == 1024 + 128 + 32
    assert bytes_per_token(head_dim=128, kv_heads=8, bits=8) == 2048 + 128 + 32
    assert 2 * 8 * 128 * 2 / bytes_per_token(head_dim=128, kv_heads=8, bits=2) == 4096 / (512 + 128 + 32)


def test_overflow_raises_and_traced_overflow_writes_nothing():
    B, Hkv, D = 2, 1, 5
    cache = QuantizedKVCache.create(B, Hkv, 16, D, bits=2, group_size=8, page_size=16)
    k = jnp.asarray(_normal(5, (B, 8, Hkv, D), outlier_channels=(1,)))
    cache = _append(cache, k, k)
    k_want, v_want = _numpy_kivi(np.asarray(k), np.asarray(k), 8, 2, 8)      # the 2-bit path, one whole group
    for got, want in zip(jax.jit(lambda c: c.dequantized())(cache), (k_want, v_want)):
        np.testing.assert_allclose(np.asarray(got)[:, :, :8], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sequence 0 \\(length 8\\) passes the capacity 16"):
        cache.append(jnp.ones((B, 9, Hkv, D)), jnp.ones((B, 9, Hkv, D)))   # concrete: raises before computing
    full = _append(cache, k, k)
    assert np.all(np.asarray(full.lengths) == 16)                          # exactly full is fine
    overflowed = _append(full, k, k)                                       # traced under jit: marked, not written
    assert np.all(np.asarray(overflowed.lengths) == 17)
    for before, after in zip(jax.tree_util.tree_leaves(full)[:-1], jax.tree_util.tree_leaves(overflowed)[:-1]):
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    assert np.all(np.isnan(np.asarray(_attend(overflowed, jnp.ones((B, 2, D))))))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantizedKVCache.create(1, 1, 8, 4, bits=3)
    with pytest.raises(ValueError, match="group_size"):
        QuantizedKVCache.create(1, 1, 8, 4, group_size=0)
    with pytest.raises(ValueError, match="page_size must be a power of two >= 16, got 24"):
        QuantizedKVCache.create(1, 1, 8, 4, page_size=24)
    assert QuantizedKVCache.create(1, 1, 100, 4, group_size=48).capacity == 384       # lcm(48, 128)
    cache = QuantizedKVCache.create(1, 2, 8, 4, bits=4, group_size=4)
    with pytest.raises(ValueError, match="k_new must be \\[B=1, T_new, Hkv=2, D=4\\]"):
        cache.append(jnp.ones((1, 3, 1, 4)), jnp.ones((1, 3, 1, 4)))
    with pytest.raises(TypeError, match="v_new must have the cache's dtype"):
        cache.append(jnp.ones((1, 3, 2, 4)), jnp.ones((1, 3, 2, 4), jnp.bfloat16))
    with pytest.raises(ValueError, match="capacity must be a multiple of group_size"):
        bytes_per_token(head_dim=4, kv_heads=1, bits=4, group_size=32, capacity=48)
