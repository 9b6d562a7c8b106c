"""P33 AnchorAttention: the anchor statistics and the stripe selection against a literal NumPy
transcription of the rule (GQA, odd lengths with a short last big block and sub-block, several init/local
settings), the BlockMask as the minimal tile cover of the token rule, exactness of the token-granular
path against dense attention with the literal stripe mask and of the tile path against dense attention
with its expanded mask (forward and gradients), the theta = +inf / -inf limits, a planted stripe,
stripe recall against block top-k, determinism and argument errors.

Mutations each test caught when tried (one line changed, test failed, change reverted):

* ``test_selection_equals_literal_rule``: ``theta`` subtracted instead of added; the anchor without the
  init region; candidates starting at key 0 (overlapping init, the official quirk).
* ``test_anchor_stats_match_literal_softmax``: the local region starting one big block late
  (``g - local_blocks + 2``).
* ``test_tiles_are_the_minimal_cover_of_the_token_rule``: stripe tiles taken from big block ``g - 1``.
* ``test_token_granularity_equals_the_literal_stripe_rule``: the mask function ignoring the stripes
  (anchor keys only).
* ``test_theta_plus_inf_is_dense_causal``: candidates ending one big block early.
* ``test_theta_minus_inf_keeps_only_init_and_local``: the init region dropped from the tile map.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.dynamic.anchor import (anchor_attention, anchor_block_mask, anchor_select, anchor_stats,
                                          anchor_tile_map)
from tests.conftest import assert_forward_and_grads_close, dense_vjp_run, numpy_qkv, random_like, vjp_run

POOL = ("block_size", "step", "init_blocks", "local_blocks")
stats = jax.jit(anchor_stats, static_argnames=POOL + ("rows_per_step",))
select = jax.jit(anchor_select, static_argnames=POOL + ("theta",))
block_mask = jax.jit(anchor_block_mask, static_argnames=POOL + ("theta", "block_q", "block_k", "granularity",
                                                                  "return_selection"))

# ----------------------------------------------------------------------------- literal transcription


def literal_anchor(q, k, v, *, theta, block_size, step, init_blocks, local_blocks):
    """The spec, one (batch, head, query / big block / sub-block / key) at a time, in float64.

    Returns ``(m, l, acc, selected [B, H, nG, T])``."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, D = q.shape
    per_kv = H // k.shape[2]
    G = block_size * step
    nG = math.ceil(T / G)
    scale = D ** -0.5
    m, l, acc = np.zeros((B, H, T)), np.zeros((B, H, T)), np.zeros((B, H, T, D))
    selected = np.zeros((B, H, nG, T), bool)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, :, h // per_kv], v[b, :, h // per_kv]
            for t in range(T):
                g = t // G
                keys = [j for j in range(t + 1) if j < init_blocks * G or j >= (g - local_blocks + 1) * G]
                s = scale * kh[keys] @ q[b, t, h]
                m[b, h, t] = s.max()
                p = np.exp(s - s.max())
                l[b, h, t], acc[b, h, t] = p.sum(), p @ vh[keys]
            for g in range(nG):
                candidates = range(init_blocks * G, (g - local_blocks + 1) * G)
                for sub in range(g * step, (g + 1) * step):
                    rows = range(sub * block_size, min((sub + 1) * block_size, T))
                    if len(rows) == 0:
                        continue
                    q_bar = q[b, list(rows), h].mean(0)
                    a_bar = m[b, h, list(rows)].mean()
                    for j in candidates:
                        if scale * q_bar @ kh[j] + theta >= a_bar:
                            selected[b, h, g, j] = True
    return m, l, acc, selected


def literal_token_mask(selected, T, *, block_size, step, init_blocks, local_blocks):
    """``[B, H, T, T]``: ``j <= t`` and (init key, local key or a stripe of the query's big block)."""
    G = block_size * step
    B, H = selected.shape[:2]
    mask = np.zeros((B, H, T, T), bool)
    for t in range(T):
        g = t // G
        for j in range(t + 1):
            if j < init_blocks * G or j >= (g - local_blocks + 1) * G:
                mask[:, :, t, j] = True
            else:
                mask[:, :, t, j] = selected[:, :, g, j]
    return mask


def tiles_touched(mask, block_q, block_k):
    """``[B, H, nQ, nK]``: tiles holding at least one True element of ``mask``."""
    B, H, T, S = mask.shape
    nQ, nK = math.ceil(T / block_q), math.ceil(S / block_k)
    tiles = np.zeros((B, H, nQ, nK), bool)
    for i in range(nQ):
        for c in range(nK):
            tiles[:, :, i, c] = mask[:, :, i * block_q:(i + 1) * block_q, c * block_k:(c + 1) * block_k].any((2, 3))
    return tiles


