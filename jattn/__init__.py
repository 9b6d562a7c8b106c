"""jattn: attention methods in JAX. Users import only this module; everything public is reachable from it.

The ops, masks and BlockMask are imported with ``jattn``; the subpackages ``jattn.nn`` (Flax NNX modules:
``Attention(method=...)``, models) and ``jattn.methods`` (one module per paper method) load on first use,
so ``import jattn`` does not pay for Flax.
"""
import importlib as _importlib

from jattn.core import masks
from jattn.core.block_mask import BlockMask
from jattn.core.masks import materialize
from jattn.core.reference import reference_attention
from jattn.core.softmax import OnlineSoftmax, merge_partials
from jattn.ops.attention import attention
from jattn.ops.block_sparse import block_sparse_attention
from jattn.ops.linear import alibi_log_decay, linear_attention, linear_attention_step, linear_log_decay
from jattn.ops.neighborhood import neighborhood_attention, neighborhood_mask
from jattn.viz import plot_mask

__all__ = [
    "BlockMask", "OnlineSoftmax", "alibi_log_decay", "attention", "block_sparse_attention", "linear_attention",
    "linear_attention_step", "linear_log_decay", "masks", "materialize", "merge_partials", "neighborhood_attention",
    "neighborhood_mask", "plot_mask", "reference_attention", "nn", "methods", "catalog",
]

_LAZY_SUBMODULES = ("nn", "methods", "catalog")


def __getattr__(name):
    """``jattn.nn``, ``jattn.methods`` and ``jattn.catalog`` are imported on first access."""
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"jattn.{name}")
    raise AttributeError(f"module 'jattn' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
