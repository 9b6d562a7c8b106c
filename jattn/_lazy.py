"""Subpackages that load on first attribute access (PEP 562), so ``import jattn`` does not pay for Flax."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_submodules(package: str, names: tuple[str, ...], namespace: dict) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package`` that import ``package.<name>`` for each of ``names`` on
    first access; ``namespace`` is the package's ``globals()``."""
    def __getattr__(name):
        if name in names:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
