"""The API reference site builds without a single warning (``make docs`` = ``mkdocs build --strict``).

A docstring mkdocstrings cannot parse, a broken link or image, a table marker the hook does not know, or
an object that moved without its page being updated fails this test. Skipped only when mkdocs is not
installed (``pip install -e '.[docs]'``; ``make install`` installs it).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, JAX_PLATFORMS="cpu", NO_MKDOCS_2_WARNING="1")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                             str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert "WARNING" not in result.stderr, result.stderr
    return out


def test_strict_build_renders_every_page(site):
    for page in ("index", "backends", "tiles", "semantics", "block_mask", "methods", "contributing",
                 "experiments", "api/ops", "api/core", "api/nn", "api/viz", "api/methods", "api/kernels"):
        assert (site / f"{page}.html").is_file(), f"{page}.html was not built"
    ops = (site / "api" / "ops.html").read_text()
    for name in ("block_sparse_attention", "linear_attention", "neighborhood_attention"):
        assert f'id="jattn.{name}"' in ops, f"jattn.{name} has no rendered docstring"


def test_generated_tables_and_pictures_are_in_the_site(site):
    methods = (site / "methods.html").read_text()
    from jattn.nn import available_methods
    for name in available_methods():
        assert f"<code>{name}</code>" in methods, f"method {name!r} is missing from the methods table"
    for page in site.rglob("*.html"):
        assert "<!-- jattn:" not in page.read_text(), f"{page.name}: a table marker was not rendered"
    block_mask = (site / "block_mask.html").read_text()
    pictures = re.findall(r'src="(img/[^"]+\.png)"', block_mask)
    assert len(pictures) >= 8, pictures
    for src in pictures:
        assert (site / src).is_file() and (ROOT / "docs" / src).stat().st_size < 100_000, src
    contributing = (site / "contributing.html").read_text()
    assert "Adding a kernel" in contributing and "poison_outputs" in contributing
