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
