"""P28 entropy-scaled attention (Jin et al. 2023, "Training-free Diffusion Model Adaptation for
Variable-Sized Text-to-Image Synthesis", arXiv 2306.08645).

The computation (paper eq. for the scaled self-attention): replace the softmax scale ``1/sqrt(d)`` by

    lambda = sqrt(log_T N) / sqrt(d) = sqrt(ln N / ln T) / sqrt(d),        out = softmax(lambda q k^T) v,

where ``N`` is the number of keys a query attends to at inference and ``T`` the number the same layer
attended to at training. Attention entropy grows like ``ln N``; the factor keeps it roughly at its
training value. ``N`` and ``T`` are clamped to ``>= 2`` (``ln 1 = 0``). Training-free; no new kernel: when
every query sees the same number of keys the factor is one scalar and the flash path runs with
``scale=lambda``; otherwise it is a ``score_mod`` (``score * factor[b, h, q_idx]``), fused the same way.

Defaults and deliberate extensions (the paper is about non-causal self-attention in a diffusion UNet):

* ``N`` is counted per query as the keys it can see (``mask`` and ``causal`` applied). With no mask and
  ``causal=False`` that is the key length ``S`` for every query: exactly the paper's scalar.
  Under a padding mask it is the real-token count of each sequence; under ``causal`` it is ``i + 1``.
* ``only_longer=False`` (default, the paper): queries that see fewer keys than ``T`` get a factor < 1.
  ``only_longer=True`` clamps the factor at 1, so only queries that see more keys than at training are
  sharpened (the convention of Qwen's log-n attention; for a causal LM it leaves the model bit-exact at
  and below its training length, where query ``i`` saw ``i + 1`` keys in training too).
* ``per_query=False`` uses one scalar per call from the key length ``S`` even under ``causal``
  (the paper's form read literally for a causal model).

Cross-attention is left unchanged by the paper: do not apply this to text keys.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jattn.core import checks
from jattn.core.reference import reference_attention, visibility
from jattn.ops.attention import attention

__all__ = ["entropy_factor", "entropy_invariant_scale", "visible_key_counts", "entropy_scale_factors",
           "entropy_score_mod", "entropy_scaled_attention", "attention_entropy", "entropy_method",
           "register_entropy_method", "METHOD_NAME"]

METHOD_NAME = "entropy_scaled"


def _key_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a key count >= 1 (an int), got {value!r}")
    return max(int(value), 2)


def entropy_factor(n_keys, train_keys, *, only_longer: bool = False):
    """``sqrt(ln max(N, 2) / ln max(T, 2))`` (times nothing: the factor on the logits). ``n_keys`` may be an
    int or an array of counts (then the result is a float32 array); with ``only_longer`` the factor is
    ``max(1, .)``."""
    T = _key_count("train_keys", train_keys)
    checks.check_bool("only_longer", only_longer)
    if isinstance(n_keys, (int, np.integer)) and not isinstance(n_keys, bool):
        factor = math.sqrt(math.log(_key_count("n_keys", n_keys)) / math.log(T))
        return max(factor, 1.0) if only_longer else factor
    n = jnp.asarray(n_keys)
    if not (jnp.issubdtype(n.dtype, jnp.integer) or jnp.issubdtype(n.dtype, jnp.floating)):
        raise TypeError(f"n_keys must be an int or an array of key counts, got {checks.describe(n_keys)}")
    factor = jnp.sqrt(jnp.log(jnp.maximum(n.astype(jnp.float32), 2.0)) / math.log(T))
    return jnp.maximum(factor, 1.0) if only_longer else factor


def entropy_invariant_scale(head_dim: int, n_keys: int, train_keys: int, *, only_longer: bool = False) -> float:
    """The paper's scale ``lambda = sqrt(ln N / ln T) / sqrt(d)`` (``N, T`` clamped to >= 2)."""
    d = checks.check_int("head_dim", head_dim)
    return entropy_factor(_key_count("n_keys", n_keys), train_keys, only_longer=only_longer) / math.sqrt(d)


def visible_key_counts(T: int, S: int, *, mask=None, causal: bool = False):
    """How many keys each query sees: int32 ``[B|1, H|1, T]`` (jattn's mask / causal conventions)."""
    T, S = checks.check_int("T", T), checks.check_int("S", S)
    visible = visibility(T, S, mask=None if mask is None else jnp.asarray(mask).astype(bool), causal=causal)
    if visible is None:
        return jnp.full((1, 1, T), S, jnp.int32)
    visible = jnp.broadcast_to(visible, visible.shape[:2] + (T, S))
    return jnp.sum(visible, axis=-1, dtype=jnp.int32)


def entropy_scale_factors(T: int, S: int, train_keys: int, *, mask=None, causal: bool = False,
                          per_query: bool = True, only_longer: bool = False):
    """The logit factor for every query: a Python float when it is the same for all of them, else float32
    ``[B|1, H|1, T]`` (see the module docstring for ``per_query`` / ``only_longer``)."""
    checks.check_bool("per_query", per_query)
    checks.check_bool("causal", causal)
    if not per_query or (mask is None and not causal):
        return entropy_factor(checks.check_int("S", S), train_keys, only_longer=only_longer)
    return entropy_factor(visible_key_counts(T, S, mask=mask, causal=causal), train_keys, only_longer=only_longer)


