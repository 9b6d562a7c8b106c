"""P17 ACAM-KD (Lan & Tian, ICCV 2025, arXiv 2503.06307): Adaptive and Cooperative Attention Masking for
feature Knowledge Distillation, and the plain feature-KD baseline it is compared against.

No official code exists ("Code: N/A"); the computation below follows the paper's description as summarised in
papers/P00-P24.md and the public paper notes, and every choice the text leaves open is marked *unverified*.

Features are token maps ``[B, N, C]`` (``N = H * W`` flattened spatial positions). The teacher feature
``f_t [B, N, Ct]`` is frozen (``stop_gradient`` inside the losses); the student feature ``f_s [B, N, Cs]`` is
first aligned to the teacher's channels by a learned 1x1 projection ``phi(f_s) = f_s @ W_align + b_align``.

* **STCA-FF** (:func:`stca_fusion`), student-teacher cross-attention feature fusion: the teacher asks, the
  student answers. ``Q = f_t W_q``, ``K = phi(f_s) W_k``, ``V = phi(f_s) W_v`` (per head ``d = C / heads``),
  ``F_fuse = softmax(Q K^T / sqrt(d)) V`` through :func:`jattn.attention` (non-causal, ``[B, N, heads, d]``).
  No residual and no output projection (unverified: the paper notes mention "+ residual/projection").
* **ASCM** (:func:`ascm_masks`), adaptive spatial-channel masking, ``M`` masks generated from ``F_fuse`` each
  step (so they move with the student): spatial masks ``M^s = sigmoid(F_fuse W_s + b_s)`` (a 1x1 conv,
  ``[B, M, N]``); channel masks ``M^c = sigmoid(GAP_N(F_fuse) W_c + b_c)`` (global average pool then one FC,
  ``[B, M, C]``). Sigmoid for both (unverified; a softmax over positions is the other reading).
* **Masked distillation** (:func:`masked_distill_loss`), with ``D = (f_t - phi(f_s))^2`` and each mask's loss
  normalised by its mass (the public notes give ``L^c = 1/M sum_m 1/(HW sum_k M^c_mk) sum ...``):
  ``L^s = 1/M sum_m sum_{n,c} M^s_mn D_nc / (C sum_n M^s_mn)``,
  ``L^c = 1/M sum_m sum_{n,c} M^c_mc D_nc / (N sum_c M^c_mc)``, per sample, then the batch mean;
  ``combine="separate"`` returns ``w_s L^s + w_c L^c`` (default ``1, 1``). ``combine="product"`` is the spec's
  reading, one joint mask per ``m``: ``1/M sum_m sum M^s_mn M^c_mc D_nc / (sum_n M^s_mn sum_c M^c_mc)``.
  All-ones masks reduce either form to the plain MSE (``separate`` gives ``(w_s + w_c) MSE``).
* **Diversity** (:func:`mask_diversity_loss`): the mean pairwise Dice coefficient between the ``M`` masks of a
  sample, ``2 <m_i, m_j> / (|m_i|^2 + |m_j|^2)`` over ``i < j`` (MasKD's Dice diversity, which ACAM-KD's
  "diversity loss" is read as; unverified), applied to the spatial and to the channel masks. It is 0 for masks
  with disjoint support and 1 for identical masks.
* **Total** (:func:`acam_kd_loss`): ``L = L_distill + div_weight * (Div(M^s) + Div(M^c))``; the task loss is added
  by the caller. The masks' generator and the fusion weights are trained by this loss together with the
  student (the spec: "masks evolve with the student each step"); the teacher gets no gradient.
* **Baseline** (:func:`feature_kd_loss`): plain feature KD, ``mean((f_t - phi(f_s))^2)`` with the same 1x1
  projection ``phi``.

Defaults (all unverified, the paper's are not public): ``num_masks = 4``, one fusion head, ``div_weight = 1``.
Parameters are a plain dict from :func:`init_params`; every function here is pure and jit-able.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import jattn

_EPS = 1e-6
_PARAM_SHAPES = ("align_w", "align_b", "w_q", "w_k", "w_v", "spatial_w", "spatial_b", "channel_w", "channel_b")


def _check_feature(name, f, ndim=3):
    if not hasattr(f, "shape") or not hasattr(f, "dtype"):
        raise TypeError(f"{name} must be an array [B, N, C], got {type(f).__name__}")
    if f.ndim != ndim:
        raise ValueError(f"{name} must be [B, N, C] (rank 3), got shape {f.shape}")


def _check_pair(f_t, f_s):
    _check_feature("f_t", f_t)
    _check_feature("f_s", f_s)
    if f_t.shape[:2] != f_s.shape[:2]:
        raise ValueError(f"f_t and f_s must share [B, N]; got f_t {f_t.shape} and f_s {f_s.shape}")


def _check_params(params, keys):
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict from init_params, got {type(params).__name__}")
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValueError(f"params is missing {missing}; expected the keys of init_params: {list(_PARAM_SHAPES)}")


def _pos_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def init_params(key, student_dim: int, teacher_dim: int, *, num_masks: int = 4) -> dict:
    """Align projection (``student_dim -> teacher_dim``), fusion ``W_q, W_k, W_v`` (``teacher_dim`` square) and the
    two mask generators, LeCun-normal weights and zero biases."""
    for name, v in (("student_dim", student_dim), ("teacher_dim", teacher_dim), ("num_masks", num_masks)):
        _pos_int(name, v)
    ks = jax.random.split(key, 6)
    C = teacher_dim

    def lin(k, fan_in, fan_out):
        return jax.random.normal(k, (fan_in, fan_out), jnp.float32) * fan_in ** -0.5

    return {"align_w": lin(ks[0], student_dim, C), "align_b": jnp.zeros((C,), jnp.float32),
            "w_q": lin(ks[1], C, C), "w_k": lin(ks[2], C, C), "w_v": lin(ks[3], C, C),
            "spatial_w": lin(ks[4], C, num_masks), "spatial_b": jnp.zeros((num_masks,), jnp.float32),
            "channel_w": lin(ks[5], C, num_masks * C), "channel_b": jnp.zeros((num_masks * C,), jnp.float32)}


def align(f_s, params):
    """The 1x1 projection ``phi(f_s) = f_s @ align_w + align_b``: ``[B, N, Cs] -> [B, N, Ct]``."""
    _check_feature("f_s", f_s)
    _check_params(params, ("align_w", "align_b"))
    if f_s.shape[-1] != params["align_w"].shape[0]:
        raise ValueError(f"f_s has {f_s.shape[-1]} channels but params['align_w'] expects "
                         f"{params['align_w'].shape[0]}")
    return f_s @ params["align_w"] + params["align_b"]


def stca_fusion(f_t, f_s_aligned, params, *, num_heads: int = 1):
    """STCA-FF: ``softmax((f_t W_q)(phi(f_s) W_k)^T / sqrt(d)) (phi(f_s) W_v)`` -> ``F_fuse [B, N, C]``.

    The teacher's tokens are the queries; keys and values come from the (aligned) student."""
    _check_pair(f_t, f_s_aligned)
    _check_params(params, ("w_q", "w_k", "w_v"))
    _pos_int("num_heads", num_heads)
    B, N, C = f_t.shape
    if f_s_aligned.shape[-1] != C:
        raise ValueError(f"f_s_aligned must have the teacher's {C} channels (align it first), got "
                         f"{f_s_aligned.shape[-1]}")
    if C % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide the channel count {C}")
    d = C // num_heads
    q = (f_t @ params["w_q"]).reshape(B, N, num_heads, d)
    k = (f_s_aligned @ params["w_k"]).reshape(B, N, num_heads, d)
    v = (f_s_aligned @ params["w_v"]).reshape(B, N, num_heads, d)
    return jattn.attention(q, k, v, causal=False).reshape(B, N, C)


