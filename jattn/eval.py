"""How good is a sparse selection? One evaluation shared by every dynamic-sparse selector (issue 14).

A selector is a pure function ``select(q, k, **params) -> BlockMask``. :func:`sparse_quality` runs it, runs
``jattn.block_sparse_attention`` with the mask it chose, and compares with dense attention:

* ``density``: the fraction of tiles kept (of the causal tiles when ``causal``);
* ``recall``: the fraction of the dense attention probability mass that falls in kept tiles, averaged
  over query rows, batch and heads (1.0 = nothing the dense attention looks at was dropped). A kept tile
  counts whole: for a mask whose partial tiles drop elements (a carried ``mask_fn``) this is an upper bound;
* ``rel_error``: ``||out - out_dense|| / ||out_dense||`` over the whole output;
* ``oracle_recall``: the recall of the best mask with as many tiles per (batch, head) as the selector kept:
  each head's heaviest tiles by the dense mass. What a perfect selector reaches at this density;
* ``select_seconds`` and ``attention_seconds``: best of ``repeats`` compiled runs each.

:func:`dense_reference` runs the dense attention (and, lazily, the tile mass) once, so a sweep over
selectors and parameters on the same inputs pays for it once.

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


def dense_reference(q: Float[Array, "B T H D"], k: Float[Array, "B S Hkv D"], v: Float[Array, "B S Hkv D"], /, *,
                    causal: bool = True, impl: str = "auto", repeats: int = 1) -> dict:
    """Dense attention's output and time on ``q, k, v``, for one or more :func:`sparse_quality` calls.

    Returns:
      ``dict(out, dense_seconds, causal, impl, masses)``; ``masses`` caches :func:`attention_block_mass` per
      ``(block_q, block_k)`` as the calls need it.
    """
    checks.check_int("repeats", repeats)
    dense_fn = jax.jit(lambda q, k, v: attention(q, k, v, causal=causal, impl=impl))
    dense_seconds, out = _best_seconds(dense_fn, (q, k, v), repeats)
    return dict(out=out, dense_seconds=dense_seconds, causal=causal, impl=impl, masses={})


def oracle_recall(mass: Float[Array, "B H nQ nK"], kept_per_head: Float[Array, "B H"],
                  visible_tiles: np.ndarray) -> float:
    """Recall of each head's ``kept_per_head`` heaviest visible tiles: the best any mask of that size gets."""
    B, H = mass.shape[:2]
    flat = jnp.where(jnp.asarray(visible_tiles), mass, -1.0).reshape(B, H, -1)
    ranked = -jnp.sort(-flat, axis=-1)
    top = jnp.arange(ranked.shape[-1]) < kept_per_head[..., None]
    return float(jnp.sum(jnp.where(top & (ranked > 0), ranked, 0.0)) / jnp.sum(mass))


def sparse_quality(select: Callable[..., BlockMask], q: Float[Array, "B T H D"], k: Float[Array, "B S Hkv D"],
                   v: Float[Array, "B S Hkv D"], /, *, causal: bool = True, impl: str = "auto", repeats: int = 1,
                   reference: dict | None = None, **params) -> dict:
    """Density, recall of the attention mass, output error and times of one selector on ``q, k, v``.

    Args:
      select: ``select(q, k, **params) -> BlockMask`` (pure, jit-able).
      q: ``[B, T, H, D]``.
      k: ``[B, S, Hkv, D]``.
      v: ``[B, S, Hkv, D]``.
      causal: causal attention, for the sparse run, the dense one and the mass.
      impl: the attention impl of both runs.
      repeats: timed runs after the compile (the best counts).
      reference: :func:`dense_reference` of the same inputs, causal flag and impl (computed when None).
      **params: the selector's parameters (static).

    Returns:
      ``dict(density, recall, oracle_recall, rel_error, select_seconds, attention_seconds, dense_seconds)``.

    Raises:
      ValueError: ``reference`` was made with another causal flag or impl.
    """
    checks.check_int("repeats", repeats)
    if reference is None:
        reference = dense_reference(q, k, v, causal=causal, impl=impl, repeats=repeats)
    elif (reference["causal"], reference["impl"]) != (causal, impl):
        raise ValueError(f"reference was computed with causal={reference['causal']}, impl={reference['impl']!r}; "
                         f"this call has causal={causal}, impl={impl!r}")
    select_fn = jax.jit(lambda q, k: select(q, k, **params))
    select_seconds, block_mask = _best_seconds(select_fn, (q, k), repeats)
    sparse_fn = jax.jit(lambda q, k, v, m: block_sparse_attention(q, k, v, m, causal=causal, impl=impl))
    attention_seconds, out = _best_seconds(sparse_fn, (q, k, v, block_mask), repeats)
    blocks = (block_mask.block_q, block_mask.block_k)
    if blocks not in reference["masses"]:
        reference["masses"][blocks] = attention_block_mass(q, k, block_q=blocks[0], block_k=blocks[1],
                                                           causal=causal)
    mass = reference["masses"][blocks]
    B, T, H, _ = q.shape
    kept = jnp.broadcast_to(block_mask.to_dense_block_map(), mass.shape)
    recall = float(jnp.sum(jnp.where(kept, mass, 0.0)) / jnp.sum(mass))
    nQ, nK = mass.shape[2:]
    tiles = np.ones((nQ, nK), bool)
    if causal:  # the tiles dense causal attention has to visit
        tiles = np.arange(nK)[None] * blocks[1] <= np.arange(nQ)[:, None] * blocks[0] + blocks[0] - 1
    kept_visible = kept & jnp.asarray(tiles)
    density = float(jnp.sum(kept_visible) / (B * H * tiles.sum()))
    want = reference["out"]
    error = float(jnp.linalg.norm((out - want).astype(jnp.float32)) / jnp.linalg.norm(want.astype(jnp.float32)))
    return dict(density=density, recall=recall,
                oracle_recall=oracle_recall(mass, jnp.sum(kept_visible, axis=(2, 3)), tiles), rel_error=error,
                select_seconds=select_seconds, attention_seconds=attention_seconds,
                dense_seconds=reference["dense_seconds"])
