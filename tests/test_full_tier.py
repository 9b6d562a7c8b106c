"""The rule that splits ``make test`` from ``make test-all`` (tests/full_tier.py)."""
from tests import full_tier

LOG = """
============================= slowest durations ==============================
9.00s call     tests/ops/test_x.py::test_sweep[pallas-bf16]
5.00s call     tests/ops/test_x.py::test_sweep[xla-bf16]
0.50s setup    tests/ops/test_x.py::test_sweep[xla-bf16]
3.00s call     tests/ops/test_x.py::test_sweep[xla-f32]
4.00s call     tests/ops/test_x.py::test_sweep[pallas-f32]
1.80s call     tests/ops/test_x.py::test_sweep[mosaic-f32]
1.90s call     tests/ops/test_x.py::test_sweep[f32-mosaic]
30.00s call    tests/ops/test_x.py::test_single_but_slow
4.00s call     tests/train/test_loop.py::test_resume
4.00s call     tests/train/test_diffusion.py::test_runs[ddpm 2 steps]
"""


def test_durations_sum_phases_and_keep_ids_with_spaces():
    seconds = full_tier.read_durations(LOG)
    assert seconds["tests/ops/test_x.py::test_sweep[xla-bf16]"] == 5.5
    assert "tests/train/test_diffusion.py::test_runs[ddpm 2 steps]" in seconds


def test_every_parameter_value_keeps_its_cheapest_variant_and_singles_and_machinery_stay():
    chosen = full_tier.full_tier(full_tier.read_durations(LOG))
    # cheapest first: mosaic-f32 and f32-mosaic (under 2 s, the second a pure repeat), xla-f32 (new: xla), pallas-f32 (new: pallas), xla-bf16 (new: bf16)
    # stay; pallas-bf16 only repeats covered values and costs 9 s. Catches: the cheapest dropped, a new value
    # not counted as new, the 2 s floor ignored, singles or KEEP_TRAIN moved out, train runs kept.
    assert chosen == ["tests/ops/test_x.py::test_sweep[pallas-bf16]",
                      "tests/train/test_diffusion.py::test_runs[ddpm 2 steps]"]


def test_the_list_names_only_collected_looking_node_ids():
    listed = full_tier.LIST_PATH.read_text().splitlines()
    assert listed == sorted(listed) and all(node.startswith("tests/") and "::" in node for node in listed)
