"""Writes ``tests/full_tier.txt``: the tests that only ``make test-all`` runs, chosen by rule from measured times.

``make test`` (the README's command, and CI's) runs every test except the ones listed there, so that it stays
inside CI's time on a 2-core machine while the method count grows. Two rules, nothing hand-picked:

* **End-to-end experiment runs** (``tests/train/``: a few real steps of a training script, its table and its
  figure) are full tier, except the shared training machinery the library's users run directly
  (``KEEP_TRAIN``: the loop with its orbax resume, the main job, config parsing, data, the MQAR bounds).
* **Sweep variants**: a parametrised test keeps, cheapest first, every variant that exercises a parameter value
  (a ``-``-separated token of its id) no cheaper variant has exercised, and every variant under
  ``VARIANT_SECONDS``; the rest are full tier. So every test function runs in CI, every value of each of its
  parameters (each impl, each case of a feature table, each README block, each registered method, each lowering
  target) runs in CI at least once, and only costly repeats of already-covered values wait for ``make test-all``.
  Non-parametrised tests always run in CI.

Usage (after a full run that printed every duration)::

    make test-durations            # make test-all with --durations=0, into runs/test_durations.log
    python -m tests.full_tier runs/test_durations.log
"""
from __future__ import annotations

import collections
import pathlib
import re
import sys

VARIANT_SECONDS = 2.0
KEEP_TRAIN = {"test_loop.py", "test_demo.py", "test_config_data.py", "test_mqar_bounds.py", "test_images.py"}
LIST_PATH = pathlib.Path(__file__).with_name("full_tier.txt")
_DURATION = re.compile(r"\s*([\d.]+)s (?:call|setup|teardown)\s+(.+?)\s*$")


def read_durations(log_text: str) -> dict[str, float]:
    """Seconds per test node id (setup + call + teardown) from pytest's ``--durations=0`` report."""
    seconds: dict[str, float] = collections.defaultdict(float)
    for line in log_text.splitlines():
        match = _DURATION.match(line)
        if match:
            seconds[match.group(2)] += float(match.group(1))
    return dict(seconds)


def full_tier(seconds: dict[str, float]) -> list[str]:
    """The node ids the two rules above move out of ``make test``."""
    variants: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
    for node, s in seconds.items():
        variants[node.split("[")[0]].append((s, node))
    chosen = []
    for function, runs in variants.items():
        path = pathlib.PurePosixPath(function.split("::")[0])
        if path.parts[:2] == ("tests", "train") and path.name not in KEEP_TRAIN:
            chosen += [node for _, node in runs]
        elif any("[" in node for _, node in runs):
            chosen += _repeats(runs)
    return sorted(chosen)


def _repeats(runs: list[tuple[float, str]]) -> list[str]:
    """The variants of one parametrised test whose every parameter value a cheaper variant already covers,
    and which took more than ``VARIANT_SECONDS``."""
    covered: set[str] = set()
    repeats = []
    for s, node in sorted(runs):
        values = set(node[node.index("[") + 1:node.rindex("]")].split("-"))
        if values - covered or s <= VARIANT_SECONDS:
            covered |= values
        else:
            repeats.append(node)
    return repeats


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m tests.full_tier <pytest --durations=0 log>")
    seconds = read_durations(pathlib.Path(argv[0]).read_text())
    if not seconds:
        raise SystemExit(f"{argv[0]}: no pytest durations in it (run with --durations=0)")
    chosen = full_tier(seconds)
    leaving = set(chosen)
    kept = sum(s for node, s in seconds.items() if node not in leaving)
    LIST_PATH.write_text("".join(f"{node}\n" for node in chosen))
    print(f"{LIST_PATH}: {len(chosen)} of {len(seconds)} timed tests; make test keeps {kept:.0f} of "
          f"{sum(seconds.values()):.0f} test-seconds")


if __name__ == "__main__":
    main(sys.argv[1:])
