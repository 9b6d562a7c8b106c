"""P37 AdaSpa: the block mass and the full selection against a literal NumPy transcription (GQA, a short
last block, a text sink), block rows summing to the block size, recall = kept mass / L, the head-adaptive
rule (literal and mean-preserving), sparsity 0 gives dense non-causal attention (forward and gradients),
the output equals dense attention with the expanded mask, maximal sparsity keeps one block a row plus the
text sink, the denoising schedule (warm-up, fused search, reuse, LSE-cached search), determinism, errors.

Mutations each test catches (one line changed, test failed, change reverted):

* ``test_block_mass_equals_literal_and_rows_sum_to_block_size``: ``exp(s - lse)`` of the padded query
  rows not zeroed (lse padded with 0 instead of +inf); the scale dropped.
* ``test_selection_equals_literal_rule``: ``keep`` rounded down instead of to the nearest; the text sink
  only text -> text (``&`` instead of ``|``); the head-adaptive groups swapped.
* ``test_head_adaptive_rule``: ``n`` not capped at ``H // 2``; ``>`` -> ``>=`` threshold.
* ``test_sparsity_zero_is_dense``: ``causal=True`` in the attention call.
* ``test_maximal_sparsity_keeps_one_block_and_text_sink``: ``keep`` not clipped at 1.
* ``test_diffusion_loop_reuses_and_cached_search_equals_fused``: the cached search reading a fresh LSE
  (the state's ``lse`` not used), the reuse branch recomputing the mask (search count), the LSE not
  stored at the fused search.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.core.reference import reference_attention
from jattn.methods.dynamic.adaspa import (AdaSpaSchedule, adaspa_attention, adaspa_block_mask, adaspa_init_state,
                                          adaspa_select, block_attention_mass, head_adaptive_sparsity, head_recall)
from tests.conftest import assert_forward_and_grads_close, dense_vjp_run, numpy_qkv, random_like, vjp_run

select = jax.jit(adaspa_select, static_argnames=("block_size", "sparsity", "text_len", "head_adaptive",
                                                 "recall_threshold"))

# ----------------------------------------------------------------------------- literal transcription


def literal_mass(q, k, b):
    """``W[p, c] = sum exp(q.k / sqrt(D) - LSE_i)`` with LSE from the full row, loops, float64."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, T, H, D = q.shape
    G = H // k.shape[2]
    nb = math.ceil(T / b)
    W = np.zeros((B, H, nb, nb))
    for bi in range(B):
        for h in range(H):
            for i in range(T):
                s = k[bi, :, h // G] @ q[bi, i, h] / math.sqrt(D)
                lse = np.log(np.sum(np.exp(s - s.max()))) + s.max()
                for j in range(T):
                    W[bi, h, i // b, j // b] += math.exp(s[j] - lse)
    return W


def literal_adaptive(recall, s, thr):
    H = len(recall)
    n = min(sum(r > thr for r in recall), H // 2)
    order = sorted(range(H), key=lambda h: (-recall[h], h))
    out = [s] * H
    for h in order[:n]:
        out[h] = (1 + s) / 2
    for h in order[H - n:] if n else []:
        out[h] = max((3 * s - 1) / 2, 0.0)
    return out


def literal_select(q, k, *, b, sparsity, text_len, adaptive, thr):
    W = literal_mass(q, k, b)
    B, H, nb, _ = W.shape
    T = q.shape[1]
    text_block = [min((p + 1) * b, T) > T - text_len for p in range(nb)] if text_len else [False] * nb

    def mask(Wh, s):
        keep = min(max(int(math.floor((1 - s) * nb + 0.5)), 1), nb)
        m = np.zeros((nb, nb), bool)
        for p in range(nb):
            for c in sorted(range(nb), key=lambda c: (-Wh[p, c], c))[:keep]:
                m[p, c] = True
            for c in range(nb):
                if text_block[p] or text_block[c]:
                    m[p, c] = True
        return m

    out = np.zeros((B, H, nb, nb), bool)
    for bi in range(B):
        uniform = [mask(W[bi, h], sparsity) for h in range(H)]
        if adaptive:
            recall = [W[bi, h][uniform[h]].sum() / T for h in range(H)]
            per_head = literal_adaptive(recall, sparsity, thr)
            for h in range(H):
                out[bi, h] = mask(W[bi, h], per_head[h])
        else:
            out[bi] = np.stack(uniform)
    return out, W


# ----------------------------------------------------------------------------- tests


def test_block_mass_equals_literal_and_rows_sum_to_block_size():
    T, b = 83, 16                                                      # a short last block (3 tokens)
    q, k, _ = numpy_qkv(0, 1, T, T, 4, 2, 8)
    _, lse = jax.jit(lambda q, k: reference_attention(q, k, k, return_lse=True))(q, k)
    W = np.asarray(jax.jit(functools.partial(block_attention_mass, block_size=b))(q, k, lse))
    np.testing.assert_allclose(W, literal_mass(q, k, b), rtol=1e-5, atol=1e-6)
    sizes = np.minimum(b, T - np.arange(6) * b)
    np.testing.assert_allclose(W.sum(-1), np.broadcast_to(sizes, W.shape[:3]), rtol=1e-5)
    assert abs(W.sum() / (4 * T) - 1) < 1e-5                           # sum W = L per head


@pytest.mark.parametrize("sparsity, text_len, adaptive", [(0.6, 10, True), (0.5, 0, False), (0.8, 0, True)])
def test_selection_equals_literal_rule(sparsity, text_len, adaptive):
    T, b = 150, 16
    q, k, _ = numpy_qkv(1, 1, T, T, 4, 2, 8)
    got, per_head = select(q, k, block_size=b, sparsity=sparsity, text_len=text_len, head_adaptive=adaptive,
                           recall_threshold=0.15)
    want, W = literal_select(q, k, b=b, sparsity=sparsity, text_len=text_len, adaptive=adaptive, thr=0.15)
    np.testing.assert_array_equal(np.asarray(got), want)
    if adaptive:
        assert len(set(np.round(np.asarray(per_head)[0], 4))) > 1      # the rule changed something


def test_recall_is_kept_mass_over_length():
    T, b = 96, 16
    q, k, _ = numpy_qkv(2, 1, T, T, 2, 1, 8)
    tiles, _ = select(q, k, block_size=b, sparsity=0.5, head_adaptive=False)
    W = literal_mass(q, k, b)
    recall = np.asarray(head_recall(jnp.asarray(W, jnp.float32), tiles, T))
    for h in range(2):
        kept = sum(W[0, h, p, c] for p in range(6) for c in range(6) if tiles[0, h, p, c])
        assert abs(recall[0, h] - kept / T) < 1e-5 and 0.5 < recall[0, h] < 1


def test_head_adaptive_rule():
    rng = np.random.default_rng(3)
    for H, s in [(8, 0.8), (6, 0.5), (5, 0.9)]:
        recall = rng.uniform(0.5, 1.0, (4, H)).astype(np.float32)
        recall[0] = 0.95                                               # n = H > H / 2 (the overlap case)
        got = np.asarray(head_adaptive_sparsity(jnp.asarray(recall), s, 0.8))
        want = np.array([literal_adaptive(list(r), s, 0.8) for r in recall])
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_allclose(got.mean(-1), s, rtol=1e-5)         # the mean sparsity is preserved


def test_sparsity_zero_is_dense():
    T, b = 100, 16
    q, k, v = numpy_qkv(4, 1, T, T, 4, 2, 16)
    bm = adaspa_block_mask(q, k, block_size=b, sparsity=0.0, head_adaptive=False)
    assert np.asarray(bm.to_dense_block_map()).all()
    sch = AdaSpaSchedule(search_steps=(0, 1), block_size=b, sparsity=0.0, head_adaptive=False)
    state = adaspa_init_state(q, sch)
    state = state._replace(block_map=bm.to_dense_block_map().astype(bool) | state.block_map)
    fn = lambda q, k, v: adaspa_attention(q, k, v, state, 1, sch, impl="xla")[0]    # cached search at s = 0
    w = random_like(5, q)
    got = jax.jit(lambda q, k, v, w: vjp_run(fn, q, k, v, w))(q, k, v, w)
    assert_forward_and_grads_close(got, dense_vjp_run(q, k, v, w, jnp.ones((T, T), bool)), what="s=0")


def test_output_equals_dense_with_expanded_mask():
    T, b = 100, 16
    q, k, v = numpy_qkv(6, 1, T, T, 4, 2, 16)
    sch = AdaSpaSchedule(search_steps=(0,), block_size=b, sparsity=0.6, text_len=7)
    state = adaspa_init_state(q, sch)
    _, state = jax.jit(adaspa_attention, static_argnums=5)(q, k, v, state, 0, sch)          # fused search
    tiles = np.asarray(state.block_map)
    assert 0.4 < tiles.mean() < 0.8
    mask = np.kron(tiles[0], np.ones((b, b), bool))[:, :T, :T]
    fn = lambda q, k, v: adaspa_attention(q, k, v, state, 3, sch, impl="xla")[0]    # reuse
    w = random_like(7, q)
    got = jax.jit(lambda q, k, v, w: vjp_run(fn, q, k, v, w))(q, k, v, w)
    assert_forward_and_grads_close(got, dense_vjp_run(q, k, v, w, jnp.asarray(mask)[None]))


def test_maximal_sparsity_keeps_one_block_and_text_sink():
    T, b, text_len = 150, 16, 20                                       # text in blocks 8 and 9
    q, k, _ = numpy_qkv(8, 1, T, T, 4, 2, 8)
    tiles = np.asarray(select(q, k, block_size=b, sparsity=0.99, text_len=text_len, head_adaptive=False)[0])
    video = np.arange(10) < 8
    assert tiles[..., ~video, :].all() and tiles[..., :, ~video].all()  # text rows and columns kept
    # One block a row, the row's best; when it is a text block the sink already holds it (no video block).
    best_is_video = video[np.argmax(literal_mass(q, k, b), -1)][..., video]
    np.testing.assert_array_equal(tiles[..., video, :][..., video].sum(-1), best_is_video)
    assert best_is_video.mean() > 0.5


def test_diffusion_loop_reuses_and_cached_search_equals_fused():
    """Eight steps, warm-up 2, searches at 2 (fused) and 5 (LSE-cached); q, k, v drift a little each step.
    Warm-up steps are dense, the search count is 2, steps 3-4 and 6-7 reuse the stored mask, and a cached
    search on unchanged inputs gives the fused search's mask."""
    T, b = 96, 16
    sch = AdaSpaSchedule(search_steps=(2, 5), block_size=b, sparsity=0.6, text_len=5)
    q0, k0, v0 = numpy_qkv(9, 1, T, T, 4, 2, 8)
    step_fn = jax.jit(adaspa_attention, static_argnums=5)
    state = adaspa_init_state(q0, sch)
    masks, searches = [], []
    for step in range(8):
        drift = 0.05 * step
        q, k, v = (x + drift * random_like(10 + step, x) for x in (q0, k0, v0))
        out, state = step_fn(q, k, v, state, step, sch)
        masks.append(np.asarray(state.block_map))
        searches.append(int(state.searches))
        if step < 2:
            np.testing.assert_allclose(np.asarray(out), np.asarray(reference_attention(q, k, v)), atol=1e-5)
        if step == 2:
            fused_state, fused_inputs = state, (q, k, v)
    assert searches == [0, 0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_array_equal(masks[3], masks[2])
    np.testing.assert_array_equal(masks[4], masks[2])
    np.testing.assert_array_equal(masks[7], masks[5])
    assert not masks[2].all()
    # The LSE-cached search with the fused step's inputs reproduces the fused search's mask.
    _, again = step_fn(*fused_inputs, fused_state, 5, sch)
    np.testing.assert_array_equal(np.asarray(again.block_map), masks[2])
    np.testing.assert_allclose(np.asarray(again.sparsity), np.asarray(fused_state.sparsity))


def test_selection_is_deterministic_and_traced_once():
    from tests.conftest import assert_traced_once
    q1, k1, _ = numpy_qkv(20, 1, 80, 80, 4, 2, 8)
    q2, k2, _ = numpy_qkv(21, 1, 80, 80, 4, 2, 8)
    fn = lambda q, k: adaspa_select(q, k, block_size=16, sparsity=0.7, text_len=4)[0]
    a, _, c = assert_traced_once(fn, (q1, k1), (q2, k2), (q1, k1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(sparsity=1.0), ValueError, "sparsity"),                     # kept fraction 0: budget outside (0, 1]
    (dict(sparsity=-0.1), ValueError, "sparsity"),
    (dict(block_size=24), ValueError, "block_size"),
    (dict(block_size=8), ValueError, "block_size"),
    (dict(text_len=100), ValueError, "text_len"),
    (dict(recall_threshold=1.5), ValueError, "recall_threshold"),
    (dict(lse=np.zeros((1, 48, 3), np.float32)), ValueError, "lse"),
    (dict(k_dim=8), ValueError, "head dim"),
])
def test_validation_errors_name_the_argument(kwargs, error, word):
    q, k, _ = numpy_qkv(0, 1, 48, 48, 2, 1, 16)
    if "k_dim" in kwargs:
        k = k[..., :kwargs.pop("k_dim")]
    lse = kwargs.pop("lse", None)
    with pytest.raises(error, match=word):
        adaspa_block_mask(q, k, None if lse is None else jnp.asarray(lse), **kwargs)
