"""P65 Lean Attention: the stream-K schedule, the exact merge, and the worker-grid decode kernel.

Each test's docstring names the mutation it catches. Kernel runs are interpreted on CPU (tiny shapes);
``test_lowers_to_triton`` checks the real Triton lowering from one trace.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jattn
from jattn.core.softmax import merge_partials
from jattn.methods.kv.lean import (lean_decode_attention, lean_merge, lean_schedule, max_segments, merge_segments,
                                   ort_grid, ragged_schedule, schedule_segments, worker_ranges)

TRITON = "__gpu$xla.gpu.triton"
MOSAIC = "tpu_custom_call"
STATIC = ("num_workers", "window", "softcap", "return_lse", "page_size", "interpret", "poison_outputs")
lean = jax.jit(lean_decode_attention, static_argnames=STATIC)   # one compile per case, not op-by-op


# ------------------------------------------------------------------------------------ the schedule

@pytest.mark.parametrize("args, kwargs, expected", [
    # (B, Hkv, groups, Lk), kwargs -> (block_n, num_n, total, G, max_t, high, num_splits)
    ((1, 8, 8, 256 * 1024), dict(head_dim=128), (128, 2048, 16384, 256, 64, 256, 33)),   # G = 32*Hkv*B*num_m
    ((1, 1, 1, 4096), dict(head_dim=64), (256, 16, 16, 8, 2, 8, 9)),                    # G = (total+1)//2
    ((2, 3, 4, 1000), dict(head_dim=128, n_workers=10), (128, 8, 48, 10, 5, 8, 3)),     # total % G != 0
    ((4, 2, 4, 2048), dict(head_dim=128), (128, 16, 128, 64, 2, 64, 9)),
    ((1, 2, 1, 1024), dict(head_dim=256), (64, 16, 32, 16, 2, 16, 9)),                  # d > 128: block_n 64
    ((1, 1, 1, 64), dict(head_dim=64), (256, 1, 1, 1, 1, 1, 1)),                        # G = ceil(32*total/num_n) clamp
])
def test_schedule_reproduces_the_ort_formulas(args, kwargs, expected):
    """Hand-evaluated values of the spec's formulas. Catches: a wrong block_n rule, num_n/total, the G branch
    (4*SMs threshold, 2*SMs vs 32*Hkv*B*num_m), max_t/high, or either num_splits branch."""
    s = lean_schedule(*args, **kwargs)
    assert (s.block_n, s.num_n, s.total, s.grid, s.max_t, s.high, s.num_splits) == expected


def test_schedule_folds_gqa_groups_into_m_blocks():
    """num_m = ceil(groups / 64). Catches: ignoring the GQA fold (num_m = 1 or = groups)."""
    assert lean_schedule(1, 2, 64, 512).num_m == 1
    s = lean_schedule(1, 2, 80, 512, head_dim=128)
    assert s.num_m == 2 and s.total == 2 * 4 * 2


@pytest.mark.parametrize("total, workers", [(0, 3), (1, 1), (7, 3), (16, 16), (17, 16), (48, 10), (100, 7),
                                            (5, 9), (1000, 264)])
def test_every_tile_assigned_once_and_loads_balanced(total, workers):
    """Ranges tile [0, total) contiguously; loads differ by <= 1. Catches: worker range off by one (c <= high,
    max_t instead of max_t - 1 for the low workers), overlapping or missing tiles."""
    starts, ends = worker_ranges(total, workers)
    assert starts[0] == 0 and ends[-1] == total
    np.testing.assert_array_equal(starts[1:], ends[:-1])
    loads = ends - starts
    assert loads.min() >= 0 and loads.max() - loads.min() <= 1
    assert np.all(np.diff(loads) <= 0)  # the first `high` workers get max_t


def test_ranges_cross_head_boundaries():
    """B*Hkv = 3 heads of 4 tiles on 2 workers: worker 0 = [0, 6) spans heads 0 and 1. Catches: a per-head
    split (ranges cut at head boundaries) passed off as stream-K."""
    s = lean_schedule(1, 3, 1, 4 * 128, head_dim=128, n_workers=2)
    assert s.total == 12 and list(s.starts) == [0, 6] and list(s.ends) == [6, 12]
    _, _, segments = ragged_schedule([4, 4, 4], 2)
    assert segments == [[(0, 0, 4), (1, 0, 2)], [(1, 2, 4), (2, 0, 4)]]


@pytest.mark.parametrize("counts, workers", [([0, 3, 1, 0, 5], 4), ([2, 2, 2], 4), ([1, 1, 1, 1, 1, 1], 2),
                                             ([0, 0, 0], 2), ([9], 3), ([4, 0, 7, 2], 13)])
def test_ragged_schedule_covers_needed_tiles_once(counts, workers):
    """Every needed (head, tile) once, loads within 1, segments <= max_segments. Catches: zero-tile heads
    taking segments, a dropped tail tile, a bound that a ragged batch exceeds."""
    starts, ends, segments = ragged_schedule(counts, workers)
    seen = [(h, t) for runs in segments for h, lo, hi in runs for t in range(lo, hi)]
    assert sorted(seen) == [(h, t) for h, n in enumerate(counts) for t in range(n)] and len(seen) == len(set(seen))
    loads = [sum(hi - lo for _, lo, hi in runs) for runs in segments]
    assert max(loads) - min(loads) <= 1
    bound = max_segments(len(counts), max(max(counts), 1), workers)
    assert max(len(r) for r in segments) <= bound


@pytest.mark.parametrize("counts, firsts, workers", [([0, 3, 1, 0, 5], [0, 1, 0, 0, 2], 4),
                                                     ([4, 4, 4], [0, 0, 0], 2), ([1, 0, 2, 1], [3, 0, 0, 1], 7)])
def test_xla_schedule_matches_numpy(counts, firsts, workers):
    """The traced (jit) schedule equals ragged_schedule, shifted by each head's first needed tile. Catches:
    searchsorted side (a worker starting exactly at a head boundary gets the previous head), the compaction."""
    slots = max_segments(len(counts), max(counts), workers)
    head, lo, hi, starts, ends = jax.jit(schedule_segments, static_argnums=(2, 3))(
        jnp.array(counts), jnp.array(firsts), workers, slots)
    ref_starts, ref_ends, segments = ragged_schedule(counts, workers)
    np.testing.assert_array_equal(starts, ref_starts)
    np.testing.assert_array_equal(ends, ref_ends)
    for c, runs in enumerate(segments):
        got = [(int(h), int(a), int(b)) for h, a, b in zip(head[c], lo[c], hi[c]) if h < len(counts)]
        assert got == [(h, a + firsts[h], b + firsts[h]) for h, a, b in runs]
        assert all(int(a) == int(b) for h, a, b in zip(head[c], lo[c], hi[c]) if h >= len(counts))


def test_default_grid_formula():
    """ort_grid's two branches and its clamp. Catches: swapped branches or a missing clamp to total."""
    assert ort_grid(16384, 2048, 1, 8) == 256
    assert ort_grid(600, 10, 1, 1, num_sms=132) == 32   # > 4*SMs: min(264, 32*1*1*1)
    assert ort_grid(3, 1, 1, 3) == 2 and ort_grid(1, 1, 1, 1) == 1


