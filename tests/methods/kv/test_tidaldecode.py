"""P71 TidalDecode and the shared gathered decode attention: exactness against dense decode attention with
one-hot masks, the layer schedule, persistence of the selection, recall, and a whole DecoderLM decode step.

Mutations caught (each tried on jattn/methods/kv/tidaldecode.py or gather.py, then reverted):
* gather pairing head lists with kv heads in interleaved order (``h % Hkv``) -> test_gathered_* (6:2)
* chunk causality ``idx < p_t`` instead of ``<=``                        -> test_gathered_* (Tq = 3)
* ``jax.nn.softmax`` instead of the empty-row-safe softmax (NaN rows)    -> test_empty_rows_*
* top-k over ``j <= lengths`` (one past the end)                         -> test_select_topk_*
* selection layer storing the top-k of ``-scores``                      -> test_selection_layer_*
* sparse layers re-selecting (state not persisted)                      -> test_sparse_layer_*, test_indices_*
* the correction layer treated as sparse                                 -> test_indices_persist_*
* recall divided by K instead of ``min(k, n)``                           -> test_recall_*
* driver rotating q at position ``index + 1``                            -> test_lm_driver_*
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.core.reference import reference_attention
from jattn.methods.kv.gather import gathered_decode_attention
from jattn.methods.kv.tidaldecode import (TidalState, layer_kind, select_topk_tokens, selection_recall,
                                          sparse_decode_attention, tidal_decode_step, tidal_lm_decode_step)
from jattn.nn import DecoderLM
from tests.conftest import assert_close, build_module


def draw(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def np_one_hot_dense(q, k, v, lengths, mask):
    """Dense fp32 decode attention of ``q [B, Tq, H, D]`` over head-major caches, restricted to
    ``mask [B, H, S]`` and the decode rule (new token ``t`` sees ``kv <= lengths - Tq + t``)."""
    B, Tq, H, D = q.shape
    S = k.shape[2]
    causal = np.arange(S)[None, None, :] <= (lengths[:, None, None] - Tq + np.arange(Tq)[None, :, None])
    visible = mask[:, :, None, :] & causal[:, None]                             # [B, H, Tq, S]
    return _masked_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(visible))


@jax.jit
def _masked_reference(q, k_cache, v_cache, visible):
    return reference_attention(q, jnp.swapaxes(k_cache, 1, 2), jnp.swapaxes(v_cache, 1, 2), mask=visible)


def random_selection(rng, B, H, S, K, lengths, pad=0.25):
    """Unique positions below each length, about ``pad`` of the entries invalid."""
    idx = np.stack([np.stack([rng.permutation(int(n))[:K] if n >= K else
                              np.concatenate([rng.permutation(int(n)), np.full(K - n, S - 1)])
                              for _ in range(H)]) for n in lengths]).astype(np.int32)
    valid = (rng.random((B, H, K)) > pad) & (np.arange(K) < lengths[:, None, None])
    return idx, valid


def np_mask(idx, valid, S):
    B, H, K = idx.shape
    mask = np.zeros((B, H, S), bool)
    for b in range(B):
        for h in range(H):
            mask[b, h, idx[b, h][valid[b, h]]] = True
    return mask


# ------------------------------------------------------------------------------- gathered attention

@pytest.mark.parametrize("H, Hkv, Tq", [(1, 1, 3), (4, 1, 1), (6, 2, 3)])
def test_gathered_attention_equals_dense_with_the_one_hot_mask(H, Hkv, Tq):
    rng = np.random.default_rng(10 * H + Hkv + Tq)
    B, S, D, K = 2, 19, 8, 7
    q, k, v = draw(rng, B, Tq, H, D), draw(rng, B, Hkv, S, D), draw(rng, B, Hkv, S, D)
    lengths = np.array([17, 9])
    idx, valid = random_selection(rng, B, H, S, K, lengths)
    weights = draw(rng, B, Tq, H, D)

    def loss(fn):
        def f(q, k, v):
            out = fn(q, k, v)
            return jnp.sum(out * weights), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    got = loss(lambda q, k, v: gathered_decode_attention(q, k, v, jnp.asarray(idx), jnp.asarray(valid),
                                                         jnp.asarray(lengths)))
    want = loss(lambda q, k, v: np_one_hot_dense(q, k, v, lengths, np_mask(idx, valid, S)))
    (_, out), grads = got(*map(jnp.asarray, (q, k, v)))
    (_, ref), ref_grads = want(*map(jnp.asarray, (q, k, v)))
    assert_close(out, ref, what="out")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close(g, r, factor=2, what=f"d{name}")


def test_empty_rows_are_zero_not_nan():
    rng = np.random.default_rng(3)
    q, k, v = draw(rng, 1, 2, 4), draw(rng, 1, 1, 9, 4), draw(rng, 1, 1, 9, 4)
    idx = jnp.asarray([[[0, 3, 5], [1, 2, 4]]], jnp.int32)
    valid = jnp.asarray([[[False, False, False], [True, False, True]]])

    def f(q, k, v):
        out = gathered_decode_attention(q, k, v, idx, valid, jnp.asarray([9]))
        return jnp.sum(out), out
    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(*map(jnp.asarray, (q, k, v)))
    np.testing.assert_array_equal(out[0, 0], 0.0)
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in grads)


# ------------------------------------------------------------------------------------------ selection

def np_topk(scores, n, k, include_newest=False):
    """The reference's ``torch.topk(attn_weights, min(k, n))`` of one head (or the efficient rule)."""
    if include_newest:
        older = np.argsort(-scores[: n - 1], kind="stable")[: min(k, n) - 1]
        return set(older.tolist()) | {n - 1}
    return set(np.argsort(-scores[:n], kind="stable")[: min(k, n)].tolist())


