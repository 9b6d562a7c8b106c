"""NaN in gives NaN out, on every op and every impl; unlisted tiles are never read.

The oracle is the dense reference (for linear attention, its recurrence) run on the same poisoned input: a row is NaN exactly where the
reference's row is NaN, and every other row equals the clean run. (Poisoning q or k only: a NaN value
row meets a zero probability inside a dense matmul, so v's NaN pattern depends on which tiles an impl
visits; that is what the unlisted-tile test pins down.) Mutations caught: a finaliser that treats a row
whose max skipped NaN as empty (``seen = m > threshold``) gives 0 instead of NaN; a merge or lse guard
written with ``isfinite`` drops NaN partials; a kernel that reads an unlisted K/V tile turns rows NaN.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.core import masks
from jattn.core.block_mask import BlockMask

B, T, H, Hkv, D = 1, 40, 4, 2, 16
WINDOW = masks.sliding_window_mask(12)


def inputs(seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (B, T, H, D)), jax.random.normal(ks[1], (B, T, Hkv, D)),
            jax.random.normal(ks[2], (B, T, Hkv, D)))


def attention_op(impl):
    return lambda q, k, v: jattn.attention(q, k, v, causal=True, window=(12, 0), impl=impl, block_q=16,
                                           block_k=16, return_lse=True)


def block_sparse_op(impl):
    block_mask = BlockMask.from_mask_fn(WINDOW, 1, 1, T, T, 16, 16)
    return lambda q, k, v: jattn.block_sparse_attention(q, k, v, block_mask, mask_fn=WINDOW, causal=True,
                                                        impl=impl, return_lse=True)


def neighborhood_op(impl):
    return lambda q, k, v: (jattn.neighborhood_attention(q, k, v, kernel_size=7, impl=impl),)


def linear_op(impl):
    def op(q, k, v):
        return (jattn.linear_attention(q, k, v, log_decay=jattn.alibi_log_decay(H), impl=impl, chunk_size=16),)
    return op


# op -> (constructor, impls under test, the oracle impl). Linear attention's oracle is its recurrence: the
# quadratic reference multiplies NaN scores by zero decay weights, which spreads NaN to unrelated rows.
OPS = {
    "attention": (attention_op, ["xla", "pallas"], "reference"),
    "block_sparse": (block_sparse_op, ["xla", "pallas"], "reference"),
    "neighborhood": (neighborhood_op, ["xla", "pallas"], "reference"),
    "linear": (linear_op, ["xla", "pallas"], "recurrent"),
}
CASES = [(op, impl) for op, (_, impls, _) in OPS.items() for impl in impls]


def rows_nan(x):
    """[B, T, H(, D)] -> bool [B, T, H]: any NaN in the row."""
    x = np.asarray(x, np.float32)
    return np.isnan(x).any(axis=-1) if x.ndim == 4 else np.isnan(x)


@pytest.mark.parametrize("poisoned", ["q", "k"])
@pytest.mark.parametrize("op, impl", CASES)
def test_nan_rows_match_the_reference_and_other_rows_are_exact(op, impl, poisoned):
    make, _, oracle = OPS[op]
    q, k, v = inputs()
    if poisoned == "q":
        q = q.at[0, 9, 1, 3].set(jnp.nan)
    else:
        k = k.at[0, 20, 0, 5].set(jnp.nan)
    got = jax.jit(make(impl))(q, k, v)
    want = jax.jit(make(oracle))(q, k, v)
    clean = jax.jit(make(oracle))(*inputs())
    for g, w, c in zip(got, want, clean):
        nan_rows = rows_nan(w)
        assert nan_rows.any(), "the poisoned input must reach some row"
        assert not nan_rows.all(), "some rows must not see the poisoned input"
        np.testing.assert_array_equal(rows_nan(g), nan_rows)
        ok = ~nan_rows
        scale = max(1.0, float(np.abs(np.asarray(c)[ok]).max()))
        np.testing.assert_allclose(np.asarray(g)[ok], np.asarray(c)[ok], atol=2e-5 * scale, rtol=0)


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_nan_in_q_gives_nan_gradient_rows_not_zeros(impl):
    q, k, v = inputs()
    q = q.at[0, 9, 1, 3].set(jnp.nan)
    grad = jax.jit(jax.grad(lambda q: jnp.sum(jattn.attention(q, k, v, causal=True, impl=impl))))(q)
    assert np.isnan(np.asarray(grad)[0, 9, 1]).all()
    assert np.isfinite(np.asarray(grad)[0, :9]).all()


@pytest.mark.parametrize("structure", ["triton", "mosaic"])
def test_block_sparse_kernel_never_reads_an_unlisted_tile(structure):
    """NaN in every K/V row of an unlisted kv tile: the outputs and gradients stay exact (both structures)."""
    from pallas_kernels.block_sparse import block_sparse_attention_pallas
    q, k, v = inputs(1)
    block_map = np.ones((1, 1, 3, 3), bool)
    block_map[0, 0, 2, 1] = False  # q block 2 skips kv block 1 ...
    block_map[0, 0, 0, 2] = False
    block_map[0, 0, 1, 2] = False  # ... and only q block 2 lists kv block 2
    bm = BlockMask.from_dense_block_map(jnp.asarray(block_map), block_q=16, block_k=16, seq_q=T, seq_k=T)

    def run(k, v):
        def loss(q, k, v):
            out, lse = block_sparse_attention_pallas(
                q, k, v, bm.kv_indices, bm.kv_counts, bm.kv_full, bm.q_indices, bm.q_counts, bm.q_full,
                block_q=16, block_k=16, scale=0.25, interpret=structure)
            return jnp.sum(out[:, 32:]), out
        return jax.value_and_grad(loss, argnums=0, has_aux=True)(q, k, v)

    (_, clean_out), clean_dq = jax.jit(run)(k, v)
    k_bad = k.at[:, 16:32].set(jnp.nan)  # kv block 1: unlisted for q block 2, whose loss is differentiated
    v_bad = v.at[:, 16:32].set(jnp.nan)
    (_, out), dq = jax.jit(run)(k_bad, v_bad)
    np.testing.assert_array_equal(np.asarray(out[:, 32:]), np.asarray(clean_out[:, 32:]))
    np.testing.assert_array_equal(np.asarray(dq[:, 32:]), np.asarray(clean_dq[:, 32:]))
    assert np.isnan(np.asarray(out[:, :32])).all(axis=(-1, -2)).all()  # rows that list it do see it
