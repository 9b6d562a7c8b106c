"""P23 DCAL: attention rollout, top-R selection, GLCA, PWCA, the uncertainty-weighted loss and the DCAL wrapper."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn.methods.vision import dcal as D


def _qkv(key, B=2, N=7, H=2, Dh=4):
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    return tuple(jax.random.normal(k, (B, N, H, Dh), jnp.float32) for k in (k1, k2, k3))


def _np_attn(q, k, v):
    """Numpy softmax attention ``[B, T, H, D]`` (the test's own reference) and its log-sum-exp ``[B, T, H]``."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    m = s.max(-1, keepdims=True)
    e = np.exp(s - m)
    z = e.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", e / z, v), np.transpose((m + np.log(z))[..., 0], (0, 2, 1))


def _probs(key, B=2, H=3, N=5):
    return jax.nn.softmax(jax.random.normal(jax.random.key(key), (B, H, N, N)), axis=-1)


_MODELS = {}


def _x(key):
    """Model input: one shape for every model test, so eager op compilations are shared between tests."""
    return jax.random.normal(jax.random.key(key), (3, 6, 8))


def _model(branches=D.BRANCHES, ratio=0.5, dim=8, seed=0):
    """Tiny 2-block DCAL (cached per arguments: models are read-only in these tests)."""
    key = (tuple(branches), ratio, dim, seed)
    if key not in _MODELS:
        _MODELS[key] = _build(branches, ratio, dim, seed)
    return _MODELS[key]


def _build(branches, ratio, dim, seed):
    rngs = nnx.Rngs(seed)
    blocks = [D.DCALBlock(dim, 2, 16, rngs=rngs) for _ in range(2)]
    return D.DCAL(blocks, dim=dim, num_classes=3, branches=branches, glca_ratio=ratio,
                  make_block=lambda r: D.DCALBlock(dim, 2, 16, rngs=r), rngs=rngs)


# -------------------------------------------------------------------------------------------- rollout
def test_rollout_two_layers_equals_hand_product_with_half_identity():
    """Hand-built 2-layer maps: catches a dropped residual identity, a weight other than 0.5, the product in the
    wrong order (S1 S2 instead of S2 S1), a missing head average (max / first head) or a sum over heads."""
    s1 = jnp.array([[[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],
                     [[0.1, 0.1, 0.8], [0.5, 0.5, 0.0], [0.2, 0.6, 0.2]]]])            # [1, 2, 3, 3]
    s2 = jnp.array([[[[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.2, 0.2, 0.6]],
                     [[0.4, 0.4, 0.2], [0.0, 0.3, 0.7], [1.0, 0.0, 0.0]]]])
    eye = np.eye(3)
    b1 = 0.5 * np.asarray(s1[0]).mean(0) + 0.5 * eye
    b2 = 0.5 * np.asarray(s2[0]).mean(0) + 0.5 * eye
    expected = b2 @ b1
    assert not np.allclose(b1 @ b2, expected, atol=1e-3)                   # the order is observable here
    np.testing.assert_allclose(np.asarray(D.attention_rollout([s1, s2]))[0], expected, rtol=1e-6, atol=1e-6)


def test_rollout_rows_sum_to_one_and_alpha_one_is_the_plain_product():
    """Random softmax maps: rows of the rollout sum to 1 (catches an un-normalised residual, e.g. S + I); alpha=1
    drops the identity (catches alpha applied to the wrong term)."""
    maps = [_probs(i) for i in range(3)]
    r = np.asarray(D.attention_rollout(maps))
    np.testing.assert_allclose(r.sum(-1), 1.0, rtol=1e-5)
    m = [np.asarray(s).mean(1) for s in maps]
    np.testing.assert_allclose(np.asarray(D.attention_rollout(maps, alpha=1.0)),
                               np.einsum("bij,bjk,bkl->bil", m[2], m[1], m[0]), rtol=1e-5, atol=1e-6)


def test_rollout_rejects_bad_input():
    with pytest.raises(ValueError, match="attn_list"):
        D.attention_rollout([])
    with pytest.raises(ValueError, match=r"attn_list\[1\]"):
        D.attention_rollout([_probs(0), jnp.ones((2, 3, 5, 4))])
    with pytest.raises(ValueError, match="alpha"):
        D.attention_rollout([_probs(0)], alpha=1.5)


# -------------------------------------------------------------------------------------------- selection
def test_top_r_picks_the_known_tokens_and_glca_select_keeps_cls_first():
    """Hand-built responses: catches ascending instead of descending order, ranking the CLS column, forgetting the
    +1 shift from patch columns back to token indices, or dropping the CLS query."""
    resp = jnp.array([[0.9, 0.1, 0.5, 0.05, 0.3, 0.2], [0.0, 0.3, 0.1, 0.6, 0.2, 0.05]])
    np.testing.assert_array_equal(np.asarray(D.top_r_indices(resp, 2)), [[0, 2], [3, 1]])
    # CLS column (0) holds the largest value in row 0 but is never ranked; R = floor(5 * 0.4) = 2 patches
    np.testing.assert_array_equal(np.asarray(D.glca_select(resp, 0.4)), [[0, 2, 4], [0, 3, 1]])
    assert D.num_selected(784, 0.1) == 78 and D.num_selected(16, 0.25) == 4 and D.num_selected(5, 0.01) == 1


def test_top_r_is_deterministic_with_ties():
    """Equal responses: the lower index wins, every call (catches a random / unstable tie break)."""
    resp = jnp.array([[0.2, 0.5, 0.5, 0.1, 0.5]])
    first = np.asarray(D.top_r_indices(resp, 2))
    np.testing.assert_array_equal(first, [[1, 2]])
    np.testing.assert_array_equal(np.asarray(jax.jit(D.top_r_indices, static_argnums=1)(resp, 2)), first)


def test_selection_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ratio"):
        D.glca_select(jnp.ones((1, 4)), 0.0)
    with pytest.raises(ValueError, match="r must"):
        D.top_r_indices(jnp.ones((1, 4)), 5)
    with pytest.raises(ValueError, match="rollout_cls"):
        D.glca_select(jnp.ones((4,)), 0.5)


# -------------------------------------------------------------------------------------------------- GLCA
def test_glca_with_all_tokens_is_sa_in_the_selected_order():
    """R = 100%: every query is kept, so GLCA equals self-attention rows in the selected order (catches local
    keys/values K^l V^l instead of the global ones, or a wrong gather axis)."""
    q, k, v = _qkv(1)
    resp = jax.random.uniform(jax.random.key(9), q.shape[:2])
    out, index = D.glca(q, k, v, resp, 1.0)
    assert index.shape == (2, 7) and sorted(np.asarray(index[0]).tolist()) == list(range(7))
    sa, _ = _np_attn(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.stack([sa[b][np.asarray(index[b])] for b in range(2)]),
                               rtol=1e-5, atol=1e-5)


def test_glca_subset_rows_attend_to_all_keys():
    """R < 100%: the selected rows equal SA's rows of those queries over ALL keys (catches attending only among
    the selected tokens, which the paper rejects)."""
    q, k, v = _qkv(2, N=9)
    resp = jax.random.uniform(jax.random.key(3), q.shape[:2])
    out, index = D.glca(q, k, v, resp, 0.25)
    assert out.shape == (2, 3, 2, 4)                                   # CLS + floor(8 * 0.25) = 2
    sa, _ = _np_attn(q, k, v)
    idx = np.asarray(index)
    local = np.stack([_np_attn(*(np.asarray(a)[b][idx[b]][None] for a in (q, k, v)))[0][0] for b in range(2)])
    np.testing.assert_allclose(np.asarray(out), np.stack([sa[b][np.asarray(index[b])] for b in range(2)]),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(out), local, atol=1e-3)


# -------------------------------------------------------------------------------------------------- PWCA
def test_pwca_with_the_image_as_its_own_distractor_is_sa():
    """(K2, V2) = (K1, V1): duplicated keys halve every weight and duplicated values restore it, so PWCA = SA
    exactly (catches a distractor term weighted differently from the image's own, e.g. a missing / extra scale)."""
    q, k, v = _qkv(4)
    np.testing.assert_allclose(np.asarray(D.pwca(q, k, v, k, v)), _np_attn(q, k, v)[0], rtol=1e-5, atol=1e-5)


def test_pwca_is_one_joint_softmax_over_both_images():
    """A distractor of another length: PWCA = the LSE merge of SA over K1 and cross-attention over K2 (catches two
    separate softmaxes averaged or summed, or dropping the distractor's keys)."""
    q, k1, v1 = _qkv(5)
    _, k2, v2 = _qkv(6, N=4)
    o1, l1 = _np_attn(q, k1, v1)
    o2, l2 = _np_attn(q, k2, v2)
    w1 = (1 / (1 + np.exp(l2 - l1)))[..., None]                         # Z1 / (Z1 + Z2)
    expected = w1 * o1 + (1 - w1) * o2
    out = D.pwca(q, k1, v1, k2, v2)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(out), 0.5 * (o1 + o2), atol=1e-3)
    assert not np.allclose(np.asarray(out), o1, atol=1e-3)


