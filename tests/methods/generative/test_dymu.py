"""P67 DyMU: DToMe bipartite merging with a threshold, proportional attention, batch-level threshold calibration
and virtual unmerging (expand / scatter-mean)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.methods.generative import dymu


def _rand(seed, shape, scale=1.0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32) * scale


def test_tau_inf_merges_nothing():
    """``tau = +inf`` returns x, sizes and mapping unchanged, bit for bit, even after an earlier merge (catches
    ``>=`` against the threshold, or a size-weighted re-average ``x * s / s`` that rounds)."""
    x, metric = _rand(0, (2, 10, 6)), _rand(1, (2, 10, 4))
    x1, s1, m1 = dymu.bipartite_merge(x, metric, r=3)
    x2, s2, m2 = dymu.bipartite_merge(x1, metric, s1, m1, tau=jnp.inf)
    np.testing.assert_array_equal(np.asarray(x2), np.asarray(x1))
    np.testing.assert_array_equal(np.asarray(s2), np.asarray(s1))
    np.testing.assert_array_equal(np.asarray(m2), np.asarray(m1))
    x3, s3, m3 = dymu.bipartite_merge(x, metric, tau=float("inf"))
    np.testing.assert_array_equal(np.asarray(x3), np.asarray(x))
    assert np.all(np.asarray(s3) == 1) and np.array_equal(np.asarray(m3), np.tile(np.arange(10), (2, 1)))


def test_merge_is_size_weighted_and_mapping_consistent():
    """Two merge steps: sizes add up to N, every slot's size is the number of original positions mapped to it,
    and every kept token is the mean of the original tokens it covers (catches an unweighted average of a
    merged token with a size-2 one, sizes not added, or the mapping not composed across steps)."""
    x, metric = _rand(2, (3, 16, 5)), _rand(3, (3, 16, 4))
    x1, s1, m1 = dymu.bipartite_merge(x, metric, r=4)
    x2, s2, m2 = dymu.bipartite_merge(x1, x1[..., :4], s1, m1, r=3)
    s2, m2, x2 = np.asarray(s2), np.asarray(m2), np.asarray(x2)
    assert np.all(s2.sum(-1) == 16) and np.all((s2 > 0).sum(-1) == 16 - 4 - 3)
    for b in range(3):
        np.testing.assert_array_equal(np.bincount(m2[b], minlength=16), s2[b])
        for j in np.flatnonzero(s2[b] > 0):
            np.testing.assert_allclose(x2[b, j], np.asarray(x)[b, m2[b] == j].mean(0), rtol=1e-5, atol=1e-6)
        assert np.all(x2[b, s2[b] == 0] == 0)


def test_only_a_tokens_merge_into_their_best_b_token():
    """Hand-built metric: A = even slots, B = odd; the A token whose nearest B token is most similar merges into
    it, others stay; a protected first (CLS) slot never merges and the cap is floor((6 - 1) / 2) = 2 (catches A
    and B swapped, argmin instead of argmax, similarity without normalisation, or the CLS row merged)."""
    e = np.eye(4, dtype=np.float32)
    metric = np.stack([e[0], e[1], 5 * e[1] + 0.1 * e[0], e[2], e[3], e[0] + e[3]])[None]   # [1, 6, 4]
    x = _rand(4, (1, 6, 3))
    _, sizes, mapping = dymu.bipartite_merge(x, jnp.asarray(metric), r=1)
    np.testing.assert_array_equal(np.asarray(sizes[0]), [1, 2, 0, 1, 1, 1])            # slot 2 -> slot 1
    np.testing.assert_array_equal(np.asarray(mapping[0]), [0, 1, 1, 3, 4, 5])
    s, match, is_a = dymu.bipartite_similarity(jnp.asarray(metric), jnp.ones((1, 6)))
    np.testing.assert_array_equal(np.asarray(is_a[0]), [1, 0, 1, 0, 1, 0])
    assert int(match[0, 4]) == 5 and np.isneginf(np.asarray(s[0, 1]))
    _, sizes_p, mapping_p = dymu.bipartite_merge(x, jnp.asarray(metric), r=3, protect_first=True)
    assert int(mapping_p[0, 0]) == 0 and float(sizes_p[0, 0]) >= 1 and int(dymu.tokens_kept(sizes_p)[0]) == 4


def test_identical_tokens_merged_with_proportional_attention_reproduce_attention():
    """Duplicate-key identity: tokens that come in identical pairs merge (cos = 1 > tau) into size-2 tokens, and
    attention over the merged keys with the log-size bias equals attention over all the original keys, for any
    queries (catches the bias missing, ``sizes`` instead of ``log sizes``, or the removed slots not masked)."""
    B, C, H, D = 2, 12, 2, 6
    base = _rand(5, (B, 5, C))
    x = base[:, jnp.asarray([0, 0, 1, 2, 2, 3, 4, 4])]               # pairs at slots (0,1), (3,4), (6,7)
    xm, sizes, mapping = dymu.bipartite_merge(x, x, tau=0.999)
    np.testing.assert_array_equal(np.asarray(sizes), [[0, 2, 1, 2, 0, 1, 0, 2]] * B)
    wk, wv, wq = _rand(6, (C, H * D)), _rand(7, (C, H * D)), _rand(8, (C, H * D))
    proj = lambda a, w: (a @ w).reshape(a.shape[0], a.shape[1], H, D)   # noqa: E731
    q = proj(_rand(9, (B, 7, C)), wq)
    want = jattn.attention(q, proj(x, wk), proj(x, wv), impl="xla")
    got = dymu.proportional_attention(q, proj(xm, wk), proj(xm, wv), sizes, impl="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    plain = jattn.attention(q, proj(xm, wk), proj(xm, wv), mask=(sizes > 0)[:, None, None, :], impl="xla")
    assert not np.allclose(np.asarray(plain), np.asarray(want), atol=1e-3)   # the bias is what makes it exact


def test_scatter_mean_of_expand_is_identity():
    """``vtu_merge(vtu_expand(x, mapping), mapping) == x`` on every occupied slot, empty slots 0 (catches a
    scatter-sum instead of a mean, or the gather along the wrong axis)."""
    x, metric = _rand(10, (2, 12, 5)), _rand(11, (2, 12, 3))
    xm, sizes, mapping = dymu.bipartite_merge(x, metric, r=4)
    full = dymu.vtu_expand(xm, mapping)
    assert full.shape == (2, 12, 5)
    back = np.asarray(dymu.vtu_merge(full, mapping, 12))
    occupied = np.asarray(sizes) > 0
    np.testing.assert_allclose(back[occupied], np.asarray(xm)[occupied], rtol=1e-6, atol=1e-6)
    assert np.all(back[~occupied] == 0)


def test_vtu_without_rope_equals_proportional_attention():
    """Expand-then-attend without RoPE equals proportional attention over the merged tokens on the occupied
    slots (what VTU reduces to in a decoder with no positions on image tokens); with RoPE and an identity
    mapping it equals plain RoPE attention (catches the expansion or the re-merge dropping the size weights,
    or RoPE applied at slot instead of original positions)."""
    B, N, H, D = 2, 10, 2, 8
    q, k, v = _rand(12, (B, N, H, D)), _rand(13, (B, N, H, D)), _rand(14, (B, N, H, D))
    _, sizes, mapping = dymu.bipartite_merge(_rand(15, (B, N, 4)), _rand(16, (B, N, 4)), r=3)
    got = np.asarray(dymu.vtu_attention(q, k, v, mapping, impl="xla"))
    want = np.asarray(dymu.proportional_attention(q, k, v, sizes, impl="xla"))
    occupied = np.asarray(sizes) > 0
    np.testing.assert_allclose(got[occupied], want[occupied], rtol=1e-5, atol=1e-5)
    from jattn.nn.attention import apply_rope
    ident = jnp.broadcast_to(jnp.arange(N), (B, N))
    pos = jnp.arange(N)[None]
    rope = jattn.attention(apply_rope(q, pos), apply_rope(k, pos), v, impl="xla")
    np.testing.assert_allclose(np.asarray(dymu.vtu_attention(q, k, v, ident, rope_theta=10000.0, impl="xla")),
                               np.asarray(rope), rtol=1e-5, atol=1e-5)


def test_token_counts_monotone_in_tau_and_capped():
    """Tokens kept never decrease as tau rises, all merge at tau = -1 up to the cap floor(t / 2) (catches the
    comparison reversed or a missing cap)."""
    x, metric = _rand(17, (3, 15, 6)), _rand(18, (3, 15, 6))
    counts = [np.asarray(dymu.tokens_kept(dymu.bipartite_merge(x, metric, tau=t)[1]))
              for t in (-1.0, -0.5, 0.0, 0.2, 0.4, 0.6, 0.9, np.inf)]
    assert np.all(np.diff(np.stack(counts), axis=0) >= 0)
    assert np.all(counts[0] == 15 - 7) and np.all(counts[-1] == 15)
    assert len({tuple(c) for c in counts}) > 2


def test_batch_level_threshold_merges_r_times_batch_edges():
    """The batch threshold is numpy's descending sort of the A rows at rank r * B (clamped at 0), and merging
    ``s > tau`` merges exactly r * B edges over the batch, unevenly per image (catches rank r instead of r * B,
    an off-by-one, or a per-image threshold)."""
    x = _rand(19, (4, 16, 8))
    metric = x + _rand(20, (4, 16, 8), 0.3) * jnp.arange(4.0)[:, None, None]   # images differ in redundancy
    metric = metric + 3.0                                                       # positive cosines
    s, _, _ = dymu.bipartite_similarity(metric, jnp.ones((4, 16)))
    tau = float(dymu.batch_level_threshold(s, 3))
    flat = np.sort(np.asarray(s).ravel())[::-1]
    assert tau == pytest.approx(max(float(flat[12]), 0.0))
    _, sizes, _ = dymu.bipartite_merge(x, metric, tau=tau)
    merged = 16 - np.asarray(dymu.tokens_kept(sizes))
    assert merged.sum() == 12 and len(set(merged.tolist())) > 1
    assert float(dymu.batch_level_threshold(jnp.full((2, 4), -0.5).at[:, ::2].set(-jnp.inf), 1)) == 0.0


def test_compact_gathers_kept_slots():
    """``compact`` moves the kept slots to the front in order and remaps ``mapping`` (catches a mapping left in
    the old slot numbering)."""
    x, metric = _rand(21, (2, 8, 3)), _rand(22, (2, 8, 3))
    xm, sizes, mapping = dymu.bipartite_merge(x, metric, r=2)
    xc, sc, mc = dymu.compact(xm, sizes, mapping)
    assert xc.shape == (2, 6, 3) and np.all(np.asarray(sc) > 0)
    np.testing.assert_array_equal(np.asarray(dymu.vtu_expand(xc, mc)), np.asarray(dymu.vtu_expand(xm, mapping)))


def test_bad_arguments_raise():
    """Bad arguments name themselves."""
    x = _rand(0, (1, 4, 2))
    with pytest.raises(ValueError, match="exactly one of tau and r"):
        dymu.bipartite_merge(x, x)
    with pytest.raises(ValueError, match="r must"):
        dymu.bipartite_merge(x, x, r=-1)
    with pytest.raises(ValueError, match="metric"):
        dymu.bipartite_merge(x, x[:, :3], r=1)
    with pytest.raises(ValueError, match="tau"):
        dymu.bipartite_merge(x, x, tau=jnp.zeros((3,)))
    with pytest.raises(ValueError, match="sizes"):
        dymu.proportional_attention(x[..., None], x[..., None], x[..., None], jnp.ones((1, 3)))
    with pytest.raises(TypeError, match="x must"):
        dymu.bipartite_merge(jnp.ones((1, 4, 2), jnp.int32), x, r=1)
