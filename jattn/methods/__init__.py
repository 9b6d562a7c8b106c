"""Paper methods, one file per method: jattn/methods/<family>/<method>.py (docstring names its Pxx id).

``jattn.methods.kv``, ``jattn.methods.linear`` and ``jattn.methods.sparse`` load on first access (``import jattn`` stays light),
and each re-exports its methods' public functions, e.g. ``jattn.methods.sparse.radial_attention``.
"""
import importlib as _importlib

__all__ = ["kv", "linear", "sparse"]


def __getattr__(name):
    if name in __all__:
        return _importlib.import_module(f"jattn.methods.{name}")
    raise AttributeError(f"module 'jattn.methods' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
