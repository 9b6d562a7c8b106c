"""P26 vAttention: contiguous vs paged decode entry points against a dense oracle, and the
``VirtualKVAllocator`` accounting.

The oracle is written here in NumPy (float64): per sequence, softmax over keys ``[0, len)`` with the new
tokens causal among themselves, GQA head ``h`` reading kv head ``h // (H / Hkv)``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.kv.vattention import (MB, KB, PagedBlockAllocator, VirtualKVAllocator,
                                         contiguous_decode_attention, contiguous_prefill_attention,
                                         paged_decode_attention, static_reservation_bytes)

TOL = dict(rtol=1e-5, atol=1e-5)


def run(fn, *arrays, **static):
    """``fn`` under ``jax.jit`` (static keywords bound): one compile instead of op-by-op dispatch."""
    return np.asarray(jax.jit(functools.partial(fn, **static))(*arrays))


def dense_oracle(q, k, v, lengths):
    """q [B, Tq, H, D]; k, v [B, S, Hkv, D] -> [B, Tq, H, Dv] in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, Tq, H, D = q.shape
    G = H // k.shape[2]
    out = np.zeros((B, Tq, H, v.shape[-1]))
    for b in range(B):
        n = int(lengths[b])
        for t in range(Tq):
            p = n - Tq + t                               # this token's position; sees keys <= p
            for h in range(H):
                s = k[b, :p + 1, h // G] @ q[b, t, h] / math.sqrt(D)
                w = np.exp(s - s.max())
                out[b, t, h] = (w / w.sum()) @ v[b, :p + 1, h // G]
    return out


def make_case(seed, B=3, Tq=1, H=6, Hkv=2, D=16, S=64, lengths=(37, 1, 64)):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, Tq, H, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, Hkv, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, Hkv, D)), jnp.float32)
    return q, k, v, jnp.asarray(lengths, jnp.int32)


def to_pages(cache, page_size, seed):
    """``[B, S, Hkv, D]`` -> a shuffled pool ``[num_pages + 2 spare, page_size, Hkv, D]`` and its table."""
    B, S, Hkv, D = cache.shape
    W = S // page_size
    perm = np.random.default_rng(seed).permutation(B * W + 2)[:B * W]     # two pages nobody owns
    pool = np.random.default_rng(seed + 1).standard_normal((B * W + 2, page_size, Hkv, D)).astype(np.float32)
    pool[perm] = np.asarray(cache).reshape(B * W, page_size, Hkv, D)
    return jnp.asarray(pool), jnp.asarray(perm.reshape(B, W), jnp.int32)


@pytest.mark.parametrize("Tq,H,Hkv,impl", [(1, 6, 2, "xla"), (3, 4, 1, "xla"), (2, 4, 2, "pallas")])
def test_contiguous_and_paged_agree_with_dense(Tq, H, Hkv, impl):
    """Contiguous (vAttention) and paged (shuffled pool) decode equal the dense masked oracle, GQA/MQA, odd
    lengths and a full one. Catches: a pool transposed or read in the wrong page order, a lost GQA group,
    lengths off by one, the new tokens not causal among themselves."""
    q, k, v, lengths = make_case(Tq * 10 + H, Tq=Tq, H=H, Hkv=Hkv, lengths=(37, Tq, 64))
    want = dense_oracle(q, k, v, lengths)
    kw = dict(impl=impl, interpret=True) if impl == "pallas" else dict(impl=impl)
    got_c = run(contiguous_decode_attention, q, k, v, lengths, **kw)
    kp, table = to_pages(k, 16, 3)
    vp, _ = to_pages(v, 16, 3)
    got_p = run(paged_decode_attention, q, kp, vp, table, lengths, **kw)
    np.testing.assert_allclose(np.asarray(got_c), want, **TOL)
    np.testing.assert_allclose(np.asarray(got_p), want, **TOL)
    np.testing.assert_allclose(np.asarray(got_c), np.asarray(got_p), **TOL)