def ascm_masks(f_fuse, params):
    """ASCM: ``(spatial [B, M, N], channel [B, M, C])``, both in (0, 1), generated from ``F_fuse [B, N, C]``:
    ``sigmoid(F_fuse W_s + b_s)`` per position and ``sigmoid(mean_N(F_fuse) W_c + b_c)`` per channel."""
    _check_feature("f_fuse", f_fuse)
    _check_params(params, ("spatial_w", "spatial_b", "channel_w", "channel_b"))
    B, N, C = f_fuse.shape
    if params["spatial_w"].shape[0] != C:
        raise ValueError(f"f_fuse has {C} channels but params['spatial_w'] expects {params['spatial_w'].shape[0]}")
    M = params["spatial_w"].shape[1]
    if params["channel_w"].shape != (C, M * C):
        raise ValueError(f"params['channel_w'] must be [{C}, {M * C}] for {M} masks, got {params['channel_w'].shape}")
    spatial = jax.nn.sigmoid(f_fuse @ params["spatial_w"] + params["spatial_b"])        # [B, N, M]
    channel = jax.nn.sigmoid(f_fuse.mean(1) @ params["channel_w"] + params["channel_b"])  # [B, M * C]
    return jnp.swapaxes(spatial, 1, 2), channel.reshape(B, M, C)


