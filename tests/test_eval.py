"""jattn.eval: the tile mass equals the dense probabilities summed per tile; sparse_quality's recall, density
and error are those of the mask it is given.

Mutations caught: the causal mask left out of the mass (mass in tiles above the diagonal); the tile sums
taken over kv heads instead of query heads (GQA); padded query rows counted (last tile's mass too large);
recall divided by the tile count instead of the total mass; density over all tiles instead of the causal ones;
the oracle ranking over the whole batch instead of per head, or taking the lightest tiles; a reused dense
reference from another causal flag.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.core.block_mask import BlockMask
from jattn.core.reference import reference_attention
from jattn.eval import attention_block_mass, dense_reference, sparse_quality
from tests.conftest import numpy_qkv


@pytest.mark.parametrize("T, H, Hkv, causal", [(37, 4, 2, True), (32, 2, 2, False)])
def test_block_mass_is_the_dense_probabilities_summed_per_tile(T, H, Hkv, causal):
    q, k, v = numpy_qkv(0, 2, T, T, H, Hkv, 8)
    _, probs = reference_attention(q, k, v, causal=causal, return_probs=True)      # [B, H, T, S]
    p = np.asarray(probs, np.float64)
    pad = -T % 16
    p = np.pad(p, ((0, 0), (0, 0), (0, pad), (0, pad)))
    want = p.reshape(2, H, (T + pad) // 16, 16, (T + pad) // 16, 16).sum((3, 5))
    got = attention_block_mass(q, k, block_q=16, block_k=16, causal=causal)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_sparse_quality_of_a_known_mask():
    T = 64
    q, k, v = numpy_qkv(1, 1, T, T, 2, 1, 16)
    diagonal = lambda q, k: BlockMask.from_dense_block_map(                         # noqa: E731
        jnp.eye(4, dtype=bool)[None, None], block_q=16, block_k=16, seq_q=T, seq_k=T)
    result = sparse_quality(diagonal, q, k, v, causal=True, impl="xla")
    mass = np.asarray(attention_block_mass(q, k, block_q=16, block_k=16))
    assert result["density"] == pytest.approx(4 / 10)                             # 4 of the 10 causal tiles
    assert result["recall"] == pytest.approx(np.trace(mass, axis1=2, axis2=3).sum() / mass.sum(), rel=1e-5)
    assert 0 < result["recall"] < 1 and result["rel_error"] > 1e-3
    full = sparse_quality(lambda q, k: BlockMask.from_dense_block_map(
        jnp.ones((1, 1, 4, 4), bool), block_q=16, block_k=16, seq_q=T, seq_k=T), q, k, v, causal=True, impl="xla")
    assert full["recall"] == pytest.approx(1.0) and full["rel_error"] < 1e-5 and full["density"] == pytest.approx(1.0)


def test_oracle_recall_is_each_heads_heaviest_tiles_and_a_reference_is_reused():
    """The oracle keeps, per head, as many of its heaviest causal tiles as the mask kept (numpy transcription);
    it bounds the mask's recall; a shared dense reference gives the same numbers as a fresh one."""
    T = 64
    q, k, v = numpy_qkv(2, 2, T, T, 2, 1, 16)
    rows = jnp.asarray([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1]], bool)   # 7 of the 10 causal
    select = lambda q, k: BlockMask.from_dense_block_map(                                # noqa: E731
        jnp.broadcast_to(rows, (2, 2, 4, 4)), block_q=16, block_k=16, seq_q=T, seq_k=T)
    reference = dense_reference(q, k, v, causal=True, impl="xla")
    result = sparse_quality(select, q, k, v, causal=True, impl="xla", reference=reference)
    assert set(reference["masses"]) == {(16, 16)}
    mass = np.asarray(attention_block_mass(q, k, block_q=16, block_k=16), np.float64)
    causal = np.tril(np.ones((4, 4), bool))
    want = sum(np.sort(mass[b, h][causal])[::-1][:7].sum() for b in range(2) for h in range(2)) / mass.sum()
    assert result["oracle_recall"] == pytest.approx(want, rel=1e-5)
    assert result["recall"] < result["oracle_recall"] < 1
    fresh = sparse_quality(select, q, k, v, causal=True, impl="xla")
    for key in ("density", "recall", "oracle_recall", "rel_error"):
        assert fresh[key] == pytest.approx(result[key], rel=1e-6)
    with pytest.raises(ValueError, match="reference was computed with causal=True"):
        sparse_quality(select, q, k, v, causal=False, impl="xla", reference=reference)
