"""P08 Kinetics: the eFLOPs cost model against the official repo's published numbers and hand-computed
values, the block top-k prefill selector against a literal NumPy transcription (GQA, odd lengths), full
budget = dense causal attention (forward and gradients), the output equals dense attention under the expanded
mask, top-k 0 keeps only sink + local, a planted key block is found, the block top-k decode step against a
literal transcription of LiteSys' ``blockwise_topk_sparsity`` and dense decode when top-k covers every block,
determinism and argument errors.

Mutations each test is meant to catch are named in the tests' docstrings.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.dynamic import kinetics as kin
from jattn.methods.dynamic.kinetics import (QWEN3, block_sparse_cost, block_topk_decode, dense_cost, expected_cost,
                                            kinetics_attention, kinetics_block_mask, kinetics_block_scores,
                                            kinetics_cost, kinetics_select, zero_overhead_sparse_cost)
from jattn.ops.block_sparse import block_sparse_attention
from jattn.ops.decode import decode_attention
from tests.conftest import (assert_close, assert_forward_and_grads_close, assert_traced_once, dense_vjp_run,
                            numpy_qkv, random_like, vjp_run)

STATIC = ("topk", "block_q", "block_size", "local", "sink")
select = jax.jit(kinetics_select, static_argnames=STATIC)

# ------------------------------------------------------------------------------------------------ cost model

# AIME24 query 0 (prompt 155 tokens with the Qwen3 chat template): the 32 generation lengths of the official
# CSVs cost_model/aime24/dense/aime24_qwen3-4b_dense_numTrials_tradeoff.csv and
# cost_model/aime24/block_topk/aime24_qwen3-4b_local0_block16_blocktopk64_tradeoff.csv (Infini-AI-Lab/Kinetics).
DENSE_G = [7012, 14421, 25825, 16847, 8717, 26848, 10188, 30767, 10584, 11925, 22664, 24640, 10688, 27985, 8725,
           10824, 20341, 24760, 30767, 8843, 30767, 11608, 7698, 28080, 27032, 10903, 8169, 9096, 9625, 25588,
           24161, 11053]
BLOCK_G = [9948, 10403, 29570, 12287, 16918, 8504, 11185, 25446, 30767, 30767, 30767, 30767, 23727, 12704, 30767,
           23121, 8372, 9626, 12545, 9305, 8405, 9755, 23946, 11197, 9543, 17644, 7652, 9149, 13825, 14618, 18480,
           13005]


@pytest.mark.parametrize("trials, compute, memory", [(1, 251.74295358379197, 15716.076304751998),
                                                     (2, 503.48590716758395, 31208.311623743997)])
def test_dense_cost_reproduces_the_published_table(trials, compute, memory):
    """Catches: parameter memory added back, the prompt read per trial (``2 S n`` instead of ``2 S``), layers
    not folded into the head dim, a wrong Qwen3-4B config."""
    got = expected_cost(dense_cost, DENSE_G, num_trials=trials, model="Qwen3-4B", context_length=155)
    np.testing.assert_allclose(got, (compute, memory), rtol=1e-12)


def test_block_sparse_cost_reproduces_the_published_table():
    """The CSVs were written with the ``+`` correction (``kv_correction="add"``). Catches: the search terms
    dropped, ``(2S + G n) // block`` read per trial, ``/`` instead of ``//``."""
    got = expected_cost(block_sparse_cost, BLOCK_G, num_trials=1, model="Qwen3-4B", context_length=155, local=0,
                        block_size=16, block_topk=64, kv_correction="add")
    np.testing.assert_allclose(got, (147.90214748299198, 1906.172399952), rtol=1e-12)
    got8 = expected_cost(block_sparse_cost, BLOCK_G, num_trials=8, model="Qwen3-4B", context_length=155, local=0,
                         block_size=16, block_topk=64, kv_correction="add")
    np.testing.assert_allclose(got8, (1183.2171798639358, 15203.185303319999), rtol=1e-12)


