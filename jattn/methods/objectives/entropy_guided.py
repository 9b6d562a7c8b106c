"""P21 entropy-guided attention (Jha & Reagen 2025, "Entropy-Guided Attention for Private LLMs").

Two pieces, both trained with the language-model loss:

1. **Learnable softmax temperature** per head and query position, ``t [H, T]``:
   ``A = softmax(q k^T * scale / t[h, i])`` (the division form; the spec marks it unverified).
   :func:`temperature_softmax_attention` is the pure function (the score modifier ``s / t[h, q_idx]`` on the
   dense reference path, which also returns the maps); :class:`EntropyGuidedAttention` is the NNX layer that
   holds ``t`` and the thresholds as ``nnx.Param`` and :func:`use_entropy_guided` swaps it into every block of a
   ``jattn.nn.DecoderLM`` (projection weights kept). ``t = 1`` everywhere is plain softmax attention.
2. **Entropy regulariser** over the per-layer maps ``A_l [B, H, T, S]`` with learnable per-(layer, head)
   thresholds ``theta [L, H]`` (``reg_threshold_weights``):
   ``E_max = log S``, ``delta = E - theta * E_max``,
   ``penalty = delta^2 * 1[|delta| > gamma * E_max]``, ``L = CE + lam * L_ent``.
   Two reductions (the spec names both):

   * ``"paper"`` (default, the spec's formula): ``E_{l,h}`` is the head's row entropy averaged over batch
     and queries, the penalty is taken on it, ``L_ent = mean_l mean_h penalty``;
   * ``"code"`` (``Nandan91/entropy-guided-attention-llm``, ``entropy_regularization.py``): the penalty is
     taken on every row's entropy and *summed* over batch and queries, then divided by ``H`` and ``L``.
     So it grows with ``B * T`` (with the default ``lam = 1e-5`` the paper form is about ``1e-5 * (log T)^2``
     at most and does almost nothing; the code form is what the official run trains).

   Row entropy is :func:`jattn.nn.attention_maps.attention_entropy` (``-sum p log p`` with ``0 log 0 = 0``);
   the official code uses ``-sum p log(p + 1e-9)`` (differs by at most ``1e-9 * S`` nats).
   :func:`entropy_from_logits` is the identity ``H = lse - sum_j p_j s_j`` that a one-pass kernel can
   accumulate without materialising ``A`` (checked against the explicit form).

Defaults: ``gamma = 0.2``, ``lam = 1e-5`` (CodeParrot, context 128/256; 5e-5 for Languini at 512),
``E_max = log S`` for every row (as the official code: causal rows with fewer visible keys are not
re-normalised). Thresholds ``theta`` start at ``0.5`` here (the official code does not show their
initialisation: our choice). The official code reads one layer's ``reg_threshold_weights`` for all layers;
the spec and this module keep one ``theta`` per layer and head.

Deliberate deviations: the paper inits ``t`` to 1e-2 (CodeParrot) / 1e-1 (Languini) in a softmax-only model
(no LayerNorm, linear FFN); :func:`use_entropy_guided` defaults to ``t = 1`` (the model starts as the
softmax baseline, with RMSNorm and SwiGLU kept), with ``init_temperature`` to change it. The softmax-only
architecture (FFN scaling ``alpha, beta``) is not built here. No flash-style kernel: the maps are dense.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.core import checks
from jattn.core.reference import reference_attention
from jattn.nn.attention import Attention
from jattn.nn.attention_maps import attention_entropy

__all__ = ["DEFAULT_GAMMA", "DEFAULT_LAMBDA", "DEFAULT_THRESHOLD", "REDUCTIONS", "head_entropy",
           "entropy_penalty", "entropy_reg_penalty", "entropy_reg_loss", "entropy_from_logits",
           "temperature_score_mod", "temperature_softmax_attention", "EntropyGuidedAttention",
           "use_entropy_guided", "entropy_guided_layers", "model_thresholds"]

DEFAULT_GAMMA = 0.2
DEFAULT_LAMBDA = 1e-5
DEFAULT_THRESHOLD = 0.5
REDUCTIONS = ("paper", "code")


def _check_maps(name, probs):
    checks.check_float_array(name, probs, 4)


def _stack_maps(probs_per_layer) -> jax.Array:
    """``[L, B, H, T, S]`` from a sequence of ``[B, H, T, S]`` maps (or an already stacked array)."""
    if isinstance(probs_per_layer, (list, tuple)):
        if not probs_per_layer:
            raise ValueError("probs_per_layer must hold at least one layer's map [B, H, T, S], got an empty sequence")
        for index, probs in enumerate(probs_per_layer):
            if probs is None:
                raise ValueError(f"probs_per_layer[{index}] is None: run the model with return_probs=True")
            _check_maps(f"probs_per_layer[{index}]", probs)
        shapes = {tuple(p.shape) for p in probs_per_layer}
        if len(shapes) != 1:
            raise ValueError(f"probs_per_layer must share one shape [B, H, T, S], got shapes {sorted(shapes)}")
        return jnp.stack([jnp.asarray(p, jnp.float32) for p in probs_per_layer])
    checks.check_float_array("probs_per_layer", probs_per_layer, 5)
    return jnp.asarray(probs_per_layer, jnp.float32)


def _check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0:
        raise ValueError(f"gamma must be a float >= 0 (the tolerance margin as a share of E_max), got {gamma!r}")
    return float(gamma)


def head_entropy(probs):
    """Mean row entropy (nats) per head of ``probs [B, H, T, S]``, averaged over batch and queries: ``[H]``."""
    _check_maps("probs", probs)
    return jnp.mean(attention_entropy(probs), axis=(0, 2))


def entropy_penalty(entropy, theta, max_entropy, gamma: float = DEFAULT_GAMMA):
    """``delta^2 * 1[|delta| > gamma * max_entropy]`` with ``delta = entropy - theta * max_entropy`` (elementwise,
    ``theta`` broadcast against ``entropy`` by the caller's shapes)."""
    gamma = _check_gamma(gamma)
    delta = entropy - theta * max_entropy
    return jnp.where(jnp.abs(delta) > gamma * max_entropy, jnp.square(delta), 0.0)


def entropy_reg_penalty(probs_per_layer, theta, *, gamma: float = DEFAULT_GAMMA, max_entropy: float | None = None,
                        reduction: str = "paper"):
    """``L_ent`` (unweighted) of the maps of every layer.

    Args:
      probs_per_layer: ``L`` maps ``[B, H, T, S]`` (a list, as ``DecoderLM(..., return_probs=True)`` returns,
        or one ``[L, B, H, T, S]`` array).
      theta: ``[L, H]`` thresholds, a share of ``E_max`` per layer and head (learnable).
      gamma: tolerance margin as a share of ``E_max``: deviations within ``gamma * E_max`` cost nothing.
      max_entropy: ``E_max``; default ``log S``.
      reduction: ``"paper"`` (penalty on each head's mean entropy, mean over heads and layers) or ``"code"``
        (penalty on each row, summed over batch and queries, divided by ``H`` and ``L``).

    Returns: a float32 scalar.
    """
    maps = _stack_maps(probs_per_layer)
    L, _, H, _, S = maps.shape
    checks.check_float_array("theta", theta, 2)
    if tuple(theta.shape) != (L, H):
        raise ValueError(f"theta must be [L={L}, H={H}] (one threshold per layer and head), got shape {theta.shape}")
    checks.check_choice("reduction", reduction, REDUCTIONS)
    e_max = math.log(S) if max_entropy is None else checks.check_positive_float("max_entropy", max_entropy,
                                                                                allow_none=False)
    theta = jnp.asarray(theta, jnp.float32)
    rows = attention_entropy(maps)                                  # [L, B, H, T]
    if reduction == "paper":
        per_head = jnp.mean(rows, axis=(1, 3))                      # [L, H]
        return jnp.mean(entropy_penalty(per_head, theta, e_max, gamma))
    penalty = entropy_penalty(rows, theta[:, None, :, None], e_max, gamma)
    return jnp.sum(penalty) / (H * L)


def entropy_reg_loss(probs_per_layer, theta, *, gamma: float = DEFAULT_GAMMA, lam: float = DEFAULT_LAMBDA,
                     max_entropy: float | None = None, reduction: str = "paper"):
    """``lam * L_ent`` (:func:`entropy_reg_penalty`): the term added to the cross entropy."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"lam must be a float >= 0 (the regulariser's weight), got {lam!r}")
    return lam * entropy_reg_penalty(probs_per_layer, theta, gamma=gamma, max_entropy=max_entropy,
                                     reduction=reduction)


def entropy_from_logits(logits, visible=None):
    """Row entropy of ``softmax(logits)`` as ``lse - sum_j p_j s_j`` (what a one-pass kernel accumulates).

    ``logits [..., S]``; ``visible`` (bool, broadcastable) marks the keys that take part. Returns ``[...]``."""
    checks.check_float_array("logits", logits)
    s = jnp.asarray(logits, jnp.float32)
    if visible is not None:
        s = jnp.where(visible, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
    p = jnp.exp(s - lse)
    return lse[..., 0] - jnp.sum(jnp.where(p > 0, p * jnp.where(jnp.isfinite(s), s, 0.0), 0.0), axis=-1)


def temperature_score_mod(temperature):
    """``score / t[h]`` for ``t [H]`` or ``score / t[h, q_idx]`` for ``t [H, T]`` (FlexAttention contract)."""
    checks.check_float_array("temperature", temperature)
    if temperature.ndim == 1:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score / temperature[h]
    elif temperature.ndim == 2:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score / temperature[h, q_idx]
    else:
        raise ValueError(f"temperature must be [H] or [H, T], got {checks.describe(temperature)}")
    return score_mod


def temperature_softmax_attention(q, k, v, temperature, *, causal: bool = False, mask=None, scale=None,
                                  return_probs: bool = False):
    """``softmax(q k^T * scale / t) v`` with ``t [H]`` (per head) or ``[H, T]`` (per head and query position).

    Dense float32 reference path (it can return the maps ``[B, H, T, S]`` for the regulariser); the
    temperatures get gradients. ``t = 1`` is ``jattn.attention(q, k, v)`` exactly."""
    checks.check_float_array("q", q, 4)
    checks.check_float_array("temperature", temperature)
    H, T = q.shape[2], q.shape[1]
    if temperature.ndim == 1 and temperature.shape != (H,) or temperature.ndim == 2 and temperature.shape != (H, T):
        raise ValueError(f"temperature must be [H={H}] or [H={H}, T={T}], got {checks.describe(temperature)}")
    return reference_attention(q, k, v, causal=causal, mask=mask, scale=scale,
                               score_mod=temperature_score_mod(temperature), return_probs=return_probs)


class EntropyGuidedAttention(Attention):
    """``jattn.nn.Attention`` (softmax core) with P21's learnable temperature ``t [H, max_len]`` and the
    regulariser's thresholds ``theta [H]`` of this layer (both ``nnx.Param``).

    ``__call__(x, mask=None, positions=None, return_probs=False)``: sequences up to ``max_len`` tokens use
    ``t[:, :T]``. Decoding with a cache is not supported."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, max_len: int,
                 init_temperature: float = 1.0, init_threshold: float = DEFAULT_THRESHOLD,
                 per_position: bool = True, **attention_kwargs):
        method = attention_kwargs.pop("method", "softmax")
        if method != "softmax":
            raise ValueError(f"EntropyGuidedAttention runs softmax heads; method must be 'softmax', got {method!r}")
        attention_kwargs.pop("impl", None)
        super().__init__(dim, num_heads, rngs=rngs, method="softmax", **attention_kwargs)
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be an int >= 1 (the longest sequence t covers), got {max_len!r}")
        init_temperature = checks.check_positive_float("init_temperature", init_temperature, allow_none=False)
        if isinstance(init_threshold, bool) or not isinstance(init_threshold, (int, float)):
            raise ValueError(f"init_threshold must be a float (a share of E_max), got {init_threshold!r}")
        self.max_len, self.per_position = max_len, bool(per_position)
        shape = (num_heads, max_len) if self.per_position else (num_heads,)
        self.temperature = nnx.Param(jnp.full(shape, init_temperature, jnp.float32))
        self.threshold = nnx.Param(jnp.full((num_heads,), float(init_threshold), jnp.float32))

    @classmethod
    def from_attention(cls, attn: Attention, *, max_len: int, init_temperature: float = 1.0,
                       init_threshold: float = DEFAULT_THRESHOLD, per_position: bool = True):
        """A layer with ``attn``'s projection weights copied (``attn`` must run ``method="softmax"``)."""
        if not isinstance(attn, Attention):
            raise TypeError(f"attn must be a jattn.nn.Attention, got {type(attn).__name__}")
        if attn.method != "softmax":
            raise ValueError(f"attn must run method 'softmax', got {attn.method!r}")
        layer = cls(attn.dim, attn.num_heads, rngs=nnx.Rngs(0), max_len=max_len, init_temperature=init_temperature,
                    init_threshold=init_threshold, per_position=per_position, num_kv_heads=attn.num_kv_heads,
                    head_dim=attn.head_dim, causal=attn.causal, rope=attn.rope, rope_theta=attn.rope_theta,
                    use_bias=attn.query.use_bias, output_gate=attn.gate is not None, scale=attn.scale,
                    dtype=attn.dtype, param_dtype=attn.query.kernel[...].dtype)
        for name in ("query", "key", "value", "out") + (("gate",) if attn.gate is not None else ()):
            nnx.update(getattr(layer, name), nnx.state(getattr(attn, name)))
        return layer

    def init_cache(self, *args, **kwargs):
        raise ValueError("EntropyGuidedAttention does not support decoding with a KV cache (decode=True)")

    def __call__(self, x, *, mask=None, positions=None, return_probs: bool = False, decode: bool = False,
                 prefill: bool = False):
        if decode or prefill:
            raise ValueError("EntropyGuidedAttention does not support decode=True / prefill=True")
        checks.check_float_array("x", x, 3)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, dim={self.dim}], got shape {x.shape}")
        B, T, _ = x.shape
        if T > self.max_len:
            raise ValueError(f"x has T={T} tokens but the temperatures cover max_len={self.max_len}")
        if positions is None:
            positions = jnp.arange(T)[None]
        q, k, v = self.project(x, positions)
        t = self.temperature[...]
        t = t[:, :T] if self.per_position else t
        result = temperature_softmax_attention(q, k, v, t, causal=self.causal, mask=mask, scale=self.scale,
                                               return_probs=return_probs)
        out, probs = result if return_probs else (result, None)
        out = self.finish(x, out)
        return (out, probs) if return_probs else out


