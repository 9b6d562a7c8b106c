"""The catalogue stays honest: 75 unique papers, and every partial/works row's entry points import and its
tests exist."""
import pathlib

import pytest

from jattn.catalog import PAPERS, STATUSES, format_table, resolve
from jattn.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_all_75_papers_once():
    assert [p.id for p in PAPERS] == [f"P{i:02d}" for i in range(75)]
    assert all(p.status in STATUSES and p.name and p.title and p.family for p in PAPERS)


@pytest.mark.parametrize("paper", [p for p in PAPERS if p.status != "planned"], ids=lambda p: p.id)
def test_claimed_rows_have_importable_entry_points_and_existing_tests(paper):
    assert paper.entry_points and paper.tests
    for dotted in paper.entry_points:
        assert callable(resolve(dotted)), dotted
    for path in paper.tests:
        assert (ROOT / path).is_file(), path


def test_planned_rows_claim_nothing():
    assert all(not p.entry_points and not p.tests for p in PAPERS if p.status == "planned")


def test_papers_command_prints_the_table(capsys):
    assert main(["papers", "--status", "partial"]) == 0
    printed = capsys.readouterr().out
    assert "P74" in printed and "P31" not in printed   # P31 is "works", not "partial"
    assert format_table().splitlines()[-1].startswith("75 papers")


def test_papers_command_names_each_papers_attention_method(capsys):
    assert main(["papers"]) == 0
    rows = {line[:3]: line for line in capsys.readouterr().out.splitlines() if line[:1] == "P"}
    assert "radial" in rows["P04"] and "sinklora_s2, sinklora_sf" in rows["P70"] and "neighborhood" in rows["P60"]
    for paper in PAPERS:
        for name in paper.layer_methods:
            assert name in rows[paper.id]
    assert main(["papers", "--status", "works", "--methods"]) == 0
    printed = capsys.readouterr().out
    assert "radial: P04" in printed and "frames (required)" in printed and "window (required)" in printed
