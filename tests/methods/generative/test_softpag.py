"""P07 HeadHunter + SoftPAG: the softened map, the map-free perturbed attention, the guidance rules and the greedy
head search (tiny shapes, fresh random inputs, an untrained small TinyDiT)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.core.reference import reference_attention
from jattn.methods.generative.softpag import (cfg_pag_guidance, head_mask_from_heads, headhunter_greedy,
                                              perturbation_guidance, perturbed_attention, soft_pag)

TOL = dict(rtol=1e-5, atol=1e-5)
# jitted once per shape: eager op-by-op dispatch dominates these tiny tests otherwise (argument validation is
# exercised eagerly in test_bad_arguments_raise_naming_the_argument)
_pa = jax.jit(perturbed_attention, static_argnames=("scale",))
_sp = jax.jit(soft_pag)


def _qkv(seed, B=2, N=6, H=4, Hkv=4, D=8):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, N, H, D)), jax.random.normal(ks[1], (B, N, Hkv, D)),
            jax.random.normal(ks[2], (B, N, Hkv, D)))


def _probs(seed, B=2, H=3, N=5):
    return jax.nn.softmax(jax.random.normal(jax.random.key(seed), (B, H, N, N)) * 2.0, axis=-1)


def test_soft_pag_u0_is_identity_and_u1_is_eye():
    """u=0 returns A unchanged (catches a formula that always mixes in I); u=1 on a selected head gives exactly
    I and leaves unselected heads alone (catches the weight applied to the wrong head axis, or (1-u) dropped)."""
    A = _probs(0)
    mask = jnp.array([True, False, True])
    np.testing.assert_array_equal(np.asarray(_sp(A, 0.0, mask)), np.asarray(A))
    out = np.asarray(_sp(A, 1.0, mask))
    eye = np.broadcast_to(np.eye(5), (2, 5, 5))
    np.testing.assert_allclose(out[:, 0], eye, **TOL)
    np.testing.assert_allclose(out[:, 2], eye, **TOL)
    np.testing.assert_array_equal(out[:, 1], np.asarray(A)[:, 1])


def test_soft_pag_rows_sum_to_one_and_hand_value():
    """Rows of (1-u)A + uI sum to 1 (catches u I added without the (1-u) factor); a hand-built 2x2 map gives the
    known entries (catches I placed on the wrong axis / anti-diagonal)."""
    A = _probs(1)
    out = soft_pag(A, 0.3, jnp.ones(3))
    np.testing.assert_allclose(np.asarray(out.sum(-1)), 1.0, **TOL)
    hand = jnp.array([[[[0.2, 0.8], [0.6, 0.4]]]])
    got = np.asarray(soft_pag(hand, 0.5, jnp.ones(1)))[0, 0]
    np.testing.assert_allclose(got, [[0.6, 0.4], [0.3, 0.7]], **TOL)


def test_soft_pag_fractional_head_mask_scales_u():
    """A fractional head mask m gives effective strength u*m (catches the mask used as a boolean)."""
    A = _probs(2)
    np.testing.assert_allclose(np.asarray(soft_pag(A, 0.8, jnp.array([0.5, 0.5, 0.5]))),
                               np.asarray(soft_pag(A, 0.4, jnp.ones(3))), **TOL)


def test_perturbed_attention_u0_equals_attention_u1_equals_v():
    """u=0 is plain softmax attention (catches a leaked +u v term); u=1 on a head returns exactly that head's V
    while other heads keep attention (catches mixing on the wrong axis)."""
    q, k, v = _qkv(3)
    base = np.asarray(jax.jit(reference_attention)(q, k, v))
    np.testing.assert_allclose(np.asarray(_pa(q, k, v, jnp.ones(4), 0.0)), base, **TOL)
    out = np.asarray(_pa(q, k, v, jnp.array([1.0, 0.0, 0.0, 1.0]), 1.0))
    np.testing.assert_allclose(out[:, :, 0], np.asarray(v)[:, :, 0], **TOL)
    np.testing.assert_allclose(out[:, :, 3], np.asarray(v)[:, :, 3], **TOL)
    np.testing.assert_allclose(out[:, :, 1:3], base[:, :, 1:3], **TOL)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2)])
def test_perturbed_attention_equals_explicit_soft_pag(H, Hkv):
    """The map-free form (1-u) softmax(qk^T) v + u v equals the explicit (1-u)A+uI applied as a prob_mod, also
    under GQA (catches a wrong v repeat or a scale mismatch between the two paths)."""
    q, k, v = _qkv(4, H=H, Hkv=Hkv)
    mask = jnp.array([1.0, 0.0, 1.0, 0.5])
    u = 0.7
    fast = _pa(q, k, v, mask, u, scale=0.3)
    explicit = jax.jit(lambda q, k, v: reference_attention(q, k, v, scale=0.3,
                                                           prob_mod=lambda p: soft_pag(p, u, mask)))(q, k, v)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(explicit), **TOL)


def test_perturbed_attention_jits_with_traced_mask_and_u():
    """Traced head mask and u (the HeadHunter sampler's form) give the eager result (catches a concrete-only path)."""
    q, k, v = _qkv(5)
    mask, u = jnp.array([0.0, 1.0, 1.0, 0.0]), jnp.float32(0.4)
    eager = perturbed_attention(q, k, v, mask, u)
    jitted = jax.jit(perturbed_attention)(q, k, v, mask, u)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), **TOL)


