"""P66 VL-SAM: mean-max head weights, head aggregation, the regularised attention flow and the map -> mask /
points / IoU helpers (tiny shapes, fresh random inputs, hand-built maps where the answer is known)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.generative.vl_sam import (aggregate_heads, attention_rollout, attention_to_points, centre_prior,
                                             head_importance_meanmax, localization_map, mask_iou, null_flow,
                                             threshold_map)

TOL = dict(rtol=1e-5, atol=1e-6)


def _causal_probs(seed, B=2, H=3, L=6):
    logits = jax.random.normal(jax.random.key(seed), (B, H, L, L)) * 2.0
    causal = jnp.tril(jnp.ones((L, L), bool))
    return jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)


def _uniform_causal(L):
    m = np.tril(np.ones((L, L), np.float32))
    return jnp.asarray(m / m.sum(-1, keepdims=True))


def test_rollout_of_identity_is_identity():
    """Identity attention in every layer rolls out to the identity, regularised or not, with or without the
    residual term (catches a regulariser that adds mass to masked or off-diagonal entries)."""
    eye = jnp.eye(5)[None]
    for regularize in (True, False):
        for residual in (0.0, 0.5):
            out = attention_rollout([eye, eye, eye], regularize=regularize, residual=residual)
            np.testing.assert_allclose(np.asarray(out), np.asarray(eye), **TOL)


def test_uniform_head_weights_equal_the_mean_and_weights_are_normalised():
    """Equal weights give the head mean; weights (2, 1, 1) give (2 A0 + A1 + A2) / 4 (catches unnormalised
    weights, or the sum over the wrong axis)."""
    A = _causal_probs(1)
    np.testing.assert_allclose(np.asarray(aggregate_heads(A, jnp.ones(3) * 7.0)), np.asarray(A.mean(1)), **TOL)
    np.testing.assert_allclose(np.asarray(aggregate_heads(A)), np.asarray(A.mean(1)), **TOL)
    want = (2 * A[:, 0] + A[:, 1] + A[:, 2]) / 4
    np.testing.assert_allclose(np.asarray(aggregate_heads(A, jnp.array([2.0, 1.0, 1.0]))), np.asarray(want), **TOL)
    per_map = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    out = np.asarray(aggregate_heads(A, per_map))
    np.testing.assert_allclose(out[0], np.asarray(A[0, 0]), **TOL)
    np.testing.assert_allclose(out[1], np.asarray(A[1, 2]), **TOL)


def test_aggregated_and_rolled_out_causal_maps_stay_stochastic_and_causal():
    """Rows of the aggregated map and of the (regularised) flow sum to 1 and stay causal (catches a
    regulariser that forgets to renormalise, or a product in the wrong order leaking future tokens)."""
    layers = [_causal_probs(s) for s in (2, 3, 4)]
    w = [jax.random.uniform(jax.random.key(10 + i), (2, 3)) + 0.1 for i in range(3)]
    agg = aggregate_heads(layers[0], w[0])
    np.testing.assert_allclose(np.asarray(agg.sum(-1)), 1.0, **TOL)
    for regularize in (False, True):
        flow = np.asarray(attention_rollout(layers, head_weights=w, regularize=regularize))
        np.testing.assert_allclose(flow.sum(-1), 1.0, rtol=1e-5, atol=1e-5)
        assert np.all(np.triu(flow[0], 1) == 0) and np.all(np.triu(flow[1], 1) == 0)


def test_rollout_multiplies_later_layers_on_the_left():
    """``F = A3 A2 A1`` for non-commuting maps (catches ``A1 A2 A3``), with the head mean when ``has_heads``."""
    layers = [_causal_probs(s, B=1) for s in (5, 6, 7)]
    means = [np.asarray(a.mean(1))[0] for a in layers]
    want = means[2] @ means[1] @ means[0]
    out = np.asarray(attention_rollout(layers, has_heads=True, regularize=False))[0]
    np.testing.assert_allclose(out, want, **TOL)
    res = np.asarray(attention_rollout([jnp.asarray(m) for m in means], regularize=False, residual=0.5))
    mix = [0.5 * m + 0.5 * np.eye(6) for m in means]
    np.testing.assert_allclose(res, mix[2] @ mix[1] @ mix[0], **TOL)


def test_regularisation_removes_the_first_token_bias_of_uniform_causal_layers():
    """Four uniform-causal layers: the plain flow piles mass on the first token, the regularised flow is
    uniform over each row's visible tokens (the spec's defining test; catches dividing by the wrong null flow
    or no regularisation at all)."""
    L = 7
    U = _uniform_causal(L)[None]
    plain = np.asarray(attention_rollout([U] * 4, regularize=False))[0]
    assert plain[-1, 0] > 3 * plain[-1, -1]
    reg = np.asarray(attention_rollout([U] * 4, regularize=True))[0]
    np.testing.assert_allclose(reg, np.asarray(U[0]), **TOL)
    np.testing.assert_allclose(np.asarray(null_flow([jnp.tril(jnp.ones((L, L), bool))])), np.asarray(U[0]), **TOL)


def test_single_layer_regularisation_keeps_the_map_and_masks_are_honoured():
    """One causal layer: regularising changes nothing (the null flow is constant per row); a prefix mask
    given explicitly is used instead of the causal default (catches an ignored ``masks`` argument)."""
    A = _causal_probs(8).mean(1)
    np.testing.assert_allclose(np.asarray(attention_rollout([A], regularize=True)), np.asarray(A), **TOL)
    L, N = 6, 3
    prefix = np.tril(np.ones((L, L), bool)) | (np.arange(L)[None, :] < N)
    prefix[:N, N:] = False
    m = jnp.asarray(prefix, jnp.float32)
    Up = m / m.sum(-1, keepdims=True)
    reg = np.asarray(attention_rollout([Up[None]] * 3, masks=jnp.asarray(prefix)))[0]
    np.testing.assert_allclose(reg, np.asarray(Up), **TOL)
    causal_default = np.asarray(attention_rollout([Up[None]] * 3))[0]
    assert not np.allclose(causal_default, np.asarray(Up), atol=1e-3)


def test_head_importance_meanmax_hand_built():
    """Head 0 puts 0.9 on one image key, head 1 spreads evenly: head 0 scores higher; key_mask excludes a text
    key carrying the largest weight, query_mask averages only the chosen rows (catches mean-then-max, or masks
    ignored)."""
    A = np.zeros((2, 2, 4), np.float32)            # [H, Q, K]; keys 0..2 image, key 3 text
    A[0, :, 0], A[0, :, 1:] = 0.9, 0.1 / 3
    A[1] = 0.25
    A[1, 1] = [0.0, 0.0, 0.05, 0.95]
    key_mask = np.array([True, True, True, False])
    s = np.asarray(head_importance_meanmax(jnp.asarray(A), key_mask=key_mask))
    np.testing.assert_allclose(s, [0.9, (0.25 + 0.05) / 2], **TOL)
    s1 = np.asarray(head_importance_meanmax(jnp.asarray(A), key_mask=key_mask, query_mask=np.array([True, False])))
    np.testing.assert_allclose(s1, [0.9, 0.25], **TOL)
    s_all = np.asarray(head_importance_meanmax(jnp.asarray(A)))
    np.testing.assert_allclose(s_all, [0.9, (0.25 + 0.95) / 2], **TOL)
    per_map = np.asarray(head_importance_meanmax(jnp.asarray(np.stack([A, A])), key_mask=key_mask,
                                                 query_mask=np.array([[True, False], [False, True]])))
    np.testing.assert_allclose(per_map, [[0.9, 0.25], [0.9, 0.05]], **TOL)


def test_localization_map_layout_and_normalisation():
    """Row-major placement of the image columns on the grid, the mean over the query rows and the sum-1
    normalisation (catches a transposed grid, or rows summed instead of averaged with image columns picked
    wrongly)."""
    L, N = 6, 4
    flow = np.zeros((1, L, L), np.float32)
    flow[0, 4, :4] = [0.1, 0.2, 0.3, 0.0]
    flow[0, 4, 4] = 0.4
    flow[0, 5, :4] = [0.0, 0.0, 0.0, 0.5]
    flow[0, 5, 5] = 0.5
    is_image = np.arange(L) < N
    out = np.asarray(localization_map(jnp.asarray(flow), jnp.asarray([[False] * 4 + [True, True]]), is_image, (2, 2)))
    want = np.array([[0.05, 0.1], [0.15, 0.25]]) / 0.55
    np.testing.assert_allclose(out[0], want, **TOL)


def test_threshold_points_iou_and_centre_prior():
    """Hand-built map: the mask keeps values >= half the max, points are the argmax and argmin positions,
    IoU of known masks, the centre prior peaks at the centre (catches argmax/argmin swapped, row/col swapped,
    IoU as intersection over the prediction)."""
    amap = jnp.asarray([[0.1, 0.9, 0.0], [0.5, 0.3, 0.2]])
    np.testing.assert_array_equal(np.asarray(threshold_map(amap, 0.5)), [[False, True, False], [True, False, False]])
    pos, neg = attention_to_points(amap, k_pos=2, k_neg=1)
    np.testing.assert_array_equal(pos, [[0, 1], [1, 0]])
    np.testing.assert_array_equal(neg, [[0, 2]])
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True
    b[:2, :] = True
    np.testing.assert_allclose(mask_iou(a, b), 0.5)
    np.testing.assert_allclose(mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)), 0.0)
    prior = centre_prior((5, 5))
    assert np.unravel_index(np.argmax(prior), prior.shape) == (2, 2)
    np.testing.assert_allclose(prior.sum(), 1.0, rtol=1e-5)


def test_bad_arguments_raise_naming_the_argument():
    A = _causal_probs(9)
    with pytest.raises(ValueError, match="head_weights"):
        aggregate_heads(A, jnp.ones(4))
    with pytest.raises(ValueError, match="head_weights"):
        aggregate_heads(A, jnp.array([1.0, -1.0, 1.0]))
    with pytest.raises(TypeError, match="attn"):
        aggregate_heads(np.ones((2, 3, 4, 4), np.int32))
    with pytest.raises(ValueError, match="attn_layers"):
        attention_rollout([])
    with pytest.raises(ValueError, match="square"):
        attention_rollout([jnp.ones((1, 3, 4)) / 4])
    with pytest.raises(ValueError, match="residual"):
        attention_rollout([A.mean(1)], residual=1.5)
    with pytest.raises(ValueError, match="masks"):
        attention_rollout([A.mean(1)], masks=jnp.ones((5, 5), bool))
    with pytest.raises(ValueError, match="query_mask"):
        head_importance_meanmax(A, query_mask=np.ones(5, bool))
    with pytest.raises(ValueError, match="key_mask"):
        head_importance_meanmax(A, key_mask=np.ones(6, np.int32))
    with pytest.raises(ValueError, match="grid"):
        localization_map(A.mean(1), jnp.ones((2, 6), bool), np.arange(6) < 4, (3, 3))
    with pytest.raises(ValueError, match="thresh"):
        threshold_map(jnp.ones((2, 2)), 2.0)
    with pytest.raises(ValueError, match="k_pos"):
        attention_to_points(jnp.ones((2, 2)), k_pos=5)
    with pytest.raises(ValueError, match="pred and target"):
        mask_iou(np.ones((2, 2), bool), np.ones((2, 3), bool))
