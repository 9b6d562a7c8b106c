"""P36 BAM (jattn.methods.routing.bam): the soft mixture of attention experts against an expert-by-expert
reference built from ``jattn.core.reference``; the KV-shared (GQA-style) path; the token-choice FFN experts; the
parallel block; upcycling.

Mutations each test catches:
* test_one_expert_is_dense_mha: the router gate taken as ``sigmoid`` (not a softmax over experts: 1 != g for N=1);
  a missing ``W_O``; RoPE skipped on k.
* test_identical_experts_equal_one_expert_for_any_router: gates not normalised (``exp`` / ``sigmoid`` instead of
  ``softmax``); the combine summing experts unweighted.
* test_one_hot_router_selects_that_expert: the non-shared path reshaping queries head-major (each query head would
  read another expert's K/V); the gates applied along the wrong axis (head instead of expert).
* test_kv_shared_path_equals_gqa_formulation: the shared path reshaping queries expert-major (``e*H + h``: query
  heads would read the wrong kv heads under GQA's grouping); the combine's head-group transpose dropped.
* test_moe_ffn_routes_top_k_and_renormalises: weights not renormalised over the chosen experts; top-k over the
  wrong axis; the load-balance loss from the renormalised weights instead of p.
* test_parallel_block_is_x_plus_moa_plus_ffn_of_one_norm: a sequential block (FFN of x + MoA); the FFN branch
  reading the un-normalised x.
* test_upcycle_stacks_experts_averages_the_rest_and_keeps_routers: experts averaged instead of stacked; the
  embedding taken from the first model; the router copied from a dense model; kv_shared not averaging wk/wv.
* test_upcycling_copies_of_one_dense_model_gives_that_model: any weight of the combine not summing to 1.
* test_bad_arguments_raise: shape checks dropped.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.core.reference import reference_attention
from jattn.methods.routing import bam as M
from jattn.nn.attention import apply_rope

TOL = dict(rtol=2e-5, atol=2e-5)


def _params(key, N, dim, H, Hkv, D, n_kv=None):
    ks = jax.random.split(key, 4)
    n_kv = N if n_kv is None else n_kv
    return {"wq": jax.random.normal(ks[0], (N, dim, H * D)) / dim ** 0.5,
            "wk": jax.random.normal(ks[1], (n_kv, dim, Hkv * D)) / dim ** 0.5,
            "wv": jax.random.normal(ks[2], (n_kv, dim, Hkv * D)) / dim ** 0.5,
            "wo": jax.random.normal(ks[3], (N, H * D, dim)) / (H * D) ** 0.5}


def _mha(x, wq, wk, wv, wo, H, Hkv, rope=True, causal=True):
    """One expert's MHA, written directly: projections, RoPE, reference attention with kv repeated, W_O."""
    B, T, _ = x.shape
    D = wq.shape[1] // H
    q = (x @ wq).reshape(B, T, H, D)
    k = (x @ wk).reshape(B, T, Hkv, D)
    v = (x @ wv).reshape(B, T, Hkv, D)
    if rope:
        pos = jnp.arange(T)[None]
        q, k = apply_rope(q, pos), apply_rope(k, pos)
    k, v = jnp.repeat(k, H // Hkv, axis=2), jnp.repeat(v, H // Hkv, axis=2)
    o = reference_attention(q, k, v, causal=causal)
    return o.reshape(B, T, H * D) @ wo


def _moa_reference(x, p, router_w, H, Hkv, kv_shared):
    g = jax.nn.softmax(x @ router_w, axis=-1)
    out = 0.0
    for e in range(p["wq"].shape[0]):
        ek = 0 if kv_shared else e
        out = out + g[..., e:e + 1] * _mha(x, p["wq"][e], p["wk"][ek], p["wv"][ek], p["wo"][e], H, Hkv)
    return out


def test_one_expert_is_dense_mha():
    """N = 1: the gate is 1 and the layer is plain causal MHA with RoPE (GQA 4/2 heads), impl xla and reference."""
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (2, 12, 16))
    p = _params(jax.random.PRNGKey(1), 1, 16, 4, 2, 8)
    router = jax.random.normal(jax.random.PRNGKey(2), (16, 1))
    want = _mha(x, p["wq"][0], p["wk"][0], p["wv"][0], p["wo"][0], 4, 2)
    for impl in ("reference", "xla"):
        got = M.soft_mixture_of_attention(x, p, router, num_heads=4, num_kv_heads=2, rope=True, impl=impl)
        np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("kv_shared", [False, True])
