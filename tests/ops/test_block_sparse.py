"""The block-sparse family's test base: ``block_sparse_attention`` == dense reference attention with the
expanded mask, on every impl, forward and gradients.

One feature table (``CASES``: random tile and full maps, per-batch/per-head/shared BlockMasks, every GQA
grouping, odd lengths, T != S, causal, mask functions on partial tiles, softcap, sinks, q blocks that list
nothing, bfloat16) and one ``check_against_reference(impl, case)``: out, lse and the gradients of q, k, v
and sinks against the dense fp32 reference with the element mask built independently of ``BlockMask``
(``expected_mask``), run for every impl:

* ``"xla"``: ``block_sparse_attention(impl="xla")``: the forward row by row over each q tile's listed tiles,
  the backward over the flat work list of listed tiles;
* ``"pallas"``: ``block_sparse_attention(impl="pallas")``, the kernel's GPU (Triton) structure in the
  interpreter;
* ``"mosaic"``: the kernel's TPU (Mosaic, scalar-prefetch) structure in the interpreter
  (``pallas_kernels.block_sparse.block_sparse_attention_pallas(interpret="mosaic")``, NaN-poisoned outputs,
  sinks merged as the op does).

The xla path's own structure (ragged work lists, any block size) and the ``BlockMask`` contract follow;
kernel-only checks live in ``tests/kernels/test_block_sparse.py``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jattn.core import masks
from jattn.core.block_mask import BlockMask
from jattn.core.reference import reference_attention
from jattn.core.softmax import merge_sinks
from jattn.ops.attention import attention
from jattn.ops.block_sparse import block_sparse_attention
from pallas_kernels.block_sparse import block_sparse_attention_pallas
from tests.conftest import GROUPINGS, assert_close, assert_traced_once


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    B: int
    T: int
    S: int
    H: int
    Hkv: int
    D: int
    block_q: int
    block_k: int
    Bm: int = 1
    Hm: int = 1
    density: float = 0.5
    empty_q_block: Optional[int] = None     # this q block lists no tile (fully masked rows)
    mask_fn: Optional[Callable] = None
    causal: bool = False
    softcap: Optional[float] = None
    sinks: bool = False
    dtype: Any = jnp.float32
    seed: int = 0


CASES = [
    Case("mha_odd", 1, 33, 47, 1, 1, 16, 16, 16, empty_q_block=1),
    Case("mqa_causal_per_head", 2, 40, 40, 4, 1, 16, 16, 16, Hm=4, causal=True, density=0.7),
    Case("gqa_rect_window_softcap", 1, 29, 64, 8, 4, 16, 32, 16, Bm=1, Hm=8,
         mask_fn=masks.sliding_window_mask(20, 9), softcap=5.0),
    Case("gqa62_sinks_dilated_empty", 2, 48, 35, 6, 2, 16, 16, 16, Bm=2, empty_q_block=2, sinks=True,
         mask_fn=masks.dilated_mask(3, 1)),
    Case("bf16_gqa62_sinks_dilated_empty", 2, 48, 35, 6, 2, 16, 16, 16, Bm=2, empty_q_block=2, sinks=True,
         mask_fn=masks.dilated_mask(3, 1), dtype=jnp.bfloat16, seed=3),
]
IMPLS = ("xla", "pallas", "mosaic")


def random_maps(case: Case, seed: int):
    """Random tile map and full map (numpy), with every row non-empty unless it is the empty block."""
    nQ, nK = math.ceil(case.T / case.block_q), math.ceil(case.S / case.block_k)
    rng = np.random.default_rng(seed)
    block_map = rng.random((case.Bm, case.Hm, nQ, nK)) < case.density
    block_map[..., rng.integers(0, nK)] = True
    if case.empty_q_block is not None:
        block_map[..., case.empty_q_block, :] = False
    full_map = rng.random(block_map.shape) < 0.5
    return block_map, full_map


def expected_mask(case: Case, block_map, full_map):
    """Element mask built independently of BlockMask: tile AND (full-and-inside OR mask_fn)."""
    bq, bk, T, S = case.block_q, case.block_k, case.T, case.S
    nQ, nK = block_map.shape[-2:]
    inside = ((np.arange(1, nQ + 1) * bq <= T)[:, None]) & ((np.arange(1, nK + 1) * bk <= S)[None, :])
    expand = lambda m: np.repeat(np.repeat(m, bq, -2), bk, -1)[..., :T, :S]
    listed = np.broadcast_to(expand(block_map), (case.B, case.H, T, S))
    full = np.broadcast_to(expand(block_map & full_map & inside), (case.B, case.H, T, S))
    chosen = np.ones((case.B, case.H, T, S), bool)
    if case.mask_fn is not None:
        chosen = np.asarray(masks.materialize(case.mask_fn, case.B, case.H, T, S))
    return jnp.asarray(listed & (full | chosen))


def random_inputs(case: Case, dtype, seed: int):
    """Fresh normal inputs (NumPy: no per-shape compile of a JAX RNG) and random output cotangents."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    q = normal(case.B, case.T, case.H, case.D).astype(dtype)
    k = normal(case.B, case.S, case.Hkv, case.D).astype(dtype)
    v = normal(case.B, case.S, case.Hkv, case.D).astype(dtype)
    return q, k, v, normal(case.H), normal(*q.shape), normal(case.B, case.T, case.H)


