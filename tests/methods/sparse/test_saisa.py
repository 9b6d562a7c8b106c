"""P43 SAISA / NAAViT: the mask against a literal transcription of the official rule, its BlockMask, the
attention (xla and pallas, forward and gradients) against the dense reference, the spec's properties
(text rows unchanged whether or not visual rows are computed, V=0 is a causal LM, FLOP savings), and the
NNX decoder layer with per-layer visual inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.core import masks
from jattn.core.reference import reference_attention
from jattn.methods.sparse.saisa import (SAISADecoderBlock, naavit_attention, naavit_block_mask,
                                        naavit_layer_flops, naavit_mask, naavit_mask_fn, naavit_query_positions,
                                        naavit_rows_mask, naavit_rows_mask_fn, saisa_attention)
from tests.conftest import assert_close, assert_matches, random_qkv

LAYOUTS = [(5, 20, 8), (0, 17, 9), (7, 40, 1)]


def spec_rows_mask(P, V, T):
    """Literal transcription of the official mask (LlavaLlamaModel.forward): query rows = sys then text."""
    N = P + V + T
    mask = np.zeros((P + T, N), bool)
    for r in range(P + T):
        for j in range(N):
            if r < P:                         # sys rows: causal over sys only
                mask[r, j] = j < P and j <= r
            else:                             # text rows: all sys, all visual, causal text
                t = r - P
                mask[r, j] = j < P + V or (j - (P + V)) <= t
    return mask


def spec_full_mask(P, V, T):
    """Full-sequence form: visual rows see nothing, the others as in the official rows."""
    rows = spec_rows_mask(P, V, T)
    full = np.zeros((P + V + T, P + V + T), bool)
    full[:P] = rows[:P]
    full[P + V:] = rows[P:]
    return full


@pytest.mark.parametrize("layout", LAYOUTS)
def test_masks_equal_literal_transcription(layout):
    P, V, T = layout
    N = P + V + T
    rows, full = spec_rows_mask(P, V, T), spec_full_mask(P, V, T)
    np.testing.assert_array_equal(naavit_rows_mask(P, V, T), rows)
    np.testing.assert_array_equal(masks.materialize(naavit_rows_mask_fn(P, V), 1, 1, P + T, N)[0, 0], rows)
    np.testing.assert_array_equal(naavit_mask(P, V, T), full)
    np.testing.assert_array_equal(masks.materialize(naavit_mask_fn(P, V), 1, 1, N, N)[0, 0], full)
    # Non-visual rows are exactly causal rows; positions are the original ones.
    causal = np.tril(np.ones((N, N), bool))
    positions = naavit_query_positions(P, V, T)
    np.testing.assert_array_equal(rows, causal[positions])
    assert not full[P:P + V].any()


def tile_any(mask, bq, bk):
    T, S = mask.shape
    nQ, nK = -(-T // bq), -(-S // bk)
    padded = np.zeros((nQ * bq, nK * bk), bool)
    padded[:T, :S] = mask
    return padded.reshape(nQ, bq, nK, bk).any(axis=(1, 3))


@pytest.mark.parametrize("layout,blocks", [((5, 20, 8), (16, 16)), ((7, 40, 30), (32, 16))])
def test_block_mask_expands_to_the_mask_and_lists_only_live_tiles(layout, blocks):
    P, V, T = layout
    bq, bk = blocks
    for rows_only, want, fn in ((True, spec_rows_mask(P, V, T), naavit_rows_mask_fn(P, V)),
                                (False, spec_full_mask(P, V, T), naavit_mask_fn(P, V))):
        bm = naavit_block_mask(P, V, T, block_q=bq, block_k=bk, rows_only=rows_only)
        np.testing.assert_array_equal(bm.to_dense_mask(fn)[0, 0], want)
        np.testing.assert_array_equal(np.asarray(bm.to_dense_block_map()[0, 0]), tile_any(want, bq, bk))
    # Full form: a q block made only of visual rows lists no tile at all.
    bm = naavit_block_mask(16, 48, 16, block_q=16, block_k=16)
    np.testing.assert_array_equal(np.asarray(bm.kv_counts[0, 0, 1:4]), 0)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_row_subset_attention_equals_dense_reference_gqa_odd(impl):
    P, V, T = 5, 37, 33                      # N = 75: not a multiple of the blocks
    q_full, k, v = random_qkv(1, 2, P + V + T, P + V + T, 4, 2, 16)
    q = jnp.concatenate([q_full[:, :P], q_full[:, P + V:]], axis=1)
    mask = jnp.asarray(spec_rows_mask(P, V, T))
    assert_matches(lambda q, k, v: naavit_attention(q, k, v, num_prefix=P, num_visual=V, block_q=16, block_k=32,
                                                   impl=impl),
                  lambda q, k, v: reference_attention(q, k, v, mask=mask), q, k, v, seed=2)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_full_sequence_attention_equals_dense_reference_visual_rows_zero(impl):
    P, V, T = 6, 43, 22                      # N = 71, visual rows span several whole q blocks
    q, k, v = random_qkv(3, 1, P + V + T, P + V + T, 4, 2, 16)
    mask = jnp.asarray(spec_full_mask(P, V, T))
    out = assert_matches(lambda q, k, v: saisa_attention(q, k, v, num_prefix=P, num_visual=V, block_q=16,
                                                        block_k=16, impl=impl),
                        lambda q, k, v: reference_attention(q, k, v, mask=mask), q, k, v, seed=4)
    np.testing.assert_array_equal(np.asarray(out[:, P:P + V]), 0.0)


def test_text_rows_unchanged_whether_or_not_visual_rows_are_computed():
    P, V, T = 4, 30, 14
    N = P + V + T
    q, k, v = random_qkv(5, 2, N, N, 4, 4, 16)
    keep = naavit_query_positions(P, V, T)

    @jax.jit
    def run(q, k, v):
        everything = reference_attention(q, k, v, causal=True)      # visual rows computed as queries too
        rows = naavit_attention(q[:, keep], k, v, num_prefix=P, num_visual=V, block_q=16, block_k=16, impl="xla")
        full = saisa_attention(q, k, v, num_prefix=P, num_visual=V, block_q=16, block_k=16, impl="xla")
        return everything[:, keep], rows, full[:, keep]

    want, rows, full = run(q, k, v)
    assert_close(rows, want, what="row-subset vs all rows")
    assert_close(full, want, what="full form vs all rows")


def test_no_visual_tokens_is_a_causal_lm():
    q, k, v = random_qkv(6, 1, 40, 40, 2, 1, 16)
    run = jax.jit(lambda q, k, v: (
        reference_attention(q, k, v, causal=True),
        naavit_attention(q, k, v, num_prefix=9, num_visual=0, block_q=16, block_k=16, impl="xla"),
        saisa_attention(q, k, v, num_prefix=9, num_visual=0, block_q=16, block_k=16, impl="xla")))
    want, rows, full = run(q, k, v)
    assert_close(rows, want, what="row-subset")
    assert_close(full, want, what="full form")


def test_flop_counter_savings_grow_with_visual_tokens():
    cfg = dict(dim=64, num_heads=4, head_dim=16, mlp_dim=128, num_kv_heads=2)
    P, T = 10, 20
    per_row_ffn = 2 * 64 * 128 * 3
    per_row_q_o = 2 * 2 * 64 * 4 * 16
    for V in (0, 16, 32, 64):
        dense = naavit_layer_flops(P, V, T, naavit=False, **cfg)
        sparse = naavit_layer_flops(P, V, T, **cfg)
        assert dense["ffn"] - sparse["ffn"] == V * per_row_ffn                 # FFN savings exactly ∝ V
        assert dense["q_proj"] + dense["o_proj"] - sparse["q_proj"] - sparse["o_proj"] == V * per_row_q_o
        assert dense["kv_proj"] == sparse["kv_proj"]                            # visual tokens stay keys
        # Attention pairs agree with the dense masks (independent count).
        assert sparse["attention"] == 4 * int(spec_rows_mask(P, V, T).sum()) * 4 * 16
        assert dense["attention"] == 4 * (P + V + T) * (P + V + T + 1) // 2 * 4 * 16
        assert dense["total"] - sparse["total"] == (dense["ffn"] - sparse["ffn"]) + V * per_row_q_o + \
            (dense["attention"] - sparse["attention"])
    assert naavit_layer_flops(P, 0, T, **cfg) == naavit_layer_flops(P, 0, T, naavit=False, **cfg)


def dense_layer_reference(block, x, P, V):
    """The same weights as an ordinary causal pre-norm layer computing every row (visual ones too)."""
    from jattn.nn.attention import apply_rope
    B, N, _ = x.shape
    H, Hkv, D = block.num_heads, block.num_kv_heads, block.head_dim
    h = block.attn_norm(x)
    q = apply_rope(block.query(h).reshape(B, N, H, D), jnp.arange(N)[None])
    k = apply_rope(block.key(h).reshape(B, N, Hkv, D), jnp.arange(N)[None])
    v = block.value(h).reshape(B, N, Hkv, D)
    y = x + block.out(reference_attention(q, k, v, causal=True).reshape(B, N, H * D))
    return y + block.mlp(block.mlp_norm(y))


def test_decoder_block_matches_a_dense_layer_on_text_rows_with_per_layer_visual_inputs():
    P, V, T, dim, vdim = 3, 24, 9, 32, 12
    block = SAISADecoderBlock(dim, 4, num_prefix=P, num_visual=V, num_kv_heads=2, mlp_dim=64,
                              visual_inputs_per_layer=True, vision_dim=vdim, block_q=16, block_k=16, impl="xla",
                              rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, P + V + T, dim))
    feats = jax.random.normal(jax.random.PRNGKey(2), (2, V, vdim))

    @nnx.jit
    def call(m, x, f):
        projected = m.projector(f)
        dense = dense_layer_reference(m, x.at[:, P:P + V].set(projected), P, V)
        return m(x, f), projected, dense

    y, projected, dense = call(block, x, feats)
    keep = naavit_query_positions(P, V, T)
    # Non-visual rows: what an ordinary causal layer computes for them (visual rows computed or not).
    assert_close(y[:, keep], dense[:, keep], factor=10, what="non-visual rows")
    # Visual rows: this layer's projection of the vision features, then residual only.
    np.testing.assert_allclose(y[:, P:P + V], projected, rtol=1e-6, atol=1e-6)
    # The incoming visual states are overwritten: changing them changes nothing.
    y2, _, _ = call(block, x.at[:, P:P + V].add(3.0), feats)
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))
    # Text rows read the projected visual keys: other vision features change them (and the sys rows not).
    y3, _, _ = call(block, x, feats + 1.0)
    assert not np.allclose(np.asarray(y3[:, P + V:]), np.asarray(y[:, P + V:]))
    np.testing.assert_array_equal(np.asarray(y3[:, :P]), np.asarray(y[:, :P]))
    with pytest.raises(ValueError, match="vision_features"):
        block(x)


def test_decoder_block_without_projector_keeps_visual_states():
    block = SAISADecoderBlock(32, 2, num_prefix=2, num_visual=5, mlp_dim=32, block_q=16, block_k=16, impl="xla",
                              rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.PRNGKey(4), (1, 12, 32))
    y = nnx.jit(lambda m, x: m(x))(block, x)
    np.testing.assert_array_equal(np.asarray(y[:, 2:7]), np.asarray(x[:, 2:7]))
    assert not np.allclose(np.asarray(y[:, 7:]), np.asarray(x[:, 7:]))


def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal(shape).astype(np.float32)
               for shape in ((1, 20, 2, 16), (1, 30, 2, 16), (1, 30, 2, 16)))
    with pytest.raises(ValueError, match="q_rows must hold the P \\+ T non-visual rows"):
        naavit_attention(q, k, v, num_prefix=2, num_visual=5)
    with pytest.raises(TypeError, match="num_visual must be an int"):
        naavit_attention(q, k, v, num_prefix=2, num_visual=10.0)
    with pytest.raises(ValueError, match="num_prefix must be an int >= 0"):
        naavit_mask(-1, 3, 4)
    with pytest.raises(ValueError, match="block_q must be a power of two"):
        naavit_block_mask(2, 3, 4, block_q=24)
    with pytest.raises(ValueError, match="same sequence"):
        saisa_attention(q, k, v, num_prefix=2, num_visual=5)
    with pytest.raises(ValueError, match="exceeds the sequence length"):
        saisa_attention(q, q, q, num_prefix=12, num_visual=9)
    with pytest.raises(ValueError, match="at least one non-visual token"):
        naavit_mask(0, 5, 0)
    with pytest.raises(ValueError, match="vision_dim"):
        SAISADecoderBlock(32, 4, num_prefix=1, num_visual=2, visual_inputs_per_layer=True, rngs=nnx.Rngs(0))
