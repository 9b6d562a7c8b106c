"""P17 ACAM-KD (jattn/methods/objectives/acam_kd.py): defining properties on hand-built and fresh random inputs.

Each test's docstring names the mutation of the method it catches.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.objectives import acam_kd as A

B, N, CS, CT, M = 2, 6, 5, 8, 3


def _rand(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _params(seed=0, num_masks=M):
    return A.init_params(jax.random.key(seed), CS, CT, num_masks=num_masks)


def _mse(a, b):
    return float(jnp.mean(jnp.square(a - b)))


def test_all_ones_masks_reduce_to_plain_mse():
    """All-ones spatial and channel masks: each mask-normalised term is the plain MSE, so ``separate`` with weights
    (1, 0) / (0, 1) and ``product`` equal MSE and the default (1, 1) is 2 x MSE. Catches: a normaliser missing its
    C or N factor, a sum instead of a mean, the product form's normaliser using one mask only."""
    f_t, f_s = _rand(1, B, N, CT), _rand(2, B, N, CT)
    ones_s, ones_c = jnp.ones((B, M, N)), jnp.ones((B, M, CT))
    mse = _mse(f_t, f_s)
    np.testing.assert_allclose(A.masked_distill_loss(f_t, f_s, ones_s, ones_c, channel_weight=0.0), mse, rtol=1e-5)
    np.testing.assert_allclose(A.masked_distill_loss(f_t, f_s, ones_s, ones_c, spatial_weight=0.0), mse, rtol=1e-5)
    np.testing.assert_allclose(A.masked_distill_loss(f_t, f_s, ones_s, ones_c, combine="product"), mse, rtol=1e-5)
    np.testing.assert_allclose(A.masked_distill_loss(f_t, f_s, ones_s, ones_c), 2 * mse, rtol=1e-5)