def _value_and_grads(attend, q, k, v, sinks, d_out, d_lse):
    """(out, lse) and the gradients of <out, d_out> + <lse, d_lse> (lse -inf entries excluded)."""
    def loss(q, k, v, sinks):
        out, lse = attend(q, k, v, sinks)
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(finite_lse * d_lse), (out, lse)
    (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, sinks)
    return out, lse, grads


def _mosaic(q, k, v, bm, *, mask_fn, causal, softcap, sinks):
    """The kernel's TPU structure in the interpreter, NaN-poisoned, with the op's glue (mask_fn resolution,
    sinks merged after the kernel)."""
    out, lse = block_sparse_attention_pallas(
        q, k, v, bm.kv_indices, bm.kv_counts, bm.kv_full, bm.q_indices, bm.q_counts, bm.q_full,
        block_q=bm.block_q, block_k=bm.block_k, scale=q.shape[-1] ** -0.5, softcap=softcap, causal=causal,
        mask_fn=bm.resolve_mask_fn(mask_fn), out_dtype=jnp.float32 if sinks is not None else q.dtype,
        interpret="mosaic", poison_outputs=True)
    if sinks is not None:
        out, lse = merge_sinks(out, lse, sinks)
    return out.astype(q.dtype), lse


# Module-level jitted runners (static flags) so repeated shapes re-use one compilation.
@functools.partial(jax.jit, static_argnames=("mask_fn", "causal", "softcap", "use_sinks", "impl"))
def sparse_run(q, k, v, sinks, d_out, d_lse, bm, *, mask_fn, causal, softcap, use_sinks, impl):
    def attend(q, k, v, s):
        flags = dict(mask_fn=mask_fn, causal=causal, softcap=softcap, sinks=s if use_sinks else None)
        if impl == "mosaic":
            return _mosaic(q, k, v, bm, **flags)
        return block_sparse_attention(q, k, v, bm, impl=impl, return_lse=True, **flags)
    return _value_and_grads(attend, q, k, v, sinks, d_out, d_lse)


@functools.partial(jax.jit, static_argnames=("causal", "softcap", "use_sinks"))
def dense_run(q, k, v, sinks, d_out, d_lse, mask, *, causal, softcap, use_sinks):
    def attend(q, k, v, s):
        return reference_attention(q, k, v, mask=mask, causal=causal, softcap=softcap,
                                   sinks=s if use_sinks else None, return_lse=True)
    return _value_and_grads(attend, q, k, v, sinks, d_out, d_lse)


