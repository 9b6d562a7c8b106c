"""P64 — PAROAttention: Pattern-Aware ReOrdering for Efficient Sparse and Quantized Attention in Visual
Generation Models.

Tokens: an optional prefix of ``num_text`` tokens (CogVideoX puts its 226 text tokens first), kept in place,
then ``F * H * W`` video tokens in row-major ``(F, H, W)`` order. Each attention head gets one axis order
from ``PARO_ORDERS`` (``"fhw"`` is the identity; ``"hwf"`` puts frames innermost). With
``grid = arange(F*H*W).reshape(F, H, W)``, the permuted sequence of a head with order ``o`` is::

    perm_o = [0 .. num_text-1] ++ (num_text + grid.transpose(axes(o)).reshape(-1))
    permute(x)[:, p] = x[:, perm_o[p]]             unpermute = the inverse permutation (argsort)

**Attention**: ``paro_attention`` permutes q, k, v per head, runs the block-sparse kernel with a
``BlockMask`` defined on the *permuted* tokens (per head), and un-permutes the output. Softmax attention
is equivariant under one permutation of queries and keys, so the result is exactly dense attention in
the original order with the mask mapped back (``paro_mask_to_original``)::

    M[h, i, j] = M_perm[h, inv_h[i], inv_h[j]]

**Calibration** (offline, NumPy; the paper's exact rules are unverified): ``paro_block_mass`` sums a
calibration attention map ``[H, N, N]`` (original order) over the tiles of each head's permuted order.
``calibrate_block_mask`` keeps, per head, either the heaviest ``density`` fraction of tiles or the tiles
holding at least ``threshold`` of their q-block row's mass, and always each row's heaviest tile (a jattn
choice: no query is left without keys). ``select_paro_order`` picks per head the order minimising
``(1 - alpha) * tiles_needed + alpha * incoherence``, with ``tiles_needed`` the fraction of tiles that
reach ``recall`` of the mass and ``incoherence`` the mean over non-empty tiles of ``max / mean`` of the
tile's entries divided by the tile's size (the share of the tile's mass in its largest entry, in
(0, 1]); how the paper weighs the two terms is unverified, ``alpha = 0`` (default) is pure block
sparsity. Ties go to the earlier entry of ``PARO_ORDERS``.

**INT8** (``qk_int8=True``): the permuted q and k are rounded per head to symmetric int8 in blocks of
``quant_block_q`` (default 32, the official per-warp size) and ``quant_block_k`` (default 64) tokens, with
scale ``max|x| / 127``, then dequantized; the kernel runs in float32. That equals an int8 ``q k^T`` with
int32 accumulation followed by dequantization, up to float rounding: a simulation of the official INT8
kernel (no int8 kernel here). Gradients pass straight through the rounding.

Not here: the official "empty head" flags, timestep-grouped masks and the fused RoPE+permute kernel.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.ops.block_sparse import block_sparse_attention

PARO_ORDERS = ("fhw", "fwh", "hfw", "hwf", "wfh", "whf")
DEFAULT_BLOCK = 64


# ------------------------------------------------------------------------------------------ validation

def _check_fhw(fhw) -> tuple[int, int, int]:
    return checks.check_int_tuple("fhw", fhw, 3, what="(frames, height, width)")


def _check_order(order) -> str:
    checks.check_choice("order", order, PARO_ORDERS)
    return order


def _orders_per_head(orders, num_heads: int) -> tuple[str, ...]:
    """One order (str) for every head, or a sequence of exactly ``num_heads`` orders."""
    if isinstance(orders, str):
        return (_check_order(orders),) * num_heads
    if not isinstance(orders, (tuple, list)) or len(orders) != num_heads:
        raise ValueError(f"orders must be one of {PARO_ORDERS} or a sequence of {num_heads} of them "
                         f"(one per head), got {orders!r}")
    return tuple(_check_order(o) for o in orders)


def _check_tokens(name: str, x, fhw, num_text: int) -> None:
    checks.check_float_array(name, x, 4)
    want = num_text + math.prod(fhw)
    if x.shape[1] != want:
        raise ValueError(f"{name} must have num_text + F*H*W = {num_text} + {math.prod(fhw)} = {want} tokens for "
                         f"fhw={tuple(fhw)}, got {checks.describe(x)}")


# ------------------------------------------------------------------------------------------ permutations

def paro_permutation(fhw, order: str, *, num_text: int = 0) -> np.ndarray:
    """``perm [num_text + F*H*W]`` (int32): slot ``p`` of the permuted sequence holds token ``perm[p]``."""
    F, H, W = _check_fhw(fhw)
    order, num_text = _check_order(order), checks.check_int("num_text", num_text, 0)
    grid = np.arange(F * H * W).reshape(F, H, W)
    video = grid.transpose(tuple("fhw".index(axis) for axis in order)).reshape(-1)
    return np.concatenate([np.arange(num_text), num_text + video]).astype(np.int32)


def paro_inverse_permutation(fhw, order: str, *, num_text: int = 0) -> np.ndarray:
    """``inv [N]``: token ``i`` sits at slot ``inv[i]`` of the permuted sequence."""
    return np.argsort(paro_permutation(fhw, order, num_text=num_text)).astype(np.int32)


def paro_head_permutations(fhw, orders, num_heads: int, *, num_text: int = 0, inverse: bool = False) -> np.ndarray:
    """``[num_heads, N]`` permutations (or their inverses), one per head."""
    build = paro_inverse_permutation if inverse else paro_permutation
    return np.stack([build(fhw, o, num_text=num_text) for o in _orders_per_head(orders, num_heads)])


def _gather_tokens(x, perms: np.ndarray):
    """``x [B, N, h, D]`` -> ``x[:, perms[head], head]`` for every head (one gather when shared)."""
    if (perms == perms[:1]).all():
        return x[:, perms[0]]
    return jnp.take_along_axis(x, jnp.asarray(perms.T)[None, :, :, None], axis=1)


def paro_permute(x, fhw, orders, *, num_text: int = 0):
    """Reorders ``x [B, N, h, D]`` per head: ``orders`` is one order or one per head (``h`` of them)."""
    fhw = _check_fhw(fhw)
    _check_tokens("x", x, fhw, checks.check_int("num_text", num_text, 0))
    return _gather_tokens(x, paro_head_permutations(fhw, orders, x.shape[2], num_text=num_text))


def paro_unpermute(x, fhw, orders, *, num_text: int = 0):
    """Inverse of :func:`paro_permute` (same ``orders``)."""
    fhw = _check_fhw(fhw)
    _check_tokens("x", x, fhw, checks.check_int("num_text", num_text, 0))
    return _gather_tokens(x, paro_head_permutations(fhw, orders, x.shape[2], num_text=num_text, inverse=True))


def paro_mask_to_original(mask_perm, fhw, orders, *, num_text: int = 0):
    """Maps a mask on permuted tokens ``[..., H|1, N, N]`` back to the original order ``[..., H, N, N]``:
    ``M[h, i, j] = M_perm[h, inv_h[i], inv_h[j]]`` (a shared head dim is broadcast to ``len(orders)``)."""
    mask_perm = jnp.asarray(mask_perm)
    fhw = _check_fhw(fhw)
    if mask_perm.ndim < 3:
        raise ValueError(f"mask_perm must be [..., H|1, N, N], got {checks.describe(mask_perm)}")
    num_heads = mask_perm.shape[-3] if isinstance(orders, str) else len(orders)
    inv = paro_head_permutations(fhw, orders, num_heads, num_text=num_text, inverse=True)
    if mask_perm.shape[-1] != inv.shape[1] or mask_perm.shape[-2] != inv.shape[1]:
        raise ValueError(f"mask_perm must be [..., N, N] with N = {inv.shape[1]}, got {checks.describe(mask_perm)}")
    if mask_perm.shape[-3] not in (1, num_heads):
        raise ValueError(f"mask_perm's head dim must be 1 or {num_heads}, got {checks.describe(mask_perm)}")
    mask_perm = jnp.broadcast_to(mask_perm, mask_perm.shape[:-3] + (num_heads,) + mask_perm.shape[-2:])
    heads = jnp.arange(num_heads)[:, None, None]
    inv = jnp.asarray(inv)
    return mask_perm[..., heads, inv[:, :, None], inv[:, None, :]]


# ------------------------------------------------------------------------------------------ int8

def quantize_int8_per_block(x, block: int):
    """Symmetric int8 per ``(batch, block of tokens, head)`` of ``x [B, N, h, D]``.

    Returns ``(codes int8 [B, N, h, D], scales float32 [B, ceil(N / block), h])`` with
    ``scale = max|x| / 127`` over the block (1 where the block is all zero) and ``codes = round(x / scale)``.
    """
    checks.check_float_array("x", x, 4)
    block = checks.check_int("block", block, 1)
    B, N, h, D = x.shape
    n_blocks = -(-N // block)
    tiles = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n_blocks * block - N), (0, 0), (0, 0)))
    tiles = tiles.reshape(B, n_blocks, block, h, D)
    amax = jnp.max(jnp.abs(tiles), axis=(2, 4))
    scales = jnp.where(amax > 0, amax / 127.0, 1.0)
    codes = jnp.clip(jnp.round(tiles / scales[:, :, None, :, None]), -127, 127).astype(jnp.int8)
    return codes.reshape(B, n_blocks * block, h, D)[:, :N], scales


def dequantize_int8_per_block(codes, scales, block: int):
    """``codes [B, N, h, D]`` int8 and ``scales [B, nBlocks, h]`` -> float32 values."""
    N = codes.shape[1]
    per_token = jnp.repeat(scales, block, axis=1)[:, :N]
    return codes.astype(jnp.float32) * per_token[..., None]


def _fake_int8(x, block: int):
    """Rounded to the int8 grid of its block (value of the dequantized int8), straight-through gradient."""
    rounded = dequantize_int8_per_block(*quantize_int8_per_block(x, block), block).astype(x.dtype)
    return x + jax.lax.stop_gradient(rounded - x)


# ------------------------------------------------------------------------------------------ attention

def _kv_for_orders(k, v, orders_q: tuple[str, ...]):
    """(k, v, their per-head orders): one order per kv head when each GQA group shares its order,
    otherwise k, v repeated to the query heads."""
    H, Hkv = len(orders_q), k.shape[2]
    group = H // Hkv
    kv_orders = orders_q[::group]
    if all(orders_q[h] == kv_orders[h // group] for h in range(H)):
        return k, v, kv_orders
    return jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2), orders_q


def paro_attention(q, k, v, block_mask: BlockMask, *, fhw, orders, num_text: int = 0, scale: float | None = None,
                   impl: str = "auto", qk_int8: bool = False, quant_block_q: int = 32, quant_block_k: int = 64):
    """PARO attention: permute q, k, v per head, block-sparse attention, un-permute.

    Args:
      q: ``[B, N, H, D]``; k, v: ``[B, N, Hkv, D]`` with ``N = num_text + F*H*W`` in original order.
      block_mask: a ``BlockMask`` over the *permuted* tokens (seq ``(N, N)``, heads 1 or H), e.g. from
        :func:`calibrate_block_mask`; its tiles are the visible set (no mask function).
      fhw: ``(F, H, W)`` video grid. orders: one of ``PARO_ORDERS`` or one per query head.
      qk_int8: simulate the INT8 ``q k^T`` (see the module docstring).

    Returns ``[B, N, H, D]`` in the original token order; equals dense attention with
    ``paro_mask_to_original(block_mask.to_dense_mask(), fhw, orders)``. Rows whose tiles are all dropped
    give 0 (``calibrate_block_mask`` never drops a whole row).
    """
    B, T, S, H, Hkv, D = checks.check_qkv(q, k, v)
    fhw, num_text = _check_fhw(fhw), checks.check_int("num_text", num_text, 0)
    _check_tokens("q", q, fhw, num_text)
    _check_tokens("k", k, fhw, num_text)
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a jattn BlockMask over the permuted tokens, got "
                        f"{type(block_mask).__name__}")
    qk_int8 = checks.check_bool("qk_int8", qk_int8)
    orders_q = _orders_per_head(orders, H)
    k, v, orders_kv = _kv_for_orders(k, v, orders_q)
    qp = paro_permute(q, fhw, orders_q, num_text=num_text)
    kp = paro_permute(k, fhw, orders_kv, num_text=num_text)
    vp = paro_permute(v, fhw, orders_kv, num_text=num_text)
    if qk_int8:
        qp = _fake_int8(qp, checks.check_int("quant_block_q", quant_block_q, 1))
        kp = _fake_int8(kp, checks.check_int("quant_block_k", quant_block_k, 1))
    out = block_sparse_attention(qp, kp, vp, block_mask, scale=scale, impl=impl)
    return paro_unpermute(out, fhw, orders_q, num_text=num_text)


# ------------------------------------------------------------------------------------------ calibration

def _check_maps(attn_maps, fhw, num_text: int) -> np.ndarray:
    maps = np.asarray(attn_maps, dtype=np.float64)
    N = num_text + math.prod(fhw)
    if maps.ndim != 3 or maps.shape[1:] != (N, N):
        raise ValueError(f"attn_maps must be [heads, N, N] with N = num_text + F*H*W = {N}, got shape {maps.shape}")
    if not np.isfinite(maps).all() or (maps < 0).any():
        raise ValueError("attn_maps must be finite and non-negative (attention probabilities)")
    return maps


def _permuted_maps(maps: np.ndarray, fhw, orders, num_text: int) -> np.ndarray:
    perms = paro_head_permutations(fhw, orders, maps.shape[0], num_text=num_text)
    return np.stack([m[p][:, p] for m, p in zip(maps, perms)])


def _tiles(maps: np.ndarray, block: int) -> np.ndarray:
    """``[H, N, N]`` -> ``[H, nQ, nK, block, block]`` zero padded."""
    H, N, _ = maps.shape
    n = -(-N // block)
    padded = np.zeros((H, n * block, n * block), maps.dtype)
    padded[:, :N, :N] = maps
    return padded.reshape(H, n, block, n, block).transpose(0, 1, 3, 2, 4)


def paro_block_mass(attn_maps, fhw, orders, *, block: int = DEFAULT_BLOCK, num_text: int = 0) -> np.ndarray:
    """Attention mass per tile of each head's permuted map: ``attn_maps [H, N, N]`` -> ``[H, nQ, nK]``."""
    fhw, num_text, block = _check_fhw(fhw), checks.check_int("num_text", num_text, 0), checks.check_int("block", block, 1)
    maps = _check_maps(attn_maps, fhw, num_text)
    return _tiles(_permuted_maps(maps, fhw, orders, num_text), block).sum(axis=(3, 4))