def test_one_hot_masks_select_the_known_position_and_channel():
    """A spatial mask on position 2 only gives the channel-mean squared error at position 2; a channel mask on
    channel 3 only gives the position-mean squared error of channel 3; the product of both gives that single
    entry. Catches: masks applied along the wrong axis (positions vs channels), the wrong normaliser."""
    f_t, f_s = _rand(3, 1, N, CT), _rand(4, 1, N, CT)
    d2 = np.asarray(jnp.square(f_t - f_s))[0]
    sp = jnp.zeros((1, 1, N)).at[0, 0, 2].set(1.0)
    ch = jnp.zeros((1, 1, CT)).at[0, 0, 3].set(1.0)
    np.testing.assert_allclose(A.masked_distill_loss(f_t, f_s, sp, ch, channel_weight=0.0), d2[2].mean(), rtol=1e-5)
    np.testing.assert_allclose(A.masked_distill_loss(f_t, f_s, sp, ch, spatial_weight=0.0), d2[:, 3].mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(A.masked_distill_loss(f_t, f_s, sp, ch, combine="product"), d2[2, 3], rtol=1e-4)


def test_loss_is_normalised_by_mask_mass():
    """Scaling every mask by 0.3 leaves the loss unchanged (each mask's term is divided by its own mass), in both
    forms; masks differing per mask index average over the M masks. Catches: dropping the mass normaliser
    (the loss would scale by 0.3) or normalising by the total mass of all masks together."""
    f_t, f_s = _rand(5, B, N, CT), _rand(6, B, N, CT)
    sp = jax.nn.sigmoid(_rand(7, B, M, N))
    ch = jax.nn.sigmoid(_rand(8, B, M, CT))
    for combine in ("separate", "product"):
        a = A.masked_distill_loss(f_t, f_s, sp, ch, combine=combine)
        b = A.masked_distill_loss(f_t, f_s, 0.3 * sp, 0.3 * ch, combine=combine)
        np.testing.assert_allclose(a, b, rtol=1e-4)
    # the mean over masks of each mask's own normalised loss
    per = [A.masked_distill_loss(f_t, f_s, sp[:, m:m + 1], ch[:, m:m + 1]) for m in range(M)]
    np.testing.assert_allclose(A.masked_distill_loss(f_t, f_s, sp, ch), np.mean(per), rtol=1e-5)


def test_identical_student_and_teacher_give_zero_distillation():
    """With an identity projection and ``f_s == f_t``, the ACAM distillation term and plain feature KD are 0
    whatever the masks (the diversity term is separate). Catches: a loss not built from ``f_t - phi(f_s)``
    (e.g. comparing the fused feature to the teacher)."""
    f = _rand(9, B, N, CT)
    p = A.init_params(jax.random.key(0), CT, CT, num_masks=M)
    p = {**p, "align_w": jnp.eye(CT), "align_b": jnp.zeros(CT)}
    loss, aux = A.acam_kd_loss(f, f, p)
    assert float(aux["distill"]) == pytest.approx(0.0, abs=1e-7)
    assert float(loss) == pytest.approx(float(aux["diversity"]), abs=1e-6)
    assert float(A.feature_kd_loss(f, f, p)) == pytest.approx(0.0, abs=1e-7)
    assert float(A.feature_kd_loss(f, 1.01 * f, p)) > 0


def test_feature_kd_is_mse_of_the_projected_student():
    """Plain feature KD = mean((f_t - (f_s W + b))^2) on fresh random inputs. Catches: no projection, the
    projection applied to the teacher, a sum instead of the mean."""
    f_t, f_s, p = _rand(10, B, N, CT), _rand(11, B, N, CS), _params(1)
    p = {**p, "align_b": _rand(12, CT)}
    expect = np.mean((np.asarray(f_t) - (np.asarray(f_s) @ np.asarray(p["align_w"]) + np.asarray(p["align_b"]))) ** 2)
    np.testing.assert_allclose(A.feature_kd_loss(f_t, f_s, p), expect, rtol=1e-5)


def test_fusion_with_a_one_hot_attention_picks_the_selected_student_value():
    """Teacher queries that each match exactly one student key (orthogonal keys, large logits) make the attention
    one-hot: row i of F_fuse is the value of the student token the teacher query i points to, i.e.
    ``phi(f_s)[perm[i]] W_v``. Catches: keys/values taken from the teacher (the answer would be the teacher's own
    token), queries from the student, a softmax over the query axis."""
    C = CT
    perm = np.array([3, 0, 5, 1, 4, 2])
    f_s = 30.0 * jnp.eye(C)[:N][None]                                # student tokens: orthogonal directions
    f_t = 30.0 * jnp.eye(C)[perm][None]                              # teacher token i points at student perm[i]
    p = {**A.init_params(jax.random.key(0), C, C), "w_q": jnp.eye(C), "w_k": jnp.eye(C)}
    fused = A.stca_fusion(f_t, f_s, p)
    expect = np.asarray(f_s[0] @ p["w_v"])[perm]
    np.testing.assert_allclose(fused[0], expect, rtol=1e-4, atol=1e-4)


def test_fusion_equals_the_explicit_multi_head_formula():
    """Two heads on fresh random inputs: per head ``softmax((f_t W_q)_h (phi W_k)_h^T / sqrt(d)) (phi W_v)_h``.
    Catches: a missing 1/sqrt(d) scale, heads mixed (one softmax over all channels), wrong key/value source."""
    f_t, f_s, p = _rand(13, B, N, CT), _rand(14, B, N, CT), A.init_params(jax.random.key(2), CT, CT)
    q = (f_t @ p["w_q"]).reshape(B, N, 2, CT // 2)
    k = (f_s @ p["w_k"]).reshape(B, N, 2, CT // 2)
    v = (f_s @ p["w_v"]).reshape(B, N, 2, CT // 2)
    att = jax.nn.softmax(jnp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(CT // 2), -1)
    expect = jnp.einsum("bhij,bjhd->bihd", att, v).reshape(B, N, CT)
    np.testing.assert_allclose(A.stca_fusion(f_t, f_s, p, num_heads=2), expect, rtol=1e-4, atol=1e-5)


def test_masks_are_in_unit_interval_per_sample_and_a_function_of_the_fusion():
    """Masks have shapes [B, M, N] / [B, M, C] in (0, 1); the masks inside ``acam_kd_loss`` are exactly
    ``ascm_masks(stca_fusion(f_t, phi(f_s)))``; changing only the student feature changes them (the student
    co-decides what is distilled); the channel mask of a sample depends on that sample only. Catches: masks from
    the teacher feature alone, a softmax over the batch, channel pooling over the batch axis."""
    f_t, f_s, p = _rand(15, B, N, CT), _rand(16, B, N, CS), _params(3)
    sp, ch = A.ascm_masks(A.stca_fusion(f_t, A.align(f_s, p), p), p)
    assert sp.shape == (B, M, N) and ch.shape == (B, M, CT)
    assert float(sp.min()) > 0 and float(sp.max()) < 1 and float(ch.min()) > 0 and float(ch.max()) < 1
    _, aux = A.acam_kd_loss(f_t, f_s, p)
    np.testing.assert_allclose(aux["spatial"], sp, rtol=1e-6)
    np.testing.assert_allclose(aux["channel"], ch, rtol=1e-6)
    _, aux2 = A.acam_kd_loss(f_t, f_s + _rand(17, B, N, CS), p)
    assert float(jnp.abs(aux2["spatial"] - sp).max()) > 1e-4
    # sample 0's masks do not move when sample 1's features change
    f_s_b = f_s.at[1].add(1.0)
    _, aux3 = A.acam_kd_loss(f_t, f_s_b, p)
    np.testing.assert_allclose(aux3["channel"][0], ch[0], rtol=1e-5)
    np.testing.assert_allclose(aux3["spatial"][0], sp[0], rtol=1e-5)
    assert float(jnp.abs(aux3["channel"][1] - ch[1]).max()) > 1e-5


def test_diversity_is_zero_for_disjoint_masks_one_for_identical_and_the_known_dice():
    """Disjoint supports give 0, identical masks 1, and masks [1,1,0] vs [0,1,1] the Dice 2*1/(2+2) = 0.5; three
    masks average the 3 pairs. Catches: including the i == j pairs (identical-to-itself terms), a cosine instead
    of Dice, summing pairs instead of averaging."""
    disjoint = jnp.array([[[1.0, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0.5, 1]]])
    assert float(A.mask_diversity_loss(disjoint)) == pytest.approx(0.0, abs=1e-6)
    same = jnp.tile(jax.nn.sigmoid(_rand(18, 1, 1, 6)), (2, 3, 1))
    assert float(A.mask_diversity_loss(same)) == pytest.approx(1.0, abs=1e-5)
    pair = jnp.array([[[1.0, 1, 0], [0, 1, 1]]])
    assert float(A.mask_diversity_loss(pair)) == pytest.approx(0.5, abs=1e-6)
    three = jnp.array([[[1.0, 1, 0], [0, 1, 1], [1, 1, 0]]])
    assert float(A.mask_diversity_loss(three)) == pytest.approx((0.5 + 1.0 + 0.5) / 3, abs=1e-6)
    assert float(A.mask_diversity_loss(pair[:, :1])) == 0.0


def test_gradients_reach_student_and_mask_generator_not_teacher():
    """d loss / d f_t is exactly 0 (frozen teacher); the student feature, projector, fusion and both mask
    generators get non-zero gradients. Catches: a missing stop_gradient on the teacher, masks detached from the
    loss (the generator would never learn), fusion weights unused."""
    f_t, f_s, p = _rand(19, B, N, CT), _rand(20, B, N, CS), _params(4)
    g_t, g_s, g_p = jax.grad(lambda a, b, c: A.acam_kd_loss(a, b, c)[0], argnums=(0, 1, 2))(f_t, f_s, p)
    assert float(jnp.abs(g_t).max()) == 0.0
    assert float(jnp.abs(g_s).max()) > 0
    for k in ("align_w", "w_q", "w_k", "w_v", "spatial_w", "channel_w"):
        assert float(jnp.abs(g_p[k]).max()) > 0, k
    g_t2 = jax.grad(lambda a: A.feature_kd_loss(a, f_s, p))(f_t)
    assert float(jnp.abs(g_t2).max()) == 0.0


def test_jit_matches_eager():
    """The full loss under jit equals the eager value. Catches: Python-side branching on traced values."""
    f_t, f_s, p = _rand(21, B, N, CT), _rand(22, B, N, CS), _params(5)
    eager = A.acam_kd_loss(f_t, f_s, p, div_weight=0.5)[0]
    jitted = jax.jit(lambda a, b, c: A.acam_kd_loss(a, b, c, div_weight=0.5)[0])(f_t, f_s, p)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5)


def test_bad_arguments_raise_naming_the_argument():
    """Shape/type mistakes raise ValueError/TypeError that name the argument."""
    f_t, f_s, p = _rand(23, B, N, CT), _rand(24, B, N, CS), _params(6)
    with pytest.raises(ValueError, match="f_t and f_s must share"):
        A.acam_kd_loss(f_t[:, :4], f_s, p)
    with pytest.raises(ValueError, match="f_s has 8 channels"):
        A.align(f_t, p)
    with pytest.raises(ValueError, match="f_s_aligned must have the teacher's"):
        A.stca_fusion(f_t, f_s, p)
    with pytest.raises(ValueError, match="num_heads=3 must divide"):
        A.stca_fusion(f_t, f_t, p, num_heads=3)
    with pytest.raises(ValueError, match="spatial must be"):
        A.masked_distill_loss(f_t, f_t, jnp.ones((B, M, N + 1)), jnp.ones((B, M, CT)))
    with pytest.raises(ValueError, match="channel must be"):
        A.masked_distill_loss(f_t, f_t, jnp.ones((B, M, N)), jnp.ones((B, M + 1, CT)))
    with pytest.raises(ValueError, match="combine must be"):
        A.masked_distill_loss(f_t, f_t, jnp.ones((B, M, N)), jnp.ones((B, M, CT)), combine="sum")
    with pytest.raises(ValueError, match="masks must be"):
        A.mask_diversity_loss(jnp.ones((M, N)))
    with pytest.raises(ValueError, match="num_masks must be a positive int"):
        A.init_params(jax.random.key(0), CS, CT, num_masks=0)
    with pytest.raises(TypeError, match="params must be a dict"):
        A.align(f_s, [1, 2])
    with pytest.raises(ValueError, match="params is missing"):
        A.stca_fusion(f_t, f_t, {"w_q": p["w_q"]})
    with pytest.raises(TypeError, match="f_t must be an array"):
        A.feature_kd_loss([[1.0]], f_s, p)