def test_pwca_with_masked_distractor_keys_is_sa():
    """Distractor keys whose scores are -inf (a mask over the concatenated keys) leave SA: catches a softmax
    normalised over the own keys only while still adding distractor values."""
    q, k1, v1 = _qkv(7)
    _, k2, v2 = _qkv(8)
    k = jnp.concatenate([k1, k2], 1)
    v = jnp.concatenate([v1, v2], 1)
    mask = jnp.arange(14)[None, None, None, :] < 7
    np.testing.assert_allclose(np.asarray(jattn.attention(q, k, v, mask=mask)), _np_attn(q, k1, v1)[0],
                               rtol=1e-5, atol=1e-5)
    # and pwca is exactly the unmasked form of that concatenation
    np.testing.assert_allclose(np.asarray(D.pwca(q, k1, v1, k2, v2)), _np_attn(q, k, v)[0], rtol=1e-5, atol=1e-5)


def test_pwca_rejects_mismatched_distractor():
    q, k, v = _qkv(1)
    with pytest.raises(ValueError, match="k2"):
        D.pwca(q, k, v, k[..., :2], v)
    with pytest.raises(ValueError, match="k2 and v2"):
        D.pwca(q, k, v, k, v[:, :3])


# -------------------------------------------------------------------------------------------------- loss
def test_uncertainty_weighted_loss_hand_value_and_zero_weights():
    """w = 0 gives half the plain sum (catches a missing 1/2); a hand value catches exp(+w) instead of exp(-w) or
    a dropped ``+ w`` regulariser."""
    losses = [jnp.float32(1.0), jnp.float32(2.0), jnp.float32(4.0)]
    assert float(D.uncertainty_weighted_loss(losses, jnp.zeros(3))) == pytest.approx(3.5)
    w = jnp.array([0.5, -1.0, 2.0])
    expected = 0.5 * (np.exp(-0.5) * 1 + np.exp(1.0) * 2 + np.exp(-2.0) * 4 + 0.5 - 1.0 + 2.0)
    assert float(D.uncertainty_weighted_loss(losses, w)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="w"):
        D.uncertainty_weighted_loss(losses, jnp.zeros(2))


