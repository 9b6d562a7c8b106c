"""P44 TokenSelect: fingerprint, soft vote, attended set, Selection Cache and attention with contiguous RoPE,
against literal NumPy transcriptions of the official ``TokenRetriever`` and against dense decode attention.

Mutations caught (each tried on jattn/methods/kv/tokenselect.py or gather.py, then reverted):
* fingerprint rotated from position 0 instead of ``n_local``           -> test_fingerprint_*
* vote with ``1/sqrt(d)``, or ``max`` over heads instead of the sum    -> test_votes_*
* kv head ``h % Hkv`` under ``head_map="grouped"``                     -> test_votes_* (GQA cases)
* candidates up to ``n - n_local`` inclusive (overlap with locals)     -> test_votes_*, test_selection_*
* the dense list used one token past ``n = n_init + top_k + n_local``  -> test_selection_* (n = 11)
  (``<`` for ``<=`` at the boundary is an equivalent mutant: there the sparse list is the dense one)
* contiguous query position ``m - Tq + t + 1``                          -> test_attention_*
* reuse without checking ``filled``, or the cache refreshed on reuse   -> test_selection_cache_*
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.core.reference import reference_attention
from jattn.methods.kv.tokenselect import (SelectionCache, query_fingerprint, token_votes, tokenselect_decode,
                                          tokenselect_indices, tokenselect_select)
from tests.conftest import assert_close

THETA = 10000.0


# ------------------------------------------------------------------------------- NumPy transcriptions

def np_rope(x, pos, theta=THETA):
    """Rotate-half RoPE of ``x [..., D]`` at integer ``pos [...]`` (the official RotaryEmbedding)."""
    D = x.shape[-1]
    inv = theta ** (-np.arange(0, D, 2) / D)
    ang = np.asarray(pos, np.float64)[..., None] * inv
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def np_softmax(s):
    e = np.exp(s - s.max())
    return e / e.sum()


def np_fingerprint(q, n_local, theta):
    """``mean_t RoPE(q_t, n_local + t)``: q ``[Tq, H, D]`` -> ``[H, D]``."""
    Tq = q.shape[0]
    rotated = q if theta is None else np_rope(q, (n_local + np.arange(Tq))[:, None])
    return rotated.mean(0)


def np_kv_head(h, H, Hkv, head_map):
    return h // (H // Hkv) if head_map == "grouped" else h % Hkv


def np_votes(fp, k, n, n_init, n_local, head_map):
    """Votes over the candidates ``[n_init, n - n_local)`` of one sequence (``k [Hkv, S, D]``)."""
    H, Hkv = fp.shape[0], k.shape[0]
    cand = np.arange(n_init, n - n_local)
    votes = np.zeros(len(cand))
    for h in range(H):
        votes += np_softmax(k[np_kv_head(h, H, Hkv, head_map), cand] @ fp[h])
    return cand, votes


def np_selection(q, k, n, n_init, n_local, top_k, theta, head_map="grouped"):
    """The attended list of one sequence (``q [Tq, H, D]``, ``k [Hkv, S, D]``)."""
    if n <= n_init + top_k + n_local:
        return np.arange(n)
    cand, votes = np_votes(np_fingerprint(q, n_local, theta), k, n, n_init, n_local, head_map)
    top = np.sort(cand[np.argsort(-votes, kind="stable")[:top_k]])
    return np.concatenate([np.arange(n_init), top, np.arange(n - n_local, n)])


def np_gathered(q, k, v, n, sel, theta, positions, scale):
    """Attention of ``q [Tq, H, D]`` over the list ``sel`` with on-the-fly RoPE -> ``[Tq, H, Dv]``."""
    Tq, H, _ = q.shape
    Hkv, m = k.shape[0], len(sel)
    out = np.zeros((Tq, H, v.shape[-1]))
    for h in range(H):
        keys, vals = k[h // (H // Hkv), sel], v[h // (H // Hkv), sel]
        for t in range(Tq):
            if positions == "contiguous":
                kpos, qpos = np.arange(m), m - Tq + t
            else:
                kpos, qpos = sel, n - Tq + t
            qr, kr = (q[t, h], keys) if theta is None else (np_rope(q[t, h], qpos), np_rope(keys, kpos))
            s = np.where(sel <= n - Tq + t, kr @ qr * scale, -np.inf)
            out[t, h] = np_softmax(s) @ vals
    return out


def inputs(seed, B, Tq, H, Hkv, S, D):
    rng = np.random.default_rng(seed)
    draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    return draw(B, Tq, H, D), draw(B, Hkv, S, D), draw(B, Hkv, S, D)


# --------------------------------------------------------------------------------------------- tests

@functools.partial(jax.jit, static_argnames=("n_local",))
def _fingerprint(q, *, n_local):
    return query_fingerprint(q, n_local=n_local, rope_theta=THETA)


def test_fingerprint_is_the_mean_of_queries_rotated_from_n_local():
    q, _, _ = inputs(0, 2, 3, 4, 2, 8, 8)
    got = _fingerprint(jnp.asarray(q), n_local=5)
    for b in range(2):
        np.testing.assert_allclose(got[b], np_fingerprint(q[b], 5, THETA), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("H, Hkv, head_map", [(4, 1, "grouped"), (6, 2, "grouped"), (6, 2, "interleaved"),
                                              (8, 4, "grouped")])
def test_votes_equal_the_sum_of_per_head_softmaxes(H, Hkv, head_map):
    B, S, D, n_init, n_local = 2, 23, 8, 3, 4
    rng = np.random.default_rng(H + Hkv)
    fp = rng.standard_normal((B, H, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
    lengths = np.array([21, 13])
    votes = jax.jit(functools.partial(token_votes, n_init=n_init, n_local=n_local, head_map=head_map))(
        jnp.asarray(fp), jnp.asarray(k), jnp.asarray(lengths))
    votes = np.asarray(votes)
    for b, n in enumerate(lengths):
        cand, want = np_votes(fp[b], k[b], n, n_init, n_local, head_map)
        np.testing.assert_allclose(votes[b, cand], want, rtol=2e-5, atol=1e-6)
        outside = np.setdiff1d(np.arange(S), cand)
        assert np.all(np.isneginf(votes[b, outside]))
        assert np.isclose(votes[b, cand].sum(), H, rtol=1e-5)     # each head's softmax sums to 1


SELECT = dict(n_init=2, n_local=3, top_k=5)


@functools.partial(jax.jit, static_argnames=("head_map",))
def _indices(q, k, lengths, head_map="grouped"):
    return tokenselect_indices(q, k, lengths, rope_theta=THETA, head_map=head_map, **SELECT)


@pytest.mark.parametrize("H, Hkv", [(4, 1), (6, 2)])
def test_selection_keeps_sinks_and_locals_and_is_sorted_unique(H, Hkv):
    q, k, _ = inputs(H, 3, 2, H, Hkv, 31, 8)
    lengths = np.array([31, 11, 17])                 # 11 = n_init + top_k + n_local + 1: the first sparse length
    idx, valid = map(np.asarray, _indices(jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths)))
    for b, n in enumerate(lengths):
        sel = idx[b][valid[b]]
        np.testing.assert_array_equal(sel, np_selection(q[b], k[b], n, 2, 3, 5, THETA))
        assert np.all(np.diff(sel) > 0) and sel[-1] == n - 1
        np.testing.assert_array_equal(sel[:2], [0, 1])
        np.testing.assert_array_equal(sel[-3:], [n - 3, n - 2, n - 1])
        assert len(sel) == 10


@pytest.mark.parametrize("n", [10, 7])
def test_dense_when_budget_covers_the_cache(n):
    """``n <= n_init + top_k + n_local``: every token, and the attention is dense decode attention over the
    cache rotated at its original positions (contiguous = original positions on the full list)."""
    q, k, v = inputs(n, 1, 1, 4, 2, 16, 8)
    lengths = jnp.asarray([n])
    idx, valid = _indices(jnp.asarray(q), jnp.asarray(k), lengths)
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(valid)], np.arange(n))
    k_rot = np_rope(np.swapaxes(k, 1, 2), np.arange(16)[None, :, None])            # [B, S, Hkv, D]
    q_rot = np_rope(q, np.array([[[n - 1]]]))
    visible = (np.arange(16) < n)[None, None, None, :]
    want = _masked_reference(jnp.asarray(q_rot, jnp.float32), jnp.asarray(k_rot, jnp.float32),
                             jnp.swapaxes(jnp.asarray(v), 1, 2), jnp.asarray(visible))
    for positions in ("contiguous", "original"):
        got = _decode(jnp.asarray(q[:, 0]), jnp.asarray(k), jnp.asarray(v), lengths, positions=positions)
        assert_close(got, want[:, 0], what=positions)


@jax.jit
def _masked_reference(q, k, v, mask):
    return reference_attention(q, k, v, mask=mask)


@functools.partial(jax.jit, static_argnames=("positions",))
def _decode(q, k, v, lengths, positions="contiguous"):
    return tokenselect_decode(q, k, v, lengths, rope_theta=THETA, positions=positions, **SELECT)


@pytest.mark.parametrize("Tq, positions", [(1, "contiguous"), (3, "contiguous"), (3, "original")])
def test_attention_over_the_selection_equals_numpy(Tq, positions):
    B, H, Hkv, S, D = 2, 6, 2, 29, 8
    q, k, v = inputs(Tq, B, Tq, H, Hkv, S, D)
    lengths = np.array([29, 19])
    got = _decode(jnp.asarray(q[:, 0] if Tq == 1 else q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths),
                  positions=positions)
    got = np.asarray(got if Tq > 1 else got[:, None])
    for b, n in enumerate(lengths):
        sel = np_selection(q[b], k[b], n, 2, 3, 5, THETA)
        want = np_gathered(q[b], k[b], v[b], n, sel, THETA, positions, D ** -0.5)
        np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-5)


@functools.partial(jax.jit, static_argnames=("threshold",))
def _select(q, k, lengths, cache, threshold):
    return tokenselect_select(q, k, lengths, cache, threshold=threshold, rope_theta=THETA, **SELECT)


def _steps(threshold, queries, k, lengths):
    cache = SelectionCache.create(k.shape[0], queries[0].shape[1], queries[0].shape[2], SELECT["top_k"])
    results = []
    for q in queries:
        idx, valid, cache, reused = _select(jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths), cache, threshold)
        results.append((np.asarray(idx), np.asarray(reused)))
    return results


def test_selection_cache_threshold_one_never_reuses_and_minus_one_always_does():
    B, H, Hkv, S, D = 2, 4, 2, 30, 8
    rng = np.random.default_rng(7)
    k = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
    lengths = np.array([30, 10])                                         # sequence 1 is dense: never cached
    queries = [rng.standard_normal((B, H, D)).astype(np.float32) for _ in range(3)]
    fresh = [np.asarray(_indices(jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths))[0]) for q in queries]
    never = _steps(1.0, queries, k, lengths)
    for (idx, reused), want in zip(never, fresh):
        assert not reused.any()
        np.testing.assert_array_equal(idx, want)
    always = _steps(-1.0, queries, k, lengths)
    assert not always[0][1].any()                                        # the first step fills the cache
    for idx, reused in always[1:]:
        np.testing.assert_array_equal(reused, [True, False])
        np.testing.assert_array_equal(idx, fresh[0])                     # sequence 0 keeps its first top-k


def test_selection_cache_reuses_when_the_fingerprint_cosine_reaches_the_threshold():
    B, H, Hkv, S, D = 1, 4, 2, 30, 8
    rng = np.random.default_rng(8)
    k = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
    q0 = rng.standard_normal((B, H, D)).astype(np.float32)
    q1 = q0 + 0.3 * rng.standard_normal((B, H, D)).astype(np.float32)
    a, b = np_fingerprint(q0[0][None], 3, THETA).ravel(), np_fingerprint(q1[0][None], 3, THETA).ravel()
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    below, above = cos - 1e-4, cos + 1e-4
    assert _steps(below, [q0, q1], k, np.array([30]))[1][1].all()
    assert not _steps(above, [q0, q1], k, np.array([30]))[1][1].any()


def test_bad_arguments_are_named():
    q, k, v = (jnp.asarray(x) for x in inputs(0, 1, 4, 4, 2, 16, 8))
    lengths = jnp.asarray([12])
    with pytest.raises(ValueError, match="n_local"):
        tokenselect_indices(q, k, lengths, n_init=1, n_local=3, top_k=2)          # chunk of 4 > n_local 3
    with pytest.raises(ValueError, match="head_map"):
        tokenselect_indices(q, k, lengths, n_init=1, n_local=4, top_k=2, head_map="modulo")
    with pytest.raises((TypeError, ValueError), match="top_k"):
        tokenselect_indices(q, k, lengths, n_init=1, n_local=4, top_k=0)
    with pytest.raises(ValueError, match="threshold"):
        tokenselect_select(q, k, lengths, SelectionCache.create(1, 4, 8, 2), n_init=1, n_local=4, top_k=2,
                           threshold=1.5)
    with pytest.raises(ValueError, match="SelectionCache"):
        tokenselect_select(q, k, lengths, SelectionCache.create(1, 4, 8, 3), n_init=1, n_local=4, top_k=2)
    with pytest.raises(ValueError, match="positions"):
        tokenselect_decode(q, k, v, lengths, n_init=1, n_local=4, top_k=2, positions="absolute")
    with pytest.raises(ValueError, match="k_cache"):
        tokenselect_decode(q, k[:, :, :, :6], v, lengths, n_init=1, n_local=4, top_k=2)
