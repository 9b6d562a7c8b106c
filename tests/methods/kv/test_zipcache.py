"""P24 ZipCache (jattn.methods.kv.zipcache): saliency, mixed-precision quantisers, compression, streaming.

Each test is checked against a literal NumPy transcription of the official code's rule (or exact float64
attention). The decode tests share one run (``_decode_run``: prefill 41 tokens, H=6, Hkv=2, D=6, then 19
single-token steps with a streaming gap of 8), so its programs compile once. What each test catches (each
mutation was applied as one line and the named test failed; 22 in all, none survived):

* ``test_normalized_score_is_the_column_mean_over_visible_rows``: denominator ``T - j + 1``, causal mask
  seeing one future key, the visible-probe count off by one.
* ``test_probe_positions_follow_the_code``: recent window one token short, random probes drawn from the
  whole sequence (100 random probes of T = 2000 all below the window by chance: probability 0.6%).
* ``test_select_salient_matches_numpy``: the highest scores marked non-salient, ``round`` for ``int``.
* ``test_quantizers_error_is_at_most_half_a_step``: per-token key scales (``axis=3``), token-wise over one
  head's ``D`` only, ``s_c = max |x|`` without the square root.
* ``test_channel_separable_beats_tokenwise_with_outlier_channels``: the spec's property at 2 and 4 bits (it
  holds for ``s_c = max |x|`` too, so it does not pin the square root down).
* ``test_compress_kv_matches_numpy_transcription``: salient keys given ``bits_low``, the value channel
  scale taken over the salient class only, the salient mask read back shifted by one.
* ``test_streaming_compresses_each_gap_with_the_last_query_rule``: the residual written one slot late, a
  segment written to the wrong slot, the last query's score replaced by the accumulated one, the new
  tokens' saliency normalised; every step's output is also checked against attention over the view.
* ``test_accumulated_stream_score_sums_every_query_since_arrival``: the accumulated score reset every step.
* ``test_filled_cache_then_traced_overflow_writes_nothing``: the fits test (``<=`` for ``<``).
* ``test_8bit_everywhere_decode_is_close_to_full_precision``: ``s_c`` multiplied back as ``sqrt(s_c)``.
* ``test_all_salient_or_none_is_one_precision``: the empty-class path (r = 0 and 1; it found a reshape bug
  in ``unpack`` on zero-size arrays).
* ``test_bytes_per_token_is_what_the_pytree_stores``: the mask or the channel scales left out of the formula.
* ``test_decode_lowers_to_the_decode_kernel_on_gpu``: the view not padded to a legal kernel tile
  (``impl="auto"`` exported for CUDA then holds no Triton call and raises at lowering).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.kv import zipcache as Z
from jattn.methods.kv.quantized import dequantize

_dequantized = jax.jit(lambda cache: cache.dequantized())
_segment_view = jax.jit(Z.ZipCompressedKV.dequantized)
_stream_masks = jax.jit(jax.vmap(Z.ZipCompressedKV.salient_mask))


def _normal(seed, shape, outlier_channels=(), strength=8.0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    for c in outlier_channels:
        x[..., c] = strength * x[..., c] + 3.0
    return x


def _numpy_column_scores(q, k, positions):
    """``c [B, Hkv, T]`` and the visible-probe count ``[T]``: literal transcription of the code's probe
    attention (softmax over causally visible keys, summed over probes and each group's query heads)."""
    B, P, H, D = q.shape
    T, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    s = np.einsum("bphd,bthd->bhpt", q.astype(np.float64), np.repeat(k, G, axis=2).astype(np.float64)) * D ** -0.5
    visible = np.arange(T)[None, :] <= positions[:, None]
    s = np.where(visible, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    return a.reshape(B, Hkv, G, P, T).sum(axis=(2, 3)), visible.sum(0)


@pytest.mark.parametrize("H, Hkv", [(4, 1), (6, 2)])
def test_normalized_score_is_the_column_mean_over_visible_rows(H, Hkv):
    B, T, D = 2, 23, 8
    q, k = _normal(1, (B, T, H, D)), _normal(2, (B, T, Hkv, D))
    subset = np.array([22, 21, 3, 9, 3], np.int32)      # recent + random with a duplicate, as the code draws them

    @jax.jit
    def scores(q, k, q_sub):
        every = jnp.arange(T, dtype=jnp.int32)
        return ([Z.normalized_attention_score(q, every, k, denominator=d) for d in ("remaining", "visible")]
                + [Z.normalized_attention_score(q_sub, jnp.asarray(subset), k, denominator=d)
                   for d in Z.DENOMINATORS])
    full_remaining, full_visible, remaining, visible, none = (np.asarray(s) for s in scores(q, k, q[:, subset]))
    # every row a probe: A is the full lower-triangular attention and both normalisations are the column mean
    c, _ = _numpy_column_scores(q, k, np.arange(T))
    mean = c / np.arange(T, 0, -1)
    np.testing.assert_allclose(full_remaining, mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(full_visible, mean, rtol=1e-5, atol=1e-7)
    # probes only: the code still divides by T - j; "visible" divides by the probes that see j
    c, count = _numpy_column_scores(q[:, subset], k, subset)
    np.testing.assert_allclose(none, c, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(remaining, c / (T - np.arange(T)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(visible, c / np.maximum(count, 1), rtol=1e-5, atol=1e-7)


def test_probe_positions_follow_the_code():
    cases = [(60, 3, 3), (41, 3, 2), (10, 1, 0), (2000, 100, 100)]   # (T, recent probes, random probes)
    every = jax.jit(lambda key: [Z.probe_positions(key, seq_len=T) for T, _, _ in cases])
    first, again = every(jax.random.PRNGKey(1)), every(jax.random.PRNGKey(1))
    for (T, recent, n_random), positions, same in zip(cases, first, again):
        positions = np.asarray(positions)
        # the code: arange(int(T - 0.05 T), T) then randint(0, int(T - 0.05 T), (int(0.05 T),))
        assert len(positions) == recent + n_random
        np.testing.assert_array_equal(positions[:recent], np.arange(T - recent, T))
        assert np.all((positions[recent:] >= 0) & (positions[recent:] < T - recent))
        np.testing.assert_array_equal(positions, np.asarray(same))


def test_select_salient_matches_numpy():
    scores = np.random.default_rng(3).integers(0, 6, (2, 3, 17)).astype(np.float32)   # many ties
    got = np.asarray(jax.jit(functools.partial(Z.select_salient, unimportant_ratio=0.4))(jnp.asarray(scores)))
    n_low = int(0.4 * 17)
    want = np.ones_like(got)
    order = np.argsort(scores, axis=-1, kind="stable")[..., :n_low]
    np.put_along_axis(want, order, False, axis=-1)
    np.testing.assert_array_equal(got, want)
    assert np.all(got.sum(-1) == 17 - n_low)


def test_quantizers_error_is_at_most_half_a_step():
    x = _normal(4, (2, 3, 21, 6), outlier_channels=(2,))

    @jax.jit
    def every(x):
        out = []
        for bits in (2, 4):
            codes, scale, m = Z.quantize_channelwise(x, bits=bits)
            out.append((dequantize(codes, scale, m), scale))
            codes, scale, m = Z.quantize_tokenwise(x, bits=bits)
            out.append((dequantize(codes, scale, m), scale))
            codes, scale, m, s = Z.quantize_channel_separable_tokenwise(x, bits=bits)
            out.append((dequantize(codes, scale, m) * s, scale * s))
        return out, s
    results, channel_scale = every(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(channel_scale), np.sqrt(np.abs(x).max(axis=2, keepdims=True)), rtol=1e-6)
    shapes = [(2, 3, 1, 6), (2, 1, 21, 1), (2, 3, 21, 6)] * 2     # channel-wise, token-wise, separable (scale * s_c)
    for (back, step), shape in zip(results, shapes):
        assert step.shape == shape
        assert np.all(np.abs(np.asarray(back) - x) <= np.asarray(step) / 2 * (1 + 1e-5) + 1e-6)
    # token-wise: one (scale, min) per token over all Hkv * D channels
    np.testing.assert_allclose(np.asarray(results[1][1])[:, 0, :, 0], (x.max(axis=(1, 3)) - x.min(axis=(1, 3))) / 3,
                               rtol=1e-6)


def test_channel_separable_beats_tokenwise_with_outlier_channels():
    x = _normal(5, (2, 2, 64, 16), outlier_channels=(3, 12), strength=12.0)

    @jax.jit
    def errors(x):
        out = []
        for bits in (2, 4):
            codes, scale, m = Z.quantize_tokenwise(x, bits=bits)
            plain = dequantize(codes, scale, m)
            codes, scale, m, s = Z.quantize_channel_separable_tokenwise(x, bits=bits)
            out.append((jnp.mean((plain - x) ** 2), jnp.mean((dequantize(codes, scale, m) * s - x) ** 2)))
        return out
    for plain, separable in errors(jnp.asarray(x)):
        assert float(separable) < 0.7 * float(plain)


def _numpy_compress(k, v, salient, bits_high, bits_low):
    """Literal transcription of the code's mixed-precision compression of ``k, v [B, L, Hkv, D]`` with
    ``salient [B, Hkv, L]``; returns dequantised head-major ``(k, v)`` in float32."""
    kh, vh = np.swapaxes(k, 1, 2), np.swapaxes(v, 1, 2)
    B, Hkv, L, D = kh.shape
    s = np.sqrt(np.abs(vh).max(axis=2, keepdims=True))
    s = np.where(s > 0, s, 1).astype(np.float32)
    vs = vh / s
    k_out, v_out = np.zeros_like(kh), np.zeros_like(vh)

    def minmax(x, axis, bits):
        levels = 2 ** bits - 1
        lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
        step = (hi - lo) / np.float32(levels)
        return np.clip(np.round((x - lo) / np.where(step > 0, step, 1)), 0, levels) * step + lo

    for b in range(B):
        for wanted, bits in ((True, bits_high), (False, bits_low)):
            index = [np.flatnonzero(salient[b, h] == wanted) for h in range(Hkv)]
            if not len(index[0]):
                continue
            for h in range(Hkv):        # keys: per channel over the class's tokens
                k_out[b, h, index[h]] = minmax(kh[b, h, index[h]], 0, bits)
            rows = np.stack([vs[b, h, index[h]] for h in range(Hkv)])          # [Hkv, n, D]: row j = j-th of each head
            rows = minmax(rows, (0, 2), bits)
            for h in range(Hkv):
                v_out[b, h, index[h]] = rows[h] * s[b, h]
    return k_out, v_out


def _numpy_salient(scores, ratio):
    n_low = int(ratio * scores.shape[-1])
    salient = np.ones(scores.shape, bool)
    np.put_along_axis(salient, np.argsort(scores, axis=-1, kind="stable")[..., :n_low], False, axis=-1)
    return salient


def test_all_salient_or_none_is_one_precision():
    B, T, H, Hkv, D = 1, 13, 2, 2, 5
    k, v, scores = _normal(10, (B, T, Hkv, D)), _normal(11, (B, T, Hkv, D)), _normal(12, (B, Hkv, T))

    @jax.jit
    def both(k, v, scores):   # r = 0: every token 4-bit; r = 1: every token 2-bit (an empty class each)
        return [Z.compress_with_scores(k, v, scores, unimportant_ratio=r).dequantized() for r in (0.0, 1.0)]
    for (k_got, v_got), everyone in zip(both(k, v, scores), (True, False)):
        k_want, v_want = _numpy_compress(k, v, np.full((B, Hkv, T), everyone), 4, 2)
        np.testing.assert_allclose(np.asarray(k_got), k_want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(v_got), v_want, rtol=1e-5, atol=1e-5)


def _numpy_probs(q, k_view, length, scale=None):
    """``[B, H, S]``: the attention one query ``q [B, H, D]`` pays each key of the head-major ``k_view
    [B, Hkv, S, D]`` (keys < length), float64."""
    B, H, D = q.shape
    Hkv = k_view.shape[1]
    s = np.einsum("bkgd,bksd->bkgs", q.reshape(B, Hkv, H // Hkv, D).astype(np.float64), k_view.astype(np.float64))
    s = np.where(np.arange(k_view.shape[2]) < length, s * (scale or D ** -0.5), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).reshape(B, H, -1)


def _grouped(p, Hkv):
    """``[B, H, S] -> [B, Hkv, S]``: summed over each kv head's query heads."""
    return p.reshape(p.shape[0], Hkv, -1, p.shape[-1]).sum(2)


RUN = dict(B=2, T0=41, H=6, Hkv=2, D=6, gap=8, new=19)


@functools.lru_cache(maxsize=None)
def _decode_run(accumulate: bool):
    """Prefill T0 tokens (default ZipCache: 4/2 bits, r = 0.4, the code's probes), then decode ``new`` tokens
    one at a time. Both stream scores share the compiled programs (the mode is data in the cache). Returns the
    inputs, the probe key, the cache before each step (and the last), the outputs and the step function."""
    B, T0, H, Hkv, D, gap, new = (RUN[n] for n in ("B", "T0", "H", "Hkv", "D", "gap", "new"))
    q = _normal(30, (B, T0 + new, H, D))
    k = _normal(31, (B, T0 + new, Hkv, D), outlier_channels=(1,))
    v = _normal(32, (B, T0 + new, Hkv, D), outlier_channels=(4,))
    key = jax.random.PRNGKey(9)
    cache = _prefill(q[:, :T0], k[:, :T0], v[:, :T0], key)
    cache = dataclasses.replace(cache, accumulate=np.bool_(accumulate))
    caches, outs = [], []
    for t in range(T0, T0 + new):
        caches.append(cache)
        out, cache = _step(cache, q[:, t], k[:, t:t + 1], v[:, t:t + 1])
        outs.append(np.asarray(out))
    caches.append(cache)
    return (q, k, v), key, caches, np.stack(outs, axis=1)


_prefill = jax.jit(functools.partial(Z.zipcache_prefill, max_new_tokens=RUN["new"], streaming_gap=RUN["gap"]))
_step = jax.jit(functools.partial(Z.zipcache_decode, impl="xla"))


def test_compress_kv_matches_numpy_transcription():
    (q, k, v), key, caches, _ = _decode_run(False)
    B, T, H, Hkv, D = (RUN[n] for n in ("B", "T0", "H", "Hkv", "D"))
    q, k, v = q[:, :T], k[:, :T], v[:, :T]
    compressed = caches[0].prompt                       # zipcache_prefill's prompt is compress_kv(q, k, v, key)
    positions = np.asarray(Z.probe_positions(key, seq_len=T))
    c, _ = _numpy_column_scores(q[:, positions], k, positions)
    salient = _numpy_salient(c / (T - np.arange(T)), 0.4)
    np.testing.assert_array_equal(np.asarray(_stream_masks(jax.tree_util.tree_map(lambda x: x[None], compressed)))[0],
                                  salient)
    # salient tokens got 4-bit codes, the rest 2-bit: D=6 packs to 3 bytes and 2 bytes per token
    n_low = int(0.4 * T)
    assert compressed.k_high.shape == compressed.v_high.shape == (B, Hkv, T - n_low, 3)
    assert compressed.k_low.shape == compressed.v_low.shape == (B, Hkv, n_low, 2)
    k_want, v_want = _numpy_compress(k, v, salient, 4, 2)
    k_got, v_got = (np.asarray(x) for x in _segment_view(compressed))
    np.testing.assert_allclose(k_got, k_want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v_got, v_want, rtol=1e-5, atol=1e-5)
    # and the higher bit width shows: salient tokens' key error is well below the others'
    err = np.abs(k_got - np.swapaxes(k, 1, 2)).mean(-1)
    assert err[salient].mean() < 0.5 * err[~salient].mean()


def _view_with_token(cache, k, v, position):
    """The cache's dequantised view (before a step) with the step's own token written exactly at ``position``."""
    k_view, v_view = (np.array(x) for x in _dequantized(cache))
    k_view[:, :, position], v_view[:, :, position] = k[:, position], v[:, position]
    return k_view, v_view


def test_streaming_compresses_each_gap_with_the_last_query_rule():
    (q, k, v), _, caches, outs = _decode_run(False)
    B, T0, H, Hkv, D, gap, new = (RUN[n] for n in ("B", "T0", "H", "Hkv", "D", "gap", "new"))
    masks = np.asarray(_stream_masks(caches[-1].stream))
    for t in range(new):                    # each step attends over the view with its own token exact
        k_view, v_view = _view_with_token(caches[t], k, v, T0 + t)
        p = _numpy_probs(q[:, T0 + t], k_view, T0 + t + 1)
        want = np.einsum("bhs,bhsd->bhd", p, np.repeat(v_view, H // Hkv, axis=1))
        np.testing.assert_allclose(outs[:, t], want, rtol=1e-4, atol=1e-5)
        if (t + 1) % gap == 0:              # the gap fills: the last query's attention picks the salient tokens
            segment, first = t // gap, T0 + t + 1 - gap
            salient = _numpy_salient(_grouped(p, Hkv)[:, :, first:T0 + t + 1], 0.4)
            np.testing.assert_array_equal(masks[segment], salient)
            got = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[segment], caches[-1].stream)
            k_want, v_want = _numpy_compress(k[:, first:T0 + t + 1], v[:, first:T0 + t + 1], salient, 4, 2)
            for x, want in zip(_segment_view(got), (k_want, v_want)):
                np.testing.assert_allclose(np.asarray(x), want, rtol=1e-5, atol=1e-5)
    # after the two gaps, the view holds the compressed prompt and segments, then the exact residual tokens
    k_view, _ = (np.asarray(x) for x in _dequantized(caches[-1]))
    done = T0 + (new // gap) * gap
    np.testing.assert_array_equal(k_view[:, :, done:T0 + new], np.swapaxes(k, 1, 2)[:, :, done:])
    assert int(caches[-1].length) == T0 + new and caches[-1].capacity == T0 + 3 * gap


def test_accumulated_stream_score_sums_every_query_since_arrival():
    (q, k, v), _, caches, _ = _decode_run(True)
    B, T0, H, Hkv, D, gap, new = (RUN[n] for n in ("B", "T0", "H", "Hkv", "D", "gap", "new"))
    masks = np.asarray(_stream_masks(caches[-1].stream))
    for segment in range(new // gap):
        first = T0 + segment * gap
        paid = np.zeros((B, Hkv, gap))
        for position in range(first, first + gap):
            k_view, _ = _view_with_token(caches[position - T0], k, v, position)
            p = _grouped(_numpy_probs(q[:, position], k_view, position + 1), Hkv)
            paid += p[:, :, first:first + gap]          # tokens after the query get 0 (masked)
        np.testing.assert_array_equal(masks[segment], _numpy_salient(paid, 0.4))


def test_filled_cache_then_traced_overflow_writes_nothing():
    (q, k, v), _, caches, _ = _decode_run(False)
    B, T0, H, Hkv, D, gap, new = (RUN[n] for n in ("B", "T0", "H", "Hkv", "D", "gap", "new"))
    cache = caches[-1]
    q2, k2 = _normal(33, (6, B, H, D)), _normal(34, (6, B, 1, Hkv, D))
    for t in range(5):                      # 5 more tokens fill the cache and compress the third gap
        _, cache = _step(cache, q2[t], k2[t], k2[t])
    assert int(cache.length) == cache.capacity
    assert np.all(np.asarray(_stream_masks(cache.stream)).sum(-1) == gap - int(0.4 * gap))
    assert not np.any(np.asarray(cache.residual_k))
    out, overflowed = _step(cache, q2[5], k2[5], k2[5])                # traced: marked, NaN rows, nothing written
    assert int(overflowed.length) == cache.capacity + 1 and np.all(np.isnan(np.asarray(out)))
    overflowed = dataclasses.replace(overflowed, length=cache.length)
    for before, after in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(overflowed)):
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))


def test_8bit_everywhere_decode_is_close_to_full_precision():
    B, T, H, Hkv, D, Tq = 2, 37, 4, 1, 8, 3
    q = _normal(20, (B, T, H, D))
    k = _normal(21, (B, T, Hkv, D), outlier_channels=(2,), strength=4.0)
    v = _normal(22, (B, T, Hkv, D))

    @jax.jit
    def prefill_then_decode(q, k, v):       # the last Tq prompt tokens decoded over the 8-bit compressed prompt
        cache = Z.zipcache_prefill(q, k, v, jax.random.PRNGKey(0), max_new_tokens=1, streaming_gap=4,
                                   bits_high=8, bits_low=8)
        return cache.attend(q[:, T - Tq:], impl="xla")
    got = np.asarray(prefill_then_decode(q, k, v))
    p = np.stack([_numpy_probs(q[:, T - Tq + t], np.swapaxes(k, 1, 2), T - Tq + t + 1) for t in range(Tq)], axis=1)
    vv = np.repeat(v, H // Hkv, axis=2).astype(np.float64)                              # [B, T, H, D]
    want = np.einsum("bths,bshd->bthd", p, vv)
    # derived bound: a key moves by at most half its class's step <= (channel range over the prompt) / 255 / 2;
    # a value by at most s_c * (row step) / 2 <= M / 255 (|v / s_c| <= s_c <= sqrt(M), M = max |v|). Every
    # probability ratio p'/p lies in [exp(-2 eps), exp(2 eps)], so the output moves by at most
    # (exp(2 eps) - 1) * (sum_j p_j |v_j - out| + dv) + dv.
    dk = np.repeat((k.max(1) - k.min(1)) / 255 / 2, H // Hkv, axis=1)                    # [B, H, D]
    eps = D ** -0.5 * np.einsum("bthd,bhd->bth", np.abs(q[:, T - Tq:]), dk)
    dv = np.abs(v).max() / 255
    spread = np.einsum("bths,btshd->bthd", p, np.abs(vv[:, None] - want[:, :, None]))
    bound = np.expm1(2 * eps)[..., None] * (spread + dv) + dv
    err = np.abs(got - want)
    assert bound.max() < 0.2 and err.max() > 0
    assert np.all(err <= bound), float((err - bound).max())


@pytest.mark.parametrize("ratio, bits_high, bits_low, L", [(0.4, 4, 2, 41), (0.25, 8, 4, 16), (1.0, 4, 2, 9)])
def test_bytes_per_token_is_what_the_pytree_stores(ratio, bits_high, bits_low, L):
    B, H, Hkv, D = 3, 4, 2, 6
    shapes = [jax.ShapeDtypeStruct((B, L, h, D), jnp.float32) for h in (H, Hkv, Hkv)]
    compressed = jax.eval_shape(functools.partial(Z.compress_kv, unimportant_ratio=ratio, bits_high=bits_high,
                                                  bits_low=bits_low), *shapes, jax.random.PRNGKey(0))
    stored = sum(np.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(compressed))
    formula = Z.zipcache_bytes_per_token(head_dim=D, kv_heads=Hkv, length=L, unimportant_ratio=ratio,
                                         bits_high=bits_high, bits_low=bits_low, scale_bytes=4)
    assert stored / (B * L) == pytest.approx(formula, rel=1e-12)


def test_bytes_per_token_formula_against_fp16():
    # Hkv=8, D=128, L=1000, defaults: codes 2*8*(600*64 + 400*32), key stats 4*8*128*2, value stats 2*1000*2,
    # channel scales 8*128*2, mask 8*125 bytes
    got = Z.zipcache_bytes_per_token(head_dim=128, kv_heads=8, length=1000)
    assert got == (819200 + 8192 + 4000 + 2048 + 1000) / 1000
    assert 2 * 8 * 128 * 2 / got == pytest.approx(4.909, abs=1e-3)


def test_bad_arguments_are_named():
    q, k = np.ones((1, 10, 4, 8), np.float32), np.ones((1, 10, 2, 8), np.float32)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="unimportant_ratio must be in \\[0, 1\\], got 1.5"):
        Z.compress_kv(q, k, k, key, unimportant_ratio=1.5)
    with pytest.raises(ValueError, match="bits_high must be one of"):
        Z.compress_kv(q, k, k, key, bits_high=3)
    with pytest.raises(TypeError, match="key must be one JAX PRNG key"):
        Z.compress_kv(q, k, k, np.ones((3,), np.float32))
    with pytest.raises(ValueError, match="denominator must be one of"):
        Z.compress_kv(q, k, k, key, denominator="mean")
    with pytest.raises(ValueError, match="multiple of"):
        Z.compress_kv(np.ones((1, 10, 3, 8), np.float32), k, k, key)
    with pytest.raises(ValueError, match="probe_positions must lie in \\[0, T=10\\)"):
        Z.normalized_attention_score(q[:, :2], np.array([3, 10]), k)
    with pytest.raises(ValueError, match="the probe set is empty"):
        Z.probe_positions(key, seq_len=10, recent_fraction=0.0, random_fraction=0.0)
    shapes = jax.eval_shape(functools.partial(Z.zipcache_prefill, max_new_tokens=2, streaming_gap=2), q, k, k, key)
    cache = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    cache = dataclasses.replace(cache, length=np.int32(10))        # just prefilled: 10 tokens, room for 2
    with pytest.raises(ValueError, match="decoding 3 tokens passes the capacity 12"):
        Z.zipcache_decode(cache, *(np.ones((1, 3, h, 8), np.float32) for h in (4, 2, 2)))
    with pytest.raises(ValueError, match="k_new must be \\[B, Tq, Hkv, D\\]"):
        Z.zipcache_decode(cache, *(np.ones(shape, np.float32) for shape in ((1, 4, 8), (1, 2, 2, 8), (1, 1, 2, 8))))


def test_decode_lowers_to_the_decode_kernel_on_gpu():
    # impl="auto" on a GPU needs a view length some power of two >= 16 divides: the view is padded to 128.
    # Exported for CUDA under an abstract H200 (as tests/kernels/test_lowering.py does; no GPU needed).
    triton = "__gpu$xla.gpu.triton"
    h200 = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    B, T0, H, Hkv, D = 1, 13, 2, 1, 16
    shapes = jax.eval_shape(functools.partial(Z.zipcache_prefill, max_new_tokens=5, streaming_gap=4),
                            *(jax.ShapeDtypeStruct((B, T0, h, D), jnp.float32) for h in (H, Hkv, Hkv)),
                            jax.random.PRNGKey(0))
    token = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in ((B, H, D), (B, 1, Hkv, D), (B, 1, Hkv, D))]
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h200)):
        exported = jax.export.export(jax.jit(Z.zipcache_decode), platforms=["cuda"],
                                     disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)])
        text = exported(shapes, *token).mlir_module()
    assert text.count(triton) == 1


# ------------------------------------------------------------- the packed classes read in place by the kernel

KERNEL_RUN = dict(B=2, T0=37, H=4, Hkv=2, D=64, gap=8)   # prompt classes of 23 and 14 tokens: tiles 2 and 1


@functools.lru_cache(maxsize=None)
def _kernel_caches(bits_high=4, bits_low=2):
    """A cache just prefilled (no stream segment, empty residual) and one 11 tokens later (one segment
    compressed, 3 residual tokens), D=64 so both classes' codes make legal kernel tiles."""
    B, T0, H, Hkv, D, gap = (KERNEL_RUN[n] for n in ("B", "T0", "H", "Hkv", "D", "gap"))
    q, k, v = (jnp.asarray(_normal(40 + i, (B, T0, h, D))) for i, h in enumerate((H, Hkv, Hkv)))
    cache = jax.jit(functools.partial(Z.zipcache_prefill, max_new_tokens=20, streaming_gap=gap, bits_high=bits_high,
                                      bits_low=bits_low))(q, k, v, jax.random.PRNGKey(0))
    new = [jnp.asarray(_normal(50 + i, (B, 11, h, D))) for i, h in enumerate((H, Hkv, Hkv))]
    _, later = jax.jit(functools.partial(Z.zipcache_decode, impl="xla"))(cache, *new)
    return cache, later


@pytest.mark.parametrize("interpret", [True, "mosaic"])
@pytest.mark.parametrize("bits", [(4, 2), (8, 4)])
@pytest.mark.parametrize("features", ["plain", "softcap_sinks"])
def test_kernel_reads_the_packed_classes_in_place(interpret, bits, features):
    """One new token through the quantised kernel over the prompt's and the stream's classes, plus the exact
    residual, equals attention over the dequantised view (out and lse; outputs NaN-poisoned first).
    Catches: s_c not applied to a class's output, a class's count one short, the partial last tile not
    visited (counts not rounded up), the filled-segment test off by one, a residual token too many, key
    scale and minimum swapped, value scale and minimum swapped."""
    H = KERNEL_RUN["H"]
    options = dict(softcap=3.0, sinks=jnp.linspace(-1.0, 1.0, H)) if features == "softcap_sinks" else {}
    q = jnp.asarray(_normal(60, (KERNEL_RUN["B"], H, KERNEL_RUN["D"])))
    for cache in _kernel_caches(*bits):
        got = cache.attend(q, impl="pallas", interpret=interpret, poison_outputs=True, return_lse=True, **options)
        want = cache.attend(q, impl="xla", return_lse=True, **options)
        for name, x, w in zip(("out", "lse"), got, want):
            np.testing.assert_allclose(np.asarray(x), np.asarray(w), rtol=2e-5, atol=2e-5, err_msg=name)


def test_kernel_path_decode_gradient_and_overflow_match_the_view():
    """zipcache_decode with impl="pallas" (the kernel for every step, segments compressed on the way) gives
    the xla path's outputs and cache; the query gradient is the view's; an overflowed cache gives NaN rows.
    Catches: the step attending with the post-append segment count (the full gap's tokens both in a slot
    and in the residual), the gradient taken through a different function, the overflow mark dropped."""
    B, T0, H, Hkv, D, gap = (KERNEL_RUN[n] for n in ("B", "T0", "H", "Hkv", "D", "gap"))
    cache, later = _kernel_caches()
    new = [jnp.asarray(_normal(50 + i, (B, 11, h, D))) for i, h in enumerate((H, Hkv, Hkv))]
    out, after = jax.jit(functools.partial(Z.zipcache_decode, impl="pallas"))(cache, *new)
    want, _ = jax.jit(functools.partial(Z.zipcache_decode, impl="xla"))(cache, *new)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=2e-5, atol=2e-5)
    for x, w in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(later)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(w), rtol=1e-6, atol=1e-6)
    q = jnp.asarray(_normal(61, (B, H, D)))
    weights = jnp.asarray(_normal(62, (B, H, D)))
    grads = [jax.grad(lambda q: jnp.sum(weights * later.attend(q, impl=impl, softcap=3.0)))(q)
             for impl in ("pallas", "xla")]
    np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(grads[1]), rtol=2e-5, atol=2e-5)
    overflowed = dataclasses.replace(later, length=jnp.int32(later.capacity + 1))
    assert np.all(np.isnan(np.asarray(overflowed.attend(q, impl="pallas"))))


def test_several_new_tokens_fall_back_to_the_view():
    """Tq > 1 needs key positions the compacted classes do not keep: impl="pallas" then runs the float decode
    kernel over the view, with the view path's result. A q whose batch is not the cache's is named (the check
    compared q's batch with itself before)."""
    _, later = _kernel_caches()
    q = jnp.asarray(_normal(63, (KERNEL_RUN["B"], 3, KERNEL_RUN["H"], KERNEL_RUN["D"])))
    np.testing.assert_allclose(np.asarray(later.attend(q, impl="pallas")), np.asarray(later.attend(q, impl="xla")),
                               rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match=r"q must be \[B=2, \(Tq,\) H, D=64\]"):   # a batch the cache lacks
        later.attend(q[:1], impl="pallas")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_decode_step_lowers_to_the_quantised_kernel_per_class(platform):
    """A decode step on D=64 exports with four quantised-kernel calls (prompt and stream, salient and not)
    and no float decode kernel: the packed codes are read in place, no float view is attended."""
    import re
    from tests.kernels.test_lowering import exported_text
    B, T0, H, Hkv, D = 1, 37, 4, 2, 64
    shapes = jax.eval_shape(functools.partial(Z.zipcache_prefill, max_new_tokens=20, streaming_gap=8),
                            *(jax.ShapeDtypeStruct((B, T0, h, D), jnp.float32) for h in (H, Hkv, Hkv)),
                            jax.random.PRNGKey(0))
    token = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in ((B, H, D), (B, 1, Hkv, D), (B, 1, Hkv, D))]
    text = exported_text(Z.zipcache_decode, shapes, *token, platform=platform)
    assert re.findall(r'\b(?:kernel_)?name = "(jattn_\w+)"', text) == ["jattn_decode_quantized"] * 4