# ------------------------------------------------------------------------------------------------- model
def test_inference_never_touches_pwca(monkeypatch):
    """train=False (and __call__) must not run PWCA: with ``pwca`` replaced by a function that raises, inference
    still works and training raises (catches PWCA left on at inference)."""
    model = _model()
    x = _x(0)

    def boom(*a, **k):
        raise AssertionError("pwca called")

    monkeypatch.setattr(D, "pwca", boom)
    assert set(model.branch_logits(x, train=False)) == {"sa", "glca"}
    assert model(x).shape == (3, 3)
    with pytest.raises(AssertionError, match="pwca called"):
        model.branch_logits(x, train=True)


def test_pwca_branch_shares_sa_weights_and_equals_sa_with_self_as_partner():
    """partner = the image itself: every block's distractor K/V equal the image's own, so the PWCA logits equal
    the SA logits (catches a PWCA branch with its own weights / own classifier, or distractor K/V taken from the
    wrong block)."""
    model = _model()
    x = _x(1)
    out = model.branch_logits(x, train=True, partner=jnp.arange(3))
    np.testing.assert_allclose(np.asarray(out["pwca"]), np.asarray(out["sa"]), rtol=1e-5, atol=1e-5)
    other = model.branch_logits(x, train=True, partner=jnp.array([1, 2, 0]))
    assert not np.allclose(np.asarray(other["pwca"]), np.asarray(other["sa"]), atol=1e-4)


