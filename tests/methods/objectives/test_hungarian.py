"""DETR's box algebra, matching cost, Hungarian assignment and set loss (shared by P35 DEIM).

Each test's docstring names the mutation it catches.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.objectives import hungarian as H


def test_iou_and_giou_on_hand_built_boxes():
    """Identical boxes: IoU = GIoU = 1; side-by-side unit squares one unit apart: IoU 0, GIoU = -(3-2)/3;
    overlapping 2x2 squares offset by 1: IoU 1/7, GIoU 1/7 - 2/9. Catches: the hull term dropped (GIoU = IoU),
    the union instead of the hull in the denominator, intersection not clipped at 0 for disjoint boxes."""
    a = jnp.array([[0.0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 2, 2]])
    b = jnp.array([[0.0, 0, 1, 1], [2, 0, 3, 1], [1, 1, 3, 3]])
    np.testing.assert_allclose(H.box_iou(a, b), [1, 0, 1 / 7], atol=1e-6)
    np.testing.assert_allclose(H.generalized_box_iou(a, b), [1, -1 / 3, 1 / 7 - 2 / 9], atol=1e-6)


def test_pairwise_tables_by_broadcasting_and_box_conversions_roundtrip():
    """``a[:, None]`` x ``b[None]`` gives the [N, M] table entry by entry, and cxcywh <-> xyxy invert each other.
    Catches: a conversion using w instead of w/2, an axis mix-up in the broadcast."""
    key = jax.random.PRNGKey(0)
    c = jax.random.uniform(key, (5, 4), minval=0.2, maxval=0.6)
    np.testing.assert_allclose(H.xyxy_to_cxcywh(H.cxcywh_to_xyxy(c)), c, atol=1e-6)
    xy = H.cxcywh_to_xyxy(c)
    np.testing.assert_allclose(xy[:, 2] - xy[:, 0], c[:, 2], atol=1e-6)
    table = H.generalized_box_iou(xy[:3, None], xy[None, 3:])
    assert table.shape == (3, 2)
    np.testing.assert_allclose(table[2, 1], H.generalized_box_iou(xy[2], xy[4]), atol=1e-6)


def test_hungarian_finds_the_known_optimum_where_greedy_fails():
    """2x2 ``[[1, 2], [2, 5]]``: optimum is the anti-diagonal (4), greedy takes 1 then 5; 3x3 with optimum 5
    at (0,1), (1,0), (2,2). Extra queries stay unmatched (-1) and padded target slots are never assigned.
    Catches: a greedy/argmin matcher, cost transposed (targets -> queries), padded slots leaking in."""
    c2 = np.array([[[1.0, 2.0], [2.0, 5.0]]])
    np.testing.assert_array_equal(H.hungarian_match(c2, [2]), [[1, 0]])
    c3 = np.array([[4.0, 1.0, 3.0, -9.0], [2.0, 0.0, 5.0, -9.0], [3.0, 2.0, 2.0, -9.0], [9.0, 9.0, 9.0, -9.0]])
    qt = H.hungarian_match(c3[None], [3])  # 4 queries, 4 slots, 3 real targets; slot 3 is padding
    np.testing.assert_array_equal(qt, [[1, 0, 2, -1]])
    assert c3[[0, 1, 2], [1, 0, 2]].sum() == 5
    empty = H.hungarian_match(c3[None], [0])
    np.testing.assert_array_equal(empty, [[-1, -1, -1, -1]])


def test_matching_cost_terms_on_hand_built_inputs():
    """With only the class term, softmax cost is -p(c); with only L1, the summed absolute box difference; with
    only GIoU, -GIoU; the focal cost equals its formula. Catches: a missing minus sign (would match the worst
    query), L1 averaged instead of summed, the wrong class column picked."""
    key = jax.random.PRNGKey(1)
    k1, k2, k3 = jax.random.split(key, 3)
    logits = jax.random.normal(k1, (1, 3, 4))
    pb = jax.random.uniform(k2, (1, 3, 4), minval=0.2, maxval=0.5)
    tb = jax.random.uniform(k3, (1, 2, 4), minval=0.2, maxval=0.5)
    tc = jnp.array([[2, 0]])
    cls = H.matching_cost(logits, pb, tc, tb, w_class=1, w_bbox=0, w_giou=0)
    p = jax.nn.softmax(logits, -1)
    np.testing.assert_allclose(cls[0], -p[0][:, jnp.array([2, 0])], atol=1e-6)
    l1 = H.matching_cost(logits, pb, tc, tb, w_class=0, w_bbox=1, w_giou=0)
    np.testing.assert_allclose(l1[0, 1, 0], jnp.abs(pb[0, 1] - tb[0, 0]).sum(), atol=1e-6)
    g = H.matching_cost(logits, pb, tc, tb, w_class=0, w_bbox=0, w_giou=1)
    np.testing.assert_allclose(g[0, 2, 1], -H.generalized_box_iou(H.cxcywh_to_xyxy(pb[0, 2]),
                                                                   H.cxcywh_to_xyxy(tb[0, 1])), atol=1e-6)
    f = H.matching_cost(logits, pb, tc, tb, class_cost="focal", w_class=1, w_bbox=0, w_giou=0)
    s = jax.nn.sigmoid(logits[0, 0, 2])
    want = 0.25 * (1 - s) ** 2 * -jnp.log(s + 1e-8) - 0.75 * s ** 2 * -jnp.log(1 - s + 1e-8)
    np.testing.assert_allclose(f[0, 0, 0], want, atol=1e-6)


def test_exact_prediction_is_matched_to_its_target():
    """A query holding a target's exact box and confident class is matched to it. Catches a cost sign error."""
    tb = jnp.array([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]]])
    tc = jnp.array([[1, 0]])
    pb = jnp.array([[[0.5, 0.5, 0.5, 0.5], [0.7, 0.6, 0.3, 0.2], [0.3, 0.3, 0.2, 0.2]]])
    logits = jnp.array([[[0.0, 0, 0, 0], [5.0, 0, 0, 0], [0.0, 5, 0, 0]]])
    qt = H.hungarian_match(H.matching_cost(logits, pb, tc, tb), [2])
    np.testing.assert_array_equal(qt, [[-1, 1, 0]])


