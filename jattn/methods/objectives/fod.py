"""P54 FOD (Yao et al., ICCV 2023, "Focus the Discrepancy: Intra- and Inter-Correlation Learning for Image
Anomaly Detection"; official code xcyao00/FOD: models/attention.py, models/model.py, losses.py, trainer.py).

Patch tokens ``x [B, L, C]`` of an ``h x w`` grid (``L = h*w``) are reconstructed by a small transformer whose
attention maps are trained against a 2-D Gaussian prior over patch distance:

* **Attention2D** (one per branch): ``S = softmax((d/H)^-1/2 Q K^T)`` per head, and from the *query* input a
  per-query, per-head pair of widths ``s = Linear(x) -> [B, L, H, 2]``, ``sigma = 3^(sigmoid(5 s) + 1e-5) - 1``
  (``sigma_y, sigma_x``). The target prior (:func:`gaussian_prior_attention_target`)
  ``T_ij = 1/(2 pi sy sx) * exp(-dy_ij^2/(2 sy^2) - dx_ij^2/(2 sx^2))`` with ``dy, dx`` the grid offsets of
  patches ``i, j``, row-normalised before any loss uses it.
* **I2Correlation layer** (:func:`i2correlation_layer`): intra = self-attention(x, x, x); inter =
  cross-attention(x, ref, ref) where ``ref`` is the embedded mean normal-image feature at each position (plus a
  learned position embedding); ``new = (x + intra) - (x + inter)``; then post-norm ``z = LN1(new)``,
  ``out = LN2(z + FFN(z))`` (GELU FFN). The encoder ends with a LayerNorm and a linear projection back to C.
* **Losses** (:func:`fod_losses`). ``KL(p||q) = sum_keys p (log(p + 1e-4) - log(q + 1e-4))`` (the code's eps),
  ``KL_sym = KL(p||q) + KL(q||p)``, ``Ent(p) = -sum_keys p log(p + 1e-4)``; each averaged over heads, tokens and
  batch, then over layers. ``rec = MSE(out, x) + mean(1 - cos(out, x))`` (cosine over channels). The official
  step backpropagates two losses on one graph:

      loss1 = rec + l1 KL_sym(T, sg S_intra) - l1 KL_sym(T, sg S_inter)          (trains the sigma branch)
      loss2 = rec - l1 KL_sym(sg T, S_intra) - l2 Ent(S_intra)
                  + l1 KL_sym(sg T, S_inter) + l2 Ent(S_inter)                      (trains the attention maps)

  whose summed gradient is the gradient of ``loss1 + loss2``. :func:`fod_losses` returns
  ``total = (loss1 + loss2) / 2``: the same direction (Adam, the paper's optimiser, is invariant to the constant
  factor up to its eps), and with ``l1 = l2 = 0`` it is exactly ``rec``, the plain-reconstruction baseline.
  Defaults ``l1 = l2 = 0.5``.
* **Score** (:func:`fod_anomaly_score`), per patch: ``rec_score = mean_c (x - out)^2 + 1 - cos(x, out)``;
  ``pi = softmax_over_patches(-KL_sym(S_inter, T_inter) * temperature)`` (layer-averaged, heads averaged);
  ``inter_score = max(pi) - pi``; ``score = rec_score * inter_score``. The official test runs batch 1 and takes
  the max over the whole tensor; here the max is per image (the same thing for batch 1).

Deliberate deviations: the official Attention2D computes ``out_projection(out)`` and discards the result (the
spec calls it a bug); here ``use_out_projection=True`` (default) applies it, ``False`` reproduces the code.
Frozen WideResNet features are out of reach (no download), so callers supply their own patch features
(``train/anomaly.py`` uses raw pixel patches). Dropout is 0 (the FOD class default).
Everything is a pure function over a params pytree (dicts of arrays), jit-able; sizes are static.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core.reference import reference_attention

__all__ = ["KL_EPS", "LAMBDA1", "LAMBDA2", "grid_sq_distances", "sigma_from_logits",
           "gaussian_prior_attention_target", "normalize_rows", "kl_div", "sym_kl", "row_entropy", "rec_loss",
           "rec_score", "init_attention2d", "attention2d", "init_i2correlation_layer", "i2correlation_layer",
           "init_fod", "fod_forward", "fod_losses", "fod_anomaly_score", "reference_features"]

KL_EPS = 1e-4  # losses.py: log(p + 0.0001)
LAMBDA1 = 0.5
LAMBDA2 = 0.5


def _grid(grid_hw) -> tuple[int, int]:
    if (not isinstance(grid_hw, (tuple, list)) or len(grid_hw) != 2
            or any(isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1 for g in grid_hw)):
        raise ValueError(f"grid_hw must be a pair of ints >= 1 (h, w), got {grid_hw!r}")
    return int(grid_hw[0]), int(grid_hw[1])


def _same_shape(name_a, a, name_b, b):
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")


def grid_sq_distances(grid_hw) -> tuple[np.ndarray, np.ndarray]:
    """Squared row and column offsets ``(dy^2, dx^2)``, each ``[L, L]`` float32, of the row-major ``h x w`` grid
    (create_distance_maps.py)."""
    h, w = _grid(grid_hw)
    rows, cols = np.divmod(np.arange(h * w), w)
    dy2 = (rows[:, None] - rows[None, :]).astype(np.float32) ** 2
    dx2 = (cols[:, None] - cols[None, :]).astype(np.float32) ** 2
    return dy2, dx2


def sigma_from_logits(s):
    """``3^(sigmoid(5 s) + 1e-5) - 1``: the learned Gaussian width, in (~1e-5, ~2) grid cells."""
    return jnp.power(3.0, jax.nn.sigmoid(5.0 * s) + 1e-5) - 1.0


def normalize_rows(t):
    """``t / t.sum(-1, keepdims=True)``."""
    return t / jnp.sum(t, axis=-1, keepdims=True)


def gaussian_prior_attention_target(sigma_y, sigma_x, grid_hw, *, normalize: bool = True):
    """The Gaussian distance prior ``T [..., L, L]`` from per-query widths ``sigma_y, sigma_x [..., L]``.

    ``T_ij = 1/(2 pi sy_i sx_i) exp(-dy_ij^2/(2 sy_i^2) - dx_ij^2/(2 sx_i^2))``; rows normalised to sum 1
    when ``normalize`` (how every loss and score uses it)."""
    h, w = _grid(grid_hw)
    sigma_y, sigma_x = jnp.asarray(sigma_y, jnp.float32), jnp.asarray(sigma_x, jnp.float32)
    _same_shape("sigma_y", sigma_y, "sigma_x", sigma_x)
    if sigma_y.ndim < 1 or sigma_y.shape[-1] != h * w:
        raise ValueError(f"sigma_y must be [..., L] with L = h*w = {h * w}, got shape {sigma_y.shape}")
    dy2, dx2 = grid_sq_distances((h, w))
    sy, sx = sigma_y[..., None], sigma_x[..., None]
    t = 1.0 / (2 * math.pi * sy * sx) * jnp.exp(-dy2 / (2 * sy ** 2) - dx2 / (2 * sx ** 2))
    return normalize_rows(t) if normalize else t


def kl_div(p, q, eps: float = KL_EPS):
    """``KL(p||q) = sum_keys p (log(p + eps) - log(q + eps))`` per row: ``[..., L, S] -> [..., L]``."""
    p, q = jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)
    _same_shape("p", p, "q", q)
    return jnp.sum(p * (jnp.log(p + eps) - jnp.log(q + eps)), axis=-1)


def sym_kl(p, q, eps: float = KL_EPS):
    """Symmetric KL ``KL(p||q) + KL(q||p)`` per row (``>= 0``, 0 iff ``p == q``)."""
    return kl_div(p, q, eps) + kl_div(q, p, eps)


def row_entropy(p, eps: float = KL_EPS):
    """``-sum_keys p log(p + eps)`` per row."""
    p = jnp.asarray(p, jnp.float32)
    return -jnp.sum(p * jnp.log(p + eps), axis=-1)


def _check_tokens(name, x, ndim=3):
    x = jnp.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must be [B, L, C] ({ndim} dims), got shape {x.shape}")
    return x


def rec_loss(out, x):
    """``MSE(out, x) + mean(1 - cos(out, x))``, MSE over every element, cosine over the last (channel) axis."""
    out, x = jnp.asarray(out, jnp.float32), jnp.asarray(x, jnp.float32)
    _same_shape("out", out, "x", x)
    return jnp.mean((out - x) ** 2) + jnp.mean(1.0 - _cos(out, x))


def _cos(a, b, eps: float = 1e-8):
    """torch's CosineSimilarity(dim=-1): a.b / max(|a| |b|, eps)."""
    return jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), eps)


