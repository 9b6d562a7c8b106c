"""The softmax family's test base: ``jattn.attention`` on every impl against the fp32 reference.

One feature table (``CASES``: fresh random inputs, odd lengths, T != S, every GQA grouping, bias and mask
of every broadcast, causal, windows, segment ids, sinks, softcap, fully masked rows, bfloat16) and one
``check_against_reference(impl, case)``: forward, lse and the gradients of q, k, v (and of bias and sinks)
against ``impl="reference"``'s oracle (``jattn.ops.attention_reference``), run for every impl:

* ``"xla"``: ``attention(impl="xla")``, the pure-JAX path;
* ``"pallas"``: ``attention(impl="pallas")``, the flash kernel's GPU (Triton) structure in the interpreter;
* ``"mosaic"``: the kernel's TPU (Mosaic) structure in the interpreter (``pallas_kernels.attention.
  flash_attention(interpret="mosaic")``, NaN-poisoned outputs, sinks merged as ``jattn.attention`` does),
  with kv tiles legal on TPU.

``tests/kernels/test_attention.py`` adds the kernel-only checks (backward tile sizes, poisoning,
determinism, which kernels a gradient builds) through the ``"triton"`` runner defined here.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jattn.core.reference import reference_attention
from jattn.core.softmax import merge_sinks
from jattn.ops.attention import attention
from jattn.ops.attention_reference import attention_reference
from pallas_kernels import common
from pallas_kernels.attention import BlockSizes, flash_attention
from tests.conftest import GROUPINGS, assert_close, assert_close_to_scale, assert_traced_once, random_qkv


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the feature table. ``bias``/``mask`` name the dims of ``[B, H, T, S]`` they span (the
    others broadcast, e.g. ``"B..S"``); ``mask_rank=2`` passes a ``[T, S]`` mask."""
    name: str
    B: int
    T: int
    S: int
    H: int
    Hkv: int
    D: int
    block_q: int = 16
    block_k: int = 16
    bwd_blocks: Optional[tuple[int, int]] = None  # (block_q, block_k) of the kernel's dq and dk/dv passes
    causal: bool = False
    window: Optional[tuple[int, int]] = None
    softcap: Optional[float] = None
    bias: Optional[str] = None
    mask: Optional[str] = None
    mask_rank: int = 4
    mask_density: float = 0.5
    dead_row: Optional[int] = None                # a query row the mask hides completely
    sinks: bool = False
    segments: int = 0                             # number of (sorted) segment ids; 0: none
    dtype: Any = jnp.float32
    fully_masked: bool = False                    # the hand-built rows that see nothing (see `inputs`)
    seed: int = 0

    @property
    def key_sliced(self) -> bool:
        """Whether a bias, mask or segment ids vary over the keys (the kv tile is then a TPU lane dim)."""
        return bool((self.bias and "S" in self.bias) or (self.mask and "S" in self.mask) or self.segments
                    or self.fully_masked)