def test_identical_experts_equal_one_expert_for_any_router(kv_shared):
    """Three copies of one expert under a random router give exactly that expert's output."""
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 9, 16))
    one = _params(jax.random.PRNGKey(4), 1, 16, 4, 2, 4)
    p = {n: jnp.repeat(w, 1 if (kv_shared and n in ("wk", "wv")) else 3, axis=0) for n, w in one.items()}
    router = 3.0 * jax.random.normal(jax.random.PRNGKey(5), (16, 3))
    got, g = M.soft_mixture_of_attention(x, p, router, num_heads=4, num_kv_heads=2, kv_shared=kv_shared, rope=True,
                                         return_gates=True)
    assert float(jnp.std(g)) > 0.05          # the router is far from uniform
    want = _mha(x, one["wq"][0], one["wk"][0], one["wv"][0], one["wo"][0], 4, 2)
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("kv_shared", [False, True])
def test_one_hot_router_selects_that_expert(kv_shared):
    """x's first feature is 1 and the router gives expert 2 a logit of 1e4: the output is expert 2 alone."""
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 9, 16)).at[..., 0].set(1.0)
    p = _params(jax.random.PRNGKey(7), 3, 16, 4, 2, 4, n_kv=1 if kv_shared else 3)
    router = jnp.zeros((16, 3)).at[0, 2].set(1e4)
    got = M.soft_mixture_of_attention(x, p, router, num_heads=4, num_kv_heads=2, kv_shared=kv_shared, rope=True)
    ek = 0 if kv_shared else 2
    want = _mha(x, p["wq"][2], p["wk"][ek], p["wv"][ek], p["wo"][2], 4, 2)
    np.testing.assert_allclose(got, want, **TOL)
    other = _mha(x, p["wq"][1], p["wk"][0 if kv_shared else 1], p["wv"][0 if kv_shared else 1], p["wo"][1], 4, 2)
    assert float(jnp.max(jnp.abs(want - other))) > 1e-2


def test_kv_shared_path_equals_gqa_formulation():
    """The one-call GQA path (N*H query heads over shared Hkv kv heads) equals the expert-by-expert mixture with
    the shared K/V, and the non-shared path with the shared K/V copied into every expert."""
    x = jax.random.normal(jax.random.PRNGKey(8), (2, 11, 24))
    p = _params(jax.random.PRNGKey(9), 3, 24, 4, 2, 6, n_kv=1)
    router = jax.random.normal(jax.random.PRNGKey(10), (24, 3))
    got = M.soft_mixture_of_attention(x, p, router, num_heads=4, num_kv_heads=2, kv_shared=True, rope=True)
    np.testing.assert_allclose(got, _moa_reference(x, p, router, 4, 2, True), **TOL)
    tiled = dict(p, wk=jnp.repeat(p["wk"], 3, 0), wv=jnp.repeat(p["wv"], 3, 0))
    np.testing.assert_allclose(got, M.soft_mixture_of_attention(x, tiled, router, num_heads=4, num_kv_heads=2,
                                                                rope=True), **TOL)
    # and the general (unshared) path against its reference
    q = _params(jax.random.PRNGKey(11), 3, 24, 4, 2, 6)
    np.testing.assert_allclose(M.soft_mixture_of_attention(x, q, router, num_heads=4, num_kv_heads=2, rope=True),
                               _moa_reference(x, q, router, 4, 2, False), **TOL)


def test_moe_ffn_routes_top_k_and_renormalises():
    """Top-2 of 3 SwiGLU experts, weights p/sum(p over the chosen 2), against a per-token loop; N=1 is SwiGLU;
    the load-balance loss is MoH's formula on p and the top-k mask."""
    key = jax.random.split(jax.random.PRNGKey(12), 5)
    x = jax.random.normal(key[0], (2, 5, 8))
    p = {"w_gate": jax.random.normal(key[1], (3, 8, 12)), "w_up": jax.random.normal(key[2], (3, 8, 12)),
         "w_down": jax.random.normal(key[3], (3, 12, 8))}
    router = jax.random.normal(key[4], (8, 3))
    y, aux = M.moe_ffn(x, p, router, top_k=2)
    probs = np.asarray(jax.nn.softmax(x @ router, -1))
    xs, pn = np.asarray(x).reshape(-1, 8), {n: np.asarray(w, np.float64) for n, w in p.items()}
    silu = lambda z: z / (1.0 + np.exp(-z))   # noqa: E731
    want = []
    for t, xt in enumerate(xs):
        pt = probs.reshape(-1, 3)[t]
        top = np.argsort(-pt)[:2]
        acc = 0
        for e in top:
            h = silu(xt @ pn["w_gate"][e]) * (xt @ pn["w_up"][e])
            acc = acc + pt[e] / pt[top].sum() * (h @ pn["w_down"][e])
        want.append(acc)
    np.testing.assert_allclose(y.reshape(-1, 8), np.stack(want), rtol=1e-4, atol=1e-4)
    m = np.zeros_like(probs.reshape(-1, 3))
    np.put_along_axis(m, np.argsort(-probs.reshape(-1, 3), 1)[:, :2], 1.0, 1)
    np.testing.assert_allclose(aux, 3 * np.sum(m.mean(0) * probs.reshape(-1, 3).mean(0)), rtol=1e-5)
    one = {n: w[:1] for n, w in p.items()}
    y1, _ = M.moe_ffn(x, one, router[:, :1], top_k=1)
    np.testing.assert_allclose(y1, (jax.nn.silu(x @ p["w_gate"][0]) * (x @ p["w_up"][0])) @ p["w_down"][0],
                               rtol=1e-4, atol=1e-4)