def test_guidance_w0_and_known_value():
    """w=0 returns the unguided eps; w=2 gives eps + 2(eps - eps_pert) (catches a sign flip or a dropped w);
    cfg_pag_guidance with w_pag=0 is plain CFG and w_cfg=1, w_pag=0 the conditional eps."""
    ks = jax.random.split(jax.random.key(6), 3)
    e, ep, eu = (jax.random.normal(kk, (2, 4, 4, 1)) for kk in ks)
    np.testing.assert_array_equal(np.asarray(perturbation_guidance(e, ep, 0.0)), np.asarray(e))
    np.testing.assert_allclose(np.asarray(perturbation_guidance(e, ep, 2.0)), np.asarray(3 * e - 2 * ep), **TOL)
    np.testing.assert_allclose(np.asarray(cfg_pag_guidance(e, eu, ep, 3.0, 0.0)), np.asarray(eu + 3 * (e - eu)), **TOL)
    np.testing.assert_allclose(np.asarray(cfg_pag_guidance(e, eu, ep, 1.0, 0.0)), np.asarray(e), **TOL)
    np.testing.assert_allclose(np.asarray(cfg_pag_guidance(e, eu, ep, 2.0, 1.5)),
                               np.asarray(eu + 2 * (e - eu) + 1.5 * (e - ep)), **TOL)


def test_headhunter_finds_additive_optimum():
    """On an additive objective sum_{h in S} w_h the greedy selector with k=1 returns the top-`rounds` heads in
    order, and with k=2 the top 2*rounds (catches ascending sort, or re-selecting an already chosen head)."""
    rng = np.random.default_rng(7)
    heads = [(l, h) for l in range(3) for h in range(4)]
    weights = dict(zip(heads, rng.standard_normal(len(heads))))
    calls = []

    def eval_fn(selected):
        calls.append(selected)
        assert len(set(selected)) == len(selected)
        return sum(weights[h] for h in selected)

    best = sorted(heads, key=lambda h: -weights[h])
    out = headhunter_greedy(eval_fn, heads, k=1, rounds=3)
    assert out["selected"] == tuple(best[:3])
    assert out["evaluations"] == 12 + 11 + 10 == len(calls)
    out2 = headhunter_greedy(eval_fn, heads, k=2, rounds=2)
    assert set(out2["selected"]) == set(best[:4])
    out3 = headhunter_greedy(eval_fn, heads, k=5, rounds=10)
    assert sorted(out3["selected"]) == sorted(heads)