def entropy_score_mod(factors):
    """A ``score_mod`` multiplying each logit by ``factors[b, h, q_idx]`` (``factors [B|1, H|1, T]``)."""
    factors = jnp.asarray(factors, jnp.float32)
    if factors.ndim != 3:
        raise ValueError(f"factors must be [B|1, H|1, T], got {checks.describe(factors)}")
    b_one, h_one = factors.shape[0] == 1, factors.shape[1] == 1

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * factors[0 if b_one else b, 0 if h_one else h, q_idx]
    return score_mod


def entropy_scaled_attention(q, k, v, *, train_keys: int, mask=None, causal: bool = False,
                             per_query: bool = True, only_longer: bool = False, scale: float | None = None,
                             impl: str = "auto", return_probs: bool = False):
    """``softmax(factor * scale * q k^T) v`` with the P28 factor ``sqrt(ln N / ln T)``.

    Args:
      q, k, v: ``[B, T, H, D]``, ``[B, S, Hkv, D]`` (GQA as ``jattn.attention``).
      train_keys: ``T``, the key count the layer saw in training (clamped to >= 2).
      mask, causal: as ``jattn.attention``; they also define each query's key count ``N``.
      per_query, only_longer: see the module docstring.
      scale: the base scale (default ``D ** -0.5``), multiplied by the factor.
      impl: ``jattn.attention``'s impl; with ``return_probs`` the fp32 reference runs.
    Returns:
      ``out [B, T, H, D]`` or ``(out, probs [B, H, T, S])``.
    """
    checks.check_qkv(q, k, v)
    _key_count("train_keys", train_keys)
    checks.check_bool("return_probs", return_probs)
    base = q.shape[-1] ** -0.5 if scale is None else checks.check_positive_float("scale", scale, allow_none=False)
    factors = entropy_scale_factors(q.shape[1], k.shape[1], train_keys, mask=mask, causal=causal,
                                    per_query=per_query, only_longer=only_longer)
    if isinstance(factors, float):
        kwargs = dict(scale=base * factors)
    else:
        kwargs = dict(scale=base, score_mod=entropy_score_mod(factors))
    if return_probs or impl == "reference":
        return reference_attention(q, k, v, mask=mask, causal=causal, return_probs=return_probs, **kwargs)
    return attention(q, k, v, mask=mask, causal=causal, impl=impl, **kwargs)


def attention_entropy(probs, eps: float = 1e-12):
    """Row entropy in nats of probabilities ``[..., T, S]`` -> ``[..., T]`` (``jattn.nn.attention_maps``)."""
    from jattn.nn.attention_maps import attention_entropy as _entropy
    return _entropy(probs, eps)


# ------------------------------------------------------------------------------------------------------
# jattn.nn.Attention adapter: method="entropy_scaled" (register with register_entropy_method()).


def _apply(q, k, v, *, causal, mask, scale, return_probs, train_keys, per_query=True, only_longer=False,
           impl="auto"):
    return entropy_scaled_attention(q, k, v, train_keys=train_keys, mask=mask, causal=causal, per_query=per_query,
                                    only_longer=only_longer, scale=scale, impl=impl, return_probs=return_probs)


def entropy_method():
    """The ``jattn.nn.methods.AttentionMethod`` for ``Attention(method="entropy_scaled", train_keys=T, ...)``.

    Decoding reuses ``_apply`` over the cache with the absolute-position mask, so each new query's ``N`` is
    its position + 1, as in prefill."""
    from jattn.core import masks
    from jattn.nn.methods import REQUIRED, AttentionMethod, Option, make_validate

    def convert_keys(name, value):
        _key_count(name, value)
        return int(value)

    def convert_bool(name, value):
        return checks.check_bool(name, value)

    def convert_impl(name, value):
        checks.check_choice(name, value, checks.IMPLS)
        return value

    options = (Option("train_keys", REQUIRED, "T: keys per query at training (clamped >= 2)", convert_keys),
               Option("per_query", True, "N counted per query from mask/causal (False: N = key length)",
                      convert_bool),
               Option("only_longer", False, "clamp the factor at 1 (only queries seeing > T keys change)",
                      convert_bool),
               Option("impl", "auto", "jattn.attention impl", convert_impl))
    return AttentionMethod(METHOD_NAME, _apply, make_validate(METHOD_NAME, options), cache="kv",
                           decode_mask=lambda config: masks.full_mask(), decode_apply=_apply, options=options,
                           description="P28 entropy-scaled softmax: logits * sqrt(ln N / ln T)")


def register_entropy_method() -> None:
    """Registers ``method="entropy_scaled"`` in ``jattn.nn`` (idempotent)."""
    from jattn.nn.methods import available_methods, register_method
    if METHOD_NAME not in available_methods():
        register_method(entropy_method())
