"""Every public package imports first, in a fresh interpreter: a circular import shows only when its cycle's
entry module is the first one imported (jattn.nn.attention -> jattn.methods.kv -> x_ecomla -> jattn.nn did,
in one order and not the other). Mutation caught: the KV-method caches imported at the top of
jattn/nn/attention.py."""
import subprocess
import sys

import pytest

PACKAGES = ("jattn", "jattn.nn", "jattn.methods.kv", "jattn.methods.dynamic")


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_first_in_a_fresh_interpreter(package):
    result = subprocess.run([sys.executable, "-c", f"import {package}"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
