"""The reference against a naive NumPy (float64) softmax, feature by feature."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.core.reference import reference_attention
from tests.conftest import assert_close, random_qkv


def naive_attention(q, k, v, *, mask=None, bias=None, causal=False, window=None, segments=None, scale=None,
                    softcap=None, sinks=None):
    """Loops over (b, h, i) in float64: the slowest, plainest transcription of the semantics."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    out = np.zeros((B, T, H, v.shape[-1]))
    lse = np.full((B, T, H), -np.inf)
    for b in range(B):
        for h in range(H):
            kh = h // (H // Hkv)
            for i in range(T):
                logits = (k[b, :, kh] @ q[b, i, h]) * scale
                if softcap is not None:
                    logits = softcap * np.tanh(logits / softcap)
                if bias is not None:
                    logits = logits + np.broadcast_to(np.asarray(bias, np.float64), (B, H, T, S))[b, h, i]
                visible = np.ones(S, bool)
                j = np.arange(S)
                if causal:
                    visible &= j <= i
                if window is not None:
                    visible &= (j >= i - window[0]) & (j <= i + window[1])
                if segments is not None:
                    visible &= np.asarray(segments[1])[b] == np.asarray(segments[0])[b, i]
                if mask is not None:
                    visible &= np.broadcast_to(np.asarray(mask), (B, H, T, S))[b, h, i]
                terms = list(logits[visible]) + ([float(sinks[h])] if sinks is not None else [])
                if not terms:
                    continue
                m = max(terms)
                denom = sum(np.exp(t - m) for t in terms)
                weights = np.where(visible, np.exp(logits - m), 0.0) / denom
                out[b, i, h] = weights @ v[b, :, kh]
                lse[b, i, h] = m + np.log(denom)
    return out, lse


CASES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window": (3, 1)},
    "softcap": {"softcap": 1.5, "scale": 0.7},
    "segments": {"segments": True},
    "mask_bias_sinks": {"mask": True, "bias": True, "sinks": True},
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("H,Hkv", [(1, 1), (4, 1), (6, 2)])
def test_reference_matches_naive_numpy(name, H, Hkv):
    B, T, S, D = 2, 7, 9, 8
    q, k, v = random_qkv(1, B, T, S, H, Hkv, D)
    options = dict(CASES[name])
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    if options.pop("mask", False):
        options["mask"] = jax.random.bernoulli(keys[0], 0.6, (B, 1, T, S))
    if options.pop("bias", False):
        options["bias"] = jax.random.normal(keys[1], (1, H, T, S))
    if options.pop("sinks", False):
        options["sinks"] = jax.random.normal(keys[2], (H,))
    segments = None
    if options.pop("segments", False):
        segments = (jnp.array([[0, 0, 0, 1, 1, 2, 2]] * B), jnp.array([[0, 0, 1, 1, 1, 1, 2, 2, 3]] * B))
        options["segment_ids"] = segments
    out, lse = reference_attention(q, k, v, return_lse=True, **options)
    naive_options = {kk: vv for kk, vv in options.items() if kk != "segment_ids"}
    expected_out, expected_lse = naive_attention(q, k, v, segments=segments, **naive_options)
    assert_close(out, expected_out, what="out")
    assert_close(lse, expected_lse, what="lse")


def test_fully_masked_rows_give_zero_output_and_minus_inf_lse_without_nan():
    q, k, v = random_qkv(3, 1, 4, 5, 2, 2, 8)
    mask = jnp.ones((1, 1, 4, 5), bool).at[:, :, 1].set(False)
    out, lse = reference_attention(q, k, v, mask=mask, return_lse=True)
    assert np.all(np.asarray(out[:, 1]) == 0.0)
    assert np.all(np.isneginf(np.asarray(lse[:, 1])))
    assert np.all(np.isfinite(np.asarray(lse[:, [0, 2, 3]])))
    grads = jax.grad(lambda q, k, v: jnp.sum(reference_attention(q, k, v, mask=mask) ** 2), (0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    assert np.all(np.asarray(grads[0][:, 1]) == 0.0)


def test_sinks_with_fully_masked_row_give_lse_equal_to_the_sink():
    q, k, v = random_qkv(4, 1, 3, 3, 2, 1, 8)
    sinks = jnp.array([0.5, -1.0])
    mask = jnp.zeros((1, 1, 3, 3), bool)
    out, lse = reference_attention(q, k, v, mask=mask, sinks=sinks, return_lse=True)
    assert np.all(np.asarray(out) == 0.0)
    np.testing.assert_allclose(np.asarray(lse[0, 0]), np.asarray(sinks), rtol=1e-6)


def test_probs_are_row_stochastic_and_reproduce_the_output():
    q, k, v = random_qkv(5, 2, 6, 6, 4, 2, 8)
    out, probs = reference_attention(q, k, v, causal=True, return_probs=True)
    np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, rtol=1e-6)
    assert np.all(np.asarray(probs)[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0.0)
    v_heads = jnp.repeat(v, 2, axis=2)
    recomposed = jnp.einsum("bhts,bshd->bthd", probs, v_heads, precision="highest")
    assert_close(out, recomposed)


def test_output_keeps_input_dtype_and_lse_is_float32():
    q, k, v = random_qkv(6, 1, 5, 5, 2, 2, 8, dtype=jnp.bfloat16)
    out, lse = reference_attention(q, k, v, return_lse=True)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