@pytest.mark.parametrize("include_newest", [False, True])
def test_select_topk_tokens_matches_numpy(include_newest):
    rng = np.random.default_rng(4)
    B, H, S, k = 3, 2, 13, 5
    scores = draw(rng, B, H, S) + 1e3 * (np.arange(S) >= 11)          # huge scores past the length: ignored
    lengths = np.array([11, 4, 5])
    idx, valid = jax.jit(functools.partial(select_topk_tokens, k=k, include_newest=include_newest))(
        jnp.asarray(scores), jnp.asarray(lengths))
    idx, valid = np.asarray(idx), np.asarray(valid)
    assert idx.shape == (B, H, k)
    for b, n in enumerate(lengths):
        for h in range(H):
            assert valid[b, h].sum() == min(k, n)
            assert set(idx[b, h][valid[b, h]].tolist()) == np_topk(scores[b, h], n, k, include_newest)


def test_layer_kinds():
    kinds = [layer_kind(i, sparse_layer_start=2, correction_layer=5) for i in range(8)]
    assert kinds == ["full", "full", "select", "sparse", "sparse", "select", "sparse", "sparse"]
    assert layer_kind(9, correction_layer=None) == "sparse"


def _layer_inputs(seed, B=2, H=6, Hkv=2, S=21, D=8):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(draw(rng, B, H, D)), jnp.asarray(draw(rng, B, Hkv, S, D)),
            jnp.asarray(draw(rng, B, Hkv, S, D)))


LENGTHS = np.array([21, 10])
SCHEDULE = dict(sparse_layer_start=2, correction_layer=4)


@functools.partial(jax.jit, static_argnames=("layer", "budget"))
def _step(layer, q, k, v, lengths, state, budget):
    return tidal_decode_step(layer, q, k, v, lengths, state, budget=budget, **SCHEDULE)


def test_selection_layer_output_is_full_attention_and_stores_its_topk():
    q, k, v = _layer_inputs(5)
    state = TidalState.create(2, 6, 4, 21)
    out, state = _step(2, q, k, v, jnp.asarray(LENGTHS), state, 4)
    full_mask = np.ones((2, 6, 21), bool)
    assert_close(out, np_one_hot_dense(np.asarray(q)[:, None], k, v, LENGTHS, full_mask)[:, 0])
    scores = np.einsum("bhd,bhsd->bhs", np.asarray(q), np.repeat(np.asarray(k), 3, axis=1)) / np.sqrt(8)
    for b, n in enumerate(LENGTHS):
        for h in range(6):
            assert set(np.asarray(state.selected_idx)[b, h].tolist()) == np_topk(scores[b, h], n, 4)


def test_sparse_layer_equals_dense_with_the_one_hot_mask_of_the_state():
    rng = np.random.default_rng(6)
    q, k, v = _layer_inputs(6)
    idx, valid = random_selection(rng, 2, 6, 21, 4, LENGTHS, pad=0.0)
    state = TidalState(jnp.asarray(idx), jnp.asarray(valid))
    out, after = _step(3, q, k, v, jnp.asarray(LENGTHS), state, 4)
    assert_close(out, np_one_hot_dense(np.asarray(q)[:, None], k, v, LENGTHS, np_mask(idx, valid, 21))[:, 0])
    np.testing.assert_array_equal(after.selected_idx, idx)
    direct = sparse_decode_attention(q, k, v, jnp.asarray(idx), jnp.asarray(valid), jnp.asarray(LENGTHS))
    assert_close(direct, out)


NUM_LAYERS = 7
LAYER_INPUTS = [_layer_inputs(7 + layer) for layer in range(NUM_LAYERS)]


@functools.partial(jax.jit, static_argnames=("budget",))
def _all_layers(inputs, lengths, budget):
    state = TidalState.create(2, 6, budget, 21)
    outs, states = [], []
    for layer, (q, k, v) in enumerate(inputs):
        out, state = tidal_decode_step(layer, q, k, v, lengths, state, budget=budget, **SCHEDULE)
        outs.append(out), states.append(state)
    return outs, states


def _run_layers(budget):
    """Every layer gets its own fresh q and caches; returns the per-layer outputs, states and inputs."""
    outs, states = _all_layers(LAYER_INPUTS, jnp.asarray(LENGTHS), budget)
    return outs, states, LAYER_INPUTS