def masked_distill_loss(f_t, f_s_aligned, spatial, channel, *, combine: str = "separate",
                        spatial_weight: float = 1.0, channel_weight: float = 1.0):
    """Mask-normalised squared error between ``f_t`` and ``phi(f_s)`` (see the module docstring). ``spatial``
    ``[B, M, N]`` and ``channel`` ``[B, M, C]`` are non-negative masks. Returns a scalar."""
    _check_pair(f_t, f_s_aligned)
    B, N, C = f_t.shape
    if f_s_aligned.shape != f_t.shape:
        raise ValueError(f"f_s_aligned must match f_t {f_t.shape}, got {f_s_aligned.shape}")
    if not hasattr(spatial, "shape") or spatial.ndim != 3 or spatial.shape[0] != B or spatial.shape[2] != N:
        raise ValueError(f"spatial must be [B, M, N] = [{B}, M, {N}], got {getattr(spatial, 'shape', spatial)}")
    M = spatial.shape[1]
    if not hasattr(channel, "shape") or channel.shape != (B, M, C):
        raise ValueError(f"channel must be [B, M, C] = [{B}, {M}, {C}], got {getattr(channel, 'shape', channel)}")
    if combine not in ("separate", "product"):
        raise ValueError(f"combine must be 'separate' or 'product', got {combine!r}")
    diff2 = jnp.square(jax.lax.stop_gradient(f_t).astype(jnp.float32) - f_s_aligned.astype(jnp.float32))
    spatial, channel = spatial.astype(jnp.float32), channel.astype(jnp.float32)
    s_mass = spatial.sum(-1)                                   # [B, M]
    c_mass = channel.sum(-1)
    if combine == "product":
        num = jnp.einsum("bmn,bmc,bnc->bm", spatial, channel, diff2)
        return (num / (s_mass * c_mass + _EPS)).mean()
    per_pos = diff2.sum(-1)                                    # [B, N]: summed over channels
    per_ch = diff2.sum(1)                                      # [B, C]: summed over positions
    l_s = jnp.einsum("bmn,bn->bm", spatial, per_pos) / (C * s_mass + _EPS)
    l_c = jnp.einsum("bmc,bc->bm", channel, per_ch) / (N * c_mass + _EPS)
    return spatial_weight * l_s.mean() + channel_weight * l_c.mean()


def mask_diversity_loss(masks):
    """Mean pairwise Dice coefficient between the ``M`` masks ``[B, M, K]`` of each sample (``i < j``), averaged
    over the batch: 0 for disjoint masks, 1 for identical ones. One mask gives 0."""
    if not hasattr(masks, "shape") or masks.ndim != 3:
        raise ValueError(f"masks must be [B, M, K], got {getattr(masks, 'shape', type(masks).__name__)}")
    M = masks.shape[1]
    if M < 2:
        return jnp.zeros((), jnp.float32)
    m = masks.astype(jnp.float32)
    inner = jnp.einsum("bik,bjk->bij", m, m)
    sq = jnp.diagonal(inner, axis1=1, axis2=2)                 # [B, M]
    dice = 2 * inner / (sq[:, :, None] + sq[:, None, :] + _EPS)
    iu = jnp.triu(jnp.ones((M, M), bool), k=1)
    return (dice * iu).sum((1, 2)).mean() / (M * (M - 1) / 2)


def acam_kd_loss(f_t, f_s, params, *, num_heads: int = 1, div_weight: float = 1.0, combine: str = "separate",
                 spatial_weight: float = 1.0, channel_weight: float = 1.0):
    """The full ACAM-KD term for raw student features ``f_s [B, N, Cs]``: align, fuse (teacher queries, student
    keys/values), generate masks from the fusion, masked distillation + ``div_weight`` x diversity.

    Returns ``(loss, aux)`` with ``aux = {"distill", "diversity", "spatial", "channel"}`` (the masks)."""
    _check_pair(f_t, f_s)
    f_t = jax.lax.stop_gradient(f_t)
    f_s_aligned = align(f_s, params)
    fused = stca_fusion(f_t, f_s_aligned, params, num_heads=num_heads)
    spatial, channel = ascm_masks(fused, params)
    distill = masked_distill_loss(f_t, f_s_aligned, spatial, channel, combine=combine,
                                  spatial_weight=spatial_weight, channel_weight=channel_weight)
    diversity = mask_diversity_loss(spatial) + mask_diversity_loss(channel)
    return distill + div_weight * diversity, {"distill": distill, "diversity": diversity, "spatial": spatial,
                                              "channel": channel}


def feature_kd_loss(f_t, f_s, params):
    """Plain feature KD (the baseline): ``mean((f_t - phi(f_s))^2)`` with the same 1x1 projection ``phi``;
    only ``align_w``/``align_b`` of ``params`` are read."""
    _check_pair(f_t, f_s)
    diff = jax.lax.stop_gradient(f_t).astype(jnp.float32) - align(f_s, params).astype(jnp.float32)
    return jnp.mean(jnp.square(diff))
