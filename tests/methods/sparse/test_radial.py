"""P04 Radial Attention: the token rule and the official tile mask against literal loop transcriptions,
the BlockMask expansions, exactness against dense masked attention (xla + pallas, fwd + grads, GQA, odd
frame sizes), the all-visible limit, symmetry, O(F log F) tile growth and the dense schedule."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.core.masks import materialize
from jattn.core.reference import reference_attention
from jattn.methods.sparse.radial import (radial_attention, radial_attention_mask, radial_block_mask,
                                         radial_mask_fn)
from tests.conftest import (assert_close, assert_forward_and_grads_close, dense_vjp_run, numpy_qkv, random_like,
                            vjp_run)


reference = jax.jit(reference_attention, static_argnames=("causal",))   # one compile per shape


# ----------------------------------------------------------------------- literal transcriptions (spec)

def literal_token_mask(F, S, n_text, block, decay, model):
    """Token rule, one (query, key) pair at a time, written straight from the spec."""
    V = F * S
    T = V + n_text
    mask = np.zeros((T, T), bool)
    for q in range(T):
        for kv in range(T):
            if q >= V or kv >= V:
                mask[q, kv] = True
                continue
            i, r = divmod(q, S)
            j, c = divmod(kv, S)
            if model == "wan" and j == 0:
                mask[q, kv] = True
                continue
            dist = abs(i - j)
            base = 2 ** S.bit_length() / 2 ** dist.bit_length()
            window = S if dist <= 1 else max(base * decay, block)
            keep = True if base >= block else dist % int(block / base) == 0
            mask[q, kv] = keep and abs(c - r) <= window
    return mask


def literal_block_mask(F, S, n_text, block, decay, model):
    """The official gen_log_mask_shrinked + shrinkMaskStrict, pair by pair, float thresholds."""
    V = F * S
    nb = math.ceil((V + n_text) / block)
    token = literal_token_mask(F, S, 0, block, decay, model)
    final = np.zeros((nb, nb), bool)
    pair_tiles = (S - 1) // block + 1
    for i in range(F):
        for j in range(F):
            local = token[i * S:(i + 1) * S, j * S:(j + 1) * S]
            rr, rc = (i * S) % block, (j * S) % block
            padded = np.zeros((rr + pair_tiles * block, rc + pair_tiles * block), bool)
            padded[rr:rr + S, rc:rc + S] = local
            n = padded.shape[0] // block
            cut = padded[:n * block, :n * block].reshape(n, block, n, block)
            col_density = cut.sum(axis=1) / block                              # [n, n, block]
            frac = (col_density > 1 / 3).sum(-1) / ((col_density > 0).sum(-1) + 1e-9)
            shrunk = frac > 0.6
            r0, c0 = (i * S) // block, (j * S) // block
            for a in range(n):
                for b in range(n):
                    if r0 + a < nb and c0 + b < nb:
                        final[r0 + a, c0 + b] |= shrunk[a, b]
    if n_text:
        final[V // block:, :] = True
        final[:, V // block:] = True
    return final


def dense_mask_of(mask_fn, T):
    """``materialize`` compiled once (eager dispatch of the index arithmetic is slow on a busy CPU)."""
    return np.asarray(jax.jit(lambda: materialize(mask_fn, 1, 1, T, T))())[0, 0]


def expand_tiles(tile_map, block, T):
    return np.repeat(np.repeat(tile_map, block, 0), block, 1)[:T, :T]


def tiles_with_any(mask, block):
    T = mask.shape[0]
    nb = math.ceil(T / block)
    padded = np.zeros((nb * block, nb * block), bool)
    padded[:T, :T] = mask
    return padded.reshape(nb, block, nb, block).any(axis=(1, 3))


# (F, S, n_text, block, decay, model): thinning active, odd S, text, and a frame layout where the official
# per-pair truncation matters (S=22, block=16: frames starting at offset 12 or 14 straddle an extra tile).
CONFIGS = [
    (9, 20, 7, 16, 0.2, "wan"),
    (5, 33, 0, 16, 0.95, "hunyuan"),
    (8, 22, 5, 16, 0.2, "wan"),
    (6, 24, 3, 16, 3.0, "hunyuan"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_mask_fn_equals_literal_rule(config):
    F, S, n_text, block, decay, model = config
    T = F * S + n_text
    got = dense_mask_of(radial_mask_fn(F, S, n_text, block=block, decay_factor=decay, model=model), T)
    want = literal_token_mask(F, S, n_text, block, decay, model)
    assert 0 < want.mean() < 1
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_block_mask_equals_official_shrink(config):
    F, S, n_text, block, decay, model = config
    got = radial_block_mask(F, S, n_text, block=block, decay_factor=decay, model=model)
    want = literal_block_mask(F, S, n_text, block, decay, model)
    assert got.dtype == bool and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("config", CONFIGS[2:3], ids=str)
def test_block_masks_expand_exactly(config):
    F, S, n_text, block, decay, model = config
    T = F * S + n_text
    token = literal_token_mask(F, S, n_text, block, decay, model)
    fn = radial_mask_fn(F, S, n_text, block=block, decay_factor=decay, model=model)
    bm = radial_attention_mask(F, S, n_text, block=block, decay_factor=decay, model=model, granularity="token")
    np.testing.assert_array_equal(np.asarray(bm.to_dense_mask(fn))[0, 0], token)
    np.testing.assert_array_equal(np.asarray(bm.to_dense_block_map())[0, 0], tiles_with_any(token, block))

    tiles = literal_block_mask(F, S, n_text, block, decay, model)
    bm = radial_attention_mask(F, S, n_text, block=block, decay_factor=decay, model=model)
    dense = np.asarray(bm.to_dense_mask())[0, 0]
    np.testing.assert_array_equal(dense, expand_tiles(tiles, block, T))
    np.testing.assert_array_equal(np.asarray(bm.to_dense_block_map())[0, 0], tiles_with_any(dense, block))


# ------------------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("granularity", ["block", "token"])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_attention_equals_dense_masked_reference(granularity, impl):
    F, S, n_text, block, model = 7, 15, 5, 16, "wan"     # odd frame size, T = 110, GQA 4:2
    T = F * S + n_text
    q, k, v = numpy_qkv(11, 1, T, T, 4, 2, 16)
    w = random_like(12, q)
    if granularity == "token":
        mask = literal_token_mask(F, S, n_text, block, 0.2, model)
    else:
        mask = expand_tiles(literal_block_mask(F, S, n_text, block, 0.2, model), block, T)
    assert 0.2 < mask.mean() < 0.5
    sparse = jax.jit(lambda q, k, v, w: vjp_run(
        lambda q, k, v: radial_attention(q, k, v, num_frames=F, tokens_per_frame=S, n_text=n_text, block=block,
                                         model=model, granularity=granularity, impl=impl), q, k, v, w))
    result = sparse(q, k, v, w)
    assert np.isfinite(np.asarray(result[0])).all()
    assert_forward_and_grads_close(result, dense_vjp_run(q, k, v, w, jnp.asarray(mask)))


def test_huge_decay_without_thinning_is_dense():
    F, S, block = 4, 32, 16          # 2**6 / 2**2 = 16 >= block: no thinning up to dist 3
    T = F * S
    assert dense_mask_of(radial_mask_fn(F, S, block=block, decay_factor=1e6, model="hunyuan"), T).all()
    for model in ("wan", "hunyuan"):
        assert radial_block_mask(F, S, block=block, decay_factor=1e6, model=model).all()
    q, k, v = numpy_qkv(3, 1, T, T, 2, 2, 16)
    got = jax.jit(lambda q, k, v: radial_attention(q, k, v, num_frames=F, tokens_per_frame=S, block=block,
                                                   decay_factor=1e6, model="hunyuan", impl="xla"))(q, k, v)
    assert_close(got, reference(q, k, v), what="dense limit")


# ------------------------------------------------------------------------------------- properties

def test_hunyuan_mask_is_symmetric_and_wan_sink_is_not():
    F, S, n_text, block = 9, 21, 4, 16
    T = F * S + n_text
    token = dense_mask_of(radial_mask_fn(F, S, n_text, block=block, model="hunyuan"), T)
    np.testing.assert_array_equal(token, token.T)
    tiles = radial_block_mask(9, 32, 0, block=16, model="hunyuan")   # frames aligned to tiles
    np.testing.assert_array_equal(tiles, tiles.T)
    wan = dense_mask_of(radial_mask_fn(F, S, n_text, block=block, model="wan"), T)
    assert wan[:, :S].all() and not wan[:S, :].all()                # key frame 0 is the sink column


def test_kept_tiles_grow_as_f_log_f():
    frames = np.array([8, 16, 32, 64, 128])
    nnz = np.array([radial_block_mask(int(f), 256, block=64, model="hunyuan").sum() for f in frames], float)
    per_frame = nnz / frames                   # tiles per frame row: + about a constant per doubling of F
    steps = np.diff(per_frame)
    assert np.all(steps > 0) and steps.max() < 1.3 * steps.min()
    slopes = np.diff(np.log(nnz)) / np.diff(np.log(frames))    # log-log slope, 2 for a dense mask
    assert np.all(np.diff(slopes) < 0) and slopes[0] < 1.75 and slopes[-1] < 1.35
    by_f_log_f = nnz / (frames * np.log2(frames))
    by_f_squared = nnz / frames ** 2
    assert by_f_log_f.max() < 2 * by_f_log_f.min() and by_f_squared.max() > 4 * by_f_squared.min()


def test_frames_much_smaller_than_a_tile_drop_rows_to_zero_not_nan():
    """tokens_per_frame < block / 3: no pair reaches 1/3 column density, every tile is dropped; the rows
    then output 0 with finite gradients (the documented fully-masked-row behaviour)."""
    assert not radial_block_mask(8, 4, block=16, model="hunyuan").any()
    q, k, v = numpy_qkv(7, 1, 32, 32, 2, 2, 16)
    fn = lambda q, k, v: radial_attention(q, k, v, num_frames=8, tokens_per_frame=4, block=16, model="hunyuan",
                                          impl="xla")
    out, grads = jax.jit(lambda q, k, v, w: vjp_run(fn, q, k, v, w))(q, k, v, random_like(8, q))
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_dense_schedule():
    F, S, block = 7, 15, 16
    T = F * S
    q, k, v = numpy_qkv(5, 1, T, T, 2, 1, 16)
    kw = dict(num_frames=F, tokens_per_frame=S, block=block, model="wan", impl="xla")
    radial = jax.jit(functools.partial(radial_attention, **kw),
                     static_argnames=("layer_idx", "timestep", "dense_timesteps"))
    dense = reference(q, k, v)
    sparse_mask = expand_tiles(literal_block_mask(F, S, 0, block, 0.2, "wan"), block, T)
    assert not sparse_mask.all()
    sparse = reference(q, k, v, mask=jnp.asarray(sparse_mask))
    assert_close(radial(q, k, v, layer_idx=0), dense, what="wan dense layer 0")
    assert_close(radial(q, k, v, layer_idx=5, timestep=11), dense, what="dense step 11")
    assert_close(radial(q, k, v, layer_idx=1, timestep=0, dense_timesteps=0), sparse, what="sparse step")


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(num_frames=3, tokens_per_frame=20), ValueError, "num_frames \\* tokens_per_frame"),
    (dict(num_frames=3, tokens_per_frame=16, model="mochi"), ValueError, "model"),
    (dict(num_frames=3, tokens_per_frame=16, block=24), ValueError, "block"),
    (dict(num_frames=3, tokens_per_frame=16, decay_factor=-1.0), ValueError, "decay_factor"),
    (dict(num_frames=3, tokens_per_frame=16, granularity="pixel"), ValueError, "granularity"),
    (dict(num_frames=0, tokens_per_frame=16), ValueError, "num_frames"),
    (dict(num_frames=3, tokens_per_frame=16, layer_idx=-1), ValueError, "layer_idx"),
    (dict(num_frames=3, tokens_per_frame=16, n_text=1.5), TypeError, "n_text"),
])
def test_validation_errors_name_the_argument(kwargs, error, word):
    q, k, v = numpy_qkv(0, 1, 48, 48, 2, 2, 16)
    with pytest.raises(error, match=word):
        radial_attention(q, k, v, **kwargs)
