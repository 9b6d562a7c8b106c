"""P41 Focus-DETR: token scoring (MaskPredictor, top-down fusion) and the top-k encoder layer.

rho = 1, cascade all 1 and k = N give the dense encoder layer (OESM over all tokens = the plain residual MHA
layer + norm, against a numpy MHA); the gather / scatter round trip; unselected tokens bit-identical; the
selected tokens equal the per-token update on an explicitly gathered set; the MaskPredictor and the top-down
fusion against numpy transcriptions; keep counts; FLOPs (XLA cost analysis and the analytic counter) scale
with the kept tokens; jit traces once; argument errors. Mutations caught are named in the docstrings.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.dynamic.focus_detr import (CASCADE, FocusEncoderLayer, FocusScorer, MaskPredictor, OESMAttention,
                                              cascade_topk, focus_layer_flops, focus_token_count, mc_scores,
                                              oesm_self_attention, resize_bilinear_align_corners, scatter_back,
                                              top_down_scores, topk_gather)
from tests.conftest import assert_traced_once

SHAPES = ((4, 4), (2, 3), (1, 2))
N = sum(h * w for h, w in SHAPES)  # 24
D, HEADS = 8, 2


def rand(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def inputs(seed, B=2):
    rng = np.random.default_rng(seed)
    x, pos = rand(rng, B, N, D), rand(rng, B, N, D)
    ref = jnp.asarray(rng.uniform(0, 1, (B, N, len(SHAPES), 2)), jnp.float32)
    fg = rand(rng, B, N)
    return x, pos, ref, fg


def fast_init(ctor, seed):
    """Build the module abstractly and fill every parameter from numpy: kernels ~ N(0, 1/fan_in), LayerNorm
    scales ~ 1 + N(0, .1), biases and scalars ~ N(0, .1). Random (not zero / one) values everywhere, so a test
    sees every parameter, and no eager jax.random op is compiled one by one (slow on a busy CPU)."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(nnx.eval_shape(ctor))

    def fill(path, leaf):
        name = str(path[-1])
        if len(leaf.shape) == 2:
            return jnp.asarray(rng.standard_normal(leaf.shape) / math.sqrt(leaf.shape[0]), leaf.dtype)
        base = 1.0 if "scale" in name else 0.0
        return jnp.asarray(base + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def make_layer(seed=0, oesm_topk=300, ffn=16, classes=5):
    return fast_init(lambda: FocusEncoderLayer(D, HEADS, len(SHAPES), 2, ffn, classes, oesm_topk=oesm_topk,
                                               rngs=nnx.Rngs(seed)), seed)


def numpy_mha_layer(att: OESMAttention, x, pos):
    """x + out_proj(softmax((x+pos)Wq ((x+pos)Wk)^T / sqrt(dh)) x Wv) per head, float64."""
    p = lambda lin: (np.asarray(lin.kernel.value, np.float64), np.asarray(lin.bias.value, np.float64))
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = p(att.q_proj), p(att.k_proj), p(att.v_proj), p(att.out_proj)
    x, pos = np.asarray(x, np.float64), np.asarray(pos, np.float64)
    B, n, d = x.shape
    H = att.num_heads
    q = ((x + pos) @ wq + bq).reshape(B, n, H, -1)
    k = ((x + pos) @ wk + bk).reshape(B, n, H, -1)
    v = (x @ wv + bv).reshape(B, n, H, -1)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // H)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(B, n, d)
    return x + o @ wo + bo


def test_keep_counts():
    """K = floor(rho N_valid) + 1 and the cascade int(c K). Catches ceil, a missing +1, cascade on N not K."""
    np.testing.assert_array_equal(np.asarray(focus_token_count(jnp.asarray([100, 7, 1]), 0.5)), [51, 4, 1])
    assert cascade_topk(100) == (51, 40, 30, 30, 20, 10)
    assert cascade_topk(N, 1.0, (1.0,) * 6) == (N,) * 6
    assert CASCADE == (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)


def test_gather_scatter_round_trip():
    """topk_gather picks the k highest scores (descending); scatter_back(full, gathered) is the identity; writing
    new rows changes exactly those rows; valid=False rows are not written. Catches argmin / ascending order, a
    scatter along the wrong axis, or valid ignored."""
    rng = np.random.default_rng(0)
    x, scores = rand(rng, 2, 10, 3), rand(rng, 2, 10)
    sel, idx = jax.jit(topk_gather, static_argnums=2)(x, scores, 4)
    want = np.argsort(-np.asarray(scores), axis=1)[:, :4]
    np.testing.assert_array_equal(np.asarray(idx), want)
    np.testing.assert_array_equal(np.asarray(sel), np.take_along_axis(np.asarray(x), want[..., None], 1))
    scat = jax.jit(scatter_back)
    np.testing.assert_array_equal(np.asarray(scat(x, sel, idx)), np.asarray(x))
    new = rand(rng, 2, 4, 3)
    out = np.asarray(scat(x, new, idx))
    np.testing.assert_array_equal(np.take_along_axis(out, want[..., None], 1), np.asarray(new))
    keep = np.ones((2, 10), bool)
    np.put_along_axis(keep, want, False, 1)
    np.testing.assert_array_equal(out[keep], np.asarray(x)[keep])
    valid = jnp.asarray([[True, True, False, False], [True, False, False, False]])
    out_v = np.asarray(scat(x, new, idx, valid))
    np.testing.assert_array_equal(out_v[0, want[0, 2:]], np.asarray(x)[0, want[0, 2:]])
    np.testing.assert_array_equal(out_v[1, want[1, 0]], np.asarray(new)[1, 0])


def test_dense_limit_is_the_dense_encoder_layer():
    """rho = 1, cascade all 1 (k = N), OESM k >= N: the layer equals the dense composition norm2(MHA layer) ->
    norm1(deform + residual) -> norm3(FFN + residual) over all tokens, and OESM over all tokens equals the plain
    residual MHA layer (numpy). Catches a dropped residual, dropped pos in q/k, pos added to v, norm skipped,
    the deformable value taken from the updated tokens instead of the map, or the gather order leaking."""
    x, pos, ref, fg = inputs(1)
    k = cascade_topk(N, 1.0, (1.0,) * 6)[0]
    m = make_layer(1)
    graphdef, st = nnx.split(m)

    def both(st, x, pos, ref, fg):  # one compiled program for all four results
        mm = nnx.merge(graphdef, st)
        got = mm(x, pos, ref, SHAPES, fg, k)
        mha = mm.oesm.mha(x, pos)
        y = mm.oesm.norm2(mha)
        oesm_all = mm.oesm(x, pos, fg, N)
        y2 = mm.norm1(mm.deform(y, x, ref, SHAPES, query_pos=pos))
        return got, mm.norm3(y2 + mm.ffn2(jax.nn.relu(mm.ffn1(y2)))), mha, y, oesm_all
    got, want, mha, normed, oesm_all = jax.jit(both)(st, x, pos, ref, fg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(mha), numpy_mha_layer(m.oesm, x, pos), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(oesm_all), np.asarray(normed), rtol=1e-5, atol=2e-5)


def test_unselected_tokens_bit_identical_and_selected_match_explicit_gather():
    """k < N: the N - k lowest-score tokens come back bit-identical, the k selected equal ``update_tokens`` on
    the numpy-gathered tokens / pos / ref / fg. Catches updating all tokens, selecting by lowest score, gathering
    pos or reference points with the wrong indices, or the value map restricted to selected tokens."""
    x, pos, ref, fg = inputs(2)
    k = 9
    m = make_layer(2, oesm_topk=5)
    idx = np.argsort(-np.asarray(fg), 1)[:, :k]
    unsel = np.ones((2, N), bool)
    np.put_along_axis(unsel, idx, False, 1)
    g = lambda a: jnp.asarray(np.take_along_axis(np.asarray(a), idx.reshape(idx.shape + (1,) * (a.ndim - 2)), 1))
    graphdef, st = nnx.split(m)
    both = jax.jit(lambda st, x, pos, ref, fg, q, qp, r, f: (
        nnx.merge(graphdef, st)(x, pos, ref, SHAPES, fg, k),
        nnx.merge(graphdef, st).update_tokens(q, qp, r, f, x, SHAPES, 5)))
    got, upd = both(st, x, pos, ref, fg, g(x), g(pos), g(ref), g(fg))
    got = np.asarray(got)
    np.testing.assert_array_equal(got[unsel], np.asarray(x)[unsel])
    np.testing.assert_allclose(np.take_along_axis(got, idx[..., None], 1), np.asarray(upd), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.take_along_axis(got, idx[..., None], 1), g(x))


def test_oesm_subset_attends_among_itself_only():
    """OESM with k < n: the top-k tokens by score equal norm2(MHA layer) over just those tokens (numpy), the
    others are unchanged bit for bit. Catches attending to all tokens, selecting by lowest score, no norm."""
    rng = np.random.default_rng(3)
    att = fast_init(lambda: OESMAttention(D, HEADS, rngs=nnx.Rngs(3)), 3)
    x, pos, s = rand(rng, 2, 11, D), rand(rng, 2, 11, D), rand(rng, 2, 11)
    graphdef, st = nnx.split(att)
    got = np.asarray(jax.jit(lambda st, x, p, s: nnx.merge(graphdef, st)(x, p, s, 4))(st, x, pos, s))
    idx = np.argsort(-np.asarray(s), 1)[:, :4]
    g = lambda a: np.take_along_axis(np.asarray(a), idx[..., None], 1)
    y = numpy_mha_layer(att, g(x), g(pos))
    mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    want = (y - mu) / np.sqrt(var + 1e-5) * np.asarray(att.norm2.scale.value) + np.asarray(att.norm2.bias.value)
    np.testing.assert_allclose(g(got), want, rtol=1e-4, atol=1e-4)
    rest = np.ones((2, 11), bool)
    np.put_along_axis(rest, idx, False, 1)
    np.testing.assert_array_equal(got[rest], np.asarray(x)[rest])


def numpy_mask_predictor(mp: MaskPredictor, x):
    x = np.asarray(x, np.float64)
    from math import erf
    gelu = np.vectorize(lambda t: 0.5 * t * (1 + erf(t / math.sqrt(2))))
    p = lambda lin: (np.asarray(lin.kernel.value, np.float64), np.asarray(lin.bias.value, np.float64))
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    z = (x - mu) / np.sqrt(var + 1e-5) * np.asarray(mp.norm.scale.value) + np.asarray(mp.norm.bias.value)
    w, b = p(mp.fc1)
    z = gelu(z @ w + b)
    h2 = z.shape[-1] // 2
    z = np.concatenate([z[..., :h2], np.broadcast_to(z[..., h2:].mean(1, keepdims=True), z[..., h2:].shape)], -1)
    for lin in (mp.fc2, mp.fc3):
        w, b = p(lin)
        z = gelu(z @ w + b)
    w, b = p(mp.fc4)
    return (z @ w + b)[..., 0]


def numpy_resize_align_corners(x, ho, wo):
    x = np.asarray(x, np.float64)
    B, hi, wi = x.shape
    out = np.zeros((B, ho, wo))
    for i in range(ho):
        for j in range(wo):
            y = i * (hi - 1) / (ho - 1) if ho > 1 else 0.0
            xx = j * (wi - 1) / (wo - 1) if wo > 1 else 0.0
            y0, x0 = min(int(math.floor(y)), hi - 1), min(int(math.floor(xx)), wi - 1)
            y1, x1 = min(y0 + 1, hi - 1), min(x0 + 1, wi - 1)
            fy, fx = y - y0, xx - x0
            out[:, i, j] = ((1 - fy) * ((1 - fx) * x[:, y0, x0] + fx * x[:, y0, x1])
                            + fy * ((1 - fx) * x[:, y1, x0] + fx * x[:, y1, x1]))
    return out


def test_mask_predictor_and_top_down_fusion_match_numpy():
    """MaskPredictor = LN-Linear-GELU, global half replaced by its level mean, MLP to 1; top-down: coarsest first,
    finer feat += feat * upsample_align_corners(score) * alpha[i - 1]. Catches no global mean, fusion bottom-up,
    alpha index reversed, align_corners=False upsampling, fused score not fed forward, tanh-GELU."""
    rng = np.random.default_rng(4)
    scorer = fast_init(lambda: FocusScorer(D, len(SHAPES), rngs=nnx.Rngs(4)), 4)
    # The fusion scales each token by (1 + alpha up(score)) and the MaskPredictor starts with a LayerNorm, which
    # is invariant to a positive per-token scale: only factors < 0 (a sign flip) change a score. Large alphas
    # make some factors negative so the test sees the fusion (and which alpha goes to which level).
    alpha = [-9.0, 6.0]
    scorer.alpha.value = jnp.asarray(alpha, jnp.float32)
    feats = rand(rng, 2, N, D)
    graphdef, st = nnx.split(scorer)
    run = jax.jit(lambda st, f: nnx.merge(graphdef, st)(f, SHAPES))
    got = np.asarray(run(st, feats))
    f = np.asarray(feats, np.float64)
    starts = [0, 16, 22]
    want = [None] * 3
    prev = None
    for i, lvl in enumerate((2, 1, 0)):
        h, w = SHAPES[lvl]
        fl = f[:, starts[lvl]:starts[lvl] + h * w]
        if i:
            up = numpy_resize_align_corners(prev, h, w).reshape(2, h * w, 1)
            fl = fl + fl * up * alpha[i - 1]
        s = numpy_mask_predictor(scorer.predictor, fl)
        prev = s.reshape(2, h, w)
        want[lvl] = s
    np.testing.assert_allclose(got, np.concatenate(want, 1), rtol=1e-5, atol=1e-5)
    scorer.alpha.value = jnp.asarray([0.01, -0.01], jnp.float32)  # every factor > 0: same as no fusion
    small = np.asarray(run(nnx.split(scorer)[1], feats))
    scorer.alpha.value = jnp.zeros(2, jnp.float32)
    np.testing.assert_allclose(small, np.asarray(run(nnx.split(scorer)[1], feats)), rtol=1e-5, atol=1e-6)
    assert np.abs(got - small).max() > 1e-4  # the sign flips did change scores
    x = rand(rng, 1, 3, 2)
    np.testing.assert_allclose(np.asarray(jax.jit(resize_bilinear_align_corners, static_argnums=1)(x, (5, 4))),
                               numpy_resize_align_corners(x, 5, 4), rtol=1e-5, atol=1e-6)


def test_padding_gets_min_score_and_mc_modes():
    """Padding tokens get the global min score (ranked last); mc = sigmoid(max class) * sigmoid(fg) ("prob") or
    the raw product ("logits"). Catches padding left unmasked, mean instead of max over classes."""
    rng = np.random.default_rng(5)
    mp = fast_init(lambda: MaskPredictor(D, rngs=nnx.Rngs(5)), 5)
    feats = rand(rng, 1, N, D)
    pad = jnp.asarray(np.arange(N)[None] >= 20)
    logits, fg = rand(rng, 1, 4, 3), rand(rng, 1, 4)
    s, prob, raw = jax.jit(lambda f, a, p, lg, fg: (top_down_scores(f, SHAPES, mp, a, p), mc_scores(lg, fg),
                                                   mc_scores(lg, fg, score_mode="logits")))(
        feats, jnp.ones(2), pad, logits, fg)
    s = np.asarray(s)
    assert np.all(s[0, 20:] == s.min()) and np.all(s[0, :20] >= s.min())
    mx = np.asarray(logits).max(-1)
    sig = lambda t: 1 / (1 + np.exp(-t))
    np.testing.assert_allclose(np.asarray(prob), sig(mx) * sig(np.asarray(fg)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(raw), mx * np.asarray(fg), rtol=1e-5)


def test_flops_scale_with_kept_tokens():
    """XLA's cost analysis of the lowered layer and the analytic counter grow with k and the k-dependent part is
    about linear (OESM fixed at 4 tokens). Catches computing every token and masking afterwards (flat FLOPs)."""
    x, pos, ref, fg = inputs(6, B=1)
    m = make_layer(6, oesm_topk=4)
    graphdef, st = nnx.split(m)
    flops = {}
    for k in (6, 12, 24):
        f = jax.jit(lambda st, x, pos, ref, fg, k=k: nnx.merge(graphdef, st)(x, pos, ref, SHAPES, fg, k))
        cost = f.lower(st, x, pos, ref, fg).cost_analysis()  # HLO-level count, no compile
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops[k] = cost["flops"]
    assert flops[6] < flops[12] < flops[24]
    ratio = (flops[24] - flops[12]) / (flops[12] - flops[6])
    assert 1.4 < ratio < 2.6, flops  # linear in k: 12 extra tokens cost about twice 6 extra
    a = {k: focus_layer_flops(N, k, 4, D, HEADS, len(SHAPES), 2, 16, 5)["total"] for k in (6, 12, 24)}
    assert (a[24] - a[12]) == 2 * (a[12] - a[6])
    full = focus_layer_flops(16_000, 16_000, 300)["total"]
    focus = sum(focus_layer_flops(16_000, kk, min(300, kk))["total"] for kk in cascade_topk(16_000)) / 6
    assert focus < 0.6 * full


def test_jit_traces_once_and_valid_count():
    """Static k: fresh values reuse the program; valid_count limits which ranks are written back. Catches a
    value-dependent shape and valid_count ignored."""
    m = make_layer(7, oesm_topk=4)
    graphdef, st = nnx.split(m)
    a, b = inputs(7), inputs(8)
    vc = jnp.asarray([3, 8], jnp.int32)

    def both(st, x, pos, ref, fg):
        mm = nnx.merge(graphdef, st)
        return mm(x, pos, ref, SHAPES, fg, 8), mm(x, pos, ref, SHAPES, fg, 8, valid_count=vc)
    res = assert_traced_once(both, (st,) + a, (st,) + b)
    outs = [r[0] for r in res]
    assert not np.allclose(np.asarray(outs[0]), np.asarray(outs[1]))
    got = np.asarray(res[0][1])
    idx = np.argsort(-np.asarray(a[3]), 1)[:, :8]
    np.testing.assert_array_equal(got[0, idx[0, 3:]], np.asarray(a[0])[0, idx[0, 3:]])
    np.testing.assert_array_equal(got[0, idx[0, :3]], np.asarray(outs[0])[0, idx[0, :3]])
    np.testing.assert_array_equal(got[1], np.asarray(outs[0])[1])


def test_bad_arguments_name_the_argument():
    """Each wrong input raises naming the argument."""
    x, pos, ref, fg = inputs(9)
    with pytest.raises(ValueError, match="k"):
        topk_gather(x, fg, N + 1)
    with pytest.raises(TypeError, match="k"):
        topk_gather(x, fg, 2.0)
    with pytest.raises(ValueError, match="x"):
        topk_gather(x[:, 1:], fg, 2)
    with pytest.raises(ValueError, match="selected"):
        scatter_back(x, x[:, :3, :2], jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="rho"):
        cascade_topk(10, 1.5)
    with pytest.raises(ValueError, match="alpha"):
        top_down_scores(x, SHAPES, lambda f: f[..., 0], jnp.ones(3))
    with pytest.raises(ValueError, match="score_mode"):
        mc_scores(x, fg, score_mode="max")
    with pytest.raises(ValueError, match="pos"):
        oesm_self_attention(x, pos[:, 1:], fg, 3, mha=lambda a, b: a, norm=lambda a: a)
    m = make_layer(9)
    with pytest.raises(ValueError, match="fg_scores"):
        m(x, pos, ref, SHAPES, fg[:, 1:], 4)
    with pytest.raises(ValueError, match="reference_points"):
        m(x, pos, ref[:, 1:], SHAPES, fg, 4)
