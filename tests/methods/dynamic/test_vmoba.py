"""P05 VMoBA: the 1-D/2-D/3-D partitions (round trip and the literal chunk contents), the threshold and top-k
selections against a literal NumPy transcription (GQA, a short last chunk), tau = 1 and topk = C give dense
non-causal attention (forward and gradients), the output equals dense attention with the expanded mask
(and the self + selected LSE merge of the official two-branch form), the selected fraction grows with tau,
the minimal budget keeps what the rule always keeps, a planted chunk is found, determinism and errors.

Mutations each test catches (one line changed, test failed, change reverted):

* ``test_partition_round_trip_and_chunk_contents``: the 2-D order ``(nch ncw t ch cw)`` -> ``(ncw nch t ch
  cw)``; the inverse transposed with ``order`` instead of its inverse.
* ``test_threshold_selection_equals_literal_rule``: ``need`` not clamped at 0; the cut taking the entries
  *before* the first one reaching ``need`` (``<`` instead of ``<=`` cutoff); the self entries left in
  the sorted "others"; the chunk mean taken over the padded (zero) tail of the short last chunk; the
  head_global flat order ``s * C + c`` instead of ``c * S + s`` (ties of zeros).
* ``test_topk_selection_equals_literal_rule``: the self chunk not forced (``+inf``) into the top-k.
* ``test_full_budget_is_dense``: ``causal=True`` in the attention call; the un-partition skipped.
* ``test_output_equals_dense_with_expanded_mask_and_lse_merge``: the mask built from chunk ids of the
  un-permuted sequence.
* ``test_minimal_budget_keeps_self_and_best_other``: the self chunk dropped from the final selection.
* ``test_selected_fraction_monotone_in_tau``: a descending sort replaced by an ascending one.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.core.reference import reference_attention
from jattn.methods.dynamic.vmoba import (layer_chunk, video_block_partition, video_block_unpartition,
                                         video_chunk_size, vmoba_attention, vmoba_block_mask, vmoba_select)
from tests.conftest import assert_forward_and_grads_close, dense_vjp_run, numpy_qkv, random_like, vjp_run

select = jax.jit(vmoba_select, static_argnames=("chunk_size", "tau", "mode", "select", "topk"))

# ----------------------------------------------------------------------------- literal transcription


def literal_chunks(thw, chunk):
    """Chunk id of each raster token ``(t, h, w)``, and the token order inside each chunk, from loops."""
    t, h, w = thw
    ids, order = {}, []
    if isinstance(chunk, int):
        for f in range(t):
            for y in range(h):
                for x in range(w):
                    ids[(f, y, x)] = f // chunk
        return ids, [(f, y, x) for f in range(t) for y in range(h) for x in range(w)]
    if len(chunk) == 2:
        chunk = (t, *chunk)
    ct, ch, cw = chunk
    for a in range(t // ct):
        for b in range(h // ch):
            for c in range(w // cw):
                for f in range(a * ct, (a + 1) * ct):
                    for y in range(b * ch, (b + 1) * ch):
                        for x in range(c * cw, (c + 1) * cw):
                            ids[(f, y, x)] = len(order) // (ct * ch * cw)
                            order.append((f, y, x))
    return ids, order


def literal_gates(q, k, chunk_size):
    """``[B, H, S, C]`` in float64: q . (mean of the chunk's actual keys)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, S, H, _ = q.shape
    G = H // k.shape[2]
    C = math.ceil(S / chunk_size)
    gates = np.zeros((B, H, S, C))
    for b in range(B):
        for h in range(H):
            for c in range(C):
                kbar = k[b, c * chunk_size:min((c + 1) * chunk_size, S), h // G].mean(0)
                gates[b, h, :, c] = q[b, :, h] @ kbar
    return gates


def literal_threshold(entries, own, tau):
    """The rule on one selection group: ``entries`` and ``own`` are flat lists (the group's order)."""
    eps = 1e-6
    lo, hi = min(entries), max(entries)
    span = hi - lo if hi - lo > eps else 1.0
    norm = [(g - lo) / span for g in entries]
    total = sum(norm)
    need = max(tau - sum(n for n, o in zip(norm, own) if o) / (total + eps), 0.0)
    others = [0.0 if o else n for n, o in zip(norm, own)]
    order = sorted(range(len(others)), key=lambda i: (-others[i], i))
    chosen = set(own_i for own_i, o in enumerate(own) if o)
    running = 0.0
    for pos, i in enumerate(order):
        chosen.add(i)
        running += others[i]
        if running / (total + eps) >= need:
            break
    return chosen


def literal_select(q, k, chunk_size, tau, mode):
    gates = literal_gates(q, k, chunk_size)
    B, H, S, C = gates.shape
    out = np.zeros(gates.shape, bool)
    for b in range(B):
        for h in range(H):
            if mode == "query_head":
                for s in range(S):
                    own = [c == s // chunk_size for c in range(C)]
                    for c in literal_threshold(list(gates[b, h, s]), own, tau):
                        out[b, h, s, c] = True
            else:
                flat = [(c, s) for c in range(C) for s in range(S)]           # official order c * S + s
                own = [c == s // chunk_size for c, s in flat]
                for i in literal_threshold([gates[b, h, s, c] for c, s in flat], own, tau):
                    out[b, h, flat[i][1], flat[i][0]] = True
    return out


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("chunk", [2, (3, 2), (2, 3, 2)], ids=["1d", "2d", "3d"])
def test_partition_round_trip_and_chunk_contents(chunk):
    thw = (5, 6, 4) if isinstance(chunk, int) else (4, 6, 4)
    t, h, w = thw
    S = t * h * w
    x = random_like(0, np.zeros((2, S, 3)))
    y = video_block_partition(x, thw, chunk)
    np.testing.assert_array_equal(np.asarray(video_block_unpartition(y, thw, chunk)), np.asarray(x))
    n = video_chunk_size(thw, chunk)
    ids, order = literal_chunks(thw, chunk)
    raster = {(f, a, b): (f * h + a) * w + b for f in range(t) for a in range(h) for b in range(w)}
    want = np.asarray(x)[:, [raster[p] for p in order]]
    np.testing.assert_array_equal(np.asarray(y), want)                 # the literal permutation
    assert all(ids[p] == i // n for i, p in enumerate(order))          # chunks contiguous, n tokens each
    if isinstance(chunk, int):
        assert n == chunk * h * w and math.ceil(S / n) == 3             # 5 frames in 2-frame chunks: 2 + 2 + 1


def test_layer_chunk_cycles_1d_2d_3d():
    chunks = (2, (2, 2), (2, 2, 2))
    assert [layer_chunk(i, chunks) for i in range(5)] == [2, (2, 2), (2, 2, 2), 2, (2, 2)]


CASES = [  # (seed, B, S, H, Hkv, D, chunk_size, tau): S not a multiple of the chunk (short last chunk)
    (0, 1, 70, 4, 2, 8, 16, 0.25),
    (1, 2, 45, 2, 1, 8, 8, 0.5),
]


@pytest.mark.parametrize("mode", ["query_head", "head_global"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_threshold_selection_equals_literal_rule(case, mode):
    seed, B, S, H, Hkv, D, chunk_size, tau = case
    q, k, _ = numpy_qkv(seed, B, S, S, H, Hkv, D)
    got = np.asarray(select(q, k, chunk_size=chunk_size, tau=tau, mode=mode))
    want = literal_select(q, k, chunk_size, tau, mode)
    assert 0.2 < want.mean() < 0.9                                     # a real partial selection
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", ["query_head", "head_global"])
def test_topk_selection_equals_literal_rule(mode):
    B, S, H, Hkv, D, chunk_size, topk = 1, 70, 4, 2, 8, 16, 2
    q, k, _ = numpy_qkv(2, B, S, S, H, Hkv, D)
    got = np.asarray(select(q, k, chunk_size=chunk_size, select="topk", topk=topk, mode=mode))
    gates = literal_gates(q, k, chunk_size)
    C = gates.shape[-1]
    want = np.zeros_like(got)
    for h in range(H):
        if mode == "query_head":
            for s in range(S):
                others = sorted((c for c in range(C) if c != s // chunk_size), key=lambda c: -gates[0, h, s, c])
                for c in [s // chunk_size] + others[:topk - 1]:
                    want[0, h, s, c] = True
        else:
            pairs = [(c, s) for c in range(C) for s in range(S)]
            pairs.sort(key=lambda p: (p[0] != p[1] // chunk_size, -gates[0, h, p[1], p[0]]))
            for c, s in pairs[:topk * S]:
                want[0, h, s, c] = True
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kw", [dict(tau=1.0), dict(select="topk", topk=5)], ids=["tau1", "topk=C"])
def test_full_budget_is_dense(kw):
    """(head_global at tau = 1 selecting everything is checked in the monotonicity test.)"""
    thw, chunk = (4, 6, 4), (2, 3, 2)                                  # 8 chunks of 12 tokens... 3-D
    if "topk" in kw:
        thw, chunk = (5, 4, 4), 1                                      # 1-D: 5 chunks of 16
    S = math.prod(thw)
    q, k, v = numpy_qkv(3, 1, S, S, 4, 2, 8)
    w = random_like(4, q)
    fn = functools.partial(vmoba_attention, thw=thw, chunk=chunk, impl="xla", **kw)
    got = jax.jit(lambda q, k, v, w: vjp_run(fn, q, k, v, w))(q, k, v, w)
    assert_forward_and_grads_close(got, dense_vjp_run(q, k, v, w, jnp.ones((S, S), bool)), what=str(kw))


def test_output_equals_dense_with_expanded_mask_and_lse_merge():
    """Also the spec's two-branch form: self-chunk attention and the selected-others attention merged by
    log-sum-exp equal the softmax over the union (the official MixedAttention)."""
    thw, chunk = (4, 4, 4), (2, 2)
    S, n = 64, video_chunk_size(thw, chunk)
    q, k, v = numpy_qkv(5, 1, S, S, 4, 2, 8)
    bm = jax.jit(functools.partial(vmoba_block_mask, chunk_size=n, tau=0.3))(
        *(video_block_partition(x, thw, chunk) for x in (q, k)))
    mask_p = np.asarray(bm.to_dense_mask(heads=4))[0]                  # [H, S, S] on the permuted order
    assert 0.3 < mask_p.mean() < 0.9
    perm = np.asarray(video_block_partition(jnp.arange(S)[None], thw, chunk))[0]
    inv = np.argsort(perm)
    mask = mask_p[:, inv][:, :, inv]                                   # back to raster order
    w = random_like(6, q)
    fn = functools.partial(vmoba_attention, thw=thw, chunk=chunk, tau=0.3, impl="xla")
    got = jax.jit(lambda q, k, v, w: vjp_run(fn, q, k, v, w))(q, k, v, w)
    assert_forward_and_grads_close(got, dense_vjp_run(q, k, v, w, jnp.asarray(mask)[None]))
    chunk_of = np.arange(S) // n                                       # chunk of each permuted position
    own = (chunk_of[:, None] == chunk_of[None, :])[inv][:, inv]        # same chunk, raster order
    merged = jax.jit(merge_self_and_selected)(q, k, v, jnp.asarray(own), jnp.asarray(mask & ~own)[None])
    np.testing.assert_allclose(np.asarray(merged), np.asarray(got[0]), atol=2e-5)


def merge_self_and_selected(q, k, v, own, others):
    """The official MixedAttention forward: two attentions merged by their log-sum-exps."""
    out_self, lse_self = reference_attention(q, k, v, mask=own, return_lse=True)
    out_moba, lse_moba = reference_attention(q, k, v, mask=others, return_lse=True)
    lse = jnp.logaddexp(lse_self, lse_moba)
    return (out_self * jnp.exp(lse_self - lse)[..., None]
            + jnp.where(jnp.isfinite(lse_moba), jnp.exp(lse_moba - lse), 0.0)[..., None] * out_moba)


def test_minimal_budget_keeps_self_and_best_other():
    """tau -> 0: need = 0, so the official cut keeps the self chunk and exactly one other (the best gate);
    topk = 1 keeps the self chunk only (block-diagonal attention)."""
    S, chunk_size = 80, 16
    q, k, _ = numpy_qkv(7, 1, S, S, 4, 2, 8)
    own = (np.arange(S) // chunk_size)[:, None] == np.arange(5)[None]
    got = np.asarray(select(q, k, chunk_size=chunk_size, tau=1e-6))
    assert got[..., own].all() and (got.sum(-1) == 2).all()
    gates = literal_gates(q, k, chunk_size)
    best_other = np.argmax(np.where(own, -np.inf, gates), -1)
    np.testing.assert_array_equal(np.take_along_axis(got, best_other[..., None], -1)[..., 0], True)
    only_self = np.asarray(select(q, k, chunk_size=chunk_size, select="topk", topk=1))
    np.testing.assert_array_equal(only_self, np.broadcast_to(own, only_self.shape))


@pytest.mark.parametrize("mode", ["query_head", "head_global"])
def test_selected_fraction_monotone_in_tau(mode):
    q, k, _ = numpy_qkv(8, 1, 96, 96, 4, 2, 8)
    taus = (0.05, 0.3, 0.6, 1.0)
    picks = [np.asarray(select(q, k, chunk_size=12, tau=t, mode=mode)) for t in taus]
    for a, b in zip(picks, picks[1:]):
        assert not (a & ~b).any()                                      # nested: a larger tau only adds
    fractions = [p.mean() for p in picks]
    assert fractions[0] < fractions[1] < fractions[2] < fractions[-1] == 1.0


def test_planted_chunk_is_selected():
    """Keys of chunk 3 share a direction every query of heads 0-1 (kv head 0) carries: at a small tau those
    heads pick chunk 3 for every query (it is the best other chunk)."""
    S, chunk_size, D = 96, 16, 16
    rng = np.random.default_rng(9)
    q = rng.standard_normal((1, S, 4, D)).astype(np.float32)
    k = rng.standard_normal((1, S, 2, D)).astype(np.float32)
    u = rng.standard_normal(D).astype(np.float32)
    q[:, :, :2] += 2 * u
    k[0, 3 * chunk_size:4 * chunk_size, 0] += 2 * u
    got = np.asarray(select(jnp.asarray(q), jnp.asarray(k), chunk_size=chunk_size, tau=0.1))
    assert got[0, :2, :, 3].all()
    assert not got[0, 2:][:, np.arange(S) // chunk_size != 3, 3].all()   # kv head 1 has no such chunk


def test_block_q_cover_is_superset():
    """block_q > 1 keeps the union of the row's per-token chunks (never less than block_q = 1)."""
    S, chunk_size = 70, 16
    q, k, _ = numpy_qkv(10, 1, S, S, 4, 2, 8)
    per_token = np.asarray(jax.jit(functools.partial(vmoba_block_mask, chunk_size=chunk_size))(q, k)
                           .to_dense_block_map())
    cover = np.asarray(jax.jit(functools.partial(vmoba_block_mask, chunk_size=chunk_size, block_q=16))(q, k)
                       .to_dense_block_map())
    padded = np.pad(per_token, ((0, 0), (0, 0), (0, 80 - S), (0, 0)))
    np.testing.assert_array_equal(cover, padded.reshape(1, 4, 5, 16, 5).any(3))


def test_selection_is_deterministic_and_traced_once():
    from tests.conftest import assert_traced_once
    q1, k1, _ = numpy_qkv(11, 1, 60, 60, 4, 2, 8)
    q2, k2, _ = numpy_qkv(12, 1, 60, 60, 4, 2, 8)
    fn = lambda q, k: vmoba_select(q, k, chunk_size=12, tau=0.3, mode="head_global")
    a, _, c = assert_traced_once(fn, (q1, k1), (q2, k2), (q1, k1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(tau=0.0), ValueError, "tau"),
    (dict(tau=1.5), ValueError, "tau"),
    (dict(select="topk", topk=7), ValueError, "topk"),                 # 48 tokens / 8 = 6 chunks
    (dict(select="topk", topk=0), ValueError, "topk"),
    (dict(mode="global"), ValueError, "mode"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=8.0), TypeError, "chunk_size"),
    (dict(k_dim=4), ValueError, "head dim"),
])
def test_validation_errors_name_the_argument(kwargs, error, word):
    q, k, _ = numpy_qkv(0, 1, 48, 48, 2, 1, 8)
    if "k_dim" in kwargs:
        k = k[..., :kwargs.pop("k_dim")]
    kwargs.setdefault("chunk_size", 8)
    with pytest.raises(error, match=word):
        vmoba_block_mask(q, k, **kwargs)


@pytest.mark.parametrize("thw, chunk, word", [
    ((4, 6, 4), (4, 4), "chunk"),                                      # 4 does not divide h = 6
    ((4, 6, 4), (3, 3, 2), "chunk"),                                   # 3 does not divide t = 4
    ((4, 6, 4), 5, "chunk"),                                           # more frames than t
    ((4, 6, 5), 2, "x must be"),                                       # t h w != S
    ((4, 6), 2, "thw"),
])
def test_partition_errors_name_the_argument(thw, chunk, word):
    x = jnp.zeros((1, 96, 2))
    with pytest.raises((ValueError, TypeError), match=word):
        video_block_partition(x, thw, chunk)
