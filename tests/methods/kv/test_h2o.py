"""P70 SinkLoRA's H2O eviction (jattn.methods.kv.h2o): the fixed-budget cache against a literal float64 NumPy
transcription of the rule, against full decode attention when nothing is evicted, and against dense attention
masked to the kept positions.

Mutations each test catches (each was applied to h2o.py and seen to fail):
* test_large_budget_never_evicts_and_equals_full_decode: the new token not visible to its own step
  (``visible`` built from ``self.positions`` only); the new token's position off by one.
* test_eviction_follows_the_numpy_transcription: the recent window one wider (``>= newest - n_recent``); scores
  not accumulated (``scores = step probabilities``); heavy hitters ranked by the lowest score; the scores taken
  from one query head of each group instead of the group's sum.
* test_kept_count_and_recent_window: keep ``rank <= n_hh`` (one entry too many survives).
* test_step_equals_dense_attention_over_the_kept_positions: the evicted slot's old key left in place while
  its position is updated (``k=self.k``).
* test_keep_mask_rule: ties broken towards the older position.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.core.reference import reference_attention
from jattn.methods.kv.h2o import H2OCache, h2o_keep_mask
from jattn.ops.decode_reference import decode_attention_reference
from tests.conftest import assert_close


def _inputs(seed, B, T, H, Hkv, D):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, D)).astype(np.float32)
    k = rng.standard_normal((B, T, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((B, T, Hkv, D)).astype(np.float32)
    return q, k, v


@functools.lru_cache(maxsize=None)
def _compiled_run(prompt: int, n_hh: int, n_recent: int):
    """One jitted prefill + scan of steps per static configuration (tests with equal shapes share its compile)."""
    @jax.jit
    def run(q, k, v):
        _, cache = H2OCache.prefill(q[:, :prompt], k[:, :prompt], v[:, :prompt], n_hh=n_hh, n_recent=n_recent)

        def one(cache, token):
            q_t, k_t, v_t = token
            out, new = cache.step(q_t, k_t, v_t)
            return new, (out, cache.positions, new.positions, new.scores)
        tokens = tuple(jnp.moveaxis(x[:, prompt:], 1, 0) for x in (q, k, v))   # [steps, B, heads, D]
        _, (outs, before, after, scores) = jax.lax.scan(one, cache, tokens)
        return jnp.moveaxis(outs, 0, 1), before, after, scores
    return run


def run_h2o(q, k, v, prompt: int, n_hh: int, n_recent: int):
    """Prefill ``prompt`` tokens, then one step per remaining token, all in one compiled scan.

    Returns (step outputs [B, steps, H, D], positions before each step [steps, B, Hkv, budget], positions and
    scores after each step)."""
    return [np.asarray(x) for x in _compiled_run(prompt, n_hh, n_recent)(q, k, v)]


def numpy_h2o(q, k, v, prompt: int, n_hh: int, n_recent: int):
    """Float64 transcription of H2O per (sequence, kv head): prompt scores from full causal attention, then one
    token per step over the kept set plus itself; evict the lowest-score entry older than the recent window
    (ties: the oldest). Returns outputs [B, steps, H, D] and, per step, a dict position -> score per (b, g)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    budget = n_hh + n_recent
    outs = np.zeros((B, T - prompt, H, D))
    history = []
    kept = {}
    for b in range(B):
        for g in range(Hkv):
            score = {j: 0.0 for j in range(prompt)}
            for h in range(g * G, (g + 1) * G):
                for t in range(prompt):
                    logits = np.array([q[b, t, h] @ k[b, j, g] for j in range(t + 1)]) / np.sqrt(D)
                    p = np.exp(logits - logits.max())
                    p /= p.sum()
                    for j in range(t + 1):
                        score[j] += p[j]
            recent = [j for j in range(prompt) if j > prompt - 1 - n_recent]
            others = sorted((j for j in range(prompt) if j not in recent), key=lambda j: (-score[j], -j))
            kept[b, g] = {j: score[j] for j in recent + others[:n_hh]}
    for step, p_new in enumerate(range(prompt, T)):
        for b in range(B):
            for g in range(Hkv):
                entries = kept[b, g]
                entries[p_new] = 0.0
                keys = sorted(entries)
                for h in range(g * G, (g + 1) * G):
                    logits = np.array([q[b, p_new, h] @ k[b, j, g] for j in keys]) / np.sqrt(D)
                    p = np.exp(logits - logits.max())
                    p /= p.sum()
                    outs[b, step, h] = p @ v[b, keys, g]
                    for j, pj in zip(keys, p):
                        entries[j] += pj
                if len(entries) > budget:
                    old = [j for j in entries if j <= p_new - n_recent]
                    del entries[min(old, key=lambda j: (entries[j], j))]
        history.append({key: dict(value) for key, value in kept.items()})
    return outs, history


@pytest.mark.parametrize("H,Hkv", [(1, 1), (6, 2)])             # (4, 1) in CASES
def test_large_budget_never_evicts_and_equals_full_decode(H, Hkv):
    B, T, prompt, D = 2, 11, 5, 8
    q, k, v = _inputs(H, B, T, H, Hkv, D)
    outs, _, after, _ = run_h2o(q, k, v, prompt, n_hh=6, n_recent=7)            # budget 13 >= 11
    for step, p in enumerate(range(prompt, T)):
        held = np.sort(after[step][after[step] >= 0].reshape(B, Hkv, -1), axis=-1)
        np.testing.assert_array_equal(held, np.broadcast_to(np.arange(p + 1), held.shape))
    full_decode = jax.jit(lambda q, k, v, n: decode_attention_reference(
        q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), jnp.full((B,), n, jnp.int32), scale=D ** -0.5)[0])
    for step, p in enumerate(range(prompt, T)):
        want = full_decode(q[:, p:p + 1], k, v, p + 1)          # the whole cache, lengths = p + 1
        assert_close(outs[:, step], want[:, 0], what=f"step {step}")


