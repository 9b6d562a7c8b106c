"""block_sparse_attention == dense reference attention with the expanded mask (every impl, fwd + grads)."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jattn.core import masks
from jattn.core.block_mask import BlockMask
from jattn.core.reference import reference_attention
from jattn.ops.block_sparse import block_sparse_attention

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


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


CASES = [
    Case("mha_odd", 1, 33, 47, 1, 1, 16, 16, 16, empty_q_block=1),
    Case("mqa_causal_per_head", 2, 40, 40, 4, 1, 16, 16, 16, Hm=4, causal=True, density=0.7),
    Case("gqa_rect_window_softcap", 1, 29, 64, 8, 4, 16, 32, 16, Bm=1, Hm=8,
         mask_fn=masks.sliding_window_mask(20, 9), softcap=5.0),
    Case("gqa62_sinks_dilated_empty", 2, 48, 35, 6, 2, 16, 16, 16, Bm=2, empty_q_block=2, sinks=True,
         mask_fn=masks.dilated_mask(3, 1)),
]


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


# Module-level jitted runners (static flags) so repeated shapes re-use one compilation.
@functools.partial(jax.jit, static_argnames=("mask_fn", "causal", "softcap", "use_sinks", "impl"))
def sparse_run(q, k, v, sinks, d_out, d_lse, bm, *, mask_fn, causal, softcap, use_sinks, impl):
    def attend(q, k, v, s):
        return block_sparse_attention(q, k, v, bm, mask_fn=mask_fn, causal=causal, softcap=softcap,
                                      sinks=s if use_sinks else None, impl=impl, return_lse=True)
    return _value_and_grads(attend, q, k, v, sinks, d_out, d_lse)


@functools.partial(jax.jit, static_argnames=("causal", "softcap", "use_sinks"))
def dense_run(q, k, v, sinks, d_out, d_lse, mask, *, causal, softcap, use_sinks):
    def attend(q, k, v, s):
        return reference_attention(q, k, v, mask=mask, causal=causal, softcap=softcap,
                                   sinks=s if use_sinks else None, return_lse=True)
    return _value_and_grads(attend, q, k, v, sinks, d_out, d_lse)


def assert_close(actual, expected, tol, what):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, what
    np.testing.assert_array_equal(np.isfinite(actual), np.isfinite(expected), err_msg=what)
    finite = np.isfinite(expected)
    scale = max(1.0, float(np.abs(expected[finite]).max(initial=0.0)))
    err = float(np.abs(actual[finite] - expected[finite]).max(initial=0.0))
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


def check_case(case: Case, impl: str, dtype=jnp.float32, seed: int = 0):
    block_map, full_map = random_maps(case, seed)
    bm = BlockMask.from_dense_block_map(jnp.asarray(block_map), block_q=case.block_q, block_k=case.block_k,
                                        seq_q=case.T, seq_k=case.S, full_map=jnp.asarray(full_map))
    q, k, v, sinks, d_out, d_lse = random_inputs(case, dtype, seed + 1)
    mask = expected_mask(case, block_map, full_map)
    flags = dict(causal=case.causal, softcap=case.softcap, use_sinks=case.sinks)
    got = sparse_run(q, k, v, sinks, d_out, d_lse, bm, mask_fn=case.mask_fn, impl=impl, **flags)
    want = dense_run(q, k, v, sinks, d_out, d_lse, mask, **flags)
    tol = TOL[dtype]
    assert got[0].dtype == dtype and got[1].dtype == jnp.float32
    assert_close(got[0], want[0], tol, "out")
    assert_close(got[1], want[1], tol, "lse")
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got[2], want[2]):
        assert g.dtype == w.dtype and np.isfinite(np.asarray(g, np.float32)).all(), name
        assert_close(g, w, 2 * tol, name)
    if case.empty_q_block is not None:
        rows = slice(case.empty_q_block * case.block_q, (case.empty_q_block + 1) * case.block_q)
        np.testing.assert_array_equal(np.asarray(got[0][:, rows], np.float32), 0.0)
        expected_lse = np.broadcast_to(np.asarray(sinks), got[1][:, rows].shape) if case.sinks else -np.inf
        np.testing.assert_array_equal(np.asarray(got[1][:, rows]), expected_lse)
    return got


# ------------------------------------------------------------------------------------------ equivalence

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_matches_dense_reference(case, impl):
    check_case(case, impl)


def test_reference_impl_matches_independent_mask():
    check_case(CASES[3], "reference")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_bfloat16(impl):
    check_case(CASES[3], impl, dtype=jnp.bfloat16, seed=3)


@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_xla_random_block_maps(data):
    """Random maps, GQA groupings, odd lengths and (any, even non power of two) xla block sizes."""
    H, Hkv = data.draw(st.sampled_from([(1, 1), (4, 1), (8, 4), (6, 2)]))
    T, S, bq, bk = data.draw(st.sampled_from([(23, 41, 8, 16), (40, 24, 16, 8), (17, 17, 12, 5)]))
    case = Case("random", B=data.draw(st.sampled_from([1, 2])), T=T, S=S, H=H, Hkv=Hkv, D=8, block_q=bq,
                block_k=bk, Hm=data.draw(st.sampled_from([1, H])), density=data.draw(st.sampled_from([0.2, 0.6])),
                causal=data.draw(st.booleans()), mask_fn=data.draw(st.sampled_from([None, masks.dilated_mask(2)])),
                sinks=data.draw(st.booleans()))
    check_case(case, "xla", seed=data.draw(st.integers(0, 1000)))


def test_xla_is_deterministic():
    first = check_case(CASES[2], "xla", seed=5)
    second = check_case(CASES[2], "xla", seed=5)
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
    assert_close(got, want, 1e-5, "xla")


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
    assert_close(attend(q, k, v, indices), reference_attention(q, k, v, mask=jnp.asarray(mask)), 1e-5, "out")


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