CASES = [
    Case("plain_mha_t_gt_s", 2, 45, 37, 1, 1, 16),
    Case("causal_gqa62", 2, 45, 37, 6, 2, 16, causal=True),
    Case("window_mqa41", 2, 45, 37, 4, 1, 16, window=(9, 4)),
    Case("causal_window_sinks_gqa84", 2, 45, 37, 8, 4, 16, causal=True, window=(20, 0), sinks=True),
    Case("bias_full_softcap_gqa62", 2, 45, 37, 6, 2, 16, bias="BHTS", softcap=3.0),
    Case("bias_key_padding_causal_mha", 2, 45, 37, 1, 1, 16, bias="B..S", causal=True),
    Case("causal_softcap_keybias_gqa41_t_lt_s", 1, 37, 45, 4, 1, 16, block_k=32, bwd_blocks=(32, 16),
         causal=True, softcap=2.0, bias="B..S"),
    Case("window_fullbias_gqa84_d24", 1, 20, 27, 8, 4, 24, window=(5, 3), bias="BHTS"),
    Case("mask_per_batch_sinks_dead_row_gqa62", 2, 33, 17, 6, 2, 16, block_q=32, mask="B.TS", mask_density=0.7,
         dead_row=5, sinks=True),
    Case("mask_per_head_and_bias_mha", 2, 45, 37, 1, 1, 16, mask=".HTS", bias=".HTS"),
    Case("segments_causal_broadcast_bias_d8", 2, 40, 40, 4, 2, 8, causal=True, bias=".H.S", segments=3),
    Case("rank2_mask_window_sinks_row_bias", 1, 26, 31, 4, 1, 16, causal=True, window=(4, 20), mask="..TS",
         mask_rank=2, mask_density=0.7, bias="B.T.", sinks=True),
    Case("fully_masked_rows_gqa42", 1, 35, 20, 4, 2, 16, window=(2, 20), fully_masked=True),
    Case("short_T1_S9_causal_sinks", 2, 1, 9, 4, 1, 16, causal=True, sinks=True),
    Case("short_T3_S1_causal_sinks", 2, 3, 1, 4, 1, 16, causal=True, sinks=True),
    Case("bf16_causal_window_sinks_gqa42", 1, 40, 40, 4, 2, 32, block_k=32, causal=True, window=(20, 0),
         sinks=True, dtype=jnp.bfloat16, seed=2),
    Case("bf16_bias_full_softcap_mha", 2, 33, 33, 1, 1, 16, bias="BHTS", softcap=3.0, dtype=jnp.bfloat16, seed=3),
]
CASE_IDS = [c.name for c in CASES]
BY_NAME = {c.name: c for c in CASES}
IMPLS = ("xla", "pallas", "mosaic")


def _spanned(spec: str, dims) -> tuple[int, ...]:
    return tuple(d if letter != "." else 1 for letter, d in zip(spec, dims))


def inputs(case: Case, seed: Optional[int] = None):
    """``(q, k, v, diff, arrays)``: ``diff`` = the differentiated extras (bias, sinks), ``arrays`` = the
    others (mask, segment ids) as keyword arguments of ``jattn.attention``. NumPy-drawn: no per-shape compile."""
    seed = case.seed if seed is None else seed
    rng = np.random.default_rng(seed)
    B, T, S, H, Hkv, D = case.B, case.T, case.S, case.H, case.Hkv, case.D
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    q, k, v = (jnp.asarray(normal(*s)).astype(case.dtype) for s in ((B, T, H, D), (B, S, Hkv, D), (B, S, Hkv, D)))
    diff, arrays = {}, {}
    if case.fully_masked:
        # Row 3 hidden by the mask, rows > S + 1 by the window (T > S), row 7's segment absent from the keys,
        # and a -inf bias hides the only key row 9 could see. The bias is a constant (no gradient).
        mask = np.ones((B, 1, T, S), bool)
        mask[:, :, 3, :] = False
        mask[:, :, 9, 1:] = False
        bias = np.zeros((1, 1, T, S), np.float32)
        bias[:, :, 9, 0] = -np.inf
        q_ids = np.zeros((B, T), np.int32)
        q_ids[:, 7] = 5
        arrays = dict(mask=jnp.asarray(mask), bias=jnp.asarray(bias),
                      segment_ids=(jnp.asarray(q_ids), jnp.zeros((B, S), jnp.int32)))
        return q, k, v, diff, arrays
    dims = (B, H, T, S)
    if case.bias is not None:
        diff["bias"] = jnp.asarray(normal(*_spanned(case.bias, dims))).astype(case.dtype)
    if case.sinks:
        diff["sinks"] = jnp.asarray(normal(H))
    if case.mask is not None:
        mask = rng.random(_spanned(case.mask, dims)) < case.mask_density
        if case.dead_row is not None:
            mask[..., case.dead_row, :] = False
        arrays["mask"] = jnp.asarray(mask.reshape(mask.shape[-case.mask_rank:]) if case.mask_rank < 4 else mask)
    if case.segments:
        arrays["segment_ids"] = tuple(jnp.asarray(np.sort(rng.integers(0, case.segments, (B, n)), axis=1), jnp.int32)
                                      for n in (T, S))
    return q, k, v, diff, arrays


