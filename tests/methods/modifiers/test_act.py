"""P27 ACT: the calibration transform, its identities, the head search and the nn adapter."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.core.reference import reference_attention
from jattn.methods.modifiers import act
from jattn.nn.models import DecoderLM


def _causal_probs(seed, B=2, H=3, T=10, sink_at=(0, 4)):
    """Random causal softmax maps with extra logit on the keys ``sink_at`` (planted sinks)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, H, T, T))
    for j in sink_at:
        logits[..., j] += 3.0
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return jnp.asarray(p / p.sum(-1, keepdims=True), jnp.float32)


def _spec_loop(P, alpha, beta):
    """The spec's steps on one causal [T, T] map, written as loops."""
    P = np.asarray(P, np.float64)
    T = P.shape[0]
    c = np.array([P[j:, j].sum() / (T - j) for j in range(T)])
    S = [j for j in range(T) if c[j] > alpha]
    S = set(S[1:])
    out = P.copy()
    for i in range(T):
        m = sum(P[i, j] for j in S)
        rest = sum(P[i, j] for j in range(T) if j not in S)
        for j in range(T):
            out[i, j] = beta * P[i, j] if j in S else P[i, j] + (1 - beta) * m * P[i, j] / rest
    return out


def test_matches_the_spec_written_as_loops():
    """Catches a column denominator of T instead of T - j, dropping the wrong sink, or redistributing uniformly."""
    P = _causal_probs(1)
    got = act.act_calibrate(P, 0.1, 0.4)
    for b, h in ((0, 0), (1, 2)):
        np.testing.assert_allclose(got[b, h], _spec_loop(P[b, h], 0.1, 0.4), atol=1e-6)
    scores = act.sink_scores(P)
    P00 = np.asarray(P[0, 0])
    np.testing.assert_allclose(scores[0, 0], [P00[j:, j].sum() / (10 - j) for j in range(10)], rtol=1e-5)
    sinks = act.sink_set(scores, 0.1)
    assert not bool(sinks[..., 0].any()) and bool(sinks[..., 4].all())  # token 0 kept, token 4 found


def test_beta_one_or_alpha_at_least_one_is_exact_softmax():
    """Catches a transform that edits rows even with nothing to move (e.g. renormalising by a wrong sum)."""
    P = _causal_probs(2)
    np.testing.assert_allclose(act.act_calibrate(P, 0.1, 1.0), P, atol=1e-7)
    np.testing.assert_allclose(act.act_calibrate(P, 1.0, 0.4), P, atol=1e-7)


def test_rows_stay_normalised_and_sink_mass_drops_by_beta():
    """Catches adding the freed mass uniformly (mass on masked keys) or scaling sinks by 1 - beta."""
    P = _causal_probs(3)
    beta = 0.3
    out = act.act_calibrate(P, 0.1, beta)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
    assert float(out.min()) >= 0.0
    assert float(jnp.max(jnp.where(jnp.tril(jnp.ones((10, 10), bool)), 0.0, out))) == 0.0  # causal zeros stay
    sinks = act.sink_set(act.sink_scores(P), 0.1)[..., None, :]
    before = jnp.sum(jnp.where(sinks, P, 0.0), -1)
    after = jnp.sum(jnp.where(sinks, out, 0.0), -1)
    assert float(before.max()) > 0.2
    np.testing.assert_allclose(after, beta * before, atol=1e-6)
    np.testing.assert_allclose(out[..., 0, 0], 1.0)  # P'[0, 0] = 1 as the official code forces


def test_all_false_head_mask_is_identity_and_true_heads_change():
    """Catches applying ACT to every head regardless of head_mask (or to none)."""
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 12, 3, 8)), jnp.float32) for _ in range(3))
    k = k.at[:, 5].multiply(6.0)  # a strong non-initial key
    exact, p_exact = jax.jit(lambda q, k, v: reference_attention(q, k, v, causal=True, return_probs=True))(q, k, v)
    run = jax.jit(lambda q, k, v, heads: act.act_attention(q, k, v, heads, alpha=0.05, return_probs=True))
    off, _ = run(q, k, v, jnp.zeros(3, bool))
    np.testing.assert_allclose(off, exact, atol=1e-6)
    on, probs = run(q, k, v, jnp.array([False, True, False]))
    np.testing.assert_allclose(on[:, :, 0], exact[:, :, 0], atol=1e-6)
    np.testing.assert_allclose(probs[:, 1], act.act_calibrate(p_exact[:, 1], 0.05, 0.4), atol=1e-6)


