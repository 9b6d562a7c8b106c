"""P27 ACT, the Attention Calibration Technique (Yu et al., ICML 2024, "Unveiling and Harnessing Hidden
Attention Sinks: Enhancing Large Language Models without Training through Attention Calibration";
official code GATECH-EIC/ACT ``models/llama_modelling_aug.py``).

A post-softmax edit of chosen heads. For one head's probabilities ``P [T, T]`` (causal):

1. column score ``c_j = sum_i P_ij / (T - j)``: the mean attention key ``j`` gets from the queries that see it;
2. sink set ``S = {j : c_j > alpha}`` minus its first index (normally token 0, left untouched);
3. per row ``m_i = sum_{j in S} P_ij``; ``P'_ij = beta P_ij`` for ``j in S`` and, for ``j not in S``,
   ``P'_ij = P_ij + (1 - beta) m_i P_ij / sum_{k not in S} P_ik`` (the freed mass, in proportion);
4. ``out = P' v``.

Rows still sum to 1 and the sink mass of every row drops by exactly ``beta``. The transform runs only on
heads in an offline list: :func:`search_act_heads` tries one ``(layer, head)`` at a time on a calibration
set and keeps those that improve it (the paper's calibration). Defaults ``alpha=0.1``, ``beta=0.4``.

Deliberate choices beyond the spec:

* A row whose visible mass is entirely on ``S`` (nothing to receive the freed mass) is left unchanged, so
  rows stay normalised. Under ``causal`` this gives ``P'[0, 0] = 1``, which the official code forces.
* Bidirectional / padded maps (BERT): ``c_j`` divides by the number of valid queries that see key ``j``
  (``T - j`` is that count for a causal map). Padding queries are excluded when the layer's mask is a key
  padding mask ``[B, 1, 1, S]`` of a self-attention (``T == S``): query ``i`` is valid iff key ``i`` is.
* Dense only (the column statistics are global over queries): the reference path runs it as a ``prob_mod``.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable

import jax.numpy as jnp
import numpy as np

from jattn.core import checks
from jattn.core.reference import reference_attention, visibility

__all__ = ["sink_scores", "sink_set", "act_calibrate", "act_prob_mod", "act_attention", "search_act_heads",
           "act_method", "register_act_method", "set_layer_methods", "METHOD_NAME"]

METHOD_NAME = "act"


def _check_probs(probs):
    checks.check_float_array("probs", probs)
    if probs.ndim < 2:
        raise ValueError(f"probs must be [..., T, S], got {checks.describe(probs)}")


def _check_alpha_beta(alpha, beta):
    alpha = checks.check_finite_float("alpha", alpha)
    beta = checks.check_float_in("beta", beta, 0.0, 1.0)
    return alpha, beta


def _visible(probs, visible, causal):
    T, S = probs.shape[-2:]
    checks.check_bool("causal", causal)
    if causal and T != S:
        raise ValueError(f"causal ACT needs square maps [..., T, T], got probs {checks.describe(probs)}")
    vis = jnp.ones((T, S), bool) if not causal else jnp.tril(jnp.ones((T, S), bool))
    if visible is not None:
        visible = jnp.asarray(visible)
        if visible.dtype != bool or visible.ndim < 2 or visible.shape[-2:] != (T, S):
            raise ValueError(f"visible must be a bool array [..., T={T}, S={S}], got {checks.describe(visible)}")
        vis = vis & visible
    return vis


def sink_scores(probs, *, causal: bool = True, visible=None):
    """``c_j = sum_i P_ij / #{valid queries i that see j}``: ``[..., S]`` (0 where no query sees ``j``).

    ``visible [..., T, S]`` (bool, broadcastable to ``probs``) marks which entries count; with ``causal`` the
    lower triangle is applied too."""
    _check_probs(probs)
    vis = _visible(probs, visible, causal)
    p = jnp.where(vis, probs.astype(jnp.float32), 0.0)
    counts = jnp.sum(jnp.broadcast_to(vis, p.shape), axis=-2).astype(jnp.float32)
    return jnp.sum(p, axis=-2) / jnp.maximum(counts, 1.0)


def sink_set(scores, alpha: float = 0.1, *, keep_first: bool = True):
    """``{j : c_j > alpha}`` as a bool ``[..., S]``, minus its first index when ``keep_first``."""
    alpha = checks.check_finite_float("alpha", alpha)
    checks.check_bool("keep_first", keep_first)
    is_sink = scores > alpha
    if keep_first:
        first = jnp.argmax(is_sink, axis=-1)[..., None]
        is_sink = is_sink & (jnp.arange(scores.shape[-1]) != first)
    return is_sink


def act_calibrate(probs, alpha: float = 0.1, beta: float = 0.4, keep_first: bool = True, *, causal: bool = True,
                  visible=None):
    """ACT on probabilities ``[..., T, S]`` (every leading index one head): returns ``P'`` (float32)."""
    _check_probs(probs)
    alpha, beta = _check_alpha_beta(alpha, beta)
    p = probs.astype(jnp.float32)
    is_sink = sink_set(sink_scores(p, causal=causal, visible=visible), alpha, keep_first=keep_first)[..., None, :]
    sink_mass = jnp.sum(jnp.where(is_sink, p, 0.0), axis=-1, keepdims=True)
    rest = jnp.sum(jnp.where(is_sink, 0.0, p), axis=-1, keepdims=True)
    receive = rest > 0
    gain = jnp.where(receive, (1.0 - beta) * sink_mass / jnp.where(receive, rest, 1.0), 0.0)
    edited = jnp.where(is_sink, beta * p, p * (1.0 + gain))
    return jnp.where(receive, edited, p)


