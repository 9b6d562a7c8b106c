"""P34 Attentive Eraser (Sun et al., AAAI 2025, "Unleashing Diffusion Model's Object Removal Potential via
Self-Attention Redirection Guidance"; official code datanlab/AttentiveEraser, ``AAS.attn_batch``): attention
activation and suppression (AAS) and self-attention redirection guidance (SARG).

AAS, on one self-attention layer with the object mask ``m`` (max-pooled to the token grid, flattened,
``m_j = 1`` = token ``j`` is foreground)::

    S    = q k^T * scale                                     # logits [B, H, T, S]
    O_bg = softmax(S   + (-inf) * m_key) V                   # every query reads background keys only
    O_fg = softmax(lam S + (-inf) * m_key) V                 # similarity suppression: a flatter map
    O    = m_q * O_fg + (1 - m_q) * O_bg                     # foreground queries take the flattened path

(:func:`masked_key_attention`; without ``query_mask`` it is ``O_bg``). The official code applies the
suppressed path while ``cur_step <= ss_steps`` (``cur_step`` = the 0-based index of the denoising step, counted
from the first one) and the plain key mask after; both are the masked logits before the softmax, i.e. an
additive key mask, so the computation runs on :func:`jattn.attention` (flash / Pallas where available) with
``mask=~key_mask`` and the logit scale multiplied by ``lam``.

SARG: the batch holds a plain branch (``wo``) and an AAS branch (``w``); the guided prediction is
``eps = eps_wo + s (eps_w - eps_wo)`` (:func:`sarg_guidance`), composable with CFG (apply it to each CFG half).

Hook: :class:`AASSchedule` holds the layer range ``[start_layer, end_layer)``, step range
``[start_step, end_step)``, ``ss_steps`` and ``ss_scale``; ``schedule.attn_fns(step, token_mask)`` returns the
``{layer: fn(q, k, v)}`` dict that :class:`jattn.nn.dit.TinyDiT` takes as ``attn_fns`` (``{}`` outside the step
range); :func:`aas_hook` is one layer's function. :func:`token_mask` max-pools a pixel mask to the token grid.

Defaults: ``fg_scale = 1.0`` (the SD1.5 class default ``ss_scale``; SDXL uses 0.3), ``s`` has no default (the
SDXL pipeline uses 7, the README 9). Deliberate deviations: a fully-foreground mask leaves every row with no
visible key, and jattn's convention then gives output 0 (the official ``finfo.min`` fill gives a uniform
average instead); masks are bool, not the official {0, 1} floats after ``round()``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jattn.ops.attention import attention as _attention

__all__ = ["masked_key_attention", "sarg_guidance", "aas_hook", "AASSchedule", "token_mask"]


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    return f"shape {tuple(shape)} dtype {getattr(x, 'dtype', None)}" if shape is not None else type(x).__name__


def _check_qkv(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float array [B, T, H, D], got {_describe(x)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"q [B, T, H, D], k and v [B, S, Hkv, D] (H a multiple of Hkv) must agree, got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")


def _check_token_mask(name, mask, batch, length):
    if not hasattr(mask, "shape") or mask.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a bool array [B={batch}, {length}] (True = foreground), got "
                        f"{_describe(mask)}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} must be [B={batch}, {length}] (True = foreground), got {_describe(mask)}")
    return jnp.asarray(mask)


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return float(value)


def masked_key_attention(q, k, v, key_mask, query_mask=None, fg_scale: float = 1.0, *, scale: float | None = None,
                         impl: str = "auto"):
    """AAS: attention with foreground keys removed for every query, and similarity suppression
    ``softmax(fg_scale * S)`` for foreground queries (see the module docstring).

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, S, Hkv, D]``.
      key_mask: bool ``[B, S]``, True = foreground key (never attended).
      query_mask: bool ``[B, T]`` or None; True = foreground query (takes the ``fg_scale`` path).
      fg_scale: ``lam > 0``, the similarity-suppression scale (1 = no suppression).
      scale: logit scale, default ``D ** -0.5``.
    Returns ``[B, T, H, D]`` in q's dtype.
    """
    _check_qkv(q, k, v)
    B, T, _, D = q.shape
    key_mask = _check_token_mask("key_mask", key_mask, B, k.shape[1])
    fg_scale = _check_positive("fg_scale", fg_scale)
    scale = D ** -0.5 if scale is None else _check_positive("scale", scale)
    visible = ~key_mask[:, None, None, :]
    out_bg = _attention(q, k, v, mask=visible, scale=scale, impl=impl)
    if query_mask is None:
        return out_bg
    query_mask = _check_token_mask("query_mask", query_mask, B, T)
    out_fg = out_bg if fg_scale == 1.0 else _attention(q, k, v, mask=visible, scale=scale * fg_scale, impl=impl)
    m = query_mask[:, :, None, None]
    return jnp.where(m, out_fg, out_bg).astype(q.dtype)


def sarg_guidance(eps_wo, eps_w, s):
    """Self-attention redirection guidance ``eps_wo + s (eps_w - eps_wo)``: ``s = 0`` the plain branch,
    ``s = 1`` the AAS branch, ``s > 1`` pushes past it."""
    if not hasattr(eps_wo, "shape") or not hasattr(eps_w, "shape") or eps_wo.shape != eps_w.shape:
        raise ValueError(f"eps_wo and eps_w must be arrays of one shape, got {_describe(eps_wo)} and "
                         f"{_describe(eps_w)}")
    if isinstance(s, bool) or not (isinstance(s, (int, float, np.integer, np.floating)) or hasattr(s, "shape")):
        raise TypeError(f"s must be a float (the guidance scale), got {type(s).__name__}")
    return eps_wo + s * (eps_w - eps_wo)


def aas_hook(key_mask, query_mask=None, fg_scale: float = 1.0, *, scale: float | None = None):
    """``fn(q, k, v) -> out``: :func:`masked_key_attention` closed over the masks, usable as one entry of
    TinyDiT's ``attn_fns`` (masks ``[B, N]`` over that model's ``N`` tokens)."""
    fg_scale = _check_positive("fg_scale", fg_scale)

    def fn(q, k, v):
        return masked_key_attention(q, k, v, key_mask, query_mask, fg_scale, scale=scale)

    return fn


def token_mask(pixel_mask, grid: int):
    """Max-pools a pixel mask ``[B, S, S]`` (bool) to the ``grid x grid`` tokens and flattens it row-major:
    ``[B, grid * grid]`` bool, True where any pixel of the patch is foreground (the official ``max_pool2d``)."""
    if not hasattr(pixel_mask, "shape") or pixel_mask.ndim != 3 or pixel_mask.shape[1] != pixel_mask.shape[2]:
        raise ValueError(f"pixel_mask must be a bool array [B, S, S], got {_describe(pixel_mask)}")
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1 or pixel_mask.shape[1] % grid:
        raise ValueError(f"grid must be an int >= 1 dividing the mask size {pixel_mask.shape[1]}, got {grid!r}")
    B, S = pixel_mask.shape[:2]
    p = S // grid
    blocks = jnp.asarray(pixel_mask, bool).reshape(B, grid, p, grid, p)
    return blocks.any(axis=(2, 4)).reshape(B, grid * grid)


@dataclasses.dataclass(frozen=True)
class AASSchedule:
    """Where AAS acts: layers ``[start_layer, end_layer)``, denoising steps ``[start_step, end_step)`` (0-based
    index from the first denoising step), similarity suppression with ``ss_scale`` while ``step <= ss_steps``.
    SD1.5 class defaults: start_step 4, end_step 50, layers 10-16, ss_steps 9, ss_scale 1.0."""
    start_layer: int = 0
    end_layer: int = 1
    start_step: int = 0
    end_step: int = 50
    ss_steps: int = 9
    ss_scale: float = 1.0

    def __post_init__(self):
        for name in ("start_layer", "end_layer", "start_step", "end_step", "ss_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.end_layer <= self.start_layer or self.end_step <= self.start_step:
            raise ValueError(f"need start_layer < end_layer and start_step < end_step, got layers "
                             f"[{self.start_layer}, {self.end_layer}) steps [{self.start_step}, {self.end_step})")
        _check_positive("ss_scale", self.ss_scale)

    def active(self, step: int) -> bool:
        return self.start_step <= step < self.end_step

    def attn_fns(self, step: int, token_mask_, *, scale: float | None = None) -> dict:
        """``{layer: hook}`` for denoising step ``step`` with the token mask ``[B, N]`` (``{}`` when inactive).
        The query mask (and the ``ss_scale`` path) is used while ``step <= ss_steps``."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0 (0-based denoising step), got {step!r}")
        if not self.active(step):
            return {}
        suppress = step <= self.ss_steps
        fn = aas_hook(token_mask_, token_mask_ if suppress else None, self.ss_scale if suppress else 1.0,
                      scale=scale)
        return {layer: fn for layer in range(self.start_layer, self.end_layer)}