def test_softpag_in_tiny_dit_hook():
    """Inside an untrained small TinyDiT (made non-trivial by random adaLN weights), the attn_fns hook with
    perturbed_attention at u=0 reproduces the plain forward, u=1 on all heads equals the prob_mod identity path
    and differs from the plain one (catches the hook being ignored)."""
    from jattn.nn.dit import TinyDiT

    model = TinyDiT(rngs=nnx.Rngs(0), image_size=8, patch_size=4, dim=16, depth=1, num_heads=2)
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(8), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [l + 0.1 * jax.random.normal(kk, l.shape) for l, kk in zip(leaves, keys)]))
    x = jax.random.normal(jax.random.key(9), (2, 8, 8, 1))
    t, y = jnp.array([10, 500]), jnp.array([1, 3])
    scale = model.blocks[0].attn.scale
    graphdef, params = nnx.split(model)

    @jax.jit
    def forwards(params, x, t, y):
        m = nnx.merge(graphdef, params)
        fns0 = {i: (lambda q, k, v: perturbed_attention(q, k, v, jnp.ones(2), 0.0, scale=scale)) for i in range(1)}
        fns1 = {i: (lambda q, k, v: perturbed_attention(q, k, v, jnp.ones(2), 1.0, scale=scale)) for i in range(1)}
        mods1 = {i: (lambda p: soft_pag(p, 1.0, jnp.ones(2))) for i in range(1)}
        return (m(x, t, y), m(x, t, y, attn_fns=fns0), m(x, t, y, attn_fns=fns1), m(x, t, y, prob_mods=mods1))

    base, same, pert, explicit = forwards(params, x, t, y)
    np.testing.assert_allclose(np.asarray(same), np.asarray(base), **TOL)
    np.testing.assert_allclose(np.asarray(pert), np.asarray(explicit), **TOL)
    assert float(jnp.abs(pert - base).max()) > 1e-4


def test_head_mask_from_heads():
    """(layer, head) pairs land at the right entries (catches swapped layer/head axes)."""
    m = head_mask_from_heads([(1, 0), (0, 2)], 2, 3)
    np.testing.assert_array_equal(m, [[0, 0, 1], [1, 0, 0]])


def test_bad_arguments_raise_naming_the_argument():
    """Each bad argument raises naming itself (catches silent broadcasting of a wrong-shaped mask or u)."""
    A = _probs(10)
    q, k, v = _qkv(11)
    with pytest.raises(ValueError, match="probs"):
        soft_pag(A[0], 0.5, jnp.ones(3))
    with pytest.raises(ValueError, match="probs"):
        soft_pag(A[..., :4], 0.5, jnp.ones(3))
    with pytest.raises(ValueError, match="u must"):
        soft_pag(A, 1.5, jnp.ones(3))
    with pytest.raises(ValueError, match="u must"):
        soft_pag(A, jnp.ones(2), jnp.ones(3))
    with pytest.raises(TypeError, match="u must"):
        soft_pag(A, "half", jnp.ones(3))
    with pytest.raises(ValueError, match="head_mask"):
        soft_pag(A, 0.5, jnp.ones(4))
    with pytest.raises(ValueError, match="head_mask"):
        perturbed_attention(q, k, v, jnp.array([2.0, 0, 0, 0]), 0.5)
    with pytest.raises(TypeError, match="head_mask"):
        perturbed_attention(q, k, v, None, 0.5)
    with pytest.raises(ValueError, match="k and v"):
        perturbed_attention(q, k[:, :3], v[:, :3], jnp.ones(4), 0.5)
    with pytest.raises(ValueError, match="q must"):
        perturbed_attention(q[0], k, v, jnp.ones(4), 0.5)
    with pytest.raises(ValueError, match="eps, eps_perturbed"):
        perturbation_guidance(jnp.ones((2, 3)), jnp.ones((2, 4)), 1.0)
    with pytest.raises(TypeError, match="w must"):
        perturbation_guidance(jnp.ones(2), jnp.ones(2), "big")
    with pytest.raises(ValueError, match="w_pag"):
        cfg_pag_guidance(jnp.ones(2), jnp.ones(2), jnp.ones(2), 1.0, float("nan"))
    with pytest.raises(TypeError, match="eval_fn"):
        headhunter_greedy(3, [0, 1])
    with pytest.raises(ValueError, match="heads"):
        headhunter_greedy(lambda s: 0.0, [])
    with pytest.raises(ValueError, match="heads"):
        headhunter_greedy(lambda s: 0.0, [0, 0])
    with pytest.raises(ValueError, match="k must"):
        headhunter_greedy(lambda s: 0.0, [0, 1], k=0)
    with pytest.raises(ValueError, match="rounds must"):
        headhunter_greedy(lambda s: 0.0, [0, 1], rounds=-1)
    with pytest.raises(TypeError, match="eval_fn must return"):
        headhunter_greedy(lambda s: "x", [0, 1])
    with pytest.raises(ValueError, match="heads entry"):
        head_mask_from_heads([(2, 0)], 2, 3)