def check_against_reference(impl: str, case: Case, seed: Optional[int] = None, maps=None):
    """``impl`` equals the dense fp32 reference under ``expected_mask``: out, lse, dq, dk, dv, dsinks (the
    gradients of a random linear loss of out and lse), and rows of an empty q block are 0 with lse -inf (or
    the sink). Returns ``impl``'s ``(out, lse, grads)``."""
    seed = case.seed if seed is None else seed
    dtype = case.dtype
    block_map, full_map = random_maps(case, seed) if maps is None else maps
    # Partial tiles are fully visible unless the case's mask_fn (passed to the call) refines them.
    bm = BlockMask.from_dense_block_map(jnp.asarray(block_map), block_q=case.block_q, block_k=case.block_k,
                                        seq_q=case.T, seq_k=case.S, full_map=jnp.asarray(full_map),
                                        partial_tiles="visible")
    q, k, v, sinks, d_out, d_lse = random_inputs(case, dtype, seed + 1)
    mask = expected_mask(case, block_map, full_map)
    flags = dict(causal=case.causal, softcap=case.softcap, use_sinks=case.sinks)
    got = sparse_run(q, k, v, sinks, d_out, d_lse, bm, mask_fn=case.mask_fn, impl=impl, **flags)
    want = dense_run(q, k, v, sinks, d_out, d_lse, mask, **flags)
    assert got[0].dtype == dtype and got[1].dtype == jnp.float32
    chex.assert_shape(got[0], (case.B, case.T, case.H, case.D))
    chex.assert_shape(got[1], (case.B, case.T, case.H))
    assert_close(got[0], want[0], dtype, what=f"{impl} out")
    assert_close(got[1], want[1], dtype, what=f"{impl} lse")
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got[2], want[2]):
        assert g.dtype == w.dtype and np.isfinite(np.asarray(g, np.float32)).all(), name
        assert_close(g, w, dtype, factor=2, what=f"{impl} {name}")
    if case.empty_q_block is not None:
        rows = slice(case.empty_q_block * case.block_q, (case.empty_q_block + 1) * case.block_q)
        np.testing.assert_array_equal(np.asarray(got[0][:, rows], np.float32), 0.0)
        expected_lse = np.broadcast_to(np.asarray(sinks), got[1][:, rows].shape) if case.sinks else -np.inf
        np.testing.assert_array_equal(np.asarray(got[1][:, rows]), expected_lse)
    return got


# ------------------------------------------------------------------------------------------ the base

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_dense_reference(case, impl):
    check_against_reference(impl, case)


def test_reference_impl_matches_independent_mask():
    check_against_reference("reference", CASES[3])


@pytest.mark.parametrize("transform", [jax.jit, lambda f: f], ids=["jit", "eager"])
def test_traced_and_eager_agree(transform):
    """One tiny case under jax.jit and op by op: the same result as the jitted dense reference."""
    case = CASES[1]
    block_map, full_map = random_maps(case, 0)
    bm = BlockMask.from_dense_block_map(jnp.asarray(block_map), block_q=16, block_k=16, seq_q=case.T, seq_k=case.S,
                                        full_map=jnp.asarray(full_map), partial_tiles="visible")
    q, k, v = random_inputs(case, jnp.float32, 1)[:3]
    out, lse = transform(lambda q, k, v: block_sparse_attention(q, k, v, bm, causal=True, impl="xla",
                                                                return_lse=True))(q, k, v)
    mask = expected_mask(case, block_map, full_map)
    want_out, want_lse = jax.jit(lambda q, k, v: reference_attention(q, k, v, mask=mask, causal=True,
                                                                     return_lse=True))(q, k, v)
    assert_close(out, want_out, what="out")
    assert_close(lse, want_lse, what="lse")


