"""MQAR's copy plateau and one-hop ceilings: hand-computed cases and counts on real batches."""
import numpy as np
import pytest

from jattn.core import masks
from train.tasks import MQAR, mqar_copy_plateau, mqar_one_hop_ceiling, mqar_one_hop_reach


def test_layout_matches_the_batches():
    task = MQAR(num_pairs=4, num_queries=3, vocab_size=32)
    where = task.layout()
    batch = task.batch(0, 0, 8)
    inputs = batch["inputs"]
    # the scored targets are predicted at the query positions and equal the answers in the input
    np.testing.assert_array_equal(np.flatnonzero(batch["loss_mask"][0]), where["queries"])
    np.testing.assert_array_equal(batch["targets"][:, where["queries"][:-1]], inputs[:, where["answers"][:-1]])
    assert np.all(inputs[:, where["context_values"]] >= 2 + task.key_vocab)   # values
    assert np.all(inputs[:, where["context_values"] - 1] < 2 + task.key_vocab)  # their keys


def test_one_hop_reach_by_hand():
    task = MQAR(num_pairs=4, vocab_size=32)  # queries at 8, 10, 12, 14; values at 1, 3, 5, 7; answers at 9, 11, 13
    assert mqar_one_hop_reach(task, masks.causal_mask()) == 1.0
    # window of 8 keys (t-7 .. t): query 0 reads all 4 values; query 1 reads 3 values and answer 9, so it
    # misses pair 0 only if query 0 asked another pair: 1/4 (3 + 1/4); query 2: 1/4 (2 + 2 (1 - (3/4)^2));
    # query 3: 1/4 (1 + 3 (1 - (3/4)^3)). Mean = 823/1024.
    assert mqar_one_hop_reach(task, masks.sliding_window_mask(7)) == pytest.approx(823 / 1024, abs=1e-12)
    # 4 sinks (pairs 0, 1) + 8 local keys: only query 3 can miss (pair 2): 1/4 (3 + 1 - (3/4)^3) -> 997/1024
    assert mqar_one_hop_reach(task, masks.sink_local_mask(4, 8)) == pytest.approx(997 / 1024, abs=1e-12)
    # a stride-2 pattern lets no value position read the key before it: nothing is retrievable
    assert mqar_one_hop_reach(task, masks.dilated_mask(2)) == 0.0
    assert mqar_one_hop_ceiling(task, masks.dilated_mask(2)) == pytest.approx(1 / task.value_vocab)
    assert mqar_one_hop_ceiling(task, masks.sliding_window_mask(7)) == pytest.approx(
        823 / 1024 + (1 - 823 / 1024) / 15)


def _counted_reach(task, mask_fn, batches=64, batch_size=64):
    """Counts, on real batches, the scored queries for which some readable position holds the queried
    key's value right after that key (an independent reading of the definition)."""
    hits = total = 0
    for step in range(batches):
        batch = task.batch(3, step, batch_size)
        inputs, targets = batch["inputs"], batch["targets"]
        for t in np.flatnonzero(batch["loss_mask"][0]):
            for row in range(batch_size):
                key, value = inputs[row, t], targets[row, t]
                found = any(inputs[row, p - 1] == key and inputs[row, p] == value
                            and mask_fn(0, 0, t, p) and mask_fn(0, 0, p, p - 1) for p in range(1, t))
                hits += found
                total += 1
    return hits / total


@pytest.mark.parametrize("mask_fn", [masks.sliding_window_mask(5), masks.sink_local_mask(2, 6)],
                         ids=["window6", "sink2_local6"])
def test_one_hop_reach_matches_counts_on_batches(mask_fn):
    task = MQAR(num_pairs=5, num_queries=5, vocab_size=40)
    exact = mqar_one_hop_reach(task, mask_fn)
    assert 0.3 < exact < 0.99  # a case that is neither trivial nor hopeless
    assert _counted_reach(task, mask_fn) == pytest.approx(exact, abs=0.02)


def test_copy_plateau_formula_and_simulation():
    assert mqar_copy_plateau(4, 15) == pytest.approx(0.30)
    assert mqar_copy_plateau(1, 15) == 1.0
    task = MQAR(num_pairs=4, vocab_size=32)
    rng = np.random.default_rng(0)
    where = task.layout()
    correct = []
    for step in range(50):
        batch = task.batch(0, step, 128)
        context = batch["inputs"][:, where["context_values"]]
        for t in where["queries"]:
            guess = context[np.arange(128), rng.integers(0, task.num_pairs, 128)]
            correct.append(guess == batch["targets"][:, t])
    assert np.mean(correct) == pytest.approx(mqar_copy_plateau(4, task.value_vocab), abs=0.015)


def test_bad_arguments_name_themselves():
    task = MQAR(num_pairs=2, vocab_size=16)
    with pytest.raises(TypeError, match="task"):
        mqar_one_hop_reach("mqar", masks.causal_mask())
    with pytest.raises(TypeError, match="mask_fn"):
        mqar_one_hop_reach(task, 8)
    with pytest.raises(ValueError, match="num_pairs"):
        mqar_copy_plateau(0, 15)
    with pytest.raises(ValueError, match="value_vocab"):
        mqar_copy_plateau(4, 0)
