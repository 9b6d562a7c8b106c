"""P02 MoH (jattn.methods.routing.moh): gates against a literal NumPy transcription of the official
``MoH-DiT/models.py::MoHAttention`` forward and of MoH-LLaMA3's parameter-free router; the load-balance loss against
its formula; the reduction to MHA (forward and gradients) with every head active and gates 1; shared heads always
on and unselected heads exactly 0; the capacity (gathered-rows) core against the dense reference; one trace under jit.

Mutations each test catches (those marked [run] were applied to moh.py and seen to fail):
* test_all_heads_active_and_gates_one_is_mha: the routed gates without the ``* k`` rescale [run, with the next
  test]; the shared gates without ``* h_s``.
* test_learned_gates_match_the_official_forward: the routed gates without ``* k`` [run]; the mixing weights
  without the factor 2 [run]; the routed gates normalised over all heads (``p / sum(p) * k``).
* test_load_balance_loss_is_its_formula: ``sum`` instead of ``mean`` over heads [run]; ``f`` taken from ``p``.
* test_shared_heads_always_active_and_unselected_heads_are_zero: the top-k mask applied to all H heads.
* test_parameter_free_router_matches_llama_code: the gates in reversed head order (shared heads routed) [run];
  the norm taken over the head axis instead of D; RoPE applied before the router. (The division by the std
  cannot change a binary top-k: it rescales a token's logits by one positive number.)
* test_capacity_core_equals_dense_and_drops_exactly_the_overflow: the causal mask built from the gathered slot
  index (``arange(C)``) instead of the gathered positions [run]; rows ranked by position instead of gate.
* test_module_traces_once_and_shapes_are_static: a Python-side top-k (``np.argsort``) would fail under jit; a
  shape that depends on the routing would retrace.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.core.reference import reference_attention
from jattn.methods.routing import moh as M
from jattn.nn import Attention, DecoderLM

TOL = dict(rtol=1e-5, atol=1e-5)


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _official_gates(x, w_r, w_s, w_m, h_s, k):
    """A literal NumPy transcription of MoHAttention.forward's gate computation (x flattened to tokens)."""
    _x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    gates = _np_softmax(_x @ w_r)
    E = gates.shape[1]
    indices = np.argsort(-gates, axis=1, kind="stable")[:, :k]
    mask = np.zeros_like(gates)
    np.put_along_axis(mask, indices, 1.0, axis=1)
    me, ce = gates.mean(0), mask.mean(0)
    l_aux = np.mean(me * ce) * E * E
    routed = gates * mask
    routed = routed / np.maximum(routed.sum(1, keepdims=True), np.finfo(np.float32).eps) * k
    if h_s > 0:
        shared = _np_softmax(_x @ w_s) * h_s if w_s is not None else np.ones((_x.shape[0], h_s))
        w0 = _np_softmax(_x @ w_m) * 2
        out = np.concatenate([w0[:, :1] * shared, w0[:, 1:] * routed], axis=1)
    else:
        out = routed
    return out.reshape(x.shape[:-1] + (-1,)), l_aux


def _rand(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("h_s,k", [(4, 0), (0, 4), (2, 2)])
def test_all_heads_active_and_gates_one_is_mha(h_s, k):
    """Router weights 0 and every head active (k = E) => every gate is 1 => MoH == MHA, output and gradients
    (w.r.t. x and the projections; gradients in the mixed case). Catches a missing ``* k``, ``* h_s`` or the mixing's factor 2."""
    rng = np.random.default_rng(0)
    attn = Attention(16, 4, rngs=nnx.Rngs(1), num_kv_heads=2, rope=True, causal=True, impl="reference")
    moh = M.MoHAttention.from_attention(attn, num_shared=h_s, top_k=k, router="learned", rngs=nnx.Rngs(2))
    for w in (moh.w_routed, moh.w_shared, moh.w_mix):
        if w is not None:
            w[...] = jnp.zeros_like(w[...])
    x = _rand(rng, 2, 7, 16)

    with_grads = h_s == 2  # gradients once (the case with all three gate kinds), to keep the file fast

    @nnx.jit
    def run(model, x):
        loss = lambda m, x: jnp.sum(jnp.sin(m(x)))  # noqa: E731
        return model(x), (nnx.grad(loss, argnums=(0, 1))(model, x) if with_grads else None)
    out_moh, g_moh = run(moh, x)
    out_attn, g_attn = run(attn, x)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m.gates(x)[0])(moh, x), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out_moh, out_attn, **TOL)
    if not with_grads:
        return
    np.testing.assert_allclose(g_moh[1], g_attn[1], **TOL)
    for name in ("query", "key", "value", "out"):
        np.testing.assert_allclose(getattr(g_moh[0], name)["kernel"][...], getattr(g_attn[0], name)["kernel"][...],
                                   **TOL)


