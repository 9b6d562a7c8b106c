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

from typing import Callable, Mapping, Sequence

from jax import lax

from jattn.core import checks

IMPLS = checks.IMPLS


def resolve_impl(impl: str, choices: Sequence[str] = IMPLS) -> str:
    """The one impl resolution of every op: validates ``impl`` and names the implementation whose *static*
    policy (tile geometry, padding, block-size legality) a call must follow.

    ``"auto"`` resolves to ``"pallas"``: ``auto`` is decided only when the program is lowered, so its static
    geometry must be legal for the kernels (the xla paths accept any). Every other choice is itself.

    Args:
      impl: the op's ``impl=`` argument.
      choices: the impls the op accepts (default ``("auto", "pallas", "xla", "reference")``; an op with more
        forms, such as linear attention's ``"recurrent"``, passes its own tuple).

    Returns:
      ``"pallas"`` for ``"auto"``, else ``impl``.

    Raises:
      ValueError: ``impl`` is not one of ``choices``.
    """
    checks.check_choice("impl", impl, choices)
    return "pallas" if impl == "auto" else impl


def run_impl(impl: str, args: tuple, *, xla: Callable, pallas: Callable, reference: Callable | None = None,
             extra: Mapping[str, Callable] | None = None, choices: Sequence[str] = IMPLS):
    """Calls the implementation ``impl`` names on ``args`` (a tuple of pytrees of arrays; None allowed).

    Every callable takes ``*args`` and returns the same shapes and dtypes.

    Args:
      impl: ``"auto"`` (staged with ``lax.platform_dependent``: ``xla`` on cpu, ``pallas`` elsewhere) or the
        name of one implementation.
      args: the arrays every implementation takes.
      xla: the pure-JAX path.
      pallas: the Pallas kernel path.
      reference: the dense oracle (``impl="reference"``), if the op routes it here.
      extra: further named implementations (e.g. ``{"recurrent": ...}``).
      choices: the impls the op accepts.

    Returns:
      What the chosen implementation returns.

    Raises:
      ValueError: ``impl`` is not one of ``choices``, or names an implementation not given here.
    """
    resolve_impl(impl, choices)
    if impl == "auto":
        return lax.platform_dependent(*args, cpu=xla, default=pallas)
    table = {"xla": xla, "pallas": pallas}
    if reference is not None:
        table["reference"] = reference
    table.update(extra or {})
    if impl not in table:
        raise ValueError(f"impl={impl!r} is not available here; choose one of {sorted(table)} or 'auto'")
    return table[impl](*args)
