"""The decode family's test base: one feature table, every impl checked against the dense fp32 oracle.

``check_against_reference(impl, case)`` compares out, lse and the q / k_cache / v_cache gradients of a
random-weighted loss. Mutations it catches (each tried by hand): the causal rule within the new tokens
(``kv <= p`` -> ``kv < p``), the window bound off by one, a wrong GQA head mapping in the row packing,
the length mask dropped on the last partial page, a split range that skips or repeats a tile, merging
splits by sum instead of the lse merge, sinks dropped, softcap dropped, a page table read in the wrong
order.

``kernel_grads`` cases also check the Pallas backward (``pallas_kernels.decode.decode_partials_grad``) on both
structures, with NaN-poisoned kernel outputs: the q / k_cache / v_cache / sinks gradients of a loss on out
(and on lse with ``lse_loss``) against the oracle's autodiff. Mutations of the backward it catches (each tried
by hand): a split's tile range off by one at either end, the length mask dropped on
the tail tile, a wrong GQA row -> head mapping, the lse cotangent dropped, ``.set`` instead of ``.add`` when
scattering into a page two sequences share (``fork``), the softcap's tanh chain dropped, the scale dropped
from dk, and dq taken from one split instead of summed over them.
"""
from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.ops import decode_xla
from jattn.ops.decode import decode_attention
from tests.conftest import assert_close, assert_traced_once

IMPLS = {"xla": dict(impl="xla"), "pallas": dict(impl="pallas", interpret=True),
         "mosaic": dict(impl="pallas", interpret="mosaic")}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    B: int = 2
    Tq: int = 1
    H: int = 4
    Hkv: int = 2
    D: int = 16
    S: int = 64
    lengths: tuple = (37, 64)
    paged: bool = False
    window: int | None = None
    softcap: float | None = None
    sinks: bool = False
    num_splits: int | None = 2
    squeeze_q: bool = False
    kernel_grads: bool = False   # also check the Pallas backward kernel's gradients (interpret is slow: few cases)
    mosaic: bool = False         # cases also run through the TPU structure (interpreted)
    fork: bool = False           # paged: the last sequence's first page is the previous one's (a forked prefix)
    lse_loss: bool = False       # the loss also weighs lse (its cotangent reaches the kernel's backward)
    stale: bool = False          # NaN / inf in the cache rows past each length (a recycled page)
    page_size: int | None = None  # the kernels' tile over a contiguous cache (default: 64 here, one tile)

    def __str__(self):
        return self.name


CASES = [
    Case("one token, ragged lengths incl. 0 and S_max", B=3, lengths=(0, 37, 64), squeeze_q=True, mosaic=True),
    Case("few tokens, causal among them, MQA", Tq=3, H=4, Hkv=1, lengths=(5, 50), kernel_grads=True),
    Case("GQA 3:1, odd length, window, 16-key tiles", Tq=2, H=6, Hkv=2, lengths=(33, 17), window=9, mosaic=True,
         kernel_grads=True, page_size=16),
    Case("paged, shuffled pool, forked page, sinks, lse loss, stale NaN, lengths 0 and S_max", B=3, Tq=2, H=4,
         Hkv=2, lengths=(0, 40, 64), paged=True, fork=True, sinks=True, lse_loss=True, stale=True, num_splits=3,
         mosaic=True, kernel_grads=True),
    Case("softcap, MHA, many splits", H=2, Hkv=2, lengths=(64, 1), softcap=3.0, num_splits=4, kernel_grads=True,
         page_size=16),
    Case("more new tokens than keys", Tq=4, lengths=(2, 16)),
]