def _head_mask(head_mask, H: int):
    mask = jnp.asarray(head_mask)
    if mask.dtype != bool or mask.shape != (H,):
        raise ValueError(f"head_mask must be a bool array [H={H}] (True = calibrate the head), "
                         f"got {checks.describe(head_mask)}")
    return mask


def act_prob_mod(head_mask, alpha: float = 0.1, beta: float = 0.4, keep_first: bool = True, *,
                 causal: bool = True, visible=None) -> Callable:
    """A ``prob_mod`` (``jattn.attention(..., prob_mod=)``) applying :func:`act_calibrate` to the heads where
    ``head_mask [H]`` is True and leaving the others exact."""
    alpha, beta = _check_alpha_beta(alpha, beta)

    def prob_mod(probs):
        mask = _head_mask(head_mask, probs.shape[1])
        calibrated = act_calibrate(probs, alpha, beta, keep_first, causal=causal, visible=visible)
        return jnp.where(mask[None, :, None, None], calibrated, probs)
    return prob_mod


def _visible_from_mask(mask, T: int, S: int):
    """Valid (query, key) pairs for the column score from a layer's ``mask`` (see the module docstring)."""
    if mask is None:
        return None
    mask = jnp.asarray(mask).astype(bool)
    vis = visibility(T, S, mask=mask)
    if T == S and mask.ndim == 4 and mask.shape[1:3] == (1, 1):
        vis = vis & jnp.swapaxes(mask, -1, -2)  # query i of a padded self-attention is valid iff key i is
    return vis


def act_attention(q, k, v, head_mask, *, alpha: float = 0.1, beta: float = 0.4, keep_first: bool = True,
                  causal: bool = True, mask=None, scale: float | None = None, return_probs: bool = False):
    """Softmax attention with ACT on the heads in ``head_mask [H]`` (dense fp32 reference path).

    ``q [B, T, H, D]``, ``k, v [B, S, Hkv, D]``; ``mask`` as ``jattn.attention`` (it also decides which queries
    count in the column score). Returns ``out`` or ``(out, probs')`` with the calibrated probabilities."""
    checks.check_qkv(q, k, v)
    _head_mask(head_mask, q.shape[2])
    visible = _visible_from_mask(mask, q.shape[1], k.shape[1])
    prob_mod = act_prob_mod(head_mask, alpha, beta, keep_first, causal=causal, visible=visible)
    return reference_attention(q, k, v, mask=mask, causal=causal, scale=scale, prob_mod=prob_mod,
                               return_probs=return_probs)


