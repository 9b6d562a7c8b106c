"""pallas_kernels.flash against the float32 reference: forward, lse and every gradient (interpret mode)."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jattn.core.reference import reference_attention
from jattn.core.softmax import merge_sinks
from pallas_kernels import common, flash
from pallas_kernels.flash import BlockSizes


def flash_attention(q, k, v, *, sinks=None, block_q=None, block_k=None, bwd_block_q=None, bwd_block_k=None,
                    interpret=True, **kw):
    """The kernel with sinks merged as jattn.attention does; one bwd tile pair for dq and dk/dv."""
    sizes = BlockSizes(block_q, block_k, bwd_block_q, bwd_block_k, bwd_block_q, bwd_block_k)
    out, lse = flash.flash_attention(q, k, v, block_sizes=sizes, interpret=interpret, **kw)
    if sinks is not None:
        out, lse = merge_sinks(out, lse, sinks)
        out = out.astype(q.dtype)
    return out, lse

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
GROUPINGS = [(1, 1), (4, 1), (8, 4), (6, 2)]


def assert_close(name, got, want, tol):
    """``max |got - want| <= tol * max |want|`` over finite entries; infinities must match exactly."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert not np.isnan(got).any(), f"{name}: NaN in the kernel's result"
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=f"{name}: infinities differ")
    scale = max(float(np.abs(want[finite]).max(initial=0.0)), 1e-6)
    err = float(np.abs(got[finite] - want[finite]).max(initial=0.0))
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol} * scale {scale:.3g}"


def random_inputs(seed, B, T, S, H, Hkv, D, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (B, T, H, D), jnp.float32).astype(dtype),
            jax.random.normal(kk, (B, S, Hkv, D), jnp.float32).astype(dtype),
            jax.random.normal(kv, (B, S, Hkv, D), jnp.float32).astype(dtype))


def reference(q, k, v, *, bias=None, sinks=None, q_segment_ids=None, kv_segment_ids=None, **kw):
    for tile_size in ("block_q", "block_k", "bwd_block_q", "bwd_block_k", "poison_outputs", "interpret"):
        kw.pop(tile_size, None)
    segments = None if q_segment_ids is None else (q_segment_ids, kv_segment_ids)
    return reference_attention(q, k, v, bias=bias, sinks=sinks, segment_ids=segments, return_lse=True, **kw)


ARRAY_KWARGS = ("mask", "q_segment_ids", "kv_segment_ids")


@functools.lru_cache(maxsize=None)
def jitted_grads(attention, static_items, grad_bias):
    """One compiled (out, lse, grads) function per attention impl and static config (reruns hit the cache)."""
    static = dict(static_items)

    def loss(q, k, v, bias, sinks, arrays, weights):
        w_out, w_lse = weights
        out, lse = attention(q, k, v, bias=bias, sinks=sinks, **static, **arrays)
        lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse
        return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(lse_term), (out, lse)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4) if grad_bias else (0, 1, 2, 4), has_aux=True))


def value_and_grads(attention, q, k, v, bias, sinks, weights, grad_bias=True, **kw):
    """out, lse and the gradients of a random linear loss of both w.r.t. q, k, v, bias and sinks."""
    arrays = {name: kw.pop(name) for name in ARRAY_KWARGS if name in kw}
    fn = jitted_grads(attention, tuple(sorted(kw.items())), grad_bias)
    grads, (out, lse) = fn(q, k, v, bias, sinks, arrays, weights)
    if not grad_bias:
        grads = (*grads[:3], None, grads[3])
    return out, lse, grads


def check_against_reference(q, k, v, *, bias=None, sinks=None, dtype=jnp.float32, seed=1,
                            grad_bias=True, **kw):
    B, T, H, D = q.shape
    kw1, kw2 = jax.random.split(jax.random.PRNGKey(seed + 100))
    weights = (jax.random.normal(kw1, (B, T, H, D)), jax.random.normal(kw2, (B, T, H)))
    got = value_and_grads(flash_attention, q, k, v, bias, sinks, weights, grad_bias, **kw)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    b32 = None if bias is None else bias.astype(jnp.float32)
    want = value_and_grads(reference, q32, k32, v32, b32, sinks, weights, grad_bias, **kw)
    tol = TOL[dtype]
    assert got[0].dtype == q.dtype and got[1].dtype == jnp.float32
    assert_close("out", got[0], want[0], tol)
    assert_close("lse", got[1], want[1], tol)
    for name, g, w in zip(("dq", "dk", "dv", "dbias", "dsinks"), got[2], want[2]):
        assert (g is None) == (w is None), name
        if g is not None:
            assert_close(name, g, w, 2 * tol)
    return got


def segment_ids(key, B, length, num_segments):
    """Sorted random segment ids in [0, num_segments)."""
    return jnp.sort(jax.random.randint(key, (B, length), 0, num_segments), axis=1)


