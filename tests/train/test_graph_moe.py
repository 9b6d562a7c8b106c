"""train.graph_moe (the P53 experiment): a few steps of its machinery on a tiny model.

Mutations each test catches:
* test_config_is_checked: an unknown key, an unknown gate or fluct_gap >= steps accepted.
* test_variants_of_a_seed_share_their_initial_weights: the similarity gate's W_s drawn before the experts (the
  paired comparison would compare different initialisations).
* test_a_tiny_run_reports_routing_statistics: the standard gate's p~ differing from p; a top-1 share computed over
  the wrong axis (outside [1/E, 1]); the fluctuation gap unpaired (its std would be 0 here).
"""
import numpy as np
import pytest

from train import graph_moe as T
from train.data import ByteCorpus

TINY = dict(seq_len=8, dim=8, layers=1, heads=2, experts=4, hidden=8, batch=2, steps=3, warmup=1, fluct_gap=1,
            eval_batches=1, eval_batch=2, max_bytes=20_000, impl="xla")


def test_config_is_checked():
    assert T.check_config({})["top_k"] == 1
    with pytest.raises(ValueError, match="stepz"):
        T.check_config({"stepz": 3})
    with pytest.raises(ValueError, match="variants"):
        T.check_config({"variants": "standard,graph"})
    with pytest.raises(ValueError, match="fluct_gap"):
        T.check_config({"steps": 5, "fluct_gap": 5})


def test_variants_of_a_seed_share_their_initial_weights():
    kw = dict(seed=2, dim=8, layers=2, heads=2, experts=4, hidden=8)
    a, b = T.GraphMoELM(gate="standard", **kw), T.GraphMoELM(gate="similarity", **kw)
    for blk_a, blk_b in zip(a.blocks, b.blocks):
        np.testing.assert_array_equal(blk_a.moe.w_up[...], blk_b.moe.w_up[...])
        np.testing.assert_array_equal(blk_a.attention.query.kernel[...], blk_b.attention.query.kernel[...])
    assert b.blocks[0].moe.w_s is not None and a.blocks[0].moe.w_s is None


def test_a_tiny_run_reports_routing_statistics():
    cfg = T.check_config(dict(TINY))
    corpus = ByteCorpus(8, max_bytes=20_000)
    rows = [T.train_run(g, seed=0, corpus=corpus, cfg=cfg) for g in ("standard", "attention")]
    for r in rows:
        assert np.isfinite(r["eval_ce"]) and 0.0 <= r["fluctuation"] <= 1.0 and 0.25 <= r["max_share"] <= 1.0
    assert rows[0]["entropy_tilde"] == pytest.approx(rows[0]["entropy_own"])
    fake = [dict(rows[0], seed=0, fluctuation=0.2), dict(rows[0], seed=1, fluctuation=0.4),
            dict(rows[1], seed=0, fluctuation=0.1), dict(rows[1], seed=1, fluctuation=0.5)]
    s = T.summarize(fake)
    assert s["attention"]["fluct_diff_mean"] == pytest.approx(0.0)
    assert s["attention"]["fluct_diff_std"] == pytest.approx(np.std([-0.1, 0.1], ddof=1))
