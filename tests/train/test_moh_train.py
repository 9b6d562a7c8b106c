"""train.moh (the P02 MoH experiment): a few steps of its machinery on a tiny model.

Mutations each test catches:
* test_variants_share_projections_and_budgets: use_moh drawing fresh projections (the paired comparison lost);
  a head budget of the wrong size (e.g. top_k = E).
* test_gathered_core_flops_follow_the_active_fraction: the gathered core computing all T rows of a routed head.
* test_a_few_steps_train_and_report: the active fraction counted over routed heads only; the capacity FLOP
  fraction with capacity_factor != 1; the summary's gap taken against the wrong seed's MHA (unpaired mean).
"""
import numpy as np
import pytest

from jattn.methods.routing import MoHAttention
from train.data import ByteCorpus
from train.moh import build_model, core_flop_ratios, head_budget, main, summarize, train_run


def test_variants_share_projections_and_budgets():
    """moh75 / moh50 of a seed keep MHA's projections of that seed; budgets are 6/8 and 4/8 heads."""
    assert head_budget("mha", 8) is None
    assert head_budget("moh75", 8) == (4, 2) and head_budget("moh50", 8) == (2, 2)
    with pytest.raises(ValueError, match="variant"):
        head_budget("moe", 8)
    kw = dict(seed=3, dim=16, layers=1, heads=4, impl="reference")
    mha, moh = build_model("mha", **kw), build_model("moh75", **kw)
    assert isinstance(moh.blocks[0].attention, MoHAttention)
    np.testing.assert_array_equal(moh.blocks[0].attention.query.kernel[...], mha.blocks[0].attention.query.kernel[...])
    np.testing.assert_array_equal(moh.embed.embedding[...], mha.embed.embedding[...])


def test_a_few_steps_train_and_report():
    """Two steps of moh50: finite losses, the active fraction equals its budget (1 shared + top-1 of 3 = 2 of 4
    heads), the load-balance loss is >= top_k (its minimum), and the summary pairs the gaps by seed."""
    corpus = ByteCorpus(16, max_bytes=20_000)
    row = train_run("moh50", seed=0, corpus=corpus, steps=2, batch=2, lr=1e-3, warmup=1, dim=16, layers=1, heads=4,
                    impl="reference", eval_batches=1, eval_batch=2)
    assert np.isfinite(row["eval_ce"]) and np.isfinite(row["final_train_ce"])
    assert row["active_fraction"] == pytest.approx(0.5)
    assert row["final_aux"] >= 1.0 - 1e-4
    assert row["capacity_flop_fraction"] == pytest.approx((1 * 16 + 3 * 6) / 64)
    mha = [dict(row, variant="mha", seed=0, eval_ce=2.0), dict(row, variant="mha", seed=1, eval_ce=3.0)]
    moh = [dict(row, seed=0, eval_ce=2.5), dict(row, seed=1, eval_ce=3.1)]
    s = summarize(mha + moh)
    assert s["moh50"]["gap_mean"] == pytest.approx(0.3) and s["moh50"]["eval_ce_mean"] == pytest.approx(2.8)


def test_main_rejects_an_unknown_variant_before_training():
    with pytest.raises(ValueError, match="variant"):
        main(["--variants", "mha,moe", "--steps", "1"])


def test_gathered_core_flops_follow_the_active_fraction():
    """The compiled FLOPs of the capacity core over the all-heads core match (h_s T + E C) / (H T) within 10 %
    (the gather and scatter add a little at T = 32)."""
    ratios = core_flop_ratios(32, 4, 8, variants=("moh50",))
    r = ratios["moh50"]
    assert r["capacity"] == 11 and r["measured"] == pytest.approx(r["analytic"], rel=0.1)
    assert r["measured"] < 0.6