def test_head_major_layout_equals_default_and_one_token_q():
    """``layout='bhsd'`` (jattn's caches) gives the same as the spec's ``[B, L, Hkv, d]``; a 3-D q is one token.
    Catches: a layout flag that transposes the wrong axes, or transposes twice."""
    q, k, v, lengths = make_case(1, lengths=(20, 33, 5))
    a = run(contiguous_decode_attention, q[:, 0], k, v, lengths, impl="xla")
    b = run(contiguous_decode_attention, q[:, 0], jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), lengths,
            layout="bhsd", impl="xla")
    kp, table = to_pages(k, 16, 5)
    vp, _ = to_pages(v, 16, 5)
    c = run(paged_decode_attention, q[:, 0], jnp.transpose(kp, (2, 0, 1, 3)), jnp.transpose(vp, (2, 0, 1, 3)),
            table, lengths, layout="bhsd", impl="xla")
    assert a.shape == (3, 6, 16)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), **TOL)
    np.testing.assert_allclose(np.asarray(a), dense_oracle(q, k, v, lengths)[:, 0], **TOL)


@pytest.mark.parametrize("impl", ["xla"])
def test_nan_and_inf_beyond_seq_len_leave_outputs_unchanged(impl):
    """Stale pages (deferred reclamation hands a slot's old K/V to the next request) hold NaN/Inf past each
    length: outputs must not change, contiguous or paged. Catches: the decode op dropping its stale-row
    guard (0 * NaN = NaN in p @ V), or zeroing by the wrong length, or by page rather than row."""
    q, k, v, lengths = make_case(2, Tq=2, lengths=(37, 2, 50))
    pos = jnp.arange(k.shape[1])[None, :, None, None]
    beyond = pos >= lengths[:, None, None, None]
    poison = jnp.where(jnp.arange(k.shape[-1]) % 2 == 0, jnp.nan, jnp.inf)
    k_bad, v_bad = jnp.where(beyond, poison, k), jnp.where(beyond, -poison, v)
    clean = run(contiguous_decode_attention, q, k, v, lengths, impl=impl)
    dirty = run(contiguous_decode_attention, q, k_bad, v_bad, lengths, impl=impl)
    np.testing.assert_array_equal(np.asarray(clean), np.asarray(dirty))
    kp, table = to_pages(k_bad, 16, 7)
    vp, _ = to_pages(v_bad, 16, 7)
    vp = vp.at[jnp.asarray([i for i in range(vp.shape[0]) if i not in np.asarray(table)])].set(jnp.nan)
    paged = run(paged_decode_attention, q, kp, vp, table, lengths, impl=impl)
    np.testing.assert_allclose(np.asarray(paged), np.asarray(clean), **TOL)


def test_nan_inside_seq_len_still_gives_nan():
    """A NaN the request really reads is never hidden. Catches a stale mask that zeroes or clips too much."""
    q, k, v, lengths = make_case(4, lengths=(37, 10, 64))
    v = v.at[1, 9, 0, 0].set(jnp.nan)          # inside sequence 1 (length 10), kv head 0
    out = run(contiguous_decode_attention, q, k, v, lengths, impl="xla")
    assert np.isnan(out[1, 0, :3, 0]).all() and np.isfinite(out[0]).all() and np.isfinite(out[2]).all()


def test_prefill_at_offsets_is_causal_attention_over_the_prefix():
    """``contiguous_prefill_attention``: T tokens at ``cache_offsets`` attend to the prefix and causally among
    themselves. Catches offsets read as lengths (T short) or as last positions (off by one)."""
    q, k, v, _ = make_case(5, Tq=4, lengths=(0, 0, 0))
    offsets = jnp.asarray([0, 13, 60], jnp.int32)
    got = run(contiguous_prefill_attention, q, k, v, offsets, impl="xla")
    np.testing.assert_allclose(np.asarray(got), dense_oracle(q, k, v, offsets + 4), **TOL)