CASES = [  # (H, Hkv, n_hh, n_recent); B, T, prompt, D = SHAPE
    (1, 1, 2, 3), (4, 1, 3, 1), (6, 2, 2, 2), (2, 1, 4, 0), (2, 1, 0, 4)]
SHAPE = (2, 15, 7, 4)


def case_run(H, Hkv, n_hh, n_recent, seed=None):
    B, T, prompt, D = SHAPE
    q, k, v = _inputs(10 + n_hh if seed is None else seed, B, T, H, Hkv, D)
    return (q, k, v), run_h2o(q, k, v, prompt, n_hh, n_recent)


@pytest.mark.parametrize("H,Hkv,n_hh,n_recent", CASES)
def test_eviction_follows_the_numpy_transcription(H, Hkv, n_hh, n_recent):
    prompt = SHAPE[2]
    (q, k, v), (outs, _, after, scores) = case_run(H, Hkv, n_hh, n_recent)
    want_outs, history = numpy_h2o(q, k, v, prompt, n_hh, n_recent)
    assert_close(outs, want_outs)
    for step, kept in enumerate(history):
        for (b, g), entries in kept.items():
            held = after[step, b, g] >= 0
            assert sorted(after[step, b, g][held].tolist()) == sorted(entries), (step, b, g)
            got = dict(zip(after[step, b, g][held].tolist(), scores[step, b, g][held].tolist()))
            np.testing.assert_allclose([got[j] for j in sorted(entries)], [entries[j] for j in sorted(entries)],
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("H,Hkv,n_hh,n_recent", CASES)
def test_kept_count_and_recent_window(H, Hkv, n_hh, n_recent):
    B, T, prompt, _ = SHAPE
    _, (_, _, after, _) = case_run(H, Hkv, n_hh, n_recent, seed=3)       # the transcription test's compile
    budget = n_hh + n_recent
    for step, p in enumerate(range(prompt, T)):
        for b in range(B):
            for g in range(Hkv):
                held = after[step, b, g][after[step, b, g] >= 0].tolist()
                assert len(held) == len(set(held)) == min(p + 1, budget)
                assert set(range(p - n_recent + 1, p + 1)) <= set(held)


def test_step_equals_dense_attention_over_the_kept_positions():
    H, Hkv = 6, 2
    B, T, prompt, _ = SHAPE
    (q, k, v), (outs, before, _, _) = case_run(H, Hkv, 2, 2, seed=4)    # the transcription test's compile
    dense = jax.jit(lambda q, k, v, mask: reference_attention(q, k, v, mask=jnp.repeat(mask, H // Hkv, axis=1)))
    for step, p in enumerate(range(prompt, T)):
        mask = np.zeros((B, Hkv, 1, T), bool)          # over the whole history; later tokens stay masked
        for b in range(B):
            for g in range(Hkv):
                held = before[step, b, g]
                mask[b, g, 0, held[held >= 0]] = True
        mask[..., p] = True
        want = dense(q[:, p:p + 1], k, v, mask)
        assert_close(outs[:, step], want[:, 0], what=f"step {step}")


def test_keep_mask_rule():
    positions = jnp.asarray([[0, 1, 2, 3, 4, 5, 6, -1]], jnp.int32)
    scores = jnp.asarray([[0.5, 0.9, 0.5, 0.1, 0.7, 0.2, 0.3, 9.0]], jnp.float32)
    keep = np.asarray(h2o_keep_mask(scores, positions, n_hh=2, n_recent=2))
    # recent: 5, 6; heavy among 0..4: 1 (0.9), 4 (0.7); the empty slot never counts
    np.testing.assert_array_equal(keep[0], [False, True, False, False, True, True, True, False])
    keep = np.asarray(h2o_keep_mask(scores, positions, n_hh=3, n_recent=2))
    # a tie at 0.5 between positions 0 and 2: the newer one (2) is kept
    np.testing.assert_array_equal(keep[0], [False, True, True, False, True, True, True, False])


def test_bad_arguments_are_named():
    q, k, v = (jnp.asarray(x) for x in _inputs(0, 1, 4, 2, 1, 8))
    with pytest.raises(ValueError, match="n_hh \\+ n_recent"):          # raised while tracing: no compute
        jax.eval_shape(lambda q, k, v: H2OCache.prefill(q, k, v, n_hh=0, n_recent=0), q, k, v)
    with pytest.raises(ValueError, match="n_hh"):
        H2OCache.create(1, 1, 8, n_hh=-1, n_recent=2)
    cache = H2OCache.create(1, 1, 8, n_hh=1, n_recent=2)

    def step(q, k, v):
        return jax.eval_shape(lambda c, q, k, v: c.step(q, k, v), cache, q, k, v)
    with pytest.raises(ValueError, match="k_new"):
        step(q[:, 0], k[:, 0, :, :4], v[:, 0])
    with pytest.raises(TypeError, match="v_new"):
        step(q[:, 0], k[:, 0], v[:, 0].astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="q must be"):
        step(q[:, 0, :1, :4], k[:, 0], v[:, 0])
