"""P13 ZipVL: the normalised attention score against a literal column mean over the visible probe queries
(GQA, odd lengths, duplicate probes), the adaptive keep count against its definition and monotone in tau,
tau = 1 keeps everything (dense causal attention, forward and gradients), the token-sparse attention equals
dense attention under ``imp[t] & imp[s] & s <= t`` (forward and gradients), the minimal budget keeps one token,
the adaptive count tracks controlled concentration, the tile cover, determinism and argument errors.

Mutations each test is meant to catch are named in the tests' docstrings.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.dynamic.zipvl import (adaptive_keep_count, gathered_block_mask, important_tokens,
                                         normalized_attention_score,
                                         token_sparse_attention, zipvl_attention, zipvl_block_mask,
                                         zipvl_probe_positions, zipvl_token_mask)
from tests.conftest import (assert_forward_and_grads_close, assert_traced_once, dense_vjp_run, numpy_qkv,
                            random_like, vjp_run)

mask_fn = jax.jit(zipvl_token_mask, static_argnames=("tau", "seed", "recent_fraction", "random_fraction", "scale"))


def literal_score(q, k, positions):
    """s_j = mean over heads h of the mean over probes p with pos_p >= j of softmax_h(p)[j] (0 if none)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, T, H, D = q.shape
    G = H // k.shape[2]
    out = np.zeros((B, T))
    for b in range(B):
        for h in range(H):
            probs = []
            for pos in positions:
                logits = np.array([q[b, pos, h] @ k[b, s, h // G] for s in range(pos + 1)]) / math.sqrt(D)
                p = np.exp(logits - logits.max())
                probs.append((pos, p / p.sum()))
            for j in range(T):
                seen = [p[j] for pos, p in probs if pos >= j]
                out[b, j] += (np.mean(seen) if seen else 0.0) / H
    return out


def literal_keep(scores, tau):
    """Smallest p whose p largest scores hold tau of the total (by a running sum)."""
    s = sorted(scores, reverse=True)
    total, run = sum(s), 0.0
    for p, x in enumerate(s, 1):
        run += x
        if run >= tau * total:
            return p
    return len(s)


def test_score_is_column_mean_over_visible_probes():
    """Catches: dividing by (T - j) (ZipCache's code) or by the probe count instead of the visible count,
    summing instead of averaging heads, reading the probe's kv head as h % Hkv instead of h // G."""
    q, k, _ = numpy_qkv(0, 2, 37, 37, 4, 2, 8)
    positions = jnp.asarray([36, 35, 12, 3, 12], jnp.int32)          # a duplicate counts twice
    got = np.asarray(jax.jit(normalized_attention_score)(q, k, positions))
    np.testing.assert_allclose(got, literal_score(q, k, np.asarray(positions)), rtol=1e-5, atol=1e-7)


def test_probe_positions_are_recent_then_random():
    pos = np.asarray(zipvl_probe_positions(200, seed=3))
    np.testing.assert_array_equal(pos[:10], np.arange(190, 200))
    assert len(pos) == 20 and (pos[10:] < 190).all() and (pos[10:] >= 0).all()


def test_keep_count_matches_definition_and_is_monotone_in_tau():
    """Catches: ``>`` instead of ``>=`` (one token too many on exact hits), ascending instead of descending
    order, off-by-one in the count."""
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.exponential(size=(3, 61)), np.array([[4.0, 2.0, 1.0, 1.0] + [0.0] * 57])])
    scores = jnp.asarray(scores, jnp.float32)
    taus = [0.01, 0.2, 0.5, 0.75, 0.875, 0.9, 0.97, 0.999, 1.0]
    counts = np.stack([np.asarray(adaptive_keep_count(scores, t)) for t in taus])
    for row in range(4):
        for t, c in zip(taus, counts[:, row]):
            want = literal_keep(np.asarray(scores[row], np.float64), t) if t < 1 else 61
            assert c == want, (row, t, c, want)
    assert (np.diff(counts, axis=0) >= 0).all()
    assert counts[4 - 1, 3] == 2 and counts[5 - 1, 3] == 3      # 4+2 = 0.75 exactly; 7/8 = 0.875 exactly
    assert (counts[-1] == 61).all()


@jax.jit
def sparse_vjp_run(q, k, v, w, important):
    """token_sparse_attention with a traced important set: one compile serves every tau."""
    return vjp_run(lambda q, k, v: token_sparse_attention(q, k, v, important, block=16, impl="xla"), q, k, v, w)


def _imp_mask(imp):
    T = imp.shape[-1]
    return jnp.asarray(imp[:, None, :, None] & imp[:, None, None, :] & np.tril(np.ones((T, T), bool)))


def test_important_tokens_break_ties_to_the_lower_position():
    """Catches: an unstable or ascending sort of the scores."""
    scores = jnp.asarray([[0.1, 0.5, 0.2, 0.5, 0.5, 0.0]], jnp.float32)
    got = np.asarray(important_tokens(scores, jnp.asarray([2], jnp.int32)))
    np.testing.assert_array_equal(got, [[False, True, False, True, False, False]])


def test_tau_one_is_dense_causal():
    """tau = 1 keeps every token: forward and gradients equal dense causal attention. Catches: a keep count
    from the float prefix sum (it can stop a token short), a gather/scatter permutation not inverted."""
    T = 75
    q, k, v = numpy_qkv(2, 2, T, T, 4, 2, 16)
    important, keep = mask_fn(q, k, tau=1.0)
    assert (np.asarray(keep) == T).all() and bool(important.all())
    w = random_like(3, q)
    got = sparse_vjp_run(q, k, v, w, important)
    assert_forward_and_grads_close(got, dense_vjp_run(q, k, v, w, _imp_mask(np.asarray(important))), what="tau = 1")


def test_token_sparse_attention_equals_masked_dense():
    """Important queries see important keys only; unimportant rows are 0. Forward and gradients vs the dense
    oracle under ``imp[t] & imp[s] & s <= t``; zipvl_attention is the selector plus this. Catches: unimportant
    keys left visible (causal-only mask on the original order), a non-stable front ordering (breaks causality
    among kept tokens), outputs of unimportant rows left non-zero."""
    T = 75
    q, k, v = numpy_qkv(4, 2, T, T, 4, 2, 16)
    important, keep = mask_fn(q, k, tau=0.6)
    assert (0.1 * T < np.asarray(keep)).all() and (np.asarray(keep) < 0.9 * T).all()
    imp = np.asarray(important)
    w = random_like(5, q)
    got = sparse_vjp_run(q, k, v, w, important)
    assert_forward_and_grads_close(got, dense_vjp_run(q, k, v, w, _imp_mask(imp)))
    assert not np.asarray(got[0])[~imp].any()
    end_to_end = jax.jit(functools.partial(zipvl_attention, tau=0.6, block=16, impl="xla"))(q, k, v)
    np.testing.assert_array_equal(np.asarray(end_to_end), np.asarray(got[0]))


def test_minimal_budget_keeps_the_single_best_token():
    """A tiny tau keeps exactly one token, the highest-scoring one (here the planted sink). Catches: a keep
    count of 0 (empty attention everywhere)."""
    q, k, _ = numpy_qkv(6, 1, 64, 64, 2, 1, 16)
    k = k.at[0, 0, 0].set(4.0 * jnp.sign(q[0, :, :, :].mean((0, 1))))   # key 0 aligned with every query
    important, keep = mask_fn(q, k, tau=1e-6)
    assert int(keep[0]) == 1
    assert bool(important[0, 0]) and int(important.sum()) == 1


def test_keep_count_tracks_attention_concentration():
    """Planted: m heavy keys that every query attends; the adaptive count stays near m when the planted keys
    hold the mass and grows toward T for diffuse (near-uniform) attention; the kept set contains the planted
    keys. Catches: a fixed ratio instead of the adaptive count."""
    T, D, m = 256, 16, 6
    rng = np.random.default_rng(7)
    u = rng.standard_normal(D).astype(np.float32)
    u /= np.linalg.norm(u)
    q = rng.standard_normal((1, T, 2, D)).astype(np.float32) * 0.1 + 3 * u
    k = rng.standard_normal((1, T, 1, D)).astype(np.float32) * 0.1
    heavy = np.sort(rng.choice(T - 20, m, replace=False))
    k[0, heavy, 0] += 8 * u                                      # logit 3 * 8 / 4 = 6 above the rest
    important, keep = mask_fn(jnp.asarray(q), jnp.asarray(k), tau=0.9)
    assert int(keep[0]) <= 3 * m
    assert np.asarray(important[0])[heavy].all()
    diffuse_q = jnp.asarray(rng.standard_normal((1, T, 2, D)).astype(np.float32) * 0.05)
    _, keep_diffuse = mask_fn(diffuse_q, jnp.asarray(k), tau=0.9)
    assert int(keep_diffuse[0]) > 0.5 * T


def test_block_mask_is_the_tile_cover_of_the_token_mask():
    """Catches: tiles from important queries only (keys ignored), non-causal tiles listed."""
    T, bq, bk = 90, 16, 8
    q, k, _ = numpy_qkv(8, 1, T, T, 4, 2, 8)
    bm = jax.jit(functools.partial(zipvl_block_mask, tau=0.3, block_q=bq, block_k=bk))(q, k)
    imp = np.asarray(mask_fn(q, k, tau=0.3)[0])[0]
    want = np.zeros((math.ceil(T / bq), math.ceil(T / bk)), bool)
    for t in range(T):
        for s in range(t + 1):
            if imp[t] and imp[s]:
                want[t // bq, s // bk] = True
    got = np.asarray(bm.to_dense_block_map())[0, 0]
    np.testing.assert_array_equal(got, want)
    assert want.sum() < np.tril(np.ones_like(want)).sum()


def test_gathered_tiles_stop_at_the_keep_count():
    """The kernel visits only the causal tiles of the first ceil(count / block) rows and columns of the
    gathered buffer (the speedup). Catches: every causal tile listed (correct output, no saving)."""
    counts = jnp.asarray([1, 33, 64, 100], jnp.int32)
    got = np.asarray(gathered_block_mask(counts, seq_len=100, block=16).to_dense_block_map())[:, 0]
    for row, c in zip(got, np.asarray(counts)):
        n = -(-int(c) // 16)
        want = np.zeros((7, 7), bool)
        want[:n, :n] = np.tril(np.ones((n, n), bool))
        np.testing.assert_array_equal(row, want)


def test_selection_is_deterministic_and_traced_once():
    q1, k1, _ = numpy_qkv(9, 1, 80, 80, 4, 2, 8)
    q2, k2, _ = numpy_qkv(10, 1, 80, 80, 4, 2, 8)
    fn = lambda q, k: zipvl_token_mask(q, k, tau=0.8)[0]
    a, _, c = assert_traced_once(fn, (q1, k1), (q2, k2), (q1, k1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(tau=0.0), ValueError, "tau"),
    (dict(tau=1.5), ValueError, "tau"),
    (dict(tau="x"), TypeError, "tau"),
    (dict(block_q=0), ValueError, "block_q"),
    (dict(block_k=2.5), TypeError, "block_k"),
    (dict(recent_fraction=1.5), ValueError, "recent_fraction"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(k_dim=8), ValueError, "head dim"),
])
def test_validation_errors_name_the_argument(kwargs, error, word):
    q, k, _ = numpy_qkv(0, 1, 48, 48, 2, 1, 16)
    if "k_dim" in kwargs:
        k = k[..., :kwargs.pop("k_dim")]
    with pytest.raises(error, match=word):
        zipvl_block_mask(q, k, **kwargs)


def test_token_sparse_attention_rejects_a_bad_important_mask():
    q, k, v = numpy_qkv(0, 1, 48, 48, 2, 1, 16)
    with pytest.raises(TypeError, match="important"):
        token_sparse_attention(q, k, v, jnp.ones((1, 48), jnp.int32))
    with pytest.raises(TypeError, match="important"):
        token_sparse_attention(q, k, v, jnp.ones((1, 47), bool))
