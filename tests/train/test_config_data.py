"""Configs, schedules, the byte corpus and the synthetic tasks."""
import glob

import numpy as np
import pytest

from train.config import DEFAULTS, apply_overrides, check_config, config_runner, load_config, merge, parse_value
from train.data import ByteCorpus
from train.optim import make_schedule
from train.tasks import MQAR, Copying, ICLRegression, NeedleInHaystack


def test_every_shipped_config_loads():
    """Generic configs pass ``python -m train``'s checker (no key the run would ignore); a config whose
    ``RUNNER`` names its own experiment module loads, that module imports, and its own checker (if any) passes."""
    import importlib
    import importlib.util

    paths = sorted(glob.glob("configs/*.py"))
    assert paths
    for path in paths:
        spec = importlib.util.spec_from_file_location("shipped_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        runner = getattr(module, "RUNNER", None)
        if runner is None:
            config = load_config(path)
            assert {"task", "model", "optim", "train"} <= set(config)
            assert check_config(config) is config, path   # no key the run would ignore
            continue
        config = module.get_config()
        assert isinstance(config, dict) and config, path
        own_check = getattr(importlib.import_module(runner), "check_config", None)
        if own_check is not None:
            own_check(config)


def test_overrides_reach_nested_keys_and_parse_literals():
    config = apply_overrides({"model": {"method_config": {}}, "train": {"steps": 1}},
                             ["train.steps=7", "model.method_config.window=16", "model.method=sliding_window"])
    assert config["train"]["steps"] == 7 and config["model"]["method_config"] == {"window": 16}
    assert config["model"]["method"] == "sliding_window" and parse_value("3e-4") == 3e-4
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(config, ["train.steps"])


@pytest.mark.parametrize("override, suggestion", [
    ("train.stpes=5", "'train.steps'"),
    ("trian=5", "'train'"),
    ("optim.lrr=0.1", "'optim.lr'"),
    ("model.dimm=32", "'model.dim'"),
    ("model.num_head=2", "'model.num_heads'"),
    ("task.seq_ln=32", "'task.seq_len'"),
    ("analysis.sampels=8", "'analysis.samples'"),
])
def test_a_misspelt_key_at_any_level_is_an_error_naming_the_closest_key(override, suggestion):
    config = merge(DEFAULTS, {"analysis": {"kind": "icl"}})
    with pytest.raises(ValueError, match=f"unknown key '{override.split('=')[0]}'; did you mean {suggestion}"):
        apply_overrides(config, [override])
    with pytest.raises(ValueError, match="unknown key 'train.stpes'; did you mean 'train.steps'"):
        check_config(merge(DEFAULTS, {"train": {"stpes": 5}}))      # a typo inside a config file


def test_overrides_accept_every_valid_key_and_refuse_to_descend_into_values():
    config = apply_overrides(DEFAULTS, ["train.steps=5", "optim.eps=1e-9", "optim.schedule_steps=50",
                                        "model.mlp='gelu'", "model.method_config.window=16",
                                        "model.method_config.inner.depth=2", "task.max_bytes=1000"])
    assert check_config(config)["model"]["method_config"] == {"window": 16, "inner": {"depth": 2}}
    assert config["train"]["steps"] == 5 and config["optim"]["schedule_steps"] == 50
    mqar = apply_overrides(merge(DEFAULTS, {"task": {"kind": "mqar"}}), ["task.num_pairs=4"])
    assert mqar["task"] == {"kind": "mqar", "num_pairs": 4}
    with pytest.raises(ValueError, match="did you mean 'task.num_pairs'"):
        apply_overrides(mqar, ["task.num_pair=4"])
    with pytest.raises(ValueError, match="'train.steps' is a value \\(100\\), not a section"):
        apply_overrides(DEFAULTS, ["train.steps.x=1"])


def test_warmup_cosine_and_wsd_schedules():
    cosine = make_schedule("cosine", peak_lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert float(cosine(0)) == 0.0 and abs(float(cosine(10)) - 1.0) < 1e-6
    assert abs(float(cosine(100)) - 0.1) < 1e-6 and float(cosine(55)) < float(cosine(20))
    wsd = make_schedule("wsd", peak_lr=1.0, total_steps=100, warmup_steps=10, decay_fraction=0.2,
                        min_lr_ratio=0.0)
    assert float(wsd(50)) == 1.0 and float(wsd(79)) == 1.0
    assert abs(float(wsd(90)) - 0.5) < 1e-6 and abs(float(wsd(100))) < 1e-6
    with pytest.raises(ValueError, match="schedule"):
        make_schedule("linear", peak_lr=1.0, total_steps=10)


def test_byte_corpus_batches_are_deterministic_shifted_python_source():
    corpus = ByteCorpus(32, max_bytes=50_000)
    a, b = corpus.batch(0, 5, 3), corpus.batch(0, 5, 3)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], corpus.batch(0, 6, 3)["inputs"])
    np.testing.assert_array_equal(a["inputs"][:, 1:], a["targets"][:, :-1])
    assert b"def " in corpus.splits["train"].tobytes()