def _tiles_for_recall(mass: np.ndarray, recall: float) -> np.ndarray:
    """Per head: the fraction of tiles needed (heaviest first) to hold ``recall`` of the mass."""
    flat = np.sort(mass.reshape(mass.shape[0], -1), axis=1)[:, ::-1]
    cumulative = np.cumsum(flat, axis=1)
    target = recall * cumulative[:, -1:] * (1 - 1e-12)
    needed = np.argmax(cumulative >= target, axis=1) + 1
    return needed / flat.shape[1]


def _incoherence(maps_perm: np.ndarray, block: int) -> np.ndarray:
    """Per head: mean over non-empty tiles of ``(max / mean) / size``, i.e. the share of a tile's mass
    held by its largest entry (``1 / size`` for a uniform tile, 1 for a single spike)."""
    tiles = _tiles(maps_perm, block)
    total, peak = tiles.sum(axis=(3, 4)), tiles.max(axis=(3, 4))
    live = total > 0
    share = np.where(live, peak / np.where(live, total, 1.0), 0.0)
    return share.sum(axis=(1, 2)) / np.maximum(live.sum(axis=(1, 2)), 1)


def paro_order_costs(attn_maps, fhw, *, block: int = DEFAULT_BLOCK, recall: float = 0.9, num_text: int = 0):
    """``{order: (tiles_needed [H], incoherence [H])}`` for every order of ``PARO_ORDERS``."""
    fhw, num_text, block = _check_fhw(fhw), checks.check_int("num_text", num_text, 0), checks.check_int("block", block, 1)
    recall = checks.check_float_in("recall", recall, 0, 1, low_open=True)
    maps = _check_maps(attn_maps, fhw, num_text)
    costs = {}
    for order in PARO_ORDERS:
        permuted = _permuted_maps(maps, fhw, order, num_text)
        mass = _tiles(permuted, block).sum(axis=(3, 4))
        costs[order] = (_tiles_for_recall(mass, recall), _incoherence(permuted, block))
    return costs


