"""P10 PIDray / SDANet: the selective dense attention neck, as pure functions and NNX layers on ``[B, H, W, C]``.

Official code ``bywang2018/security-dataset`` ships the neck (``mmdet/models/necks/attfpn.py``) only as compiled
``.pyc``; the structure below is reconstructed from its symbol strings and the paper, so it is **mostly unverified**.
The gather / refine / redistribute skeleton is Libra R-CNN's balanced feature pyramid (mmdet ``BFP``), with the
plain level average replaced by SDANet's three attentions. Given FPN levels ``F_l`` ``[B, H_l, W_l, C]``:

    G_l = resize(F_l, size of the refine level)      adaptive max-pool (larger levels) / nearest (smaller levels)
    (a) channel (dense) attention, SK-style:
        U = sum_l G_l,  s = mean_HW(U) [B, C],  z = relu(s W_s + b_s) [B, d],  d = max(C // reduction, min_hidden)
        a_l = softmax_l(z W_l + b_l) [B, L, C]       (per channel, across levels: sum_l a_l = 1)
        V = sum_l a_l * G_l
    (b) spatial attention: g = sigmoid(conv_kxk([mean_C V, max_C V]) + b) [B, H, W, 1];  S = g * V
    (c) dependency refinement: NonLocal2D (embedded Gaussian, mmcv defaults: reduction 2, scale 1/sqrt(C/2))
        R = S + W_out(softmax(theta(S) phi(S)^T / sqrt(C/2)) g(S)),  W_out zero-initialised (R = S at init)
    out_l = F_l + resize(R, size of level l)          (redistribution, residual add to each level)

The non-local attention runs through ``jattn.attention`` (one head, ``D = C/2``, default scale ``D ** -0.5``).

``DenseAttentionModule`` is the single-map form used as a MODULE after a CNN stage (``train/vision_modules.py``):
it builds its own pyramid from one map, ``levels = [avgpool_s(x) for s in scales]`` (``s = 1`` is ``x`` itself),
runs the neck with the refine level at full resolution and returns level 0: ``x + R``. With zero spatial conv
and bias the gate is 1/2; with one level the channel attention is the identity (``a = 1``).

Deliberate deviations (all documented because the official code cannot be read): the channel attention's "fc" has
no BatchNorm (a BN over a batch of ``[B, d]`` descriptors makes one image's gate depend on the batch); the level
weights follow SKNet (one shared squeeze ``C -> d`` then one ``d -> C`` head per level); spatial kernel 7
(unverified); the single-map module's pyramid is built by average pooling (the paper's levels come from an FPN).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

import jattn

__all__ = ["resize_to", "gather_levels", "channel_select_attention", "spatial_attention", "nonlocal_block",
           "sda_refine", "sda_neck", "SelectiveDenseAttentionNeck", "DenseAttentionModule"]


def _check_image(x, name="x", channels=None):
    if not hasattr(x, "ndim") or x.ndim != 4:
        raise ValueError(f"{name} must be [B, H, W, C] (channels-last), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if channels is not None and x.shape[-1] != channels:
        raise ValueError(f"{name} must have {channels} channels (last axis), got shape {x.shape}")


def resize_to(x, size):
    """``x`` ``[B, h, w, C]`` to ``size = (H, W)``: adaptive max-pool by an integer factor when larger, nearest
    upsampling by an integer factor when smaller (mmdet BFP's gather/redistribute). Non-integer ratios raise."""
    _check_image(x)
    h, w = x.shape[1:3]
    H, W = size
    out = x
    for axis, src, dst in ((1, h, H), (2, w, W)):
        if src == dst:
            continue
        if src > dst:
            if src % dst:
                raise ValueError(f"size {size} must divide the spatial size of x {x.shape} (integer pooling)")
            f = src // dst
            shape = list(out.shape)
            shape[axis:axis + 1] = [dst, f]
            out = jnp.max(out.reshape(shape), axis=axis + 1)
        else:
            if dst % src:
                raise ValueError(f"the spatial size of x {x.shape} must divide size {size} (integer upsampling)")
            out = jnp.repeat(out, dst // src, axis=axis)
    return out


def gather_levels(feats, size):
    """Every level resized to ``size`` and stacked: ``[L, B, H, W, C]``."""
    if not isinstance(feats, (list, tuple)) or not feats:
        raise ValueError(f"feats must be a non-empty list of [B, H, W, C] maps, got {type(feats).__name__}")
    for i, f in enumerate(feats):
        _check_image(f, f"feats[{i}]")
        if f.shape[0] != feats[0].shape[0] or f.shape[-1] != feats[0].shape[-1]:
            raise ValueError(f"feats[{i}] must share batch and channels with feats[0] {feats[0].shape}, got {f.shape}")
    return jnp.stack([resize_to(f, size) for f in feats])


def channel_select_attention(feats, w_s, b_s, w_l, b_l):
    """SK-style selection across levels. ``feats`` ``[L, B, H, W, C]`` (same size), squeeze ``w_s [C, d]``,
    ``b_s [d]``, per-level heads ``w_l [L, d, C]``, ``b_l [L, C]``. Returns ``(V [B, H, W, C], a [B, L, C])``
    with ``a`` a softmax over levels (sums to 1 per channel)."""
    if feats.ndim != 5:
        raise ValueError(f"feats must be [L, B, H, W, C], got shape {feats.shape}")
    L, c = feats.shape[0], feats.shape[-1]
    if w_s.ndim != 2 or w_s.shape[0] != c or b_s.shape != (w_s.shape[1],):
        raise ValueError(f"w_s must be [C={c}, d] and b_s [d], got {w_s.shape} and {b_s.shape}")
    d = w_s.shape[1]
    if w_l.shape != (L, d, c) or b_l.shape != (L, c):
        raise ValueError(f"w_l must be [L={L}, d={d}, C={c}] and b_l [L, C], got {w_l.shape} and {b_l.shape}")
    f = feats.astype(jnp.float32)
    s = jnp.mean(jnp.sum(f, axis=0), axis=(1, 2))                          # [B, C]
    z = jax.nn.relu(s @ w_s + b_s)                                          # [B, d]
    logits = jnp.einsum("bd,ldc->blc", z, w_l) + b_l[None]                  # [B, L, C]
    a = jax.nn.softmax(logits, axis=1)
    v = jnp.einsum("blc,lbhwc->bhwc", a, f)
    return v.astype(feats.dtype), a


def spatial_attention(x, kernel, bias):
    """CBAM-style spatial gate: ``g = sigmoid(conv([mean_C x, max_C x]) + bias)`` with ``kernel [k, k, 2, 1]``
    ("same" zero padding); returns ``(x * g, g [B, H, W, 1])``."""
    _check_image(x)
    if kernel.ndim != 4 or kernel.shape[2:] != (2, 1) or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
        raise ValueError(f"kernel must be [k, k, 2, 1] with k odd, got shape {kernel.shape}")
    if jnp.shape(bias) not in ((), (1,)):
        raise ValueError(f"bias must be a scalar or [1], got shape {jnp.shape(bias)}")
    xf = x.astype(jnp.float32)
    desc = jnp.concatenate([jnp.mean(xf, -1, keepdims=True), jnp.max(xf, -1, keepdims=True)], axis=-1)
    k = kernel.shape[0]
    y = jax.lax.conv_general_dilated(desc, kernel.astype(jnp.float32), (1, 1), [(k // 2, k // 2)] * 2,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    g = jax.nn.sigmoid(y + jnp.reshape(bias, ()))
    return (xf * g).astype(x.dtype), g


def nonlocal_block(x, params):
    """Embedded-Gaussian NonLocal2D: ``x + W_out(softmax(theta phi^T / sqrt(C')) g)`` with 1x1 projections
    ``params = {"theta": (w [C, C'], b [C']), "phi": ..., "g": ..., "out": (w [C', C], b [C])}``; the attention
    runs through ``jattn.attention`` (one head, ``D = C'``, default scale ``C' ** -0.5``)."""
    _check_image(x)
    for key in ("theta", "phi", "g", "out"):
        if key not in params:
            raise ValueError(f"params must hold 'theta', 'phi', 'g' and 'out', missing {key!r}")
    B, H, W, C = x.shape
    inter = params["theta"][0].shape[-1]
    for key in ("theta", "phi", "g"):
        if params[key][0].shape != (C, inter):
            raise ValueError(f"params[{key!r}] weight must be [C={C}, C'={inter}], got {params[key][0].shape}")
    if params["out"][0].shape != (inter, C):
        raise ValueError(f"params['out'] weight must be [C'={inter}, C={C}], got {params['out'][0].shape}")
    t = x.astype(jnp.float32).reshape(B, H * W, C)
    q, k, v = ((t @ params[n][0] + params[n][1])[:, :, None, :] for n in ("theta", "phi", "g"))
    y = jattn.attention(q, k, v)[:, :, 0, :]                                # [B, N, C']
    out = t + y @ params["out"][0] + params["out"][1]
    return out.reshape(B, H, W, C).astype(x.dtype)


def sda_refine(gathered, csa, sa, nl):
    """The fused map from gathered levels ``[L, B, H, W, C]``: channel select -> spatial gate -> non-local.
    ``csa = (w_s, b_s, w_l, b_l)``, ``sa = (kernel, bias)``, ``nl`` the non-local params. Returns
    ``(R, a [B, L, C], g [B, H, W, 1])``."""
    v, a = channel_select_attention(gathered, *csa)
    s, g = spatial_attention(v, *sa)
    return nonlocal_block(s, nl), a, g


@functools.partial(jax.jit, static_argnames=("refine_level",))
def sda_neck(feats, csa, sa, nl, *, refine_level):
    """The whole neck, jitted once: ``(outs, a, g)`` with ``out_l = F_l + resize(R, size_l)`` (module docstring)."""
    feats = list(feats)
    gathered = gather_levels(feats, feats[refine_level].shape[1:3])
    r, a, g = sda_refine(gathered, csa, sa, nl)
    return [f + resize_to(r, f.shape[1:3]).astype(f.dtype) for f in feats], a, g


class _Proj(nnx.Module):
    def __init__(self, cin, cout, std, *, rngs):
        init = nnx.initializers.normal(std) if std is not None else nnx.initializers.zeros_init()
        self.w = nnx.Param(init(rngs.params(), (cin, cout), jnp.float32))
        self.b = nnx.Param(jnp.zeros((cout,), jnp.float32))

    def pair(self):
        return self.w[...], self.b[...]


class SelectiveDenseAttentionNeck(nnx.Module):
    """``SelectiveDenseAttentionNeck(channels, num_levels, refine_level=0, kernel=7, reduction=4)``:
    ``__call__(feats) -> [out_l]`` (same shapes as ``feats``); ``maps(feats) -> (a [B, L, C], g [B, H, W, 1])``."""

    def __init__(self, channels: int, num_levels: int, refine_level: int = 0, kernel: int = 7, reduction: int = 4,
                 min_hidden: int = 8, nonlocal_reduction: int = 2, *, rngs: nnx.Rngs):
        for name, val in (("channels", channels), ("num_levels", num_levels), ("kernel", kernel),
                          ("reduction", reduction), ("min_hidden", min_hidden),
                          ("nonlocal_reduction", nonlocal_reduction)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if not isinstance(refine_level, int) or not 0 <= refine_level < num_levels:
            raise ValueError(f"refine_level must be an int in [0, {num_levels}), got {refine_level!r}")
        if kernel % 2 == 0:
            raise ValueError(f"kernel must be odd, got {kernel}")
        if channels % nonlocal_reduction:
            raise ValueError(f"nonlocal_reduction={nonlocal_reduction} must divide channels={channels}")
        self.channels, self.num_levels, self.refine_level = channels, num_levels, refine_level
        d = max(channels // reduction, min_hidden)
        lecun = nnx.initializers.lecun_normal()
        self.w_s = nnx.Param(lecun(rngs.params(), (channels, d), jnp.float32))
        self.b_s = nnx.Param(jnp.zeros((d,), jnp.float32))
        self.w_l = nnx.Param(lecun(rngs.params(), (num_levels, d, channels), jnp.float32))
        self.b_l = nnx.Param(jnp.zeros((num_levels, channels), jnp.float32))
        self.sa_kernel = nnx.Param(lecun(rngs.params(), (kernel, kernel, 2, 1), jnp.float32))
        self.sa_bias = nnx.Param(jnp.zeros((1,), jnp.float32))
        inter = channels // nonlocal_reduction
        self.theta, self.phi, self.g = (_Proj(channels, inter, 0.01, rngs=rngs) for _ in range(3))
        self.out = _Proj(inter, channels, None, rngs=rngs)                  # zero init: identity refinement

    def _params(self):
        csa = (self.w_s[...], self.b_s[...], self.w_l[...], self.b_l[...])
        nl = {"theta": self.theta.pair(), "phi": self.phi.pair(), "g": self.g.pair(), "out": self.out.pair()}
        return csa, (self.sa_kernel[...], self.sa_bias[...]), nl

    def _refine(self, feats):
        if not isinstance(feats, (list, tuple)) or len(feats) != self.num_levels:
            raise ValueError(f"feats must be a list of {self.num_levels} maps [B, H, W, {self.channels}], got "
                             f"{len(feats) if isinstance(feats, (list, tuple)) else type(feats).__name__}")
        for i, f in enumerate(feats):
            _check_image(f, f"feats[{i}]", self.channels)
        gather_levels(list(feats), feats[self.refine_level].shape[1:3])         # validates before tracing
        return sda_neck(tuple(feats), *self._params(), refine_level=self.refine_level)

    def maps(self, feats):
        """``(a [B, L, C], g [B, H, W, 1])``: level weights and the spatial gate at the refine level."""
        return self._refine(feats)[1:]

    def __call__(self, feats):
        return self._refine(feats)[0]


class DenseAttentionModule(nnx.Module):
    """Single-map SDA module ``x -> x + R`` (module docstring): levels ``avgpool_s(x)`` for ``s`` in ``scales``."""

    def __init__(self, channels: int, scales=(1, 2, 4), kernel: int = 7, reduction: int = 4, min_hidden: int = 8,
                 nonlocal_reduction: int = 2, *, rngs: nnx.Rngs):
        scales = tuple(scales) if isinstance(scales, (list, tuple)) else scales
        if (not isinstance(scales, tuple) or not scales or scales[0] != 1
                or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in scales)):
            raise ValueError(f"scales must be a tuple of positive ints starting with 1, got {scales!r}")
        self.scales, self.channels = scales, channels
        self.neck = SelectiveDenseAttentionNeck(channels, len(scales), 0, kernel, reduction, min_hidden,
                                                nonlocal_reduction, rngs=rngs)

    def levels(self, x):
        _check_image(x, "x", self.channels)
        H, W = x.shape[1:3]
        if H % max(self.scales) or W % max(self.scales):
            raise ValueError(f"the spatial size of x {x.shape} must be divisible by every scale in {self.scales}")
        return [x if s == 1 else nnx.avg_pool(x, (s, s), strides=(s, s)) for s in self.scales]

    def gates(self, x):
        """``(a [B, L, C], g [B, H, W, 1])``: level weights and the spatial gate."""
        return self.neck.maps(self.levels(x))

    def __call__(self, x):
        return self.neck(self.levels(x))[0]