# ------------------------------------------------------------------------------------ the rule

CASES = [  # (seed, B, T, H, Hkv, D, block_size, step, init_blocks, local_blocks, theta)
    (0, 1, 203, 4, 2, 16, 8, 4, 1, 1, 1.5),
    (1, 2, 150, 4, 2, 16, 4, 4, 2, 1, 1.5),
    (2, 1, 181, 4, 1, 16, 8, 2, 1, 2, 2.0),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_selection_equals_literal_rule(case):
    seed, B, T, H, Hkv, D, block_size, step, init_blocks, local_blocks, theta = case
    q, k, v = numpy_qkv(seed, B, T, T, H, Hkv, D)
    pooling = dict(block_size=block_size, step=step, init_blocks=init_blocks, local_blocks=local_blocks)
    m, _, _, want = literal_anchor(q, k, v, theta=theta, **pooling)
    got_m, _, _ = stats(q, k, **pooling)
    np.testing.assert_allclose(np.asarray(got_m), m, rtol=1e-5, atol=1e-5)
    selected, indices, counts = select(q, k, got_m, theta=theta, **pooling)
    G = block_size * step
    candidates = sum(max(0, (g - local_blocks + 1 - init_blocks) * G) for g in range(math.ceil(T / G)))
    assert 0.1 * candidates * B * H < want.sum() < 0.9 * candidates * B * H     # a partial selection
    np.testing.assert_array_equal(np.asarray(selected), want)
    np.testing.assert_array_equal(np.asarray(counts), want.sum(-1))
    indices = np.asarray(indices)
    for b, h, g in np.ndindex(*want.shape[:3]):
        n = want[b, h, g].sum()
        np.testing.assert_array_equal(indices[b, h, g, :n], np.flatnonzero(want[b, h, g]))
        assert (indices[b, h, g, n:] == -1).all()


def test_anchor_stats_match_literal_softmax():
    q, k, v = numpy_qkv(3, 1, 150, 150, 4, 2, 16)
    pooling = dict(block_size=4, step=4, init_blocks=1, local_blocks=2)
    m, l, acc, _ = literal_anchor(q, k, v, theta=0.0, **pooling)
    got = stats(q, k, v, rows_per_step=32, **pooling)
    for g, w in zip(got, (m, l, acc)):
        np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("case", CASES[:1], ids=str)
def test_tiles_are_the_minimal_cover_of_the_token_rule(case):
    """The listed tiles are exactly the tiles holding an element of the literal token rule (tile-granular
    stripes: a tile is listed iff a query in it may attend a key in it)."""
    seed, B, T, H, Hkv, D, block_size, step, init_blocks, local_blocks, theta = case
    q, k, v = numpy_qkv(seed, B, T, T, H, Hkv, D)
    pooling = dict(block_size=block_size, step=step, init_blocks=init_blocks, local_blocks=local_blocks)
    _, _, _, selected = literal_anchor(q, k, v, theta=theta, **pooling)
    token = literal_token_mask(selected, T, **pooling)
    for block_q, block_k in ((block_size, block_size), (2 * block_size, block_size)):
        bm, (got, _, _) = block_mask(q, k, theta=theta, block_q=block_q, block_k=block_k, return_selection=True,
                                     **pooling)
        tiles = tiles_touched(token, block_q, block_k)
        np.testing.assert_array_equal(np.asarray(bm.to_dense_block_map()), tiles)
        np.testing.assert_array_equal(np.asarray(anchor_tile_map(got, T=T, block_q=block_q, block_k=block_k,
                                                                 **pooling)), tiles)


# ------------------------------------------------------------------------------------ exactness


def test_token_granularity_equals_the_literal_stripe_rule():
    """granularity='token': the expanded mask (with the carried mask function) is the literal token rule,
    and the attention equals dense attention under it, forward and gradients."""
    T, H, Hkv, D = 101, 4, 2, 16
    pooling = dict(block_size=4, step=4, init_blocks=1, local_blocks=1)
    q, k, v = numpy_qkv(4, 1, T, T, H, Hkv, D)
    _, _, _, selected = literal_anchor(q, k, v, theta=0.5, **pooling)
    token = literal_token_mask(selected, T, **pooling)
    kw = dict(theta=0.5, block_q=16, block_k=16, **pooling)
    bm = anchor_block_mask(q, k, granularity="token", **kw)
    causal = np.tril(np.ones((T, T), bool))
    np.testing.assert_array_equal(np.asarray(bm.to_dense_mask(heads=H)) & causal, token)
    tile_mask = np.asarray(anchor_block_mask(q, k, **kw).to_dense_mask(heads=H)) & causal
    assert (tile_mask & ~token).sum() > 100                       # the tile path is a strict superset here
    assert 0.15 < token.mean() < 0.45
    w = random_like(5, q)
    # anchor_attention(granularity="token") end to end (outside jit: the selection is concrete).
    got = vjp_run(functools.partial(anchor_attention, granularity="token", impl="xla", **kw), q, k, v, w)
    assert_forward_and_grads_close(got, dense_vjp_run(q, k, v, w, jnp.asarray(token)), what="token")


def test_tile_output_equals_dense_with_expanded_mask():
    T, block = 101, 16
    pooling = dict(block_size=4, step=8, init_blocks=1, local_blocks=1)
    q, k, v = numpy_qkv(6, 1, T, T, 6, 2, 16)
    kw = dict(theta=0.5, block_q=block, block_k=block, **pooling)
    bm = block_mask(q, k, **kw)
    mask = np.asarray(bm.to_dense_mask(heads=6)) & np.tril(np.ones((T, T), bool))
    assert 0.25 < mask.mean() < 0.45
    w = random_like(7, q)
    fn = functools.partial(anchor_attention, impl="xla", **kw)
    got = jax.jit(lambda q, k, v, w: vjp_run(fn, q, k, v, w))(q, k, v, w)
    assert_forward_and_grads_close(got, dense_vjp_run(q, k, v, w, jnp.asarray(mask)))


# ------------------------------------------------------------------------------------ limits


def test_theta_plus_inf_is_dense_causal():
    T, block = 101, 16
    pooling = dict(block_size=4, step=4, init_blocks=1, local_blocks=1)
    q, k, v = numpy_qkv(8, 1, T, T, 6, 2, 16)
    bm = block_mask(q, k, theta=math.inf, block_q=block, block_k=block, **pooling)
    nb = math.ceil(T / block)
    tiles = np.asarray(bm.to_dense_block_map())
    np.testing.assert_array_equal(tiles, np.broadcast_to(np.tril(np.ones((nb, nb), bool)), tiles.shape))
    w = random_like(9, q)
    fn = functools.partial(anchor_attention, theta=math.inf, block_q=block, block_k=block, impl="xla", **pooling)
    got = jax.jit(lambda q, k, v, w: vjp_run(fn, q, k, v, w))(q, k, v, w)
    causal = jnp.asarray(np.tril(np.ones((T, T), bool)))
    assert_forward_and_grads_close(got, dense_vjp_run(q, k, v, w, causal), what="theta = +inf")


@pytest.mark.parametrize("init_blocks, local_blocks", [(1, 1), (0, 2)])
def test_theta_minus_inf_keeps_only_init_and_local(init_blocks, local_blocks):
    T, block_size, step, block = 203, 8, 4, 16
    G = block_size * step
    q, k, _ = numpy_qkv(10, 1, T, T, 4, 2, 16)
    bm, (selected, _, counts) = block_mask(q, k, theta=-math.inf, block_size=block_size, step=step,
                                           init_blocks=init_blocks, local_blocks=local_blocks, block_q=block,
                                           block_k=block, return_selection=True)
    assert not np.asarray(selected).any() and not np.asarray(counts).any()
    nb = math.ceil(T / block)
    want = np.zeros((nb, nb), bool)
    for i in range(nb):
        g = i * block // G
        for c in range(i + 1):
            want[i, c] = c * block < init_blocks * G or c * block >= (g - local_blocks + 1) * G
    tiles = np.asarray(bm.to_dense_block_map())
    np.testing.assert_array_equal(tiles, np.broadcast_to(want, tiles.shape))


# ------------------------------------------------------------------------------------ properties


def test_planted_stripe_is_found():
    """Key 70 (a candidate for big blocks >= 3) matches every query strongly: it is selected for every big
    block that may select it, its tile is listed, and (with a modest theta) few other keys are selected."""
    T, D, block_size, step = 256, 16, 8, 4
    rng = np.random.default_rng(11)
    q = rng.standard_normal((1, T, 2, D)).astype(np.float32) * 0.5
    k = rng.standard_normal((1, T, 1, D)).astype(np.float32) * 0.5
    direction = rng.standard_normal(D).astype(np.float32)
    q += direction
    k[0, 70, 0] += 3 * direction
    pooling = dict(block_size=block_size, step=step, init_blocks=1, local_blocks=1)
    bm, (selected, _, _) = block_mask(jnp.asarray(q), jnp.asarray(k), theta=0.0, block_q=16, block_k=16,
                                      return_selection=True, **pooling)
    selected = np.asarray(selected)
    assert selected[0, :, 3:, 70].all()
    assert selected[0, :, 3:].sum() < 0.1 * selected[0, :, 3:].size
    tiles = np.asarray(bm.to_dense_block_map())
    assert tiles[0, :, 96 // 16:, 70 // 16].all()


def test_stripe_recall_beats_block_topk_at_equal_density():
    """On stripe-structured synthetic inputs, AnchorAttention's tiles keep more of the dense attention mass
    than a block top-k of the pooled scores with the same number of tiles per row (qualitative claim)."""
    from jattn.eval import attention_block_mass
    from jattn.methods.dynamic.synthetic import synthetic_long_qkv
    T, block = 512, 16
    q, k, _, _ = synthetic_long_qkv(12, T, H=4, Hkv=2, D=32, n_stripes=6, slash_offsets=(64, 200), band_width=16)
    tiles = np.asarray(block_mask(q, k, theta=4.0, block_size=8, step=4, init_blocks=1, local_blocks=1,
                                  block_q=block, block_k=block).to_dense_block_map())
    mass = np.asarray(attention_block_mass(q, k, block_q=block, block_k=block))
    nb = T // block
    causal = np.tril(np.ones((nb, nb), bool))
    # Block top-k baseline: mean-pooled q and k, the same number of tiles in every row as the anchor tiles.
    qb = np.asarray(q).reshape(1, nb, block, 4, 32).mean(2)
    kb = np.repeat(np.asarray(k).reshape(1, nb, block, 2, 32).mean(2), 2, axis=2)
    pooled = np.where(causal, np.einsum("bihd,bjhd->bhij", qb, kb), -np.inf)
    order = np.argsort(-pooled, axis=-1, kind="stable")
    rank = np.argsort(order, axis=-1, kind="stable")
    topk = (rank < tiles.sum(-1, keepdims=True)) & causal
    recall = lambda t: (mass * t).sum() / mass.sum()
    assert 0.2 < tiles.sum() / (4 * causal.sum()) < 0.7
    assert recall(tiles) > recall(topk) and recall(tiles) > 0.9


def test_selection_is_deterministic_and_traced_once():
    from tests.conftest import assert_traced_once
    q1, k1, _ = numpy_qkv(13, 1, 120, 120, 4, 2, 16)
    q2, k2, _ = numpy_qkv(14, 1, 120, 120, 4, 2, 16)
    fn = lambda q, k: anchor_block_mask(q, k, theta=0.5, block_size=4, step=4, block_q=16, block_k=8,
                                        return_selection=True)[1][0]
    a, _, c = assert_traced_once(fn, (q1, k1), (q2, k2), (q1, k1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(theta=float("nan")), ValueError, "theta"),
    (dict(theta="12"), TypeError, "theta"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(step=0), ValueError, "step"),
    (dict(local_blocks=0), ValueError, "local_blocks"),
    (dict(init_blocks=-1), ValueError, "init_blocks"),
    (dict(block_q=24), ValueError, "block_q"),
    (dict(block_k=64), ValueError, "block_k"),
    (dict(granularity="element"), ValueError, "granularity"),
    (dict(k_dim=8), ValueError, "head dim"),
    (dict(k_len=40), ValueError, "length"),
])
def test_validation_errors_name_the_argument(kwargs, error, word):
    q, k, _ = numpy_qkv(0, 1, 48, 48, 2, 1, 16)
    if "k_dim" in kwargs:
        k = k[..., :kwargs.pop("k_dim")]
    if "k_len" in kwargs:
        k = k[:, :kwargs.pop("k_len")]
    kw = dict(block_size=8, step=4, block_q=16, block_k=16)
    with pytest.raises(error, match=word):
        anchor_block_mask(q, k, **{**kw, **kwargs})


def test_token_granularity_under_jit_is_a_clear_error():
    q, k, _ = numpy_qkv(0, 1, 48, 48, 2, 1, 16)
    fn = jax.jit(functools.partial(anchor_block_mask, block_size=8, step=4, block_q=16, block_k=16,
                                   granularity="token"))
    with pytest.raises(TypeError, match="granularity='token'"):
        fn(q, k)