def search_act_heads(eval_fn: Callable, layers, heads, *, shape: tuple[int, int] | None = None,
                     minimize: bool = True, tol: float = 0.0) -> dict:
    """The paper's calibration: one ``(layer, head)`` at a time.

    Args:
      eval_fn: ``eval_fn(head_masks: np.ndarray bool [L, H]) -> float`` on a calibration set (True = ACT on
        that layer's head).
      layers, heads: the candidates: an int ``n`` (= ``range(n)``) or an iterable of indices.
      shape: ``(L, H)`` of the masks (default: one past the largest candidate of each).
      minimize: True when ``eval_fn`` is a loss, False for an accuracy.
      tol: a head is kept when it beats the baseline by more than ``tol``.
    Returns:
      ``{"baseline": float, "scores": [L, H] float (nan where not tried), "kept": [L, H] bool,
      "combined": eval_fn(kept)}``.
    """
    if not callable(eval_fn):
        raise TypeError(f"eval_fn must be a function head_masks [L, H] -> float, got {type(eval_fn).__name__}")

    def indices(name, value):
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            value = range(int(value))
        values = [checks.check_int(name, i, minimum=0) for i in value]
        if not values:
            raise ValueError(f"{name} must name at least one index, got {value!r}")
        return values

    layers, heads = indices("layers", layers), indices("heads", heads)
    shape = (max(layers) + 1, max(heads) + 1) if shape is None else tuple(shape)
    if len(shape) != 2 or max(layers) >= shape[0] or max(heads) >= shape[1]:
        raise ValueError(f"shape must be (L, H) covering layers {layers} and heads {heads}, got {shape}")
    checks.check_bool("minimize", minimize)
    tol = checks.check_finite_float("tol", tol)
    sign = 1.0 if minimize else -1.0
    baseline = float(eval_fn(np.zeros(shape, bool)))
    scores = np.full(shape, math.nan)
    kept = np.zeros(shape, bool)
    for layer, head in itertools.product(layers, heads):
        trial = np.zeros(shape, bool)
        trial[layer, head] = True
        scores[layer, head] = float(eval_fn(trial))
        kept[layer, head] = sign * (baseline - scores[layer, head]) > tol
    combined = float(eval_fn(kept)) if kept.any() else baseline
    return {"baseline": baseline, "scores": scores, "kept": kept, "combined": combined}


# ------------------------------------------------------------------------------------------------------
# jattn.nn.Attention adapter: method="act" (register with register_act_method()).


def _apply(q, k, v, *, causal, mask, scale, return_probs, head_mask, alpha=0.1, beta=0.4, keep_first=True):
    result = act_attention(q, k, v, jnp.asarray(head_mask, bool), alpha=alpha, beta=beta, keep_first=keep_first,
                           causal=causal, mask=mask, scale=scale, return_probs=return_probs)
    return result


def act_method():
    """The ``jattn.nn.methods.AttentionMethod`` for ``Attention(method="act", head_mask=(...), alpha, beta)``.

    ``head_mask`` is a tuple of one bool per query head of that layer; per-layer lists go through
    ``DecoderLM(layer_methods=...)`` or :func:`set_layer_methods`. No decoding (``q_len = 1`` is unverified in
    the paper and the column statistics need the whole prompt)."""
    from jattn.nn.methods import REQUIRED, AttentionMethod, Option, make_validate

    def convert_heads(name, value):
        values = tuple(np.asarray(value).reshape(-1).tolist()) if value is not None else None
        if values is None or not values or not all(isinstance(x, bool) for x in values):
            raise TypeError(f"{name} must be a sequence of bools, one per head, got {value!r}")
        return values

    options = (Option("head_mask", REQUIRED, "one bool per query head: True = ACT on that head", convert_heads),
               Option("alpha", 0.1, "sink threshold on the column score", lambda n, x: checks.check_finite_float(n, x)),
               Option("beta", 0.4, "factor on the sinks' probabilities, in [0, 1]",
                      lambda n, x: checks.check_float_in(n, x, 0.0, 1.0)),
               Option("keep_first", True, "leave the first sink found (token 0) untouched",
                      lambda n, x: checks.check_bool(n, x)))
    return AttentionMethod(METHOD_NAME, _apply, make_validate(METHOD_NAME, options), cache=None, options=options,
                           description="P27 ACT: sinks beyond the first get beta x their attention (dense)")


def register_act_method() -> None:
    """Registers ``method="act"`` in ``jattn.nn`` (idempotent)."""
    from jattn.nn.methods import available_methods, register_method
    if METHOD_NAME not in available_methods():
        register_method(act_method())


def set_layer_methods(blocks: Iterable, layer_methods) -> None:
    """Switches the attention method of built blocks in place, weights untouched: ``blocks`` are
    ``TransformerBlock``s (``DecoderLM.blocks``, ``BertEncoder.blocks``), ``layer_methods`` one
    ``(method name, config)`` per block. The way to run a per-layer head list inside ``MiniLM``, whose
    ``BertEncoder`` takes one method for all layers. The next jitted call retraces (the config is static)."""
    from jattn.nn.methods import get_method
    blocks = list(blocks)
    layer_methods = list(layer_methods)
    if len(layer_methods) != len(blocks):
        raise ValueError(f"layer_methods must have one (method, config) per block ({len(blocks)}), "
                         f"got {len(layer_methods)}")
    for block, (name, config) in zip(blocks, layer_methods):
        spec = get_method(name)
        attention = block.attention
        attention.method_config = spec.validate(dict(config))
        attention.spec, attention.method = spec, name
