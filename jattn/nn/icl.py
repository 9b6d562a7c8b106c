"""P62 (In-Context Linear Regression Demystified): one-layer multi-head softmax attention and its analysis.

Prompt tokens ``z_l = [x_l; y_l]`` (``l < n``) and a query ``z_q = [x_q; 0]``, all in ``R^{d+1}``. Head ``h``
scores the context with ``s_l = z_l^T KQ_h z_q`` where ``KQ_h = W_K,h^T W_Q,h`` and predicts
``e_{d+1}^T OV_h sum_l softmax(s)_l z_l`` with ``OV_h = W_O,h W_V,h``; heads add. Reading chosen here (the
paper's exact layout is unverified): the query attends to the ``n`` context tokens only, no
``1/sqrt(d)`` scale (it is absorbed by ``KQ``), head dim ``d + 1``.

The learned solution the paper reports: ``KQ_h ~ omega_h [I_d 0; 0 0]``, ``OV_h`` non-zero only in its
last entry, heads in ``+-omega`` pairs with ``sum_h OV_h ~ 0`` — a debiased one-step GD predictor.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.core import checks
from jattn.core.reference import HIGHEST


class OneLayerMHSoftmax(nnx.Module):
    """``tokens [B, n + 1, d + 1] -> prediction [B]`` (the last token is the query)."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, init_scale: float = 0.1):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
        self.dim, self.num_heads = dim, num_heads
        e = dim + 1

        def init():
            return nnx.Param(init_scale * jax.random.normal(rngs.params(), (num_heads, e, e)) / jnp.sqrt(e))

        self.w_q, self.w_k, self.w_v, self.w_o = init(), init(), init(), init()

    def kq(self):
        """``KQ_h = W_K,h^T W_Q,h``: ``[H, d + 1, d + 1]``."""
        return jnp.einsum("hji,hjk->hik", self.w_k[...], self.w_q[...], precision=HIGHEST)

    def ov(self):
        """``OV_h = W_O,h W_V,h``: ``[H, d + 1, d + 1]``."""
        return jnp.einsum("hij,hjk->hik", self.w_o[...], self.w_v[...], precision=HIGHEST)

    def attention(self, tokens):
        """Per-head attention of the query over the context: ``[B, H, n]``."""
        context, query = tokens[:, :-1], tokens[:, -1]
        logits = jnp.einsum("bld,hde,be->bhl", context, self.kq(), query, precision=HIGHEST)
        return jax.nn.softmax(logits, axis=-1)

    def __call__(self, tokens):
        checks.check_float_array("tokens", tokens, 3)
        if tokens.shape[-1] != self.dim + 1 or tokens.shape[1] < 2:
            raise ValueError(f"tokens must be [B, n + 1 >= 2, d + 1 = {self.dim + 1}], got shape {tokens.shape}")
        probs = self.attention(tokens)
        readout = self.ov()[:, -1, :]                                   # last row: what lands on y
        values = jnp.einsum("bld,hd->bhl", tokens[:, :-1], readout, precision=HIGHEST)
        return jnp.sum(probs * values, axis=(1, 2))


def debiased_gd_predictor(tokens, scale: float = 1.0):
    """``scale / n * sum_l y_l (x_l . x_q - mean_m x_m . x_q)`` — one GD step with the mean term removed."""
    checks.check_float_array("tokens", tokens, 3)
    x, y, x_q = tokens[:, :-1, :-1], tokens[:, :-1, -1], tokens[:, -1, :-1]
    inner = jnp.einsum("bld,bd->bl", x, x_q, precision=HIGHEST)
    centered = inner - jnp.mean(inner, axis=1, keepdims=True)
    return scale * jnp.mean(y * centered, axis=1)


def best_scale(prediction_unit, target):
    """The least-squares ``c`` minimising ``|c * prediction_unit - target|^2`` (to compare with the best GD)."""
    return jnp.sum(prediction_unit * target) / jnp.maximum(jnp.sum(prediction_unit ** 2), 1e-30)


def kq_diagonality(kq, dim: int):
    """Share of ``||KQ_h||_F^2`` on the first ``dim`` diagonal entries, per head (1 for ``omega [I 0; 0 0]``)."""
    kq = jnp.asarray(kq)
    diag = jnp.diagonal(kq, axis1=-2, axis2=-1)[..., :dim]
    return jnp.sum(diag ** 2, -1) / jnp.maximum(jnp.sum(kq ** 2, axis=(-2, -1)), 1e-30)


def kq_homogeneity(kq, dim: int):
    """``std / |mean|`` of the first ``dim`` diagonal entries per head (0 when all equal)."""
    diag = jnp.diagonal(jnp.asarray(kq), axis1=-2, axis2=-1)[..., :dim]
    return jnp.std(diag, -1) / jnp.maximum(jnp.abs(jnp.mean(diag, -1)), 1e-30)


def ov_last_entry_ratio(ov):
    """Share of the output row ``OV_h[-1, :]`` (the only row that reaches ``y``) on the ``y`` entry, per head."""
    row = jnp.asarray(ov)[..., -1, :]
    return row[..., -1] ** 2 / jnp.maximum(jnp.sum(row ** 2, -1), 1e-30)


def ov_zero_sum_residual(ov):
    """``|sum_h OV_h[-1, -1]| / sum_h |OV_h[-1, -1]|`` (0 when the heads' y-entries cancel exactly)."""
    entries = jnp.asarray(ov)[..., -1, -1]
    return jnp.abs(jnp.sum(entries, -1)) / jnp.maximum(jnp.sum(jnp.abs(entries), -1), 1e-30)
