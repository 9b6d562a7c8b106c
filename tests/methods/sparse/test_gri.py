"""P68 GRI-style attention (reconstruction): the mask against a literal loop, both forms against a NumPy
softmax over [K ; pooled K] with that mask, the spec's identities (full window + no pooling = dense; pool 1
duplicates keys), FLOP counts and the errors."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.core.reference import reference_attention
from jattn.methods.sparse import gri
from tests.conftest import assert_close, random_array


def run(q, k, v, **kwargs):
    """GRI on the xla path, jitted (eager dispatch of the region gather costs more than one compile)."""
    return jax.jit(functools.partial(gri.global_regional_attention, impl="xla", **kwargs))(q, k, v)


def qkv(seed, B, N, H, Hkv, D):
    return random_array(seed, B, N, H, D), random_array(seed + 1, B, N, Hkv, D), random_array(seed + 2, B, N, Hkv, D)


def numpy_gri(q, k, v, hw, window, pool):
    """Independent transcription: loops build the pooled tokens and the mask, softmax in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, N, H, D = q.shape
    h, w = hw
    wh, ww = window
    keys, values = [k], [v]
    if pool is not None:
        ph, pw = pool
        kp, vp = [], []
        for Y in range(h // ph):
            for X in range(w // pw):
                idx = [(Y * ph + dy) * w + X * pw + dx for dy in range(ph) for dx in range(pw)]
                kp.append(k[:, idx].mean(1))
                vp.append(v[:, idx].mean(1))
        keys.append(np.stack(kp, 1))
        values.append(np.stack(vp, 1))
    K, V = np.concatenate(keys, 1), np.concatenate(values, 1)
    rep = H // K.shape[2]
    K, V = np.repeat(K, rep, axis=2), np.repeat(V, rep, axis=2)
    out = np.zeros_like(q)
    for i in range(N):
        yi, xi = divmod(i, w)
        allowed = [j for j in range(K.shape[1])
                   if j >= N or (divmod(j, w)[0] // wh == yi // wh and divmod(j, w)[1] // ww == xi // ww)]
        s = np.einsum("bhd,bjhd->bhj", q[:, i], K[:, allowed]) / math.sqrt(D)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, i] = np.einsum("bhj,bjhd->bhd", p, V[:, allowed])
    return out


def test_mask_is_the_region_rule_plus_all_pooled_columns():
    """Catches a wrong region index (rows/cols swapped, overlapping instead of tiled regions) and pooled
    columns hidden from some queries."""
    mask = gri.gri_mask((4, 6), (2, 3), pool=2)
    assert mask.shape == (24, 24 + 6)
    for i in range(24):
        for j in range(24):
            same = (i // 6) // 2 == (j // 6) // 2 and (i % 6) // 3 == (j % 6) // 3
            assert mask[i, j] == same, (i, j)
    assert mask[:, 24:].all() and mask[:, :24].sum(1).tolist() == [6] * 24


@pytest.mark.parametrize("form", gri.FORMS)
@pytest.mark.parametrize("hw, window, pool, H, Hkv", [((4, 4), 2, 2, 2, 2), ((4, 6), (2, 3), (2, 3), 4, 2),
                                                       ((6, 4), (3, 2), None, 2, 1)])
def test_equals_softmax_over_k_and_pooled_k_with_the_equivalent_mask(form, hw, window, pool, H, Hkv):
    """Both forms equal a loop-built softmax over [K ; avg-pooled K] with the GRI mask (GQA included).
    Catches: pooling V with K's mean (or not at all), max- instead of average-pooling, separate softmaxes
    per branch instead of one joint softmax, a region gather that scrambles tokens, a wrong scale."""
    q, k, v = qkv(1, 2, hw[0] * hw[1], H, Hkv, 8)
    window = (window, window) if isinstance(window, int) else window
    pool_pair = (pool, pool) if isinstance(pool, int) else pool
    out = run(q, k, v, hw=hw, window=window, pool=pool, form=form)
    assert_close(out, numpy_gri(q, k, v, hw, window, pool_pair), what=form)


def test_full_window_without_pooling_is_dense_attention():
    """window = the whole grid and pool=None is plain softmax attention (catches any leftover masking)."""
    q, k, v = qkv(3, 2, 16, 2, 2, 8)
    expected = reference_attention(q, k, v)
    for form in gri.FORMS:
        assert_close(run(q, k, v, hw=(4, 4), window=(4, 4), form=form), expected, what=form)


def test_pool_factor_one_duplicates_keys():
    """pool=1 makes K_bar = K: with the full window every key appears twice, which is the identity (dense);
    with regions, region keys get exactly +log 2 on their logits. Catches pooled tokens that are not the
    plain mean (a sum would make pool=1 the identity too, so the dense check of pool=2 below pins the mean)."""
    q, k, v = qkv(5, 1, 16, 2, 2, 8)
    dense = reference_attention(q, k, v)
    assert_close(run(q, k, v, hw=(4, 4), window=4, pool=1), dense)
    same_region = gri.gri_mask((4, 4), 2)[:, :16]
    bias = jnp.asarray(np.where(same_region, math.log(2.0), 0.0), jnp.float32)[None, None]
    assert_close(run(q, k, v, hw=(4, 4), window=2, pool=1),
                 reference_attention(q, k, v, bias=bias))


def test_pooled_tokens_are_tile_means_and_a_constant_value_passes_through():
    """avg_pool_tokens is the tile mean (catches a sum or a stride-only subsample); with v constant the output
    is that constant whatever the weights (catches un-normalised weights across the two branches)."""
    x = random_array(7, 1, 16, 1, 3)
    pooled = gri.avg_pool_tokens(x, (4, 4), 2)
    grid = np.asarray(x).reshape(4, 4, 3)
    np.testing.assert_allclose(np.asarray(pooled)[0, 1, 0], grid[0:2, 2:4].mean((0, 1)), rtol=1e-6)
    q, k, _ = qkv(8, 1, 16, 2, 2, 4)
    v = jnp.full((1, 16, 2, 4), 0.37, jnp.float32)
    out = run(q, k, v, hw=(4, 4), window=2, pool=2)
    np.testing.assert_allclose(np.asarray(out), 0.37, rtol=1e-5)


def test_gradients_of_both_forms_agree():
    """The per-region form differentiates like the masked definition (catches a stop-gradient or a gather
    whose transpose drops contributions to the pooled keys)."""
    q, k, v = qkv(9, 1, 16, 2, 1, 4)
    wts = random_array(10, 1, 16, 2, 4)

    def grads(form):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(wts * gri.global_regional_attention(
            q, k, v, hw=(4, 4), window=2, pool=2, form=form, impl="xla")), argnums=(0, 1, 2)))(q, k, v)

    for a, b in zip(grads("regions"), grads("masked")):
        assert_close(a, b, factor=2.0)


def test_flop_counts_at_16_and_4096_tokens():
    """Keys per query = window area + pooled count (catches counting the pooled tokens per region, or N^2)."""
    small = gri.gri_attention_flops((4, 4), 2, 2, heads=4, head_dim=16)
    assert (small["keys_per_query"], small["ratio"]) == (8, 2.0)
    assert small["dense_flops"] == 4 * 4 * 16 * 16 * 16
    big = gri.gri_attention_flops((64, 64), 8, 8)
    assert (big["keys_per_query"], big["ratio"]) == (128, 32.0)


def test_errors_name_the_argument():
    q, k, v = qkv(11, 1, 16, 2, 2, 4)
    with pytest.raises(ValueError, match="window"):
        gri.global_regional_attention(q, k, v, hw=(4, 4), window=3)
    with pytest.raises(ValueError, match="pool"):
        gri.global_regional_attention(q, k, v, hw=(4, 4), window=2, pool=3)
    with pytest.raises(ValueError, match="hw"):
        gri.global_regional_attention(q, k, v, hw=(4, 5), window=1)
    with pytest.raises(ValueError, match="form"):
        gri.global_regional_attention(q, k, v, hw=(4, 4), window=2, form="sparse")
    with pytest.raises(TypeError, match="window"):
        gri.global_regional_attention(q, k, v, hw=(4, 4), window=2.0)
    with pytest.raises(ValueError, match="pool"):
        gri.avg_pool_tokens(k, (4, 4), None)