def test_mqar_answers_are_the_values_bound_to_the_query_keys():
    task = MQAR(num_pairs=4, num_queries=3, vocab_size=32)
    batch = task.batch(0, 0, 5)
    seq = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    assert seq.shape == (5, 2 * (4 + 3))
    for row, mask in zip(seq, np.concatenate([[0], batch["loss_mask"][0]])[None].repeat(5, 0)):
        binding = dict(zip(row[0:8:2], row[1:8:2]))
        for position in np.flatnonzero(mask):
            assert row[position] == binding[row[position - 1]]
    assert batch["loss_mask"].sum() == 5 * 3


def test_needle_copy_and_icl_regression_tasks():
    needle = NeedleInHaystack(seq_len=32, vocab_size=16).batch(0, 0, 4)
    seq = np.concatenate([needle["inputs"], needle["targets"][:, -1:]], axis=1)
    for row in seq:
        marker_positions = np.flatnonzero(row[:-3] == NeedleInHaystack.MARKER)
        assert any(row[p + 1] == row[-2] and row[p + 2] == row[-1] for p in marker_positions)
    # needle_vocab: key and value from the last ids only, the filler from the others (the key is then unique)
    task = NeedleInHaystack(seq_len=40, vocab_size=20, needle_vocab=6)
    assert task.ranges() == ((2, 14), (14, 20))
    batch = task.batch(0, 0, 8)
    seq = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    for row in seq:
        (marker,) = np.flatnonzero(row[:-3] == NeedleInHaystack.MARKER)
        assert row[marker + 1] == row[-2] and row[marker + 2] == row[-1] and row[-1] >= 14 and row[-2] >= 14
        assert np.count_nonzero(row >= 14) == 4 and np.all(row[row != NeedleInHaystack.MARKER] >= 2)
    with pytest.raises(ValueError, match="needle_vocab must be 0 or in"):
        NeedleInHaystack(vocab_size=20, needle_vocab=17)
    copy = Copying(length=5, vocab_size=10).batch(0, 0, 2)
    seq = np.concatenate([copy["inputs"], copy["targets"][:, -1:]], axis=1)
    np.testing.assert_array_equal(seq[:, :5], seq[:, 6:])
    icl = ICLRegression(dim=3, num_context=10).batch(0, 0, 4)
    tokens = icl["tokens"]
    np.testing.assert_allclose(tokens[:, :-1, -1], np.einsum("bld,bd->bl", tokens[:, :-1, :3], icl["beta"]), atol=1e-5)
    np.testing.assert_allclose(icl["target"], np.einsum("bd,bd->b", tokens[:, -1, :3], icl["beta"]), atol=1e-5)
    assert np.all(tokens[:, -1, -1] == 0)


def test_python_m_train_hands_a_runner_config_to_its_script(monkeypatch):
    """``python -m train --config X`` for a config with ``RUNNER`` runs that script with ``--config X`` and the
    remaining arguments. Catches: the generic trainer run on an experiment config (a key error for the user), the
    config path or the extra flags dropped, a script's returned report read as a failing exit status."""
    import importlib

    from train import cli
    seen = []
    module = importlib.import_module("train.vision_modules")
    monkeypatch.setattr(module, "main", lambda argv: seen.append(argv) or {"report": 1})
    assert cli.main(["--config", "configs/vision_ela.py", "--out", "x"]) == 0
    assert seen == [["--config", "configs/vision_ela.py", "--out", "x"]]
    with pytest.raises(SystemExit):   # a generic config still goes through python -m train's own parser
        cli.main(["--config", "configs/lm_softmax.py", "not_a_key=1"])


def test_every_runner_script_accepts_config(capsys):
    """Each RUNNER script's own command line takes ``--config`` (what ``python -m train`` passes it). Catches a
    script that would reject the handed-on flag."""
    import importlib

    runners = {config_runner(path) for path in glob.glob("configs/*.py")} - {None}
    assert runners
    for runner in sorted(runners):
        with pytest.raises(SystemExit):
            importlib.import_module(runner).main(["--help"])
        assert "--config" in capsys.readouterr().out, runner