def dead_rows(case: Case) -> np.ndarray:
    """The query rows that see no key (hand-built in ``inputs``)."""
    if case.fully_masked:
        return np.array([3, 7, 9] + list(range(case.S + 2, case.T)))
    return np.array([case.dead_row] if case.dead_row is not None else [], int)


# ------------------------------------------------------------------------------------------ the runners

def _kernel(case: Case, structure: str, q, k, v, *, bias=None, sinks=None, mask=None, segment_ids=None):
    """The flash kernel's entry point with ``structure`` in the interpreter, NaN-poisoned outputs, and the
    sinks merged after it exactly as ``jattn.attention(impl="pallas")`` does."""
    if structure == "mosaic":  # TPU: a kv tile that slices a bias/mask/segment block over keys is 128k or whole
        sizes = BlockSizes(block_q=case.block_q, block_k=None if case.key_sliced else case.block_k)
    else:
        bwd_q, bwd_k = case.bwd_blocks or (None, None)
        sizes = BlockSizes(case.block_q, case.block_k, bwd_q, bwd_k, bwd_q, bwd_k)
    q_ids, kv_ids = segment_ids if segment_ids is not None else (None, None)
    out, lse = flash_attention(q, k, v, bias=bias, mask=mask, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
                               causal=case.causal, window=case.window, scale=case.D ** -0.5, softcap=case.softcap,
                               block_sizes=sizes, interpret=structure, poison_outputs=True)
    if sinks is not None:
        out, lse = merge_sinks(out, lse, sinks)
        out = out.astype(q.dtype)
    return out, lse


def run(impl: str, case: Case, q, k, v, **kw):
    """``(out, lse)`` of one impl: "reference", "xla", "pallas" (public op), "triton" / "mosaic" (kernel)."""
    if impl in ("triton", "mosaic"):
        return _kernel(case, impl, q, k, v, **kw)
    flags = dict(causal=case.causal, window=case.window, softcap=case.softcap)
    if impl == "reference":
        return attention_reference(q, k, v, return_lse=True, **flags, **kw)
    return attention(q, k, v, impl=impl, block_q=case.block_q, block_k=case.block_k, return_lse=True, **flags, **kw)


@functools.lru_cache(maxsize=None)
def _grad_fn(impl: str, case: Case):
    """One compiled ``(grads, (out, lse))`` of a random linear loss of out and lse, per impl and case."""
    def loss(q, k, v, diff, arrays, weights):
        w_out, w_lse = weights
        out, lse = run(impl, case, q, k, v, **diff, **arrays)
        lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse
        return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(lse_term), (out, lse)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def value_and_grads(impl: str, case: Case, q, k, v, diff, arrays, weights):
    """``(out, lse, (dq, dk, dv, d{bias, sinks}))``."""
    grads, (out, lse) = _grad_fn(impl, case)(q, k, v, diff, arrays, weights)
    return out, lse, grads