def test_cost_formulas_by_hand():
    """Hand-evaluated from the repo's formulas for a toy model (P=1e9, Hq=4, Hkv=2, d=8 x 2 layers)."""
    m = kin.KineticsModel(1e9, 4, 2, 8, 2)                 # d = 16
    S, G, n, I = 100, 50, 3, 2.0
    # dense: compute = 3 * (2e9*50 + 2*250*50*4*16) ; memory = 2*(200+150)*50*2*16*2
    c, mem = dense_cost(m, context_length=S, generation_length=G, num_trials=n, e_flops=I)
    assert c == pytest.approx(3 * (1e11 + 1_600_000) * 1e-12, rel=1e-12)
    assert mem == pytest.approx(2_240_000 * 1e-12, rel=1e-12)
    # block top-k: b = 8 + 4*32 = 136 > S: KV = 136*50 - 0.5*36^2 = 6152
    c, mem = block_sparse_cost(m, context_length=S, generation_length=G, local=8, block_size=4, block_topk=32,
                               num_trials=n, e_flops=I)
    search_c = (250 // 4) * 50 * 4 * 16                    # 62 * 3200
    assert c == pytest.approx(3 * (1e11 + 4 * 6152 * 64 + search_c) * 1e-12, rel=1e-12)
    search_m = (350 // 4) * 50 * 2 * 16                    # 87 * 1600
    assert mem == pytest.approx((3 * 4 * 6152 * 32 + search_m) * I * 1e-12, rel=1e-12)
    # zero-overhead top-k, budget 120: KV = 120*50 + 0.5*20^2 = 6200
    c, mem = zero_overhead_sparse_cost(m, context_length=S, generation_length=G, budget=120, num_trials=n,
                                       e_flops=I)
    assert c == pytest.approx(3 * (1e11 + 4 * 6200 * 64) * 1e-12, rel=1e-12)
    assert mem == pytest.approx(3 * 4 * 6200 * 32 * I * 1e-12, rel=1e-12)
    total = kinetics_cost(m, S, G, n, mode="topk", budget=120, e_flops=I)
    assert total["total"] == pytest.approx(c + mem)


def test_memory_dominates_long_generations_and_sparsity_cuts_it():
    """Kinetics' claim: for long generations attention memory, not parameter compute, dominates dense cost
    (more so for small models), and block top-k removes most of it. Catches: memory not weighted by I."""
    assert len(QWEN3) == 6
    for name in ("Qwen3-0.6B", "Qwen3-8B", "Qwen3-32B"):
        long = kinetics_cost(name, 1024, 32768, 8)
        assert long["memory"] > 3 * long["compute"], name
        short = kinetics_cost(name, 64, 64, 1)
        assert short["memory"] < long["memory"] / 1000
        sparse = kinetics_cost(name, 1024, 32768, 8, mode="block_topk", block_size=16, block_topk=64)
        assert sparse["total"] < 0.2 * long["total"], name
    small, big = kinetics_cost("Qwen3-0.6B", 1024, 32768), kinetics_cost("Qwen3-32B", 1024, 32768)
    assert small["memory"] / small["compute"] > big["memory"] / big["compute"]


# -------------------------------------------------------------------------------------------- prefill rule

def literal_kinetics(q, k, *, topk, block_q, block_size, local, sink):
    """The rule of the module docstring, one (batch, kv head, query block) at a time, mean logits literally."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    nQ, nK = math.ceil(T / block_q), math.ceil(T / block_size)
    tiles = np.zeros((B, H, nQ, nK), bool)
    for b in range(B):
        for g in range(Hkv):
            for i in range(nQ):
                first, end = i * block_q, min((i + 1) * block_q, T)
                local_first = max(0, first - local) // block_size
                keep = {c for c in range(nK) if c < math.ceil(sink / block_size) and c * block_size <= end - 1}
                keep |= set(range(local_first, (end - 1) // block_size + 1))
                candidates = list(range(math.ceil(sink / block_size), local_first))
                scores = {}
                for c in candidates:
                    logits = [q[b, t, g * G + r] @ k[b, s, g] for t in range(first, end) for r in range(G)
                              for s in range(c * block_size, min((c + 1) * block_size, T))]
                    scores[c] = np.mean(logits)
                keep |= set(sorted(candidates, key=lambda c: (-scores[c], c))[:topk])
                for h in range(g * G, (g + 1) * G):
                    tiles[b, h, i, sorted(keep)] = True
    return tiles


CASES = [  # (seed, B, T, H, Hkv, D, topk, block_q, block_size, local, sink)
    (0, 1, 203, 4, 2, 8, 3, 16, 8, 24, 4),
    (1, 2, 250, 4, 2, 8, 2, 8, 16, 0, 20),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_tiles_equal_literal_rule(case):
    """Catches: max instead of mean pooling, the choice per query head instead of per kv head (GQA), the
    sink/local tiles dropped or widened by one, ties to the higher block, candidates overlapping the window."""
    seed, B, T, H, Hkv, D, topk, block_q, block_size, local, sink = case
    q, k, _ = numpy_qkv(seed, B, T, T, H, Hkv, D)
    kw = dict(topk=topk, block_q=block_q, block_size=block_size, local=local, sink=sink)
    want = literal_kinetics(q, k, **kw)
    got = np.asarray(select(q, k, **kw))
    nQ, nK = got.shape[-2:]
    causal = (np.arange(nK)[None] * block_size) <= (np.minimum((np.arange(nQ) + 1) * block_q, T) - 1)[:, None]
    assert want.sum() < 0.7 * causal.sum() * B * H                  # something was pruned
    np.testing.assert_array_equal(got, want)


def test_block_scores_are_mean_logits():
    """Linearity: mean over the tile's queries, group heads and keys of q.k equals qbar . kbar (partial last
    blocks averaged over their real tokens only). Catches: padded zeros counted in the means."""
    q, k, _ = numpy_qkv(2, 1, 37, 37, 4, 2, 8)
    got = np.asarray(kinetics_block_scores(q, k, block_q=8, block_size=16))
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    for g in range(2):
        for i in range(5):
            for c in range(3):
                logits = [qn[0, t, h] @ kn[0, s, g] for t in range(i * 8, min(i * 8 + 8, 37))
                          for h in (2 * g, 2 * g + 1) for s in range(c * 16, min(c * 16 + 16, 37))]
                assert got[0, g, i, c] == pytest.approx(np.mean(logits), rel=1e-5, abs=1e-5)


@jax.jit
def sparse_vjp_run(q, k, v, w, bm):
    """block_sparse_attention(causal) with a traced BlockMask: one compile serves every budget."""
    return vjp_run(lambda q, k, v: block_sparse_attention(q, k, v, bm, causal=True, impl="xla"), q, k, v, w)


def test_full_budget_is_dense_causal():
    """topk = nK keeps every causal tile; forward and gradients equal dense causal attention. Catches: a
    candidate range ending one block early (a causal tile never kept)."""
    T, block = 101, 16
    q, k, v = numpy_qkv(3, 1, T, T, 4, 2, 16)
    nb = math.ceil(T / block)
    kw = dict(topk=nb, block_q=block, block_size=block, local=0, sink=0)
    bm = jax.jit(functools.partial(kinetics_block_mask, **kw))(q, k)
    tiles = np.asarray(bm.to_dense_block_map())
    np.testing.assert_array_equal(tiles, np.broadcast_to(np.tril(np.ones((nb, nb), bool)), tiles.shape))
    w = random_like(4, q)
    got = sparse_vjp_run(q, k, v, w, bm)
    causal = jnp.asarray(np.tril(np.ones((T, T), bool)))
    assert_forward_and_grads_close(got, dense_vjp_run(q, k, v, w, causal), what="topk = nK")


def test_output_equals_dense_with_expanded_mask():
    """The sparse attention equals the dense oracle under the expanded mask (forward and gradients), and
    ``kinetics_attention`` is exactly selector + kernel. Catches: the BlockMask built from a different tile
    map than the one selected (e.g. per kv head, not repeated over the group)."""
    T, block = 101, 16
    q, k, v = numpy_qkv(5, 1, T, T, 4, 2, 16)
    kw = dict(topk=1, block_q=block, block_size=block, local=16, sink=4)
    bm = jax.jit(functools.partial(kinetics_block_mask, **kw))(q, k)
    mask = np.asarray(bm.to_dense_mask(heads=4)) & np.tril(np.ones((T, T), bool))
    assert 0.3 < mask.mean() < 0.5 * 0.95
    w = random_like(6, q)
    got = sparse_vjp_run(q, k, v, w, bm)
    assert_forward_and_grads_close(got, dense_vjp_run(q, k, v, w, jnp.asarray(mask)))
    end_to_end = jax.jit(functools.partial(kinetics_attention, impl="xla", **kw))(q, k, v)
    np.testing.assert_array_equal(np.asarray(end_to_end), np.asarray(got[0]))


def test_zero_topk_keeps_only_sink_and_local():
    """topk = 0: the sink tiles and the local cover, nothing else. Catches: the sink block dropped (the
    first tile of far query blocks missing), a local cover one tile short of the diagonal."""
    T, bq, bk, local, sink = 200, 16, 8, 20, 4
    q, k, _ = numpy_qkv(7, 1, T, T, 4, 2, 8)
    got = np.asarray(select(q, k, topk=0, block_q=bq, block_size=bk, local=local, sink=sink))
    nQ, nK = got.shape[-2:]
    want = np.zeros((nQ, nK), bool)
    for i in range(nQ):
        first, last = i * bq, min((i + 1) * bq, T) - 1
        want[i, 0] = True
        want[i, max(0, first - local) // bk:last // bk + 1] = True
    np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))


def test_planted_block_is_found():
    """Every query block past it (and past the window) picks the planted key block among its topk.
    Catches: ascending instead of descending sort, scores read from the wrong kv head."""
    T, D, bs = 512, 16, 16
    rng = np.random.default_rng(8)
    q = rng.standard_normal((1, T, 4, D)).astype(np.float32) * 0.3
    k = rng.standard_normal((1, T, 2, D)).astype(np.float32) * 0.3
    direction = rng.standard_normal(D).astype(np.float32)
    q[:, :, 2:] += direction                                      # kv head 1's query heads look for it
    k[0, 10 * bs:11 * bs, 1] += 2 * direction                     # key block 10 of kv head 1
    got = np.asarray(select(jnp.asarray(q), jnp.asarray(k), topk=2, block_q=32, block_size=bs, local=32, sink=4))
    later = np.arange(got.shape[2]) * 32 - 32 >= 11 * bs
    assert later.sum() >= 8
    assert got[0, 2:, later, 10].all()
    assert not got[0, :2, later, 10].all()                        # kv head 0 has no reason to pick it


def test_selection_is_deterministic_and_traced_once():
    q1, k1, _ = numpy_qkv(8, 1, 120, 120, 4, 2, 8)
    q2, k2, _ = numpy_qkv(9, 1, 120, 120, 4, 2, 8)
    fn = lambda q, k: kinetics_select(q, k, topk=2, block_q=16, block_size=8, local=8, sink=4)
    a, _, c = assert_traced_once(fn, (q1, k1), (q2, k2), (q1, k1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(topk=4, block_size=16), ValueError, "topk"),               # 48 / 16 = 3 blocks
    (dict(topk=-1), ValueError, "topk"),
    (dict(block_q=0), ValueError, "block_q"),
    (dict(block_size=2.0), TypeError, "block_size"),
    (dict(local=-1), ValueError, "local"),
    (dict(sink=-2), ValueError, "sink"),
    (dict(k_dim=8), ValueError, "head dim"),
])
def test_validation_errors_name_the_argument(kwargs, error, word):
    q, k, _ = numpy_qkv(0, 1, 48, 48, 2, 1, 16)
    if "k_dim" in kwargs:
        k = k[..., :kwargs.pop("k_dim")]
    with pytest.raises(error, match=word):
        kinetics_block_mask(q, k, **kwargs)


@pytest.mark.parametrize("kwargs, word", [
    (dict(mode="sparse"), "mode"), (dict(mode="topk"), "budget"), (dict(num_trials=0), "num_trials"),
    (dict(kv_correction="x", mode="block_topk"), "kv_correction"), (dict(model="Qwen9"), "model")])
def test_cost_errors_name_the_argument(kwargs, word):
    args = dict(model="Qwen3-4B", context_length=10, generation_length=10) | kwargs
    with pytest.raises((ValueError, TypeError), match=word):
        kinetics_cost(**args)


# -------------------------------------------------------------------------------------------------- decode

def literal_litesys_decode(q, kc, vc, lengths, *, block, topk, local, sink):
    """LiteSys' blockwise_topk_sparsity (exact logits, non-kept middle masked to -inf), then softmax."""
    q, kc, vc = (np.asarray(x, np.float64) for x in (q, kc, vc))
    B, H, D = q.shape
    Hkv = kc.shape[1]
    G = H // Hkv
    out = np.zeros((B, H, vc.shape[-1]))
    for b in range(B):
        L = int(lengths[b])
        logits = np.einsum("hd,hsd->hs", q[b], np.repeat(kc[b, :, :L], G, axis=0)) / math.sqrt(D)
        n_full = (sink + local + topk * block + block - 1) // block * block
        if L > n_full:
            n_dyn = (L - local - sink) // block * block
            mid = logits[:, sink:sink + n_dyn]
            mean = mid.reshape(Hkv, G, -1).mean(axis=1).reshape(Hkv, -1, block).mean(-1)   # [Hkv, n]
            for g in range(Hkv):
                best = sorted(range(mean.shape[1]), key=lambda c: (-mean[g, c], c))[:topk]
                drop = np.ones(mean.shape[1], bool)
                drop[best] = False
                for h in range(g * G, (g + 1) * G):
                    mid[h, np.repeat(drop, block)] = -np.inf
            logits[:, sink:sink + n_dyn] = mid
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[b] = np.einsum("hs,hsd->hd", p, np.repeat(vc[b, :, :L], G, axis=0))
    return out


def _caches(seed, B, H, Hkv, S, D):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((B, H, D), np.float32)),
            jnp.asarray(rng.standard_normal((B, Hkv, S, D), np.float32)),
            jnp.asarray(rng.standard_normal((B, Hkv, S, D), np.float32)))


