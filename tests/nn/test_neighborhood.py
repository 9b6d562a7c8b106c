"""``jattn.nn.NeighborhoodAttention``: projections around ``neighborhood_attention``, exact and trainable."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn.nn import NeighborhoodAttention
from tests.conftest import assert_close


def manual(layer, x, mask):
    """The layer written out: projections, dense masked fp32 attention, output projection."""
    grid = x.shape[:-1]
    B, T = x.shape[0], int(np.prod(grid[1:]))
    q = layer.query(x).reshape(B, T, layer.num_heads, layer.head_dim)
    k = layer.key(x).reshape(B, T, layer.num_kv_heads, layer.head_dim)
    v = layer.value(x).reshape(B, T, layer.num_kv_heads, layer.head_dim)
    out = jattn.reference_attention(q, k, v, mask=jnp.asarray(mask))
    return layer.out(out.reshape(*grid, -1))


@pytest.mark.parametrize("grid, kernel, kwargs", [
    ((11, 9), (5, 3), dict(dilation=(2, 1))),
    ((23,), 6, dict(stride=2, causal=True, num_kv_heads=2)),
])
def test_layer_equals_its_dense_composition(grid, kernel, kwargs):
    layer = NeighborhoodAttention(32, 4, kernel, rngs=nnx.Rngs(0), impl="xla", **kwargs)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, *grid, 32))
    mask = jattn.neighborhood_mask(grid, kernel, stride=kwargs.get("stride", 1), dilation=kwargs.get("dilation", 1),
                                   causal=kwargs.get("causal", False))
    assert_close(layer(x), manual(layer, x, mask))


def test_gradients_reach_every_parameter():
    layer = NeighborhoodAttention(16, 2, 3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 6, 7, 16))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    leaves = jax.tree_util.tree_leaves(grads)
    assert leaves and all(np.all(np.isfinite(g)) and np.any(g != 0) for g in leaves)


def test_bad_input_is_named():
    layer = NeighborhoodAttention(16, 2, 5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dim=16"):
        layer(jnp.ones((1, 8, 8, 12)))
    with pytest.raises(ValueError, match="kernel_size"):
        layer(jnp.ones((1, 4, 8, 16)))
    with pytest.raises(ValueError, match="num_heads"):
        NeighborhoodAttention(16, 3, 5, rngs=nnx.Rngs(0))


def test_is_causal_is_a_deprecated_alias_of_causal():
    x = jax.random.normal(jax.random.PRNGKey(3), (1, 9, 16))
    want = NeighborhoodAttention(16, 2, 3, rngs=nnx.Rngs(0), causal=True, impl="xla")(x)
    with pytest.warns(DeprecationWarning, match="is_causal is deprecated, use causal="):
        layer = NeighborhoodAttention(16, 2, 3, rngs=nnx.Rngs(0), is_causal=True, impl="xla")
    assert layer.causal is True
    assert_close(layer(x), want)
    with pytest.raises(TypeError, match="pass only causal"):
        NeighborhoodAttention(16, 2, 3, rngs=nnx.Rngs(0), causal=True, is_causal=False)
