"""Mask functions against plain NumPy transcriptions; the and/or/not algebra; materialize."""
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.core import masks

T, S = 11, 13
I, J = np.meshgrid(np.arange(T), np.arange(S), indexing="ij")

EXPECTED = {
    "causal": (masks.causal_mask(), J <= I),
    "causal_offset": (masks.causal_mask(offset=2), J <= I + 2),
    "sliding_window": (masks.sliding_window_mask(3, 1), (J >= I - 3) & (J <= I + 1)),
    "prefix_lm": (masks.prefix_lm_mask(4), (J < 4) | (J <= I)),
    "chunked": (masks.chunked_mask(4), (I // 4) == (J // 4)),
    "sink_local": (masks.sink_local_mask(2, 3), (J <= I) & ((J < 2) | (J > I - 3))),
    "dilated": (masks.dilated_mask(3, 1), (I - J) % 3 == 1),
    "full": (masks.full_mask(), np.ones((T, S), bool)),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_mask_matches_transcription(name):
    mask_fn, expected = EXPECTED[name]
    dense = np.asarray(masks.materialize(mask_fn, 2, 3, T, S))
    assert dense.shape == (2, 3, T, S)
    assert np.array_equal(dense, np.broadcast_to(expected, dense.shape))


def test_document_mask_uses_segment_ids_per_batch():
    q_ids = jnp.array([[0, 0, 1, 1], [0, 1, 1, 1]])
    dense = np.asarray(masks.materialize(masks.document_mask(q_ids), 2, 1, 4, 4))
    ids = np.asarray(q_ids)
    assert np.array_equal(dense[:, 0], ids[:, :, None] == ids[:, None, :])


def test_algebra():
    causal, window = masks.causal_mask(), masks.sliding_window_mask(2, 2)
    c, w = EXPECTED["causal"][1], (J >= I - 2) & (J <= I + 2)
    dense = lambda fn: np.asarray(masks.materialize(fn, 1, 1, T, S))[0, 0]
    assert np.array_equal(dense(masks.and_masks(causal, window)), c & w)
    assert np.array_equal(dense(masks.or_masks(causal, window)), c | w)
    assert np.array_equal(dense(masks.not_mask(causal)), ~c)
    assert np.array_equal(dense(masks.and_masks()), np.ones((T, S), bool))
    assert not dense(masks.or_masks()).any()


@pytest.mark.parametrize("make", [lambda: masks.sliding_window_mask(-1), lambda: masks.chunked_mask(0),
                                  lambda: masks.dilated_mask(0), lambda: masks.prefix_lm_mask(-2),
                                  lambda: masks.sink_local_mask(1.5, 2)])
def test_bad_mask_arguments_raise(make):
    with pytest.raises(ValueError, match="must be an int"):
        make()
