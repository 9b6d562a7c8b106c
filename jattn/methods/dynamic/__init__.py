"""The dynamic-sparse family: selectors that read q and k and hand the block-sparse kernel a ``BlockMask``.

Each method is a pure, jit-able selector ``<name>_block_mask(q, k, *, <block sizes>, <paper params>) ->
BlockMask`` (all sizes and budgets static, so every shape is static) and ``<name>_attention(q, k, v, ...)``
= the selector plus ``jattn.block_sparse_attention(..., causal=True)``. ``jattn.eval.sparse_quality``
measures any of them (density, recall of the dense attention mass, error, times); ``synthetic`` builds
long inputs with sinks, stripes, a local band and slashes to measure them on (``benchmarks/cpu_dynamic.py``).
One file per paper; the entry points are re-exported here.
"""
from jattn.methods.dynamic import flexprefill, hip, synthetic
from jattn.methods.dynamic.flexprefill import (flexprefill_attention, flexprefill_block_mask, flexprefill_select,
                                               jsd)
from jattn.methods.dynamic.hip import hip_attention, hip_block_mask, hip_select
from jattn.methods.dynamic.synthetic import SyntheticLayout, synthetic_long_qkv
