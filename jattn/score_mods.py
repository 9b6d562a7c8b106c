"""Ready-made ``score_mod`` functions for ``jattn.attention`` and ``jattn.block_sparse_attention``.

A score mod is ``score_mod(score, b, h, q_idx, kv_idx) -> score`` (``jattn.core.score_mod`` has the
contract). Each constructor here returns one; the arrays it closes over are differentiable.

Which impls fuse which mods: every mod runs on ``"reference"`` and ``"xla"``. In the Pallas kernels, a mod
that reads its arrays at a per-(batch, head) index (``alibi``, ``head_temperature``) or only computes from
the indices lowers for GPU and TPU; ``relative_position_bias`` reads its table at ``q_idx - kv_idx``, a
gather across the tile, which Triton lowers and Mosaic (TPU) does not.

Structure that removes whole tiles (causal, windows, documents, a prefix) belongs in ``mask``/``causal``/
``window`` or a ``BlockMask`` (``jattn.masks`` has ``prefix_lm_mask`` and ``document_mask``), where tiles
are skipped; ``from_mask`` turns such a mask into a mod for paths that take only a mod.
"""
from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from jattn.core import checks
from jattn.core.decay import alibi_slopes

__all__ = ["alibi", "relative_position_bias", "softcap", "head_temperature", "from_mask", "compose"]


def alibi(num_heads: int, *, symmetric: bool = False):
    """ALiBi (Press et al. 2022): ``score + m_h * (kv_idx - q_idx)`` with the paper's slopes
    ``m_h = 2^(-8(h+1)/H)`` (``jattn.core.decay.alibi_slopes``); with ``symmetric``, ``- m_h |q_idx - kv_idx|``
    (the usual bidirectional variant). Under causal attention the two agree."""
    slopes = alibi_slopes(num_heads)
    checks.check_bool("symmetric", symmetric)

    def score_mod(score, b, h, q_idx, kv_idx):
        distance = (kv_idx - q_idx).astype(jnp.float32)
        return score + slopes[h] * (-jnp.abs(distance) if symmetric else distance)
    return score_mod


def relative_position_bias(table: Float[Array, "H R"]):
    """A learned bias per head and clipped relative position (Shaw et al. / T5 without buckets):
    ``score + table[h, clip(kv_idx - q_idx, -(R // 2), R // 2) + R // 2]``, ``R`` odd.

    Args:
      table: float ``[H, R]``, ``R = 2 * max_distance + 1``; differentiable.
    """
    checks.check_float_array("table", table, 2)
    R = table.shape[1]
    if R % 2 == 0:
        raise ValueError(f"table must be [H, 2 * max_distance + 1] (an odd number of positions), got shape "
                         f"{tuple(table.shape)}")
    reach = R // 2

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, jnp.clip(kv_idx - q_idx, -reach, reach) + reach]
    return score_mod


def softcap(cap: float):
    """Gemma-2's logit soft-capping ``cap * tanh(score / cap)`` as a mod (``attention(softcap=)`` applies it
    before the bias; this one applies wherever it sits in a ``compose``)."""
    cap = checks.check_positive_float("cap", cap, allow_none=False)

    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * jnp.tanh(score / cap)
    return score_mod


def head_temperature(temperature: Float[Array, "H"]):
    """``score / temperature[h]``: a (learned) temperature per query head; differentiable."""
    checks.check_float_array("temperature", temperature, 1)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score / temperature[h]
    return score_mod


def from_mask(mask_fn):
    """A ``mask_fn(b, h, q_idx, kv_idx) -> bool`` as a mod: ``-inf`` where it is False (no tile skipping)."""
    if not callable(mask_fn):
        raise TypeError(f"mask_fn must be a function (b, h, q_idx, kv_idx) -> bool, got {type(mask_fn).__name__}")

    def score_mod(score, b, h, q_idx, kv_idx):
        return jnp.where(mask_fn(b, h, q_idx, kv_idx), score, -jnp.inf)
    return score_mod


def compose(*score_mods):
    """Applies the mods left to right: ``compose(f, g)(s, ...) = g(f(s, ...), ...)``."""
    for i, mod in enumerate(score_mods):
        if not callable(mod):
            raise TypeError(f"score_mods[{i}] must be a function (score, b, h, q_idx, kv_idx) -> score, got "
                            f"{type(mod).__name__}")

    def score_mod(score, b, h, q_idx, kv_idx):
        for mod in score_mods:
            score = mod(score, b, h, q_idx, kv_idx)
        return score
    return score_mod
