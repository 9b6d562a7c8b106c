"""P29 Agent Attention: row-stochastic effective map, n=1 pooling, the generalized-linear form, the module."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.linear.agent import AgentAttention, agent_attention, agent_attention_as_linear, pool_agents


def rand(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def inputs(seed=0, N=30, n=4):
    q, k, v = rand(seed, 2, N, 3, 8), rand(seed + 1, 2, N, 3, 8), rand(seed + 2, 2, N, 3, 8)
    agents = pool_agents(q, (5, 6), n)
    return q, k, v, agents, rand(seed + 3, 1, 3, n, N), rand(seed + 4, 1, 3, N, n)


def test_effective_matrix_is_row_stochastic_and_gives_the_output():
    q, k, v, agents, b1, b2 = inputs()
    out, (p2, p1) = agent_attention(q, k, v, agents, bias_ak=b1, bias_qa=b2, return_probs=True)
    effective = np.einsum("bhin,bhnj->bhij", p2, p1)
    np.testing.assert_allclose(effective.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out, np.einsum("bhij,bjhd->bihd", effective, v), atol=1e-5)


def test_single_agent_gives_every_query_the_same_output():
    q, k, v, agents, b1, _ = inputs(n=1)
    out = agent_attention(q, k, v, agents, bias_ak=b1, bias_qa=rand(9, 1, 3, 30, 1))
    np.testing.assert_allclose(out, jnp.broadcast_to(out[:, :1], out.shape), atol=1e-6)
    np.testing.assert_allclose(agents[:, 0], q.mean(axis=1), atol=1e-5)  # global average pooling


def test_equals_generalized_linear_attention():
    q, k, v, agents, b1, b2 = inputs(seed=5)
    np.testing.assert_allclose(agent_attention_as_linear(q, k, v, agents, bias_ak=b1, bias_qa=b2),
                               agent_attention(q, k, v, agents, bias_ak=b1, bias_qa=b2), atol=1e-5)


def test_adaptive_pooling_bins_match_pytorch_rule():
    x = rand(3, 1, 5 * 6, 1, 2)
    pooled = pool_agents(x, (5, 6), 4)  # 2x2 bins: rows [0,3),[2,5); cols [0,3),[3,6)
    grid = np.asarray(x).reshape(5, 6, 2)
    np.testing.assert_allclose(pooled[0, 1, 0], grid[0:3, 3:6].mean((0, 1)), atol=1e-6)
    np.testing.assert_allclose(pooled[0, 2, 0], grid[2:5, 0:3].mean((0, 1)), atol=1e-6)


def test_module_shape_gradients_and_errors():
    module = AgentAttention(24, 3, 4, 6, rngs=nnx.Rngs(0))
    x = rand(4, 2, 36, 24)
    y = nnx.jit(lambda m, x: m(x))(module, x)
    assert y.shape == x.shape and np.all(np.isfinite(y))
    grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2)))(module, x)
    assert float(jnp.abs(grads.an_bias[...]).sum()) > 0 and float(jnp.abs(grads.dwc_kernel[...]).sum()) > 0
    with pytest.raises(ValueError, match="tokens"):
        module(x[:, :30])
    q, k, v, agents, _, _ = inputs()
    with pytest.raises(ValueError, match="perfect square"):
        pool_agents(q, (5, 6), 3)
    with pytest.raises(ValueError, match="hw="):
        pool_agents(q, (5, 5), 4)
    with pytest.raises(ValueError, match="agents must have shape"):
        agent_attention(q, k, v, agents[..., :4])
    with pytest.raises(ValueError, match="bias_ak must be broadcastable"):
        agent_attention(q, k, v, agents, bias_ak=jnp.ones((3, 5, 30)))


# ------------------------------------------------------------------------------------------------
# Independent literal computations (catch: agent biases dropped, bias resize with antialiasing)


def softmax_np(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def agent_attention_np(q, k, v, agents, b1, b2, scale):
    """The two softmaxes of the spec written out in float64: V_A = softmax(s A K^T + B1) V,
    O = softmax(s Q A^T + B2) V_A (layout [B, N, H, d], biases [., H, n, S] / [., H, N, n])."""
    q, k, v, agents = (np.asarray(x, np.float64) for x in (q, k, v, agents))
    p1 = softmax_np(scale * np.einsum("bnhd,bshd->bhns", agents, k) + np.asarray(b1, np.float64))
    agent_values = np.einsum("bhns,bshd->bhnd", p1, v)
    p2 = softmax_np(scale * np.einsum("bihd,bnhd->bhin", q, agents) + np.asarray(b2, np.float64))
    return np.einsum("bhin,bhnd->bihd", p2, agent_values)


def test_agent_attention_equals_literal_two_softmax_formula_with_biases():
    """Mutation caught: ``agent_attention`` ignoring ``bias_ak`` or ``bias_qa`` (the other tests compare
    agent_attention with itself, so dropping a bias in both paths passed them)."""
    q, k, v, agents, b1, b2 = inputs(seed=11)
    b1, b2 = 2.0 * b1, 2.0 * b2                      # biases large enough to move the softmaxes
    want = agent_attention_np(q, k, v, agents, b1, b2, 8 ** -0.5)
    np.testing.assert_allclose(agent_attention(q, k, v, agents, bias_ak=b1, bias_qa=b2), want, atol=1e-5)
    # each bias matters on these inputs (so the check above would see either one dropped)
    for without in (dict(bias_ak=b1), dict(bias_qa=b2)):
        assert np.max(np.abs(np.asarray(agent_attention(q, k, v, agents, **without)) - want)) > 1e-2


def bilinear_resize_np(table, out_h, out_w):
    """PyTorch ``F.interpolate(mode='bilinear', align_corners=False)`` (no antialiasing) on the last two
    axes: source coordinate ``max((i + 0.5) * in / out - 0.5, 0)``, two taps per axis."""
    def weights(n_in, n_out):
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(np.floor(src)), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            lam = src - i0
            m[i, i0] += 1.0 - lam
            m[i, i1] += lam
        return m
    table = np.asarray(table, np.float64)
    return np.einsum("yi,xj,...ij->...yx", weights(table.shape[-2], out_h), weights(table.shape[-1], out_w), table)


def randomized(module, seed, scale=0.5):
    """The same module with every parameter redrawn from N(0, scale^2) (biases far from their tiny init)."""
    graphdef, state = nnx.split(module)
    rng = np.random.default_rng(seed)
    state = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * scale, s.dtype), state)
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("window", [6, 7, 9])   # 7 -> 6 shrinks (antialiasing would blur), 7 -> 9 grows
def test_bias_tables_are_resized_like_pytorch_bilinear(window):
    """Mutation caught: ``jax.image.resize`` with antialiasing (the default) at 7 -> 6, which differs from the
    official ``F.interpolate(..., mode='bilinear')`` by up to ~0.3 on these tables."""
    module = randomized(AgentAttention(8, 2, 4, window, rngs=nnx.Rngs(0)), seed=1)
    b1, b2 = module.biases()
    table1 = bilinear_resize_np(module.an_bias[...], window, window)                     # [H, n, h, w]
    want1 = table1 + np.asarray(module.ah_bias[...]) + np.asarray(module.aw_bias[...])
    table2 = np.transpose(bilinear_resize_np(module.na_bias[...], window, window), (0, 2, 3, 1))  # [H, h, w, n]
    want2 = table2 + np.asarray(module.ha_bias[...]) + np.asarray(module.wa_bias[...])
    np.testing.assert_allclose(b1[0], want1.reshape(2, 4, window * window), atol=1e-5)
    np.testing.assert_allclose(b2[0], want2.reshape(2, window * window, 4), atol=1e-5)


def test_module_equals_literal_composition():
    """The NNX module against a float64 transcription of the official block: qkv, adaptive-pooled agents,
    the two biased softmaxes, + depthwise 3x3 conv of V, proj.

    Mutations caught: the module calling agent_attention without its biases (``bias_ak=b1, bias_qa=b2``
    dropped), the DWC term dropped, agents pooled from k instead of q."""
    dim, H, n, hw = 8, 2, 4, (5, 6)
    module = randomized(AgentAttention(dim, H, n, hw, rngs=nnx.Rngs(0)), seed=2)
    x = rand(12, 2, 30, dim)
    got = nnx.jit(lambda m, x: m(x))(module, x)

    p = {name: np.asarray(value, np.float64) for name, value in nnx.to_flat_state(nnx.state(module, nnx.Param))
         for name in [".".join(map(str, name))]}
    xn = np.asarray(x, np.float64)
    qkv = xn @ p["qkv.kernel"] + p["qkv.bias"]
    q, k, v = (t.reshape(2, 30, H, dim // H) for t in np.split(qkv, 3, axis=-1))
    rows, cols = np.zeros((2, 5)), np.zeros((2, 6))   # adaptive 2x2 pooling bins: rows [0,3),[2,5); cols [0,3),[3,6)
    rows[0, 0:3], rows[1, 2:5], cols[0, 0:3], cols[1, 3:6] = 1 / 3, 1 / 3, 1 / 3, 1 / 3
    agents = np.einsum("iy,jx,byxhd->bijhd", rows, cols, q.reshape(2, 5, 6, H, -1)).reshape(2, n, H, -1)
    b1 = bilinear_resize_np(p["an_bias"], *hw) + p["ah_bias"] + p["aw_bias"]
    b2 = np.transpose(bilinear_resize_np(p["na_bias"], *hw), (0, 2, 3, 1)) + p["ha_bias"] + p["wa_bias"]
    out = agent_attention_np(q, k, v, agents, b1.reshape(1, H, n, 30), b2.reshape(1, H, 30, n), (dim // H) ** -0.5)
    out = out.reshape(2, 30, dim)
    grid = np.pad(v.reshape(2, 5, 6, dim), ((0, 0), (1, 1), (1, 1), (0, 0)))
    dwc = sum(grid[:, dy:dy + 5, dx:dx + 6] * p["dwc_kernel"][dy, dx] for dy in range(3) for dx in range(3))
    out = out + dwc.reshape(2, 30, dim) + p["dwc_bias"]
    want = out @ p["proj.kernel"] + p["proj.bias"]
    np.testing.assert_allclose(got, want, atol=1e-4)
