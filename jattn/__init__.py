"""jattn: attention methods in JAX. Users import only this module; everything public is re-exported here."""
from jattn.core.reference import reference_attention
from jattn.core.softmax import merge_partials, OnlineSoftmax
from jattn.core import masks

__all__ = ["reference_attention", "merge_partials", "OnlineSoftmax", "masks"]