def check_against_reference(impl: str, case: Case, seed: Optional[int] = None):
    """``impl`` equals the fp32 reference on ``case``: out, lse and the gradients of q, k, v, bias and sinks
    (strict tolerance: relative to the reference's scale, no NaN, identical infinities), plus the
    fully-masked-row rules. Returns ``impl``'s ``(out, lse, grads)``."""
    q, k, v, diff, arrays = inputs(case, seed)
    rng = np.random.default_rng(100 + case.seed if seed is None else 100 + seed)
    weights = (jnp.asarray(rng.standard_normal(q.shape), jnp.float32),
               jnp.asarray(rng.standard_normal(q.shape[:3]), jnp.float32))
    got = value_and_grads(impl, case, q, k, v, diff, arrays, weights)
    up = lambda x: jnp.asarray(x, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    want = value_and_grads("reference", case, up(q), up(k), up(v), jax.tree.map(up, diff),
                           jax.tree.map(up, arrays), weights)
    dtype = case.dtype
    assert got[0].dtype == q.dtype and got[1].dtype == jnp.float32
    chex.assert_shape(got[0], (case.B, case.T, case.H, case.D))
    chex.assert_shape(got[1], (case.B, case.T, case.H))
    assert_close_to_scale(got[0], want[0], dtype, what=f"{impl} out")
    assert_close_to_scale(got[1], want[1], dtype, what=f"{impl} lse")
    for name, g, w in zip(("dq", "dk", "dv"), got[2][:3], want[2][:3]):
        assert g.dtype == q.dtype, name
        assert_close_to_scale(g, w, dtype, factor=2, what=f"{impl} {name}")
    for name in diff:
        assert_close_to_scale(got[2][3][name], want[2][3][name], dtype, factor=2, what=f"{impl} d{name}")
    dead = dead_rows(case)
    if dead.size:
        out, lse = np.asarray(got[0], np.float32), np.asarray(got[1])
        assert np.all(out[:, dead] == 0.0)
        if case.sinks:      # a row with nothing visible but a sink: out 0, lse = the sink
            np.testing.assert_array_equal(lse[:, dead], np.broadcast_to(np.asarray(diff["sinks"]), lse[:, dead].shape))
        else:
            assert np.all(np.isneginf(lse[:, dead]))
            assert np.all(np.asarray(got[2][0], np.float32)[:, dead] == 0.0)
        assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in got[2][:3])
    return got


# ------------------------------------------------------------------------------------------ the base

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference(impl, case):
    check_against_reference(impl, case)


def test_every_grouping_and_feature_is_in_the_table():
    groupings = {(c.H, c.Hkv) for c in CASES}
    assert set(GROUPINGS) <= groupings
    for flag in ("causal", "window", "softcap", "bias", "mask", "sinks", "segments", "dead_row", "fully_masked",
                 "bwd_blocks"):
        assert any(getattr(c, flag) for c in CASES), flag
    assert any(c.T != c.S for c in CASES) and any(c.T % c.block_q and c.S % c.block_k for c in CASES)
    assert any(c.dtype == jnp.bfloat16 for c in CASES)


@pytest.mark.parametrize("transform", [jax.jit, lambda f: f], ids=["jit", "eager"])
def test_traced_and_eager_agree(transform):
    """One tiny case run under jax.jit and eagerly (op by op) gives the same result as the jitted reference."""
    case = BY_NAME["causal_window_sinks_gqa84"]
    q, k, v, diff, _ = inputs(case)
    fn = transform(lambda q, k, v, s: attention(q, k, v, causal=True, window=(20, 0), sinks=s, impl="xla",
                                                block_q=16, block_k=16, return_lse=True))
    out, lse = fn(q, k, v, diff["sinks"])
    ref_out, ref_lse = jax.jit(lambda q, k, v, s: reference_attention(q, k, v, causal=True, window=(20, 0), sinks=s,
                                                                      return_lse=True))(q, k, v, diff["sinks"])
    assert_close_to_scale(out, ref_out, what="out")
    assert_close_to_scale(lse, ref_lse, what="lse")


def test_second_call_with_the_same_shapes_does_not_retrace():
    case = BY_NAME["bias_full_softcap_gqa62"]
    calls = [inputs(case, seed)[:4] for seed in (1, 2)]
    fn = lambda q, k, v, diff: attention(q, k, v, **diff, softcap=3.0, impl="xla", block_q=16, block_k=16)  # noqa: E731
    first, second = assert_traced_once(fn, *calls)
    assert not np.array_equal(np.asarray(first), np.asarray(second))


# ------------------------------------------------------------------------------------------ xla path

@settings(max_examples=6)
@given(T=st.integers(1, 70), S=st.integers(1, 70), grouping=st.sampled_from(GROUPINGS),
       block_q=st.sampled_from([16, 32]), block_k=st.sampled_from([16, 64]), causal=st.booleans(),
       left=st.one_of(st.none(), st.integers(0, 40)), use_mask=st.booleans(), seed=st.integers(0, 999))
