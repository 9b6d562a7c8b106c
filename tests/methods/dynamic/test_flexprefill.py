"""P38 FlexPrefill: the selector against a literal NumPy transcription of the rule (both head patterns,
GQA, odd lengths), the full-budget and zero-budget limits, the vertical/slash tile expansion, exactness of
the attention against dense attention with the expanded mask (forward and gradients), JSD, monotonicity
in gamma, determinism and argument errors.

Mutations each test caught when tried (one line changed, test failed, change reverted):

* ``test_block_map_equals_literal_rule``: ``cover_count`` without the ``+ 1``; the budget divided by a
  hard-coded 128 instead of ``block_size``; ``< tau`` flipped to ``> tau``; the query-aware cover against
  ``gamma`` instead of ``gamma * nb``; the last-block causal mask ``<=`` -> ``<``.
* ``test_zero_budget_keeps_only_first_column_and_diagonal``: the forced slash index 0 -> -1 (diagonal not
  forced); the forced vertical block 0 dropped.
* ``test_vertical_slash_expansion_equals_explicit_mask``: slash tiles at ``(i, i + c)`` instead of
  ``(i, i - c)`` (offset ``j - i``); the vertical causal cut dropped.
* ``test_full_budget_is_dense_causal``: the block-causal cut of the vertical/slash map dropped. (``max_blocks``
  off by one, ``nb - 1``, survived: at full budget the slashes alone already cover every causal tile.)
* ``test_output_equals_dense_with_expanded_mask``: ``causal=True`` dropped from the attention call.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.core.reference import reference_attention
from jattn.methods.dynamic.flexprefill import (flexprefill_attention, flexprefill_block_mask, flexprefill_select,
                                               jsd, vertical_slash_block_map)
from tests.conftest import assert_forward_and_grads_close, dense_vjp_run, numpy_qkv, random_like, vjp_run

# ----------------------------------------------------------------------------- literal transcription


def _softmax(x):
    x = x - np.max(x)
    e = np.exp(x)
    return e / e.sum()


def literal_flexprefill(q, k, *, gamma, tau, min_budget, max_budget, b):
    """The spec, one (batch, head) at a time with explicit loops, in float64. Returns (tiles, query_aware)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, T, H, D = q.shape
    G = H // k.shape[2]
    nb = math.ceil(T / b)
    causal = np.tril(np.ones((nb, nb), bool))
    tiles = np.zeros((B, H, nb, nb), bool)
    query_aware = np.zeros((B, H), bool)
    distances = np.zeros((B, H))
    if T <= max(2 * b, math.ceil(min_budget / b) * b):
        tiles[:] = causal
        return tiles, query_aware, distances
    min_blocks = math.ceil(min_budget / b)
    max_blocks = nb if max_budget is None else min(math.ceil(max_budget / b), nb)
    n_last = min(b, T)

    def cover(x):
        prefix = np.cumsum(np.sort(x)[::-1])
        return int(np.sum(prefix <= gamma)) + 1

    def blocks(count):
        return min(max(count // b + 1, min_blocks), max_blocks)

    def top(scores, n):
        order = sorted(range(len(scores)), key=lambda c: (-scores[c], c))
        return set(order[:n])

    for bi in range(B):
        for h in range(H):
            kh = k[bi, :, h // G]
            A = np.zeros((n_last, T))
            for t in range(n_last):
                pos = T - n_last + t
                A[t, :pos + 1] = _softmax(kh[:pos + 1] @ q[bi, pos, h] / math.sqrt(D))
            vertical = A.mean(0)
            slash = np.zeros(T)
            for t in range(n_last):
                pos = T - n_last + t
                for o in range(pos + 1):
                    slash[o] += A[t, pos - o]
            slash /= n_last
            n_v, n_s = blocks(cover(vertical)), blocks(cover(slash))
            V = np.array([vertical[c * b:(c + 1) * b].sum() for c in range(nb)])
            S = np.array([slash[c * b:(c + 1) * b].sum() for c in range(nb)])
            k_bar = np.stack([kh[c * b:(c + 1) * b].mean(0) for c in range(nb)])
            a = _softmax(k_bar @ (q[bi, T - n_last:, h].mean(0) / math.sqrt(D)))
            m = (a + V) / 2
            dist = math.sqrt(0.5 * np.sum(a * np.log(a / m)) + 0.5 * np.sum(V * np.log(V / m)))
            distances[bi, h] = dist
            if dist < tau:
                query_aware[bi, h] = True
                n_v = n_s = min_blocks
            V[0] = np.inf
            S[0] = np.inf
            v_sel, s_sel = top(V, n_v), top(S, n_s)
            for i in range(nb):
                for j in range(i + 1):
                    tiles[bi, h, i, j] = j in v_sel or (i - j) in s_sel
            if query_aware[bi, h]:
                q_bar = np.stack([q[bi, c * b:(c + 1) * b, h].mean(0) for c in range(nb)])
                P = q_bar @ k_bar.T / math.sqrt(D)
                P[~causal] = -np.inf
                P = np.stack([_softmax(row) for row in P]).reshape(-1)
                order = sorted(range(nb * nb), key=lambda f: (-P[f], f))
                total = 0.0
                for f in order:
                    total += P[f]
                    if total > gamma * nb:
                        break
                    i, j = divmod(f, nb)
                    tiles[bi, h, i, j] |= j <= i
    return tiles, query_aware, distances


def tau_between_heads(distances):
    """A threshold halfway between two distinct head distances near the median: both patterns occur."""
    d = np.sort(distances.reshape(-1))
    mid = len(d) // 2
    return float((d[mid - 1] + d[mid]) / 2)


select = jax.jit(flexprefill_select, static_argnames=("gamma", "tau", "min_budget", "max_budget", "block_size"))
block_mask = jax.jit(flexprefill_block_mask, static_argnames=("gamma", "tau", "min_budget", "max_budget",
                                                              "block_size", "return_pattern"))
reference = jax.jit(reference_attention, static_argnames=("causal",))


# ------------------------------------------------------------------------------------ the rule

CASES = [  # (seed, B, T, H, Hkv, D, block, gamma, min_budget, max_budget)
    (0, 1, 157, 4, 1, 16, 16, 0.9, 16, None),
    (1, 2, 130, 6, 2, 16, 16, 0.7, 40, 64),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_block_map_equals_literal_rule(case):
    seed, B, T, H, Hkv, D, block, gamma, min_budget, max_budget = case
    q, k, _ = numpy_qkv(seed, B, T, T, H, Hkv, D)
    q = q * 2.0                                  # sharper attention: budgets well below dense
    _, _, distances = literal_flexprefill(q, k, gamma=gamma, tau=0.0, min_budget=min_budget,
                                          max_budget=max_budget, b=block)
    tau = tau_between_heads(distances)
    want, want_aware, _ = literal_flexprefill(q, k, gamma=gamma, tau=tau, min_budget=min_budget,
                                              max_budget=max_budget, b=block)
    assert want_aware.any() and not want_aware.all()
    bm, aware = block_mask(q, k, gamma=gamma, tau=tau, min_budget=min_budget, max_budget=max_budget,
                           block_size=block, return_pattern=True)
    np.testing.assert_array_equal(np.asarray(aware), want_aware)
    got = np.asarray(bm.to_dense_block_map())
    causal = np.tril(np.ones(got.shape[-2:], bool))
    assert want.sum() < causal.sum() * B * H                      # the selection is sparse here
    assert_holds_first_column_and_diagonal(got)
    np.testing.assert_array_equal(got, want)


def test_zero_budget_keeps_only_first_column_and_diagonal():
    q, k, _ = numpy_qkv(6, 2, 141, 141, 6, 2, 16)
    bm = block_mask(q, k, gamma=1e-6, tau=0.0, min_budget=1, block_size=16)
    got = np.asarray(bm.to_dense_block_map())
    nb = got.shape[-1]
    want = np.zeros((nb, nb), bool)
    want[:, 0] = True
    want[np.arange(nb), np.arange(nb)] = True
    np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))


def assert_holds_first_column_and_diagonal(tiles):
    nb = tiles.shape[-1]
    assert tiles[..., :, 0].all() and tiles[..., np.arange(nb), np.arange(nb)].all()
    assert not np.triu(tiles, 1).any()                            # never above the block diagonal


def test_vertical_slash_expansion_equals_explicit_mask():
    rng = np.random.default_rng(8)
    nb, b, T = 9, 16, 137
    vertical = rng.random((2, 3, nb)) < 0.3
    slash = rng.random((2, 3, nb)) < 0.3
    got = np.asarray(jax.jit(vertical_slash_block_map)(jnp.asarray(vertical), jnp.asarray(slash)))
    want = np.zeros((2, 3, nb, nb), bool)
    for bi in range(2):
        for h in range(3):
            for c in np.flatnonzero(vertical[bi, h]):
                for i in range(c, nb):
                    want[bi, h, i, c] = True
            for c in np.flatnonzero(slash[bi, h]):
                for i in range(c, nb):
                    want[bi, h, i, i - c] = True
    np.testing.assert_array_equal(got, want)
    # The BlockMask built from it visits exactly those tiles, every element of them.
    from jattn.core.block_mask import BlockMask
    bm = BlockMask.from_dense_block_map(jnp.asarray(got), block_q=b, block_k=b, seq_q=T, seq_k=T)
    dense = np.asarray(bm.to_dense_mask())
    np.testing.assert_array_equal(dense, np.repeat(np.repeat(want, b, -2), b, -1)[..., :T, :T])


# ------------------------------------------------------------------------------------ limits


def test_full_budget_is_dense_causal():
    """gamma = 1 and min_budget >= T keep every causal tile, on the selection path (no fallback)."""
    T, block = 101, 16                            # the shapes of the exactness test: one dense compile
    q, k, v = numpy_qkv(9, 1, T, T, 6, 2, 16)
    tiles, aware = select(q, k, gamma=1.0, tau=0.1, min_budget=T, block_size=block)
    nb = math.ceil(T / block)
    np.testing.assert_array_equal(np.asarray(tiles), np.broadcast_to(np.tril(np.ones((nb, nb), bool)), tiles.shape))
    w = random_like(10, q)
    fn = functools.partial(flexprefill_attention, gamma=1.0, tau=0.1, min_budget=T, block_size=block, impl="xla")
    got = jax.jit(lambda q, k, v, w: vjp_run(fn, q, k, v, w))(q, k, v, w)
    causal = jnp.asarray(np.tril(np.ones((T, T), bool)))
    assert_forward_and_grads_close(got, dense_vjp_run(q, k, v, w, causal), what="full budget")


def test_dense_fallback_below_the_minimum_length():
    q, k, _ = numpy_qkv(11, 1, 60, 60, 2, 1, 16)
    bm, aware = block_mask(q, k, gamma=0.1, tau=0.0, min_budget=64, block_size=16, return_pattern=True)
    causal = np.tril(np.ones((4, 4), bool))
    np.testing.assert_array_equal(np.asarray(bm.to_dense_block_map())[0], np.broadcast_to(causal, (2, 4, 4)))
    assert not np.asarray(aware).any()


# ------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("impl, grouping", [("xla", (6, 2))])
def test_output_equals_dense_with_expanded_mask(impl, grouping):
    H, Hkv = grouping
    T, block = 101, 16
    q, k, v = numpy_qkv(12, 1, T, T, H, Hkv, 16)
    q = 2.0 * q
    kw = dict(gamma=0.8, tau=0.2, min_budget=16, block_size=block)
    bm = block_mask(q, k, **kw)
    mask = np.asarray(bm.to_dense_mask(heads=H)) & np.tril(np.ones((T, T), bool))
    assert 0.2 < mask.mean() < 0.45
    w = random_like(13, q)
    fn = functools.partial(flexprefill_attention, impl=impl, **kw)
    got = jax.jit(lambda q, k, v, w: vjp_run(fn, q, k, v, w))(q, k, v, w)
    assert_forward_and_grads_close(got, dense_vjp_run(q, k, v, w, jnp.asarray(mask)), what=impl)


# ------------------------------------------------------------------------------------ properties


def test_jsd_symmetric_zero_on_identical_and_bounded():
    rng = np.random.default_rng(14)
    p = rng.random((5, 11))
    p /= p.sum(-1, keepdims=True)
    r = rng.random((5, 11)) ** 4
    r[:, 3] = 0.0                                                # a zero probability is fine (0 log 0 = 0)
    r /= r.sum(-1, keepdims=True)
    f = jax.jit(jsd)
    np.testing.assert_allclose(np.asarray(f(p, r)), np.asarray(f(r, p)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(f(p, p)), 0.0, atol=1e-7)
    m = (p + r) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        want = 0.5 * np.sum(p * np.log(p / m), -1) + 0.5 * np.nansum(r * np.log(r / m), -1)
    np.testing.assert_allclose(np.asarray(f(p, r)), want, rtol=1e-5)
    onehots = np.eye(4)
    assert np.allclose(np.asarray(f(onehots[0], onehots[1])), np.log(2.0))


def test_tiles_shrink_as_gamma_decreases():
    q, k, _ = numpy_qkv(15, 1, 190, 190, 4, 2, 16)
    q = 2.0 * q
    _, _, distances = literal_flexprefill(q, k, gamma=0.5, tau=0.0, min_budget=1, max_budget=None, b=16)
    tau = tau_between_heads(distances)
    selections = [select(q, k, gamma=g, tau=tau, min_budget=1, block_size=16) for g in (0.2, 0.7, 1.0)]
    maps = [np.asarray(tiles) for tiles, _ in selections]
    aware = np.asarray(selections[0][1])
    assert aware.any() and not aware.all()                       # both patterns take part
    for tiles in maps:
        assert_holds_first_column_and_diagonal(tiles)
    for smaller, larger in zip(maps, maps[1:]):
        assert not (smaller & ~larger).any()                     # nested, so density is non-increasing
    assert maps[0].sum() < maps[-1].sum()


def test_selection_is_deterministic_and_traced_once():
    from tests.conftest import assert_traced_once
    q1, k1, _ = numpy_qkv(16, 1, 120, 120, 4, 2, 16)
    q2, k2, _ = numpy_qkv(17, 1, 120, 120, 4, 2, 16)
    fn = lambda q, k: flexprefill_select(q, k, gamma=0.8, tau=0.2, min_budget=16, block_size=16)
    a, b, c = assert_traced_once(fn, (q1, k1), (q2, k2), (q1, k1))
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(c[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(c[1]))


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(gamma=0.0), ValueError, "gamma"),
    (dict(gamma=1.5), ValueError, "gamma"),
    (dict(tau=-0.1), ValueError, "tau"),
    (dict(min_budget=0), ValueError, "min_budget"),
    (dict(max_budget=0), ValueError, "max_budget"),
    (dict(block_size=24), ValueError, "block_size"),
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
        flexprefill_block_mask(q, k, **kwargs)


# ------------------------------------------------------------------------------------ synthetic inputs


def test_synthetic_inputs_concentrate_mass_in_the_planted_structure():
    """At T=512 dense attention puts >= 0.8 of its mass on the sink column, the band, the planted stripes
    and slashes, and each structure's tiles hold far more mass per tile than the other causal tiles
    (mutations caught: slash keys shifted by the wrong sign, ``positions - o``; stripes planted on q instead
    of k; the band's key components dropped)."""
    from jattn.eval import attention_block_mass
    from jattn.methods.dynamic.synthetic import synthetic_long_qkv
    T, b, H, Hkv = 512, 16, 4, 2
    q, k, _, layout = synthetic_long_qkv(3, T, H=H, Hkv=Hkv, D=64, slash_offsets=(64, 200), band_width=32)
    mass = np.asarray(jax.jit(lambda q, k: attention_block_mass(q, k, block_q=b, block_k=b))(q, k))
    nb = T // b
    i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
    causal = i >= j
    slash_tiles = np.isin(i - j, [o // b + d for o in layout.slash_offsets for d in (0, 1)])
    for kv in range(Hkv):
        m = mass[0, kv * (H // Hkv):(kv + 1) * (H // Hkv)].sum(0)
        sink = causal & (j == 0)
        band = causal & (i - j <= layout.band_width // b + 1) & ~sink
        stripes = causal & np.isin(j, layout.stripes[kv] // b) & ~sink & ~band
        slashes = causal & slash_tiles & ~sink & ~band & ~stripes
        background = causal & ~(sink | band | stripes | slashes)
        per_tile = lambda tiles: m[tiles].mean() / m[background].mean()
        assert per_tile(sink) > 50 and per_tile(band) > 50 and per_tile(stripes) > 50
        assert per_tile(slashes) > 5
        assert m[background].sum() / m.sum() < 0.2
        assert background.sum() > 0.4 * causal.sum()              # the structure is a minority of the tiles
