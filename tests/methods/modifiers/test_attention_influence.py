"""P16 AttentionInfluence: the uniform head ablation, retrieval-head scores and the influence ratio.

Mutations caught: an ablated head that averages over all keys instead of the visible ones (or ablates the
wrong head) fails ``test_ablated_heads_output_the_causal_mean_of_v``; a copy counted at any step instead of an
answer step, or a duplicated value token counted twice, fails ``test_retrieval_score_is_one_for_a_copy_head``;
a ratio without the division by L_base fails ``test_influence_is_scale_invariant``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.methods.modifiers.attention_influence import (attention_influence, causal_mean, head_ablation_prob_mod,
                                                         retrieval_head_scores, top_heads, uniform_head_ablation)
from tests.conftest import assert_close, random_qkv


def test_ablated_heads_output_the_causal_mean_of_v():
    """Masked heads: the running mean of their kv head's v (GQA); the other heads: attention unchanged; the
    fused form equals the dense prob_mod form."""
    q, k, v = random_qkv(0, 2, 19, 19, 4, 2, 8)
    mask = jnp.asarray([False, True, True, False])
    got = uniform_head_ablation(q, k, v, mask)
    want_mean = np.cumsum(np.asarray(v), 1) / np.arange(1, 20)[None, :, None, None]
    assert_close(got[:, :, 1], want_mean[:, :, 0])                  # head 1 reads kv head 0
    assert_close(got[:, :, 2], want_mean[:, :, 1])
    plain = jattn.attention(q, k, v, causal=True)
    assert_close(got[:, :, [0, 3]], plain[:, :, [0, 3]])
    assert_close(jattn.attention(q, k, v, causal=True, prob_mod=head_ablation_prob_mod(mask)), got)
    assert_close(causal_mean(v)[:, -1], jnp.mean(v, axis=1))


def test_retrieval_score_is_one_for_a_copy_head():
    """Head 0 peaks on the value's positions at the answer steps (a copy head): 1. Head 1 peaks on a filler
    token: 0. Head 2 peaks on the value token but only outside the answer steps: 0. A value listed twice counts
    once."""
    B, T = 1, 8
    tokens = jnp.asarray([[5, 9, 7, 3, 4, 9, 7, 6]])
    value = jnp.asarray([[9, 7, 9]])                                  # the set {9, 7}
    answer = jnp.zeros((B, T), bool).at[0, 6].set(True).at[0, 7].set(True)
    probs = np.full((B, 3, T, T), 1e-3, np.float32)
    probs[0, 0, 6, 1] = probs[0, 0, 7, 2] = 1.0                       # copies 9 then 7
    probs[0, 1, :, 0] = 1.0                                           # always the first token (5)
    probs[0, 2, 3, 1] = 1.0                                           # 9, but at a non-answer step
    scores = retrieval_head_scores(jnp.asarray(probs), tokens, answer, value)
    np.testing.assert_allclose(np.asarray(scores), [1.0, 0.0, 0.0])
    half = probs.copy()
    half[0, 0, 7, 2] = 1e-3
    half[0, 0, 7, 0] = 1.0                                            # second step now points at filler
    np.testing.assert_allclose(np.asarray(retrieval_head_scores(jnp.asarray(half), tokens, answer, value))[0], 0.5)


def test_top_heads_and_influence():
    scores = jnp.asarray([[0.1, 0.9], [0.5, 0.9]])
    np.testing.assert_array_equal(top_heads(scores, 0.5), [[False, True], [False, True]])
    np.testing.assert_array_equal(top_heads(scores, 0.05), [[False, True], [False, False]])  # ties: earlier


def test_influence_is_scale_invariant():
    base, ref = jnp.asarray([2.0, 1.0, 4.0]), jnp.asarray([3.0, 1.5, 4.4])
    np.testing.assert_allclose(np.asarray(attention_influence(base, ref)), [0.5, 0.5, 0.1], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(attention_influence(10 * base, 10 * ref)), [0.5, 0.5, 0.1], rtol=1e-6)


@pytest.mark.parametrize("call,word", [
    (lambda q, k, v: uniform_head_ablation(q, k, v, jnp.ones((3,), bool)), "head_mask"),
    (lambda q, k, v: uniform_head_ablation(q, k, v, jnp.ones((4,), jnp.int32)), "head_mask"),
    (lambda q, k, v: top_heads(jnp.ones(4), 0.0), "fraction"),
    (lambda q, k, v: attention_influence(jnp.ones(3), jnp.ones(2)), "loss_base"),
])
def test_bad_input_names_the_argument(call, word):
    q, k, v = random_qkv(1, 1, 8, 8, 4, 2, 8)
    with pytest.raises((TypeError, ValueError), match=word):
        call(q, k, v)
