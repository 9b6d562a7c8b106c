"""P14 VAR: Visual Attention Sink detection and Visual Attention Redistribution ("See What You Are Told:
Visual Attention Sink in Large Multimodal Models"; official code ``seilk/VisAttnSink``; the computation
follows ``papers/P00-P24.md``).

A post-softmax score modifier (a ``prob_mod`` on the dense path) for a decoder that attends over
``[image tokens, text tokens]``:

1. **Sink detection** (:func:`detect_sink_tokens`): with ``h`` the layer-input hidden state and
   ``h_hat = h / rms(h)`` (no learned weight), token ``t`` is a sink when ``max_{d in D_sink} |h_hat[t, d]| >
   tau``. ``D_sink`` are the model's massive-activation dimensions (LLaMA-2-7B: {2533, 1415}); a model
   without published ones gets them from :func:`massive_dims` (calibration on held-in data: the dims with
   the largest ``|h_hat|`` peaks). Visual sinks are the sinks inside the image span.
2. **Image-centric rows** (:func:`image_centric_rows`): a (head, query) row is selected when
   ``sum_{I} A >= alpha`` (it looks at the image) and ``sum_{V_s} A / sum_{I} A <= rho`` (the visual sinks do
   not dominate its image attention). Only query rows in ``query_mask`` count (text rows after the image).
3. **Redistribution** (:func:`var_redistribute`): in a selected row every sink token (visual and text)
   keeps ``p`` of its weight, the budget ``Omega = (1 - p) sum_{sinks} A`` goes to the visual non-sink
   tokens ``j in I \\ V_s`` in proportion to their weights: ``A_j += Omega A_j / sum_{I \\ V_s} A``. Row sums
   are preserved; other rows, non-sink text tokens and the image rows are untouched.

Defaults as in the official config: ``tau = 20, rho = 0.5, alpha = 0.2, p = 0.6``, layers ``2 .. L-1``
(skip the first two and the last; the layer choice is the caller's, see ``train/vlm_methods.py``).

Deliberate choices: a selected row with no visual non-sink weight to receive the budget
(``sum_{I \\ V_s} A = 0``) is left unchanged rather than losing mass. ``tau`` is in units of the rms, so
``|h_hat_d| <= sqrt(C)`` bounds it: LLaMA's ``tau = 20`` is 31% of ``sqrt(4096) = 64``; the tiny VLM
(``C = 64``, bound 8) needs a smaller one (:func:`scaled_tau` keeps the same fraction of the bound).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["rms_normalize", "detect_sink_tokens", "massive_dims", "scaled_tau", "image_centric_rows",
           "var_redistribute", "var_prob_mod"]


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    return f"shape {tuple(shape)} dtype {getattr(x, 'dtype', None)}" if shape is not None else type(x).__name__


def _float_array(name, x, ndim):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be a float array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array, got {_describe(x)}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got {_describe(x)}")
    return jnp.asarray(x, jnp.float32)


def _fraction(name, x, low=0.0, high=1.0):
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) or not low <= float(x) <= high:
        raise ValueError(f"{name} must be a float in [{low}, {high}], got {x!r}")
    return float(x)


def rms_normalize(h, eps: float = 1e-6):
    """``h / sqrt(mean(h ** 2, -1) + eps)`` (float32; no learned weight)."""
    if not hasattr(h, "shape") or not jnp.issubdtype(getattr(h, "dtype", np.int32), jnp.floating) or h.ndim < 1:
        raise TypeError(f"h must be a float array [..., C], got {_describe(h)}")
    h = jnp.asarray(h, jnp.float32)
    return h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)


def _dims(sink_dims, C):
    dims = np.asarray(sink_dims).reshape(-1)
    if dims.size == 0 or not np.issubdtype(dims.dtype, np.integer) or dims.min() < 0 or dims.max() >= C:
        raise ValueError(f"sink_dims must be a non-empty list of ints in [0, C={C}), got {sink_dims!r}")
    return dims


def detect_sink_tokens(h, sink_dims, tau: float = 20.0):
    """Sink tokens ``bool [B, T]`` of the layer-input hidden states ``h [B, T, C]``:
    ``max_{d in sink_dims} |rms_normalize(h)[..., d]| > tau``."""
    h = _float_array("h", h, 3)
    dims = _dims(sink_dims, h.shape[-1])
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.integer, np.floating)) or not tau > 0:
        raise ValueError(f"tau must be a positive float (in units of the rms), got {tau!r}")
    return jnp.max(jnp.abs(rms_normalize(h)[..., dims]), axis=-1) > float(tau)


def massive_dims(h, top_k: int = 2, token_mask=None) -> np.ndarray:
    """Calibration: the ``top_k`` dims of ``h [B, T, C]`` with the largest mean (over the batch) peak
    (over tokens in ``token_mask [T]``, all when None) of ``|rms_normalize(h)|`` — the model's
    massive-activation dims, largest first (int array)."""
    h = _float_array("h", h, 3)
    C = h.shape[-1]
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= C:
        raise ValueError(f"top_k must be an int in [1, C={C}], got {top_k!r}")
    a = jnp.abs(rms_normalize(h))
    if token_mask is not None:
        token_mask = np.asarray(token_mask)
        if token_mask.dtype != np.bool_ or token_mask.shape != (h.shape[1],) or not token_mask.any():
            raise ValueError(f"token_mask must be a bool array [T={h.shape[1]}] selecting a token, "
                             f"got {_describe(token_mask)}")
        a = a[:, token_mask]
    score = np.asarray(jnp.mean(jnp.max(a, axis=1), axis=0))
    return np.argsort(-score, kind="stable")[:top_k].astype(np.int32)


def scaled_tau(width: int, tau: float = 20.0, reference_width: int = 4096) -> float:
    """``tau * sqrt(width / reference_width)``: the same fraction of the rms-normalised bound ``sqrt(C)``."""
    for name, n in (("width", width), ("reference_width", reference_width)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be an int >= 1, got {n!r}")
    return float(tau) * float(np.sqrt(width / reference_width))


def _check_layout(probs, is_image, sink, query_mask):
    probs = _float_array("probs", probs, 4)
    B, H, Q, K = probs.shape
    is_image = is_image if hasattr(is_image, "shape") else np.asarray(is_image)
    if is_image.dtype != np.bool_ or tuple(is_image.shape) != (K,):
        raise ValueError(f"is_image must be a bool array [K={K}] (True = image token), got {_describe(is_image)}")
    sink = jnp.asarray(sink)
    if sink.dtype != jnp.bool_ or tuple(sink.shape) not in ((B, K), (1, K)):
        raise ValueError(f"sink must be a bool array [B={B}, K={K}] (True = sink token), got {_describe(sink)}")
    if query_mask is None:
        query_mask = np.ones((Q,), bool)
    query_mask = np.asarray(query_mask) if not hasattr(query_mask, "shape") else query_mask
    if query_mask.dtype != np.bool_ or tuple(query_mask.shape) != (Q,):
        raise ValueError(f"query_mask must be a bool array [Q={Q}] (True = may be redistributed), "
                         f"got {_describe(query_mask)}")
    return probs, jnp.asarray(is_image), sink, jnp.asarray(query_mask)


def image_centric_rows(probs, is_image, sink, *, rho: float = 0.5, alpha: float = 0.2, query_mask=None):
    """Selected (head, query) rows ``bool [B, H, Q]`` of ``probs [B, H, Q, K]``: ``sum_I A >= alpha`` and
    ``sum_{V_s} A <= rho * sum_I A`` (``V_s = sink & is_image``), within ``query_mask [Q]``."""
    probs, is_image, sink, query_mask = _check_layout(probs, is_image, sink, query_mask)
    rho, alpha = _fraction("rho", rho), _fraction("alpha", alpha)
    visual_sink = (sink & is_image)[:, None, None, :]
    image_sum = jnp.sum(jnp.where(is_image, probs, 0.0), -1)
    sink_sum = jnp.sum(jnp.where(visual_sink, probs, 0.0), -1)
    return (image_sum >= alpha) & (sink_sum <= rho * image_sum) & query_mask[None, None, :]


def var_redistribute(probs, is_image, sink, *, rho: float = 0.5, alpha: float = 0.2, p: float = 0.6,
                     query_mask=None):
    """VAR on ``probs [B, H, Q, K]`` (normalised rows): in the :func:`image_centric_rows`, sink tokens
    (``sink [B, K]``, visual and text) keep ``p`` of their weight and the freed mass goes to the visual
    non-sink tokens in proportion to their weights. ``p = 1`` is the identity."""
    probs, is_image, sink, query_mask = _check_layout(probs, is_image, sink, query_mask)
    p = _fraction("p", p)
    selected = image_centric_rows(probs, is_image, sink, rho=rho, alpha=alpha, query_mask=query_mask)
    sink_b = sink[:, None, None, :]
    receiver = (is_image[None, :] & ~sink)[:, None, None, :]
    omega = (1.0 - p) * jnp.sum(jnp.where(sink_b, probs, 0.0), -1, keepdims=True)
    recv_sum = jnp.sum(jnp.where(receiver, probs, 0.0), -1, keepdims=True)
    gain = omega / jnp.where(recv_sum > 0, recv_sum, 1.0)
    new = jnp.where(sink_b, p * probs, jnp.where(receiver, probs * (1.0 + gain), probs))
    apply = (selected[..., None] & (recv_sum > 0))
    return jnp.where(apply, new, probs)


def var_prob_mod(is_image, sink, *, rho: float = 0.5, alpha: float = 0.2, p: float = 0.6, query_mask=None):
    """:func:`var_redistribute` as a ``prob_mod(probs) -> probs`` for ``jattn.attention`` / the dense path."""
    def prob_mod(probs):
        return var_redistribute(probs, is_image, sink, rho=rho, alpha=alpha, p=p, query_mask=query_mask)
    return prob_mod