@pytest.mark.parametrize("h_s,k", [(0, 2), (1, 3), (3, 2)])
def test_learned_gates_match_the_official_forward(h_s, k):
    """moh_gates == the NumPy transcription of the official forward (top-k, renormalised * k, shared softmax * h_s,
    mixing 2 softmax), gates and load-balance loss; exactly k routed heads nonzero per token."""
    rng = np.random.default_rng(h_s * 10 + k)
    H, dim = 8, 12
    E = H - h_s
    x = rng.standard_normal((2, 5, dim)).astype(np.float32)
    w_r = rng.standard_normal((dim, E)).astype(np.float32)
    w_s = rng.standard_normal((dim, h_s)).astype(np.float32) if h_s > 1 else None
    w_m = rng.standard_normal((dim, 2)).astype(np.float32) if h_s > 0 else None
    params = {"routed": w_r}
    if w_s is not None:
        params["shared"] = w_s
    if w_m is not None:
        params["mix"] = w_m
    gates, aux = M.moh_gates(jnp.asarray(x), {n: jnp.asarray(w) for n, w in params.items()}, num_shared=h_s, top_k=k)
    want, want_aux = _official_gates(x, w_r, w_s, w_m, h_s, k)
    np.testing.assert_allclose(gates, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux, want_aux, rtol=1e-5)
    assert np.all((np.asarray(gates)[..., h_s:] > 0).sum(-1) == k)


def test_load_balance_loss_is_its_formula():
    """L_b = E^2 mean_i(f_i P_i) with f the top-k fractions, P the mean probabilities; = k for uniform probabilities
    (whatever the choice); no gradient through the top-k indicator."""
    rng = np.random.default_rng(3)
    logits = _rand(rng, 3, 6, 5)
    p, m, _ = M.moh_route(logits, 2)
    f = np.asarray(m).reshape(-1, 5).mean(0)
    P = np.asarray(p).reshape(-1, 5).mean(0)
    np.testing.assert_allclose(M.load_balance_loss(p, m), 25 * np.mean(f * P), rtol=1e-6)
    np.testing.assert_allclose(M.load_balance_loss(p, m), 5 * np.sum(f * P), rtol=1e-6)
    up, um, _ = M.moh_route(jnp.zeros((4, 5)) + rng.standard_normal((4, 1)).astype(np.float32), 2)
    np.testing.assert_allclose(M.load_balance_loss(up, um), 2.0, rtol=1e-6)
    grad_m = jax.grad(lambda m_: M.load_balance_loss(p, m_))(m)
    np.testing.assert_array_equal(grad_m, 0.0)
    grad_p = jax.grad(lambda p_: M.load_balance_loss(p_, m))(p)
    np.testing.assert_allclose(grad_p, np.broadcast_to(25 * f / 5 / 18, p.shape), rtol=1e-5)


def test_shared_heads_always_active_and_unselected_heads_are_zero():
    """With a random router the shared heads' gates are > 0 on every token, exactly k routed heads are on, and
    an unselected (token, head) contributes exactly 0 to moh_attention; a selected one is o_h * g_h."""
    rng = np.random.default_rng(4)
    layer = M.MoHAttention(16, 8, rngs=nnx.Rngs(5), num_shared=3, top_k=2, impl="reference")
    x = _rand(rng, 2, 9, 16)
    gates = nnx.jit(lambda m, x: m.gates(x)[0])(layer, x)
    g = np.asarray(gates)
    assert np.all(g[..., :3] > 0) and np.all((g[..., 3:] > 0).sum(-1) == 2)
    q, k, v = _rand(rng, 2, 9, 8, 4), _rand(rng, 2, 9, 4, 4), _rand(rng, 2, 9, 4, 4)
    out = np.asarray(jax.jit(M.moh_attention, static_argnames=("causal", "impl"))(q, k, v, gates, causal=True,
                                                                                   impl="reference"))
    dense = np.asarray(jax.jit(reference_attention, static_argnames="causal")(q, k, v, causal=True))
    off = g == 0
    assert off.sum() == 2 * 9 * 3
    np.testing.assert_array_equal(out[off], 0.0)
    np.testing.assert_allclose(out[~off], (dense * g[..., None])[~off], **TOL)


