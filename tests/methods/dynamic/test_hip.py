"""P09 HiP: the hierarchical search against a literal NumPy transcription (GQA, odd lengths, partial last
blocks), the selected set stays causal and inside the budget, k >= T gives dense causal attention
(forward and gradients), the output equals dense attention with the expanded mask, a planted high-score
key block is always found, determinism and argument errors.

Mutations each test caught when tried (one line changed, test failed, change reverted):

* ``test_tiles_equal_literal_search``: the split point ``(a + e + 1) // 2`` -> ``(a + e) // 2``; the
  representative = the child's last block instead of its first; keys ``>= w_i`` of the representative
  not masked. (Ties broken by the higher child index survived: random inputs have no finite ties.)
* ``test_selected_tiles_are_causal_and_within_budget``: window tiles taken up to ``e_i // b_k`` (one tile
  past the block's last query).
* ``test_planted_block_is_always_found``: one halving fewer (``hip_iterations`` - 1).
* ``test_full_budget_is_dense_causal``: the searched range ending at ``m_i - 1``.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.dynamic.hip import hip_attention, hip_block_mask, hip_select
from tests.conftest import assert_forward_and_grads_close, dense_vjp_run, numpy_qkv, random_like, vjp_run

select = jax.jit(hip_select, static_argnames=("k_budget", "block_q", "block_k", "window"))


def literal_hip(q, k, *, k_budget, block_q, block_k, window):
    """The spec, one (batch, head, query block) at a time, with explicit group lists."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, T, H, D = q.shape
    G = H // k.shape[2]
    K = k_budget // block_k
    nQ, nK = math.ceil(T / block_q), math.ceil(T / block_k)
    tiles = np.zeros((B, H, nQ, nK), bool)
    m_max = math.ceil(max(0, (nQ - 1) * block_q - window) / block_k)
    widest = math.ceil(m_max / K)
    iterations = math.ceil(math.log2(widest)) if widest > 1 else 0
    for b in range(B):
        for h in range(H):
            for i in range(nQ):
                first, end_q = i * block_q, min((i + 1) * block_q, T)
                limit = max(0, first - window)
                m = math.ceil(limit / block_k)
                if m > K:
                    groups = [(g * m // K, (g + 1) * m // K) for g in range(K)]
                else:
                    groups = [(g, min(g + 1, m)) for g in range(K)]

                def score(rep):
                    keys = range(rep * block_k, min((rep + 1) * block_k, limit))
                    return max(q[b, t, h] @ k[b, s, h // G] for t in range(first, end_q) for s in keys)

                for _ in range(iterations):
                    children = []
                    for a, e in groups:
                        mid = (a + e + 1) // 2
                        children += [(a, mid), (mid, e)]
                    scores = [score(a) if e > a else -np.inf for a, e in children]
                    best = sorted(range(len(children)), key=lambda c: (-scores[c], c))[:K]
                    groups = [children[c] for c in sorted(best)]
                for a, e in groups:
                    if e > a:
                        tiles[b, h, i, a] = True
                for c in range(limit // block_k, (end_q - 1) // block_k + 1):
                    tiles[b, h, i, c] = True
    return tiles


CASES = [  # (seed, B, T, H, Hkv, D, k_budget, block_q, block_k, window)
    (0, 1, 203, 4, 2, 8, 32, 16, 8, 24),
    (1, 2, 150, 3, 1, 8, 16, 8, 16, 0),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_tiles_equal_literal_search(case):
    seed, B, T, H, Hkv, D, k_budget, block_q, block_k, window = case
    q, k, _ = numpy_qkv(seed, B, T, T, H, Hkv, D)
    kw = dict(k_budget=k_budget, block_q=block_q, block_k=block_k, window=window)
    want = literal_hip(q, k, **kw)
    got = np.asarray(select(q, k, **kw))
    nQ, nK = got.shape[-2:]
    causal = (np.arange(nK)[None] * block_k) <= (np.minimum((np.arange(nQ) + 1) * block_q, T) - 1)[:, None]
    assert want.sum() < 0.8 * causal.sum() * B * H                  # the search pruned something
    np.testing.assert_array_equal(got, want)


def test_selected_tiles_are_causal_and_within_budget():
    T, block_q, block_k, k_budget, window = 301, 16, 16, 48, 32
    q, k, _ = numpy_qkv(2, 1, T, T, 4, 2, 8)
    got = np.asarray(select(q, k, k_budget=k_budget, block_q=block_q, block_k=block_k, window=window))
    nQ, nK = got.shape[-2:]
    last_query = np.minimum((np.arange(nQ) + 1) * block_q, T) - 1
    causal = (np.arange(nK)[None] * block_k) <= last_query[:, None]
    assert not (got & ~causal).any()
    window_tiles = -(-(window + block_q) // block_k) + 1
    assert (got.sum(-1) <= k_budget // block_k + window_tiles).all()
    assert got[..., np.arange(nQ), last_query // block_k].all()     # the diagonal tile is always kept


def test_full_budget_is_dense_causal():
    T, block = 101, 16
    q, k, v = numpy_qkv(3, 1, T, T, 6, 2, 16)
    tiles = np.asarray(select(q, k, k_budget=128, block_q=block, block_k=block, window=16))
    nb = math.ceil(T / block)
    np.testing.assert_array_equal(tiles, np.broadcast_to(np.tril(np.ones((nb, nb), bool)), tiles.shape))
    w = random_like(4, q)
    fn = functools.partial(hip_attention, k_budget=128, block_q=block, block_k=block, window=16, impl="xla")
    got = jax.jit(lambda q, k, v, w: vjp_run(fn, q, k, v, w))(q, k, v, w)
    causal = jnp.asarray(np.tril(np.ones((T, T), bool)))
    assert_forward_and_grads_close(got, dense_vjp_run(q, k, v, w, causal), what="k >= T")


def test_output_equals_dense_with_expanded_mask():
    T, block = 101, 16
    q, k, v = numpy_qkv(5, 1, T, T, 6, 2, 16)
    kw = dict(k_budget=32, block_q=block, block_k=block, window=16)
    bm = jax.jit(functools.partial(hip_block_mask, **kw))(q, k)
    mask = np.asarray(bm.to_dense_mask(heads=6)) & np.tril(np.ones((T, T), bool))
    assert 0.3 < mask.mean() < 0.5
    w = random_like(6, q)
    fn = functools.partial(hip_attention, impl="xla", **kw)
    got = jax.jit(lambda q, k, v, w: vjp_run(fn, q, k, v, w))(q, k, v, w)
    assert_forward_and_grads_close(got, dense_vjp_run(q, k, v, w, jnp.asarray(mask)))


def test_planted_block_is_always_found():
    """A planted high-score key region at least as wide as two search groups: every query block past it
    (and past the window) keeps a block inside it, and every searched block it keeps is inside it.

    HiP scores a group by its first block (it relies on attention locality), so a *single* isolated
    high-score block inside a wide group can be pruned: the planted region is wider than a group."""
    T, block_q, block_k, D, K = 512, 16, 16, 16, 4
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, T, 2, D)).astype(np.float32) * 0.3
    k = rng.standard_normal((1, T, 1, D)).astype(np.float32) * 0.3
    direction = rng.standard_normal(D).astype(np.float32)
    q += direction
    region = np.arange(8, 16)                                     # key blocks 8..15 = keys [128, 256)
    k[0, region[0] * block_k:(region[-1] + 1) * block_k, 0] += 3 * direction
    got = np.asarray(select(jnp.asarray(q), jnp.asarray(k), k_budget=K * block_k, block_q=block_q,
                            block_k=block_k, window=16))
    later = np.arange(got.shape[2]) * block_q - 16 >= (region[-1] + 1) * block_k
    assert later.sum() > 10
    searched = got[:, :, later, :region[-1] + 1]                  # tiles before the window
    outside = np.ones(region[-1] + 1, bool)
    outside[region] = False
    assert searched[..., region].sum(-1).min() == K               # all K searched blocks in the region
    assert not searched[..., outside].any()


def test_selection_is_deterministic_and_traced_once():
    from tests.conftest import assert_traced_once
    q1, k1, _ = numpy_qkv(8, 1, 120, 120, 4, 2, 8)
    q2, k2, _ = numpy_qkv(9, 1, 120, 120, 4, 2, 8)
    fn = lambda q, k: hip_select(q, k, k_budget=16, block_q=8, block_k=8, window=8)
    a, _, c = assert_traced_once(fn, (q1, k1), (q2, k2), (q1, k1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(k_budget=20, block_k=16), ValueError, "k_budget"),
    (dict(k_budget=0), ValueError, "k_budget"),
    (dict(block_q=0), ValueError, "block_q"),
    (dict(window=-1), ValueError, "window"),
    (dict(block_k=2.0), TypeError, "block_k"),
    (dict(k_dim=8), ValueError, "head dim"),
])
def test_validation_errors_name_the_argument(kwargs, error, word):
    q, k, _ = numpy_qkv(0, 1, 48, 48, 2, 1, 16)
    if "k_dim" in kwargs:
        k = k[..., :kwargs.pop("k_dim")]
    with pytest.raises(error, match=word):
        hip_block_mask(q, k, **kwargs)
