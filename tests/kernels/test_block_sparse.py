"""pallas_kernels.block_sparse called directly: NaN-poisoned outputs, determinism, block-size checks;
both kernel structures (GPU and TPU) run in the interpreter.

Equivalence with the dense reference over the family's feature table (impl="pallas" and the TPU structure)
lives in tests/ops/test_block_sparse.py; here the kernel entry point is exercised with every output buffer
pre-filled with NaN, on a BlockMask with empty rows, a mask function on partial tiles and causal.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.core import masks
from jattn.core.block_mask import BlockMask
from jattn.core.reference import reference_attention
from pallas_kernels.block_sparse import block_sparse_attention_pallas

B, T, S, H, Hkv, D, BQ, BK = 1, 40, 56, 4, 2, 16, 16, 16
MASK_FN = masks.sliding_window_mask(24, 4)


def _block_mask():
    rng = np.random.default_rng(11)
    block_map = rng.random((1, H, 3, 4)) < 0.6
    block_map[:, :, :, 0] = True
    block_map[:, 1, 2, :] = False                  # head 1, q block 2: rows with nothing visible
    full_map = rng.random(block_map.shape) < 0.5
    return BlockMask.from_dense_block_map(jnp.asarray(block_map), block_q=BQ, block_k=BK, seq_q=T, seq_k=S,
                                          full_map=jnp.asarray(full_map))


def _inputs():
    rng = np.random.default_rng(12)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    return normal(B, T, H, D), normal(B, S, Hkv, D), normal(B, S, Hkv, D), normal(B, T, H, D), normal(B, T, H)


@functools.partial(jax.jit, static_argnames="interpret")
def _run(q, k, v, d_out, d_lse, bm, interpret=True):
    def loss(q, k, v):
        out, lse = block_sparse_attention_pallas(
            q, k, v, bm.kv_indices, bm.kv_counts, bm.kv_full, bm.q_indices, bm.q_counts, bm.q_full,
            block_q=BQ, block_k=BK, scale=D ** -0.5, causal=True, mask_fn=MASK_FN, poison_outputs=True,
            interpret=interpret)
        return jnp.sum(out * d_out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * d_lse), (out, lse)
    (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, lse, grads


@pytest.mark.parametrize("structure", ["triton", "mosaic"])
def test_poisoned_outputs_are_fully_written_and_exact(structure):
    """Both kernel structures (GPU: table loop in a program; TPU: scalar-prefetched tiles on the grid)."""
    bm = _block_mask()
    q, k, v, d_out, d_lse = _inputs()
    out, lse, grads = _run(q, k, v, d_out, d_lse, bm, interpret=structure)
    assert not np.isnan(np.asarray(out)).any() and not np.isnan(np.asarray(lse)).any()
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()

    mask = bm.to_dense_mask(MASK_FN, batch=B, heads=H)

    def ref_loss(q, k, v):
        o, l = reference_attention(q, k, v, mask=mask, causal=True, return_lse=True)
        return jnp.sum(o * d_out) + jnp.sum(jnp.where(jnp.isfinite(l), l, 0.0) * d_lse), (o, l)
    (_, (ref_out, ref_lse)), ref_grads = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
    np.testing.assert_array_equal(np.asarray(lse[0, 32:40, 1]), -np.inf)          # the empty rows (lse [B, T, H])
    np.testing.assert_array_equal(np.asarray(out[0, 32:40, 1]), 0.0)
    finite = np.isfinite(np.asarray(lse))
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=1e-5)
    for name, g, w in zip(("dq", "dk", "dv"), grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5 * max(1.0, float(jnp.abs(w).max())),
                                   rtol=0, err_msg=name)


def test_deterministic_rerun():
    bm = _block_mask()
    args = _inputs()
    first = _run(*args, bm)
    second = _run(*args, bm)
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("block_q, block_k, word", [(8, 16, "block_q"), (16, 24, "block_k"), (16.0, 16, "block_q")])
def test_hardware_block_sizes_are_enforced(block_q, block_k, word):
    bm = _block_mask()
    q, k, v, _, _ = _inputs()
    with pytest.raises((ValueError, TypeError), match=word):
        block_sparse_attention_pallas(q, k, v, bm.kv_indices, bm.kv_counts, bm.kv_full, bm.q_indices, bm.q_counts,
                                      bm.q_full, block_q=block_q, block_k=block_k, scale=0.25)
