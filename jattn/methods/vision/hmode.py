"""P56 HMoDE: hierarchical mixture of density experts (Du et al., "Redesigning Multi-Scale Neural Network for Crowd
Counting"), the pixel-wise soft gating over scale experts and its two losses, channels-last ``[B, H, W, C]``.

Not an attention method over tokens: the "attention" is a per-pixel softmax over experts. Verified against the
official code (ZPDu/Redesigning-Multi-Scale-Neural-Network-for-Crowd-Counting, ``HMoDE.py``, ``func.py``,
``train.py``):

* Experts: three density maps ``D1, D2, D3`` from decoder features at three scales (D1 the finest), each from a
  head ``conv1x1(C -> hidden) relu -> conv1x1(hidden -> 1) relu`` (non-negative), ``D2, D3`` nearest-upsampled to
  ``D1``'s resolution.
* Level-1 gating from the coarsest encoder feature ``x5``: ``conv3x3(C5 -> g) relu -> conv1x1(g -> 6) relu``; the 6
  channels split into 3 pairs, softmax over each pair -> ``W12, W13, W23`` (nearest-upsampled)::

      G1 = W12[0] D1 + W12[1] D2,   G2 = W13[0] D1 + W13[1] D3,   G3 = W23[0] D2 + W23[1] D3

* Level 2: spatial attention ``a = sigmoid(conv1x1(relu conv3x3(relu conv3x3(x5))))`` (1 channel), ``x5' = a x5``;
  gating ``depth`` (official 5) ``conv3x3 relu`` layers then ``conv1x1 -> 3`` relu, softmax over the 3 channels ->
  ``W``; ``D = sum_e W[e] G_e``. The count is ``sum_HW D``.
* The ReLU on the gate logits is the official ``Conv2d`` wrapper's default (``NL='relu'``) and is kept
  (``logit_relu=True``); it only matters for training dynamics (logits clipped at 0 before the softmax).
* Expert importance loss ``cv_squared(v) = Var(v) / (Mean(v)^2 + 1e-10)`` (torch ``var`` is unbiased: ddof 1) of
  the per-expert importance ``v_e = sum over batch and pixels of the gate weight of expert e``.
* Relative local counting loss (``func.py``'s ``relloss``): local counts by ``patch x patch`` sum pooling; the
  per-pixel squared-error map sum-pooled the same way; the ``k`` hardest regions (largest pooled error) per image;
  their predicted local counts sorted by ground-truth local count descending; for ``s = 0, 1, 2`` the triplet
  ``(p0, p1, p2) = sorted[s::3][:3]`` is penalised by ``relu(p1 - p0) + relu(p2 - p0) + relu((p0 - p1) - (p0 - p2))``
  (i.e. the predicted local counts must keep the ground-truth order ``p0 >= p1 >= p2``); the loss is
  ``sum(top-k pooled errors) + sum(hinges)``, summed over the batch (the official trainer divides by ``B``).

Defaults: patch 16, k 9, softmax gates, nearest upsampling.

Deliberate deviations:
* ``relative_local_count_loss`` gathers the top-k pooled errors from the *differentiable* error map (the official
  code takes them from a ``.detach()``-ed copy, so that term has no gradient there; here it trains the hard regions).
  The region *selection* and the GT sort are non-differentiable as in the original.
* The public ``HMoDE.py`` returns only the density; its trainer (``train.py``) expects ``(maps, attention,
  importance loss)`` from a model that is not published. ``HMoDEHead`` returns all of them; its
  ``importance_loss`` is ``cv_squared`` over the 3 level-2 importances plus ``cv_squared`` over the 6 level-1 pair
  importances (which of the two the authors used is unverified).
* ``DensityHead(out_bias=...)``: the last bias init (official 0) is an argument, so an output ReLU can start alive.
* ``HMoDEHead`` takes the decoder features and ``x5`` from any backbone (the paper's VGG16-BN encoder and U-decoder
  are not part of it); gate widths (official 256 / 512..2048) are arguments.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["pixelwise_expert_gate", "upsample_nearest", "pair_gates", "hierarchical_mixture", "cv_squared",
           "expert_importance_loss", "local_counts", "relative_order_loss", "relative_local_count_loss",
           "DensityHead", "HMoDEHead", "PAIRS"]

PAIRS = ((0, 1), (0, 2), (1, 2))          # level-1 experts: G1 = {D1, D2}, G2 = {D1, D3}, G3 = {D2, D3}


def _shape(x):
    return getattr(x, "shape", type(x).__name__)


def _check_map(name, x, ndim=4):
    if not hasattr(x, "ndim") or x.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-d array [B, H, W, C] (channels-last), got {_shape(x)}")


def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


# -------------------------------------------------------------------------------------------- pure functions
def pixelwise_expert_gate(logits, experts, axis: int = -1, *, return_weights: bool = False):
    """Per-pixel softmax mixture ``sum_e softmax(logits, axis)[e] * experts[e]``, the expert axis kept (size 1).

    ``logits`` and ``experts`` have the same shape, the experts along ``axis`` (e.g. ``[B, H, W, E]``). Returns the
    mixture (and the weights, which sum to 1 over ``axis`` at every pixel, when ``return_weights``).
    """
    if not hasattr(logits, "shape") or not hasattr(experts, "shape"):
        raise TypeError(f"logits and experts must be arrays, got {type(logits).__name__} and "
                        f"{type(experts).__name__}")
    if logits.shape != experts.shape:
        raise ValueError(f"logits and experts must have the same shape (experts along axis={axis}), got "
                         f"{logits.shape} and {experts.shape}")
    if not isinstance(axis, int) or not -logits.ndim <= axis < logits.ndim:
        raise ValueError(f"axis must be an int in [{-logits.ndim}, {logits.ndim}), got {axis!r}")
    out, w = _gate_core(logits, experts, axis=axis % logits.ndim)
    return (out, w) if return_weights else out


@functools.partial(jax.jit, static_argnames=("axis",))
def _gate_core(logits, experts, *, axis):
    w = jax.nn.softmax(logits.astype(jnp.float32), axis=axis)
    return jnp.sum(w * experts.astype(jnp.float32), axis=axis, keepdims=True).astype(experts.dtype), w


def upsample_nearest(x, size):
    """Nearest upsampling of ``[B, h, w, C]`` to ``[B, H, W, C]`` by integer factors (torch ``mode='nearest'``)."""
    _check_map("x", x)
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    h, w = x.shape[1:3]
    if H % h or W % w:
        raise ValueError(f"size {(H, W)} must be an integer multiple of the input's {(h, w)} (x {x.shape})")
    return jnp.repeat(jnp.repeat(x, H // h, axis=1), W // w, axis=2)


def pair_gates(logits6):
    """``[B, h, w, 6]`` level-1 logits -> ``[B, h, w, 3, 2]`` weights: softmax over each of the 3 channel pairs."""
    _check_map("logits6", logits6)
    if logits6.shape[-1] != 6:
        raise ValueError(f"logits6 must have 6 channels (3 pairs), got shape {logits6.shape}")
    return jax.nn.softmax(logits6.reshape(*logits6.shape[:-1], 3, 2).astype(jnp.float32), axis=-1)


def hierarchical_mixture(experts, logits1, logits2):
    """The two-level HMoDE mixture.

    ``experts`` ``[B, H, W, 3]`` (D1, D2, D3 already at one resolution); ``logits1`` ``[B, h, w, 6]`` and ``logits2``
    ``[B, h, w, 3]`` at any resolution dividing ``H, W`` (nearest-upsampled, as the official gates upsample their
    softmax weights). Returns a dict: ``density`` ``[B, H, W, 1]`` (final D), ``level1`` ``[B, H, W, 3]``
    (G1, G2, G3), ``w1`` ``[B, H, W, 3, 2]`` (W12, W13, W23), ``w2`` ``[B, H, W, 3]`` (W).
    """
    _check_map("experts", experts)
    _check_map("logits1", logits1)
    _check_map("logits2", logits2)
    if experts.shape[-1] != 3:
        raise ValueError(f"experts must have 3 channels (D1, D2, D3), got shape {experts.shape}")
    if logits2.shape[-1] != 3 or logits1.shape[:-1] != logits2.shape[:-1] or logits1.shape[0] != experts.shape[0]:
        raise ValueError(f"logits1 must be [B, h, w, 6] and logits2 [B, h, w, 3] with the batch of experts "
                         f"{experts.shape}, got {logits1.shape} and {logits2.shape}")
    return _mixture_core(experts, logits1, logits2)


@jax.jit
def _mixture_core(experts, logits1, logits2):
    size = experts.shape[1:3]
    w1 = pair_gates(logits1)                                                       # [B, h, w, 3, 2]
    w1 = upsample_nearest(w1.reshape(*w1.shape[:3], 6), size).reshape(*experts.shape[:3], 3, 2)
    pairs = jnp.stack([experts[..., list(p)] for p in PAIRS], axis=-2)             # [B, H, W, 3, 2]
    level1 = jnp.sum(w1 * pairs.astype(jnp.float32), axis=-1)                      # [B, H, W, 3]
    w2 = upsample_nearest(jax.nn.softmax(logits2.astype(jnp.float32), axis=-1), size)
    density = jnp.sum(w2 * level1, axis=-1, keepdims=True)
    return {"density": density.astype(experts.dtype), "level1": level1.astype(experts.dtype), "w1": w1, "w2": w2}


def cv_squared(v, eps: float = 1e-10):
    """``Var(v) / (Mean(v)^2 + eps)`` over a 1-d vector, unbiased variance (torch's default); 0 for one entry."""
    v = jnp.asarray(v, jnp.float32)
    if v.ndim != 1:
        raise ValueError(f"v must be a 1-d vector of per-expert importances, got shape {v.shape}")
    if v.shape[0] < 2:
        return jnp.zeros((), jnp.float32)
    return jnp.var(v, ddof=1) / (jnp.mean(v) ** 2 + eps)


def expert_importance_loss(weights, axis: int = -1):
    """``cv_squared`` of each expert's importance (its gate weights summed over every other axis)."""
    if not hasattr(weights, "ndim") or weights.ndim < 1:
        raise ValueError(f"weights must be an array with an expert axis, got {_shape(weights)}")
    w = jnp.moveaxis(jnp.asarray(weights, jnp.float32), axis, -1)
    return cv_squared(w.reshape(-1, w.shape[-1]).sum(0))


def local_counts(density, patch: int):
    """Sum pooling (``patch x patch``, stride ``patch``) of ``[B, H, W]`` or ``[B, H, W, 1]`` -> ``[B, H/p, W/p]``."""
    patch = _check_int("patch", patch)
    if not hasattr(density, "ndim") or density.ndim not in (3, 4) or (density.ndim == 4 and density.shape[-1] != 1):
        raise ValueError(f"density must be [B, H, W] or [B, H, W, 1], got {_shape(density)}")
    d = density[..., 0] if density.ndim == 4 else density
    B, H, W = d.shape
    if H % patch or W % patch:
        raise ValueError(f"patch={patch} must divide the map size {(H, W)}")
    return d.reshape(B, H // patch, patch, W // patch, patch).sum(axis=(2, 4))


def relative_order_loss(pred_sorted):
    """Order hinge on ``[B, k]`` predicted local counts sorted by GT count descending (``k >= 9``): for ``s`` in
    0, 1, 2 and ``(p0, p1, p2) = pred_sorted[:, s::3][:, :3]``: ``relu(p1 - p0) + relu(p2 - p0) + relu(p2 - p1)``
    (the last written ``relu((p0 - p1) - (p0 - p2))`` in the original). Summed over ``s`` and the batch."""
    if not hasattr(pred_sorted, "ndim") or pred_sorted.ndim != 2 or pred_sorted.shape[1] < 9:
        raise ValueError(f"pred_sorted must be [B, k] with k >= 9, got {_shape(pred_sorted)}")
    loss = jnp.zeros((), jnp.float32)
    for s in range(3):
        p = pred_sorted[:, s::3][:, :3].astype(jnp.float32)
        d1, d2 = p[:, 0] - p[:, 1], p[:, 0] - p[:, 2]
        loss = loss + jnp.sum(jax.nn.relu(-d1) + jax.nn.relu(-d2) + jax.nn.relu(d1 - d2))
    return loss


def relative_local_count_loss(pred, gt, patch: int = 16, k: int = 9):
    """``func.py``'s ``relloss``: sum of the ``k`` largest ``patch``-pooled squared errors per image plus the
    relative order hinge on those regions (module docstring). ``pred``, ``gt``: ``[B, H, W]`` or ``[B, H, W, 1]``
    density maps; ``(H / patch) * (W / patch) >= k >= 9``. Summed over the batch."""
    k = _check_int("k", k, 9)
    for name, x in (("pred", pred), ("gt", gt)):
        if not hasattr(x, "ndim") or x.ndim not in (3, 4):
            raise ValueError(f"{name} must be [B, H, W] or [B, H, W, 1], got {_shape(x)}")
    pred = pred[..., 0] if pred.ndim == 4 else pred
    gt = gt[..., 0] if gt.ndim == 4 else gt
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}")
    if pred.shape[1] % patch or pred.shape[2] % patch:
        raise ValueError(f"patch={patch} must divide the map size {pred.shape[1:]}")
    if (pred.shape[1] // patch) * (pred.shape[2] // patch) < k:
        raise ValueError(f"k={k} exceeds the {(pred.shape[1] // patch) * (pred.shape[2] // patch)} local regions of "
                         f"a {pred.shape[1:]} map at patch={patch}")
    return _relloss_core(pred, gt, patch=patch, k=k)


@functools.partial(jax.jit, static_argnames=("patch", "k"))
def _relloss_core(pred, gt, *, patch, k):
    err = local_counts((pred.astype(jnp.float32) - gt.astype(jnp.float32)) ** 2, patch)
    B = err.shape[0]
    err = err.reshape(B, -1)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(err), k)                         # hardest regions (selection only)
    hard = jnp.take_along_axis(err, idx, axis=1)
    pc = jnp.take_along_axis(local_counts(pred, patch).reshape(B, -1), idx, axis=1)
    gc = jnp.take_along_axis(local_counts(gt, patch).reshape(B, -1), idx, axis=1)
    order = jnp.argsort(-jax.lax.stop_gradient(gc), axis=1, stable=True)           # GT count descending
    return jnp.sum(hard) + relative_order_loss(jnp.take_along_axis(pc, order, axis=1))


# ---------------------------------------------------------------------------------------------------- NNX
class DensityHead(nnx.Module):
    """``conv1x1(C -> hidden) relu -> conv1x1(hidden -> 1) relu``: a non-negative density map ``[B, h, w, 1]``.

    ``out_bias`` initialises the last bias (official 0); a positive value keeps the output ReLU alive at the start
    (with 0 a head whose pre-activations start negative everywhere never trains)."""

    def __init__(self, channels: int, hidden: int = 64, *, out_bias: float = 0.0, rngs: nnx.Rngs):
        channels, hidden = _check_int("channels", channels), _check_int("hidden", hidden)
        self.fc1 = nnx.Conv(channels, hidden, (1, 1), rngs=rngs)
        self.fc2 = nnx.Conv(hidden, 1, (1, 1), bias_init=nnx.initializers.constant(float(out_bias)), rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x))))