def test_second_call_with_the_same_shapes_does_not_retrace():
    """Fresh inputs and a fresh BlockMask (same shapes and mask function): one trace."""
    case = CASES[2]
    calls = []
    for seed in (1, 2):
        block_map, full_map = random_maps(case, seed)
        bm = BlockMask.from_dense_block_map(jnp.asarray(block_map), block_q=case.block_q, block_k=case.block_k,
                                            seq_q=case.T, seq_k=case.S, full_map=jnp.asarray(full_map),
                                            partial_tiles="visible")
        calls.append((*random_inputs(case, jnp.float32, seed)[:3], bm))
    fn = lambda q, k, v, bm: block_sparse_attention(q, k, v, bm, mask_fn=case.mask_fn, softcap=5.0,  # noqa: E731
                                                    impl="xla")
    first, second = assert_traced_once(fn, *calls)
    assert not np.array_equal(np.asarray(first), np.asarray(second))


# ------------------------------------------------------------------------------------------ xla path

@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_xla_random_block_maps(data):
    """Random maps, GQA groupings, odd lengths and (any, even non power of two) xla block sizes."""
    H, Hkv = data.draw(st.sampled_from(GROUPINGS))
    T, S, bq, bk = data.draw(st.sampled_from([(23, 41, 8, 16), (40, 24, 16, 8), (17, 17, 12, 5)]))
    case = Case("random", B=data.draw(st.sampled_from([1, 2])), T=T, S=S, H=H, Hkv=Hkv, D=8, block_q=bq,
                block_k=bk, Hm=data.draw(st.sampled_from([1, H])), density=data.draw(st.sampled_from([0.2, 0.6])),
                causal=data.draw(st.booleans()), mask_fn=data.draw(st.sampled_from([None, masks.dilated_mask(2)])),
                sinks=data.draw(st.booleans()))
    check_against_reference("xla", case, seed=data.draw(st.integers(0, 1000)))


def test_xla_is_deterministic():
    first = check_against_reference("xla", CASES[2], seed=5)
    second = check_against_reference("xla", CASES[2], seed=5)
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mask_fn_block_mask_equals_masked_dense_attention():
    """from_mask_fn(causal) + the same mask_fn == dense causal attention (the FlexAttention contract)."""
    T, H, D = 45, 2, 16
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal((1, T, H, D), np.float32)) for _ in range(3))
    mask_fn = masks.causal_mask()
    bm = BlockMask.from_mask_fn(mask_fn, 1, 1, T, T, 16, 16)
    want = reference_attention(q, k, v, causal=True)
    got = jax.jit(lambda q, k, v, bm: block_sparse_attention(q, k, v, bm, mask_fn=mask_fn, impl="xla"))(q, k, v, bm)
    assert_close(got, want, what="xla")


def test_topk_block_mask_built_under_jit():
    T, S, H, D, bq, bk = 32, 64, 2, 8, 16, 16
    rng = np.random.default_rng(8)
    q = jnp.asarray(rng.standard_normal((1, T, H, D), np.float32))
    k, v = (jnp.asarray(rng.standard_normal((1, S, H, D), np.float32)) for _ in range(2))
    indices = jnp.array([[[[3, 0], [1, -1]], [[2, 2], [0, 1]]]], jnp.int32)        # [1, H, nQ, 2]

    @jax.jit
    def attend(q, k, v, indices):
        bm = BlockMask.from_topk_indices(indices, block_q=bq, block_k=bk, seq_q=T, seq_k=S)
        return block_sparse_attention(q, k, v, bm, impl="xla")

    block_map = np.zeros((1, H, 2, 4), bool)
    for h, rows in enumerate([[[3, 0], [1]], [[2], [0, 1]]]):
        for r, cols in enumerate(rows):
            block_map[0, h, r, cols] = True
    mask = np.repeat(np.repeat(block_map, bq, -2), bk, -1)
    assert_close(attend(q, k, v, indices), reference_attention(q, k, v, mask=jnp.asarray(mask)), what="out")


# ------------------------------------------------------------------------------ xla: ragged work lists

def ragged_maps(case: Case, seed: int):
    """Random maps whose rows range from 0 tiles to every tile (per head and batch where Bm, Hm > 1)."""
    block_map, full_map = random_maps(case, seed)
    nQ = block_map.shape[2]
    block_map[..., 0, :] = False                                  # an empty row
    block_map[..., nQ - 1, :] = True                              # a row with every tile
    if nQ > 3:
        block_map[..., 1, :] = False
        block_map[..., 1, -1] = True                              # a row with only the (tail) last tile
    return block_map, full_map