# ----------------------------------------------------------------------------------------- the merge

def _state(key, shape=(3,), e=4):
    k1, k2, k3 = jax.random.split(key, 3)
    m = jax.random.normal(k1, shape) * 3
    return m, jax.random.uniform(k2, shape, minval=0.5, maxval=2.0), jax.random.normal(k3, (*shape, e))


def test_merge_operator_associative_commutative_with_identity():
    """ORT's (m, l, acc) merge. Catches: dropping one side's rescale e^{m_b - m}, using m_a for both, an
    identity that is not absorbed (-inf - -inf = NaN)."""
    a, b, c = (_state(jax.random.PRNGKey(i)) for i in range(3))
    close = lambda x, y: [np.testing.assert_allclose(u, w, rtol=1e-5, atol=1e-6) for u, w in zip(x, y)]  # noqa: E731
    close(lean_merge(a, b), lean_merge(b, a))
    close(lean_merge(lean_merge(a, b), c), lean_merge(a, lean_merge(b, c)))
    identity = (jnp.full((3,), -jnp.inf), jnp.zeros((3,)), jnp.zeros((3, 4)))
    close(lean_merge(a, identity), a)
    close(lean_merge(identity, a), a)
    m, l, acc = lean_merge(identity, identity)
    assert np.all(np.isneginf(m)) and np.all(l == 0) and np.all(acc == 0)
    # the merged normalised output is the softmax over the union (two halves of one row)
    m, l, acc = lean_merge(a, b)
    expected = (np.exp(a[0])[:, None] * a[2] + np.exp(b[0])[:, None] * b[2]) / (
        np.exp(a[0]) * a[1] + np.exp(b[0]) * b[1])[:, None]
    np.testing.assert_allclose(acc / l[:, None], expected, rtol=1e-5)


