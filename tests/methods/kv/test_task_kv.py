"""P49 Task-KV (jattn.methods.kv.task_kv), hypothesis-level reading: the per-head caches against dense attention
masked per head (full for heterogeneous heads, sinks + middle activations + recent window for the others)
token by token, with the middle activations from a float64 NumPy transcription; the selection functions against
NumPy transcriptions, deterministic and permutation-equivariant over heads.

Mutations each test catches (each was applied to task_kv.py and seen to fail):
* test_decode_matches_per_head_masked_dense_attention: the ring slot ``fixed + (position + 1) % recent``; the
  heterogeneous heads' lengths ``position`` (the new token unseen); the window rows taken from the first
  ``window`` queries (``probs[:, :, :window]``); ``kv_head_flags`` with ``all`` instead of ``any``.
* test_middle_activations_follow_the_transcription: the excluded recent tail forgotten (``[..., sink:]``).
* test_selection_is_deterministic_and_permutation_equivariant: the center as the median / ``argsort(distances)``
  (the nearest heads chosen); the projection through the wrong slice (``W_O`` rows of head 0 for every head).
* test_per_head_compress_gathers_each_heads_positions: gathering along the wrong axis.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.core.reference import reference_attention
from jattn.methods.kv.task_kv import (TaskKVCache, head_semantic_vectors, kv_head_flags, middle_activation_indices,
                                      per_head_kv_compress, semantic_distances, semantic_separator)
from tests.conftest import assert_close, numpy_qkv


def numpy_middles(q, k, prompt, Hkv, window, sink, recent, middle):
    """Float64: per (b, kv head), the `middle` positions in [sink, prompt - recent) with the largest attention
    mass from the last `window` prompt queries (summed over the group's heads); ties: lower position."""
    q, k = np.asarray(q, np.float64)[:, :prompt], np.asarray(k, np.float64)[:, :prompt]
    B, T, H, D = q.shape
    G = H // Hkv
    out = np.zeros((B, Hkv, middle), np.int64)
    for b in range(B):
        for g in range(Hkv):
            mass = np.zeros(T)
            for h in range(g * G, (g + 1) * G):
                for t in range(T - window, T):
                    logits = k[b, :t + 1, g] @ q[b, t, h] / np.sqrt(D)
                    p = np.exp(logits - logits.max())
                    mass[:t + 1] += p / p.sum()
            candidates = sorted(range(sink, T - recent), key=lambda j: (-mass[j], j))
            out[b, g] = sorted(candidates[:middle])
    return out


def decode_mask(T, prompt, H, Hkv, heterogeneous, middles, sink, recent):
    """[B, H, T, T] bool: row p (a decoded token) sees everything causal (heterogeneous kv head) or its sinks,
    middles and the `recent` newest tokens; prompt rows see everything causal (the prompt is not compressed)."""
    B = heterogeneous.shape[0]
    mask = np.zeros((B, H, T, T), bool)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            for p in range(T):
                if p < prompt or heterogeneous[b, g]:
                    mask[b, h, p, :p + 1] = True
                else:
                    mask[b, h, p, :sink] = True
                    mask[b, h, p, middles[b, g]] = True
                    mask[b, h, p, max(0, p - recent + 1):p + 1] = True
    return jnp.asarray(mask)


def run(q, k, v, heterogeneous, prompt, capacity, **sizes):
    @jax.jit
    def go(q, k, v, heterogeneous):
        out, cache = TaskKVCache.prefill(q[:, :prompt], k[:, :prompt], v[:, :prompt], heterogeneous,
                                         capacity=capacity, **sizes)

        def one(cache, token):
            step_out, cache = cache.step(*token)
            return cache, step_out
        cache, outs = jax.lax.scan(one, cache, tuple(jnp.moveaxis(x[:, prompt:], 1, 0) for x in (q, k, v)))
        return jnp.concatenate([out, jnp.moveaxis(outs, 0, 1)], axis=1), cache
    return go(q, k, v, heterogeneous)


@pytest.mark.parametrize("H,Hkv,flags", [(6, 2, "none"), (4, 1, "all"), (8, 4, "mixed")])
def test_decode_matches_per_head_masked_dense_attention(H, Hkv, flags):
    B, T, prompt, D = 2, 27, 17, 16
    sizes = dict(sink=2, recent=4, middle=3, window=5)
    q, k, v = numpy_qkv(H, B, T, T, H, Hkv, D)
    vectors = jnp.asarray(np.random.default_rng(H).standard_normal((B, H, 8)), jnp.float32)
    ratio = {"none": 0.0, "all": 1.0, "mixed": 0.25}[flags]
    heterogeneous = kv_head_flags(semantic_separator(vectors, ratio=ratio), Hkv)
    out, cache = run(q, k, v, heterogeneous, prompt, T + 3, **sizes)
    middles = numpy_middles(q, k, prompt, Hkv, sizes["window"], sizes["sink"], sizes["recent"], sizes["middle"])
    flags_np = np.asarray(heterogeneous)
    want = jax.jit(lambda q, k, v, m: reference_attention(q, k, v, mask=m))(
        q, k, v, decode_mask(T, prompt, H, Hkv, flags_np, middles, sizes["sink"], sizes["recent"]))
    assert_close(out, want)
    if flags == "all":                                  # ratio = 1: the full cache, plain causal attention
        assert_close(out, reference_attention(q, k, v, causal=True))
        np.testing.assert_array_equal(cache.lengths, T)
    if flags == "none":                                 # ratio = 0: every head sink + middle + recent
        assert not flags_np.any()
        np.testing.assert_array_equal(cache.lengths, 2 + 3 + 4)
    if flags == "mixed":
        assert flags_np.any() and not flags_np.all()


def test_middle_activations_follow_the_transcription():
    B, T, H, Hkv = 2, 15, 4, 2
    q, k, _ = numpy_qkv(11, B, T, T, H, Hkv, 8)
    _, probs = jax.jit(lambda q, k: reference_attention(q, k, k, causal=True, return_probs=True))(q, k)
    window = probs[:, :, T - 4:].reshape(B, Hkv, H // Hkv, 4, T).sum(2)
    got = middle_activation_indices(window, 5, sink=1, recent=3)
    np.testing.assert_array_equal(got, numpy_middles(q, k, T, Hkv, 4, 1, 3, 5))
    ties = jnp.ones((1, 1, 2, 9))                        # all equal: the lowest positions of the middle range
    np.testing.assert_array_equal(middle_activation_indices(ties, 3, sink=2, recent=2)[0, 0], [2, 3, 4])


def numpy_semantic_vectors(outputs, W_O):
    B, W, H, Dh = outputs.shape
    return np.stack([np.stack([outputs[b, :, h].mean(0) @ W_O[h * Dh:(h + 1) * Dh] for h in range(H)])
                     for b in range(B)])


def test_selection_is_deterministic_and_permutation_equivariant():
    rng = np.random.default_rng(12)
    B, W, H, Dh, d = 2, 5, 6, 4, 10
    outputs = rng.standard_normal((B, W, H, Dh)).astype(np.float32)
    W_O = rng.standard_normal((H * Dh, d)).astype(np.float32)
    vectors = head_semantic_vectors(jnp.asarray(outputs), jnp.asarray(W_O))
    assert_close(vectors, numpy_semantic_vectors(outputs.astype(np.float64), W_O.astype(np.float64)))
    v64 = np.asarray(vectors, np.float64)
    distances = np.linalg.norm(v64 - v64.mean(1, keepdims=True), axis=-1)
    assert_close(semantic_distances(vectors), distances)
    for ratio in (0.0, 0.34, 0.5, 1.0):
        chosen = np.asarray(semantic_separator(vectors, ratio=ratio))
        count = int(np.floor(ratio * H + 0.5))
        want = np.zeros((B, H), bool)
        for b in range(B):
            want[b, np.argsort(-distances[b], kind="stable")[:count]] = True
        np.testing.assert_array_equal(chosen, want)
        np.testing.assert_array_equal(semantic_separator(vectors, ratio=ratio), chosen)        # deterministic
    np.testing.assert_array_equal(semantic_separator(vectors, threshold=float(np.median(distances))),
                                  distances > np.median(distances))
    perm = rng.permutation(H)
    W_perm = W_O.reshape(H, Dh, d)[perm].reshape(H * Dh, d)
    permuted = head_semantic_vectors(jnp.asarray(outputs[:, :, perm]), jnp.asarray(W_perm))
    assert_close(permuted, np.asarray(vectors)[:, perm])
    np.testing.assert_array_equal(semantic_separator(permuted, ratio=0.5),
                                  np.asarray(semantic_separator(vectors, ratio=0.5))[:, perm])


def test_per_head_compress_gathers_each_heads_positions():
    q, k, v = numpy_qkv(13, 2, 9, 9, 4, 2, 8)
    keep = jnp.asarray(np.random.default_rng(14).integers(0, 9, (2, 2, 4)), jnp.int32)
    k_kept, v_kept = per_head_kv_compress(k, v, keep)
    kk, vv, idx = np.asarray(k), np.asarray(v), np.asarray(keep)
    for b in range(2):
        for g in range(2):
            np.testing.assert_array_equal(k_kept[b, g], kk[b, idx[b, g], g])
            np.testing.assert_array_equal(v_kept[b, g], vv[b, idx[b, g], g])


def test_bad_arguments_are_named():
    q, k, v = numpy_qkv(15, 1, 8, 8, 2, 2, 8)
    flags = jnp.zeros((1, 2), bool)
    with pytest.raises(ValueError, match="exactly one of ratio and threshold"):
        semantic_separator(jnp.ones((2, 3)), ratio=0.5, threshold=1.0)
    with pytest.raises(ValueError, match="ratio"):
        semantic_separator(jnp.ones((2, 3)), ratio=1.5)
    with pytest.raises(ValueError, match="middle activations do not fit"):
        middle_activation_indices(jnp.ones((1, 1, 2, 6)), 4, sink=1, recent=2)
    with pytest.raises(ValueError, match="capacity"):
        jax.eval_shape(lambda q, k, v: TaskKVCache.prefill(q, k, v, flags, capacity=4, sink=1, recent=2, middle=1,
                                                           window=2), q, k, v)
    with pytest.raises(ValueError, match="heterogeneous"):
        jax.eval_shape(lambda q, k, v: TaskKVCache.prefill(q, k, v, flags[:, :1], capacity=8, sink=1, recent=2,
                                                           middle=1, window=2), q, k, v)
    with pytest.raises(ValueError, match="W_O"):
        head_semantic_vectors(jnp.ones((1, 2, 2, 4)), jnp.ones((6, 3)))
