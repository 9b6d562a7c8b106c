"""Record what every ``jattn.nn.Attention`` layer's attention core receives, without changing model code.

::

    with jattn.nn.capture.attention_inputs(probs=True) as records:
        model(tokens)                       # eager: not under jit / grad / vmap
    records[0].q, records[0].k, records[0].v, records[0].probs

Inside the context, every call of an :class:`~jattn.nn.Attention` layer (any model that uses it:
``DecoderLM``, ``BertEncoder``, ``ViT``, ``TransformerBlock``...) appends one :class:`AttentionRecord` in call
order: the layer input ``x``, the ``q [B, T, H, D]``, ``k, v [B, S, Hkv, D]`` that ``Attention.project``
returned (after the projections and RoPE: exactly the arrays handed to the layer's method core), the
``mask``, ``causal``, ``scale``, ``method`` and ``method_config`` the core was called with, and the layer's
output. ``jattn.attention(q, k, v, causal=r.causal, mask=r.mask, scale=r.scale)`` followed by
``r.layer.finish(r.x, out)`` reproduces ``r.output`` for the softmax method.

How: on entry the context wraps ``Attention.__call__`` and ``Attention.project`` *on the class* (so every
instance, existing or created inside the context, is seen) and puts the originals back on exit, also when
the body raises. Contexts may nest; every active context records every call, and the class is restored
when the outermost one exits. Nothing is recorded outside a context.

The probability map (``probs=True``): when the caller already asked for ``return_probs`` the returned map
is stored; otherwise the method's own map is computed by a second, separate call of the method's core
(``spec.apply(..., return_probs=True)``) on the recorded q, k, v, so the model's output path is never
changed. Methods without a probability map (``supports_probs=False``) record ``probs=None``.

Limits, deliberate:

* **Eager only.** Under ``jax.jit`` / ``nnx.jit`` (or ``grad``, ``vmap``) the layer sees tracers, which must
  not escape the trace: a traced call inside the context raises ``RuntimeError`` (call the model eagerly,
  or capture outside the jitted function).
* Decoding calls (``decode=True``) are recorded with ``decode=True``: their ``k, v`` are the *new* tokens'
  keys and values only (the core attends over the whole cache), and ``probs`` is stored only when the
  caller asked for ``return_probs``.
* Subclasses that override ``__call__`` without calling ``Attention.__call__`` are not seen.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any, Iterator

import jax.numpy as jnp

from jattn.core import checks
from jattn.nn.attention import Attention
from jattn.nn.attention_maps import streamed_sink_metric

__all__ = ["AttentionRecord", "attention_inputs", "records_sink_metric"]


@dataclasses.dataclass
class AttentionRecord:
    """One call of one ``Attention`` layer (see the module docstring)."""
    index: int                    # call order inside the context (0, 1, ...)
    layer: Attention              # the layer object that was called
    method: str
    method_config: dict
    causal: bool
    scale: float | None
    mask: Any                     # the mask the core received (None, or a bool array broadcastable to [B, H, T, S])
    decode: bool
    x: Any                        # layer input [B, T, dim]
    q: Any = None                 # [B, T, H, D], after projection and RoPE
    k: Any = None                 # [B, S, Hkv, D]
    v: Any = None                 # [B, S, Hkv, D]
    probs: Any = None             # [B, H, T, S] when asked for (and the method has a map)
    output: Any = None            # the layer's output [B, T, dim]


class _State(threading.local):
    def __init__(self):
        self.recorders: list[tuple[list, bool]] = []   # active contexts: (records, want_probs)
        self.pending: list[AttentionRecord] = []       # the layer call in progress (project fills it)


_STATE = _State()
_LOCK = threading.Lock()
_PATCH = {"depth": 0, "call": None, "project": None}


def _traced_error(where: str) -> RuntimeError:
    return RuntimeError(f"jattn.nn.capture.attention_inputs records eagerly only, but {where} received traced "
                        "arrays (the layer runs under jit, grad or vmap); call the model eagerly inside the "
                        "context, or leave the jitted function outside it")


def _wrapped_project(original):
    @functools.wraps(original)
    def project(self, x, positions):
        q, k, v = original(self, x, positions)
        if _STATE.recorders and _STATE.pending and _STATE.pending[-1].layer is self and _STATE.pending[-1].q is None:
            if checks.is_traced((q, k, v)):
                raise _traced_error("Attention.project")
            record = _STATE.pending[-1]
            record.q, record.k, record.v = q, k, v
        return q, k, v
    return project


def _wrapped_call(original):
    @functools.wraps(original)
    def call(self, x, *, mask=None, positions=None, return_probs: bool = False, decode: bool = False,
             prefill: bool = False):
        if not _STATE.recorders:
            return original(self, x, mask=mask, positions=positions, return_probs=return_probs, decode=decode,
                            prefill=prefill)
        if checks.is_traced(x):
            raise _traced_error("an Attention layer")
        record = AttentionRecord(index=-1, layer=self, method=self.method, method_config=dict(self.method_config),
                                 causal=True if decode else self.causal, scale=self.scale, mask=mask,
                                 decode=bool(decode), x=x)
        _STATE.pending.append(record)
        try:
            result = original(self, x, mask=mask, positions=positions, return_probs=return_probs, decode=decode,
                              prefill=prefill)
        finally:
            _STATE.pending.pop()
        out, probs = result if return_probs else (result, None)
        record.output = out
        want_probs = any(want for _, want in _STATE.recorders)
        if return_probs:
            record.probs = probs
        elif want_probs and not decode and self.spec.supports_probs and record.q is not None:
            # a separate call of the method's core: the model's own output path stays untouched
            _, record.probs = self.spec.apply(record.q, record.k, record.v, causal=self.causal, mask=mask,
                                              scale=self.scale, return_probs=True, **self.method_config)
        for records, want in _STATE.recorders:
            entry = record if want or record.probs is None else dataclasses.replace(record, probs=None)
            records.append(dataclasses.replace(entry, index=len(records)))
        return result
    return call


def _patch() -> None:
    with _LOCK:
        if _PATCH["depth"] == 0:
            _PATCH["call"], _PATCH["project"] = Attention.__dict__["__call__"], Attention.__dict__["project"]
            Attention.__call__ = _wrapped_call(_PATCH["call"])
            Attention.project = _wrapped_project(_PATCH["project"])
        _PATCH["depth"] += 1


def _unpatch() -> None:
    with _LOCK:
        _PATCH["depth"] -= 1
        if _PATCH["depth"] == 0:
            Attention.__call__ = _PATCH["call"]
            Attention.project = _PATCH["project"]
            _PATCH["call"] = _PATCH["project"] = None


@contextlib.contextmanager
def attention_inputs(*, probs: bool = False) -> Iterator[list[AttentionRecord]]:
    """Records every ``jattn.nn.Attention`` call made (eagerly) inside the ``with`` block.

    Args:
      probs: also store each call's attention probability map ``[B, H, T, S]`` (a second call of the
        method's core when the caller did not ask for ``return_probs``; ``None`` for methods without one).

    Yields:
      The list that receives one :class:`AttentionRecord` per layer call, in call order. It stays valid
      (and stops growing) after the block.

    Raises:
      TypeError: ``probs`` is not a bool.
      RuntimeError: (inside the block) a layer was called under jit / grad / vmap.
    """
    probs = checks.check_bool("probs", probs)
    records: list[AttentionRecord] = []
    entry = (records, probs)
    _patch()
    _STATE.recorders.append(entry)
    try:
        yield records
    finally:
        # remove this context's entry (by identity: nested contexts may exit in any order on errors)
        _STATE.recorders[:] = [r for r in _STATE.recorders if r is not entry]
        _unpatch()


def records_sink_metric(records: list[AttentionRecord], *, eps: float = 0.3, position: int = 0):
    """P50's sink metric of every recorded layer call, through each layer's own attention core (P50 on the hooks).

    Each record's ``q, k`` go back through the method core the layer ran (``layer.spec.apply`` with the
    recorded mask, causality, scale and ``method_config``: a ``score_mod`` or ``prob_mod`` method, e.g. ACT or
    entropy scaling, is measured as the model applies it), with one-hot values
    (``jattn.nn.attention_maps.streamed_sink_metric``), so no ``[T, S]`` map is formed.

    Args:
      records: from ``attention_inputs()`` (``probs`` not needed); causal self-attention calls, not decoding.
      eps: the threshold on ``alpha`` (the paper's 0.3).
      position: the key position measured (0: the first token).

    Returns:
      ``(alpha [calls, B, H], sink_pct)``: per call, sample and head the mean attention the queries that can
      see key ``position`` give it, and ``100 * mean(alpha > eps)`` over all of them.

    Raises:
      ValueError: no records, a decoding or non-causal call, a call without recorded q/k, or a method without
        a probability map.
    """
    if not records:
        raise ValueError("records is empty: call the model inside jattn.nn.capture.attention_inputs() first")
    alphas = []
    for record in records:
        if record.decode or not record.causal or record.q is None:
            raise ValueError(f"record {record.index} ({record.method}) is not a causal self-attention call with q/k "
                             f"recorded (decode={record.decode}, causal={record.causal}); the sink metric needs one")
        spec = record.layer.spec
        if not spec.supports_probs:
            raise ValueError(f"record {record.index}: method {record.method!r} has no probability map, so it has no "
                             "sink metric")

        def attend(q, k, v, record=record, spec=spec):
            return spec.apply(q, k, v, causal=record.causal, mask=record.mask, scale=record.scale,
                              return_probs=False, **record.method_config)
        alphas.append(streamed_sink_metric(attend, record.q, record.k, eps=eps, position=position)[0])
    alpha = jnp.stack(alphas)
    return alpha, 100.0 * jnp.mean((alpha > eps).astype(jnp.float32))