def test_entry_points_jit_with_traced_lengths():
    """Lengths are arrays (traced under jit), the layout is static. Catches a Python branch on lengths."""
    q, k, v, lengths = make_case(6)
    fn = jax.jit(lambda q, k, v, n: contiguous_decode_attention(q, k, v, n, impl="xla"))
    np.testing.assert_allclose(np.asarray(fn(q, k, v, lengths)), dense_oracle(q, k, v, lengths), **TOL)


def test_entry_points_name_bad_arguments():
    """Each bad argument is named. Catches a missing check (a silent transpose of a wrong layout)."""
    q, k, v, lengths = make_case(7)
    with pytest.raises(ValueError, match="layout"):
        contiguous_decode_attention(q, k, v, lengths, layout="bsdh")
    with pytest.raises(TypeError, match="seq_lens"):
        contiguous_decode_attention(q, k, v, lengths.astype(jnp.float32))
    with pytest.raises(ValueError, match="seq_lens"):
        contiguous_decode_attention(q, k, v, lengths[:2])
    with pytest.raises(ValueError, match="lengths"):
        contiguous_decode_attention(q, k, v, jnp.asarray([1, 2, 65], jnp.int32))
    with pytest.raises(ValueError, match="cache_offsets"):
        contiguous_prefill_attention(q, k, v, jnp.asarray([0, -1, 3], jnp.int32))
    kp, table = to_pages(k, 16, 8)
    with pytest.raises(TypeError, match="block_table"):
        paged_decode_attention(q, kp, kp, table.astype(jnp.float32), lengths)
    with pytest.raises(ValueError, match="page_table"):
        paged_decode_attention(q, kp, kp, table.at[0, 0].set(999), lengths)


# ----------------------------------------------------------------------------------------------------------
# allocator
# ----------------------------------------------------------------------------------------------------------

GEOM = dict(num_layers=3, kv_heads=8, head_dim=128, bytes_per_elem=2, max_batch=4, max_len=4096)  # bpt 2 KB


def alloc(page_bytes=64 * KB, deferred=True, eager=0, **kw):
    return VirtualKVAllocator(page_bytes, deferred, eager, **{**GEOM, **kw})


@pytest.mark.parametrize("page_bytes,head_dim", [(64 * KB, 128), (2 * MB, 128), (64 * KB, 96)])
def test_page_counts_match_the_formula(page_bytes, head_dim):
    """Every (slot, layer, K/V) maps ``ceil(len * bpt / P)`` pages, bpt = Hkv d bytes (96: bpt does not divide
    P). Catches floor instead of ceil, a missing factor (bytes per element, heads), pages counted per token."""
    a = alloc(page_bytes, deferred=False, head_dim=head_dim)
    bpt = 8 * head_dim * 2
    rng = np.random.default_rng(0)
    for _ in range(20):
        lens = rng.integers(0, 4097, size=4).tolist()
        a.step([0] * 4)                              # every request finishes: pages unmapped
        a.step(lens)
        assert a.mapped_pages == 6 * sum(math.ceil(n * bpt / page_bytes) for n in lens)
        for r, n in enumerate(lens):
            if n:
                assert a.pages(r, layer=2, kv="v") == math.ceil(n * bpt / page_bytes), (r, n)
    assert a.max_pages_per_slot == math.ceil(4096 * bpt / page_bytes)
    assert a.virtual_bytes == 2 * 3 * 4 * a.max_pages_per_slot * page_bytes
    assert a.reservations[(1, "k")] == (4, 4096, 8, head_dim) and len(a.reservations) == 6


