"""P19 X-EcoMLA: MLA, its absorbed decode, SVD upcycling from GQA, the KV formula and the KD loss.

Mutations caught (each tried by hand):
- ``test_full_rank_upcycling_reproduces_the_projections``: the key part of ``W_kvb`` keeping the rope dims
  instead of the first ``d_n``; the kv heads tiled (``tile``) instead of repeated per group; ``S`` dropped
  from the down projection.
- ``test_upcycled_mqa_layer_equals_the_teacher_at_position_zero``: ``W_kr`` from the first ``d_r`` dims;
  ``w_o`` not carried over.
- ``test_mla_attention_equals_a_literal_transcription``: the scale ``1/sqrt(d_v)`` instead of
  ``1/sqrt(d_n + d_r)``; RoPE on the nope dims; the rope key per head instead of shared.
- ``test_absorbed_decode_equals_the_expanded_form``: the rope half of the absorbed query dropped; ``W_vb``
  taken from the key columns; new tokens placed at position 0 instead of after the cache.
- ``test_truncation_error_falls_with_rank``: the factors truncated from the wrong end of the spectrum.
- ``test_kv_bytes_match_the_papers_compression``: ``2 * (r_kv + d_r)`` cached (a separate V).
- ``test_kd_loss_is_the_teachers_kl``: KL(student || teacher); mean over masked-out positions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.kv import x_ecomla as mla
from jattn.nn.attention import Attention
from tests.conftest import assert_close, random_array


def _gqa_weights(seed, dim=24, H=4, Hkv=2, D=8):
    rng = np.random.default_rng(seed)
    w = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32) / np.sqrt(shape[0]))  # noqa: E731
    return w(dim, H * D), w(dim, Hkv * D), w(dim, Hkv * D), w(H * D, dim)


@pytest.mark.parametrize("H, Hkv", [(4, 2), (4, 4), (6, 2)])
def test_full_rank_upcycling_reproduces_the_projections(H, Hkv):
    D, dr, dim = 8, 4, 24
    w_q, w_k, w_v, w_o = _gqa_weights(0, dim, H, Hkv, D)
    weights, dims = mla.upcycle_gqa_to_mla(w_q, w_k, w_v, w_o, num_heads=H, num_kv_heads=Hkv, head_dim=D,
                                           rope_dim=dr)
    x = random_array(1, 2, 5, dim)
    q = (x @ w_q).reshape(2, 5, H, D)
    k = jnp.repeat((x @ w_k).reshape(2, 5, Hkv, D), H // Hkv, axis=2)
    v = jnp.repeat((x @ w_v).reshape(2, 5, Hkv, D), H // Hkv, axis=2)
    zero = jnp.zeros((1, 5), jnp.int32)  # RoPE at position 0 is the identity
    q_nope, q_rope, c_kv, k_rope = mla.mla_project(x, weights, dims, zero)
    k_nope, v_mla = mla.expand_latent(c_kv, weights.w_kvb, dims)
    assert_close(q_nope, q[..., :D - dr], what="q_nope")
    assert_close(q_rope, q[..., D - dr:], what="q_rope")
    assert_close(k_nope, k[..., :D - dr], what="k_nope")
    assert_close(v_mla, v, what="v")
    assert_close(k_rope, jnp.mean((x @ w_k).reshape(2, 5, Hkv, D)[..., D - dr:], axis=2), what="k_rope")


def test_upcycled_mqa_layer_equals_the_teacher_at_position_zero():
    """With one kv head the shared rope key is exact, so at full rank (and RoPE the identity) the MLA layer
    is the teacher layer."""
    dim, H, D = 32, 4, 8
    teacher = Attention(dim, H, num_kv_heads=1, rope=True, causal=True, rngs=nnx.Rngs(3))
    student = mla.MLAAttention.from_attention(teacher, rope_dim=4)
    x = random_array(4, 2, 7, dim)
    zero = jnp.zeros((1, 7), jnp.int32)
    assert_close(student(x, positions=zero), teacher(x, positions=zero), what="out")


def test_absorbed_decode_equals_the_expanded_form():
    dims = mla.MLADims(num_heads=4, nope_dim=6, rope_dim=4, value_dim=5, kv_rank=12, q_rank=10)
    layer = mla.MLAAttention(16, dims, rngs=nnx.Rngs(0))
    x = random_array(5, 2, 11, 16)
    want = layer(x)
    layer.init_cache(2, 16)
    step = nnx.jit(lambda layer, x: layer(x, decode=True))
    got = [step(layer, x[:, :6])] + [step(layer, x[:, t:t + 1]) for t in range(6, 11)]
    assert_close(jnp.concatenate(got, axis=1), want, what="decoded")
    assert int(layer.cache_lengths[...][0]) == 11


def _numpy_rope(x, positions, theta=10000.0):
    half = x.shape[-1] // 2
    angles = positions[..., None] * theta ** (-np.arange(0, 2 * half, 2) / (2 * half))
    cos, sin = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


def test_mla_attention_equals_a_literal_transcription():
    """The MLA formulas of the module docstring, written out in numpy (causal, d_v != d_n + d_r)."""
    dims = mla.MLADims(num_heads=3, nope_dim=6, rope_dim=4, value_dim=5, kv_rank=7, q_rank=9)
    H, dn, dr, dv, _, _ = dims
    layer = mla.MLAAttention(16, dims, rngs=nnx.Rngs(1))
    w = {k: np.asarray(v, np.float64) for k, v in layer.weights()._asdict().items()}
    x = np.asarray(random_array(8, 1, 9, 16), np.float64)
    pos = np.arange(9)[None].astype(np.float64)
    q = (x @ w["w_qa"] @ w["w_qb"]).reshape(1, 9, H, dn + dr)
    q = np.concatenate([q[..., :dn], _numpy_rope(q[..., dn:], pos)], -1)
    kv = (x @ w["w_kva"] @ w["w_kvb"]).reshape(1, 9, H, dn + dv)
    k_rope = _numpy_rope((x @ w["w_kr"])[:, :, None], pos)
    k = np.concatenate([kv[..., :dn], np.repeat(k_rope, H, axis=2)], -1)
    s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(dn + dr)
    s = np.where(np.tril(np.ones((9, 9), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhij,bjhv->bihv", p, kv[..., dn:]).reshape(1, 9, H * dv) @ w["w_o"]
    assert_close(layer(jnp.asarray(x, jnp.float32)), jnp.asarray(out, jnp.float32), what="out")


def test_decode_past_the_cache_raises():
    dims = mla.MLADims(2, 4, 4, 4, 8, 8)
    layer = mla.MLAAttention(8, dims, rngs=nnx.Rngs(0))
    layer.init_cache(1, 16)
    layer(random_array(0, 1, 16, 8), decode=True)
    with pytest.raises(ValueError, match="capacity 16"):
        layer(random_array(1, 1, 1, 8), decode=True)


def test_truncation_error_falls_with_rank():
    w_q, w_k, w_v, w_o = _gqa_weights(2, 32, 4, 2, 8)
    x = random_array(3, 1, 9, 32)
    v = jnp.repeat((x @ w_v).reshape(1, 9, 2, 8), 2, axis=2)
    errors = []
    for rank in (4, 8, 16, 24, 32):
        weights, dims = mla.upcycle_gqa_to_mla(w_q, w_k, w_v, w_o, num_heads=4, num_kv_heads=2, head_dim=8,
                                               rope_dim=4, kv_rank=rank)
        _, v_mla = mla.expand_latent(x @ weights.w_kva, weights.w_kvb, dims)
        errors.append(float(jnp.linalg.norm(v_mla - v)))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4 * errors[0]


def test_energy_rank_is_the_smallest_rank_keeping_the_ratio():
    s = np.array([4.0, 2.0, 1.0, 1.0, 0.5] + [0.1] * 11)
    energy = np.cumsum(s ** 2) / np.sum(s ** 2)
    for ratio in (0.5, 0.9, 0.99):
        want = int(np.argmax(energy >= ratio)) + 1
        assert mla.energy_rank(s, ratio, multiple=1) == want
        assert mla.energy_rank(s, ratio) == min(-(-want // 8) * 8, 16)


def test_kv_bytes_match_the_papers_compression():
    """Llama-3.2-1B (Hkv=8, D=64): r_kv=64, d_r=32 is 10.67x; r_kv=128 is 6.4x (X-EcoMLA, Sec. 4)."""
    llama = dict(kv_heads=8, head_dim=64)
    assert mla.kv_compression(mla.MLADims(32, 32, 32, 64, 64, 1424), **llama) == pytest.approx(10.67, abs=5e-3)
    assert mla.kv_compression(mla.MLADims(32, 32, 32, 64, 128, 1424), **llama) == pytest.approx(6.4)
    dims = mla.MLADims(2, 4, 4, 4, 8, 8)
    layer = mla.MLAAttention(8, dims, rngs=nnx.Rngs(0))
    layer.init_cache(3, 32)
    assert layer.latent_cache[...].nbytes == 3 * 32 * mla.kv_values_per_token(dims) * 4


def test_kd_loss_is_the_teachers_kl():
    t, s = random_array(6, 3, 5, 11), random_array(7, 3, 5, 11)
    mask = jnp.asarray(np.random.default_rng(0).random((3, 5)) > 0.4)
    pt, ps = jax.nn.softmax(t), jax.nn.softmax(s)
    kl = np.sum(np.asarray(pt) * (np.log(np.asarray(pt)) - np.log(np.asarray(ps))), -1)
    assert float(mla.kd_kl_loss(t, s, mask)) == pytest.approx(float(np.sum(kl * mask) / np.sum(mask)), rel=1e-5)
    assert float(mla.kd_kl_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_bad_arguments_are_named():
    w_q, w_k, w_v, w_o = _gqa_weights(0)
    with pytest.raises(ValueError, match="rope_dim"):
        mla.upcycle_gqa_to_mla(w_q, w_k, w_v, w_o, num_heads=4, num_kv_heads=2, head_dim=8, rope_dim=8)
    with pytest.raises(ValueError, match="w_k must be"):
        mla.upcycle_gqa_to_mla(w_q, w_v[:, :8], w_v, w_o, num_heads=4, num_kv_heads=2, head_dim=8, rope_dim=4)
    with pytest.raises(ValueError, match="latent_cache must be"):
        dims = mla.MLADims(2, 4, 4, 4, 8, 8)
        mla.mla_decode_absorbed(jnp.ones((1, 1, 2, 4)), jnp.ones((1, 1, 2, 4)), jnp.ones((1, 2, 16, 12)),
                                jnp.array([3]), jnp.ones((8, 16)), dims)
