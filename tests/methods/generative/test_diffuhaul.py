"""P72 DiffUHaul: region-masked attention, shared-KV attention, K/V interpolation (soft anchoring), the
nearest-neighbour feature copy and the blob-leakage measure (tiny shapes, fresh random inputs)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.core.reference import reference_attention
from jattn.methods.generative.diffuhaul import (blob_leakage, blob_mask, interpolate_kv, masked_attention,
                                                nn_copy_features, shared_kv_attention)

TOL = dict(rtol=1e-5, atol=1e-5)


def _qkv(seed, B=2, T=6, S=6, H=2, D=8):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, H, D)), jax.random.normal(ks[1], (B, S, H, D)),
            jax.random.normal(ks[2], (B, S, H, D)))


def _blob(seed, B=2, N=6):
    b = np.array(jax.random.uniform(jax.random.key(seed + 50), (B, N)) < 0.5)
    b[:, 0], b[:, 1] = True, False
    return jnp.asarray(b)


def test_all_true_mask_is_standard_attention():
    """mask all-true equals plain softmax attention (catches the mask inverted: True = blocked)."""
    q, k, v = _qkv(0)
    np.testing.assert_allclose(np.asarray(masked_attention(q, k, v, jnp.ones((2, 6, 6), bool))),
                               np.asarray(reference_attention(q, k, v)), **TOL)


def test_masked_attention_matches_reference_mask_and_blocks_keys():
    """A random [B, T, S] mask equals the reference with that mask broadcast over heads (catches the mask put on
    the wrong axis: [B, S, T]); changing a blocked value changes nothing (catches the mask ignored)."""
    q, k, v = _qkv(1)
    m = np.array(jax.random.uniform(jax.random.key(3), (2, 6, 6)) < 0.6)
    m[:, :, 0] = True
    m = jnp.asarray(m)
    out = np.asarray(masked_attention(q, k, v, m))
    np.testing.assert_allclose(out, np.asarray(reference_attention(q, k, v, mask=m[:, None])), **TOL)
    only_blob = blob_mask(_blob(1))
    a = np.asarray(masked_attention(q, k, v, only_blob))
    v2 = jnp.where(_blob(1)[:, :, None, None], v, v + 100.0)       # change values outside the blob
    b = np.asarray(masked_attention(q, k, v2, only_blob))
    blob = np.asarray(_blob(1))
    np.testing.assert_allclose(a[blob], b[blob], **TOL)             # blob queries never read outside keys


def test_shared_kv_equals_dense_attention_over_concatenation():
    """shared_kv_attention == attention over [K_tgt; K_src] (catches two separate softmaxes averaged, or the
    source keys paired with the target values)."""
    q, kt, vt = _qkv(2)
    _, ks, vs = _qkv(3, S=5)
    got = np.asarray(shared_kv_attention(q, kt, vt, ks, vs))
    want = reference_attention(q, jnp.concatenate([kt, ks], 1), jnp.concatenate([vt, vs], 1))
    np.testing.assert_allclose(got, np.asarray(want), **TOL)
    hidden = np.asarray(shared_kv_attention(q, kt, vt, ks, vs, src_mask=jnp.zeros((2, 5), bool)))
    np.testing.assert_allclose(hidden, np.asarray(reference_attention(q, kt, vt)), **TOL)


def test_interpolate_kv_endpoints_and_midpoint():
    """alpha = 0 gives the target K/V, alpha = 1 the source's, 0.25 the affine mix (catches alpha and 1 - alpha
    swapped, or K mixed with V)."""
    _, ks, vs = _qkv(4)
    _, kt, vt = _qkv(5)
    k0, v0 = interpolate_kv(ks, kt, vs, vt, 0.0)
    k1, v1 = interpolate_kv(ks, kt, vs, vt, 1.0)
    km, vm = interpolate_kv(ks, kt, vs, vt, 0.25)
    np.testing.assert_array_equal(np.asarray(k0), np.asarray(kt))
    np.testing.assert_array_equal(np.asarray(v0), np.asarray(vt))
    np.testing.assert_allclose(np.asarray(k1), np.asarray(ks), **TOL)
    np.testing.assert_allclose(np.asarray(v1), np.asarray(vs), **TOL)
    np.testing.assert_allclose(np.asarray(km), np.asarray(0.75 * kt + 0.25 * ks), **TOL)
    np.testing.assert_allclose(np.asarray(vm), np.asarray(0.75 * vt + 0.25 * vs), **TOL)


def test_alpha_zero_attention_is_target_only_alpha_one_reads_source():
    """Attention with interpolated K/V: alpha = 0 equals target self-attention, alpha = 1 attention of target
    queries on the source K/V (the spec's defining pair)."""
    q, kt, vt = _qkv(6)
    _, ks, vs = _qkv(7)
    for alpha, (k, v) in ((0.0, (kt, vt)), (1.0, (ks, vs))):
        ki, vi = interpolate_kv(ks, kt, vs, vt, alpha)
        np.testing.assert_allclose(np.asarray(reference_attention(q, ki, vi)),
                                   np.asarray(reference_attention(q, k, v)), **TOL)


def test_nn_copy_identity_and_region():
    """Identical inputs: every token is its own nearest neighbour, output == input (catches argmin instead of
    argmax, or an index on the wrong axis); with a source that is a permutation, tokens in the region come from
    their permuted twin and the rest are kept (catches the region ignored / inverted)."""
    f = jax.random.normal(jax.random.key(8), (2, 7, 5))
    out, idx = nn_copy_features(f, f, jnp.ones((2, 7), bool))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(f))
    np.testing.assert_array_equal(np.asarray(idx), np.broadcast_to(np.arange(7), (2, 7)))
    perm = np.array([3, 0, 6, 1, 5, 2, 4])
    src = f[:, perm] * 2.0                                          # scaled: cosine still matches
    region = _blob(8, N=7)
    out, idx = nn_copy_features(f, src, region)
    inv = np.argsort(perm)
    r = np.asarray(region)
    np.testing.assert_array_equal(np.asarray(idx)[r], np.broadcast_to(inv, (2, 7))[r])
    np.testing.assert_allclose(np.asarray(out)[r], 2.0 * np.asarray(f)[r], **TOL)
    np.testing.assert_array_equal(np.asarray(out)[~r], np.asarray(f)[~r])


