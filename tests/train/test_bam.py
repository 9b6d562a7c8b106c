"""train.bam (the P36 BAM experiment): a few steps of its machinery on a tiny model.

Mutations each test catches:
* test_config_is_checked: an unknown key or variant silently ignored; an odd batch (no half per domain) accepted.
* test_domains_split_comments_from_code: a comment line left in the code domain (or the reverse).
* test_merged_models_average_or_upcycle_the_branches: ``avg`` taking one branch instead of the mean; ``bam``
  built from the seed model instead of the branches; the MoE's routers copied from a branch.
* test_a_tiny_run_reports_paired_rows: the gap taken against another seed's baseline (unpaired); the MoE's
  parameter count equal to the dense one (experts not stacked).
"""
import jax
import numpy as np
import pytest

from train import bam as T

TINY = dict(seq_len=8, dim=8, layers=1, heads=2, mlp_dim=8, batch=4, seed_steps=1, branch_steps=1, further_steps=2,
            early=1, warmup=1, eval_batches=1, eval_batch=2, max_bytes=60_000, impl="xla")


def test_config_is_checked():
    assert T.check_config({})["variants"] == "avg,bam"
    with pytest.raises(ValueError, match="stepz"):
        T.check_config({"stepz": 3})
    with pytest.raises(ValueError, match="variants"):
        T.check_config({"variants": "avg,moe"})
    with pytest.raises(ValueError, match="batch"):
        T.check_config({"batch": 5})


def test_domains_split_comments_from_code():
    doms = T.domains(8, 60_000)
    comments = doms["comments"].splits["train"].tobytes().split(b"\n")
    code = doms["code"].splits["train"].tobytes().split(b"\n")
    assert all(ln.lstrip().startswith(b"#") for ln in comments[:-1] if ln)
    assert not any(ln.lstrip().startswith(b"#") for ln in code)
    b = T.batch_for(doms, "mixed", 0, 1, 0, 4)
    assert b["inputs"].shape == (4, 8)


def test_merged_models_average_or_upcycle_the_branches():
    cfg = T.check_config(dict(TINY))
    branches = [T.make_model(cfg, 1, seed=s) for s in (0, 1)]
    avg = T.merged_model("avg", branches, cfg, seed=0)
    want = (branches[0].blocks[0].moa.wq[...] + branches[1].blocks[0].moa.wq[...]) / 2
    np.testing.assert_allclose(avg.blocks[0].moa.wq[...], want, rtol=1e-6)
    moe = T.merged_model("bam", branches, cfg, seed=0)
    np.testing.assert_array_equal(moe.blocks[0].moa.wq[...][1], branches[1].blocks[0].moa.wq[...][0])
    fresh = T.make_model(cfg, 2, seed=77)
    np.testing.assert_array_equal(moe.blocks[0].moa.router[...], fresh.blocks[0].moa.router[...])
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 256)
    assert np.all(np.isfinite(moe(tokens)[0]))


def test_a_tiny_run_reports_paired_rows():
    cfg = T.check_config(dict(TINY, variants="avg,bam"))
    rows = T.run_seed(0, cfg, ["avg", "bam"])
    assert [r["variant"] for r in rows] == ["avg", "bam"]
    assert all(np.isfinite(r[k]) for r in rows for k in ("eval_ce", "ce_at_0", "ce_early"))
    assert rows[1]["params"] > rows[0]["params"]
    fake = [dict(rows[0], seed=0, eval_ce=2.0), dict(rows[0], seed=1, eval_ce=3.0),
            dict(rows[1], seed=0, eval_ce=1.5), dict(rows[1], seed=1, eval_ce=3.1)]
    s = T.summarize(fake)
    assert s["bam"]["gap_mean"] == pytest.approx(-0.2) and "ce_early_gap_mean" in s["bam"]
