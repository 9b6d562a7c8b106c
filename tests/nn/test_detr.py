"""The tiny DETR (subject of the P35 DEIM experiment): shapes, box range, query equivariance, cross-attention.

Each test's docstring names the mutation it catches.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.nn.detr import CrossAttention, TinyDETR


def _model(seed=0, **kw):
    cfg = dict(num_classes=3, image_size=8, dim=16, num_heads=2, num_queries=4, num_encoder_layers=1,
               num_decoder_layers=2)
    cfg.update(kw)
    return TinyDETR(rngs=nnx.Rngs(seed), **cfg)


def test_outputs_per_decoder_layer_and_boxes_in_unit_square():
    """``[L, B, Q, C + 1]`` logits and ``[L, B, Q, 4]`` boxes in (0, 1); images are independent in a batch.
    Catches: the no-object logit missing, only the last layer returned (no auxiliary outputs), batch mixing."""
    model = _model()
    x = jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 3))
    logits, boxes = model(x)
    assert logits.shape == (2, 3, 4, 4) and boxes.shape == (2, 3, 4, 4)
    assert float(boxes.min()) > 0 and float(boxes.max()) < 1
    l1, b1 = model(x[1:2])
    np.testing.assert_allclose(l1[:, 0], logits[:, 1], atol=1e-5)
    np.testing.assert_allclose(b1[:, 0], boxes[:, 1], atol=1e-5)


def test_permuting_the_object_queries_permutes_the_predictions():
    """The decoder has no positional information on queries, so permuting the learned queries permutes the
    outputs (DETR's set property, what lets Hungarian matching be the loss). Catches: a causal mask or position
    embedding on the queries."""
    model = _model(seed=1)
    x = jax.random.uniform(jax.random.PRNGKey(2), (2, 8, 8, 3))
    logits, boxes = model(x)
    perm = jnp.array([2, 0, 3, 1])
    model.queries[...] = model.queries[...][:, perm]
    pl, pb = model(x)
    np.testing.assert_allclose(pl, logits[:, :, perm], atol=1e-5)
    np.testing.assert_allclose(pb, boxes[:, :, perm], atol=1e-5)


def test_cross_attention_matches_the_softmax_formula():
    """Per head ``softmax(q k^T / sqrt(d)) v`` over the memory. Catches: attention over the queries instead of the
    memory, a missing scale."""
    layer = CrossAttention(8, 2, rngs=nnx.Rngs(0))
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    x, mem = jax.random.normal(k1, (1, 3, 8)), jax.random.normal(k2, (1, 5, 8))
    q = layer.query(x).reshape(1, 3, 2, 4)
    k = layer.key(mem).reshape(1, 5, 2, 4)
    v = layer.value(mem).reshape(1, 5, 2, 4)
    p = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / 2.0, -1)
    want = layer.out(jnp.einsum("bhts,bshd->bthd", p, v).reshape(1, 3, 8))
    np.testing.assert_allclose(layer(x, mem), want, atol=1e-5)


def test_token_queries_start_from_their_grid_anchor():
    """``query_mode="tokens"``: with the box head's output zeroed each query's box is its token's anchor
    ``(cx, cy, 1/4, 1/4)`` in row-major grid order. Catches: x/y swapped in the anchor grid, the anchor added
    after the sigmoid instead of in logit space."""
    model = _model(query_mode="tokens", num_queries=4)
    model.box_out.kernel[...] = jnp.zeros_like(model.box_out.kernel[...])
    model.box_out.bias[...] = jnp.zeros_like(model.box_out.bias[...])
    _, boxes = model(jax.random.uniform(jax.random.PRNGKey(4), (1, 8, 8, 3)))
    want = np.array([[0.25, 0.25, 0.25, 0.25], [0.75, 0.25, 0.25, 0.25], [0.25, 0.75, 0.25, 0.25],
                     [0.75, 0.75, 0.25, 0.25]])
    np.testing.assert_allclose(boxes[-1, 0], want, atol=1e-5)


def test_bad_arguments_raise():
    """Sizes and input shapes are checked with messages naming the argument."""
    with pytest.raises(ValueError, match="image_size"):
        _model(image_size=10)
    with pytest.raises(ValueError, match="num_queries"):
        _model(num_queries=0)
    with pytest.raises(ValueError, match="query_mode"):
        _model(query_mode="anchors")
    with pytest.raises(ValueError, match="num_queries"):
        _model(query_mode="tokens", num_queries=5)
    with pytest.raises(ValueError, match="images"):
        _model()(jnp.ones((1, 16, 16, 3)))
