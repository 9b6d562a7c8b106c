"""Decay rules of the linear family (P58 TransNormerLLM, P74 Lightning-2): pure functions over log-decays.

A decay ``lambda = exp(log_decay)`` multiplies the state at every step, ``S_t = lambda_t S_{t-1} + k_t^T v_t``;
jattn passes it as a log-decay (``<= 0``), one value per head (``[H]``) or per token and head (``[B, T, H]``).
The constructors return per-head log-decays in both conventions of the P58 spec; the helpers broadcast a
log-decay to one value per token and cumulate it from each chunk's start, which keeps every exponent the
chunked forms take ``<= 0`` (no overflow for any length).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jattn.core import checks


def _check_layer(num_heads, layer, num_layers) -> None:
    checks.check_int("num_heads", num_heads)
    checks.check_int("num_layers", num_layers)
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, (int, np.integer))
                              or not 0 <= layer < num_layers):
        raise ValueError(f"layer must be None or an int in [0, num_layers={num_layers}), got {layer!r}")


def _alibi_slope_list(num_heads: int) -> list[float]:
    """ALiBi slopes 2^(-8(h+1)/H); non-power-of-two H interleaves the next power's slopes (as ALiBi)."""
    def power_of_two_slopes(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    if num_heads & (num_heads - 1) == 0:
        return power_of_two_slopes(num_heads)
    closest = 2 ** int(math.floor(math.log2(num_heads)))
    extra = power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return power_of_two_slopes(closest) + extra


def alibi_slopes(num_heads: int) -> Float[Array, "H"]:
    """The ALiBi slopes ``s_h = 2^(-8(h+1)/H)``, positive (P74's per-head slopes; ``log_decay = -s``).

    Args:
      num_heads: H, an int >= 1. A non-power-of-two H interleaves the next power's slopes, as ALiBi does.

    Returns:
      float32 ``[H]`` slopes.

    Raises:
      ValueError: ``num_heads`` is below 1.
      TypeError: ``num_heads`` is not an int.
    """
    _check_layer(num_heads, None, 1)
    return jnp.asarray(_alibi_slope_list(int(num_heads)), jnp.float32)


def alibi_log_decay(num_heads: int, *, layer: int | None = None, num_layers: int = 1) -> Float[Array, "H"]:
    """TransNormerLLM's decay (its HF code, which the P58 spec calls authoritative): ``-s_h * f_l``.

    ``s_h = 2^(-8(h+1)/H)`` (ALiBi slopes) and, when ``layer`` is given, the per-layer factor
    ``f_l = 1 - l / (L - 1) + 1e-5`` (``f_l = 1`` when ``num_layers == 1``, where the code divides by 0).

    Args:
      num_heads: H, an int >= 1.
      layer: the layer index ``l`` in ``[0, num_layers)``, or None for no per-layer factor.
      num_layers: L, an int >= 1.

    Returns:
      float32 ``[H]`` log-decays (``<= 0``).

    Raises:
      ValueError: a count below 1 or a layer outside ``[0, num_layers)``.
      TypeError: a count that is not an int.
    """
    _check_layer(num_heads, layer, num_layers)
    slopes = np.asarray(_alibi_slope_list(int(num_heads)), np.float64)
    if layer is not None and num_layers > 1:
        slopes = slopes * (1.0 - layer / (num_layers - 1) + 1e-5)
    return jnp.asarray(-slopes, jnp.float32)


def linear_log_decay(num_heads: int, *, layer: int = 0, num_layers: int = 1) -> Float[Array, "H"]:
    """The TransNormerLLM paper-text decay, linear in the head index: ``-(8h/H)(1 - l/L)``.

    Reading chosen (the text is ambiguous): ``h = 0..H-1``, so head 0 does not decay.

    Args:
      num_heads: H, an int >= 1.
      layer: the layer index ``l`` in ``[0, num_layers)``.
      num_layers: L, an int >= 1.

    Returns:
      float32 ``[H]`` log-decays (``<= 0``).

    Raises:
      ValueError: a count below 1 or a layer outside ``[0, num_layers)``.
      TypeError: a count that is not an int.
    """
    _check_layer(num_heads, layer, num_layers)
    heads = np.arange(num_heads, dtype=np.float64)
    return jnp.asarray(-(8.0 * heads / num_heads) * (1.0 - layer / num_layers), jnp.float32)


def per_token_log_decay(log_decay: Float[Array, "H"] | Float[Array, "B T H"] | None, B: int, T: int,
                        H: int) -> Float[Array, "B T H"]:
    """A log-decay as float32 ``[B, T, H]``, one value per token and head.

    Args:
      log_decay: None (no decay: zeros), ``[H]`` per head or ``[B, T, H]`` per token.
      B: batch size.
      T: sequence length.
      H: number of heads.

    Returns:
      float32 ``[B, T, H]`` log-decays.
    """
    if log_decay is None:
        return jnp.zeros((B, T, H), jnp.float32)
    log_decay = log_decay.astype(jnp.float32)
    return jnp.broadcast_to(log_decay, (B, T, H)) if log_decay.ndim == 1 else log_decay


def chunk_local_log_decay(a: Float[Array, "... L"], chunk: int) -> Float[Array, "... N C"]:
    """Cumulative log-decay from each chunk's start: ``a [..., N*chunk] -> b [..., N, chunk]``.

    ``b[..., n, i] = a[..., n*C] + ... + a[..., n*C + i]``, so ``b <= 0`` whenever ``a <= 0`` and every
    decay factor ``exp(b_i - b_j)`` (``j <= i``), ``exp(b_i)`` and ``exp(b_last - b_j)`` is at most 1.

    Args:
      a: log-decays whose last axis is a multiple of ``chunk``.
      chunk: the chunk length C.

    Returns:
      ``[..., N, C]`` cumulative log-decays, restarted at each chunk.
    """
    return jnp.cumsum(a.reshape(a.shape[:-1] + (a.shape[-1] // chunk, chunk)), axis=-1)