@pytest.mark.parametrize("deferred", [True, False])
def test_fragmentation_at_most_one_page_per_request_layer_kv(deferred):
    """A decode trace (prefill, +1 per step, requests finishing and arriving): live requests waste < 1 page per
    (request, layer, K/V), mapped = used + slack + overcommit + idle, and without deferral or eager steps
    nothing is over-committed. Catches mapping one page too many, never growing (slack < 0), or pages kept
    after a free with deferral off."""
    a = alloc(64 * KB, deferred=deferred)
    rng = np.random.default_rng(1)
    lens = [0] * 4
    for _ in range(300):
        for r in range(4):
            if lens[r] and rng.random() < 0.03:
                lens[r] = 0                                 # finished
            elif not lens[r] and rng.random() < 0.3:
                lens[r] = int(rng.integers(1, 2000))        # prefill
            elif lens[r]:
                lens[r] = min(lens[r] + 1, 4096)
        s = a.step(lens)
        for r in range(4):
            assert 0 <= a.fragmentation_pages(r) < 1, (r, lens[r], a.mapped[r])
            assert a.overcommit_pages(r) >= 0
        assert s.mapped_bytes == s.used_bytes + s.slack_bytes + s.overcommit_bytes + s.idle_bytes
        assert 0 <= s.slack_bytes < s.active * 2 * 3 * 64 * KB
        assert s.used_bytes == 2 * 3 * 2048 * sum(lens)
        if not deferred:
            assert s.overcommit_bytes == 0 and s.idle_bytes == 0


def test_eager_steps_map_ahead_in_the_background():
    """``eager_steps`` maps the pages of ``len + eager_steps`` tokens ahead (async calls), so a decode step that
    crosses a page boundary needs no sync map. Catches eager pages counted as sync or not mapped at all."""
    a = alloc(64 * KB, eager=8)                       # 32 tokens per page
    s = a.step([30, 0, 0, 0])
    assert a.pages(0) == 2 and s.sync_map_calls == 6 and s.map_calls == 12
    s = a.step([33, 0, 0, 0])                        # crossed into page 2: already mapped
    assert s.sync_map_calls == 0 and a.pages(0) == 2
    assert a.overcommit_pages(0) == 0 and a.stats().overcommit_bytes == 0
    a.step([56, 0, 0, 0])                            # 56 + 8 = 64 tokens: exactly 2 pages, nothing ahead
    s = a.step([57, 0, 0, 0])                        # 57 + 8 = 65: page 3 mapped ahead
    assert a.pages(0) == 3 and a.overcommit_pages(0) == 1 and s.sync_map_calls == 0 and s.map_calls == 6


@pytest.mark.parametrize("deferred", [True, False])
def test_reclaimed_slot_reuses_its_pages(deferred):
    """Deferred reclamation: a finished request's pages stay mapped and the next request in that slot (best
    fit) maps nothing for a prompt they cover. Without it the pages are unmapped and mapped again.
    Catches unmapping on free with deferral on, or best fit picking an empty slot over a mapped one."""
    a = alloc(64 * KB, deferred=deferred)
    a.step([0, 0, 3000, 0])                          # slot 2: 94 pages per tensor
    a.free_slot(2)
    mapped_before = a.total_map_calls
    slot = a.alloc_slot(1000)                        # 32 pages needed
    s = a.step([n for n in a.seq_lens])
    if deferred:
        assert slot == 2 and s.map_calls == 0 and a.total_unmap_calls == 0
        assert a.reused_pages == 6 * 32 and s.idle_bytes == 0 and a.pages(2) == 94
    else:
        assert a.total_unmap_calls == 6 * 94 and s.map_calls == 6 * 32 and s.unmap_calls == 6 * 94
        assert a.total_map_calls == mapped_before + 6 * 32 and a.reused_pages == 0


def test_finite_pool_reclaims_idle_pages_on_demand():
    """With a finite pool, an idle slot's deferred pages are unmapped when a live request needs them
    (highest slot first, down to its need); a pool too small raises. Catches reclaiming a live request's
    pages or never reclaiming."""
    a = alloc(64 * KB, pool_pages=6 * 100)           # 100 pages per tensor in all
    a.step([0, 0, 0, 3000])                          # slot 3: 94
    a.free_slot(3)
    s = a.step([1000, 0, 0, 0])                      # slot 0 needs 32: 6 free per tensor, so reclaim 26+
    assert a.pages(0) == 32 and a.pages(3) == 0 and s.unmap_calls == 6 * 94
    with pytest.raises(RuntimeError, match="out of physical pages"):
        a.step([3000, 3000, 3000, 0])


