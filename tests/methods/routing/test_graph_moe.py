"""P53 graph-of-tokens MoE routing (jattn.methods.routing.graph_moe): the attention- and similarity-aware gates
against their explicit matrix forms, the "v = P" flash formulation, the reduction to standard gating at A = I, and
the entropy facts (the Jensen bound; the spec's "entropy does not increase" claim refuted on random data).

Mutations each test catches:
* test_identity_graph_is_standard_gating: mixing logits when mix="prob" (softmax(A r) != A softmax(r) in general,
  but equal at A = I - so also checked: the MoE output at A = I equals the standard-gate module's); the head mean
  replaced by a head sum (A = I per head would give H * p).
* test_mixed_rows_sum_to_one: p~ = A r (logits mixed, no softmax) under mix="prob"; a head sum instead of mean.
* test_v_equals_p_flash_path_equals_explicit_a_at_p: the flash path dropping the explicit scale after padding
  (D ** -0.5 of the padded width); the mean over heads taken before the attention (of q); causal dropped; the
  padded columns of v kept in the result.
* test_similarity_gate_equals_explicit_matrix: ``/ tau`` dropped or multiplied; ``x^T W_s x`` transposed
  (``x W_s^T x^T``, different for non-symmetric W_s); causal mask dropped.
* test_entropy_jensen_bound_and_the_spec_claim_is_false: per-token entropy computed with log2 or without the
  minus sign; mixing that is not a convex combination (rows not summing to 1) could break the bound.
* test_module_top1_routes_with_switch_weights_and_is_causal: weights renormalised to 1 (the router would get no
  gradient); the similarity graph without its causal mask (a future token would change an earlier route).
* test_bad_arguments_raise: the shape/choice checks.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.routing import graph_moe as G

TOL = dict(rtol=2e-5, atol=2e-6)


def _rand_probs(key, B, H, T, causal=True):
    logits = 2.0 * jax.random.normal(key, (B, H, T, T))
    if causal:
        logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


def test_identity_graph_is_standard_gating():
    r = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 4))
    eye = jnp.broadcast_to(jnp.eye(7), (2, 3, 7, 7))
    for mix in ("prob", "logit"):
        np.testing.assert_allclose(G.attention_aware_gate(r, eye, mix=mix), jax.nn.softmax(r, -1), **TOL)
    # the module: attention gate with A = I equals the standard-gate module of the same weights
    std = G.AttentionAwareMoE(8, 12, 4, rngs=nnx.Rngs(1), gate="standard")
    att = G.AttentionAwareMoE(8, 12, 4, rngs=nnx.Rngs(1), gate="attention")
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 8))
    y0, i0 = std(x)
    y1, i1 = att(x, attn_probs=eye)
    np.testing.assert_allclose(y1, y0, **TOL)
    np.testing.assert_array_equal(i1["expert"], i0["expert"])


def test_mixed_rows_sum_to_one():
    r = 3.0 * jax.random.normal(jax.random.PRNGKey(3), (2, 9, 5))
    A = _rand_probs(jax.random.PRNGKey(4), 2, 4, 9)
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 9, 6))
    w_s = jax.random.normal(jax.random.PRNGKey(6), (6, 6))
    for mix in ("prob", "logit"):
        for pt in (G.attention_aware_gate(r, A, mix=mix), G.similarity_aware_gate(x, r, w_s, 2.0, mix=mix)):
            np.testing.assert_allclose(jnp.sum(pt, -1), 1.0, atol=1e-5)
            assert float(jnp.min(pt)) >= 0.0


@pytest.mark.parametrize("H, Hkv, D, E", [(4, 4, 8, 4), (4, 2, 4, 6)])
def test_v_equals_p_flash_path_equals_explicit_a_at_p(H, Hkv, D, E):
    """p~ through jattn.attention with v = P (xla and reference impls; E < D and E > D) equals the explicit
    head-averaged softmax(q k^T / sqrt(D)) @ P, causal, with GQA."""
    ks = jax.random.split(jax.random.PRNGKey(7), 3)
    B, T = 2, 10
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = jax.random.normal(ks[1], (B, T, Hkv, D))
    r = 2.0 * jax.random.normal(ks[2], (B, T, E))
    kf = jnp.repeat(k, H // Hkv, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, kf) * D ** -0.5
    logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf)
    A = jax.nn.softmax(logits, -1)
    for mix in ("prob", "logit"):
        want = G.attention_aware_gate(r, A, mix=mix)
        for impl in ("xla", "reference") if H == Hkv else ("xla",):
            got = G.attention_aware_gate_flash(r, q, k, causal=True, mix=mix, impl=impl)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_similarity_gate_equals_explicit_matrix():
    ks = jax.random.split(jax.random.PRNGKey(8), 3)
    x = jax.random.normal(ks[0], (2, 8, 6))
    w_s = jax.random.normal(ks[1], (6, 6))          # not symmetric
    r = jax.random.normal(ks[2], (2, 8, 3))
    for causal in (False, True):
        S = G.similarity_matrix(x, w_s, 3.0, causal=causal)
        want = jnp.einsum("bts,bse->bte", S, jax.nn.softmax(r, -1))
        got = G.similarity_aware_gate(x, r, w_s, 3.0, causal=causal, impl="xla")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    x0 = np.asarray(x[0])
    lg = x0 @ np.asarray(w_s) @ x0.T / 3.0
    S0 = np.exp(lg - lg.max(1, keepdims=True))
    np.testing.assert_allclose(G.similarity_matrix(x, w_s, 3.0)[0], S0 / S0.sum(1, keepdims=True), rtol=1e-5)


def test_entropy_jensen_bound_and_the_spec_claim_is_false():
    """For random row-stochastic A: H(p~_i) >= sum_j A_ij H(p_j) for every token (concavity), so the spec's
    "mean entropy does not increase" fails here: mean H(p~) > mean H(p). (One-hot rows of A keep it equal.)"""
    ks = jax.random.split(jax.random.PRNGKey(9), 2)
    r = 2.0 * jax.random.normal(ks[0], (3, 12, 4))
    A = jnp.mean(_rand_probs(ks[1], 3, 2, 12, causal=False), axis=1)
    p = jax.nn.softmax(r, -1)
    pt = G.attention_aware_gate(r, A)
    h, ht = G.gate_entropy(p), G.gate_entropy(pt)
    assert bool(jnp.all(ht >= jnp.einsum("bts,bs->bt", A, h) - 1e-5))
    assert float(ht.mean()) > float(h.mean())
    # the entropy itself: uniform over E is log E, a one-hot is 0
    np.testing.assert_allclose(G.gate_entropy(jnp.full((4,), 0.25)), np.log(4.0), rtol=1e-6)
    assert float(G.gate_entropy(jnp.eye(4)[0])) == 0.0


@pytest.mark.parametrize("gate", ["standard", "attention", "similarity"])
def test_module_top1_routes_with_switch_weights_and_is_causal(gate):
    moe = G.AttentionAwareMoE(8, 12, 4, rngs=nnx.Rngs(3), gate=gate, impl="xla")
    ks = jax.random.split(jax.random.PRNGKey(10), 3)
    x = jax.random.normal(ks[0], (2, 9, 8))
    q = jax.random.normal(ks[1], (2, 9, 2, 8))
    k = jax.random.normal(ks[2], (2, 9, 2, 8))
    y, info = moe(x, qk=(q, k)) if gate == "attention" else moe(x)
    e = info["expert"]
    w = jnp.take_along_axis(info["p_tilde"], e[..., None], -1)
    params = {n: getattr(moe, n)[...] for n in ("w_gate", "w_up", "w_down")}
    onehot = jax.nn.one_hot(e, 4)
    np.testing.assert_allclose(y, G.expert_ffn(x, params, onehot * w), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(w)) < 1.0
    assert float(info["aux"]) >= 1.0 - 1e-4
    # causality: changing the last token leaves every earlier token's route and output unchanged
    x2, k2 = x.at[:, -1].add(5.0), k.at[:, -1].add(5.0)
    y2, info2 = moe(x2, qk=(q, k2)) if gate == "attention" else moe(x2)
    np.testing.assert_allclose(info2["p_tilde"][:, :-1], info["p_tilde"][:, :-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y2[:, :-1], y[:, :-1], rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise():
    r = jnp.ones((1, 4, 3))
    with pytest.raises(ValueError, match="attn_probs"):
        G.attention_aware_gate(r, jnp.ones((1, 2, 4, 5)))
    with pytest.raises(ValueError, match="mix"):
        G.attention_aware_gate(r, jnp.ones((1, 4, 4)), mix="mean")
    with pytest.raises(ValueError, match="w_s"):
        G.similarity_aware_gate(jnp.ones((1, 4, 6)), r, jnp.ones((6, 5)), 1.0)
    with pytest.raises(ValueError, match="gate"):
        G.AttentionAwareMoE(8, 12, 4, rngs=nnx.Rngs(0), gate="graph")
    moe = G.AttentionAwareMoE(8, 12, 4, rngs=nnx.Rngs(0), gate="attention")
    with pytest.raises(ValueError, match="exactly one"):
        moe(jnp.ones((1, 4, 8)))
    with pytest.raises(ValueError, match="top_k"):
        G.route_top_k(jnp.ones((2, 3)), 4)