def use_entropy_guided(model, *, max_len: int, init_temperature: float = 1.0,
                       init_threshold: float = DEFAULT_THRESHOLD, per_position: bool = True):
    """Replaces every block's ``attention`` of ``model`` (a ``jattn.nn.DecoderLM``, ``ViT`` or ``BertEncoder``
    running softmax) by :meth:`EntropyGuidedAttention.from_attention` of it, in place. Returns ``model``."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"model must have transformer blocks (.blocks), got {type(model).__name__}")
    for block in blocks:
        block.attention = EntropyGuidedAttention.from_attention(
            block.attention, max_len=max_len, init_temperature=init_temperature, init_threshold=init_threshold,
            per_position=per_position)
    return model


def entropy_guided_layers(model) -> list[EntropyGuidedAttention]:
    """The model's :class:`EntropyGuidedAttention` layers in block order."""
    return [block.attention for block in model.blocks if isinstance(block.attention, EntropyGuidedAttention)]


def model_thresholds(model):
    """``theta [L, H]`` stacked from the model's layers (what :func:`entropy_reg_loss` takes)."""
    layers = entropy_guided_layers(model)
    if not layers or len(layers) != len(model.blocks):
        raise ValueError(f"every block of model must be EntropyGuidedAttention (use_entropy_guided), got "
                         f"{len(layers)} of {len(model.blocks)}")
    return jnp.stack([layer.threshold[...] for layer in layers])
