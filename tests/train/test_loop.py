"""The training loop: bit-exact resume after a kill, gradient accumulation, logs, eval, CLI."""
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.build import build_model, build_task
from train.cli import main
from train.config import DEFAULTS, apply_overrides, merge
from train.checkpoint import CheckpointMismatchError
from train.loop import make_loss_of, make_train_step, read_jsonl, schedule_horizon, train
from train.optim import make_optimizer
from flax import nnx

CONFIG = merge(DEFAULTS, {
    "task": {"kind": "text", "seq_len": 16, "max_bytes": 20_000},
    "model": {"kind": "decoder_lm", "dim": 16, "num_layers": 1, "num_heads": 2,
              "method_config": {"impl": "reference"}},
    "optim": {"lr": 1e-2, "warmup_steps": 2},
    "train": {"steps": 6, "batch_size": 4, "log_every": 1, "eval_every": 3, "eval_batches": 1,
              "checkpoint_every": 2, "progress": False},
})


def _run(config, **kwargs):
    task = build_task(config["task"])
    return train(config, build_model(config["model"], task, config["seed"]), task, quiet=True, **kwargs)


class Killed(Exception):
    pass


def test_a_killed_and_resumed_run_is_bitwise_identical_to_a_straight_run(tmp_path):
    straight = _run(merge(CONFIG, {"train": {"out_dir": str(tmp_path / "a")}}))
    resumed_cfg = merge(CONFIG, {"train": {"out_dir": str(tmp_path / "b")}})

    def kill_at_step_5(step, metrics):
        if step == 5:   # the last checkpoint is at step 4: step 5 is lost, as in a real crash
            raise Killed

    with pytest.raises(Killed):
        _run(resumed_cfg, on_step=kill_at_step_5)
    resumed = _run(resumed_cfg)
    for a, b in zip(jax.tree.leaves((straight.params, straight.opt_state)),
                    jax.tree.leaves((resumed.params, resumed.opt_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the log of the resumed run has each step once, with the same losses as the straight run
    logs = [read_jsonl(str(tmp_path / name / "metrics.jsonl")) for name in ("a", "b")]
    train_losses = [[(r["step"], r["loss"]) for r in log if r["split"] == "train"] for log in logs]
    assert train_losses[0] == train_losses[1] and [s for s, _ in train_losses[0]] == list(range(1, 7))
    assert any(r["split"] == "eval" and r["step"] == 3 for r in logs[1])


def test_gradient_accumulation_gives_the_full_batch_update():
    task = build_task(CONFIG["task"])
    model = build_model(CONFIG["model"], task, 0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer, _ = make_optimizer(lr=1e-2, total_steps=10)
    loss_of = make_loss_of(graphdef, rest, task.loss)
    batch = task.batch(0, 0, 4)
    results = [jax.jit(make_train_step(loss_of, optimizer, n))(params, optimizer.init(params), batch)
               for n in (1, 2)]
    for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(results[0][2]["loss"], results[1][2]["loss"], rtol=1e-6)
    # the update is not trivially zero
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(params))) > 1e-4


def test_training_lowers_the_loss_and_reports_throughput_and_memory():
    result = _run(merge(CONFIG, {"train": {"steps": 25, "checkpoint_every": 0, "eval_every": 0},
                                 "optim": {"lr": 2e-2}}))
    losses = [r["loss"] for r in result.history if r["split"] == "train"]
    assert losses[-1] < losses[0] - 0.5
    assert result.tokens_per_second > 0 and result.step_memory_bytes > 0


def test_cli_runs_a_config_file_with_overrides(tmp_path, capsys):
    config_path = tmp_path / "tiny.py"
    config_path.write_text("def get_config():\n    return " + repr({
        "name": "tiny", "task": CONFIG["task"], "model": CONFIG["model"], "optim": {"warmup_steps": 1},
        "train": {"steps": 3, "checkpoint_every": 0, "progress": False}}) + "\n")
    out_dir = tmp_path / "run"
    assert main(["--config", str(config_path), "train.batch_size=2", f"train.out_dir='{out_dir}'",
                 "--quiet"]) == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_eval"] is not None
    assert len([r for r in read_jsonl(str(out_dir / "metrics.jsonl")) if r["split"] == "train"]) == 1
    with pytest.raises(ValueError, match="unknown key"):
        apply_overrides(CONFIG, ["trian.steps=3"])


# ------------------------------------------------------------------ issue 12 §5: training fails loudly

def _checkpointed(tmp_path, **train_cfg):
    return merge(CONFIG, {"optim": {"warmup_steps": 1},
                          "train": {"out_dir": str(tmp_path / "run"), "steps": 2, "eval_batches": 0,
                                    "checkpoint_every": 2, **train_cfg}})


def test_resuming_a_checkpoint_of_another_shape_raises_one_error_naming_a_leaf_and_the_ways_out(tmp_path, capfd):
    _run(_checkpointed(tmp_path))
    wider = merge(_checkpointed(tmp_path), {"model": {"dim": 32}})
    with pytest.raises(CheckpointMismatchError) as info:
        _run(wider)
    message = str(info.value)
    assert "another shape" in message and "train.resume=False" in message and "train.out_dir" in message
    assert "params/blocks/0/attention/key/kernel/value: stored (16, 16) float32, expected (32, 32) float32" in message
    deeper = merge(_checkpointed(tmp_path), {"model": {"num_layers": 2}})
    with pytest.raises(CheckpointMismatchError) as info:
        _run(deeper)
    assert re.search(r"the checkpoint has \d+ arrays, the model and optimizer state \d+", str(info.value))
    assert "params/blocks/1/attention/key/kernel/value: not in the checkpoint, expected (16, 16)" in str(info.value)
    assert "Event loop is closed" not in capfd.readouterr().err
    # the first way out: train.resume=False starts afresh in the same directory
    fresh = _run(merge(wider, {"train": {"resume": False}}))
    assert fresh.step == 2 and "deleting the checkpoints" in capfd.readouterr().err


def test_the_cli_reports_a_shape_mismatch_in_one_message_without_orbax_noise(tmp_path, capfd):
    config_path = tmp_path / "tiny.py"
    config_path.write_text("def get_config():\n    return " + repr(_checkpointed(tmp_path)) + "\n")
    assert main(["--config", str(config_path), "--quiet"]) == 0
    capfd.readouterr()
    assert main(["--config", str(config_path), "model.dim=32", "--quiet"]) == 1
    err = capfd.readouterr().err
    assert err.startswith("python -m train: error: cannot resume") and err.count("error:") == 1
    assert "Traceback" not in err and "Event loop" not in err and "train.resume=False" in err


def test_resuming_says_so_and_extending_steps_keeps_the_schedule_horizon_unless_asked(tmp_path, capsys):
    config = merge(_checkpointed(tmp_path, steps=4), {"optim": {"warmup_steps": 1, "min_lr_ratio": 0.1}})
    _run(config)
    assert "resumed" not in capsys.readouterr().err
    shutil.copytree(tmp_path / "run", tmp_path / "other")
    kept = _run(merge(config, {"train": {"steps": 6}}))
    err = capsys.readouterr().err
    assert "resumed from step 4 (" in err and "keeping its horizon at 4 steps" in err
    lrs = {r["step"]: r["lr"] for r in kept.history if r["split"] == "train"}
    assert lrs[5] == lrs[6] == pytest.approx(CONFIG["optim"]["lr"] * 0.1)  # the 4-step schedule's final rate
    # the same resume with optim.schedule_steps=6 re-stretches it (and says so)
    stretched = _run(merge(config, {"train": {"steps": 6, "out_dir": str(tmp_path / "other")},
                                    "optim": {"schedule_steps": 6}}))
    assert "re-stretched from the 4 steps" in capsys.readouterr().err
    schedule = make_optimizer(lr=CONFIG["optim"]["lr"], total_steps=6, warmup_steps=1)[1]
    lrs = {r["step"]: r["lr"] for r in stretched.history if r["split"] == "train"}
    assert lrs[5] == pytest.approx(float(schedule(4))) and lrs[5] > lrs[6] > CONFIG["optim"]["lr"] * 0.1 + 1e-6


def test_schedule_horizon_rules():
    assert schedule_horizon(10, {}, None) == (10, None)
    assert schedule_horizon(10, {"schedule_steps": 20}, None) == (20, None)
    horizon, message = schedule_horizon(10, {"schedule": "cosine"}, 5)
    assert horizon == 5 and "optim.schedule_steps=10" in message
    assert schedule_horizon(10, {"schedule": "constant"}, 5) == (5, None)
    with pytest.raises(ValueError, match="optim.schedule_steps must be None or an int >= 1, got 0"):
        schedule_horizon(10, {"schedule_steps": 0}, None)


def test_help_names_a_config_that_exists(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    named = re.findall(r"configs/\w+\.py", capsys.readouterr().out)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert named and all(os.path.isfile(os.path.join(root, path)) for path in named)


def test_cli_rejects_a_misspelt_nested_key_before_training(tmp_path, capsys):
    config_path = tmp_path / "tiny.py"
    config_path.write_text("def get_config():\n    return " + repr(_checkpointed(tmp_path)) + "\n")
    with pytest.raises(SystemExit) as info:
        main(["--config", str(config_path), "train.stpes=5", "--quiet"])
    assert info.value.code == 2
    assert "unknown key 'train.stpes'; did you mean 'train.steps'?" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