def test_padded_queries_do_not_count_in_the_column_score():
    """Catches counting padding rows (they would dilute or inflate c_j in a padded BERT batch)."""
    P = jnp.full((1, 1, 4, 4), 0.25)
    P = P.at[0, 0, 3].set(jnp.array([0.0, 0.0, 0.0, 1.0]))  # a padding query looking only at itself
    valid = jnp.array([True, True, True, False])
    visible = valid[:, None] & valid[None, :]
    scores = act.sink_scores(P, causal=False, visible=visible)
    np.testing.assert_allclose(scores[0, 0], [0.25, 0.25, 0.25, 0.0], atol=1e-7)
    np.testing.assert_allclose(act.sink_scores(P, causal=False)[0, 0, 3], 1.75 / 4, atol=1e-7)


def test_search_keeps_exactly_the_heads_that_help():
    """Catches keeping heads that hurt, testing several heads at once, or a flipped minimize sign."""
    effect = np.array([[0.1, -0.2, 0.0], [-0.05, 0.3, -0.01]])  # loss change per head when calibrated

    def loss(masks):
        return 1.0 + float((effect * masks).sum())
    result = act.search_act_heads(loss, 2, 3)
    np.testing.assert_array_equal(result["kept"], effect < 0)
    assert result["baseline"] == 1.0 and result["combined"] == pytest.approx(1.0 - 0.26)
    accuracy = act.search_act_heads(lambda m: -loss(m), [1], [0, 1, 2], shape=(2, 3), minimize=False, tol=0.02)
    np.testing.assert_array_equal(accuracy["kept"], [[False] * 3, [True, False, False]])
    assert np.isnan(accuracy["scores"][0]).all()


def test_runs_inside_decoder_lm_per_layer_and_switches_in_place():
    """Catches the adapter ignoring head_mask (all-False must equal softmax) or set_layer_methods not switching."""
    act.register_act_method()
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 64, size=(2, 12)), jnp.int32)
    fwd = nnx.jit(lambda m, x: m(x))
    base = fwd(DecoderLM(64, 16, 2, 2, rngs=nnx.Rngs(0), method_config={"impl": "reference"}), tokens)
    off = DecoderLM(64, 16, 2, 2, rngs=nnx.Rngs(0),
                    layer_methods=[("act", {"head_mask": (False, False)}), ("softmax", {"impl": "reference"})])
    np.testing.assert_allclose(fwd(off, tokens), base, atol=1e-5)
    act.set_layer_methods(off.blocks, [("act", {"head_mask": (True, True), "alpha": 0.0}),
                                       ("softmax", {"impl": "reference"})])
    assert float(jnp.max(jnp.abs(fwd(off, tokens) - base))) > 1e-4


def test_bad_arguments_name_themselves():
    """Catches silent acceptance of bad beta, head masks and configs."""
    P = _causal_probs(6)
    with pytest.raises(ValueError, match="beta"):
        act.act_calibrate(P, 0.1, 1.5)
    with pytest.raises(TypeError, match="alpha"):
        act.act_calibrate(P, "0.1", 0.4)
    with pytest.raises(ValueError, match="causal ACT needs square"):
        act.act_calibrate(P[..., :5], 0.1, 0.4)
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match="head_mask"):
        act.act_attention(q, q, q, jnp.ones(3, bool))
    with pytest.raises(TypeError, match="eval_fn"):
        act.search_act_heads(None, 1, 1)
    act.register_act_method()
    with pytest.raises(TypeError, match="head_mask"):
        DecoderLM(64, 16, 1, 2, rngs=nnx.Rngs(0), method="act", method_config={"head_mask": (1, 0)})
    with pytest.raises(ValueError, match="one \\(method, config\\) per block"):
        act.set_layer_methods(DecoderLM(64, 16, 1, 2, rngs=nnx.Rngs(0)).blocks, [])


def test_benchmark_harness_on_a_tiny_untrained_lm():
    """The machinery of benchmarks/modifiers.py. Catches with_methods not copying the weights (all-False ACT
    must equal the model), a retrieval score that misranks a perfect pairing, or the synthetic table scaling at
    N = T."""
    from benchmarks import modifiers as bm
    act.register_act_method()
    model = DecoderLM(256, bm.LM["dim"], 2, bm.LM["num_heads"], rngs=nnx.Rngs(1))
    copy = bm.with_methods(model, bm.act_layer_methods(np.zeros((2, bm.LM["num_heads"]), bool)))
    np.testing.assert_allclose(bm.lm_eval(copy, 132, batches=1, batch_size=1),
                               bm.lm_eval(model, 132, batches=1, batch_size=1), rtol=1e-5)
    assert bm.retrieval(np.eye(3), np.eye(3)) == (1.0, 1.0)
    rows, _ = bm.synthetic_entropy(ns=(16, 64), sharpness=(4.0,), train_keys=16, dim=8, queries=4)
    assert rows[0][2] == pytest.approx(rows[0][3], abs=1e-5) and rows[1][3] < rows[1][2]