RAGGED = [
    Case("mha_ragged_odd", 1, 53, 71, 1, 1, 8, 8, 16, density=0.3),
    Case("gqa42_ragged_causal", 2, 45, 45, 4, 2, 16, 8, 8, Hm=4, causal=True, density=0.4),
    Case("gqa62_ragged_window_softcap", 1, 37, 50, 6, 2, 8, 8, 8, Bm=1, Hm=6, density=0.5,
         mask_fn=masks.sliding_window_mask(11, 4), softcap=4.0),
    Case("gqa62_batch_head_shared_sinks", 3, 40, 33, 6, 2, 16, 16, 8, density=0.4, sinks=True,
         mask_fn=masks.dilated_mask(2)),
    Case("gqa42_per_batch_causal_dilated", 2, 31, 31, 4, 2, 8, 8, 8, Bm=2, Hm=1, causal=True,
         mask_fn=masks.dilated_mask(3, 1), density=0.6),
    Case("row_fully_masked_inside_listed_tile", 1, 24, 24, 2, 1, 8, 8, 8, density=0.8,
         mask_fn=lambda b, h, i, j: (i != 5) & (i != 17)),
    # rows of up to 25 and 15 tiles: the forward's online softmax across several chunks of ROW_CHUNK tiles
    Case("gqa42_long_rows", 1, 40, 197, 4, 2, 8, 8, 8, Hm=4, density=0.7, seed=5),
    Case("mha_long_rows_causal_softcap", 1, 120, 120, 1, 1, 8, 8, 8, density=0.9, causal=True, softcap=3.0),
]


@pytest.mark.parametrize("case", RAGGED, ids=lambda c: c.name)
def test_xla_ragged_rows_match_reference(case):
    """Rows of 0 and of every tile, GQA (4, 2) and (6, 2), odd lengths, shared and per-(b, h) masks: the
    flat work list gives out, lse, dq, dk, dv (and dsinks) of the reference at f32 tolerance."""
    maps = ragged_maps(case, seed=11)
    got = check_against_reference("xla", case, seed=0, maps=maps)
    first_rows = slice(0, case.block_q)                            # the empty row: 0 and lse -inf (or the sink)
    np.testing.assert_array_equal(np.asarray(got[0][:, first_rows]), 0.0)
    if not case.sinks:
        assert np.isneginf(np.asarray(got[1][:, first_rows])).all()


def test_xla_matches_reference_impl_on_ragged_maps():
    """Against impl="reference" itself (same BlockMask, same call): f32 1e-5, grads 2e-5."""
    case = RAGGED[2]
    block_map, full_map = ragged_maps(case, seed=3)
    bm = BlockMask.from_dense_block_map(jnp.asarray(block_map), full_map=jnp.asarray(full_map),
                                        block_q=case.block_q, block_k=case.block_k, seq_q=case.T, seq_k=case.S,
                                        mask_fn=case.mask_fn)
    q, k, v, sinks, d_out, d_lse = random_inputs(case, jnp.float32, 4)
    flags = dict(mask_fn=None, causal=True, softcap=case.softcap, use_sinks=False)
    got = sparse_run(q, k, v, sinks, d_out, d_lse, bm, impl="xla", **flags)
    want = sparse_run(q, k, v, sinks, d_out, d_lse, bm, impl="reference", **flags)
    assert_close(got[0], want[0], what="out")
    assert_close(got[1], want[1], what="lse")
    for name, g, w in zip(("dq", "dk", "dv"), got[2][:3], want[2][:3]):
        assert_close(g, w, factor=2, what=name)