PLAIN = dict(shape=(2, 33, 33, 1, 1, 16), kw=dict(block_q=16, block_k=16))
# One case per feature mix; every case runs forward, lse and all gradients against the reference.
CASES = {
    "causal_softcap_keybias_gqa41_t_ne_s": dict(
        shape=(1, 37, 45, 4, 1, 16), kw=dict(causal=True, softcap=2.0, block_q=16, block_k=32,
                                              bwd_block_q=32, bwd_block_k=16),
        bias=lambda B, T, S, H: (B, 1, 1, S)),
    "window_fullbias_gqa84_d24": dict(
        shape=(1, 20, 27, 8, 4, 24), kw=dict(window=(5, 3), block_q=16, block_k=16),
        bias=lambda B, T, S, H: (B, H, T, S)),
    "mask_sinks_gqa62": dict(
        shape=(2, 33, 17, 6, 2, 16), kw=dict(block_q=32, block_k=16),
        mask=lambda B, T, S, H: (B, 1, T, S), sinks=True, dead_row=5),
    "segments_causal_broadcast_bias": dict(
        shape=(2, 40, 40, 4, 2, 8), kw=dict(causal=True, block_q=16, block_k=16),
        bias=lambda B, T, S, H: (1, H, 1, S), segments=3),
    "rank2_mask_window_sinks_row_bias": dict(
        shape=(1, 26, 31, 4, 1, 16), kw=dict(window=(4, 20), causal=True, block_q=16, block_k=16),
        mask=lambda B, T, S, H: (T, S), bias=lambda B, T, S, H: (B, 1, T, 1), sinks=True),
}


def build_case(case, seed=0, dtype=jnp.float32):
    B, T, S, H, Hkv, D = case["shape"]
    q, k, v = random_inputs(seed, B, T, S, H, Hkv, D, dtype)
    keys = jax.random.split(jax.random.PRNGKey(seed + 7), 5)
    kw = dict(case["kw"], scale=D ** -0.5)
    extras = {}
    if "bias" in case:
        extras["bias"] = jax.random.normal(keys[0], case["bias"](B, T, S, H)).astype(dtype)
    if "mask" in case:
        kw["mask"] = jax.random.bernoulli(keys[1], 0.7, case["mask"](B, T, S, H))
        if "dead_row" in case:
            kw["mask"] = kw["mask"].at[..., case["dead_row"], :].set(False)
    if case.get("sinks"):
        extras["sinks"] = jax.random.normal(keys[2], (H,))
    if case.get("segments"):
        kw["q_segment_ids"] = segment_ids(keys[3], B, T, case["segments"])
        kw["kv_segment_ids"] = segment_ids(keys[4], B, S, case["segments"])
    return q, k, v, extras, kw


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_gradients_match_reference(name):
    case = CASES[name]
    q, k, v, extras, kw = build_case(case)
    out, lse, _ = check_against_reference(q, k, v, **extras, **kw)
    if "dead_row" in case:  # fully masked row with sinks: out 0, lse = sink
        row = case["dead_row"]
        assert np.all(np.asarray(out)[:, row] == 0.0)
        np.testing.assert_array_equal(np.asarray(lse)[:, row],
                                      np.broadcast_to(extras["sinks"], lse[:, row].shape))


def test_bfloat16_matches_reference():
    q, k, v, extras, kw = build_case(PLAIN, seed=3, dtype=jnp.bfloat16)
    out = check_against_reference(q, k, v, dtype=jnp.bfloat16, **extras, **kw)
    assert out[2][0].dtype == jnp.bfloat16


def test_fully_masked_rows_give_zero_output_and_finite_gradients():
    B, T, S, H, Hkv, D = 1, 35, 20, 4, 2, 16
    q, k, v = random_inputs(5, B, T, S, H, Hkv, D)
    # Row 3 masked by the mask array, rows > S + 1 by the window (T > S), row 7's segment is absent
    # from the keys, and a -inf bias hides the only key row 9 could see.
    mask = jnp.ones((B, 1, T, S), bool).at[:, :, 3, :].set(False)
    mask = mask.at[:, :, 9, 1:].set(False)
    bias = jnp.zeros((1, 1, T, S)).at[:, :, 9, 0].set(-jnp.inf)
    q_ids = jnp.zeros((B, T), jnp.int32).at[:, 7].set(5)
    kv_ids = jnp.zeros((B, S), jnp.int32)
    kw = dict(scale=0.25, mask=mask, window=(2, S), q_segment_ids=q_ids, kv_segment_ids=kv_ids,
              block_q=16, block_k=16)
    out, lse, grads = check_against_reference(q, k, v, bias=bias, grad_bias=False, **kw)
    dead = np.array([3, 7, 9] + list(range(S + 2, T)))
    assert np.all(np.asarray(out)[:, dead] == 0.0)
    assert np.all(np.isneginf(np.asarray(lse)[:, dead]))
    assert np.all(np.asarray(grads[0])[:, dead] == 0.0)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads[:3])


def test_every_output_tile_is_written_into_nan_poisoned_buffers():
    """All three kernels (dS tiles included) write into NaN-filled aliased buffers: no NaN may remain."""
    q, k, v, extras, kw = build_case(CASES["segments_causal_broadcast_bias"], seed=2)
    kw = dict(kw, bwd_block_q=32, bwd_block_k=16, poison_outputs=True)
    check_against_reference(q, k, v, bias=extras["bias"], **kw)


