"""The demo end to end at a tiny step count: table, JSON results and the loss-curve PNG."""
import json

from train.demo import format_table, main


def test_demo_writes_results_and_plot(tmp_path, capsys):
    assert main(["--methods", "sliding_window", "--steps", "3", "--mqar-steps", "2", "--out", str(tmp_path),
                 "--quiet"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    row = results["rows"][0]
    assert row["method"] == "sliding_window" and row["tokens_per_second"] > 0 and 0 <= row["mqar_accuracy"] <= 1
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "MQAR acc" in printed and "sliding_window" in printed


def test_format_table_has_one_line_per_method():
    row = {"method": "m", "params": 1, "train_loss": 1.0, "eval_loss": 1.0, "tokens_per_second": 1.0,
           "step_memory_mb": 1.0, "mqar_accuracy": 0.5, "seconds": 1.0}
    assert len(format_table([row, {**row, "method": "n"}]).splitlines()) == 4