def test_budget_at_least_the_context_is_full_attention_in_every_layer():
    outs, _, inputs = _run_layers(budget=21)
    full_mask = np.ones((2, 6, 21), bool)
    for layer, (out, (q, k, v)) in enumerate(zip(outs, inputs)):
        assert_close(out, np_one_hot_dense(np.asarray(q)[:, None], k, v, LENGTHS, full_mask)[:, 0],
                     what=f"layer {layer}")


def test_indices_persist_unchanged_between_selection_layers():
    _, states, inputs = _run_layers(budget=4)
    idx = [np.asarray(s.selected_idx) for s in states]
    np.testing.assert_array_equal(idx[2], idx[3])           # layer 3 reuses layer 2's selection
    np.testing.assert_array_equal(idx[4], idx[5])           # the correction layer re-selects, 5 and 6 reuse it
    np.testing.assert_array_equal(idx[4], idx[6])
    assert not np.array_equal(idx[2], idx[4])
    q, k, _ = inputs[4]
    scores = np.einsum("bhd,bhsd->bhs", np.asarray(q), np.repeat(np.asarray(k), 3, axis=1)) / np.sqrt(8)
    for b, n in enumerate(LENGTHS):
        for h in range(6):
            assert set(idx[4][b, h].tolist()) == np_topk(scores[b, h], n, 4)


def np_recall(sel_idx, sel_valid, scores, lengths, k):
    B, H, _ = sel_idx.shape
    out = np.zeros((B, H))
    for b, n in enumerate(lengths):
        for h in range(H):
            true = np_topk(scores[b, h], n, k)
            out[b, h] = len(true & set(sel_idx[b, h][sel_valid[b, h]].tolist())) / len(true)
    return out


def test_recall_matches_numpy():
    rng = np.random.default_rng(9)
    B, H, S, K = 2, 3, 15, 6
    lengths = np.array([15, 4])
    scores = draw(rng, B, H, S)
    sel_idx, sel_valid = random_selection(rng, B, H, S, K, lengths, pad=0.3)
    got = jax.jit(functools.partial(selection_recall, k=K))(jnp.asarray(sel_idx), jnp.asarray(sel_valid),
                                                             jnp.asarray(scores), jnp.asarray(lengths))
    want = np_recall(sel_idx, sel_valid, scores, lengths, K)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert 0 < want.mean() < 1


def test_bad_arguments_are_named():
    q, k, v = _layer_inputs(0)
    state = TidalState.create(2, 6, 4, 21)
    lengths = jnp.asarray(LENGTHS)
    with pytest.raises(ValueError, match="correction_layer"):
        tidal_decode_step(2, q, k, v, lengths, state, budget=4, sparse_layer_start=3, correction_layer=3)
    with pytest.raises(ValueError, match="one token"):
        tidal_decode_step(2, q[:, None], k, v, lengths, state, budget=4)
    with pytest.raises(ValueError, match="state.selected_idx"):
        tidal_decode_step(3, q, k, v, lengths, state, budget=5)
    with pytest.raises(TypeError, match="state"):
        tidal_decode_step(3, q, k, v, lengths, None, budget=4)
    with pytest.raises(ValueError, match="budget"):
        select_topk_tokens(jnp.zeros((1, 1, 5)), jnp.asarray([5]), k=1, include_newest=True)
    with pytest.raises(TypeError, match="lengths"):
        select_topk_tokens(jnp.zeros((1, 1, 5)), jnp.asarray([5.0]), k=2)


# ------------------------------------------------------------------------------------ DecoderLM driver

def _model_steps():
    """A prefilled DecoderLM's state and jitted steps: full (the model's own), and TidalDecode's."""
    model = build_module(lambda: DecoderLM(40, 16, 2, 4, num_kv_heads=2, mlp_dim=16, rngs=nnx.Rngs(0)), seed=1)
    model.init_cache(2, 16)
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, prompt):
        model = nnx.merge(graphdef, state)
        model(prompt, decode=True)
        return nnx.state(model)

    @jax.jit
    def full_step(state, tokens):
        return nnx.merge(graphdef, state)(tokens, decode=True)

    @functools.partial(jax.jit, static_argnames=("budget",))
    def tidal_step(state, tokens, budget):
        model = nnx.merge(graphdef, state)
        logits, selection, stats = tidal_lm_decode_step(model, tokens, budget=budget, sparse_layer_start=0,
                                                        correction_layer=None, return_stats=True)
        return logits, selection, stats, nnx.state(model)

    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 11)), jnp.int32)
    return graphdef, prefill(state, prompt), full_step, tidal_step


def test_lm_driver_with_a_full_budget_is_the_models_decode_step():
    graphdef, state, full_step, tidal_step = _model_steps()
    tokens = jnp.asarray([[3], [17]], jnp.int32)
    want = full_step(state, tokens)
    logits, _, stats, after = tidal_step(state, tokens, 16)
    assert_close(logits, want)
    recall, error = stats[1]                                   # layer 0 selects, layer 1 is sparse
    np.testing.assert_allclose(recall, 1.0)
    np.testing.assert_allclose(error, 0.0, atol=1e-6)
    cache = nnx.merge(graphdef, after).blocks[1].attention.kv_cache.get_value()
    np.testing.assert_array_equal(cache.lengths, [12, 12])