def test_blob_leakage_hand_values_and_masking_zeroes_it():
    """A hand map: blob {0}, row 0 = [0.25, 0.75, 0] gives leakage 0.75 (catches mass *inside* measured, or
    the mean taken over all queries); maps of blob-masked attention have zero leakage."""
    p = jnp.array([[[[0.25, 0.75, 0.0], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]]])
    np.testing.assert_allclose(np.asarray(blob_leakage(p, jnp.array([[True, False, False]]))), [0.75], **TOL)
    q, k, v = _qkv(9)
    blob = _blob(9)
    _, probs = reference_attention(q, k, v, mask=blob_mask(blob)[:, None], return_probs=True)
    np.testing.assert_allclose(np.asarray(blob_leakage(probs, blob)), 0.0, atol=1e-7)
    _, dense = reference_attention(q, k, v, return_probs=True)
    assert np.all(np.asarray(blob_leakage(dense, blob)) > 0.05)


def test_bad_arguments_raise_naming_the_argument():
    """Bad masks, alphas, shapes raise naming the argument."""
    q, k, v = _qkv(0)
    with pytest.raises(TypeError, match="mask"):
        masked_attention(q, k, v, jnp.ones((2, 6, 6)))
    with pytest.raises(ValueError, match="mask"):
        masked_attention(q, k, v, jnp.ones((2, 6, 5), bool))
    with pytest.raises(ValueError, match="alpha"):
        interpolate_kv(k, k, v, v, 1.5)
    with pytest.raises(ValueError, match="k_src"):
        shared_kv_attention(q, k, v, k[..., :4], v)
    with pytest.raises(ValueError, match="src_mask"):
        shared_kv_attention(q, k, v, k, v, src_mask=jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match="region"):
        nn_copy_features(k[:, :, 0], v[:, :, 0], jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match="blob"):
        blob_leakage(jnp.ones((1, 1, 3, 3)) / 3, jnp.ones((1, 3)))