def make_inputs(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
    q = normal(case.B, case.Tq, case.H, case.D)
    k, v = normal(case.B, case.Hkv, case.S, case.D), normal(case.B, case.Hkv, case.S, case.D)
    args = dict(lengths=jnp.asarray(case.lengths, jnp.int32), window=case.window, softcap=case.softcap,
                sinks=normal(case.H) if case.sinks else None)
    if case.stale:
        stale = (jnp.arange(case.S)[None, :] >= args["lengths"][:, None])[:, None, :, None]
        k, v = jnp.where(stale, jnp.nan, k), jnp.where(stale, jnp.inf, v)
    if case.paged:
        k, v, args["page_table"] = as_page_pool(k, v, page_size=16, seed=seed)
        if case.fork:   # sequence -1 reads sequence -2's first page (both lengths > 16: a full shared page)
            args["page_table"] = args["page_table"].at[-1, 0].set(args["page_table"][-2, 0])
    return (q[:, 0] if case.squeeze_q else q), k, v, args


def as_page_pool(k, v, *, page_size: int, seed: int):
    """The contiguous ``[B, Hkv, S, D]`` caches scattered into an ``[Hkv, pages, page_size, D]`` pool with
    spare pages (filled with +-7), the pages in a random order."""
    B, Hkv, S = k.shape[:3]
    per_seq = S // page_size
    num_pages = B * per_seq + 3
    order = np.random.default_rng(seed + 1).permutation(num_pages)[:B * per_seq].reshape(B, per_seq)

    def scatter(x, fill):
        pages = jnp.moveaxis(x.reshape(B, Hkv, per_seq, page_size, x.shape[-1]), 1, 0)
        pool = jnp.full((Hkv, num_pages, page_size, x.shape[-1]), fill, x.dtype)
        return pool.at[:, order.reshape(-1)].set(pages.reshape(Hkv, B * per_seq, page_size, x.shape[-1]))
    return scatter(k, 7.0), scatter(v, -7.0), jnp.asarray(order, jnp.int32)


def run(q, k, v, args, weights, grads=True, lse_weights=None, **impl):
    """out, lse and the q/k/v (and sinks) gradients of ``sum(weights * out)`` (``+ sum(lse_weights * lse)`` over
    the finite lse) (None without ``grads``)."""
    args = dict(args)
    sinks = args.pop("sinks", None)

    def loss(q, k, v, sinks):
        out, lse = decode_attention(q, k, v, return_lse=True, sinks=sinks, **args, **impl)
        total = jnp.sum(weights * out)
        if lse_weights is not None:
            total = total + jnp.sum(lse_weights * jnp.where(jnp.isfinite(lse), lse, 0.0))
        return total, (out, lse)
    if not grads:
        return (*jax.jit(loss)(q, k, v, sinks)[1], None)
    argnums = (0, 1, 2) if sinks is None else (0, 1, 2, 3)
    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(q, k, v, sinks)
    return out, lse, grads


def check_against_reference(impl: str, case: Case):
    q, k, v, args = make_inputs(case)
    rng = np.random.default_rng(9)
    weights = jnp.asarray(rng.standard_normal(q.shape[:-1] + (case.D,), np.float32))
    lse_weights = jnp.asarray(rng.standard_normal(q.shape[:-1], np.float32)) if case.lse_loss else None
    kwargs = (dict(IMPLS[impl], num_splits=case.num_splits, page_size=case.page_size, poison_outputs=True)
              if impl != "xla" else IMPLS[impl])
    with_grads = impl == "xla" or case.kernel_grads
    out, lse, grads = run(q, k, v, args, weights, grads=with_grads, lse_weights=lse_weights, **kwargs)
    want, want_lse, want_grads = run(q, k, v, args, weights, grads=with_grads, lse_weights=lse_weights,
                                     impl="reference")
    chex.assert_shape(out, q.shape)
    chex.assert_shape(lse, q.shape[:-1])
    assert_close(out, want, what=f"{impl} out")
    assert_close(lse, want_lse, what=f"{impl} lse")
    for name, g, wg in zip(("q", "k_cache", "v_cache", "sinks"), grads or (), want_grads or ()):
        if case.stale and name in ("k_cache", "v_cache"):
            assert np.isfinite(np.asarray(g)).all(), f"{impl} d{name}: stale NaN reached the gradient"
        assert_close(g, wg, factor=2, what=f"{impl} d{name}")
    return out


@pytest.mark.parametrize("impl, case", [(impl, case) for impl in IMPLS for case in CASES
                                        if impl != "mosaic" or case.mosaic], ids=str)
def test_every_impl_matches_the_reference(impl, case):
    check_against_reference(impl, case)


@pytest.mark.parametrize("case", [c for c in CASES if c.S % 16 == 0], ids=str)
def test_xla_path_in_key_chunks_matches_the_reference(case, monkeypatch):
    """The xla path cuts a long cache into ``KV_CHUNK``-key chunks, one GEMM each, merged by their lse (a CPU
    speed-up that only caches of 8K+ keys take). With 16-key chunks every table case has four: some past a
    length, some fully outside a window; sinks are folded in after the merge. Catches: the chunk merge by sum
    instead of lse, a chunk's mask columns taken from another chunk (the visibility swap dropped), the sinks
    dropped, chunks of the wrong length."""
    monkeypatch.setattr(decode_xla, "KV_CHUNK", 16)
    assert decode_xla._kv_chunks(case.S) == (case.S // 16, 16)
    check_against_reference("xla", case)


def test_reference_follows_the_decode_rule_on_a_hand_checked_row():
    """Token t of Tq sits at position length - Tq + t and sees exactly keys 0..that position (window: the
    last left + 1 of them); checked against a literal softmax over those keys."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, 2, 1, 8), np.float32))
    k = jnp.asarray(rng.standard_normal((1, 1, 16, 8), np.float32))
    v = jnp.asarray(rng.standard_normal((1, 1, 16, 8), np.float32))
    out = decode_attention(q, k, v, jnp.array([10]), window=3, impl="reference", scale=1.0)
    for t, position in ((0, 8), (1, 9)):
        keys = np.arange(position - 3, position + 1)
        logits = np.asarray(k[0, 0, keys]) @ np.asarray(q[0, t, 0])
        p = np.exp(logits - logits.max())
        np.testing.assert_allclose(out[0, t, 0], (p / p.sum()) @ np.asarray(v[0, 0, keys]), atol=1e-5)


def test_paged_and_contiguous_caches_give_identical_results():
    case = Case("paged", Tq=2, lengths=(40, 64))
    q, k, v, args = make_inputs(case)
    pool_k, pool_v, table = as_page_pool(k, v, page_size=16, seed=4)
    for impl in ("xla", "pallas"):
        contiguous = decode_attention(q, k, v, args["lengths"], **IMPLS[impl])
        paged = decode_attention(q, pool_k, pool_v, args["lengths"], page_table=table, **IMPLS[impl])
        assert_close(paged, contiguous, what=impl)


def test_split_count_does_not_change_the_result():
    q, k, v, args = make_inputs(Case("splits", Tq=2, lengths=(64, 23)))
    outs = [decode_attention(q, k, v, args["lengths"], page_size=16, num_splits=n, **IMPLS["pallas"])
            for n in (1, 3, 4)]
    for out in outs[1:]:
        assert_close(out, outs[0], what="splits")


def test_every_kernel_output_is_written():
    """NaN-poisoned partial buffers: every (split, row) the merge reads is written by the kernel."""
    q, k, v, args = make_inputs(CASES[0])
    for impl in ("pallas", "mosaic"):
        poisoned = decode_attention(q, k, v, args["lengths"], poison_outputs=True, num_splits=4, **IMPLS[impl])
        assert np.isfinite(np.asarray(poisoned)).all(), impl


def test_nan_in_gives_nan_out_in_that_row_only():
    q, k, v, args = make_inputs(Case("nan", B=2, Tq=1, lengths=(30, 64)))
    q = q.at[1, 0, 3].set(jnp.nan)
    for impl in IMPLS:
        out = np.asarray(decode_attention(q, k, v, args["lengths"], **IMPLS[impl]))
        assert np.isnan(out[1, 0, 3]).all() and np.isfinite(out[0]).all() and np.isfinite(out[1, 0, :3]).all(), impl


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_stale_non_finite_rows_past_the_lengths_are_never_read(paged):
    """NaN / inf in K and V past each length (a recycled page) leave out, lse and the gradients as with a clean
    cache, on every impl. Catches: the kernel's p @ V over an unzeroed tile (0 * NaN), the xla path's
    recompute dropped, its backward on the raw cache (NaN dq through ds @ K), the reference not zeroing."""
    case = Case("stale", B=2, Tq=2, H=4, Hkv=2, lengths=(21, 40), paged=paged)
    q, k, v, args = make_inputs(case)
    if paged:   # poison the rows no sequence reads: past each length in its own pages, and the spare pages
        live = np.zeros(k.shape[1:3], bool)
        for b, length in enumerate(case.lengths):
            for t, page in enumerate(np.asarray(args["page_table"][b])):
                live[page, :max(0, min(16, length - 16 * t))] = True
        stale = jnp.asarray(~live)[None, :, :, None]
    else:
        stale = (jnp.arange(case.S)[None, :] >= jnp.asarray(case.lengths)[:, None])[:, None, :, None]
    k_bad, v_bad = jnp.where(stale, jnp.nan, k), jnp.where(stale, jnp.inf, v)
    weights = jnp.asarray(np.random.default_rng(5).standard_normal((case.B, case.Tq, case.H, case.D), np.float32))
    for impl in ("xla", "pallas", "reference"):
        clean = run(q, k, v, args, weights, **IMPLS.get(impl, dict(impl=impl)))
        dirty = run(q, k_bad, v_bad, args, weights, **IMPLS.get(impl, dict(impl=impl)))
        for name, a, b in (("out", clean[0], dirty[0]), ("lse", clean[1], dirty[1]), ("dq", clean[2][0], dirty[2][0]),
                           ("dk", clean[2][1], dirty[2][1]), ("dv", clean[2][2], dirty[2][2])):
            assert np.isfinite(np.asarray(b)).all(), (impl, name)
            assert_close(b, a, what=f"{impl} {name}")


@pytest.mark.parametrize("transform", [jax.jit, lambda f: f], ids=["jit", "eager"])
def test_traced_and_eager_agree(transform):
    q, k, v, args = make_inputs(CASES[1])
    fn = functools.partial(decode_attention, impl="xla", window=4)
    assert_close(transform(fn)(q, k, v, args["lengths"]), jax.jit(fn)(q, k, v, args["lengths"]), what="eager")


def test_a_second_step_with_the_same_shapes_does_not_retrace():
    q, k, v, args = make_inputs(CASES[0])
    step = functools.partial(decode_attention, impl="pallas", interpret=True)
    assert_traced_once(step, (q, k, v, args["lengths"]), (q + 1, k, v, args["lengths"] - 1))


def test_traced_out_of_range_lengths_make_their_rows_nan():
    q, k, v, _ = make_inputs(CASES[0])
    out = jax.jit(lambda lengths: decode_attention(q, k, v, lengths, impl="xla"))(jnp.array([3, 65, -1]))
    out = np.asarray(out)
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all() and np.isnan(out[2]).all()


@pytest.mark.parametrize("bad, match", [
    (dict(lengths=np.array([3, 65])), "lengths must lie in"),
    (dict(lengths=np.array([-1, 3])), "lengths must lie in"),
    (dict(lengths=np.array([3, 4, 5])), "lengths must have shape"),
    (dict(lengths=np.array([3.0, 4.0])), "lengths must be an integer"),
    (dict(k_cache="bf16"), "k_cache must have q's dtype"),
    (dict(k_cache="short_head"), "k_cache's head dim"),
    (dict(q="5d"), "q must be"),
    (dict(k_cache="seq_major"), "k_cache must be \\[B=2, Hkv, S_max, D\\]"),
    (dict(page_table=np.array([[99, 1, 2, 3], [4, 5, 6, 7]])), "page_table\\[0\\] points outside"),
    (dict(page_table=np.array([0, 1])), "page_table must be"),
    (dict(window=-1), "window"),
    (dict(softcap=0.0), "softcap"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(page_size=24, impl="pallas"), "page_size"),
])
def test_bad_input_names_the_argument(bad, match):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 4, 16)), jnp.float32)
    k = v = jnp.asarray(rng.standard_normal((2, 2, 64, 16)), jnp.float32)
    args = dict(q=q, k_cache=k, v_cache=v, lengths=np.array([3, 64]))
    extra = {}
    for key, value in bad.items():
        if key == "k_cache":
            args[key] = {"bf16": lambda: k.astype(jnp.bfloat16), "short_head": lambda: k[..., :8],
                         "seq_major": lambda: jnp.ones((64, 2, 2, 16))}[value]()
            if value == "seq_major":
                args["v_cache"] = args[key]
        elif key == "q":
            args[key] = q[None, None]
        elif key == "page_table":
            args["k_cache"] = args["v_cache"] = jnp.asarray(rng.standard_normal((2, 8, 16, 16)), jnp.float32)
            extra[key] = jnp.asarray(value, jnp.int32)
        elif key == "lengths":
            args[key] = jnp.asarray(value)
        else:
            extra[key] = value
    with pytest.raises((ValueError, TypeError), match=match):
        decode_attention(args["q"], args["k_cache"], args["v_cache"], jnp.asarray(args["lengths"]), **extra)