def test_inference_scores_add_sa_and_glca_probabilities():
    """__call__ = log(softmax(SA) + softmax(GLCA)) (catches logits added instead of probabilities, or GLCA
    dropped); an SA-only model returns its SA logits unchanged."""
    model = _model()
    x = _x(2)
    z = model.branch_logits(x, train=False)
    np.testing.assert_allclose(np.asarray(jnp.exp(model(x))),
                               np.asarray(jax.nn.softmax(z["sa"]) + jax.nn.softmax(z["glca"])), rtol=1e-5)
    sa_only = _model(branches=("sa",))
    np.testing.assert_allclose(np.asarray(sa_only(x)), np.asarray(sa_only.branch_logits(x, train=True)["sa"]))


def test_glca_branch_uses_rollout_of_the_sa_maps():
    """The model's GLCA indices equal glca_select of the rollout of its own SA maps (catches selecting by the
    last layer's raw attention or by a non-CLS row)."""
    model = _model(ratio=0.5)
    x = _x(3)
    _, _, _, probs = model.sa_stream(model._with_cls(x), need_probs=True)
    expected = D.glca_select(D.attention_rollout(probs)[:, 0], 0.5)
    np.testing.assert_array_equal(np.asarray(model.glca_indices(x)), np.asarray(expected))
    assert model.glca_indices(x).shape == (3, 4)


def test_dcal_loss_is_plain_ce_for_sa_only_and_weighted_otherwise():
    """SA-only: plain cross-entropy, the baseline (catches the baseline trained with the uncertainty weighting);
    three branches at w = 0: half the sum of the three CEs."""
    x = _x(4)
    y = jnp.array([0, 1, 2])
    m1 = _model(branches=("sa",))
    loss, ce = D.dcal_loss(m1, m1.branch_logits(x, train=True), y)
    assert float(loss) == pytest.approx(float(ce["sa"]))
    m3 = _model()
    loss, ce = D.dcal_loss(m3, m3.branch_logits(x, train=True), y)
    assert set(ce) == {"sa", "glca", "pwca"}
    assert float(loss) == pytest.approx(0.5 * sum(float(c) for c in ce.values()), rel=1e-6)


def test_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="branches"):
        _model(branches=("glca",))
    with pytest.raises(ValueError, match="make_block"):
        D.DCAL([D.DCALBlock(8, 2, 8, rngs=nnx.Rngs(0))], dim=8, num_classes=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens"):
        _model().branch_logits(jnp.ones((2, 6, 5)), train=False)
    with pytest.raises(ValueError, match="partner"):
        _model().branch_logits(_x(5), train=True, partner=jnp.arange(2))
    with pytest.raises(TypeError, match="block"):
        D.DCAL([nnx.Linear(2, 2, rngs=nnx.Rngs(0))], dim=2, num_classes=2, branches=("sa",), rngs=nnx.Rngs(0))