def test_poisoning_catches_a_kernel_that_skips_its_output():
    x = jnp.ones((16, 16))
    spec = flash.pl.BlockSpec((16, 16), lambda i: (0, 0))
    (result,) = common.pallas_call(lambda x_ref, *refs: None, out_shape=[jax.ShapeDtypeStruct((16, 16), jnp.float32)],
                                   target="triton", interpret=True, name="writes_nothing", grid=(1,),
                                   in_specs=[spec], out_specs=[spec], poison_outputs=True)(x)
    assert np.isnan(np.asarray(result)).all()


def test_rerun_is_bitwise_identical():
    q, k, v, extras, kw = build_case(CASES["mask_sinks_gqa62"], seed=4)
    kw1, kw2 = jax.random.split(jax.random.PRNGKey(9))
    weights = (jax.random.normal(kw1, q.shape), jax.random.normal(kw2, q.shape[:3]))
    first = value_and_grads(flash_attention, q, k, v, None, extras["sinks"], weights, **kw)
    second = value_and_grads(flash_attention, q, k, v, None, extras["sinks"], weights, **kw)
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def pallas_call_outputs(closed_jaxpr):
    """{kernel name: number of outputs} for every pallas_call in a (nested) jaxpr."""
    found = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                for name in ("jattn_flash_forward", "jattn_flash_dq", "jattn_flash_dkv"):
                    if name in str(eqn.params.get("name_and_src_info", eqn.params.get("name"))):
                        found[name] = len(eqn.outvars)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else [value]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)
    walk(closed_jaxpr.jaxpr)
    return found


def test_gradient_builds_only_the_kernels_it_needs():
    """No dk/dv kernel when only q is differentiated; no dS output when the bias is a constant."""
    q, k, v, extras, kw = build_case(CASES["window_fullbias_gqa84_d24"], seed=6)

    def loss(q, bias):
        return jnp.sum(flash_attention(q, k, v, bias=bias, **kw)[0] ** 2)

    only_q = pallas_call_outputs(jax.make_jaxpr(jax.grad(loss))(q, extras["bias"]))
    assert only_q == {"jattn_flash_forward": 2, "jattn_flash_dq": 1}
    with_bias = pallas_call_outputs(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(q, extras["bias"]))
    assert with_bias == {"jattn_flash_forward": 2, "jattn_flash_dq": 2}
    everything = pallas_call_outputs(jax.make_jaxpr(jax.grad(
        lambda q, k, v: jnp.sum(flash_attention(q, k, v, **kw)[0]), argnums=(0, 1, 2)))(q, k, v))
    assert everything == {"jattn_flash_forward": 2, "jattn_flash_dq": 1, "jattn_flash_dkv": 2}


@settings(max_examples=5, deadline=None)
@given(T=st.integers(1, 70), S=st.integers(1, 70), grouping=st.sampled_from(GROUPINGS),
       masking=st.sampled_from(["none", "causal", "window", "mask"]),
       block_q=st.sampled_from([16, 32]), block_k=st.sampled_from([16, 32]),
       seed=st.integers(0, 2 ** 16))
def test_forward_matches_reference_on_random_shapes(T, S, grouping, masking, block_q, block_k, seed):
    H, Hkv = grouping
    q, k, v = random_inputs(seed, 1, T, S, H, Hkv, 16)
    kw = dict(scale=0.25, block_q=block_q, block_k=block_k)
    if masking == "causal":
        kw["causal"] = True
    elif masking == "window":
        kw["window"] = (seed % 9, (seed // 9) % 5)
    elif masking == "mask":
        kw["mask"] = jax.random.bernoulli(jax.random.PRNGKey(seed), 0.5, (1, H, T, S))
    out, lse = jax.jit(functools.partial(flash_attention, **kw))(q, k, v)
    want_out, want_lse = jax.jit(functools.partial(reference, **kw))(q, k, v)
    assert_close("out", out, want_out, TOL[jnp.float32])
    assert_close("lse", lse, want_lse, TOL[jnp.float32])


@pytest.mark.parametrize("value, error", [(48, ValueError), (8, ValueError), (True, TypeError),
                                          (16.0, TypeError)])
def test_hardware_block_sizes_are_enforced(value, error):
    with pytest.raises(error, match="block_k"):
        BlockSizes(block_k=value)


def test_common_block_helpers():
    assert common.check_hardware_block("block_q", 64) == 64
    assert common.fit_block(128, 5) == 16 and common.fit_block(128, 40) == 64
    assert common.fit_block(32, 1000) == 32
    assert common.padded_head_dim(24) == 32 and common.padded_head_dim(8) == 16
    assert common.padded_head_dim(128) == 128
    assert common.round_up(33, 16) == 48 and common.round_up(32, 16) == 32
    assert common.compiler_params("triton", interpret=True) is None
    with pytest.raises(ValueError, match="interpret"):
        common.check_interpret("yes")
