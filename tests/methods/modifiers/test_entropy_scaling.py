"""P28 entropy-scaled attention: the scale rule, its per-query form, the nn adapter and the entropy argument."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.core.reference import reference_attention
from jattn.methods.modifiers import entropy_scaling as es
from jattn.nn.attention import Attention
from jattn.nn.attention_maps import attention_entropy


def _qkv(seed, B=2, T=12, S=12, H=2, D=8):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32)
                 for shape in ((B, T, H, D), (B, S, H, D), (B, S, H, D)))


def test_n_equal_t_is_exact_softmax_attention():
    """Catches a factor applied even when N == T (e.g. ln N / ln 2, or a missing sqrt of 1 replaced by ln)."""
    q, k, v = _qkv(1)
    out = es.entropy_scaled_attention(q, k, v, train_keys=12, impl="reference")
    np.testing.assert_allclose(out, reference_attention(q, k, v), atol=1e-5)
    assert es.entropy_invariant_scale(8, 16, 16) == pytest.approx(8 ** -0.5)


def test_scale_formula_and_monotone_in_n():
    """Catches log_N T instead of log_T N, a missing square root, or no clamp of N, T at 2."""
    d, T = 64, 256
    scales = [es.entropy_invariant_scale(d, n, T) for n in (2, 16, 256, 1024, 4096)]
    assert all(a < b for a, b in zip(scales, scales[1:]))
    assert scales[3] == pytest.approx(math.sqrt(math.log(1024) / math.log(256)) / 8.0, rel=1e-12)
    assert es.entropy_factor(1, 4) == es.entropy_factor(2, 4) == pytest.approx(math.sqrt(0.5))
    assert math.isfinite(es.entropy_factor(5, 1))  # T = 1 clamped to 2: no division by ln 1 = 0
    assert es.entropy_factor(2, 4, only_longer=True) == 1.0 and es.entropy_factor(16, 4, only_longer=True) > 1


def test_scalar_factor_equals_reference_with_that_scale():
    """Catches the factor on the wrong side (dividing the logits) or on the values instead of the logits."""
    q, k, v = _qkv(2)
    lam = es.entropy_invariant_scale(8, 12, 5)
    out = es.entropy_scaled_attention(q, k, v, train_keys=5, impl="reference")
    np.testing.assert_allclose(out, reference_attention(q, k, v, scale=lam), atol=1e-5)


def test_causal_per_query_counts_each_querys_visible_keys():
    """Catches using the key length S for every causal query instead of i + 1 (per_query=True)."""
    q, k, v = _qkv(3)
    train = 4
    lam = es.entropy_invariant_scale(8, 7, train)  # query 6 sees 7 keys

    @jax.jit
    def run(q, k, v):
        out = es.entropy_scaled_attention(q, k, v, train_keys=train, causal=True, impl="reference")
        row = reference_attention(q[:, 6:7], k[:, :7], v[:, :7], scale=lam)
        fused = es.entropy_scaled_attention(q, k, v, train_keys=train, causal=True, impl="xla")
        flat = es.entropy_scaled_attention(q, k, v, train_keys=train, causal=True, per_query=False, impl="reference")
        flat_ref = reference_attention(q, k, v, causal=True, scale=es.entropy_invariant_scale(8, 12, train))
        return out, row, fused, flat, flat_ref
    out, row, fused, flat, flat_ref = run(q, k, v)
    np.testing.assert_allclose(out[:, 6], row[:, 0], atol=1e-5)
    np.testing.assert_allclose(fused, out, atol=1e-5)  # the flash (score_mod) path agrees with the dense one
    np.testing.assert_allclose(flat, flat_ref, atol=1e-5)  # per_query=False: one scalar from S (paper literal)


def test_only_longer_leaves_a_causal_model_exact_up_to_its_training_length():
    """Catches only_longer shrinking early queries (factor < 1) or sharpening queries that see <= T keys."""
    q, k, v = _qkv(4)
    out = es.entropy_scaled_attention(q, k, v, train_keys=8, causal=True, only_longer=True, impl="reference")
    exact = reference_attention(q, k, v, causal=True)
    np.testing.assert_allclose(out[:, :8], exact[:, :8], atol=1e-5)
    assert float(jnp.max(jnp.abs(out[:, 8:] - exact[:, 8:]))) > 1e-3


def test_padding_mask_counts_real_tokens_per_sequence():
    """Catches counting padded keys in N (a padded batch would get the batch length's factor)."""
    q, k, v = _qkv(5)
    valid = np.ones((2, 12), bool)
    valid[1, 6:] = False
    mask = jnp.asarray(valid)[:, None, None, :]
    counts = es.visible_key_counts(12, 12, mask=mask)
    assert counts.shape == (2, 1, 12) and int(counts[0, 0, 0]) == 12 and int(counts[1, 0, 0]) == 6
    out = es.entropy_scaled_attention(q, k, v, train_keys=3, mask=mask, impl="reference")
    lam = es.entropy_invariant_scale(8, 6, 3)
    short = reference_attention(q[1:, :6], k[1:, :6], v[1:, :6], scale=lam)
    np.testing.assert_allclose(out[1:, :6], short, atol=1e-5)


@functools.partial(jax.jit, static_argnums=2)
def _probs_plain_and_scaled(q, k, train_keys):
    _, p = reference_attention(q, k, k, return_probs=True)
    _, ps = es.entropy_scaled_attention(q, k, k, train_keys=train_keys, return_probs=True)
    return p, ps


def test_entropy_grows_with_ln_n_unscaled_and_stays_flat_scaled():
    """The spec's statistical argument on Gaussian q, k with peaked attention (|q| x 4: logit std ~4; with unit
    logits the flattening is small, see docs/modifiers.md). Catches an inverted factor (entropy would grow faster)."""
    rng = np.random.default_rng(6)
    D, T = 16, 64
    q = jnp.asarray(4.0 * rng.normal(size=(1, 32, 1, D)), jnp.float32)
    plain, scaled = [], []
    for n in (16, 64, 256, 1024):
        k = jnp.asarray(rng.normal(size=(1, n, 1, D)), jnp.float32)
        p, ps = _probs_plain_and_scaled(q, k, T)
        plain.append(float(jnp.mean(attention_entropy(p))))
        scaled.append(float(jnp.mean(attention_entropy(ps))))
    slope_plain = np.polyfit(np.log([16, 64, 256, 1024]), plain, 1)[0]
    slope_scaled = np.polyfit(np.log([16, 64, 256, 1024]), scaled, 1)[0]
    assert slope_plain > 0.2 and slope_scaled < 0.5 * slope_plain
    assert abs(scaled[1] - plain[1]) < 1e-4  # N = T: unchanged


def test_nn_adapter_matches_softmax_at_training_length_and_decodes_like_prefill():
    """Catches the adapter ignoring train_keys or the decode path counting the whole cache as N."""
    es.register_entropy_method()
    x = jnp.asarray(np.random.default_rng(7).normal(size=(1, 8, 16)), jnp.float32)
    fwd = nnx.jit(lambda m, x: m(x))
    base = fwd(Attention(16, 2, rngs=nnx.Rngs(0), impl="reference"), x)
    at_t = Attention(16, 2, rngs=nnx.Rngs(0), method="entropy_scaled", train_keys=8, per_query=False, impl="reference")
    np.testing.assert_allclose(fwd(at_t, x), base, atol=1e-5)
    mod2 = Attention(16, 2, rngs=nnx.Rngs(0), method="entropy_scaled", train_keys=3, impl="reference")
    full = fwd(mod2, x)
    assert float(jnp.max(jnp.abs(full - base))) > 1e-4
    mod2.init_cache(1, 8)
    steps = [nnx.jit(lambda m, x: m(x, decode=True, prefill=True))(mod2, x[:, :7]),
             nnx.jit(lambda m, x: m(x, decode=True))(mod2, x[:, 7:8])]
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_bad_arguments_name_themselves():
    """Catches silent acceptance of bad counts, flags and configs."""
    q, k, v = _qkv(8)
    with pytest.raises(ValueError, match="train_keys"):
        es.entropy_scaled_attention(q, k, v, train_keys=0)
    with pytest.raises(ValueError, match="n_keys"):
        es.entropy_invariant_scale(8, -3, 4)
    with pytest.raises(TypeError, match="only_longer"):
        es.entropy_factor(4, 4, only_longer="yes")
    with pytest.raises(TypeError, match="per_query"):
        es.entropy_scaled_attention(q, k, v, train_keys=4, per_query=1)
    with pytest.raises(ValueError, match="factors"):
        es.entropy_score_mod(jnp.ones((3,)))
    es.register_entropy_method()
    with pytest.raises(TypeError, match="train_keys"):
        Attention(16, 2, rngs=nnx.Rngs(0), method="entropy_scaled")