def rec_score(out, x):
    """Per-token reconstruction score ``mean_c (x - out)^2 + 1 - cos(x, out)``: ``[B, L, C] -> [B, L]``."""
    out, x = jnp.asarray(out, jnp.float32), jnp.asarray(x, jnp.float32)
    _same_shape("out", out, "x", x)
    return jnp.mean((x - out) ** 2, -1) + 1.0 - _cos(x, out)


# ---------------------------------------------------------------------------------------------- parameters

def _dense(key, d_in, d_out):
    """torch.nn.Linear's default init: U(-1/sqrt(d_in), 1/sqrt(d_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(d_in)
    kw, kb = jax.random.split(key)
    return {"w": jax.random.uniform(kw, (d_in, d_out), jnp.float32, -bound, bound),
            "b": jax.random.uniform(kb, (d_out,), jnp.float32, -bound, bound)}


def _apply(p, x):
    return x @ p["w"] + p["b"]


def _layer_norm(p, x, eps: float = 1e-5):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, -1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _ln(d):
    return {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}


def _check_dims(d_model, num_heads):
    for name, v in (("d_model", d_model), ("num_heads", num_heads)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if d_model % num_heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads})")


@functools.partial(jax.jit, static_argnames=("d_model", "num_heads"))
def init_attention2d(key, d_model: int, num_heads: int) -> dict:
    """Params of one Attention2D: q, k, v, out projections and the sigma projection ``d_model -> 2 H``."""
    _check_dims(d_model, num_heads)
    kq, kk, kv, ks, ko = jax.random.split(key, 5)
    return {"q": _dense(kq, d_model, d_model), "k": _dense(kk, d_model, d_model), "v": _dense(kv, d_model, d_model),
            "sigma": _dense(ks, d_model, 2 * num_heads), "out": _dense(ko, d_model, d_model)}


def attention2d(params, query, key, value, *, num_heads: int, grid_hw, use_out_projection: bool = True):
    """One Attention2D: ``(out [B, L, d], probs [B, H, L, S], target [B, H, L, S])``, the target row-normalised.

    The target needs ``S == L`` (keys on the same grid as the queries: self- or position-aligned
    cross-attention)."""
    query, key, value = (_check_tokens(n, a) for n, a in (("query", query), ("key", key), ("value", value)))
    B, L, d = query.shape
    S = key.shape[1]
    _check_dims(d, num_heads)
    h, w = _grid(grid_hw)
    if L != h * w or S != L:
        raise ValueError(f"query and key must both have L = h*w = {h * w} tokens, got {L} and {S}")
    dh = d // num_heads
    q = _apply(params["q"], query).reshape(B, L, num_heads, dh)
    k = _apply(params["k"], key).reshape(B, S, num_heads, dh)
    v = _apply(params["v"], value).reshape(B, S, num_heads, dh)
    out, probs = reference_attention(q, k, v, scale=dh ** -0.5, return_probs=True)
    out = out.reshape(B, L, d)
    if use_out_projection:
        out = _apply(params["out"], out)
    sigma = sigma_from_logits(_apply(params["sigma"], query).reshape(B, L, num_heads, 2))
    sigma = jnp.transpose(sigma, (0, 2, 1, 3))  # [B, H, L, 2]
    target = gaussian_prior_attention_target(sigma[..., 0], sigma[..., 1], (h, w))
    return out, probs, target


@functools.partial(jax.jit, static_argnames=("d_model", "num_heads", "d_ff"))
def init_i2correlation_layer(key, d_model: int, num_heads: int, d_ff: int | None = None) -> dict:
    """Params of one I2Correlation encoder layer (intra and inter Attention2D, FFN, two LayerNorms)."""
    d_ff = 4 * d_model if d_ff is None else d_ff
    ki, ke, k1, k2 = jax.random.split(key, 4)
    return {"intra": init_attention2d(ki, d_model, num_heads), "inter": init_attention2d(ke, d_model, num_heads),
            "ffn1": _dense(k1, d_model, d_ff), "ffn2": _dense(k2, d_ff, d_model), "norm1": _ln(d_model),
            "norm2": _ln(d_model)}


def i2correlation_layer(x, ref, params, *, num_heads: int, grid_hw, use_out_projection: bool = True,
                        with_inter: bool = True):
    """One I2Correlation layer: ``(out, intra_probs, intra_target, inter_probs, inter_target)``.

    ``new = (x + intra(x, x, x)) - (x + inter(x, ref, ref))``, ``z = LN1(new)``, ``out = LN2(z + FFN(z))``.
    ``ref [B or 1, L, d]`` is broadcast over the batch. ``with_inter=False`` is the official code's
    reconstruction-only layer: ``new = x + intra(x, x, x)`` (a plain post-norm transformer layer; ``ref`` unused,
    the inter maps returned as None)."""
    x = _check_tokens("x", x)
    ref = _check_tokens("ref", ref)
    if ref.shape[1:] != x.shape[1:] or ref.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"ref must be [B or 1, L, d] matching x {x.shape}, got {ref.shape}")
    ref = jnp.broadcast_to(ref, x.shape)
    kw = dict(num_heads=num_heads, grid_hw=grid_hw, use_out_projection=use_out_projection)
    intra, intra_p, intra_t = attention2d(params["intra"], x, x, x, **kw)
    if with_inter:
        inter, inter_p, inter_t = attention2d(params["inter"], x, ref, ref, **kw)
        new = (x + intra) - (x + inter)
    else:
        inter_p = inter_t = None
        new = x + intra
    z = _layer_norm(params["norm1"], new)
    y = _apply(params["ffn2"], jax.nn.gelu(_apply(params["ffn1"], z), approximate=False))
    return _layer_norm(params["norm2"], z + y), intra_p, intra_t, inter_p, inter_t


def init_fod(key, in_dim: int, grid_hw, *, d_model: int = 64, num_heads: int = 4, num_layers: int = 2,
             d_ff: int | None = None) -> dict:
    """Params of the FOD reconstructor: token and reference embeddings (linear + learned 2-D position embedding),
    ``num_layers`` I2Correlation layers, a final LayerNorm and the projection back to ``in_dim``.
    (FOD's class defaults are d_model 512, 4 heads, 3 layers; the small defaults here fit CPU experiments.)"""
    return _init_fod(key, in_dim, _grid(grid_hw), d_model, num_heads, num_layers, d_ff)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _init_fod(key, in_dim, grid_hw, d_model, num_heads, num_layers, d_ff):
    h, w = _grid(grid_hw)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
    _check_dims(d_model, num_heads)
    keys = jax.random.split(key, num_layers + 5)
    return {"embed": _dense(keys[0], in_dim, d_model),
            "pos": 0.02 * jax.random.normal(keys[1], (h * w, d_model), jnp.float32),
            "ref_embed": _dense(keys[2], in_dim, d_model),
            "ref_pos": 0.02 * jax.random.normal(keys[3], (h * w, d_model), jnp.float32),
            "layers": [init_i2correlation_layer(k, d_model, num_heads, d_ff) for k in keys[5:]],
            "norm": _ln(d_model), "proj": _dense(keys[4], d_model, in_dim)}


def fod_forward(params, x, ref, *, num_heads: int, grid_hw, use_out_projection: bool = True,
                with_inter: bool = True):
    """``x [B, L, C]`` patch features, ``ref [L, C]`` mean normal features -> ``(out [B, L, C], maps)`` with
    ``maps = dict(intra_probs, intra_targets, inter_probs, inter_targets)``, each a list (one per layer) of
    ``[B, H, L, L]`` (the inter lists empty when ``with_inter=False``, the official reconstruction-only model)."""
    x = _check_tokens("x", x)
    ref = jnp.asarray(ref, jnp.float32)
    if ref.shape != x.shape[1:]:
        raise ValueError(f"ref must be [L, C] = {x.shape[1:]}, got {ref.shape}")
    e = _apply(params["embed"], x) + params["pos"]
    r = (_apply(params["ref_embed"], ref) + params["ref_pos"])[None]
    maps = {k: [] for k in ("intra_probs", "intra_targets", "inter_probs", "inter_targets")}
    for layer in params["layers"]:
        e, *layer_maps = i2correlation_layer(e, r, layer, num_heads=num_heads, grid_hw=grid_hw,
                                             use_out_projection=use_out_projection, with_inter=with_inter)
        for name, m in zip(maps, layer_maps):
            if m is not None:
                maps[name].append(m)
    return _apply(params["proj"], _layer_norm(params["norm"], e)), maps


def _mean_over_layers(fn, *lists):
    """The layer mean of ``mean(fn(...))``; 0 for no layers (a model without that branch)."""
    if not lists[0]:
        return jnp.float32(0.0)
    return sum(jnp.mean(fn(*args)) for args in zip(*lists)) / len(lists[0])


def _weight(name, v):
    """A loss weight: a finite Python number, or a 0-d array (so one compiled step serves every weight)."""
    if isinstance(v, (jax.Array, np.ndarray)) and v.ndim == 0 and jnp.issubdtype(v.dtype, jnp.floating):
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError(f"{name} must be a finite float or a 0-d float array, got {v!r}")
    return float(v)


def fod_losses(out, x, maps, *, lambda1: float = LAMBDA1, lambda2: float = LAMBDA2) -> dict:
    """The two official FOD losses and their optimisation target (see the module docstring).

    Returns ``dict(total, loss1, loss2, rec, intra_kl, inter_kl, intra_entropy, inter_entropy)``;
    ``total = (loss1 + loss2) / 2``, exactly ``rec`` when ``lambda1 = lambda2 = 0``."""
    lambda1, lambda2 = _weight("lambda1", lambda1), _weight("lambda2", lambda2)
    sg = jax.lax.stop_gradient
    rec = rec_loss(out, x)
    ip, it, ep, et = maps["intra_probs"], maps["intra_targets"], maps["inter_probs"], maps["inter_targets"]
    # loss1's terms: gradients reach the targets (sigma) only; loss2's: the attention maps only
    intra_t_side = _mean_over_layers(lambda t, p: sym_kl(t, sg(p)), it, ip)
    inter_t_side = _mean_over_layers(lambda t, p: sym_kl(t, sg(p)), et, ep)
    intra_p_side = _mean_over_layers(lambda t, p: sym_kl(sg(t), p), it, ip)
    inter_p_side = _mean_over_layers(lambda t, p: sym_kl(sg(t), p), et, ep)
    intra_ent = _mean_over_layers(row_entropy, ip)
    inter_ent = _mean_over_layers(row_entropy, ep)
    loss1 = rec + lambda1 * intra_t_side - lambda1 * inter_t_side
    loss2 = rec - lambda1 * intra_p_side - lambda2 * intra_ent + lambda1 * inter_p_side + lambda2 * inter_ent
    return {"total": 0.5 * (loss1 + loss2), "loss1": loss1, "loss2": loss2, "rec": rec,
            "intra_kl": intra_p_side, "inter_kl": inter_p_side, "intra_entropy": intra_ent,
            "inter_entropy": inter_ent}


def fod_anomaly_score(out, x, maps, *, temperature: float = 1.0, use_inter: bool = True):
    """Per-patch anomaly scores ``[B, L]``: ``rec_score * inter_score`` (``use_inter=False``, or a model without
    the inter branch: ``rec_score``).

    ``inter_score = max(pi) - pi``, ``pi = softmax_L(-temperature * KL_sym(S_inter, T_inter))``, KL averaged
    over heads and layers; the max is per image."""
    r = rec_score(out, x)
    if not use_inter or not maps["inter_probs"]:
        return r
    ep, et = maps["inter_probs"], maps["inter_targets"]
    corrs = sum(jnp.mean(sym_kl(p, t), axis=1) for p, t in zip(ep, et)) / len(ep)  # [B, L]
    pi = jax.nn.softmax(-corrs * temperature, axis=-1)
    return r * (jnp.max(pi, axis=-1, keepdims=True) - pi)


def reference_features(features) -> np.ndarray:
    """The mean normal feature per position, ``[N, L, C] -> [L, C]`` (create_ref_features.py's reference)."""
    features = np.asarray(features, np.float32)
    if features.ndim != 3:
        raise ValueError(f"features must be [N, L, C], got shape {features.shape}")
    return features.mean(0)
