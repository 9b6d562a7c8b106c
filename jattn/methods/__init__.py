"""Paper methods, one file per method: jattn/methods/<family>/<method>.py (docstring names its Pxx id).

The family packages (``analysis``, ``dynamic``, ``generative``, ``kv``, ``linear``, ``modifiers``, ``objectives``,
``routing``, ``sparse``, ``vision``) load on first access (``import jattn`` stays light),
and each re-exports its methods' public functions, e.g. ``jattn.methods.sparse.radial_attention``.
"""
from jattn._lazy import lazy_submodules as _lazy_submodules

__all__ = ["analysis", "dynamic", "generative", "kv", "linear", "modifiers", "objectives", "routing", "sparse",
           "vision"]
__getattr__, __dir__ = _lazy_submodules("jattn.methods", tuple(__all__), globals())
