"""P32 SALE: the selector against a literal NumPy transcription of the rule (INT4 per-token and per-block
scales, the full-precision estimator, GQA, odd lengths, per-head tau), the tau -> 0 (dense) and tau = 1
(sink + local only) limits, exactness of the attention against dense attention with the expanded mask
(forward and gradients), monotonicity in tau, INT4 recall of the oracle tiles, a planted stripe,
the quantiser itself, determinism and argument errors.

Mutations each test caught when tried (one line changed, test failed, change reverted):

* ``test_tiles_equal_literal_rule``: the threshold ``m + ln(tau l)`` without ``ln l`` (absolute instead of
  relative score); ``qmk`` (``q_bar . k'``) not added back; the local window measured from the block's last
  query instead of its first; one scale per dim instead of per token / group. (Padded rows of the last
  block allowed to vote survived: a zero padded row's estimate never clears its own threshold here.)
* ``test_quantizer_matches_symmetric_int4``: ``floor`` instead of round-half-even.
* ``test_max_tau_keeps_only_sink_and_local``: the sink tile dropped from the always-kept tiles.
* ``test_planted_stripe_is_found``: candidates scanned only up to tile ``local_first - 2`` (off by one).
* ``test_full_budget_is_dense_causal`` / ``test_output_equals_dense_with_expanded_mask``: the attention
  against the dense oracle, forward and gradients (tau = 0 and a partial tau).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.dynamic.sale import quantize_symmetric, sale_attention, sale_block_mask, sale_select
from tests.conftest import assert_forward_and_grads_close, dense_vjp_run, numpy_qkv, random_like, vjp_run

STATIC = ("tau", "block_q", "block_k", "local_window", "bits", "quant_block", "dense_len", "smooth")
select = jax.jit(sale_select, static_argnames=STATIC)
quantize = jax.jit(quantize_symmetric, static_argnames=("bits", "group"))

# ----------------------------------------------------------------------------- literal transcription


def literal_quantize(x, bits, group):
    """``x [T, D]`` float32 -> (ints, scales [T]): one scale per ``group`` tokens, round half to even."""
    qmax = np.float32(2 ** (bits - 1) - 1)
    ints = np.zeros_like(x)
    scales = np.zeros(x.shape[0], np.float32)
    for start in range(0, x.shape[0], group):
        a = np.float32(np.abs(x[start:start + group]).max())
        if a > 0:
            ints[start:start + group] = np.clip(np.round(x[start:start + group] * (qmax / a)), -qmax, qmax)
            scales[start:start + group] = a / qmax
    return ints, scales


def literal_sale(q, k, *, tau, block_q, block_k, local_window, bits, quant_block):
    """The spec, one (batch, head, query block, row) at a time. Returns the kept tiles [B, H, nQ, nK]."""
    q, k = np.asarray(q, np.float32), np.asarray(k, np.float32)
    B, T, H, D = q.shape
    G = H // k.shape[2]
    taus = tau if isinstance(tau, tuple) else (tau,) * H
    nQ, nK = math.ceil(T / block_q), math.ceil(T / block_k)
    scale = D ** -0.5
    tiles = np.zeros((B, H, nQ, nK), bool)
    for b in range(B):
        for h in range(H):
            q_bar = q[b, :, h].mean(0)
            k_s = k[b, :, h // G] - k[b, :, h // G].mean(0)
            exact = q[b, :, h].astype(np.float64) @ k_s.T.astype(np.float64)          # [T, T]
            if bits is None:
                estimate = exact
            else:
                iq, sq = literal_quantize(q[b, :, h] - q_bar, bits, quant_block)
                ik, sk = literal_quantize(k_s, bits, quant_block)
                estimate = (iq.astype(np.float64) @ ik.T) * sq[:, None] * sk[None, :] + (k_s @ q_bar)[None, :]
            for i in range(nQ):
                first, end = i * block_q, min((i + 1) * block_q, T)
                local_first = max(0, first - local_window) // block_k
                for c in range(nK):
                    if c * block_k <= end - 1 and (c == 0 or c >= local_first):
                        tiles[b, h, i, c] = True          # sink and local tiles, always
                for t in range(first, end):
                    anchor = [j for j in range(t + 1) if j // block_k == 0 or j // block_k >= local_first]
                    s = scale * exact[t, anchor]
                    m = s.max()
                    l = np.exp(s - m).sum()
                    for c in range(1, local_first):
                        keys = range(c * block_k, min((c + 1) * block_k, T))
                        if any(np.exp(scale * estimate[t, j] - m) / l > taus[h] for j in keys):
                            tiles[b, h, i, c] = True
    return tiles


def sink_and_local(T, block_q, block_k, local_window):
    nQ, nK = math.ceil(T / block_q), math.ceil(T / block_k)
    want = np.zeros((nQ, nK), bool)
    for i in range(nQ):
        last = min((i + 1) * block_q, T) - 1
        want[i, 0] = True
        want[i, max(0, i * block_q - local_window) // block_k:last // block_k + 1] = True
    return want


def causal_tiles(T, block_q, block_k):
    nQ, nK = math.ceil(T / block_q), math.ceil(T / block_k)
    last = np.minimum((np.arange(nQ) + 1) * block_q, T) - 1
    return np.arange(nK)[None] * block_k <= last[:, None]


# ------------------------------------------------------------------------------------ the rule

CASES = [  # (seed, B, T, H, Hkv, D, block_q, block_k, local_window, bits, quant_block, tau)
    (0, 1, 203, 4, 2, 16, 16, 8, 16, 4, 1, 0.5),
    (1, 2, 150, 4, 2, 16, 16, 16, 32, 4, 8, (0.3, 0.5, 0.7, 0.9)),
    (2, 1, 141, 4, 2, 16, 16, 8, 8, None, 1, 0.6),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_tiles_equal_literal_rule(case):
    seed, B, T, H, Hkv, D, block_q, block_k, local_window, bits, quant_block, tau = case
    q, k, _ = numpy_qkv(seed, B, T, T, H, Hkv, D)
    q = 1.5 * q                                                   # sharper attention
    kw = dict(tau=tau, block_q=block_q, block_k=block_k, local_window=local_window, bits=bits,
              quant_block=quant_block)
    want = literal_sale(q, k, **kw)
    got = np.asarray(select(q, k, dense_len=0, **kw))
    causal = causal_tiles(T, block_q, block_k)
    assert want.sum() < 0.9 * causal.sum() * B * H                # the selection is sparse
    assert want.sum() > sink_and_local(T, block_q, block_k, local_window).sum() * B * H + 10  # and selected some
    np.testing.assert_array_equal(got, want)


def test_quantizer_matches_symmetric_int4():
    x = np.array([[0.5, -1.0, 0.25, 0.0], [3.5, -7.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0]], np.float32)
    ints, scales = quantize(jnp.asarray(x)[None, :, None], bits=4, group=1)
    # Row 0: a = 1, x * 7 = (3.5, -7, 1.75, 0) -> round half even (4, -7, 2, 0); row 2 all zero, scale 0.
    np.testing.assert_array_equal(np.asarray(ints)[0, :, 0], [[4, -7, 2, 0], [4, -7, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(np.asarray(scales)[0, :, 0], [1 / 7, 1.0, 0.0], rtol=1e-6)
    # Per-block scales: two tokens share the larger maximum.
    ints2, scales2 = quantize(jnp.asarray(x)[None, :, None], bits=4, group=2)
    np.testing.assert_allclose(np.asarray(scales2)[0, :, 0], [1.0, 1.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(ints2)[0, 0, 0], [0, -1, 0, 0])
    rng = np.random.default_rng(3)
    y = rng.standard_normal((37, 16)).astype(np.float32)
    for group in (1, 4):
        got_i, got_s = quantize(jnp.asarray(y)[None, :, None], bits=4, group=group)
        want_i, want_s = literal_quantize(y, 4, group)
        np.testing.assert_array_equal(np.asarray(got_i)[0, :, 0], want_i)
        np.testing.assert_allclose(np.asarray(got_s)[0, :, 0], want_s, rtol=1e-6)
        assert np.abs(np.asarray(got_i)).max() == 7


# ------------------------------------------------------------------------------------ limits


def test_max_tau_keeps_only_sink_and_local():
    """tau = 1 on flat attention (no relative score can exceed the whole sink+local mass): exactly the sink
    column and the local tiles, which always include the diagonal."""
    T, block_q, block_k, W = 141, 16, 8, 16
    q, k, _ = numpy_qkv(4, 1, T, T, 4, 2, 16)
    got = np.asarray(select(0.3 * q, k, tau=1.0, block_q=block_q, block_k=block_k, local_window=W, dense_len=0))
    want = sink_and_local(T, block_q, block_k, W)
    np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))


def test_full_budget_is_dense_causal():
    """tau = 0 (and a per-head tau below 1e-5) keeps every causal tile: dense causal attention, fwd and grads."""
    T, block = 101, 16
    q, k, v = numpy_qkv(5, 1, T, T, 6, 2, 16)
    for tau in (0.0, (0.0, 1e-6, 0.0, 0.0, 0.0, 0.0)):
        tiles = np.asarray(select(q, k, tau=tau, block_q=block, block_k=block, local_window=16, dense_len=0))
        np.testing.assert_array_equal(tiles, np.broadcast_to(causal_tiles(T, block, block), tiles.shape))
    w = random_like(6, q)
    fn = functools.partial(sale_attention, tau=0.0, block_q=block, block_k=block, local_window=16, dense_len=0,
                           impl="xla")
    got = jax.jit(lambda q, k, v, w: vjp_run(fn, q, k, v, w))(q, k, v, w)
    causal = jnp.asarray(np.tril(np.ones((T, T), bool)))
    assert_forward_and_grads_close(got, dense_vjp_run(q, k, v, w, causal), what="tau = 0")


def test_dense_below_dense_len():
    q, k, _ = numpy_qkv(7, 1, 60, 60, 2, 1, 16)
    tiles = np.asarray(select(q, k, tau=1.0, block_q=16, block_k=16, local_window=0, dense_len=60))
    np.testing.assert_array_equal(tiles, np.broadcast_to(causal_tiles(60, 16, 16), tiles.shape))


# ------------------------------------------------------------------------------------ exactness


def test_output_equals_dense_with_expanded_mask():
    T, block = 101, 16
    q, k, v = numpy_qkv(8, 1, T, T, 6, 2, 16)
    q = 1.5 * q
    kw = dict(tau=0.6, block_q=block, block_k=block, local_window=16, dense_len=0)
    bm = jax.jit(functools.partial(sale_block_mask, **kw))(q, k)
    mask = np.asarray(bm.to_dense_mask(heads=6)) & np.tril(np.ones((T, T), bool))
    assert 0.25 < mask.mean() < 0.45
    w = random_like(9, q)
    fn = functools.partial(sale_attention, impl="xla", **kw)
    got = jax.jit(lambda q, k, v, w: vjp_run(fn, q, k, v, w))(q, k, v, w)
    assert_forward_and_grads_close(got, dense_vjp_run(q, k, v, w, jnp.asarray(mask)))


# ------------------------------------------------------------------------------------ properties


def test_tiles_grow_as_tau_decreases():
    T, block_q, block_k, W = 203, 16, 8, 16
    q, k, _ = numpy_qkv(10, 1, T, T, 4, 2, 16)
    q = 1.5 * q
    kw = dict(block_q=block_q, block_k=block_k, local_window=W, bits=4, quant_block=1)   # as CASES[0]
    maps = [np.asarray(select(q, k, dense_len=0, tau=t, **kw)) for t in (1.0, 0.5)]
    for smaller, larger in zip(maps, maps[1:]):
        assert not (smaller & ~larger).any()                      # nested
        assert smaller.sum() < larger.sum()


def test_int4_estimate_recalls_the_oracle_tiles():
    """On structured (synthetic long-context) inputs the INT4 selection keeps >= 95% of the candidate tiles
    the full-precision estimator keeps and adds few others (the paper's claim is qualitative; on iid random
    inputs, with many borderline tiles, it was 87% at tau = 0.3)."""
    from jattn.methods.dynamic.synthetic import synthetic_long_qkv
    q, k, _, _ = synthetic_long_qkv(11, 512, H=4, Hkv=2, D=32, slash_offsets=(64, 200), band_width=32)
    kw = dict(tau=0.01, block_q=32, block_k=16, local_window=32, dense_len=0)
    always = sink_and_local(512, 32, 16, 32)
    oracle = np.asarray(select(q, k, bits=None, **kw)) & ~always
    int4 = np.asarray(select(q, k, bits=4, **kw)) & ~always
    assert oracle.sum() > 50
    assert (oracle & int4).sum() >= 0.95 * oracle.sum()
    assert (int4 & ~oracle).sum() <= 0.25 * oracle.sum()


def test_planted_stripe_is_found():
    """Key 40 matches every query strongly: every query block whose local window starts past it keeps the
    tile that holds it, and (random elsewhere, high tau) few other candidate tiles."""
    T, block_q, block_k, D, W = 256, 16, 8, 16, 16
    rng = np.random.default_rng(13)
    q = rng.standard_normal((1, T, 2, D)).astype(np.float32) * 0.5
    k = rng.standard_normal((1, T, 1, D)).astype(np.float32) * 0.5
    direction = rng.standard_normal(D).astype(np.float32)
    q += direction
    k[0, 40, 0] += 4 * direction
    got = np.asarray(select(jnp.asarray(q), jnp.asarray(k), tau=0.3, block_q=block_q, block_k=block_k,
                            local_window=W, dense_len=0))
    past = np.flatnonzero(np.arange(got.shape[2]) * block_q - W >= 48)      # key tile 5 is a candidate
    assert len(past) > 8
    assert got[0, :, past, 40 // block_k].all()
    candidates = np.zeros(got.shape[-2:], bool)
    for i in past:
        candidates[i, 1:max(0, i * block_q - W) // block_k] = True
    candidates[:, 40 // block_k] = False
    assert got[0][:, candidates].mean() < 0.1


def test_selection_is_deterministic_and_traced_once():
    from tests.conftest import assert_traced_once
    q1, k1, _ = numpy_qkv(14, 1, 120, 120, 4, 2, 16)
    q2, k2, _ = numpy_qkv(15, 1, 120, 120, 4, 2, 16)
    fn = lambda q, k: sale_select(q, k, tau=0.05, block_q=16, block_k=8, local_window=16, dense_len=0)
    a, _, c = assert_traced_once(fn, (q1, k1), (q2, k2), (q1, k1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(tau=-0.1), ValueError, "tau"),
    (dict(tau=1.5), ValueError, "tau"),
    (dict(tau=(0.1, 0.2, 0.3)), ValueError, "tau"),
    (dict(tau="0.1"), TypeError, "tau"),
    (dict(block_q=0), ValueError, "block_q"),
    (dict(block_k=8.0), TypeError, "block_k"),
    (dict(local_window=-1), ValueError, "local_window"),
    (dict(bits=9), ValueError, "bits"),
    (dict(quant_block=3), ValueError, "quant_block"),
    (dict(k_dim=8), ValueError, "head dim"),
    (dict(k_len=40), ValueError, "length"),
])
def test_validation_errors_name_the_argument(kwargs, error, word):
    q, k, _ = numpy_qkv(0, 1, 48, 48, 2, 1, 16)
    if "k_dim" in kwargs:
        k = k[..., :kwargs.pop("k_dim")]
    if "k_len" in kwargs:
        k = k[:, :kwargs.pop("k_len")]
    with pytest.raises(error, match=word):
        sale_block_mask(q, k, **kwargs)
