"""P55 FuseMax: the 3-, 2- and 1-pass cascades equal softmax attention, each scans K/V exactly ``passes``
times, and the cost model says what the paper claims (1-pass buffer independent of M).

Mutations caught: a cascade that forgets the running-max correction ``PRM`` (1-pass) or the rescaled
denominator (2-pass) fails ``test_cascades_equal_softmax_attention`` (several chunks, large logits); a pass
fused away or added changes ``test_each_pass_is_one_scan_over_the_keys``; a buffer term that grows with M
fails ``test_one_pass_buffer_is_independent_of_M``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.methods.analysis.fusemax import cascade_attention, cascade_cost_model
from tests.conftest import assert_close, random_qkv


@pytest.mark.parametrize("passes", [3, 2, 1])
@pytest.mark.parametrize("m0", [8, 48])
def test_cascades_equal_softmax_attention(passes, m0):
    q, k, v = random_qkv(0, 2, 21, 48, 4, 2, 16)
    q = q * 4.0                                   # large logits: a missing max correction overflows or drifts
    got = cascade_attention(q, k, v, passes=passes, m0=m0)
    assert_close(got, jattn.attention(q, k, v, impl="reference"))


def _scans_over_keys(fn, *args, length):
    jaxpr = jax.make_jaxpr(fn)(*args)
    return sum(eqn.primitive.name == "scan" and eqn.params["length"] == length for eqn in jaxpr.eqns)


@pytest.mark.parametrize("passes", [3, 2, 1])
def test_each_pass_is_one_scan_over_the_keys(passes):
    q, k, v = random_qkv(1, 1, 8, 64, 2, 2, 16)
    n = _scans_over_keys(lambda q, k, v: cascade_attention(q, k, v, passes=passes, m0=16), q, k, v, length=4)
    assert n == passes == cascade_cost_model(P=8, M=64, E=16, F=16, passes=passes, m0=16).input_passes


def _all_eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in its equations (jit, custom_vjp, ...)."""
    from jax.extend.core import jaxprs_in_params
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name != "pallas_call":
            for sub in jaxprs_in_params(eqn.params):
                yield from _all_eqns(sub)


def test_flash_kernel_is_the_one_pass_cascade():
    """jattn's Pallas flash forward is one kernel (one pallas_call for the whole forward) whose program keeps
    FuseMax's 1-pass state (running max, denominator, numerator) over one loop across the kv tiles: with every
    tile fully visible that is a single loop of S / block_k = 4 steps in the kernel body; its output is the
    1-pass cascade's."""
    from pallas_kernels.attention import BlockSizes, flash_attention
    q, k, v = random_qkv(2, 1, 32, 64, 2, 2, 16)
    fn = lambda q, k, v: flash_attention(q, k, v, scale=0.25, interpret="triton",  # noqa: E731
                                         block_sizes=BlockSizes(16, 16, 16, 16, 16, 16))[0]
    calls = [eqn for eqn in _all_eqns(jax.make_jaxpr(fn)(q, k, v).jaxpr) if eqn.primitive.name == "pallas_call"]
    assert len(calls) == 1
    body = str(calls[0].params["jaxpr"])
    assert body.count("scan[") + body.count("while[") == 1 and "length=4" in body
    assert_close(fn(q, k, v), cascade_attention(q, k, v, passes=1, m0=16, scale=0.25))


def test_one_pass_buffer_is_independent_of_M():
    costs = [cascade_cost_model(P=128, M=M, E=64, F=64, passes=1, m0=256) for M in (1024, 8192, 65536)]
    assert len({c.buffer_elements for c in costs}) == 1
    three = [cascade_cost_model(P=128, M=M, E=64, F=64, passes=3, m0=256) for M in (1024, 8192)]
    assert three[1].buffer_elements_unfused == three[0].buffer_elements_unfused + 128 * (8192 - 1024)
    one = cascade_cost_model(P=8, M=64, E=4, F=2, passes=1, m0=16)
    assert one.ops["QK"] == 8 * 64 * 4 and one.ops["RM"] == 8 * 4 and one.ops["SLNV"] == 8 * 64 * 2
    assert cascade_cost_model(P=8, M=64, E=4, F=2, passes=3, m0=16).ops["QK"] == 3 * one.ops["QK"]


@pytest.mark.parametrize("kwargs,word", [
    (dict(passes=4, m0=16), "passes"), (dict(passes=1, m0=7), "m0"), (dict(passes=1, m0=0), "m0")])
def test_bad_arguments_name_themselves(kwargs, word):
    q, k, v = random_qkv(3, 1, 8, 64, 2, 2, 16)
    with pytest.raises((ValueError, TypeError), match=word):
        cascade_attention(q, k, v, **kwargs)
