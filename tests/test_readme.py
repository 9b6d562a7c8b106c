"""The README runs as written: every ```python block executes on its own, in a fresh namespace."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_in_a_fresh_namespace(index):
    namespace = {"__name__": f"readme_block_{index}"}
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), namespace)


def test_the_install_line_names_the_real_extras():
    text = README.read_text()
    assert "pip install -e ." in text
    pyproject = (README.parent / "pyproject.toml").read_text()
    for extra in re.findall(r"pip install -e '\.\[(\w+)\]'", text):
        assert re.search(rf"^{extra} = \[", pyproject, flags=re.M), extra