def test_parallel_block_is_x_plus_moa_plus_ffn_of_one_norm():
    block = M.ParallelMoEBlock(16, 4, 2, rngs=nnx.Rngs(0), mlp_dim=24, impl="reference")
    x = jax.random.normal(jax.random.PRNGKey(13), (2, 7, 16))
    y, aux = block(x)
    h = block.attn_norm(x)
    f, a = block.ffn(h)
    np.testing.assert_allclose(y, x + block.moa(h) + f, **TOL)
    assert float(aux) == pytest.approx(float(a))
    own = M.ParallelMoEBlock(16, 4, 2, rngs=nnx.Rngs(0), mlp_dim=24, shared_norm=False, impl="reference")
    assert own.ffn_norm is not None


def _dense_states(n, **kw):
    return [nnx.state(M.ParallelMoELM(256, 16, 1, 4, 1, rngs=nnx.Rngs(s), mlp_dim=24, impl="reference", **kw),
                      nnx.Param).to_pure_dict() for s in range(n)]


@pytest.mark.parametrize("kv_shared", [False, True])
def test_upcycle_stacks_experts_averages_the_rest_and_keeps_routers(kv_shared):
    dense = _dense_states(2)
    target = M.ParallelMoELM(256, 16, 1, 4, 2, rngs=nnx.Rngs(9), mlp_dim=24, kv_shared=kv_shared, impl="reference")
    init = nnx.state(target, nnx.Param).to_pure_dict()
    up = M.upcycle(dense, init, kv_shared=kv_shared)
    b = 0
    for name in ("wq", "wo"):
        np.testing.assert_array_equal(up["blocks"][b]["moa"][name][1], dense[1]["blocks"][b]["moa"][name][0])
    for name in ("w_gate", "w_up", "w_down"):
        np.testing.assert_array_equal(up["blocks"][b]["ffn"][name][0], dense[0]["blocks"][b]["ffn"][name][0])
    wk = up["blocks"][b]["moa"]["wk"]
    if kv_shared:
        mean_wk = (dense[0]["blocks"][b]["moa"]["wk"][0] + dense[1]["blocks"][b]["moa"]["wk"][0]) / 2
        np.testing.assert_allclose(wk[0], mean_wk)
    else:
        np.testing.assert_array_equal(wk[1], dense[1]["blocks"][b]["moa"]["wk"][0])
    mean_embed = (dense[0]["embed"]["embedding"] + dense[1]["embed"]["embedding"]) / 2
    np.testing.assert_allclose(up["embed"]["embedding"], mean_embed)
    np.testing.assert_array_equal(up["blocks"][b]["moa"]["router"], init["blocks"][b]["moa"]["router"])
    np.testing.assert_array_equal(up["blocks"][b]["ffn"]["ffn_router"], init["blocks"][b]["ffn"]["ffn_router"])
    state = nnx.state(target, nnx.Param)
    nnx.replace_by_pure_dict(state, up)
    nnx.update(target, state)                # the dict fits the model


def test_upcycling_copies_of_one_dense_model_gives_that_model():
    """Two copies of one dense LM upcycled (random routers) predict exactly what the dense LM predicts."""
    dense_model = M.ParallelMoELM(256, 16, 2, 4, 1, rngs=nnx.Rngs(3), mlp_dim=24, impl="reference")
    d = nnx.state(dense_model, nnx.Param).to_pure_dict()
    target = M.ParallelMoELM(256, 16, 2, 4, 2, rngs=nnx.Rngs(4), mlp_dim=24, impl="reference")
    state = nnx.state(target, nnx.Param)
    nnx.replace_by_pure_dict(state, M.upcycle([d, d], state.to_pure_dict()))
    nnx.update(target, state)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 10), 0, 256)
    np.testing.assert_allclose(target(tokens)[0], dense_model(tokens)[0], rtol=1e-4, atol=1e-4)


def test_bad_arguments_raise():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 8))
    p = _params(jax.random.PRNGKey(1), 2, 8, 2, 2, 4)
    with pytest.raises(ValueError, match="router_w"):
        M.soft_mixture_of_attention(x, p, jnp.ones((8, 3)), num_heads=2)
    with pytest.raises(ValueError, match="wk"):
        M.soft_mixture_of_attention(x, p, jnp.ones((8, 2)), num_heads=2, kv_shared=True)
    with pytest.raises(ValueError, match="exactly"):
        M.soft_mixture_of_attention(x, {"wq": p["wq"]}, jnp.ones((8, 2)), num_heads=2)
    with pytest.raises(ValueError, match="top_k"):
        M.moe_ffn(x, {"w_gate": jnp.ones((2, 8, 4)), "w_up": jnp.ones((2, 8, 4)), "w_down": jnp.ones((2, 4, 8))},
                  jnp.ones((8, 2)), top_k=3)
    with pytest.raises(ValueError, match="dense_param_list"):
        M.upcycle([], {})
    dense = _dense_states(3)
    init = nnx.state(M.ParallelMoELM(256, 16, 1, 4, 2, rngs=nnx.Rngs(9), mlp_dim=24), nnx.Param).to_pure_dict()
    with pytest.raises(ValueError, match="shape"):
        M.upcycle(dense, init)