def _nan_case_inputs():
    B, T, H, Hkv, D, blk = 1, 40, 4, 2, 8, 8
    rng = np.random.default_rng(21)
    q = rng.standard_normal((B, T, H, D)).astype(np.float32)
    k = rng.standard_normal((B, T, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((B, T, Hkv, D)).astype(np.float32)
    block_map = rng.random((1, 1, 5, 5)) < 0.6
    block_map[..., 2] = False                                      # kv block 2 is listed by no row
    block_map[:, :, :, 0] = True
    bm = BlockMask.from_dense_block_map(jnp.asarray(block_map), block_q=blk, block_k=blk, seq_q=T, seq_k=T)
    return q, k, v, bm


@pytest.mark.parametrize("causal", [False, True])
def test_xla_nan_in_an_unlisted_tile_leaves_the_output_exact(causal):
    q, k, v, bm = _nan_case_inputs()
    k_nan, v_nan = k.copy(), v.copy()
    k_nan[:, 16:24] = np.nan
    v_nan[:, 16:24] = np.nan
    run = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, bm, causal=causal, impl="xla", return_lse=True))
    loss = jax.jit(jax.grad(lambda q, k, v: jnp.sum(block_sparse_attention(q, k, v, bm, causal=causal,
                                                                          impl="xla") ** 2), argnums=(0, 1, 2)))
    clean, poisoned = run(q, k, v), run(q, k_nan, v_nan)
    want = block_sparse_attention(q, k, v, bm, causal=causal, impl="reference", return_lse=True)
    for got, ref, what in zip(poisoned, want, ("out", "lse")):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(clean[0 if what == "out" else 1]))
        assert_close(got, ref, what=what)
    g_clean, g_poisoned = loss(q, k, v), loss(q, k_nan, v_nan)
    np.testing.assert_array_equal(np.asarray(g_poisoned[0]), np.asarray(g_clean[0]))           # dq exact
    for g, c in zip(g_poisoned[1:], g_clean[1:]):                  # dk, dv: exact outside the poisoned tile
        np.testing.assert_array_equal(np.asarray(g)[:, :16], np.asarray(c)[:, :16])
        np.testing.assert_array_equal(np.asarray(g)[:, 24:], np.asarray(c)[:, 24:])


def test_xla_forward_never_reads_the_tables_padding():
    """Rows of 1 to 3 tiles in a table padded with tile 0, which no row lists and which holds NaN: the forward
    (its row chunks run past a row's count) gives the clean output. Catches: slots past a row's count
    gathering the table's padding (0 * NaN in ``p @ v``)."""
    B, T, H, D, blk = 1, 32, 2, 8, 8
    rng = np.random.default_rng(22)
    q, k, v = (rng.standard_normal((B, T, H, D)).astype(np.float32) for _ in range(3))
    block_map = np.zeros((1, 1, 4, 4), bool)
    block_map[0, 0, 0, 1] = block_map[0, 0, 1, 1:3] = block_map[0, 0, 2:, 1:] = True
    bm = BlockMask.from_dense_block_map(jnp.asarray(block_map), block_q=blk, block_k=blk, seq_q=T, seq_k=T)
    indices = np.asarray(bm.kv_indices).copy()                     # slots past a count are free: pad with 0
    indices[np.arange(indices.shape[-1]) >= np.asarray(bm.kv_counts)[..., None]] = 0
    leaves, tree = jax.tree_util.tree_flatten(bm)
    bm = jax.tree_util.tree_unflatten(tree, [jnp.asarray(indices), *leaves[1:]])
    k_nan, v_nan = k.copy(), v.copy()
    k_nan[:, :blk], v_nan[:, :blk] = np.nan, np.nan
    run = jax.jit(lambda k, v: block_sparse_attention(q, k, v, bm, impl="xla"))
    np.testing.assert_array_equal(np.asarray(run(k_nan, v_nan)), np.asarray(run(k, v)))
    assert_close(run(k, v), block_sparse_attention(q, k, v, bm, impl="reference"), what="out")


