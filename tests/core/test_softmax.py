"""merge_partials is exact, associative and commutative; the online state equals a plain softmax."""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, strategies as st

from jattn.core.reference import reference_attention
from jattn.core.softmax import MASK_VALUE, OnlineSoftmax, merge_partials, merge_two
from tests.conftest import assert_close, random_qkv


def partial(q, k, v, keep):
    """Attention of q over the keys where `keep` is True, as (out, lse)."""
    mask = jnp.asarray(keep)[None, None, None, :]
    return reference_attention(q, k, v, mask=mask, return_lse=True)


@given(cuts=st.lists(st.integers(0, 13), min_size=1, max_size=4), seed=st.integers(0, 100))
def test_merge_of_any_partition_equals_full_attention(cuts, seed):
    S = 13
    q, k, v = random_qkv(seed, 1, 3, S, 2, 1, 8)
    bounds = [0, *sorted(cuts), S]
    parts = [partial(q, k, v, (np.arange(S) >= a) & (np.arange(S) < b)) for a, b in zip(bounds, bounds[1:])]
    out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    full_out, full_lse = reference_attention(q, k, v, return_lse=True)
    assert_close(out, full_out)
    assert_close(lse, full_lse)


def test_merge_is_associative_and_commutative_and_empty_parts_are_identity():
    S = 12
    q, k, v = random_qkv(7, 2, 4, S, 2, 2, 8)
    a = partial(q, k, v, np.arange(S) < 4)
    b = partial(q, k, v, (np.arange(S) >= 4) & (np.arange(S) < 9))
    c = partial(q, k, v, np.arange(S) >= 9)
    empty = partial(q, k, v, np.zeros(S, bool))
    assert np.all(np.isneginf(np.asarray(empty[1])))
    left = merge_two(*merge_two(*a, *b), *c)
    right = merge_two(*a, *merge_two(*b, *c))
    swapped = merge_two(*c, *merge_two(*b, *a))
    with_empty = merge_partials([a[0], empty[0], b[0], c[0]], [a[1], empty[1], b[1], c[1]])
    for result in (right, swapped, with_empty):
        assert_close(result[0], left[0])
        assert_close(result[1], left[1])
    all_empty = merge_partials([empty[0], empty[0]], [empty[1], empty[1]])
    assert np.all(np.asarray(all_empty[0]) == 0) and np.all(np.isneginf(np.asarray(all_empty[1])))


def test_online_softmax_over_blocks_equals_softmax():
    logits = jax.random.normal(jax.random.PRNGKey(0), (3, 20)) * 3
    values = jax.random.normal(jax.random.PRNGKey(1), (20, 5))
    state = OnlineSoftmax.init((3,), 5)
    for start in range(0, 20, 6):
        state = state.update(logits[:, start:start + 6], values[start:start + 6])
    out, lse = state.finalize()
    assert_close(out, jax.nn.softmax(logits, -1) @ values)
    assert_close(lse, jax.nn.logsumexp(logits, -1))


def test_online_softmax_empty_rows_sinks_and_the_kernels_column_form():
    """One home of the online softmax (``pallas_kernels.common``): a row that met only masked logits
    finalises to 0 / -inf (with a sink: 0 / the sink), a NaN row stays NaN, and the kernels' column-form
    state ``[rows, 1]`` gives exactly the row-form result."""
    from pallas_kernels.common import finalize_rows, online_softmax_step
    logits = jax.random.normal(jax.random.PRNGKey(2), (4, 12)) * 2
    logits = logits.at[1].set(MASK_VALUE).at[2, 3].set(jnp.nan)
    values = jax.random.normal(jax.random.PRNGKey(3), (12, 3))
    state = OnlineSoftmax.init((4,), 3)
    column = (jnp.full((4, 1), MASK_VALUE), jnp.zeros((4, 1)), jnp.zeros((4, 3)))
    for start in (0, 6):
        state = state.update(logits[:, start:start + 6], values[start:start + 6])
        column = online_softmax_step(*column, logits[:, start:start + 6], values[start:start + 6])
    out, lse = state.finalize()
    col_out, col_lse = finalize_rows(*column)
    np.testing.assert_array_equal(np.asarray(col_out), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(col_lse[:, 0]), np.asarray(lse))
    assert np.all(np.asarray(out[1]) == 0) and np.isneginf(float(lse[1]))
    assert np.isnan(np.asarray(out[2])).all() and np.isnan(float(lse[2]))
    seen = np.array([0, 3])
    assert_close(out[seen], jax.nn.softmax(logits[seen], -1) @ values)
    sunk_out, sunk_lse = state.add_sink(jnp.full((4,), 0.5)).finalize()
    assert np.all(np.asarray(sunk_out[1]) == 0) and float(sunk_lse[1]) == 0.5
    assert_close(sunk_lse[seen], jnp.logaddexp(lse[seen], 0.5))


def test_merge_partials_rejects_mismatched_shapes():
    import pytest
    with pytest.raises(ValueError, match="merge_partials"):
        merge_partials(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4)))
    assert MASK_VALUE < -1e38
