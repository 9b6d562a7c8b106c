"""P68 A-SDM — "global-regional interactive" (GRI) attention: a GRI-STYLE RECONSTRUCTION, not the paper's code.

A-SDM (arXiv 2312.15516, "Accelerating Stable Diffusion through Redundancy Removal and Performance
Optimization"; the latest arXiv version is marked withdrawn) is mostly a UNet-pruning paper. Its GRI
attention is described only in words ("regional attention for local detail plus interaction with global
tokens"); no code exists. What jattn ships is the generic reading the spec asks for, clearly labelled as a
reconstruction: window (regional) attention whose keys/values are augmented with average-pooled global tokens.

The computation, for image tokens on an ``h x w`` grid (row-major, ``N = h * w``), regions of ``wh x ww``
tokens (non-overlapping tiles; ``wh | h``, ``ww | w``) and pool factor ``ph x pw`` (``ph | h``, ``pw | w``)::

    K_bar[Y, X] = mean_{dy < ph, dx < pw} K[Y ph + dy, X pw + dx]        (same for V_bar; P = N / (ph pw))
    keys    = [K (N) ; K_bar (P)],   values = [V ; V_bar]
    allowed(i, j) = region(i) == region(j)        for j < N       (regional branch)
                  = True                          for j >= N      (every query sees every global token)
    out = softmax(q keys^T * scale, masked by allowed) values        (one joint softmax over both branches)

Average-pooling K and V equals projecting average-pooled inputs (``pool(x) W + b = pool(x W + b)``), so the
pooled tokens are what "down-sample the feature map, then project" gives.

Two forms, equal up to float rounding (tested):

* ``form="masked"`` — the literal definition: :func:`jattn.attention` over ``[K ; K_bar]`` with the boolean
  mask :func:`gri_mask` (``[N, N + P]``). It forms all ``N (N + P)`` logits, so it saves nothing; it is the
  specification the tests check against.
* ``form="regions"`` (default) — the same attention computed per region: the tokens are gathered into
  ``(h / wh) (w / ww)`` regions, each region's queries attend to ``[its wh ww keys ; the P global keys]`` with
  :func:`jattn.attention` (batch = ``B x regions``). Logits per query: ``wh ww + P`` instead of ``N``.

Identities (the spec's tests): ``window = (h, w)`` with ``pool=None`` is dense attention; ``pool = 1`` makes
``K_bar = K``, so every key of the query's region appears twice (logit + log 2) and every other key once —
with ``window = (h, w)`` that is exactly dense attention again (duplicating every key is the identity).

:func:`gri_attention_flops` counts the ``QK^T`` and ``PV`` multiply-adds (``4 B H D x logits``) of the
regions form against dense attention: at ``16`` tokens (4x4 grid, window 2, pool 2) 8 vs 16 keys per query
(2x); at ``4096`` tokens (64x64, window 8, pool 8) 128 vs 4096 (32x).

Defaults: ``scale = D ** -0.5``; ``pool=None`` (no global branch). Deviations: everything (region shape,
pooling, the joint softmax) is this library's reading of an unspecified component; no learned pooling
weights (CLEAR's P63 branch learns per-offset weights; GRI as described pools by averaging).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jattn.core import checks
from jattn.ops.attention import attention

__all__ = ["gri_mask", "avg_pool_tokens", "global_regional_attention", "gri_attention_flops", "FORMS"]

FORMS = ("regions", "masked")


def _pair(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    return checks.check_int_tuple(name, value, 2, what="(rows, cols)" + (" or None" if allow_none else ""))


def _geometry(hw, window, pool):
    """Validated ``(h, w), (wh, ww), (ph, pw) | None``: window and pool must tile the grid."""
    h, w = checks.check_int_tuple("hw", hw, 2, what="(h, w)")
    wh, ww = _pair("window", window)
    if h % wh or w % ww:
        raise ValueError(f"window={window!r} must divide the grid hw={(h, w)} (regions are non-overlapping tiles)")
    pool = _pair("pool", pool, allow_none=True)
    if pool is not None and (h % pool[0] or w % pool[1]):
        raise ValueError(f"pool={pool!r} must divide the grid hw={(h, w)}")
    return (h, w), (wh, ww), pool


def gri_mask(hw, window, pool=None) -> np.ndarray:
    """The boolean mask ``[N, N + P]`` over ``[K ; K_bar]`` (row-major tokens, row-major pooled tokens): a
    query attends the keys of its own ``window`` region and every pooled key. ``P = 0`` when ``pool=None``."""
    (h, w), (wh, ww), pool = _geometry(hw, window, pool)
    rows, cols = np.divmod(np.arange(h * w), w)
    region = (rows // wh) * (w // ww) + cols // ww
    regional = region[:, None] == region[None, :]
    num_pooled = 0 if pool is None else (h // pool[0]) * (w // pool[1])
    return np.concatenate([regional, np.ones((h * w, num_pooled), bool)], axis=1)


def avg_pool_tokens(x, hw, pool):
    """``x [B, N, Hk, D]`` (row-major ``h x w`` tokens) -> ``[B, (h/ph)(w/pw), Hk, D]``: the mean of each
    ``ph x pw`` tile, pooled tokens row-major. Accumulates in float32, returns ``x``'s dtype."""
    (h, w), _, pool = _geometry(hw, 1, pool)
    if pool is None:
        raise ValueError("pool must be an int or an (rows, cols) pair to pool tokens, got None")
    checks.check_float_array("x", x, 4)
    B, N, Hk, D = x.shape
    if N != h * w:
        raise ValueError(f"x must hold hw={(h, w)} -> {h * w} tokens on axis 1, got {checks.describe(x)}")
    ph, pw = pool
    tiles = x.astype(jnp.float32).reshape(B, h // ph, ph, w // pw, pw, Hk, D)
    return tiles.mean(axis=(2, 4)).reshape(B, (h // ph) * (w // pw), Hk, D).astype(x.dtype)


def _to_regions(x, hw, window):
    """``[B, N, Hk, D]`` -> ``[B * R, wh * ww, Hk, D]`` (regions row-major, tokens row-major inside)."""
    (h, w), (wh, ww) = hw, window
    B, _, Hk, D = x.shape
    x = x.reshape(B, h // wh, wh, w // ww, ww, Hk, D).transpose(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(B * (h // wh) * (w // ww), wh * ww, Hk, D)


def _from_regions(x, B, hw, window):
    (h, w), (wh, ww) = hw, window
    _, _, H, D = x.shape
    x = x.reshape(B, h // wh, w // ww, wh, ww, H, D).transpose(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(B, h * w, H, D)


def global_regional_attention(q, k, v, *, hw, window, pool=None, scale: float | None = None,
                              form: str = "regions", impl: str = "auto"):
    """GRI-style attention (reconstruction; see the module docstring): ``q [B, N, H, D]``, ``k, v [B, N, Hkv,
    D]`` over an ``hw = (h, w)`` token grid (``N = h w``, row-major); ``window`` (int or pair) the region tile,
    ``pool`` (int, pair or ``None``) the average-pool factor of the global tokens. Returns ``[B, N, H, D]``."""
    checks.check_choice("form", form, FORMS)
    B, T, S, H, Hkv, D = checks.check_qkv(q, k, v)
    (h, w), (wh, ww), pool = _geometry(hw, window, pool)
    if T != S or T != h * w:
        raise ValueError(f"q, k, v must hold hw={(h, w)} -> {h * w} tokens (self-attention over the grid), got "
                         f"q {checks.describe(q)}, k {checks.describe(k)}")
    scale = checks.check_positive_float("scale", scale)
    scale = D ** -0.5 if scale is None else scale
    pooled = None if pool is None else (avg_pool_tokens(k, (h, w), pool), avg_pool_tokens(v, (h, w), pool))
    if form == "masked":
        keys = k if pooled is None else jnp.concatenate([k, pooled[0]], axis=1)
        values = v if pooled is None else jnp.concatenate([v, pooled[1]], axis=1)
        mask = jnp.asarray(gri_mask((h, w), (wh, ww), pool))
        return attention(q, keys, values, mask=mask[None, None], scale=scale, impl=impl)
    regions = (h // wh) * (w // ww)
    qr, kr, vr = (_to_regions(x, (h, w), (wh, ww)) for x in (q, k, v))
    if pooled is not None:
        P = pooled[0].shape[1]

        def tile(x):  # the same P global tokens for every region of a batch element
            return jnp.broadcast_to(x[:, None], (B, regions, P, Hkv, D)).reshape(B * regions, P, Hkv, D)

        kr = jnp.concatenate([kr, tile(pooled[0])], axis=1)
        vr = jnp.concatenate([vr, tile(pooled[1])], axis=1)
    out = attention(qr, kr, vr, scale=scale, impl=impl)
    return _from_regions(out, B, (h, w), (wh, ww))


def gri_attention_flops(hw, window, pool=None, *, heads: int = 1, head_dim: int = 64, batch: int = 1) -> dict:
    """Multiply-add FLOPs (``2`` per MAC) of ``QK^T`` plus ``PV`` for the regions form and for dense
    attention over the same grid: ``{"keys_per_query", "dense_keys_per_query", "gri_flops", "dense_flops",
    "ratio"}`` (ratio = dense / GRI). Pooling itself (``O(N D)``) is not counted."""
    (h, w), (wh, ww), pool = _geometry(hw, window, pool)
    heads, head_dim, batch = (checks.check_int(n, x) for n, x in
                              (("heads", heads), ("head_dim", head_dim), ("batch", batch)))
    N = h * w
    keys = wh * ww + (0 if pool is None else N // (pool[0] * pool[1]))
    per_key = 4 * batch * heads * head_dim * N          # 2 FLOPs x (QK^T + PV) per query-key pair
    return {"tokens": N, "keys_per_query": keys, "dense_keys_per_query": N, "gri_flops": per_key * keys,
            "dense_flops": per_key * N, "ratio": N / keys}