def test_xla_nan_in_a_visible_logit_gives_nan_in_that_row_only():
    q, k, v, bm = _nan_case_inputs()
    q_nan = q.copy()
    q_nan[0, 13, 1] = np.nan                                       # row 13, head 1: every key of block 0 sees it
    run = jax.jit(lambda q: block_sparse_attention(q, k, v, bm, impl="xla", return_lse=True))
    (out, lse), (clean_out, clean_lse) = run(q_nan), run(q)
    out, lse, clean_out, clean_lse = (np.asarray(x) for x in (out, lse, clean_out, clean_lse))
    assert np.isnan(out[0, 13, 1]).all() and np.isnan(lse[0, 13, 1])
    hit = np.zeros(out.shape[:3], bool)
    hit[0, 13, 1] = True
    np.testing.assert_array_equal(out[~hit], clean_out[~hit])     # every other (row, head) bit-exact
    np.testing.assert_array_equal(lse[~hit], clean_lse[~hit])
    ref = np.asarray(block_sparse_attention(jnp.asarray(q_nan), k, v, bm, impl="reference"))
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))


def test_xla_cost_follows_listed_tiles_not_the_widest_row():
    """One full row among empty ones: the work list holds exactly the listed tiles (no per-row padding)."""
    from jattn.ops.block_sparse_xla import SparseConfig, work_lists
    nQ = nK = 16
    block_map = np.zeros((1, 2, nQ, nK), bool)
    block_map[0, 0, 3] = True                                      # one row of 16 tiles
    block_map[0, 1, :, 5] = True                                   # 16 rows of 1 tile
    bm = BlockMask.from_dense_block_map(jnp.asarray(block_map), block_q=16, block_k=16, seq_q=256, seq_k=256)
    cfg = SparseConfig(seq_q=256, seq_k=256, block_q=16, block_k=16, scale=1.0, softcap=None, causal=False,
                       mask_fn=None)
    (clean, masked), _ = work_lists(cfg, (bm.kv_indices, bm.kv_counts, bm.kv_full), 1, 2, 2, nQ, nK)
    assert masked is None and int(clean["count"]) == 32 == block_map.sum()
    rows = np.asarray(clean["row"])[:32]
    assert np.all(np.diff(rows) >= 0)                              # row order: one segment per q block


# ------------------------------------------------------------------------------ BlockMask carries its mask

@pytest.mark.parametrize("impl", ["xla", "reference", "pallas"])
def test_block_mask_carries_its_mask_fn(impl):
    """The issue's reproduction: without mask_fn= the carried sliding window applies to partial tiles."""
    rng = np.random.default_rng(12)
    q = jnp.asarray(rng.standard_normal((1, 256, 2, 32), np.float32))
    bm = BlockMask.from_mask_fn(masks.sliding_window_mask(64), 1, 1, 256, 256, 64, 64)
    want = attention(q, q, q, causal=True, window=(64, 0))
    assert_close(block_sparse_attention(q, q, q, bm, impl=impl), want, what=impl)
    # passing the same mask again (a new closure over the same window) is fine
    assert_close(block_sparse_attention(q, q, q, bm, mask_fn=masks.sliding_window_mask(64), impl=impl), want,
                 what=impl)
    with pytest.raises(ValueError, match="mask_fn"):
        block_sparse_attention(q, q, q, bm, mask_fn=masks.sliding_window_mask(32), impl=impl)


def test_carried_mask_fn_survives_jit_vmap_and_tree_map():
    rng = np.random.default_rng(13)
    qs = jnp.asarray(rng.standard_normal((3, 1, 96, 2, 16), np.float32))
    mask_fn = masks.sliding_window_mask(20)
    bm = BlockMask.from_mask_fn(mask_fn, 1, 1, 96, 96, 32, 32)
    want = jnp.stack([attention(q, q, q, causal=True, window=(20, 0)) for q in qs])
    attend = lambda q, m: block_sparse_attention(q, q, q, m, impl="xla")
    assert_close(jax.jit(jax.vmap(attend, in_axes=(0, None)))(qs, bm), want, what="jit(vmap)")
    copied = jax.tree_util.tree_map(jnp.array, bm)
    assert copied.mask_fn is mask_fn
    assert_close(jax.jit(attend)(qs[0], copied), want[0], what="tree_map")
    g = jax.jit(jax.grad(lambda q, m: attend(q, m).sum()))(qs[0], bm)
    g_want = jax.grad(lambda q: attention(q, q, q, causal=True, window=(20, 0)).sum())(qs[0])
    assert_close(g, g_want, factor=2, what="grad")


