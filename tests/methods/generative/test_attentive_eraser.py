"""P34 Attentive Eraser: AAS (masked-key attention with similarity suppression), SARG guidance, the token-mask
pooling and the layer/step schedule hook (tiny shapes, fresh random inputs, an untrained tiny TinyDiT)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.core.reference import reference_attention
from jattn.methods.generative.attentive_eraser import (AASSchedule, aas_hook, masked_key_attention, sarg_guidance,
                                                       token_mask)

TOL = dict(rtol=1e-5, atol=1e-5)
_mka = jax.jit(masked_key_attention, static_argnames=("fg_scale", "scale", "impl"))


def _qkv(seed, B=2, N=8, H=2, D=8):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(kk, (B, N, H, D)) for kk in ks)


def _mask(seed, B=2, N=8, p=0.4):
    m = np.array(jax.random.uniform(jax.random.key(seed + 100), (B, N)) < p)
    m[:, 0] = False          # at least one background key per row
    m[:, 1] = True           # at least one foreground token
    return jnp.asarray(m)


def test_empty_mask_is_dense_attention():
    """m = 0 (no foreground) gives plain dense attention, with or without the query path and any lam (catches
    a mask applied regardless of m, or lam applied to background queries)."""
    q, k, v = _qkv(0)
    none = jnp.zeros((2, 8), bool)
    dense = reference_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(_mka(q, k, v, none)), np.asarray(dense), **TOL)
    np.testing.assert_allclose(np.asarray(_mka(q, k, v, none, none, fg_scale=0.3)), np.asarray(dense), **TOL)


def test_output_reads_background_values_only():
    """Inflating the foreground values by 1e3 leaves every output unchanged (catches the key mask dropped or
    put on the query axis), and the output is a convex combination of background values: inside their
    per-channel min/max (catches an unnormalised softmax)."""
    q, k, v = _qkv(1)
    m = _mask(1)
    qm = _mask(2)
    out = np.asarray(_mka(q, k, v, m, qm, fg_scale=0.3))
    v_big = jnp.where(m[:, :, None, None], v * 1e3 + 50.0, v)
    np.testing.assert_allclose(np.asarray(_mka(q, k, v_big, m, qm, fg_scale=0.3)), out, **TOL)
    vn, mn = np.asarray(v), np.asarray(m)
    for b in range(2):
        bg = vn[b][~mn[b]]                                  # [n_bg, H, D]
        assert np.all(out[b] <= bg.max(0)[None] + 1e-5) and np.all(out[b] >= bg.min(0)[None] - 1e-5)


def test_hand_built_two_keys():
    """One background key and one foreground key: every query's output is exactly the background value (catches
    -inf added to the background instead of the foreground)."""
    q = jax.random.normal(jax.random.key(3), (1, 3, 1, 4))
    k = jax.random.normal(jax.random.key(4), (1, 2, 1, 4))
    v = jnp.array([[[[1.0, 2.0, 3.0, 4.0]], [[-7.0, -7.0, -7.0, -7.0]]]])
    out = np.asarray(masked_key_attention(q, k, v, jnp.array([[False, True]])))
    np.testing.assert_allclose(out, np.broadcast_to([1.0, 2.0, 3.0, 4.0], (1, 3, 1, 4)), **TOL)


def test_lambda_one_collapses_paths_and_lambda_flattens_foreground_queries():
    """lam = 1 makes the query mask irrelevant (catches the two paths differing at lam=1, e.g. an extra scale);
    lam < 1 changes only foreground-query rows, and lam -> 0 gives them the uniform mean of background values
    (catches lam applied to the wrong rows, or multiplying probabilities instead of logits)."""
    q, k, v = _qkv(5)
    m, qm = _mask(5), _mask(6)
    base = np.asarray(_mka(q, k, v, m))
    np.testing.assert_allclose(np.asarray(_mka(q, k, v, m, qm, fg_scale=1.0)), base, **TOL)
    low = np.asarray(_mka(q, k, v, m, qm, fg_scale=1e-6))
    qmn, mn, vn = np.asarray(qm), np.asarray(m), np.asarray(v)
    np.testing.assert_allclose(low[~qmn], base[~qmn], **TOL)
    for b in range(2):
        mean_bg = vn[b][~mn[b]].mean(0)
        np.testing.assert_allclose(low[b][qmn[b]], np.broadcast_to(mean_bg, low[b][qmn[b]].shape), atol=1e-4)
    assert np.abs(low[qmn] - base[qmn]).max() > 1e-2


def test_sarg_guidance_identities():
    """s = 1 gives eps_w, s = 0 gives eps_wo, s = 2 the extrapolation 2 eps_w - eps_wo (catches the branches
    swapped or the difference taken the wrong way)."""
    a, b = jax.random.normal(jax.random.key(7), (2, 2, 4, 4, 3))
    np.testing.assert_allclose(np.asarray(sarg_guidance(a, b, 1.0)), np.asarray(b), **TOL)
    np.testing.assert_allclose(np.asarray(sarg_guidance(a, b, 0.0)), np.asarray(a), **TOL)
    np.testing.assert_allclose(np.asarray(sarg_guidance(a, b, 2.0)), np.asarray(2 * b - a), **TOL)


def test_token_mask_max_pools_row_major():
    """A single foreground pixel marks exactly its patch, row-major (catches mean-pooling + threshold, or a
    transposed grid)."""
    pix = np.zeros((1, 8, 8), bool)
    pix[0, 5, 2] = True                                         # row 5 -> patch row 2; col 2 -> patch col 1
    got = np.asarray(token_mask(jnp.asarray(pix), 4))
    want = np.zeros((1, 16), bool)
    want[0, 2 * 4 + 1] = True
    np.testing.assert_array_equal(got, want)


def test_schedule_layers_steps_and_ss_window():
    """The schedule names exactly the layers in range, is empty outside the step range, and uses the query
    path only while step <= ss_steps (catches off-by-one ranges and the suppression never switching off)."""
    sched = AASSchedule(start_layer=1, end_layer=3, start_step=2, end_step=6, ss_steps=3, ss_scale=1e-6)
    q, k, v = _qkv(8)
    m = _mask(8)
    assert sched.attn_fns(1, m) == {} and sched.attn_fns(6, m) == {}
    fns = sched.attn_fns(3, m)
    assert sorted(fns) == [1, 2]
    early = np.asarray(fns[1](q, k, v))
    late = np.asarray(sched.attn_fns(4, m)[2](q, k, v))
    np.testing.assert_allclose(late, np.asarray(masked_key_attention(q, k, v, m)), **TOL)
    np.testing.assert_allclose(early, np.asarray(masked_key_attention(q, k, v, m, m, 1e-6)), **TOL)
    assert np.abs(early - late).max() > 1e-3


def test_hook_in_tiny_dit_changes_only_hooked_layers():
    """On an untrained TinyDiT (adaLN weights randomised so blocks are not the identity), an AAS hook with an
    empty mask reproduces the plain model, and a real mask changes the output (catches the hook ignored)."""
    from jattn.nn.dit import TinyDiT

    model = TinyDiT(rngs=nnx.Rngs(0), image_size=8, channels=3, patch_size=2, dim=16, depth=2, num_heads=2,
                    num_classes=1)
    for i, blk in enumerate(model.blocks):
        blk.adaLN.kernel[...] = jax.random.normal(jax.random.key(10 + i), blk.adaLN.kernel.shape) * 0.3
    model.final_linear.kernel[...] = jax.random.normal(jax.random.key(20), model.final_linear.kernel.shape) * 0.3
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    t, y = jnp.array([10, 500]), jnp.zeros(2, jnp.int32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x, t, y, km, qm):                 # one compiled call: empty, partial and real masks
        m = nnx.merge(graphdef, state)
        empty = aas_hook(jnp.zeros_like(km), jnp.zeros_like(qm), 0.3)
        return (m(x, t, y), m(x, t, y, attn_fns={0: empty, 1: empty}),
                m(x, t, y, attn_fns={1: aas_hook(km, qm, 0.3)}))

    plain, same, hooked = (np.asarray(a) for a in run(state, x, t, y, _mask(9, N=16), _mask(9, N=16)))
    np.testing.assert_allclose(same, plain, rtol=1e-4, atol=1e-5)
    assert np.abs(hooked - plain).max() > 1e-4


def test_bad_arguments_raise_naming_the_argument():
    """Wrong mask dtype / shape, a non-positive lam, mismatched eps shapes and bad schedules raise naming the
    argument."""
    q, k, v = _qkv(0)
    with pytest.raises(TypeError, match="key_mask"):
        masked_key_attention(q, k, v, jnp.zeros((2, 8)))
    with pytest.raises(ValueError, match="key_mask"):
        masked_key_attention(q, k, v, jnp.zeros((2, 7), bool))
    with pytest.raises(ValueError, match="query_mask"):
        masked_key_attention(q, k, v, jnp.zeros((2, 8), bool), jnp.zeros((1, 8), bool))
    with pytest.raises(ValueError, match="fg_scale"):
        masked_key_attention(q, k, v, jnp.zeros((2, 8), bool), fg_scale=0.0)
    with pytest.raises(ValueError, match="q must"):
        masked_key_attention(q[0], k, v, jnp.zeros((2, 8), bool))
    with pytest.raises(ValueError, match="eps_wo"):
        sarg_guidance(jnp.ones((2, 3)), jnp.ones((3, 2)), 1.0)
    with pytest.raises(ValueError, match="start_layer"):
        AASSchedule(start_layer=3, end_layer=2)
    with pytest.raises(ValueError, match="grid"):
        token_mask(jnp.zeros((1, 8, 8), bool), 3)