def select_paro_order(attn_maps, fhw, *, block: int = DEFAULT_BLOCK, recall: float = 0.9, alpha: float = 0.0,
                      num_text: int = 0) -> tuple[str, ...]:
    """Per head, the order minimising ``(1 - alpha) * tiles_needed + alpha * incoherence``."""
    alpha = checks.check_float_in("alpha", alpha, 0, 1)
    costs = paro_order_costs(attn_maps, fhw, block=block, recall=recall, num_text=num_text)
    table = np.stack([(1 - alpha) * costs[o][0] + alpha * costs[o][1] for o in PARO_ORDERS])   # [6, H]
    return tuple(PARO_ORDERS[i] for i in np.argmin(table, axis=0))   # argmin: first of equal costs


def calibrate_block_mask(attn_maps, *, fhw, orders, block: int = DEFAULT_BLOCK, density: float | None = None,
                         threshold: float | None = None, num_text: int = 0) -> BlockMask:
    """Static per-head ``BlockMask`` over the permuted tokens from calibration maps ``[H, N, N]``.

    Exactly one of ``density`` (keep the heaviest ``ceil(density * nQ * nK)`` tiles of each head) or
    ``threshold`` (keep tiles holding at least that share of their q-block row's mass). Each q-block row
    also keeps its heaviest tile. Kept tiles are full (every entry visible), so no ``mask_fn`` is needed.
    """
    fhw, num_text = _check_fhw(fhw), checks.check_int("num_text", num_text, 0)
    block = DEFAULT_BLOCK if block is None else checks.check_block_size("block", block, minimum=16)  # kernel tile
    if (density is None) == (threshold is None):
        raise ValueError(f"give exactly one of density or threshold, got density={density!r}, threshold={threshold!r}")
    maps = _check_maps(attn_maps, fhw, num_text)
    H, N, _ = maps.shape
    mass = _tiles(_permuted_maps(maps, fhw, orders, num_text), block).sum(axis=(3, 4))
    nQ, nK = mass.shape[1:]
    if density is not None:
        density = checks.check_float_in("density", density, 0, 1, low_open=True)
        keep_count = max(1, math.ceil(density * nQ * nK))
        order = np.argsort(-mass.reshape(H, -1), axis=1, kind="stable")[:, :keep_count]
        keep = np.zeros((H, nQ * nK), bool)
        np.put_along_axis(keep, order, True, axis=1)
        keep = keep.reshape(H, nQ, nK)
    else:
        threshold = checks.check_float_in("threshold", threshold, 0, 1)
        row_mass = mass.sum(axis=2, keepdims=True)
        keep = mass >= threshold * row_mass
    heaviest = np.argmax(mass, axis=2)                          # every q-block row keeps at least one tile
    np.put_along_axis(keep, heaviest[..., None], True, axis=2)
    block_map = jnp.asarray(keep[None])
    return BlockMask.from_dense_block_map(block_map, block_q=block, block_k=block, seq_q=N, seq_k=N,
                                          full_map=block_map)
