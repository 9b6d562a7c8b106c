"""How good is a sparse selection? One evaluation shared by every dynamic-sparse selector (issue 14).

A selector is a pure function ``select(q, k, **params) -> BlockMask``. :func:`sparse_quality` runs it, runs
``jattn.block_sparse_attention`` with the mask it chose, and compares with dense attention:

* ``density``: the fraction of tiles kept (of the causal tiles when ``causal``);
* ``recall``: the fraction of the dense attention probability mass that falls in kept tiles, averaged
  over query rows, batch and heads (1.0 = nothing the dense attention looks at was dropped). A kept tile
  counts whole: for a mask whose partial tiles drop elements (a carried ``mask_fn``) this is an upper bound;
* ``rel_error``: ``||out - out_dense|| / ||out_dense||`` over the whole output;
* ``select_seconds`` and ``attention_seconds``: best of ``repeats`` compiled runs each.

:func:`attention_block_mass` gives the dense probability mass per tile in ``O(T * S)`` time and
``O(block_q * S)`` memory per step, so recall can be measured at long lengths.
"""
from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.ops.attention import attention
from jattn.ops.block_sparse import block_sparse_attention

HIGHEST = jax.lax.Precision.HIGHEST


def attention_block_mass(q: Float[Array, "B T H D"], k: Float[Array, "B S Hkv D"], *, block_q: int, block_k: int,
                         causal: bool = True, scale: float | None = None) -> Float[Array, "B H nQ nK"]:
    """Dense softmax probability mass in each ``block_q x block_k`` tile, summed over the tile's rows.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, S, Hkv, D]`` (H a multiple of Hkv).
      block_q: query rows per tile.
      block_k: keys per tile.
      causal: top-left causal mask (``kv_idx <= q_idx``).
      scale: logit scale, default ``D ** -0.5``.

    Returns:
      ``[B, H, nQ, nK]`` float32; each row of the attention sums to 1, so a tile row's total is the number
      of its query rows that see something (``block_q``, or fewer in the last tile).
    """
    checks.check_float_array("q", q, 4)
    checks.check_float_array("k", k, 4)
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or H % Hkv:
        raise ValueError(f"k must be [B={B}, S, Hkv (dividing H={H}), D={D}], got {checks.describe(k)}")
    block_q, block_k = checks.check_int("block_q", block_q), checks.check_int("block_k", block_k)
    scale = D ** -0.5 if scale is None else scale
    nQ, nK = -(-T // block_q), -(-S // block_k)
    qp = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, nQ * block_q - T), (0, 0), (0, 0)))
    qp = qp.reshape(B, nQ, block_q, Hkv, H // Hkv, D)
    kp = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, nK * block_k - S), (0, 0), (0, 0)))
    kv_idx = jnp.arange(nK * block_k)

    def one_block(i):
        s = jnp.einsum("bqkgd,bskd->bkgqs", qp[:, i], kp, precision=HIGHEST) * scale
        q_idx = i * block_q + jnp.arange(block_q)
        visible = (kv_idx[None] < S) & (q_idx[:, None] < T)
        if causal:
            visible &= kv_idx[None] <= q_idx[:, None]
        s = jnp.where(visible, s, -jnp.inf)
        m = jnp.max(s, -1, keepdims=True)
        p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
        p = p / jnp.maximum(jnp.sum(p, -1, keepdims=True), 1e-30)
        return jnp.sum(p, 3).reshape(B, H, nK, block_k).sum(-1)                  # [B, H, nK]
    return jnp.moveaxis(jax.lax.map(one_block, jnp.arange(nQ)), 0, 2)


def _best_seconds(fn, args, repeats: int) -> tuple[float, object]:
    result = jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best, result


def sparse_quality(select: Callable[..., BlockMask], q: Float[Array, "B T H D"], k: Float[Array, "B S Hkv D"],
                   v: Float[Array, "B S Hkv D"], /, *, causal: bool = True, impl: str = "auto", repeats: int = 1,
                   **params) -> dict:
    """Density, recall of the attention mass, output error and times of one selector on ``q, k, v``.

    Args:
      select: ``select(q, k, **params) -> BlockMask`` (pure, jit-able).
      q: ``[B, T, H, D]``.
      k: ``[B, S, Hkv, D]``.
      v: ``[B, S, Hkv, D]``.
      causal: causal attention, for the sparse run, the dense one and the mass.
      impl: the attention impl of both runs.
      repeats: timed runs after the compile (the best counts).
      **params: the selector's parameters (static).

    Returns:
      ``dict(density, recall, rel_error, select_seconds, attention_seconds, dense_seconds)``.
    """
    checks.check_int("repeats", repeats)
    select_fn = jax.jit(lambda q, k: select(q, k, **params))
    select_seconds, block_mask = _best_seconds(select_fn, (q, k), repeats)
    sparse_fn = jax.jit(lambda q, k, v, m: block_sparse_attention(q, k, v, m, causal=causal, impl=impl))
    attention_seconds, out = _best_seconds(sparse_fn, (q, k, v, block_mask), repeats)
    dense_fn = jax.jit(lambda q, k, v: attention(q, k, v, causal=causal, impl=impl))
    dense_seconds, want = _best_seconds(dense_fn, (q, k, v), repeats)
    mass = attention_block_mass(q, k, block_q=block_mask.block_q, block_k=block_mask.block_k, causal=causal)
    B, T, H, _ = q.shape
    kept = jnp.broadcast_to(block_mask.to_dense_block_map(), mass.shape)
    recall = float(jnp.sum(jnp.where(kept, mass, 0.0)) / jnp.sum(mass))
    nQ, nK = mass.shape[2:]
    tiles = np.ones((nQ, nK), bool)
    if causal:  # the tiles dense causal attention has to visit
        tiles = np.arange(nK)[None] * block_mask.block_k <= np.arange(nQ)[:, None] * block_mask.block_q + block_mask.block_q - 1
    density = float(jnp.sum(kept & jnp.asarray(tiles)) / (B * H * tiles.sum()))
    error = float(jnp.linalg.norm((out - want).astype(jnp.float32)) / jnp.linalg.norm(want.astype(jnp.float32)))
    return dict(density=density, recall=recall, rel_error=error, select_seconds=select_seconds,
                attention_seconds=attention_seconds, dense_seconds=dense_seconds)
