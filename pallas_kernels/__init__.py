"""Portable Pallas kernels (no policy: callers validate and pick defaults). See DESIGN.md, "Kernels"."""
from pallas_kernels.attention import flash_attention

__all__ = ["flash_attention"]
