"""The demo end to end at a tiny step count: table, JSON results, the loss-curve and MQAR-accuracy PNGs."""
import json

import pytest

from train.demo import METHODS, SMALL, attention_pattern, format_table, main, mqar_ceiling, summarize


def test_demo_writes_results_and_plots(tmp_path, capsys):
    assert main(["--methods", "sliding_window", "--steps", "3", "--mqar-steps", "2", "--out", str(tmp_path),
                 "--quiet"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    row = results["rows"][0]
    assert row["method"] == "sliding_window" and row["tokens_per_second"] > 0 and 0 <= row["mqar_accuracy"] <= 1
    assert row["mqar_ceiling"] == pytest.approx(mqar_ceiling("sliding_window", SMALL))
    assert results["mqar_copy_plateau"] == pytest.approx(0.30)
    assert [step for step, _ in results["mqar_curves"]["sliding_window"]] == [2]
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "mqar_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "MQAR acc" in printed and "1-hop ceil" in printed and "copy plateau 0.300" in printed
    assert "sliding_window" in printed


def test_mqar_ceilings_follow_the_demo_masks():
    ceilings = {name: mqar_ceiling(name, SMALL) for name in METHODS}
    assert ceilings["softmax"] == ceilings["lightning"] == 1.0
    # an 8-key window loses pairs a full mask keeps; 4 sinks win some of them back
    assert ceilings["sliding_window"] < ceilings["sparse(sink+local)"] < 1.0
    with pytest.raises(ValueError, match="method"):
        attention_pattern("mamba", {})


def _row(name, acc, loss=2.0):
    return {"method": name, "seed": 0, "params": 1, "train_loss": 1.0, "eval_loss": loss,
            "tokens_per_second": 1.0, "step_memory_mb": 1.0, "mqar_accuracy": acc, "mqar_ceiling": 1.0,
            "seconds": 1.0}


def test_format_table_has_one_line_per_method():
    assert len(format_table(summarize([_row("m", 0.5), _row("n", 0.5)])).splitlines()) == 4


def test_summarize_gives_mean_and_half_range_over_seeds():
    rows = summarize([_row("m", 0.5, 2.0), {**_row("m", 0.9, 2.2), "seed": 1}, _row("n", 0.3)])
    assert [r["method"] for r in rows] == ["m", "n"]
    assert rows[0]["seeds"] == 2 and rows[0]["mqar_accuracy"] == pytest.approx(0.7)
    assert rows[0]["mqar_accuracy_spread"] == pytest.approx(0.2)
    assert rows[0]["eval_loss"] == pytest.approx(2.1)
    assert "0.700 ± 0.200" in format_table(rows)
