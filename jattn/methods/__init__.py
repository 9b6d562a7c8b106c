"""Paper methods, one file per method: jattn/methods/<family>/<method>.py (docstring names its Pxx id).

``jattn.methods.dynamic``, ``jattn.methods.kv``, ``jattn.methods.linear`` and ``jattn.methods.sparse`` load on first
access (``import jattn`` stays light),
and each re-exports its methods' public functions, e.g. ``jattn.methods.sparse.radial_attention``.
"""
from jattn._lazy import lazy_submodules as _lazy_submodules

__all__ = ["dynamic", "kv", "linear", "sparse"]
__getattr__, __dir__ = _lazy_submodules("jattn.methods", tuple(__all__), globals())
