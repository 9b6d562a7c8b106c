"""pallas_kernels.linear (P74 Lightning-2), interpret mode: what only the kernel has. NaN-poisoned outputs
(forward, dq sweep and reverse dk/dv sweep), determinism, chunk and value-tile invariance, padding of odd T / D /
E and the kernel's argument checks. Exactness on the family's feature table, for the GPU and the TPU
structure, is in tests/ops/test_linear.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from jattn.ops.linear import linear_attention, linear_attention_pallas
from pallas_kernels import common, linear
from tests.conftest import assert_close
from tests.ops.test_linear import make_inputs as family_inputs


def make_inputs(seed, B=1, T=45, H=2, D=8, E=24, dtype=jnp.float32):
    """The family's random inputs (tests/ops/test_linear.py) at the kernel's default case."""
    return family_inputs(seed, B=B, T=T, H=H, D=D, E=E, dtype=dtype)


def pallas_fn(chunk=16, block_e=16):
    """T=45 pads to 3 chunks of 16; D=8 pads to 16; E=24 pads to 32 = two value tiles of 16."""
    return lambda q, k, v, a, s0: linear_attention_pallas(q, k, v, log_decay=a, initial_state=s0, scale=0.6,
                                                          chunk_size=chunk, block_e=block_e, interpret=True,
                                                          poison_outputs=True)


def reference_fn(q, k, v, a, s0):
    return linear_attention(q, k, v, log_decay=a, initial_state=s0, scale=0.6, return_final_state=True,
                            impl="reference")


def loss_of(fn):
    def loss(q, k, v, a, s0):
        out, state = fn(q, k, v, a, s0)
        return jnp.sum(out.astype(jnp.float32) * jnp.sin(out.astype(jnp.float32))) + jnp.sum(state * state)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def test_forward_and_final_state_match_reference_with_poisoned_outputs():
    args = make_inputs(0)
    out, state = jax.jit(pallas_fn())(*args)
    ref_out, ref_state = reference_fn(*args)
    assert np.isfinite(np.asarray(out)).all(), "non-finite values (an unwritten NaN-poisoned tile?)"
    assert np.isfinite(np.asarray(state)).all(), "non-finite values (an unwritten NaN-poisoned tile?)"
    assert_close(out, ref_out)
    assert_close(state, ref_state)


def test_backward_matches_autodiff_of_reference_and_is_deterministic():
    args = make_inputs(1)
    grad_pallas = loss_of(pallas_fn())
    first = grad_pallas(*args)
    for got, want in zip(first, loss_of(reference_fn)(*args)):
        assert np.isfinite(np.asarray(got)).all(), "non-finite values (an unwritten NaN-poisoned tile?)"
        assert_close(got, want, factor=2)
    for a, b in zip(first, grad_pallas(*args)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_chunk_size_and_value_tiling_do_not_change_the_result():
    args = make_inputs(2, T=70)
    small, _ = jax.jit(pallas_fn(chunk=16, block_e=16))(*args)
    large, _ = jax.jit(pallas_fn(chunk=32, block_e=32))(*args)
    assert np.isfinite(np.asarray(small)).all() and np.isfinite(np.asarray(large)).all()
    assert_close(small, large)
    assert_close(large, reference_fn(*args)[0])


def test_poisoning_exposes_an_unwritten_output():
    """The harness itself: a kernel that writes nothing leaves the NaN fill in place."""
    spec = pl.BlockSpec((16, 16), lambda i, j: (0, 0))

    def writes_nothing(x_ref, *refs):
        pass

    (out,) = common.pallas_call(writes_nothing, out_shape=[jax.ShapeDtypeStruct((16, 16), jnp.float32)],
                                target="triton", interpret=True, name="writes_nothing", grid=(1, 1),
                                in_specs=[spec], out_specs=[spec], poison_outputs=True)(jnp.ones((16, 16)))
    assert np.isnan(np.asarray(out)).all()


def test_kernel_argument_checks():
    q = jnp.ones((2, 32, 16))
    v = jnp.ones((2, 32, 16))
    a = jnp.zeros((2, 32))
    s0 = jnp.zeros((2, 16, 16))
    cases = [
        (dict(chunk_size=24), ValueError, "chunk_size must be a power of two"),
        (dict(chunk_size=8), ValueError, "chunk_size must be a power of two >= 16"),
        (dict(block_e=48), ValueError, "block_e must be a power of two"),
        (dict(chunk_size=64), ValueError, "must be a multiple of chunk_size"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            linear.lightning_attention(q, q, v, a, s0, **kwargs)
    with pytest.raises(ValueError, match="D \\(head dim\\) must be a power of two"):
        linear.lightning_attention(q[..., :12], q[..., :12], v, a, s0[:, :12], chunk_size=16)
    with pytest.raises(ValueError, match="expected q, k"):
        linear.lightning_attention(q, q, v, a[:, :4], s0)
    with pytest.raises(TypeError, match="share one dtype"):
        linear.lightning_attention(q, q, v.astype(jnp.bfloat16), a, s0, chunk_size=16)
