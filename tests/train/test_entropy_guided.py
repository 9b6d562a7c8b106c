"""The P21 experiment's machinery (``python -m train.entropy_guided``) on a tiny model for two steps."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from train import entropy_guided as p21
from train.data import ByteCorpus

TINY = '''
def get_config():
    return {"name": "tiny", "task": {"kind": "text", "seq_len": 16},
            "model": {"kind": "decoder_lm", "dim": 16, "num_layers": 1, "num_heads": 2, "method": "softmax",
                      "method_config": {}},
            "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"},
            "train": {"steps": 2, "batch_size": 4, "log_every": 1, "eval_batches": 1, "progress": False}}


def entropy_guided():
    return {"gamma": 0.2, "lam": 1e-5, "init_temperature": 1.0, "init_threshold": 0.5, "per_position": True,
            "arms": {"ega_code": ("code", 1e-5)}}
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("p21") / "tiny.py"
    path.write_text(TINY)
    return str(path)


def test_weight_zero_at_temperature_one_is_the_baseline_loss_and_the_regulariser_adds_to_it(tiny):
    """The swapped model with lam = 0 scores the baseline's loss (catches a changed model or a leaking term);
    with the code reduction the loss is CE plus a positive penalty (catches a regulariser that never runs)."""
    config, settings = p21.load_settings(tiny)
    corpus = ByteCorpus(16, max_bytes=20_000)
    batch = corpus.batch(0, 0, 4)
    base_loss, base_metrics = p21.EntropyGuidedTask(corpus, reduction=None, lam=0.0, gamma=0.2).loss(
        p21.build_model(config, settings, "baseline", 0), batch)
    model = p21.build_model(config, settings, "ega_code", 0)
    zero_loss, _ = p21.EntropyGuidedTask(corpus, reduction="code", lam=0.0, gamma=0.2).loss(model, batch)
    np.testing.assert_allclose(zero_loss, base_loss, rtol=1e-5)
    loss, metrics = p21.EntropyGuidedTask(corpus, reduction="code", lam=1.0, gamma=0.0).loss(model, batch)
    assert float(metrics["reg"]) > 0 and float(loss) == pytest.approx(float(metrics["ce"] + metrics["reg"]), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        p21.EntropyGuidedTask(corpus, reduction="mean", lam=1.0, gamma=0.2)


def test_the_experiment_runs_and_writes_rows_summary_and_figure(tiny, tmp_path):
    """Two steps of the baseline and one P21 arm: JSON with per-head entropies, the gap and the figure."""
    out, figure = tmp_path / "p21.json", tmp_path / "p21.png"
    assert p21.main(["--config", tiny, "--seeds", "0", "--arms", "baseline,ega_code", "--max-bytes", "20000",
                     "--out", str(out), "--figure", str(figure)]) == 0
    result = json.loads(out.read_text())
    assert [r["arm"] for r in result["rows"]] == ["baseline", "ega_code"]
    assert np.array(result["rows"][1]["head_entropy_share"]).shape == (1, 2)
    assert result["rows"][1]["threshold"] and np.isfinite(result["summary"]["ega_code"]["gap_mean"])
    assert figure.stat().st_size > 0
    with pytest.raises(ValueError, match="unknown arm"):
        p21.main(["--config", tiny, "--arms", "nope"])
