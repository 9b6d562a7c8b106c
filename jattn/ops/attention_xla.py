"""Blockwise online-softmax attention in pure JAX: the CPU fast path and the portable fallback.

Memory is O(T): no ``[T, S]`` matrix is ever formed, only ``[block_q, block_k]`` tiles. For each query
block the kv blocks split into three runs: tiles that no query of the block can see are never visited
(their range is skipped by the loop bounds), tiles every query sees in full skip mask evaluation, and
only the edge tiles evaluate masks. Dynamic masks (a mask array or segment ids) additionally skip tiles
with nothing visible at run time. The backward pass is a custom VJP that recomputes tiles
(FlashAttention-2 style) so it is O(T) in memory too: one sweep over query blocks for dq (and the
bias gradient), one over kv blocks for dk and dv.

Internal layout: q ``[B, Hkv, G, T, D]``, k and v ``[B, Hkv, S, D]``; per-head arrays split H as
``(Hkv, G)`` so that GQA needs no copies of k and v.

Shared with the Pallas kernel (one home each, ``pallas_kernels.common``): the online-softmax step and
finalisation (``online_softmax_step``, ``finalize_rows`` via ``jattn.core.softmax.OnlineSoftmax``), the
causal/window tile ranges (``tile_ranges``) and the mask/segment tile table (``visible_tiles``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from jattn.core.score_mod import ScoreModPlan, TracedScoreMod, apply_score_mod
from jattn.core.softmax import MASK_VALUE, OnlineSoftmax
from pallas_kernels.common import as_4d, online_softmax_step, pad_axis, tile_ranges, visible_tiles


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Static description of one call: sizes, blocks and which features are present."""
    T: int
    S: int
    block_q: int
    block_k: int
    scale: float
    causal: bool
    window: Optional[tuple[int, int]]
    softcap: Optional[float]
    has_mask: bool
    has_bias: bool
    has_segments: bool
    has_sinks: bool
    scale_in_q: bool = False  # q arrives multiplied by `scale` (see `_prepare`): tiles skip the multiply
    score_mod: Optional[ScoreModPlan] = None  # jattn.core.score_mod; its arrays travel as ops["mod_consts"]

    @property
    def num_q_blocks(self) -> int:
        return -(-self.T // self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return -(-self.S // self.block_k)

    @property
    def dynamic_mask(self) -> bool:
        return self.has_mask or self.has_segments


# ----------------------------------------------------------------------------------------------
# Layout helpers


def _split_heads(x, Hkv: int):
    """[..., H|1, T|1, S|1] per-head array -> [..., Hkv|1, G|1, T|1, S|1]."""
    B_, H_ = x.shape[0], x.shape[1]
    if H_ == 1:
        return x.reshape(B_, 1, 1, *x.shape[2:])
    return x.reshape(B_, Hkv, H_ // Hkv, *x.shape[2:])


def _slice_axis(x, axis: int, start, size: int):
    """Dynamic slice along `axis` unless that axis is broadcast (length 1)."""
    if x.shape[axis] == 1:
        return x
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


# ----------------------------------------------------------------------------------------------
# Tile bounds


def _block_ranges(cfg: TileConfig, block_index, over: str):
    """``(lo, full_lo, full_hi, hi)``: kv blocks of q block ``block_index`` (``over="kv"``) or q blocks
    of kv block ``block_index`` (``over="q"``); see ``pallas_kernels.common.tile_ranges``.

    Tiles in [lo, hi) may hold visible entries; tiles in [full_lo, full_hi) are fully visible and need
    no mask evaluation. Everything else is skipped. With a dynamic mask no tile is known to be full.
    """
    num_blocks = cfg.num_k_blocks if over == "kv" else cfg.num_q_blocks
    lo, full_lo, full_hi, hi = tile_ranges(block_index, over=over, causal=cfg.causal, window=cfg.window,
                                           block_q=cfg.block_q, block_k=cfg.block_k, seq_q=cfg.T, seq_k=cfg.S,
                                           num_blocks=num_blocks)
    if cfg.dynamic_mask:
        return lo, lo, lo, hi
    return lo, full_lo, full_hi, hi


# ----------------------------------------------------------------------------------------------
# One tile


def _tile_visible(cfg: TileConfig, ops, qi, kj):
    """Bool visibility of tile (qi, kj), broadcastable to [B, Hkv, G, bq, bk]."""
    bq, bk = cfg.block_q, cfg.block_k
    q_pos = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = kj * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    visible = k_pos < cfg.S
    if cfg.causal:
        visible &= k_pos <= q_pos
    if cfg.window is not None:
        left, right = cfg.window
        visible &= (k_pos >= q_pos - left) & (k_pos <= q_pos + right)
    visible = visible[None, None, None]
    if cfg.has_segments:
        q_ids = lax.dynamic_slice_in_dim(ops["q_segments"], qi * bq, bq, axis=1)
        kv_ids = lax.dynamic_slice_in_dim(ops["kv_segments"], kj * bk, bk, axis=1)
        visible = visible & (q_ids[:, None, None, :, None] == kv_ids[:, None, None, None, :])
    if cfg.has_mask:
        mask = _slice_axis(_slice_axis(ops["mask"], 3, qi * bq, bq), 4, kj * bk, bk)
        visible = visible & mask
    return visible


def _float_consts(cfg: TileConfig, ops):
    return cfg.score_mod.split(ops["mod_consts"])


def _tile_score_mod(cfg: TileConfig, ops, s, qi, kj, float_consts):
    """``score_mod`` on tile (qi, kj), ``s`` laid out ``[B, Hkv, G, bq, bk]``. Padded rows and keys read the
    last real position (they are masked anyway), so a table the mod indexes is never read out of range."""
    B, Hkv, G, bq, bk = s.shape
    q_idx = jnp.minimum(qi * bq + jnp.arange(bq, dtype=jnp.int32), cfg.T - 1)
    kv_idx = jnp.minimum(kj * bk + jnp.arange(bk, dtype=jnp.int32), cfg.S - 1)
    return apply_score_mod(cfg.score_mod.traced, cfg.score_mod.merge(ops["mod_consts"], float_consts), s,
                           jnp.arange(B, dtype=jnp.int32).reshape(B, 1, 1, 1, 1),
                           jnp.arange(Hkv * G, dtype=jnp.int32).reshape(1, Hkv, G, 1, 1),
                           q_idx.reshape(1, 1, 1, bq, 1), kv_idx.reshape(1, 1, 1, 1, bk))


def _tile_logits(cfg: TileConfig, ops, q_blk, qi, kj):
    """float32 logits of tile (qi, kj) after scale, softcap and bias; also returns tanh for softcap's VJP."""
    k_blk = lax.dynamic_slice_in_dim(ops["k"], kj * cfg.block_k, cfg.block_k, axis=2)
    s = jnp.einsum("bkgqd,bkcd->bkgqc", q_blk, k_blk, preferred_element_type=jnp.float32)
    if not cfg.scale_in_q:
        s = s * cfg.scale
    capped = None
    if cfg.softcap is not None:
        capped = jnp.tanh(s / cfg.softcap)
        s = cfg.softcap * capped
    if cfg.has_bias:
        bias = _slice_axis(_slice_axis(ops["bias"], 3, qi * cfg.block_q, cfg.block_q), 4, kj * cfg.block_k,
                           cfg.block_k)
        s = s + bias.astype(jnp.float32)
    return s, capped, k_blk


def _tile_has_visible(cfg: TileConfig, ops, qi, kj):
    return ops["tile_any"][qi, kj] if cfg.dynamic_mask else True


def _run(lo, hi, body, carry):
    return lax.fori_loop(lo, hi, body, carry)


def _sweep(cfg: TileConfig, ops, block_index, over: str, step, carry):
    """Runs ``step(j, carry, masked)`` over the tiles block ``block_index`` meets (``_block_ranges``): the edge
    runs with masks (skipped at run time where the dynamic-mask table sees nothing), the full run without."""
    def masked_step(j, carry):
        if cfg.dynamic_mask:
            qi, kj = (block_index, j) if over == "kv" else (j, block_index)
            return lax.cond(_tile_has_visible(cfg, ops, qi, kj), lambda c: step(j, c, True), lambda c: c, carry)
        return step(j, carry, True)

    lo, full_lo, full_hi, hi = _block_ranges(cfg, block_index, over)
    carry = _run(lo, full_lo, masked_step, carry)
    carry = _run(full_lo, full_hi, lambda j, c: step(j, c, False), carry)
    return _run(full_hi, hi, masked_step, carry)


# ----------------------------------------------------------------------------------------------
# Forward


def _forward_q_block(cfg: TileConfig, ops, qi):
    """Output and lse of query block ``qi``.

    The tile math runs on 3-D arrays: rows ``R = G * block_q`` (the query heads of a kv group stacked over
    the block's rows) against the group's kv tile, batched over ``N = B * Hkv``. One dot_general per tile
    serves every head, and no tile array carries size-1 axes: XLA:CPU copies a [.., 1, .., bq, bk] tile
    whose size-1 axes it laid out differently from the dot's output, a full extra pass per tile.
    """
    bq, bk = cfg.block_q, cfg.block_k
    q_blk = lax.dynamic_slice_in_dim(ops["q"], qi * bq, bq, axis=3)
    B, Hkv, G, _, D = q_blk.shape
    N, R = B * Hkv, G * bq
    q3 = q_blk.reshape(N, R, D)
    k3, v3 = ops["k"].reshape(N, -1, D), ops["v"].reshape(N, ops["v"].shape[2], -1)
    state = OnlineSoftmax.init((N, R), v3.shape[-1])

    def step(kj, state, masked: bool):
        k_blk = lax.dynamic_slice_in_dim(k3, kj * bk, bk, axis=1)
        s = jnp.einsum("nrd,ncd->nrc", q3, k_blk, preferred_element_type=jnp.float32)
        if not cfg.scale_in_q:
            s = s * cfg.scale
        if cfg.softcap is not None:
            s = cfg.softcap * jnp.tanh(s / cfg.softcap)
        if cfg.has_bias or cfg.score_mod is not None or (masked and cfg.dynamic_mask):
            # Per-(batch, head) operands: back to [B, Hkv, G, bq, bk] for this tile.
            s = s.reshape(B, Hkv, G, bq, bk)
            if cfg.has_bias:
                bias = _slice_axis(_slice_axis(ops["bias"], 3, qi * bq, bq), 4, kj * bk, bk)
                s = s + bias.astype(jnp.float32)
            if cfg.score_mod is not None:
                s = _tile_score_mod(cfg, ops, s, qi, kj, _float_consts(cfg, ops))
            if masked:
                s = jnp.where(_tile_visible(cfg, ops, qi, kj), s, MASK_VALUE)
            s = s.reshape(N, R, bk)
        elif masked:
            visible = _tile_visible(cfg, ops, qi, kj)[0, 0]  # [1, bq, bk]: positions only
            visible = jnp.broadcast_to(visible, (G, bq, bk)).reshape(R, bk)
            s = jnp.where(visible, s, MASK_VALUE)
        v_blk = lax.dynamic_slice_in_dim(v3, kj * bk, bk, axis=1)
        return OnlineSoftmax(*online_softmax_step(*state, s, v_blk))

    state = _sweep(cfg, ops, qi, "kv", step, state)
    state = OnlineSoftmax(state.m.reshape(B, Hkv, G, bq), state.l.reshape(B, Hkv, G, bq),
                          state.acc.reshape(B, Hkv, G, bq, -1))
    # A row whose every logit was masked has m == MASK_VALUE and an l that counts masked entries: add_sink
    # and finalize treat it as empty (pallas_kernels.common.is_unseen); a NaN row stays NaN.
    if cfg.has_sinks:
        state = state.add_sink(ops["sinks"][None, :, :, None])
    out, lse = state.finalize()
    return out.astype(ops["v"].dtype), lse


def _forward(cfg: TileConfig, ops):
    outs, lses = lax.map(functools.partial(_forward_q_block, cfg, ops), jnp.arange(cfg.num_q_blocks))
    # [nQ, B, Hkv, G, bq, ...] -> [B, Hkv, G, nQ*bq, ...]
    out = jnp.moveaxis(outs, 0, 3)
    out = out.reshape(*out.shape[:3], -1, out.shape[-1])
    lse = jnp.moveaxis(lses, 0, 3).reshape(*lses.shape[1:4], -1)
    return out, lse


# ----------------------------------------------------------------------------------------------
# Backward


def _tile_probs_and_dlogits(cfg, ops, res, q_blk, do_blk, lse_blk, delta_blk, qi, kj, masked: bool):
    """Recomputes tile (qi, kj): probabilities p, the logit gradient before softcap (ds), the one after the bias
    (ds_biased, before the score mod) and the tile's gradient of the score mod's float arrays (or None)."""
    s, capped, k_blk = _tile_logits(cfg, ops, q_blk, qi, kj)
    mod_vjp = None
    if cfg.score_mod is not None:
        s, mod_vjp = jax.vjp(lambda s, fc: _tile_score_mod(cfg, ops, s, qi, kj, fc), s, _float_consts(cfg, ops))
    p = jnp.exp(s - lse_blk[..., None])
    if masked:
        p = jnp.where(_tile_visible(cfg, ops, qi, kj), p, 0.0)
    v_blk = lax.dynamic_slice_in_dim(ops["v"], kj * cfg.block_k, cfg.block_k, axis=2)
    dp = jnp.einsum("bkgqd,bkcd->bkgqc", do_blk, v_blk, preferred_element_type=jnp.float32)
    ds_biased = p * (dp - delta_blk[..., None])  # gradient w.r.t. the final logits
    d_consts = None
    if mod_vjp is not None:
        ds_biased, d_consts = mod_vjp(ds_biased)  # now w.r.t. the logits before the score mod
    ds = ds_biased if capped is None else ds_biased * (1.0 - capped * capped)
    return p, ds, ds_biased, k_blk, v_blk, d_consts


def _q_side_inputs(cfg, ops, res, qi):
    bq = cfg.block_q
    q_blk = lax.dynamic_slice_in_dim(ops["q"], qi * bq, bq, axis=3)
    do_blk = lax.dynamic_slice_in_dim(res["do"], qi * bq, bq, axis=3)
    lse_blk = lax.dynamic_slice_in_dim(res["lse"], qi * bq, bq, axis=3)
    delta_blk = lax.dynamic_slice_in_dim(res["delta"], qi * bq, bq, axis=3)
    return q_blk, do_blk, lse_blk, delta_blk


def _reduce_to_shape(x, shape):
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _dq_q_block(cfg: TileConfig, ops, res, qi):
    """dq for query block qi, this block's rows of the bias gradient and its part of the score mod's array
    gradients."""
    q_blk, do_blk, lse_blk, delta_blk = _q_side_inputs(cfg, ops, res, qi)
    dq = jnp.zeros(q_blk.shape, jnp.float32)
    dbias = None
    if cfg.has_bias:
        b_shape = ops["bias"].shape
        dbias = jnp.zeros((*b_shape[:3], cfg.block_q if b_shape[3] != 1 else 1, b_shape[4]), jnp.float32)

    float_consts = () if cfg.score_mod is None else _float_consts(cfg, ops)
    d_consts = jax.tree.map(lambda c: jnp.zeros(c.shape, jnp.float32), float_consts)

    def step(kj, carry, masked: bool):
        dq, dbias, d_consts = carry
        _, ds, ds_final, k_blk, _, tile_d_consts = _tile_probs_and_dlogits(
            cfg, ops, res, q_blk, do_blk, lse_blk, delta_blk, qi, kj, masked)
        if tile_d_consts is not None:
            d_consts = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), d_consts, tile_d_consts)
        dq = dq + jnp.einsum("bkgqc,bkcd->bkgqd", ds, k_blk.astype(jnp.float32), preferred_element_type=jnp.float32)
        if dbias is not None:
            tile = _reduce_to_shape(ds_final, (*dbias.shape[:4], 1 if dbias.shape[4] == 1 else cfg.block_k))
            if dbias.shape[4] == 1:
                dbias = dbias + tile
            else:
                start = (0, 0, 0, 0, kj * cfg.block_k)
                dbias = lax.dynamic_update_slice(dbias, lax.dynamic_slice(dbias, start, tile.shape) + tile, start)
        return dq, dbias, d_consts

    dq, dbias, d_consts = _sweep(cfg, ops, qi, "kv", step, (dq, dbias, d_consts))
    return dq * cfg.scale, dbias, d_consts


