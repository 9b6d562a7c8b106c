"""P00 DAAM and P01 GAAM: the Gaussian adaptive feature gate (density adaptive attention), as NNX layers.

Both papers (P00 "DAAM-Speech", official code ``sdsuai/depression_audio_processing`` ``models_pytorch.py``;
P01 "Gaussian Adaptive Attention is All You Need", ``gioannides/Gaussian-Adaptive-Attention``) use the same gate.
It is a feature-recalibration gate, not query-key attention. For an input ``x`` and a normalisation axis ``a``:

1. ``mu = mean_a(x)``, ``var = var_a(x, unbiased) + eps`` (``eps = 1e-8``);
2. for each of ``N_g`` Gaussians ``i`` with a learnable mean offset ``delta_i`` (init 0) and scale ``c_i``:
   ``y_i = (x - (mu + delta_i)) / sqrt(var)``;
3. ``mode="product"`` (P00 DAAM, and P01's ``GaussianBlock.py``): ``w = prod_i exp(-y_i^2 / (2 c_i^2)) /
   sqrt(2 pi c_i^2)``; ``mode="mixture"`` (P01's pip-package ``MHGAAM.py``): ``w = sum_i softmax(pi)_i
   exp(-y_i^2 / (2 c_i^2))`` with learnable mixture logits ``pi`` (init 1) and no ``1/sqrt(2 pi c^2)`` factor;
4. ``w <- w / max(sum_a w, eps)``; output ``x * w``.

Multi-head: axis ``a`` is split into ``num_heads`` contiguous chunks, each with its own ``(delta, c[, pi])``; the
statistics and the normalisation of step 4 are per chunk. ``DensityBlock`` adds the residual of ``GaussianBlock``:
``x + gate(x)``.

Which is which: ``daam(...)`` builds the P00 layer (product, ``c`` init ``randn`` as in the speech repo);
``gaam(...)`` builds the P01 ``MHGAAM`` layer (mixture, ``c`` init 2.0); ``MultiHeadDensityGate(mode="product",
c_init="exp_randn")`` is P01's ``GaussianBlock.py`` head. Parameters per head: ``2 N_g`` (+ ``N_g`` mixture logits).

Layout: any rank >= 2; ``axis`` picks the gated axis. Images are ``[B, H, W, C]`` (``axis=-1`` gates channels);
DAAM's speech use is the same layer on a 1-D feature sequence ``[B, T, F]`` (``axis=-1``: the mel/frequency axis).

Deliberate deviations: no ``padding_value`` masking of the statistics (not implemented); the product is computed
literally in float32 like the released code, so very many sharp Gaussians can underflow to a zero gate there too.
``importance_factor`` (P01's "Importance Factor") has no published formula: here it is the gate averaged over every
axis except the gated one and renormalised to sum to 1 -- a labelled stand-in, not the paper's definition.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["density_gate", "multi_head_density_gate", "importance_factor", "MultiHeadDensityGate", "DensityBlock",
           "daam", "gaam"]

_MODES = ("product", "mixture")


def _check_axis(x, axis, name="axis"):
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"{name} must be an int, got {type(axis).__name__}")
    if x.ndim < 2:
        raise ValueError(f"x must have rank >= 2 (e.g. [B, T, F] or [B, H, W, C]), got shape {x.shape}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{name}={axis} is out of range for x of rank {x.ndim} (shape {x.shape})")
    return axis % x.ndim


def _check_params(delta, c, weights, mode):
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    delta, c = jnp.asarray(delta), jnp.asarray(c)
    if delta.ndim != 1 or c.shape != delta.shape:
        raise ValueError(f"delta and c must be 1-D of equal length [N_g], got delta {delta.shape} and c {c.shape}")
    if mode == "mixture":
        if weights is None:
            raise ValueError("weights (mixture logits [N_g]) are required when mode='mixture', got None")
        if jnp.shape(weights) != delta.shape:
            raise ValueError(f"weights must have shape {delta.shape}, got {jnp.shape(weights)}")
    elif weights is not None:
        raise ValueError("weights must be None when mode='product' (mixture logits only exist in mixture mode)")


@functools.partial(jax.jit, static_argnames=("ax", "mode", "eps"))
def _gate_core(x, delta, c, weights, *, ax, mode, eps):
    """Heads-vectorised gate: ``delta``, ``c`` (``weights``) are ``[heads, N_g]``; ``ax`` is non-negative."""
    heads, ng = delta.shape
    xf = jnp.moveaxis(x.astype(jnp.float32), ax, -1)
    lead = xf.shape[:-1]
    xf = xf.reshape(lead + (heads, xf.shape[-1] // heads))            # [..., heads, chunk]
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.var(xf, axis=-1, keepdims=True, ddof=1) + eps
    shape = (ng,) + (1,) * len(lead) + (heads, 1)
    d = jnp.asarray(delta, jnp.float32).T.reshape(shape)
    cc = jnp.asarray(c, jnp.float32).T.reshape(shape)
    y = (xf[None] - (mu[None] + d)) / jnp.sqrt(var)[None]             # [N_g, ..., heads, chunk]
    kern = jnp.exp(-(y ** 2) / (2.0 * cc ** 2))
    if mode == "product":
        w = jnp.prod(kern / jnp.sqrt(2.0 * math.pi * cc ** 2), axis=0)
    else:
        pi = jax.nn.softmax(jnp.asarray(weights, jnp.float32), axis=-1).T.reshape(shape)
        w = jnp.sum(pi * kern, axis=0)
    w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), eps)
    out = (xf * w).reshape(lead + (-1,))
    w = w.reshape(lead + (-1,))
    return jnp.moveaxis(out, -1, ax).astype(x.dtype), jnp.moveaxis(w, -1, ax)


def density_gate(x, delta, c, weights=None, *, axis=-1, mode="product", eps=1e-8):
    """Returns ``(x * w, w)``: the single-head Gaussian gate of steps 1-4 along ``axis``."""
    ax = _check_axis(x, axis)
    _check_params(delta, c, weights, mode)
    if x.shape[ax] < 2:
        raise ValueError(f"x must have >= 2 entries along axis {axis} (unbiased variance), got shape {x.shape}")
    w = None if weights is None else jnp.asarray(weights)[None]
    return _gate_core(x, jnp.asarray(delta)[None], jnp.asarray(c)[None], w, ax=ax, mode=mode, eps=float(eps))


def multi_head_density_gate(x, delta, c, weights=None, *, axis=-1, mode="product", eps=1e-8):
    """Multi-head gate: ``delta``, ``c`` (and ``weights``) are ``[num_heads, N_g]``; axis split into contiguous chunks.

    Returns ``(out, w)`` with ``w`` the per-position gate (each head chunk sums to 1 along ``axis``)."""
    ax = _check_axis(x, axis)
    delta, c = jnp.asarray(delta), jnp.asarray(c)
    if delta.ndim != 2 or c.shape != delta.shape:
        raise ValueError(f"delta and c must be [num_heads, N_g] of equal shape, got {delta.shape} and {c.shape}")
    heads = delta.shape[0]
    if x.shape[ax] % heads:
        raise ValueError(f"x's size {x.shape[ax]} along axis {axis} must be divisible by num_heads={heads} "
                         f"(shape {x.shape})")
    if x.shape[ax] // heads < 2:
        raise ValueError(f"each head chunk needs >= 2 entries along axis {axis} (unbiased variance); x {x.shape}, "
                         f"num_heads={heads}")
    _check_params(delta[0], c[0], None if weights is None else jnp.asarray(weights)[0], mode)
    if weights is not None and jnp.shape(weights) != delta.shape:
        raise ValueError(f"weights must have shape {delta.shape}, got {jnp.shape(weights)}")
    return _gate_core(x, delta, c, weights, ax=ax, mode=mode, eps=float(eps))


def importance_factor(w, *, axis=-1):
    """Labelled stand-in for P01's Importance Factor: gate ``w`` averaged over all axes but ``axis``, summing to 1."""
    ax = _check_axis(w, axis, "axis")
    m = jnp.mean(w, axis=tuple(i for i in range(w.ndim) if i != ax))
    return m / jnp.sum(m)


