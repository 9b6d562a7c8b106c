"""How every op picks its implementation: ``impl="auto" | "pallas" | "xla" | "reference"``.

``"auto"`` is decided when the program is *lowered*, not when it is traced: it stages the xla path for
``cpu`` and the Pallas kernels for every other platform (``jax.lax.platform_dependent``), and the Pallas
kernels in turn pick Triton (``cuda``/``rocm``) or Mosaic (``tpu``). So one traced program, exported from a
CPU host with ``jax.export(..., platforms=["cuda"])`` or ``["tpu"]``, holds the real kernel, and the same
program run on the CPU runs the xla path.

``"pallas"`` forces the kernels (on CPU they run in the Pallas interpreter: slow, for tests); ``"xla"`` the
pure-JAX path on every platform; ``"reference"`` the dense float32 oracle.
"""
from __future__ import annotations

from typing import Callable

from jax import lax

from jattn.core import checks

IMPLS = checks.IMPLS


def run_impl(impl: str, args: tuple, *, xla: Callable, pallas: Callable, reference: Callable | None = None,
             choices=IMPLS):
    """Calls the implementation ``impl`` names on ``args`` (a tuple of pytrees of arrays; None allowed).

    Every callable takes ``*args`` and returns the same shapes and dtypes.
    """
    checks.check_choice("impl", impl, choices)
    if impl == "auto":
        return lax.platform_dependent(*args, cpu=xla, default=pallas)
    table = {"xla": xla, "pallas": pallas}
    if reference is not None:
        table["reference"] = reference
    if impl not in table:
        raise ValueError(f"impl={impl!r} is not available here; choose one of {sorted(table)} or 'auto'")
    return table[impl](*args)


def auto_is_pallas(impl: str) -> bool:
    """For policy that must be static (tile geometry): whether an impl will run the Pallas kernels.

    ``"auto"`` counts as Pallas: its geometry must be legal for the kernels, and the xla paths accept any.
    """
    return impl in ("auto", "pallas")