def test_xla_property_over_shapes_groupings_masks_and_blocks(T, S, grouping, block_q, block_k, causal, left,
                                                             use_mask, seed):
    H, Hkv = grouping
    q, k, v = random_qkv(seed, 1, T, S, H, Hkv, 16)
    static = {"causal": causal}
    if left is not None:
        static["window"] = (left, left // 2)
    if use_mask:
        static["mask"] = jax.random.bernoulli(jax.random.PRNGKey(seed + 1), 0.5, (1, 1, T, S))
    # Forward and lse only: gradients of every feature are covered by the table.
    out, lse = attention(q, k, v, impl="xla", return_lse=True, block_q=block_q, block_k=block_k, **static)
    ref_out, ref_lse = reference_attention(q, k, v, return_lse=True, **static)
    assert_close(out, ref_out, what="out")
    assert_close(lse, ref_lse, what="lse")


def test_fully_masked_rows_are_zero_with_minus_inf_lse_and_finite_grads():
    q, k, v = random_qkv(3, 2, 33, 33, 4, 2, 16)
    mask = jnp.ones((2, 1, 33, 33), bool).at[0, :, 5].set(False).at[1, :, 20:].set(False)
    out, lse = attention(q, k, v, mask=mask, impl="xla", return_lse=True, block_q=16, block_k=16)
    assert np.all(np.asarray(out[0, 5]) == 0) and np.all(np.asarray(out[1, 20:]) == 0)
    assert np.all(np.isneginf(np.asarray(lse[0, 5]))) and np.all(np.isneginf(np.asarray(lse[1, 20:])))
    assert not np.any(np.isnan(np.asarray(out)))
    grads = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, mask=mask, impl="xla", block_q=16,
                                                       block_k=16) ** 2), (0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    # A window that sees nothing: every row is empty.
    out = attention(q, k, v, causal=True, window=(0, 0), mask=jnp.zeros((1, 1, 1, 33), bool), impl="xla")
    assert np.all(np.asarray(out) == 0)


def test_xla_is_deterministic():
    case = dataclasses.replace(BY_NAME["causal_window_sinks_gqa84"], name="deterministic", B=1, T=50, S=50, H=4,
                               Hkv=2, window=None)
    first = check_against_reference("xla", case, seed=4)
    second = check_against_reference("xla", case, seed=4)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def brute_force_tiles(T, S, bq, bk, causal, window):
    i, j = np.meshgrid(np.arange(T), np.arange(S), indexing="ij")
    visible = np.ones((T, S), bool)
    if causal:
        visible &= j <= i
    if window is not None:
        visible &= (j >= i - window[0]) & (j <= i + window[1])
    nq, nk = -(-T // bq), -(-S // bk)
    padded = np.zeros((nq * bq, nk * bk), bool)
    padded[:T, :S] = visible
    real = np.zeros_like(padded)
    real[:T, :S] = True
    tiles = padded.reshape(nq, bq, nk, bk)
    real_tiles = real.reshape(nq, bq, nk, bk)
    any_visible = tiles.any(axis=(1, 3))
    # Full: every real query row sees every key of the tile and the tile has no padded keys.
    rows_real = real_tiles[:, :, 0, 0]
    full = np.array([[tiles[a, rows_real[a], b].all() and real_tiles[0, 0, b].all() for b in range(nk)]
                     for a in range(nq)])
    return any_visible, full


@given(T=st.integers(1, 90), S=st.integers(1, 90), bq=st.sampled_from([16, 32]), bk=st.sampled_from([16, 32]),
       causal=st.booleans(), window=st.one_of(st.none(), st.tuples(st.integers(0, 50), st.integers(0, 50))),
       extra_blocks=st.integers(0, 2))
def test_tile_ranges_skip_exactly_the_empty_tiles(T, S, bq, bk, causal, window, extra_blocks):
    """``common.tile_ranges`` (the xla path and the Pallas flash kernel, both sides); ``extra_blocks`` pads the
    block count the way the Pallas kernel does when its other block size is larger."""
    any_visible, full = brute_force_tiles(T, S, bq, bk, causal, window)
    geometry = dict(causal=causal, window=window, block_q=bq, block_k=bk, seq_q=T, seq_k=S)
    for over, visible, full_tiles in (("kv", any_visible, full), ("q", any_visible.T, full.T)):
        n_rows, n_real = visible.shape
        n_cols = n_real + extra_blocks
        for row in range(n_rows):
            ranges = common.tile_ranges(row, over=over, num_blocks=n_cols, **geometry)
            lo, full_lo, full_hi, hi = (int(x) for x in ranges)
            assert 0 <= lo <= full_lo <= full_hi <= hi <= n_cols, (over, row, ranges)
            visited = np.zeros(n_cols, bool)
            visited[lo:hi] = True
            assert np.array_equal(visited[:n_real], visible[row]) and not visited[n_real:].any(), (over, row, lo, hi)
            assert full_tiles[row, full_lo:full_hi].all(), (over, row, full_lo, full_hi)


@given(T=st.integers(1, 70), S=st.integers(1, 70), bq=st.sampled_from([16, 32]), bk=st.sampled_from([16, 32]),
       mask_b=st.booleans(), mask_h=st.booleans(), mask_t=st.booleans(), use_mask=st.booleans(),
       segments=st.booleans(), seed=st.integers(0, 999))
def test_visible_tiles_is_exact_for_masks_and_conservative_for_segments(T, S, bq, bk, mask_b, mask_h, mask_t,
                                                                       use_mask, segments, seed):
    """``common.visible_tiles`` (the xla path's and the flash kernel's tile table): a tile it reports empty
    holds no visible entry; for a mask alone it is exact, and so it is for sorted segment ids."""
    B, H = 2, 3
    rng = np.random.default_rng(seed)
    nq, nk = -(-T // bq), -(-S // bk)
    Tp, Sp = nq * bq, nk * bk
    visible = np.ones((B, H, Tp, Sp), bool)
    mask = q_ids = kv_ids = None
    if use_mask:
        shape = (B if mask_b else 1, H if mask_h else 1, T if mask_t else 1, S)
        m = rng.random(shape) < 0.05
        mask = np.zeros((*shape[:2], Tp if mask_t else 1, Sp), bool)
        mask[:, :, :shape[2], :S] = m
        visible &= mask
    if segments:
        q_ids = np.sort(rng.integers(0, 4, (B, T)), axis=1)
        kv_ids = np.sort(rng.integers(0, 4, (B, S)), axis=1)
        q_ids = np.pad(q_ids, ((0, 0), (0, Tp - T)), mode="edge")
        kv_ids = np.pad(kv_ids, ((0, 0), (0, Sp - S)), mode="edge")
        visible &= (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
    visible[:, :, T:] = False
    visible[:, :, :, S:] = False
    table = common.visible_tiles(None if mask is None else jnp.asarray(mask), None if q_ids is None else
                                 jnp.asarray(q_ids), None if kv_ids is None else jnp.asarray(kv_ids), block_q=bq,
                                 block_k=bk, num_q_blocks=nq, num_k_blocks=nk)
    if mask is None and q_ids is None:
        assert table is None
        return
    table = np.broadcast_to(np.asarray(table), (B, H, nq, nk))
    truth = visible.reshape(B, H, nq, bq, nk, bk).any(axis=(3, 5))
    assert not (truth & ~table).any(), "a tile with a visible entry was reported empty"
    if not segments:        # exact from the mask, also on padded rows and keys (they are False in the mask)
        padded_mask = np.broadcast_to(mask, (B, H, Tp, Sp)).reshape(B, H, nq, bq, nk, bk).any(axis=(3, 5))
        np.testing.assert_array_equal(table, padded_mask)


def test_auto_lowers_the_xla_path_on_cpu_and_reference_impl_is_the_reference():
    """"auto" is decided at lowering time: the CPU program holds no Pallas kernel (no interpreter loop)."""
    q, k, v = random_qkv(5, 1, 8, 8, 2, 1, 16)

    def lowered(impl):
        fn = jax.jit(lambda q, k, v: attention(q, k, v, causal=True, impl=impl))
        return fn.lower(q, k, v).as_text(debug_info=True)
    cpu_text, pallas_text = lowered("auto"), lowered("pallas")
    assert "jattn_flash" not in cpu_text and "flash_attention_xla" in cpu_text
    assert "jattn_flash" in pallas_text
    assert np.array_equal(np.asarray(attention(q, k, v, impl="reference", causal=True)),
                          np.asarray(reference_attention(q, k, v, causal=True)))


def test_jit_with_default_blocks_and_long_odd_length():
    q, k, v = random_qkv(6, 1, 700, 531, 4, 4, 32)
    out = jax.jit(lambda q, k, v: attention(q, k, v, causal=True, impl="xla"))(q, k, v)
    assert_close(out, reference_attention(q, k, v, causal=True))


def test_xla_with_one_query_and_one_key():
    """T = S = 1 (the table's short cases have T = 1 or S = 1): block 16 is what the default blocks fit to."""
    check_against_reference("xla", dataclasses.replace(BY_NAME["short_T1_S9_causal_sinks"], name="short_T1_S1", S=1))


# ------------------------------------------------------------------------------------------ validation

q0, k0, v0 = random_qkv(0, 2, 8, 6, 4, 2, 16)
BAD_CALLS = [
    (dict(q=q0[0]), ValueError, "q must have rank 4"),
    (dict(q=q0.astype(jnp.int32)), TypeError, "q must have a floating dtype"),
    (dict(k=k0[:1]), ValueError, "batch sizes differ"),
    (dict(k=k0[..., :8], v=v0[..., :8]), ValueError, "k must have head dim D=16"),
    (dict(v=v0[:, :5]), ValueError, "k and v must share"),
    (dict(k=jnp.concatenate([k0, k0, k0], 2), v=jnp.concatenate([v0, v0, v0], 2)), ValueError,
     "multiple of k/v heads"),
    (dict(window=(-1, 2)), ValueError, "window sizes must be >= 0"),
    (dict(window=(1, 2, 3)), TypeError, "window must be an int n"),
    (dict(mask=jnp.ones((2, 4, 8, 5), bool)), ValueError, "mask must be broadcastable"),
    (dict(mask=jnp.ones((2, 4, 8, 6))), TypeError, "mask must be a bool array"),
    (dict(bias=jnp.ones((3, 1, 8, 6))), ValueError, "bias must be broadcastable"),
    (dict(sinks=jnp.ones((3,))), ValueError, r"sinks must have shape \[H\]"),
    (dict(segment_ids=jnp.zeros((2, 8), jnp.int32)), ValueError, "needs T == S"),
    (dict(segment_ids=(jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 5), jnp.int32))), ValueError,
     r"segment_ids \(kv\) must have shape"),
    (dict(segment_ids=(jnp.zeros((2, 8)), jnp.zeros((2, 6)))), TypeError, "must be an integer array"),
    (dict(softcap=0.0), ValueError, "softcap must be a finite number > 0"),
    (dict(scale=-1.0), ValueError, "scale must be a finite number > 0"),
    (dict(impl="cuda"), ValueError, "impl must be one of"),
    (dict(block_q=24), ValueError, "block_q must be a power of two >= 16"),
    (dict(block_k=8), ValueError, "block_k must be a power of two >= 16"),
    (dict(block_k=16.0), TypeError, "block_k must be an int"),
]


@pytest.mark.parametrize("override,error,message", BAD_CALLS, ids=[c[2][:30] for c in BAD_CALLS])
@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_bad_arguments_raise_naming_the_argument(override, error, message, impl):
    args = dict(q=q0, k=k0, v=v0, impl=impl)
    args.update(override)
    if impl == "reference" and "block" in message:
        args["impl"] = "xla"
    with pytest.raises(error, match=message):
        attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
