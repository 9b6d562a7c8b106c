"""pallas_kernels.attention (the flash kernel) called directly: backward tiles other than the forward ones,
NaN-poisoned outputs, determinism, which kernels a gradient builds, random shapes, block-size rules.

Equivalence with the reference over the family's feature table, for every impl and both kernel structures,
lives in tests/ops/test_attention.py; this file reuses its cases and its ``"triton"`` runner (the kernel's
GPU structure in the interpreter with the case's full ``BlockSizes`` and NaN-poisoned outputs).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental import pallas as pl

from jattn.core.reference import reference_attention
from pallas_kernels import common
from pallas_kernels.attention import BlockSizes, flash_attention
from tests.conftest import GROUPINGS, assert_close_to_scale, random_qkv
from tests.ops.test_attention import BY_NAME, check_against_reference, inputs, value_and_grads


def test_backward_tiles_other_than_the_forward_tiles():
    """dq and dk/dv kernels on (32, 16) tiles under a (16, 32) forward: padding to the larger of each pair."""
    case = BY_NAME["causal_softcap_keybias_gqa41_t_lt_s"]
    assert case.bwd_blocks == (32, 16) and (case.block_q, case.block_k) == (16, 32)
    check_against_reference("triton", case)


def test_every_output_tile_is_written_into_nan_poisoned_buffers():
    """All three kernels (dS tiles included) write into NaN-filled aliased buffers: no NaN may remain."""
    case = dataclasses.replace(BY_NAME["segments_causal_broadcast_bias_d8"], bwd_blocks=(32, 16))
    check_against_reference("triton", case, seed=2)


def test_poisoning_catches_a_kernel_that_skips_its_output():
    x = jnp.ones((16, 16))
    spec = pl.BlockSpec((16, 16), lambda i: (0, 0))
    (result,) = common.pallas_call(lambda x_ref, *refs: None, out_shape=[jax.ShapeDtypeStruct((16, 16), jnp.float32)],
                                   target="triton", interpret=True, name="writes_nothing", grid=(1,),
                                   in_specs=[spec], out_specs=[spec], poison_outputs=True)(x)
    assert np.isnan(np.asarray(result)).all()


@pytest.mark.parametrize("structure", ["triton", "mosaic"])
def test_rerun_is_bitwise_identical(structure):
    case = BY_NAME["mask_per_batch_sinks_dead_row_gqa62"]
    q, k, v, diff, arrays = inputs(case, seed=4)
    rng = np.random.default_rng(9)
    weights = (jnp.asarray(rng.standard_normal(q.shape), jnp.float32),
               jnp.asarray(rng.standard_normal(q.shape[:3]), jnp.float32))
    first = value_and_grads(structure, case, q, k, v, diff, arrays, weights)
    second = value_and_grads(structure, case, q, k, v, diff, arrays, weights)
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
    case = BY_NAME["window_fullbias_gqa84_d24"]
    q, k, v, diff, _ = inputs(case, seed=6)
    kw = dict(window=case.window, scale=case.D ** -0.5, block_sizes=BlockSizes(16, 16), interpret=True)

    def loss(q, bias):
        return jnp.sum(flash_attention(q, k, v, bias=bias, **kw)[0] ** 2)

    only_q = pallas_call_outputs(jax.make_jaxpr(jax.grad(loss))(q, diff["bias"]))
    assert only_q == {"jattn_flash_forward": 2, "jattn_flash_dq": 1}
    with_bias = pallas_call_outputs(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(q, diff["bias"]))
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
    q, k, v = random_qkv(seed, 1, T, S, H, Hkv, 16)
    kw = dict(scale=0.25)
    if masking == "causal":
        kw["causal"] = True
    elif masking == "window":
        kw["window"] = (seed % 9, (seed // 9) % 5)
    elif masking == "mask":
        kw["mask"] = jax.random.bernoulli(jax.random.PRNGKey(seed), 0.5, (1, H, T, S))
    sizes = BlockSizes(block_q, block_k)
    out, lse = jax.jit(functools.partial(flash_attention, block_sizes=sizes, interpret=True, **kw))(q, k, v)
    want_out, want_lse = jax.jit(functools.partial(reference_attention, return_lse=True, **kw))(q, k, v)
    assert_close_to_scale(out, want_out, what="out")
    assert_close_to_scale(lse, want_lse, what="lse")


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