def test_paged_baseline_and_static_reservation():
    """vLLM-style 16-token blocks: ceil(len/16) blocks per request, freed at once; slack < 1 block per
    (request, layer, K/V). Static backs every slot to L_max. Catches block counts off by one."""
    p = PagedBlockAllocator(16, **{k: GEOM[k] for k in ("num_layers", "kv_heads", "head_dim", "max_batch")})
    s = p.step([17, 0, 16, 1])
    assert p.blocks == [2, 0, 1, 1] and s.mapped_bytes == 6 * 16 * 2048 * 4 and s.map_calls == 4
    assert s.used_bytes == 6 * 2048 * 34 and 0 <= s.slack_bytes < 3 * 6 * 16 * 2048
    s = p.step([18, 5, 0, 1])
    assert p.blocks == [2, 1, 0, 1] and s.map_calls == 1
    assert static_reservation_bytes(**GEOM) == 2 * 3 * 4 * 4096 * 8 * 128 * 2


def test_allocator_names_bad_arguments():
    """Bad arguments raise naming the argument. Catches silent clipping of a length or a slot index."""
    with pytest.raises(ValueError, match="page_bytes"):
        alloc(0)
    with pytest.raises(TypeError, match="deferred_reclaim"):
        alloc(64 * KB, deferred=1)
    with pytest.raises(ValueError, match="eager_steps"):
        alloc(64 * KB, eager=-1)
    with pytest.raises(TypeError, match="num_layers"):
        VirtualKVAllocator(64 * KB, **{**GEOM, "num_layers": 2.0})
    a = alloc()
    with pytest.raises(ValueError, match="seq_lens must have max_batch=4"):
        a.step([1, 2])
    with pytest.raises(ValueError, match=r"seq_lens\[1\]"):
        a.step([1, 4097, 0, 0])
    with pytest.raises(ValueError, match="slot"):
        a.free_slot(4)
    with pytest.raises(ValueError, match="layer"):
        a.pages(0, layer=3)
    with pytest.raises(ValueError, match="kv"):
        a.pages(0, kv="q")
    a.step([1, 1, 1, 1])
    with pytest.raises(RuntimeError, match="no idle slot"):
        a.alloc_slot(5)


def test_trace_benchmark_machinery():
    """benchmarks/vattention_trace.py on a tiny trace: one schedule for every allocator (equal used bytes),
    every request served, deferral reuses pages and saves map calls, mapped >= used everywhere. Catches a
    scheduler that drops or double-counts requests, or allocators fed different schedules."""
    from benchmarks import vattention_trace as bt
    trace = bt.make_trace(0, 12, 0.5, 64, 16, 1024)
    assert len(trace) == 12 and all(p + o <= 1024 for _, p, o in trace)
    geom = dict(max_batch=4, max_len=1024, **bt.GEOM)
    runs = {d: bt.simulate(trace, VirtualKVAllocator(64 * KB, d, 0, **geom), 4) for d in (False, True)}
    paged = bt.simulate(trace, PagedBlockAllocator(16, **{k: v for k, v in geom.items() if k != "max_len"}), 4)
    # a request lives o iterations at lengths p, p+1, ..., p+o-1 (its last token is never cached)
    token_iterations = sum(o * p + o * (o - 1) // 2 for _, p, o in trace)
    for rows in (*runs.values(), paged):
        assert [s.used_bytes for s in rows] == [s.used_bytes for s in paged]
        assert all(s.mapped_bytes >= s.used_bytes for s in rows)
        assert rows[-1].active == 0
    assert sum(s.used_bytes for s in paged) == 2 * 32 * 2048 * token_iterations
    calls = {d: sum(s.map_calls for s in rows) for d, rows in runs.items()}
    assert calls[True] < calls[False]
    summary = bt.summarize(runs[True])
    assert summary["mapped"] >= summary["used"] > 0