def _conv_stack(c_in, width, depth, rngs):
    return nnx.List([nnx.Conv(c_in if i == 0 else width, width, (3, 3), rngs=rngs) for i in range(depth)])


class HMoDEHead(nnx.Module):
    """Three density experts + two-level pixel-wise gating + spatial attention, on features of any backbone.

    ``__call__(features, x5)``: ``features`` = ``(f1, f2, f3)`` channels-last decoder features, finest first, with
    channels ``feature_channels``; ``x5`` ``[B, h5, w5, gate_channels]`` the gating feature (coarsest). Returns a
    dict: ``density`` ``[B, H1, W1, 1]``, ``count`` ``[B]`` (= ``density`` summed over pixels), ``experts``
    ``[B, H1, W1, 3]`` (D1, D2, D3 at f1's resolution), ``level1`` ``[B, H1, W1, 3]``, ``w1``, ``w2`` (gate
    weights at f1's resolution), ``attention`` ``[B, h5, w5, 1]`` (the level-2 spatial attention ``a``) and
    ``importance_loss`` (``cv_squared`` over the 3 level-2 experts plus over the 6 level-1 pair weights).
    """

    def __init__(self, feature_channels, gate_channels: int, *, head_hidden: int = 64, gate_width: int = 256,
                 gate2_width: int | None = None, gate2_depth: int = 5, attention_width: int | None = None,
                 logit_relu: bool = True, out_bias: float = 0.0, rngs: nnx.Rngs):
        if not isinstance(feature_channels, (tuple, list)) or len(feature_channels) != 3:
            raise ValueError(f"feature_channels must be 3 ints (f1, f2, f3 channels), got {feature_channels!r}")
        gate_channels = _check_int("gate_channels", gate_channels)
        gate_width = _check_int("gate_width", gate_width)
        gate2_width = _check_int("gate2_width", gate_width if gate2_width is None else gate2_width)
        attention_width = _check_int("attention_width", gate_width if attention_width is None else attention_width)
        gate2_depth = _check_int("gate2_depth", gate2_depth)
        self.logit_relu = bool(logit_relu)
        self.heads = nnx.List([DensityHead(c, head_hidden, out_bias=out_bias, rngs=rngs) for c in feature_channels])
        self.gate1 = _conv_stack(gate_channels, gate_width, 1, rngs)
        self.gate1_out = nnx.Conv(gate_width, 6, (1, 1), rngs=rngs)
        self.mask = _conv_stack(gate_channels, attention_width, 2, rngs)
        self.mask_out = nnx.Conv(attention_width, 1, (1, 1), rngs=rngs)
        self.gate2 = _conv_stack(gate_channels, gate2_width, gate2_depth, rngs)
        self.gate2_out = nnx.Conv(gate2_width, 3, (1, 1), rngs=rngs)

    def _gate(self, convs, out, x):
        for conv in convs:
            x = jax.nn.relu(conv(x))
        x = out(x)
        return jax.nn.relu(x) if self.logit_relu else x

    def attention(self, x5):
        """Level-2 spatial attention ``a = sigmoid(...)`` ``[B, h5, w5, 1]``."""
        h = x5
        for conv in self.mask:
            h = jax.nn.relu(conv(h))
        return jax.nn.sigmoid(self.mask_out(h))

    def experts(self, features):
        """``[B, H1, W1, 3]``: D1, D2, D3 nearest-upsampled to f1's resolution."""
        if not isinstance(features, (tuple, list)) or len(features) != 3:
            raise ValueError(f"features must be (f1, f2, f3), got {type(features).__name__}")
        for i, f in enumerate(features):
            _check_map(f"features[{i}]", f)
        size = features[0].shape[1:3]
        return jnp.concatenate([upsample_nearest(head(f), size) for head, f in zip(self.heads, features)], axis=-1)

    def __call__(self, features, x5):
        _check_map("x5", x5)
        experts = self.experts(features)
        logits1 = self._gate(self.gate1, self.gate1_out, x5)
        a = self.attention(x5)
        logits2 = self._gate(self.gate2, self.gate2_out, a * x5)
        out = hierarchical_mixture(experts, logits1, logits2)
        out["experts"], out["attention"] = experts, a
        out["count"] = jnp.sum(out["density"], axis=(1, 2, 3))
        out["importance_loss"] = (expert_importance_loss(out["w2"])
                                  + expert_importance_loss(out["w1"].reshape(*out["w1"].shape[:3], 6)))
        return out
