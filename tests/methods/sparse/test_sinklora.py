"""P70 SinkLoRA: S²-Attn (roll semantics) and SF-Attn masks against literal loop transcriptions, their
BlockMasks, the attention functions (xla and pallas, forward and gradients) against the dense reference and
against a NumPy transcription of LongLoRA's rolling forward, and the spec's properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.core import masks
from jattn.core.reference import reference_attention
from jattn.methods.sparse.sinklora import (group_causal_block_mask, group_causal_mask_fn, sf_attention,
                                           sf_attention_mask, sf_block_mask, sf_mask_fn, shifted_group_size,
                                           shifted_sparse_attention, shifted_sparse_attention_mask,
                                           shifted_sparse_block_mask, shifted_sparse_mask_fn)
from jattn.ops.block_sparse import block_sparse_attention
from tests.conftest import assert_close, assert_matches, masked_reference, random_qkv


def roll_mask(N, H, G):
    """S² mask from the roll itself: slot t of a shifted head holds token (t + G//2) mod N (torch.roll
    by -G//2); causal attention inside groups of G slots."""
    mask = np.zeros((H, N, N), bool)
    for h in range(H):
        shift = G // 2 if h >= H // 2 else 0
        token_at = [(t + shift) % N for t in range(N)]
        for ti in range(N):
            for tj in range(N):
                if ti // G == tj // G and tj <= ti:
                    mask[h, token_at[ti], token_at[tj]] = True
    return mask


def sf_literal_mask(N, H, G, n_sink):
    """SF mask from explicit segment cuts: unshifted heads cut at 0, G, 2G..; shifted heads at 0, s, s+G..."""
    mask = np.zeros((H, N, N), bool)
    for h in range(H):
        s = G // 2 if h >= H // 2 else 0
        cuts = sorted({0} | set(range(s, N, G)))
        segment = [sum(c <= i for c in cuts) - 1 for i in range(N)]
        for i in range(N):
            for j in range(i + 1):
                mask[h, i, j] = segment[i] == segment[j] or j < n_sink
    return mask


def official_s2_numpy(q, k, v, G):
    """NumPy float64 transcription of LongLoRA's forward_noflashattn (repeat_kv, roll, groups, roll back)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, N, H, D = q.shape
    k, v = np.repeat(k, H // k.shape[2], axis=2), np.repeat(v, H // v.shape[2], axis=2)

    def shift(x):
        x = x.copy()
        x[:, :, H // 2:] = np.roll(x[:, :, H // 2:], -G // 2, axis=1)
        return x

    qs, ks, vs = shift(q), shift(k), shift(v)
    out = np.zeros_like(qs)
    for start in range(0, N, G):
        rows = slice(start, start + G)
        logits = np.einsum("bihd,bjhd->bhij", qs[:, rows], ks[:, rows]) / np.sqrt(D)
        n = logits.shape[-1]
        logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, rows] = np.einsum("bhij,bjhd->bihd", p, vs[:, rows])
    out[:, :, H // 2:] = np.roll(out[:, :, H // 2:], G // 2, axis=1)
    return out


S2_CASES = [(64, 4, 16), (120, 4, 30), (100, 3, 25), (48, 2, 48)]


@pytest.mark.parametrize("N,H,G", S2_CASES)
def test_s2_mask_fn_equals_roll_transcription(N, H, G):
    want = roll_mask(N, H, G)
    np.testing.assert_array_equal(shifted_sparse_attention_mask(N, H, G), want)
    np.testing.assert_array_equal(masks.materialize(shifted_sparse_mask_fn(N, H, G), 1, H, N, N)[0], want)


@pytest.mark.parametrize("N,H,G,n_sink", [(64, 4, 16, 4), (120, 4, 30, 4), (100, 3, 25, 0), (40, 2, 40, 4)])
def test_sf_mask_fn_equals_literal_segments(N, H, G, n_sink):
    want = sf_literal_mask(N, H, G, n_sink)
    np.testing.assert_array_equal(sf_attention_mask(N, H, G, n_sink), want)
    np.testing.assert_array_equal(masks.materialize(sf_mask_fn(H, G, n_sink), 1, H, N, N)[0], want)


def tile_any(mask, bq, bk):
    *lead, T, S = mask.shape
    nQ, nK = -(-T // bq), -(-S // bk)
    padded = np.zeros((*lead, nQ * bq, nK * bk), bool)
    padded[..., :T, :S] = mask
    return padded.reshape(*lead, nQ, bq, nK, bk).any(axis=(-3, -1))


def test_block_masks_expand_to_the_masks_and_list_only_live_tiles():
    N, H, G, bq, bk = 100, 3, 25, 16, 32
    cases = [(shifted_sparse_block_mask(N, H, G, block_q=bq, block_k=bk), shifted_sparse_mask_fn(N, H, G),
              roll_mask(N, H, G)),
             (sf_block_mask(N, H, G, 4, block_q=bq, block_k=bk), sf_mask_fn(H, G, 4), sf_literal_mask(N, H, G, 4)),
             (group_causal_block_mask(N, G, block_q=bq, block_k=bk), group_causal_mask_fn(G),
              roll_mask(N, 2, G)[:1])]  # an unshifted head: the rolled-space mask
    for bm, fn, want in cases:
        np.testing.assert_array_equal(bm.to_dense_mask(fn)[0], want)
        np.testing.assert_array_equal(np.asarray(bm.to_dense_block_map()[0]), tile_any(want, bq, bk))
    # SF's tiles: the diagonal groups plus the sink column, nothing else.
    sf_map = np.asarray(cases[1][0].to_dense_block_map()[0])
    assert sf_map[:, :, 0].all() and sf_map.sum() < sf_map.size


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_s2_attention_equals_official_forward_and_dense_reference(impl):
    N, H, Hkv, G = 64, 4, 2, 16
    q, k, v = random_qkv(11, 2, N, N, H, Hkv, 16)
    fn = lambda q, k, v: shifted_sparse_attention(q, k, v, block_q=16, block_k=16, impl=impl)   # G = N/4 by default
    assert shifted_group_size(N) == G
    out = assert_matches(fn, masked_reference(roll_mask(N, H, G)), q, k, v, seed=12)
    assert_close(out, official_s2_numpy(q, k, v, G), what="official roll forward")


def test_s2_attention_odd_length_odd_group_odd_heads_mqa_and_per_head_block_mask_path():
    N, H, Hkv, G = 100, 3, 1, 25           # a kv head serves shifted and unshifted heads: k, v repeated
    q, k, v = random_qkv(13, 1, N, N, H, Hkv, 16)
    fn = lambda q, k, v: shifted_sparse_attention(q, k, v, group_size=G, block_q=16, block_k=32, impl="xla")
    out = assert_matches(fn, masked_reference(roll_mask(N, H, G)), q, k, v, seed=14)
    # The same attention without rolling: the per-head original-position mask on the kernel.
    bm, mask_fn = shifted_sparse_block_mask(N, H, G, block_q=16, block_k=32), shifted_sparse_mask_fn(N, H, G)
    direct = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, bm, mask_fn=mask_fn, impl="xla"))(q, k, v)
    assert_close(direct, out, what="per-head mask vs roll")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_sf_attention_equals_dense_reference_gqa_odd(impl):
    N, H, Hkv, G = 120, 4, 2, 30
    q, k, v = random_qkv(16, 1, N, N, H, Hkv, 16)
    fn = lambda q, k, v: sf_attention(q, k, v, block_q=16, block_k=32, impl=impl)   # G = N/4, 4 sinks
    assert_matches(fn, masked_reference(sf_literal_mask(N, H, G, 4)), q, k, v, seed=17)


def test_group_equal_to_length_unshifted_heads_are_causal_shifted_heads_are_rolled_causal():
    N, H = 48, 4
    q, k, v = random_qkv(18, 1, N, N, H, H, 16)
    roll = lambda x, s: jnp.roll(x, s, axis=1)

    @jax.jit
    def run(q, k, v):
        out = shifted_sparse_attention(q, k, v, group_ratio=1.0, block_q=16, block_k=16, impl="xla")
        causal = reference_attention(q, k, v, causal=True)
        rolled = roll(reference_attention(roll(q, -N // 2), roll(k, -N // 2), roll(v, -N // 2), causal=True), N // 2)
        return out, causal, rolled

    out, causal, rolled_causal = run(q, k, v)
    assert_close(out[:, :, :2], causal[:, :, :2], what="unshifted heads")
    assert_close(out[:, :, 2:], rolled_causal[:, :, 2:], what="shifted heads")


def test_sf_has_the_sink_column_is_causal_and_removes_the_wraparound_leak():
    N, H, G, n_sink = 64, 4, 16, 4
    sf, s2 = np.asarray(sf_attention_mask(N, H, G, n_sink)), np.asarray(shifted_sparse_attention_mask(N, H, G))
    causal = np.tril(np.ones((N, N), bool))
    assert sf[:, :, :n_sink][:, causal[:, :n_sink]].all()            # every query sees every earlier sink
    assert not (sf & ~causal).any()                                   # never the future
    leak = s2 & ~causal                                               # S²: the wrapped group sees the end
    assert leak[2:].any() and not leak[:2].any()
    s = G // 2
    assert leak[2:, :s, N - G + s:].all() and not leak[2:, s:].any()
    # Without sinks, SF equals S² with the wrapped group cut back into its two segments.
    sf0 = np.asarray(sf_attention_mask(N, H, G, 0))
    np.testing.assert_array_equal(sf0[:, s:N - G + s], s2[:, s:N - G + s])
    np.testing.assert_array_equal(sf0 & causal, sf0)
    # Every row sees at least itself: no fully masked rows, so no NaN and no zero rows.
    assert sf0[:, np.arange(N), np.arange(N)].all() and s2[:, np.arange(N), np.arange(N)].all()


def test_bad_inputs_raise_clear_errors():
    q, k, v = random_qkv(19, 1, 32, 32, 2, 2, 16)
    with pytest.raises(ValueError, match="group_size must be <= the sequence length 32"):
        shifted_sparse_attention(q, k, v, group_size=40)
    with pytest.raises(ValueError, match="group_ratio must be in"):
        sf_attention(q, k, v, group_ratio=1.5)
    with pytest.raises(TypeError, match="num_sinks must be an int"):
        sf_attention(q, k, v, num_sinks=2.0)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        sf_attention(q, k, v, block_k=48)
    with pytest.raises(ValueError, match="self-attention"):
        shifted_sparse_attention(q, k[:, :16], v[:, :16])
    with pytest.raises(ValueError, match="num_heads must be an int >= 1"):
        shifted_sparse_attention_mask(32, 0, 8)