def test_detr_set_loss_hand_values():
    """One image, 2 queries, 1 target matched to query 0. ce = (nll_0 + eos * nll_1(no-object)) / (1 + eos);
    l1 and 1 - GIoU over the one matched box. eos_coef = 1 gives the plain mean. Catches: no-object weight
    dropped or applied to positives, a plain mean instead of the weighted mean, boxes of unmatched queries
    counted."""
    logits = jnp.array([[[1.0, -0.5, 0.3], [0.2, 0.1, 2.0]]])  # C = 2 classes + no-object
    pb = jnp.array([[[0.4, 0.5, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]]])
    tb = jnp.array([[[0.5, 0.5, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0]]])
    tc = jnp.array([[1, -1]])
    qt = jnp.array([[0, -1]])
    out = H.detr_set_loss(logits, pb, tc, tb, qt, eos_coef=0.1)
    lp = jax.nn.log_softmax(logits[0], -1)
    nll0, nll1 = -lp[0, 1], -lp[1, 2]
    np.testing.assert_allclose(out["ce"], (nll0 + 0.1 * nll1) / 1.1, rtol=1e-6)
    np.testing.assert_allclose(out["l1"], 0.1, rtol=1e-5)
    giou = H.generalized_box_iou(H.cxcywh_to_xyxy(pb[0, 0]), H.cxcywh_to_xyxy(tb[0, 0]))
    np.testing.assert_allclose(out["giou"], 1 - giou, rtol=1e-6)
    np.testing.assert_allclose(out["total"], out["ce"] + 5 * out["l1"] + 2 * out["giou"], rtol=1e-6)
    plain = H.detr_set_loss(logits, pb, tc, tb, qt, eos_coef=1.0)
    np.testing.assert_allclose(plain["ce"], (nll0 + nll1) / 2, rtol=1e-6)


def test_bad_arguments_raise():
    """Shapes and options are checked with messages naming the argument."""
    with pytest.raises(ValueError, match="boxes"):
        H.cxcywh_to_xyxy(jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="class_cost"):
        H.matching_cost(jnp.ones((1, 2, 3)), jnp.ones((1, 2, 4)), jnp.zeros((1, 1), int), jnp.ones((1, 1, 4)),
                        class_cost="hinge")
    with pytest.raises(ValueError, match="pred_boxes"):
        H.matching_cost(jnp.ones((1, 2, 3)), jnp.ones((1, 3, 4)), jnp.zeros((1, 1), int), jnp.ones((1, 1, 4)))
    with pytest.raises(ValueError, match="counts"):
        H.hungarian_match(np.ones((1, 2, 3)), [3])
    with pytest.raises(ValueError, match="NaN"):
        H.hungarian_match(np.full((1, 2, 2), np.nan), [1])
    with pytest.raises(ValueError, match="query_target"):
        H.detr_set_loss(jnp.ones((1, 2, 3)), jnp.ones((1, 2, 4)), jnp.zeros((1, 1), int), jnp.ones((1, 1, 4)),
                        jnp.zeros((1, 3), int))