def test_decode_equals_literal_litesys_rule():
    """Lengths below, at and above n_full; odd remainders widen the local window. Catches: middle blocks
    aligned at 0 instead of at ``sink``, the remainder dropped instead of added to the local window, group
    heads not averaged."""
    q, kc, vc = _caches(10, 3, 4, 2, 150, 8)
    lengths = jnp.asarray([150, 47, 101], jnp.int32)
    kw = dict(block=8, topk=3, local=6, sink=4)
    got = jax.jit(functools.partial(block_topk_decode, **kw))(q, kc, vc, lengths)
    want = literal_litesys_decode(q, kc, vc, np.asarray(lengths), **kw)
    assert_close(got, want, what="block top-k decode")
    dense = jax.jit(functools.partial(decode_attention, impl="xla"))(q, kc, vc, lengths)
    assert np.abs(np.asarray(got - dense))[0].max() > 1e-3            # the long sequence was really sparsified


def test_decode_topk_covering_all_blocks_is_dense():
    """topk >= #blocks: every key kept, the step equals jattn.decode_attention. Catches: the sink or the
    last key (the new token) missing from the kept list."""
    q, kc, vc = _caches(11, 2, 4, 1, 96, 16)
    lengths = jnp.asarray([96, 77], jnp.int32)
    got = jax.jit(functools.partial(block_topk_decode, block=16, topk=6, local=0, sink=4))(q, kc, vc, lengths)
    dense = jax.jit(functools.partial(decode_attention, impl="xla"))(q, kc, vc, lengths)
    assert_close(got, dense, what="dense decode")