def _init_c(c_init, key, shape):
    if c_init == "randn":
        return jax.random.normal(key, shape, jnp.float32)
    if c_init == "exp_randn":
        return jnp.exp(jax.random.normal(key, shape, jnp.float32))
    if isinstance(c_init, (int, float)) and not isinstance(c_init, bool) and c_init != 0:
        return jnp.full(shape, float(c_init), jnp.float32)
    raise ValueError(f"c_init must be 'randn', 'exp_randn' or a nonzero number, got {c_init!r}")


class MultiHeadDensityGate(nnx.Module):
    """Multi-head Gaussian adaptive gate (DAAM/GAAM). ``__call__(x) -> x * w``; ``gate(x) -> w``."""

    def __init__(self, num_heads: int = 4, num_gaussians: int = 4, *, axis: int = -1, mode: str = "product",
                 c_init="randn", eps: float = 1e-8, rngs: nnx.Rngs):
        for name, val in (("num_heads", num_heads), ("num_gaussians", num_gaussians)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.num_heads, self.num_gaussians, self.axis, self.mode, self.eps = num_heads, num_gaussians, axis, mode, eps
        shape = (num_heads, num_gaussians)
        self.delta = nnx.Param(jnp.zeros(shape, jnp.float32))
        self.c = nnx.Param(_init_c(c_init, rngs.params(), shape))
        self.mix_logits = nnx.Param(jnp.ones(shape, jnp.float32)) if mode == "mixture" else None

    def _apply(self, x):
        w = None if self.mix_logits is None else self.mix_logits[...]
        return multi_head_density_gate(x, self.delta[...], self.c[...], w, axis=self.axis, mode=self.mode,
                                       eps=self.eps)

    def gate(self, x):
        return self._apply(x)[1]

    def __call__(self, x):
        return self._apply(x)[0]


class DensityBlock(nnx.Module):
    """``GaussianBlock`` layer: ``x + MultiHeadDensityGate(x)`` (the residual of the released code)."""

    def __init__(self, num_heads: int = 4, num_gaussians: int = 4, **kwargs):
        self.gate = MultiHeadDensityGate(num_heads, num_gaussians, **kwargs)

    def __call__(self, x):
        return x + self.gate(x)


def daam(num_heads: int = 4, num_gaussians: int = 24, *, axis: int = -1, rngs: nnx.Rngs) -> MultiHeadDensityGate:
    """P00 DAAM (speech CNN-LSTM defaults: 4 heads, 24 Gaussians): product mode, ``c ~ randn``."""
    return MultiHeadDensityGate(num_heads, num_gaussians, axis=axis, mode="product", c_init="randn", rngs=rngs)


def gaam(num_heads: int = 4, num_gaussians: int = 4, *, axis: int = -1, rngs: nnx.Rngs) -> MultiHeadDensityGate:
    """P01 GAAM (``MHGAAM.py``): mixture mode, ``c = 2.0``, mixture logits 1."""
    return MultiHeadDensityGate(num_heads, num_gaussians, axis=axis, mode="mixture", c_init=2.0, rngs=rngs)
