"""P06 ULSAM: Ultra-Lightweight Subspace Attention Module, as an NNX layer on ``[B, H, W, C]``.

Official code ``Nandan91/ULSAM`` (``ulsam.py``: ``SubSpace``, ``ULSAM``). The ``C`` channels are split into ``g``
contiguous groups ``F_n`` of ``C/g`` channels (``torch.chunk``). Per group:

    DW conv 1x1 (groups = C/g, with bias) -> BatchNorm -> ReLU -> MaxPool 3x3 stride 1 pad 1 (-inf padding)
    -> PW conv 1x1 C/g -> 1 (with bias) -> BatchNorm -> ReLU -> softmax over the H*W positions = map A_n [B, H, W, 1]
    F_hat_n = A_n * F_n + F_n            (output = x * (1 + A), A broadcast over the group's channels)

and the groups are concatenated back. All groups run at once here: the per-group DW convs are one per-channel
scale+bias over ``C`` channels, the per-group BN(C/g) are one per-channel BN over ``C``, the per-group PW convs are
one grouped 1x1 conv ``C -> g`` (``feature_group_count=g``) and the per-group BN(1) are one BN over ``g`` channels:
the same parameters and the same arithmetic. Parameters: convs ``3C + g`` (DW ``2C``, PW ``C + g``), BN affine
``2C + 2g``; BN running statistics ``2C + 2g`` more (state, not parameters).

BatchNorm: the code's ``momentum=0.9`` is PyTorch's convention (``running = 0.1 running + 0.9 batch``), i.e. flax
``momentum=0.1``; ``eps = 1e-5``. Batch statistics in training mode, running ones after ``.eval()``.
Deliberate deviation: flax updates the running variance with the biased batch variance (PyTorch: unbiased).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ULSAM", "ulsam_apply", "subspace_softmax", "ulsam_combine", "max_pool_3x3"]


def _check_image(x, channels=None, name="x"):
    if x.ndim != 4:
        raise ValueError(f"{name} must be [B, H, W, C] (channels-last), got shape {x.shape}")
    if channels is not None and x.shape[-1] != channels:
        raise ValueError(f"{name} must have {channels} channels in its last axis (channels-last [B, H, W, C]), "
                         f"got shape {x.shape}")


def max_pool_3x3(x):
    """3x3 max pool, stride 1, padding 1 with -inf (PyTorch ``MaxPool2d(3, 1, 1)``) on ``[B, H, W, C]``."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


def subspace_softmax(logits):
    """Softmax of ``[B, H, W, g]`` over the H*W positions, per batch element and group."""
    _check_image(logits, name="logits")
    b, h, w, g = logits.shape
    return jax.nn.softmax(logits.reshape(b, h * w, g).astype(jnp.float32), axis=1).reshape(b, h, w, g)


def ulsam_combine(x, maps):
    """``x * (1 + A)`` with group ``n``'s map ``maps[..., n]`` broadcast over its ``C/g`` contiguous channels."""
    _check_image(x)
    _check_image(maps, name="maps")
    c, g = x.shape[-1], maps.shape[-1]
    if c % g or maps.shape[:3] != x.shape[:3]:
        raise ValueError(f"maps must be [B, H, W, g] with g dividing C, matching x {x.shape}; got {maps.shape}")
    a = jnp.repeat(maps, c // g, axis=-1)
    return (x.astype(jnp.float32) * (1.0 + a)).astype(x.dtype)


class ULSAM(nnx.Module):
    """``ULSAM(channels, num_groups)``: ``__call__(x) -> x * (1 + A)``, ``maps(x) -> A [B, H, W, g]``."""

    def __init__(self, channels: int, num_groups: int = 4, *, rngs: nnx.Rngs):
        for name, val in (("channels", channels), ("num_groups", num_groups)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if channels % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide channels={channels}")
        self.channels, self.num_groups = channels, num_groups
        self.dw = nnx.Conv(channels, channels, (1, 1), feature_group_count=channels, use_bias=True, rngs=rngs)
        self.bn_dw = nnx.BatchNorm(channels, momentum=0.1, epsilon=1e-5, rngs=rngs)
        self.pw = nnx.Conv(channels, num_groups, (1, 1), feature_group_count=num_groups, use_bias=True, rngs=rngs)
        self.bn_pw = nnx.BatchNorm(num_groups, momentum=0.1, epsilon=1e-5, rngs=rngs)

    def maps(self, x):
        _check_image(x, self.channels)
        h = jax.nn.relu(self.bn_dw(self.dw(x)))
        h = max_pool_3x3(h)
        h = jax.nn.relu(self.bn_pw(self.pw(h)))
        return subspace_softmax(h)

    def __call__(self, x):
        return ulsam_combine(x, self.maps(x))


def ulsam_apply(graphdef, state, x):
    """Pure form: ``(out, new_state)`` from ``graphdef, state = nnx.split(ULSAM(...))``; jit with ``graphdef``
    static. ``new_state`` carries the updated BatchNorm statistics in training mode."""
    m = nnx.merge(graphdef, state)
    if not isinstance(m, ULSAM):
        raise TypeError(f"graphdef must describe a ULSAM module, got {type(m).__name__}")
    out = m(x)
    return out, nnx.state(m)
