"""jattn: attention methods in JAX. Users import only this module; everything public is reachable from it.

The ops, masks and BlockMask are imported with ``jattn``; the subpackages ``jattn.nn`` (Flax NNX modules:
``Attention(method=...)``, models) and ``jattn.methods`` (one module per paper method) load on first use,
so ``import jattn`` does not pay for Flax.
"""
from jattn._lazy import lazy_submodules as _lazy_submodules

from jattn.core import masks
from jattn.core.block_mask import BlockMask
from jattn.core.masks import materialize
from jattn.core.reference import reference_attention
from jattn.core.softmax import OnlineSoftmax, merge_partials
from jattn.ops.attention import attention
from jattn.ops.block_sparse import block_sparse_attention
from jattn.ops.decode import decode_attention
from jattn.core.decay import alibi_log_decay, linear_log_decay
from jattn.ops.linear import linear_attention, linear_attention_step
from jattn.ops.neighborhood import neighborhood_attention, neighborhood_mask
from jattn.viz import plot_mask
from jattn import score_mods

__all__ = [
    "BlockMask", "OnlineSoftmax", "alibi_log_decay", "attention", "block_sparse_attention", "decode_attention", "linear_attention",
    "linear_attention_step", "linear_log_decay", "masks", "materialize", "merge_partials", "neighborhood_attention",
    "neighborhood_mask", "plot_mask", "reference_attention", "score_mods", "nn", "methods", "catalog", "cache", "distributed",
]

# jattn.nn, jattn.methods, jattn.catalog, jattn.cache and jattn.distributed import on first access.
__getattr__, __dir__ = _lazy_submodules("jattn", ("nn", "methods", "catalog", "cache", "distributed"), globals())
