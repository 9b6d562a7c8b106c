"""``score_mod``: a user function that rewrites each attention logit, fused into every attention path.

A score mod is a pure function ``score_mod(score, b, h, q_idx, kv_idx) -> score`` of one logit (float32,
after scale, softcap and bias) and its coordinates (int32: batch ``b``, query head ``h``, query position
``q_idx``, key position ``kv_idx``), as in PyTorch's FlexAttention. It may close over arrays (bias tables,
per-head temperatures); gradients flow to them. Returning ``-inf`` masks the entry.

How it is run, the same way on every impl:

1. ``trace_score_mod`` traces it once on scalars (``jax.make_jaxpr``). That checks the signature and the
   result (a float scalar) before any kernel runs, and lifts every array it closes over, concrete or
   traced, into an explicit ``consts`` tuple: the kernels and the custom VJPs take them as inputs (a
   custom VJP may not close over a traced value, and a Pallas kernel may not close over an array).
2. ``apply_score_mod`` evaluates the traced scalar function over a tile with nested ``jax.vmap``
   (``pallas_kernels.score_mod.vmap_elementwise``): an index array that is constant along an axis is not
   mapped there, so ``slope[h] * (kv_idx - q_idx)`` becomes a broadcast of a ``[bq, 1]`` and a ``[1, bk]``
   term, never a gather per element. Inside the Pallas kernels, ``pallas_kernels.score_mod`` evaluates
   the same jaxpr with the arrays read from kernel refs.

The mod must be elementwise (FlexAttention's contract): it sees one scalar at a time, so Python control
flow on values is an error, as under ``jax.jit``; use ``jnp.where``.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from pallas_kernels import score_mod as score_mod_kernels

__all__ = ["TracedScoreMod", "ScoreModPlan", "trace_score_mod", "apply_score_mod", "is_differentiable"]


@dataclasses.dataclass(frozen=True, eq=False)
class TracedScoreMod:
    """A score mod traced on scalars: ``jaxpr`` has one constvar per array in ``consts`` (kept apart, so the
    static part can ride in a kernel's static config while the arrays travel as operands)."""
    jaxpr: object  # jax.extend.core.Jaxpr with constvars, invars (score, b, h, q_idx, kv_idx)
    name: str

    def scalar_fn(self, consts) -> Callable:
        """``(score, b, h, q_idx, kv_idx) -> score`` on scalars, with ``consts`` substituted."""
        call = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(self.jaxpr, list(consts)))

        def fn(score, b, h, q_idx, kv_idx):
            return call(score, b, h, q_idx, kv_idx)[0]
        return fn


def _describe(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def trace_score_mod(score_mod: Callable, name: str = "score_mod") -> tuple[TracedScoreMod, tuple]:
    """Checks ``score_mod`` and traces it on scalars. Returns ``(traced, consts)``.

    Raises:
      TypeError: ``score_mod`` is not callable, does not take ``(score, b, h, q_idx, kv_idx)``, or does not
        return one float value per score.
    """
    if not callable(score_mod):
        raise TypeError(f"{name} must be a function (score, b, h, q_idx, kv_idx) -> score, got "
                        f"{type(score_mod).__name__}")
    try:
        inspect.signature(score_mod).bind(0, 0, 0, 0, 0)
    except TypeError as e:
        raise TypeError(f"{name} must take five positional arguments (score, b, h, q_idx, kv_idx); "
                        f"{_describe(score_mod)} has signature {inspect.signature(score_mod)}: {e}") from None
    except ValueError:  # builtins without a signature: let the trace decide
        pass
    score = jax.ShapeDtypeStruct((), jnp.float32)
    index = jax.ShapeDtypeStruct((), jnp.int32)
    try:
        closed = jax.make_jaxpr(score_mod)(score, index, index, index, index)
    except jax.errors.ConcretizationTypeError as e:
        raise TypeError(f"{name} must be elementwise and traceable: it branches on a value in Python "
                        f"(use jnp.where): {str(e).splitlines()[0]}") from None
    outs = closed.out_avals
    if len(outs) != 1 or outs[0].shape != () or not jnp.issubdtype(outs[0].dtype, jnp.floating):
        got = ", ".join(f"{a.dtype}{list(a.shape)}" for a in outs)
        raise TypeError(f"{name} must return one float score per score (shape (), float), got {got} from "
                        f"{_describe(score_mod)}")
    jaxpr = closed.jaxpr
    return TracedScoreMod(jaxpr=jaxpr, name=_describe(score_mod)), tuple(closed.consts)


def apply_score_mod(traced: TracedScoreMod, consts, score, b, h, q_idx, kv_idx):
    """``score_mod`` over a tile: ``score`` float32 ``[..., bq, bk]``, the index arrays int32 and broadcastable
    to it. Returns float32 of ``score``'s shape."""
    return score_mod_kernels.apply(traced.jaxpr, consts, score, b, h, q_idx, kv_idx)


def is_differentiable(x) -> bool:
    """Whether a const can carry a gradient (float dtype)."""
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


@dataclasses.dataclass(frozen=True)
class ScoreModPlan:
    """The static half of a score mod inside a custom VJP: the traced function and which of its arrays are
    differentiable (float). ``split`` picks those arrays, ``merge`` puts replacements (their tracers or their
    gradients) back in place."""
    traced: TracedScoreMod
    float_consts: tuple[bool, ...]

    @classmethod
    def of(cls, traced: TracedScoreMod | None, consts) -> "ScoreModPlan | None":
        return None if traced is None else cls(traced, tuple(is_differentiable(c) for c in consts))

    def split(self, consts) -> tuple:
        return tuple(c for c, f in zip(consts, self.float_consts) if f)

    def merge(self, consts, floats) -> tuple:
        floats = iter(floats)
        return tuple(next(floats) if f else c for c, f in zip(consts, self.float_consts))
