"""P72 DiffUHaul (Avrahami et al., "DiffUHaul: A Training-Free Method for Object Dragging in Images"; no official
code: omriav/diffuhaul is the project page only, so the schedules below are the project's reading, unverified):
the generic attention / feature modifiers of its dragging pipeline, usable in any UNet or DiT self-attention.

* :func:`masked_attention` -- gated self-attention masking: a bool mask ``[B, T, S]`` (or ``[B, H, T, S]``;
  True = attend) restricts which keys each query sees, e.g. a blob's layout token to the visual tokens inside
  its blob and visual tokens to their own blob's layout token. ``softmax(q k^T * scale, masked) v`` on
  :func:`jattn.attention` (a fully masked row gives 0).
* :func:`shared_kv_attention` -- attention sharing (MasaCtrl-style): the target image's queries attend over the
  concatenation ``[K_tgt; K_src]``, ``[V_tgt; V_src]`` (one softmax over both), so the target reads the source's
  appearance. ``src_mask`` optionally hides source keys.
* :func:`interpolate_kv` -- soft anchoring: ``K~ = (1 - alpha) K_tgt + alpha K_src``, ``V~`` likewise;
  ``alpha = 0`` is target-only, ``alpha = 1`` the source's K/V; the early, high-noise steps (``t > t_switch``)
  use it.
* :func:`nn_copy_features` -- the later steps: every target token inside ``region`` is replaced by the source
  token nearest to it by cosine similarity (over all source tokens, or the ones in ``src_region``); tokens
  outside ``region`` are kept.
* :func:`blob_leakage` -- the measure of the spec's toy: the attention mass that queries inside a blob put on
  keys outside it.

Defaults: ``alpha`` has none (the paper's ``alpha_t`` schedule is unverified; the experiment uses a constant);
cosine similarity for the nearest neighbour (the paper's "correspondence" is unspecified). The DDPM
self-attention bucketing for real images is not implemented (the toy noises real images with ``q_sample``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jattn.ops.attention import attention as _attention

__all__ = ["masked_attention", "shared_kv_attention", "interpolate_kv", "nn_copy_features", "blob_mask",
           "blob_leakage"]


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    return f"shape {tuple(shape)} dtype {getattr(x, 'dtype', None)}" if shape is not None else type(x).__name__


def _check_array(name, x, ndim, what):
    if not hasattr(x, "shape") or x.ndim != ndim or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array {what}, got {_describe(x)}")


def _check_qkv(q, k, v, kname="k", vname="v"):
    _check_array("q", q, 4, "[B, T, H, D]")
    _check_array(kname, k, 4, "[B, S, Hkv, D]")
    _check_array(vname, v, 4, "[B, S, Hkv, D]")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"q [B, T, H, D], {kname} and {vname} [B, S, Hkv, D] (H a multiple of Hkv) must agree, "
                         f"got q {q.shape}, {kname} {k.shape}, {vname} {v.shape}")


def masked_attention(q, k, v, mask, *, scale: float | None = None, impl: str = "auto"):
    """``softmax(q k^T * scale)`` over the keys ``mask`` allows (True = attend), times ``v``.

    ``mask``: bool ``[B, T, S]`` (shared by the heads) or ``[B, H, T, S]``. Returns ``[B, T, H, D]``."""
    _check_qkv(q, k, v)
    B, T, H, _ = q.shape
    S = k.shape[1]
    if not hasattr(mask, "shape") or mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a bool array [B, T, S] or [B, H, T, S] (True = attend), got {_describe(mask)}")
    if tuple(mask.shape) == (B, T, S):
        mask = mask[:, None]
    elif tuple(mask.shape) != (B, H, T, S):
        raise ValueError(f"mask must be [B={B}, T={T}, S={S}] or [B, H={H}, T, S], got {_describe(mask)}")
    return _attention(q, k, v, mask=mask, scale=scale, impl=impl)


def shared_kv_attention(q_tgt, k_tgt, v_tgt, k_src, v_src, *, src_mask=None, scale: float | None = None,
                        impl: str = "auto"):
    """Target queries over ``[K_tgt; K_src]`` / ``[V_tgt; V_src]`` (concatenated along the key axis, one softmax).

    ``src_mask``: optional bool ``[B, S_src]`` (True = the target may read that source key)."""
    _check_qkv(q_tgt, k_tgt, v_tgt, "k_tgt", "v_tgt")
    _check_qkv(q_tgt, k_src, v_src, "k_src", "v_src")
    if k_src.shape[2] != k_tgt.shape[2]:
        raise ValueError(f"k_src and k_tgt must have the same number of kv heads, got {k_src.shape} and {k_tgt.shape}")
    k = jnp.concatenate([k_tgt, k_src], axis=1)
    v = jnp.concatenate([v_tgt, v_src], axis=1)
    mask = None
    if src_mask is not None:
        B, S_src = k_src.shape[:2]
        if not hasattr(src_mask, "shape") or src_mask.dtype != jnp.bool_ or tuple(src_mask.shape) != (B, S_src):
            raise ValueError(f"src_mask must be a bool array [B={B}, S_src={S_src}], got {_describe(src_mask)}")
        full = jnp.concatenate([jnp.ones((B, k_tgt.shape[1]), bool), src_mask], axis=1)
        mask = full[:, None, None, :]
    return _attention(q_tgt, k, v, mask=mask, scale=scale, impl=impl)


def interpolate_kv(k_src, k_tgt, v_src, v_tgt, alpha):
    """Soft anchoring ``((1 - alpha) k_tgt + alpha k_src, (1 - alpha) v_tgt + alpha v_src)``; ``alpha`` a float
    in [0, 1] or an array broadcastable to the K/V (e.g. ``[B, 1, 1, 1]`` per sample)."""
    for name, x in (("k_src", k_src), ("k_tgt", k_tgt), ("v_src", v_src), ("v_tgt", v_tgt)):
        if not hasattr(x, "shape") or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float array, got {_describe(x)}")
    if k_src.shape != k_tgt.shape or v_src.shape != v_tgt.shape:
        raise ValueError(f"source and target must have one shape, got k_src {k_src.shape} / k_tgt {k_tgt.shape}, "
                         f"v_src {v_src.shape} / v_tgt {v_tgt.shape}")
    if isinstance(alpha, bool) or not (isinstance(alpha, (int, float, np.integer, np.floating)) or hasattr(alpha, "shape")):
        raise TypeError(f"alpha must be a float in [0, 1] or a float array, got {type(alpha).__name__}")
    if not isinstance(alpha, jax.core.Tracer):
        a = np.asarray(alpha, np.float64)
        if not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
            raise ValueError(f"alpha must lie in [0, 1], got values in [{a.min()}, {a.max()}]")
    alpha = jnp.asarray(alpha, jnp.float32)
    mix = lambda src, tgt: ((1.0 - alpha) * tgt + alpha * src).astype(tgt.dtype)
    return mix(k_src, k_tgt), mix(v_src, v_tgt)


def nn_copy_features(f_tgt, f_src, region, *, src_region=None):
    """Replaces target tokens inside ``region`` by their nearest source token (cosine similarity).

    Args:
      f_tgt: ``[B, N, C]`` target features; f_src: ``[B, M, C]`` source features.
      region: bool ``[B, N]``: the target tokens to replace (False = keep).
      src_region: optional bool ``[B, M]``: the source tokens a neighbour may come from (default: all).
    Returns ``(features [B, N, C], index [B, N])`` -- ``index`` the chosen source token of every target token.
    """
    _check_array("f_tgt", f_tgt, 3, "[B, N, C]")
    _check_array("f_src", f_src, 3, "[B, M, C]")
    B, N, C = f_tgt.shape
    if f_src.shape[0] != B or f_src.shape[2] != C:
        raise ValueError(f"f_src must be [B={B}, M, C={C}], got {_describe(f_src)}")
    if not hasattr(region, "shape") or region.dtype != jnp.bool_ or tuple(region.shape) != (B, N):
        raise ValueError(f"region must be a bool array [B={B}, N={N}], got {_describe(region)}")
    norm = lambda f: f / jnp.maximum(jnp.linalg.norm(f.astype(jnp.float32), axis=-1, keepdims=True), 1e-12)
    sim = jnp.einsum("bnc,bmc->bnm", norm(f_tgt.astype(jnp.float32)), norm(f_src.astype(jnp.float32)),
                     precision=jax.lax.Precision.HIGHEST)
    if src_region is not None:
        M = f_src.shape[1]
        if not hasattr(src_region, "shape") or src_region.dtype != jnp.bool_ or tuple(src_region.shape) != (B, M):
            raise ValueError(f"src_region must be a bool array [B={B}, M={M}], got {_describe(src_region)}")
        sim = jnp.where(src_region[:, None, :], sim, -jnp.inf)
    index = jnp.argmax(sim, axis=-1)
    copied = jnp.take_along_axis(f_src, index[..., None], axis=1)
    return jnp.where(region[..., None], copied, f_tgt).astype(f_tgt.dtype), index


def blob_mask(blob):
    """The region-restricting mask of the toy: ``[B, N, N]`` bool, True where query and key lie on the same side
    of the blob (``blob [B, N]`` bool): blob tokens see only blob tokens, the rest only the rest."""
    if not hasattr(blob, "shape") or blob.dtype != jnp.bool_ or blob.ndim != 2:
        raise ValueError(f"blob must be a bool array [B, N], got {_describe(blob)}")
    return blob[:, :, None] == blob[:, None, :]


def blob_leakage(probs, blob):
    """Mean attention mass that queries inside ``blob`` put on keys outside it: ``probs [B, H, N, N]`` (rows sum
    to 1), ``blob [B, N]`` bool. Returns ``[B]`` (the mean over the blob's queries and the heads; NaN for an
    empty blob)."""
    if not hasattr(probs, "shape") or probs.ndim != 4 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"probs must be [B, H, N, N], got {_describe(probs)}")
    B, _, N, _ = probs.shape
    if not hasattr(blob, "shape") or blob.dtype != jnp.bool_ or tuple(blob.shape) != (B, N):
        raise ValueError(f"blob must be a bool array [B={B}, N={N}], got {_describe(blob)}")
    outside = jnp.sum(probs * (~blob)[:, None, None, :], axis=-1)          # [B, H, N]
    w = blob[:, None, :].astype(probs.dtype)
    return jnp.sum(outside * w, axis=(1, 2)) / (jnp.sum(w, axis=(1, 2)) * probs.shape[1])
