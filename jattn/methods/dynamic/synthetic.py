"""Synthetic long-context q, k, v with the attention structures dynamic-sparse selectors target.

No downloads: everything is built from a seed. Per kv head (the query heads of a GQA group share their kv
head's structure and differ by their own noise), the head dim ``D`` is split into four parts:

* **content** (``D / 4`` dims): a unit direction ``u`` per kv head. Every query carries ``c_q u``; the
  *sink* key 0 carries ``c_sink u`` and each *vertical stripe* key (``n_stripes`` positions drawn per kv
  head) carries ``c_stripe u``, other keys none. Their logit ``c_q c / sqrt(D)`` is the same for every
  query, so each sink/stripe key is a column every query attends to.
* **band** (``D / 4`` dims): rotary-like components ``(cos w_m t, sin w_m t)`` with the same amplitude on
  queries (position ``t``) and keys (position ``s``), so the logit is ``a^2 sum_m cos(w_m (t - s))``: it
  peaks at ``t = s`` and decays over about ``band_width`` tokens (geometric frequencies ``w_m`` from
  ``pi / band_width`` down by factors of ``sqrt 2``, so no common period): a local band along the diagonal.
* **slashes** (the other ``D / 2`` dims, split evenly among ``slash_offsets``): the same rotary form with
  the keys shifted, ``(cos w_m (s + o), sin w_m (s + o))``, so the logit ``sum_m cos(w_m (t - s - o))``
  peaks on the diagonal ``t - s = o``: a slash at offset ``o`` (sharper: frequencies from 1 down by
  factors of ``sqrt 3``).
* plus Gaussian noise of std ``noise`` on every q and k entry, and ``v`` standard normal.

The peak logits of each structure (``sink_logit``, ``stripe_logit``, ``band_logit``, ``slash_logit``) are
set directly; the defaults make the planted structures hold most of the attention mass up to 32K tokens.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jattn.core import checks


class SyntheticLayout(NamedTuple):
    """Where the structures were planted: ``stripes [Hkv, n_stripes]`` key positions (sink is key 0)."""
    stripes: np.ndarray
    slash_offsets: tuple[int, ...]
    band_width: int


def _rotary(positions, freqs, amplitude):
    """``[T] -> [T, 2 M]``: ``amplitude * (cos w_m p, sin w_m p)``."""
    angles = positions[:, None] * freqs[None, :]
    return amplitude * np.concatenate([np.cos(angles), np.sin(angles)], axis=-1)


def synthetic_long_qkv(seed: int, T: int, *, H: int, Hkv: int, D: int, B: int = 1, n_stripes: int = 4,
                       slash_offsets: tuple[int, ...] = (64, 512), band_width: int = 32, sink_logit: float = 12.0,
                       stripe_logit: float = 9.0, band_logit: float = 10.0, slash_logit: float = 10.0,
                       noise: float = 0.3, dtype=jnp.float32):
    """q ``[B, T, H, D]``, k, v ``[B, T, Hkv, D]`` with a sink, stripes, a local band and slashes.

    Args:
      seed: NumPy seed.
      T: sequence length.
      H: query heads.
      Hkv: kv heads (dividing H).
      D: head dim, a multiple of 8 with ``D / 2`` split into at least 4 dims per slash.
      B: batch.
      n_stripes: vertical stripes per kv head (key positions drawn in ``[1, T)``).
      slash_offsets: diagonal offsets ``o`` (query - key) of the planted slashes.
      band_width: rough width of the local band in tokens.
      sink_logit: logit of key 0 for every query.
      stripe_logit: logit of a stripe key for every query.
      band_logit: peak logit of the band (at offset 0).
      slash_logit: peak logit of each slash.
      noise: std of the Gaussian noise on q and k.
      dtype: output dtype.

    Returns:
      ``(q, k, v, SyntheticLayout)``.

    Raises:
      ValueError: ``D`` cannot be split as described, or a size is out of range.
    """
    for name, value in (("T", T), ("H", H), ("Hkv", Hkv), ("D", D), ("B", B)):
        checks.check_int(name, value, 1)
    checks.check_int("n_stripes", n_stripes, 0)
    if H % Hkv:
        raise ValueError(f"H={H} must be a multiple of Hkv={Hkv}")
    n_slash = len(slash_offsets)
    if D % 8 or (n_slash and (D // 2) // n_slash < 4):
        raise ValueError(f"D={D} must be a multiple of 8 with at least 4 dims per slash ({n_slash} slashes)")
    rng = np.random.default_rng(seed)
    scale = D ** 0.25                      # logit = q . k / sqrt(D): each side carries sqrt(logit) * D**0.25
    content, band = D // 4, D // 4
    per_slash = ((D // 2) // n_slash) // 2 * 2 if n_slash else 0
    positions = np.arange(T, dtype=np.float64)
    # Ratios of sqrt(2) and sqrt(3): no common period, so the band and slashes do not repeat at larger offsets
    # (powers of two would all realign at the longest period and plant unwanted slashes there).
    band_freqs = (math.pi / band_width) * math.sqrt(0.5) ** np.arange(band // 2)
    slash_freqs = 1.0 / math.sqrt(3.0) ** np.arange(per_slash // 2) if per_slash else np.zeros(0)
    q = rng.standard_normal((B, T, H, D)) * noise
    k = rng.standard_normal((B, T, Hkv, D)) * noise
    stripes = np.stack([np.sort(rng.choice(np.arange(1, T), size=min(n_stripes, T - 1), replace=False))
                        for _ in range(Hkv)]) if T > 1 else np.zeros((Hkv, 0), int)
    G = H // Hkv
    for kv in range(Hkv):
        u = rng.standard_normal(content)
        u /= np.linalg.norm(u)
        heads = slice(kv * G, (kv + 1) * G)
        q[:, :, heads, :content] += scale * u                                  # c_q = D**0.25
        k[:, 0, kv, :content] += scale * sink_logit * u
        k[:, stripes[kv], kv, :content] += scale * stripe_logit * u
        m_band = band // 2
        amp = scale * math.sqrt(band_logit / m_band)
        q[:, :, heads, content:content + band] += _rotary(positions, band_freqs, amp)[None, :, None, :]
        k[:, :, kv, content:content + band] += _rotary(positions, band_freqs, amp)[None]
        start = content + band
        for o in slash_offsets:
            amp = scale * math.sqrt(slash_logit / (per_slash // 2))
            q[:, :, heads, start:start + per_slash] += _rotary(positions, slash_freqs, amp)[None, :, None, :]
            k[:, :, kv, start:start + per_slash] += _rotary(positions + o, slash_freqs, amp)[None]
            start += per_slash
    v = rng.standard_normal((B, T, Hkv, D))
    as_array = lambda x: jnp.asarray(x.astype(np.float32), dtype)
    return as_array(q), as_array(k), as_array(v), SyntheticLayout(stripes, tuple(slash_offsets), band_width)