def test_decode_with_a_maintained_summary_is_the_same_step():
    """Passing the block summary (what a serving loop keeps) gives the identical step. Catches: summary
    blocks aligned at 0 instead of at ``sink``."""
    q, kc, vc = _caches(13, 2, 4, 2, 150, 8)
    lengths = jnp.asarray([150, 101], jnp.int32)
    kw = dict(block=8, topk=3, local=6, sink=5)
    summary = kin.kinetics_block_summary(kc, block=8, sink=5)
    want = literal_litesys_decode(q, kc, vc, np.asarray(lengths), **kw)
    got = jax.jit(functools.partial(block_topk_decode, **kw))(q, kc, vc, lengths, k_summary=summary)
    assert_close(got, want, what="with k_summary")
    with pytest.raises(ValueError, match="k_summary"):
        block_topk_decode(q, kc, vc, lengths, k_summary=summary[:, :, 1:], **kw)


@pytest.mark.parametrize("kwargs, word", [(dict(topk=7), "topk"), (dict(block=0), "block"), (dict(sink=-1), "sink")])
def test_decode_errors_name_the_argument(kwargs, word):
    q, kc, vc = _caches(12, 1, 2, 1, 96, 8)
    args = dict(block=16, topk=2, local=0, sink=4) | kwargs
    with pytest.raises((ValueError, TypeError), match=word):
        block_topk_decode(q, kc, vc, jnp.asarray([50], jnp.int32), **args)