def _dkv_k_block(cfg: TileConfig, ops, res, kj):
    """dk and dv for kv block kj (summed over the query heads of each group)."""
    bk = cfg.block_k
    k_shape = (*ops["k"].shape[:2], bk, ops["k"].shape[-1])
    dk = jnp.zeros(k_shape, jnp.float32)
    dv = jnp.zeros((*k_shape[:3], ops["v"].shape[-1]), jnp.float32)

    def step(qi, carry, masked: bool):
        dk, dv = carry
        q_blk, do_blk, lse_blk, delta_blk = _q_side_inputs(cfg, ops, res, qi)
        p, ds, _, _, _, _ = _tile_probs_and_dlogits(cfg, ops, res, q_blk, do_blk, lse_blk, delta_blk, qi, kj, masked)
        dv = dv + jnp.einsum("bkgqc,bkgqd->bkcd", p, do_blk.astype(jnp.float32), preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum("bkgqc,bkgqd->bkcd", ds, q_blk.astype(jnp.float32), preferred_element_type=jnp.float32)
        return dk, dv

    dk, dv = _sweep(cfg, ops, kj, "q", step, (dk, dv))
    # ds^T (scale q): with q pre-scaled the scale is already in.
    return (dk if cfg.scale_in_q else dk * cfg.scale), dv


def _stack_blocks(x, axis: int):
    """[n, ..., blk, ...] stacked over blocks -> blocks concatenated along `axis` (counted without n)."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])


def _backward(cfg: TileConfig, ops, res):
    dq, dbias_rows, d_consts = lax.map(functools.partial(_dq_q_block, cfg, ops, res), jnp.arange(cfg.num_q_blocks))
    d_consts = jax.tree.map(lambda d: jnp.sum(d, axis=0), d_consts)
    dq = _stack_blocks(dq, 3)
    dbias = None
    if cfg.has_bias:
        dbias = jnp.sum(dbias_rows, axis=0) if ops["bias"].shape[3] == 1 else _stack_blocks(dbias_rows, 3)
    dk, dv = lax.map(functools.partial(_dkv_k_block, cfg, ops, res), jnp.arange(cfg.num_k_blocks))
    dk, dv = _stack_blocks(dk, 2), _stack_blocks(dv, 2)
    dsinks = None
    if cfg.has_sinks:
        p_sink = jnp.exp(ops["sinks"][None, :, :, None] - res["lse"])
        dsinks = -jnp.sum(p_sink * res["delta"], axis=(0, 3))
    return dq, dk, dv, dbias, dsinks, d_consts


# ----------------------------------------------------------------------------------------------
# Entry point


def _prepare(cfg: TileConfig, q, k, v, bias, mask, q_segments, kv_segments, sinks, mod_consts=()):
    """Pads to whole blocks and moves everything into the internal layout."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    Tp, Sp = cfg.num_q_blocks * cfg.block_q, cfg.num_k_blocks * cfg.block_k
    if cfg.scale_in_q:
        # One multiply of q instead of one per [block_q, block_k] logit tile (a full pass over each tile).
        q = q * jnp.asarray(cfg.scale, q.dtype)
    ops = {
        "q": pad_axis(jnp.transpose(q, (0, 2, 1, 3)).reshape(B, Hkv, H // Hkv, T, D), 3, Tp),
        "k": pad_axis(jnp.transpose(k, (0, 2, 1, 3)), 2, Sp),
        "v": pad_axis(jnp.transpose(v, (0, 2, 1, 3)), 2, Sp),
        "mod_consts": tuple(mod_consts),
    }
    if bias is not None:
        bias = pad_axis(pad_axis(as_4d(bias), 2, Tp, keep_broadcast=True), 3, Sp, keep_broadcast=True)
        ops["bias"] = _split_heads(bias, Hkv)
    if mask is not None:
        mask = pad_axis(pad_axis(as_4d(mask), 2, Tp, False, keep_broadcast=True), 3, Sp, False, keep_broadcast=True)
        ops["mask"] = _split_heads(mask, Hkv)
    if q_segments is not None:
        ops["q_segments"] = pad_axis(q_segments, 1, Tp, -1)
        ops["kv_segments"] = pad_axis(kv_segments, 1, Sp, -2)
    if sinks is not None:
        ops["sinks"] = sinks.astype(jnp.float32).reshape(Hkv, H // Hkv)
    if cfg.dynamic_mask:
        # [nQ, nK]: does any (b, h) see anything in the tile (exact for the mask, interval overlap of the
        # segment ids: exact for sorted/packed ids, conservative otherwise)?
        table = visible_tiles(mask, ops.get("q_segments"), ops.get("kv_segments"), block_q=cfg.block_q,
                              block_k=cfg.block_k, num_q_blocks=cfg.num_q_blocks, num_k_blocks=cfg.num_k_blocks)
        ops["tile_any"] = jnp.any(table, axis=(0, 1))
    return ops


def _unprepare_out(out, lse, B, T, H):
    out = out[:, :, :, :T].reshape(B, H, T, -1).transpose(0, 2, 1, 3)
    lse = lse[:, :, :, :T].reshape(B, H, T).transpose(0, 2, 1)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: TileConfig, q, k, v, bias, mask, q_segments, kv_segments, sinks, mod_consts):
    return _flash_fwd(cfg, q, k, v, bias, mask, q_segments, kv_segments, sinks, mod_consts)[0]


def _flash_fwd(cfg, q, k, v, bias, mask, q_segments, kv_segments, sinks, mod_consts):
    B, T, H, _ = q.shape
    ops = _prepare(cfg, q, k, v, bias, mask, q_segments, kv_segments, sinks, mod_consts)
    out_i, lse_i = _forward(cfg, ops)
    out, lse = _unprepare_out(out_i, lse_i, B, T, H)
    out = out.astype(q.dtype)
    residuals = (q, k, v, bias, mask, q_segments, kv_segments, sinks, mod_consts, out, lse)
    return (out, lse), residuals


def _flash_bwd(cfg, residuals, cotangents):
    q, k, v, bias, mask, q_segments, kv_segments, sinks, mod_consts, out, lse = residuals
    d_out, d_lse = cotangents
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    ops = _prepare(cfg, q, k, v, bias, mask, q_segments, kv_segments, sinks, mod_consts)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    # d lse / d logits = p, so an lse cotangent enters like a shift of delta (ds = p * (dp - delta + dlse)).
    delta = delta - d_lse.astype(jnp.float32)
    masked_lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)

    def internal(x, pad_value=0):  # [B, T, H(, D)] -> [B, Hkv, G, Tp(, D)]
        x = jnp.moveaxis(x, 2, 1)
        x = x.reshape(B, Hkv, H // Hkv, *x.shape[2:])
        return pad_axis(x, 3, cfg.num_q_blocks * cfg.block_q, pad_value)

    # lse = +inf makes p = exp(s - lse) exactly 0 on fully masked and padded rows.
    res = {"do": internal(d_out.astype(v.dtype)), "lse": internal(masked_lse, jnp.inf), "delta": internal(delta)}
    dq, dk, dv, dbias, dsinks, d_float_consts = _backward(cfg, ops, res)
    dq = dq[:, :, :, :T].reshape(B, H, T, D).transpose(0, 2, 1, 3).astype(q.dtype)
    S = k.shape[1]
    dk = dk[:, :, :S].transpose(0, 2, 1, 3).astype(k.dtype)
    dv = dv[:, :, :S].transpose(0, 2, 1, 3).astype(v.dtype)
    if bias is not None:
        Tp, Sp = cfg.num_q_blocks * cfg.block_q, cfg.num_k_blocks * cfg.block_k
        dbias = dbias[:, :, :, :T if dbias.shape[3] == Tp else 1, :S if dbias.shape[4] == Sp else 1]
        b4 = as_4d(bias).shape
        dbias = dbias.reshape(b4[0], b4[1], dbias.shape[3], dbias.shape[4]).reshape(bias.shape).astype(bias.dtype)
    if sinks is not None:
        dsinks = dsinks.reshape(H).astype(sinks.dtype)
    d_consts = ()
    if cfg.score_mod is not None:
        floats = cfg.score_mod.split(mod_consts)
        d_consts = cfg.score_mod.merge((None,) * len(mod_consts),
                                       (d.astype(c.dtype) for d, c in zip(d_float_consts, floats)))
    return dq, dk, dv, dbias, None, None, None, dsinks, d_consts


def _flash_fwd_rule(cfg, q, k, v, bias, mask, q_segments, kv_segments, sinks, mod_consts):
    return _flash_fwd(cfg, q, k, v, bias, mask, q_segments, kv_segments, sinks, mod_consts)


_flash.defvjp(_flash_fwd_rule, _flash_bwd)
# Compiled once per (config, shapes): an eager call would otherwise re-trace and re-compile the lax.map each time.
_flash_compiled = jax.jit(_flash, static_argnums=(0,))


def flash_attention_xla(q: Float[Array, "B T H D"], k: Float[Array, "B S Hkv D"], v: Float[Array, "B S Hkv Dv"], *,
                        bias: Float[Array, "..."] | None = None, mask: Bool[Array, "..."] | None = None,
                        q_segment_ids: Int[Array, "B T"] | None = None, kv_segment_ids: Int[Array, "B S"] | None = None,
                        sinks: Float[Array, "H"] | None = None, causal: bool = False,
                        window: tuple[int, int] | None = None, scale: float, softcap: float | None = None,
                        score_mod: TracedScoreMod | None = None, mod_consts: tuple = (),
                        block_q: int = 512, block_k: int = 128
                        ) -> tuple[Float[Array, "B T H Dv"], Float[Array, "B T H"]]:
    """Blockwise attention with the semantics of ``jattn.core.reference`` (``jattn.attention(impl="xla")``).

    Arguments are assumed validated and normalised (see ``jattn.ops.attention``).

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, S, Hkv, D]`` (H a multiple of Hkv).
      v: ``[B, S, Hkv, Dv]``.
      bias: float, broadcastable to ``[B, H, T, S]``; differentiable.
      mask: bool (True = attend), broadcastable to ``[B, H, T, S]``.
      q_segment_ids: int ``[B, T]``; give with ``kv_segment_ids``.
      kv_segment_ids: int ``[B, S]``.
      sinks: ``[H]`` logits of one value-less term per row's softmax; differentiable.
      causal: key ``j`` visible to query ``i`` only if ``j <= i``.
      window: ``(left, right)``: keys ``i - left <= j <= i + right``.
      scale: logit scale.
      softcap: ``s -> softcap * tanh(s / softcap)`` before the bias.
      score_mod: a ``jattn.core.score_mod.TracedScoreMod``, applied to each tile's logits after the bias.
      mod_consts: the arrays it closes over (``trace_score_mod``); differentiable where float.
      block_q: query tile (any positive int).
      block_k: key tile (any positive int).

    Returns:
      ``out [B, T, H, Dv]`` in q's dtype and ``lse [B, T, H]`` float32 (sinks included; ``-inf`` on rows
      with nothing visible and no sinks).
    """
    cfg = TileConfig(T=q.shape[1], S=k.shape[1], block_q=block_q, block_k=block_k, scale=float(scale),
                     causal=bool(causal), window=None if window is None else tuple(window),
                     softcap=None if softcap is None else float(softcap), has_mask=mask is not None,
                     has_bias=bias is not None, has_segments=q_segment_ids is not None,
                     has_sinks=sinks is not None, scale_in_q=q.dtype == jnp.float32,
                     score_mod=ScoreModPlan.of(score_mod, mod_consts))
    return _flash_compiled(cfg, q, k, v, bias, mask, q_segment_ids, kv_segment_ids, sinks, tuple(mod_consts))