def test_merge_segments_equals_merge_partials_any_order():
    """Phase 2 per segment id = merge_partials of that id's partials, in any order; ids >= n are dropped;
    a segment without partials is (0, -inf). Catches: dropping segment-boundary merges (keeping one
    partial per id), a missing weight, out-of-range ids leaking in."""
    key = jax.random.PRNGKey(3)
    out = jax.random.normal(key, (7, 5, 4))
    lse = jax.random.normal(jax.random.PRNGKey(4), (7, 5)).at[2].set(-jnp.inf)
    ids = jnp.array([0, 2, 0, 4, 2, 0, 1])  # id 4 dropped (n = 4); id 3 empty
    merge = jax.jit(merge_segments, static_argnums=3)
    merged, merged_lse = merge(out, lse, ids, 4)
    for sid in range(4):
        rows = [i for i in range(7) if int(ids[i]) == sid]
        if not rows:
            assert np.all(merged[sid] == 0) and np.all(np.isneginf(merged_lse[sid]))
            continue
        want, want_lse = merge_partials(out[jnp.array(rows)], lse[jnp.array(rows)])
        np.testing.assert_allclose(merged[sid], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(merged_lse[sid], want_lse, rtol=1e-5)
    perm = jnp.array([6, 3, 1, 0, 5, 2, 4])
    again = merge(out[perm], lse[perm], ids[perm], 4)
    np.testing.assert_allclose(again[0], merged, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ the op

def _inputs(B, Tq, H, Hkv, D, S, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    shape_q = (B, H, D) if Tq is None else (B, Tq, H, D)
    return (jax.random.normal(ks[0], shape_q), jax.random.normal(ks[1], (B, Hkv, S, D)),
            jax.random.normal(ks[2], (B, Hkv, S, D)))


def _check(got, want):
    (out, lse), (ref_out, ref_lse) = got, want
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("workers", [1, 3, 7, 12])  # 12 = every needed tile its own worker (1 + 3 + 4 per head pair)
def test_equals_reference_any_worker_count(workers):
    """GQA (H=4, Hkv=2), Tq=2, ragged lengths 0, 37 and S_max, NaN-poisoned partials, against the dense
    reference. Catches: a worker range off by one (a tile seen twice or never), a dropped segment-boundary
    merge, a wrong head/batch id for a segment, an unwritten slot (NaN)."""
    q, k, v = _inputs(3, 2, 4, 2, 16, 64)
    lengths = jnp.array([0, 37, 64])
    want = jattn.decode_attention(q, k, v, lengths, impl="reference", return_lse=True)
    got = lean(q, k, v, lengths, num_workers=workers, page_size=16, interpret=True,
                                poison_outputs=True, return_lse=True)
    _check(got, want)


@pytest.mark.parametrize("workers", [1, 5, 12])
def test_tpu_structure_equals_reference(workers):
    """The Mosaic (worker, step) structure, interpreted, NaN-poisoned: GQA, Tq=2, lengths 0/37/64. Catches:
    a wrong first/last-of-segment flag (state not reset, or a slot finalised early), a step-to-slot map off
    by one, idle steps doing compute."""
    q, k, v = _inputs(3, 2, 4, 2, 16, 64, seed=1)
    lengths = jnp.array([37, 0, 64])
    want = jattn.decode_attention(q, k, v, lengths, impl="reference", return_lse=True)
    _check(lean(q, k, v, lengths, num_workers=workers, page_size=16, interpret="mosaic", poison_outputs=True,
                return_lse=True), want)


def test_single_token_jit_traced_lengths_and_default_workers():
    """q [B, H, D], lengths traced under jit, default G. Catches: the schedule needing concrete lengths, a
    slot bound too small for the default grid (missing tiles)."""
    q, k, v = _inputs(2, None, 2, 1, 16, 48)
    lengths = jnp.array([48, 5])
    fn = jax.jit(lambda q, k, v, n: lean_decode_attention(q, k, v, n, page_size=16, interpret=True,
                                                          return_lse=True))
    _check(fn(q, k, v, lengths), jattn.decode_attention(q, k, v, lengths, impl="reference", return_lse=True))


def test_paged_pool_window_softcap_sinks():
    """A shared page pool with a permuted table, a window, a softcap and sinks, on both structures. Catches:
    reading the cache by logical tile instead of the page table, skipping the window's first needed tile."""
    B, H, Hkv, D, P = 2, 4, 2, 16, 16
    ks = jax.random.split(jax.random.PRNGKey(5), 4)
    q = jax.random.normal(ks[0], (B, 3, H, D))
    k_pool = jax.random.normal(ks[1], (Hkv, 9, P, D))
    v_pool = jax.random.normal(ks[2], (Hkv, 9, P, D))
    table = jnp.array([[4, 0, 7, 2], [8, 1, 3, 5]], jnp.int32)
    lengths = jnp.array([61, 20])
    sinks = jax.random.normal(ks[3], (H,))
    kw = dict(page_table=table, window=20, softcap=5.0, sinks=sinks, return_lse=True)
    want = jattn.decode_attention(q, k_pool, v_pool, lengths, impl="reference", **kw)
    for workers, structure in ((2, "triton"), (5, "mosaic")):
        _check(lean(q, k_pool, v_pool, lengths, num_workers=workers, interpret=structure, poison_outputs=True, **kw),
               want)


def test_nan_in_q_is_not_hidden_and_bad_arguments_raise():
    """NaN in q gives NaN out; bad arguments raise naming them. Catches: a merge that zeroes NaN partials."""
    q, k, v = _inputs(1, None, 2, 2, 16, 32)
    out = lean(q.at[0, 1, 0].set(jnp.nan), k, v, jnp.array([20]), num_workers=2, page_size=16,
                                interpret=True)
    assert np.all(np.isnan(out[0, 1])) and np.all(np.isfinite(out[0, 0]))
    with pytest.raises(ValueError, match="lengths"):
        lean_decode_attention(q, k, v, jnp.array([40]), interpret=True)
    with pytest.raises((ValueError, TypeError), match="num_workers"):
        lean_decode_attention(q, k, v, jnp.array([4]), num_workers=0, interpret=True)
    with pytest.raises(TypeError, match="k_cache"):
        lean_decode_attention(q, k.astype(jnp.bfloat16), v, jnp.array([4]), interpret=True)


# ------------------------------------------------------------------------------------------ lowering

def _abstract_gpu():
    sharding = jax.sharding
    device = sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    return sharding.use_abstract_mesh(sharding.AbstractMesh((1,), ("x",), abstract_device=device))


def _export(fn, *args, platform):
    ctx = _abstract_gpu() if platform == "cuda" else contextlib.nullcontext()
    with ctx:
        return export.export(jax.jit(fn), platforms=[platform],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args).mlir_module()


@pytest.mark.parametrize("paged", [False, True])
def test_lowers_to_triton_and_mosaic(paged):
    """One trace exported for cuda holds the lean kernel's Triton call, for tpu its Mosaic call. Catches: a
    kernel that only runs interpreted (Triton/Mosaic-illegal blocks, primitives or index maps)."""
    B, H, Hkv, D = 3, 4, 2, 64
    q = jnp.ones((B, H, D))
    lengths = jnp.array([0, 100, 256])
    if paged:
        k = jnp.ones((Hkv, 10, 16, D))
        table = jnp.zeros((B, 16), jnp.int32)
        fn = lambda q, k, v, n, t: lean_decode_attention(q, k, v, n, page_table=t, num_workers=5)  # noqa: E731
        args = (q, k, k, lengths, table)
    else:
        k = jnp.ones((B, Hkv, 256, D))
        fn = lambda q, k, v, n: lean_decode_attention(q, k, v, n, num_workers=5, window=100, softcap=30.0)  # noqa: E731
        args = (q, k, k, lengths)
    text = _export(fn, *args, platform="cuda")
    assert text.count(TRITON) == 1 and 'jattn_lean_decode' in text
    text = _export(fn, *args, platform="tpu")
    assert text.count(MOSAIC) == 1 and 'jattn_lean_decode' in text