def test_parameter_free_router_matches_llama_code():
    """moh_llama_router == NumPy transcription of MoH-LLaMA3 (norm of pre-RoPE q per routed head / unbiased std,
    softmax, top-k, binary; shared heads 1); a converted model gets no new parameters."""
    rng = np.random.default_rng(6)
    q = rng.standard_normal((2, 5, 8, 4)).astype(np.float32) * rng.uniform(0.2, 3.0, (1, 1, 8, 1)).astype(np.float32)
    h_s, k = 4, 2
    logits = np.linalg.norm(q[:, :, h_s:], axis=-1)
    logits = logits / logits.std(-1, ddof=1, keepdims=True)
    top = np.argsort(-_np_softmax(logits), axis=-1, kind="stable")[..., :k]
    want = np.zeros((2, 5, 8), np.float32)
    want[..., :h_s] = 1
    np.put_along_axis(want[..., h_s:], top, 1.0, axis=-1)
    got = M.moh_llama_router(jnp.asarray(q), h_s, k)
    np.testing.assert_array_equal(got, want)
    attn = Attention(16, 8, rngs=nnx.Rngs(0), rope=True, impl="reference")
    conv = M.MoHAttention.from_attention(attn, num_shared=4, top_k=2, router="norm")
    count = lambda m: sum(a.size for a in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    assert count(conv) == count(attn)
    x = _rand(rng, 1, 6, 16)
    q_raw = attn.query(x).reshape(1, 6, 8, 2)
    gates = M.moh_llama_router(q_raw, 4, 2)
    heads = reference_attention(*attn.project(x, jnp.arange(6)[None]), causal=True)
    np.testing.assert_allclose(conv(x), attn.finish(x, heads * gates[..., None]), **TOL)


def test_capacity_core_equals_dense_and_drops_exactly_the_overflow():
    """capacity == T: == moh_attention (fwd and grads); a small capacity keeps each routed head's top-C tokens by
    gate (== dense there), zero elsewhere, and moh_capacity / the FLOP fraction follow their formulas."""
    rng = np.random.default_rng(7)
    B, T, H, Hkv, D, h_s = 2, 16, 6, 3, 4, 2
    q, k, v = _rand(rng, B, T, H, D), _rand(rng, B, T, Hkv, D), _rand(rng, B, T, Hkv, D)
    params = {"routed": _rand(rng, 8, H - h_s), "shared": _rand(rng, 8, h_s), "mix": _rand(rng, 8, 2)}
    gates, _ = M.moh_gates(_rand(rng, B, T, 8), params, num_shared=h_s, top_k=2)
    ref = dict(causal=True, impl="reference")
    dense_fn = jax.jit(lambda q_, g_: M.moh_attention(q_, k, v, g_, **ref))
    cap_fn = jax.jit(lambda q_, g_, C: M.moh_capacity_attention(q_, k, v, g_, num_shared=h_s, capacity=C, **ref),
                     static_argnums=2)
    dense = dense_fn(q, gates)
    np.testing.assert_allclose(cap_fn(q, gates, T), dense, **TOL)
    f_dense = jax.jit(jax.grad(lambda q_, g_: jnp.sum(jnp.sin(dense_fn(q_, g_))), (0, 1)))(q, gates)
    f_cap = jax.jit(jax.grad(lambda q_, g_: jnp.sum(jnp.sin(cap_fn(q_, g_, T))), (0, 1)))(q, gates)
    np.testing.assert_allclose(f_cap[0], f_dense[0], **TOL)
    on = np.asarray(gates) != 0  # an unselected head's gate gets no gradient here (its rows are not computed);
    np.testing.assert_allclose(np.asarray(f_cap[1])[on], np.asarray(f_dense[1])[on], **TOL)  # upstream p*m kills it
    C = M.moh_capacity(T, H - h_s, 2, 0.5)
    assert C == 4
    small = np.asarray(cap_fn(q, gates, C))
    g = np.asarray(gates)
    keep = np.zeros(g.shape, bool)
    keep[..., :h_s] = True
    for b in range(B):
        for e in range(h_s, H):
            order = np.argsort(-np.where(g[b, :, e] > 0, g[b, :, e], -1.0), kind="stable")[:C]
            keep[b, order[g[b, order, e] > 0], e] = True
    np.testing.assert_allclose(small[keep], np.asarray(dense)[keep], **TOL)
    np.testing.assert_array_equal(small[~keep], 0.0)
    assert M.capacity_flop_fraction(T, H, h_s, C) == pytest.approx((2 * 16 + 4 * 4) / 96)


def test_module_traces_once_and_shapes_are_static():
    """A DecoderLM with MoH (learned router, capacity path) inside one jitted train step: traced once for two
    different batches, loss = CE + 0.01 * mean layer aux; the capacity gather has static shape [B, E, C]."""
    model = DecoderLM(32, 16, 1, 4, rngs=nnx.Rngs(0), method_config={"impl": "reference"})
    M.use_moh(model, num_shared=1, top_k=2, rngs=nnx.Rngs(1), capacity_factor=1.0)
    assert all(isinstance(b.attention, M.MoHAttention) for b in model.blocks)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    traces = []

    @jax.jit
    def step(params, rest, tokens):  # rest (the aux-loss variables) is written in the call: pass it through
        traces.append(tokens.shape)

        def loss_fn(params, rest):
            m = nnx.merge(graphdef, params, rest)
            logits = m(tokens[:, :-1])
            ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
            return ce + M.LOAD_BALANCE_WEIGHT * M.moh_aux_loss(m)
        return jax.value_and_grad(loss_fn)(params, rest)

    rng = np.random.default_rng(8)
    for _ in range(2):
        loss, grads = step(params, rest, jnp.asarray(rng.integers(0, 32, (2, 13)), jnp.int32))
        assert np.isfinite(float(loss))
    assert len(traces) == 1
    w = grads["blocks"][0]["attention"]["w_routed"][...]
    assert np.abs(np.asarray(w)).max() > 0  # the router learns through the gates and the aux loss
    jaxpr = jax.make_jaxpr(lambda q, g: M.moh_capacity_attention(q, q[:, :, :2], q[:, :, :2], g, num_shared=1,
                                                                  capacity=3, causal=True, impl="reference"))(
        jnp.ones((1, 8, 4, 2)), jnp.ones((1, 8, 4)))
    assert "top_k" in str(jaxpr) and "[1,3,3,2]" in str(jaxpr).replace(" ", "")


def test_bad_arguments_name_themselves():
    """Each malformed argument raises naming itself."""
    with pytest.raises(ValueError, match="num_shared"):
        M.MoHAttention(16, 4, rngs=nnx.Rngs(0), num_shared=5, top_k=1)
    with pytest.raises(ValueError, match="top_k"):
        M.MoHAttention(16, 4, rngs=nnx.Rngs(0), num_shared=2, top_k=3)
    with pytest.raises(ValueError, match="top_k"):
        M.MoHAttention(16, 4, rngs=nnx.Rngs(0), num_shared=4, top_k=1)
    with pytest.raises(ValueError, match="router"):
        M.MoHAttention(16, 4, rngs=nnx.Rngs(0), num_shared=2, top_k=1, router="hash")
    with pytest.raises(ValueError, match="capacity_factor"):
        M.MoHAttention(16, 4, rngs=nnx.Rngs(0), num_shared=2, top_k=1, capacity_factor=-1.0)
    with pytest.raises(ValueError, match="gates"):
        M.moh_attention(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 3)))
    with pytest.raises(ValueError, match="capacity"):
        M.moh_capacity_attention(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)),
                                 jnp.ones((1, 4, 2)), num_shared=1, capacity=5)
    with pytest.raises(ValueError, match="params"):
        M.moh_gates(jnp.ones((2, 8)), {"routed": jnp.ones((8, 3))}, num_shared=2, top_k=1)
    with pytest.raises(ValueError, match="decod"):
        M.MoHAttention(16, 4, rngs=nnx.Rngs(0), num_shared=2, top_k=1).init_cache(1, 8)
    with pytest.raises(TypeError, match="attn"):
        M.MoHAttention.from_attention("attn", num_shared=1, top_k=1)