def test_partial_tiles_without_a_mask_fn_raise():
    q = jnp.ones((1, 32, 2, 16))
    bm = BlockMask.from_dense_block_map(jnp.ones((1, 1, 2, 2), bool), full_map=jnp.eye(2, dtype=bool)[None, None],
                                        block_q=16, block_k=16, seq_q=32, seq_k=32)
    for impl in ("xla", "reference"):
        with pytest.raises(ValueError, match="mask_fn is needed"):
            block_sparse_attention(q, q, q, bm, impl=impl)
        out = block_sparse_attention(q, q, q, bm, mask_fn=masks.causal_mask(), impl=impl)   # told: fine
        assert_close(out, attention(q, q, q, causal=True), what=impl)


# ------------------------------------------------------------------------------------------ validation

def _args():
    q = jnp.ones((1, 32, 4, 16))
    kv = jnp.ones((1, 32, 2, 16))
    bm = BlockMask.from_dense_block_map(jnp.ones((1, 1, 2, 2), bool), block_q=16, block_k=16, seq_q=32, seq_k=32)
    return q, kv, bm


BAD_CALLS = [
    (lambda q, kv, bm: block_sparse_attention(q, kv, kv, "mask"), TypeError, "block_mask"),
    (lambda q, kv, bm: block_sparse_attention(q[:, :16], kv, kv, bm), ValueError, "seq"),
    (lambda q, kv, bm: block_sparse_attention(q, kv, kv, BlockMask.from_dense_block_map(
        jnp.ones((1, 3, 2, 2), bool), block_q=16, block_k=16, seq_q=32, seq_k=32)), ValueError, "head"),
    (lambda q, kv, bm: block_sparse_attention(q, kv, kv, BlockMask.from_dense_block_map(
        jnp.ones((2, 1, 2, 2), bool), block_q=16, block_k=16, seq_q=32, seq_k=32)), ValueError, "batch"),
    (lambda q, kv, bm: block_sparse_attention(q, kv, kv, bm, impl="cuda"), ValueError, "impl"),
    (lambda q, kv, bm: block_sparse_attention(q, kv, kv, bm, mask_fn="causal"), TypeError, "mask_fn"),
    (lambda q, kv, bm: block_sparse_attention(q, kv, kv, bm, causal=1), TypeError, "causal"),
    (lambda q, kv, bm: block_sparse_attention(q, kv, kv, bm, return_lse="yes"), TypeError, "return_lse"),
    (lambda q, kv, bm: block_sparse_attention(q, kv, kv, bm, scale=-1.0), ValueError, "scale"),
    (lambda q, kv, bm: block_sparse_attention(q, kv, kv, bm, softcap=0.0), ValueError, "softcap"),
    (lambda q, kv, bm: block_sparse_attention(q, kv, kv, bm, sinks=jnp.ones((3,))), ValueError, "sinks"),
    (lambda q, kv, bm: block_sparse_attention(q.astype(jnp.int32), kv, kv, bm), TypeError, "q"),
    (lambda q, kv, bm: block_sparse_attention(q, kv[..., :8], kv, bm), ValueError, "k"),
    (lambda q, kv, bm: block_sparse_attention(q, kv, kv, BlockMask.from_dense_block_map(
        jnp.ones((1, 1, 4, 4), bool), block_q=8, block_k=8, seq_q=32, seq_k=32), impl="pallas"),
     ValueError, "block_q"),
]


@pytest.mark.parametrize("call, error, word", BAD_CALLS)
def test_validation_errors_name_the_argument(call, error, word):
    with pytest.raises(error, match=word):
        call(*_args())
