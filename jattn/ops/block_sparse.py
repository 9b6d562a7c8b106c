"""``block_sparse_attention``: exact attention over the tiles a ``BlockMask`` lists.

This is the one kernel every sparse selector in jattn calls. It computes *exactly* dense attention
(``jattn.core.reference``) with the element mask

    visible(b, h, i, j) = tile listed AND (tile full OR mask_fn(b, h, i, j)) AND (not causal OR j <= i)

i.e. ``block_mask.to_dense_mask(mask_fn)`` intersected with the causal mask. Work and memory are
proportional to the listed tiles, forward and backward.

Impls:

* ``"reference"``: materialises the dense mask and calls ``reference_attention`` (tests, tiny shapes).
* ``"xla"``: the CPU fast path. For every query block it gathers the listed kv blocks (a padded table
  of ``max_kv_blocks`` entries, masked past each row's count) and runs one masked softmax over them;
  a ``custom_vjp`` recomputes the tiles and scatter-adds dk/dv, so the backward is proportional too.
  Cost follows ``max_kv_blocks`` (the widest row), so unbalanced masks pay for their widest row.
* ``"pallas"``: ``pallas_kernels.block_sparse``: visits only the listed tiles of each row, evaluates
  ``mask_fn`` only on partial tiles; Pallas backward (dq over the kv lists, dk/dv over the transposed
  q lists). ``mask_fn`` must be pure index arithmetic there (no captured arrays).
* ``"auto"``: pallas on GPU/TPU, xla on CPU.

Sinks (``sinks [H]``) are merged after the kernel as one value-less partial with ``lse = sinks[h]``
(exact, see ``jattn.core.softmax``); kernels therefore never see them, and their gradient flows through
the kernels' lse cotangent.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.core.reference import reference_attention
from jattn.core.softmax import MASK_VALUE

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """Static description of one call (hashable: it is a ``custom_vjp`` non-differentiable argument)."""
    seq_q: int
    seq_k: int
    block_q: int
    block_k: int
    scale: float
    softcap: Optional[float]
    causal: bool
    mask_fn: Optional[Callable]

    @property
    def num_q_blocks(self) -> int:
        return -(-self.seq_q // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.seq_k // self.block_k)


# ---------------------------------------------------------------------------------- validation

def _check_block_mask(block_mask, B: int, T: int, S: int, H: int) -> None:
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a jattn BlockMask, got {type(block_mask).__name__}")
    if (block_mask.seq_q, block_mask.seq_k) != (T, S):
        raise ValueError(f"block_mask was built for seq (seq_q, seq_k) = ({block_mask.seq_q}, {block_mask.seq_k}) "
                         f"but q and k have T={T}, S={S}")
    Bm, Hm = block_mask.shape[:2]
    if Bm not in (1, B):
        raise ValueError(f"block_mask batch dim must be 1 or B={B}, got {Bm}")
    if Hm not in (1, H):
        raise ValueError(f"block_mask head dim must be 1 or the number of query heads H={H}, got {Hm}")


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _validate(q, k, v, block_mask, *, mask_fn, causal, scale, softcap, sinks, impl, return_lse):
    B, T, S, H, Hkv, D = checks.check_qkv(q, k, v)
    _check_block_mask(block_mask, B, T, S, H)
    if mask_fn is not None and not callable(mask_fn):
        raise TypeError(f"mask_fn must be None or a callable mask_fn(b, h, q_idx, kv_idx), got {mask_fn!r}")
    _check_flag("causal", causal)
    _check_flag("return_lse", return_lse)
    scale = checks.check_positive_float("scale", scale)
    softcap = checks.check_positive_float("softcap", softcap)
    checks.check_sinks(sinks, H)
    checks.check_choice("impl", impl, checks.IMPLS)
    cfg = SparseConfig(seq_q=T, seq_k=S, block_q=block_mask.block_q, block_k=block_mask.block_k,
                       scale=D ** -0.5 if scale is None else scale, softcap=softcap, causal=causal,
                       mask_fn=mask_fn)
    return (B, T, S, H, Hkv, D), cfg


def resolve_impl(impl: str) -> str:
    if impl != "auto":
        return impl
    return "xla" if jax.default_backend() == "cpu" else "pallas"


# ---------------------------------------------------------------------------------- public API

def block_sparse_attention(q, k, v, block_mask: BlockMask, *, mask_fn: Callable | None = None,
                           causal: bool = False, scale: float | None = None, softcap: float | None = None,
                           sinks=None, impl: str = "auto", return_lse: bool = False):
    """Exact softmax attention restricted to the tiles of ``block_mask``.

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, S, Hkv, D]`` (H a multiple of Hkv: GQA/MQA).
      block_mask: a ``BlockMask`` built for ``(seq_q, seq_k) = (T, S)`` with batch dim 1 or B and head
        dim 1 or H. Its block sizes are the kernel's tile sizes (pallas needs powers of two >= 16).
      mask_fn: ``mask_fn(b, h, q_idx, kv_idx) -> bool`` applied on the partial tiles (None = all True).
      causal: additionally require ``kv_idx <= q_idx`` everywhere.
      scale: logit scale (default ``D ** -0.5``). softcap: ``s -> softcap * tanh(s / softcap)``.
      sinks: ``[H]`` logits of one value-less extra term in each row's softmax denominator.
      impl: "auto" | "xla" | "pallas" | "reference".
      return_lse: also return the float32 log-sum-exp ``[B, T, H]`` (sink included; -inf on empty rows).

    Returns ``out [B, T, H, D]`` in q's dtype (0 on rows with nothing visible), and ``lse`` when asked.
    """
    (B, T, S, H, Hkv, D), cfg = _validate(q, k, v, block_mask, mask_fn=mask_fn, causal=causal, scale=scale,
                                          softcap=softcap, sinks=sinks, impl=impl, return_lse=return_lse)
    impl = resolve_impl(impl)
    if impl == "reference":
        dense = block_mask.to_dense_mask(mask_fn, batch=B, heads=H)
        return reference_attention(q, k, v, mask=dense, causal=causal, scale=cfg.scale, softcap=softcap,
                                   sinks=sinks, return_lse=return_lse)
    if impl == "xla":
        out, lse = _xla_core(cfg, q, k, v, _kv_tables(block_mask))
    else:
        from pallas_kernels.block_sparse import block_sparse_attention_pallas
        out, lse = block_sparse_attention_pallas(
            q, k, v, block_mask.kv_indices, block_mask.kv_counts, block_mask.kv_full,
            block_mask.q_indices, block_mask.q_counts, block_mask.q_full,
            block_q=cfg.block_q, block_k=cfg.block_k, scale=cfg.scale, softcap=softcap, causal=causal,
            mask_fn=mask_fn, out_dtype=F32 if sinks is not None else q.dtype)
    if sinks is not None:
        out, lse = merge_sinks(out, lse, sinks)
    out = out.astype(q.dtype)
    return (out, jnp.swapaxes(lse, 1, 2)) if return_lse else out


def merge_sinks(out, lse, sinks):
    """Folds ``exp(sinks[h])`` into each row's denominator: ``out [B, T, H, D]``, ``lse [B, H, T]``.

    Exact log-sum-exp merge with a value-less partial; differentiable (the kernels receive the lse
    cotangent). Empty rows stay 0 and get ``lse = sinks[h]``, as in the reference.
    """
    sink = sinks.astype(F32)[None, :, None]
    new_lse = jnp.logaddexp(lse, sink)
    keep = jnp.where(jnp.isfinite(lse), jnp.exp(lse - new_lse), 0.0)      # [B, H, T]
    return out.astype(F32) * jnp.swapaxes(keep, 1, 2)[..., None], new_lse


# ---------------------------------------------------------------------------------- xla path

def _kv_tables(block_mask: BlockMask):
    return block_mask.kv_indices, block_mask.kv_counts, block_mask.kv_full


def _pad_to(x, axis: int, length: int):
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _per_q_block(table, B: int, H: int):
    """``[Bm, Hm, nQ, ...]`` -> ``[nQ, B, H, ...]`` (the scan axis first)."""
    table = jnp.broadcast_to(table, (B, H) + table.shape[2:])
    return jnp.moveaxis(table, 2, 0)


def _layout(cfg: SparseConfig, q, k, v):
    """q blocks ``[nQ, B, H, bq, D]`` and kv tiles ``[B, Hkv, nK, bk, D]``, float32, zero padded."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    nQ, nK, bq, bk = cfg.num_q_blocks, cfg.num_kv_blocks, cfg.block_q, cfg.block_k
    q_blocks = _pad_to(q.astype(F32), 1, nQ * bq).reshape(B, nQ, bq, H, D).transpose(1, 0, 3, 2, 4)

    def tiles(x):
        x = _pad_to(x.astype(F32), 1, nK * bk)
        return x.reshape(B, nK, bk, Hkv, x.shape[-1]).transpose(0, 3, 1, 2, 4)

    return q_blocks, tiles(k), tiles(v)


def _gather_ids(B: int, H: int, Hkv: int):
    """Index arrays selecting, for query head h, its kv head ``h // (H // Hkv)``."""
    return jnp.arange(B)[:, None, None], (jnp.arange(H) // (H // Hkv))[None, :, None]


def _gather(tiles, b_ids, kvh_ids, indices):
    """``tiles [B, Hkv, nK, bk, E]``, ``indices [B, H, maxK]`` -> ``[B, H, maxK * bk, E]``."""
    g = tiles[b_ids, kvh_ids, indices]
    return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


def _visibility(cfg: SparseConfig, qi, indices, counts, full):
    """Element mask ``[B, H, bq|1, maxK * bk]`` of one q block's gathered tiles, or None (all visible)."""
    B, H, max_k = indices.shape
    bq, bk = cfg.block_q, cfg.block_k
    kv_pos = (indices[..., None] * bk + jnp.arange(bk)).reshape(B, H, 1, max_k * bk)
    listed = jnp.repeat(jnp.arange(max_k) < counts[..., None], bk, axis=-1)[:, :, None, :]
    visible = listed
    if cfg.seq_k % bk:
        visible = visible & (kv_pos < cfg.seq_k)
    q_pos = (qi * bq + jnp.arange(bq))[None, None, :, None]
    if cfg.causal:
        visible = visible & (kv_pos <= q_pos)
    if cfg.mask_fn is not None:
        full_cols = jnp.repeat(full, bk, axis=-1)[:, :, None, :]
        b = jnp.arange(B)[:, None, None, None]
        h = jnp.arange(H)[None, :, None, None]
        chosen = cfg.mask_fn(b, h, jnp.minimum(q_pos, cfg.seq_q - 1), jnp.minimum(kv_pos, cfg.seq_k - 1))
        visible = visible & (full_cols | chosen)
    return visible


def _scores(cfg: SparseConfig, q_blk, k_g):
    """Logits ``[B, H, bq, L]`` after scale and softcap, and the tanh the softcap backward needs."""
    s = jnp.einsum("bhqd,bhld->bhql", q_blk, k_g) * cfg.scale
    if cfg.softcap is None:
        return s, None
    t = jnp.tanh(s / cfg.softcap)
    return cfg.softcap * t, t


def _xla_forward(cfg: SparseConfig, q, k, v, tables):
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    q_blocks, k_tiles, v_tiles = _layout(cfg, q, k, v)
    b_ids, kvh_ids = _gather_ids(B, H, Hkv)
    indices, counts, full = (_per_q_block(t, B, H) for t in tables)

    def q_block_step(_, xs):
        qi, q_blk, idx, cnt, fl = xs
        s, _ = _scores(cfg, q_blk, _gather(k_tiles, b_ids, kvh_ids, idx))
        visible = _visibility(cfg, qi, idx, cnt, fl)
        s = jnp.where(visible, s, MASK_VALUE)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.where(visible, jnp.exp(s - m), 0.0)
        l = jnp.sum(p, axis=-1, keepdims=True)
        acc = jnp.einsum("bhql,bhle->bhqe", p, _gather(v_tiles, b_ids, kvh_ids, idx))
        seen = l > 0
        safe_l = jnp.where(seen, l, 1.0)
        out = acc / safe_l
        lse = jnp.where(seen, m + jnp.log(safe_l), -jnp.inf)[..., 0]
        return None, (out, lse)

    xs = (jnp.arange(cfg.num_q_blocks), q_blocks, indices, counts, full)
    _, (out, lse) = jax.lax.scan(q_block_step, None, xs)
    # out [nQ, B, H, bq, E] -> [B, T, H, E]; lse [nQ, B, H, bq] -> [B, H, T]
    out = out.transpose(1, 0, 3, 2, 4).reshape(B, -1, H, out.shape[-1])[:, :T]
    lse = lse.transpose(1, 2, 0, 3).reshape(B, H, -1)[:, :, :T]
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _xla_core(cfg: SparseConfig, q, k, v, tables):
    """``(out [B, T, H, E] float32, lse [B, H, T])`` without sinks."""
    return _xla_forward(cfg, q, k, v, tables)


def _xla_core_fwd(cfg, q, k, v, tables):
    out, lse = _xla_forward(cfg, q, k, v, tables)
    return (out, lse), (q, k, v, tables, out, lse)


def _xla_core_bwd(cfg, residuals, cotangents):
    q, k, v, tables, out, lse = residuals
    d_out, d_lse = cotangents
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    nQ, bq = cfg.num_q_blocks, cfg.block_q
    q_blocks, k_tiles, v_tiles = _layout(cfg, q, k, v)
    b_ids, kvh_ids = _gather_ids(B, H, Hkv)
    indices, counts, full = (_per_q_block(t, B, H) for t in tables)
    d_out = d_out.astype(F32)
    # ds = p * (dp - delta) with delta = rowsum(dO * out) - dlse (the lse output's own cotangent).
    delta = jnp.einsum("bthe,bthe->bht", d_out, out) - d_lse.astype(F32)

    def rows_by_block(x):  # [B, H, T] -> [nQ, B, H, bq]
        return _pad_to(x, 2, nQ * bq).reshape(B, H, nQ, bq).transpose(2, 0, 1, 3)

    do_blocks = _pad_to(d_out, 1, nQ * bq).reshape(B, nQ, bq, H, -1).transpose(1, 0, 3, 2, 4)
    lse_blocks = rows_by_block(jnp.where(jnp.isfinite(lse), lse, 0.0))
    delta_blocks = rows_by_block(delta)

    def q_block_step(carry, xs):
        dk_tiles, dv_tiles = carry
        qi, q_blk, do_blk, lse_blk, delta_blk, idx, cnt, fl = xs
        k_g = _gather(k_tiles, b_ids, kvh_ids, idx)
        v_g = _gather(v_tiles, b_ids, kvh_ids, idx)
        s, tanh = _scores(cfg, q_blk, k_g)
        visible = _visibility(cfg, qi, idx, cnt, fl)
        p = jnp.where(visible, jnp.exp(s - lse_blk[..., None]), 0.0)
        dv_part = jnp.einsum("bhql,bhqe->bhle", p, do_blk)
        dp = jnp.einsum("bhqe,bhle->bhql", do_blk, v_g)
        ds = p * (dp - delta_blk[..., None])
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        ds = ds * cfg.scale
        dq_blk = jnp.einsum("bhql,bhld->bhqd", ds, k_g)
        dk_part = jnp.einsum("bhql,bhqd->bhld", ds, q_blk)
        tile_shape = idx.shape + (cfg.block_k, -1)
        # Padding slots repeat a listed id with p = 0, so they add zeros; GQA heads sharing a kv head add up.
        dk_tiles = dk_tiles.at[b_ids, kvh_ids, idx].add(dk_part.reshape(tile_shape))
        dv_tiles = dv_tiles.at[b_ids, kvh_ids, idx].add(dv_part.reshape(tile_shape))
        return (dk_tiles, dv_tiles), dq_blk

    xs = (jnp.arange(nQ), q_blocks, do_blocks, lse_blocks, delta_blocks, indices, counts, full)
    init = (jnp.zeros_like(k_tiles), jnp.zeros_like(v_tiles))
    (dk_tiles, dv_tiles), dq = jax.lax.scan(q_block_step, init, xs)
    dq = dq.transpose(1, 0, 3, 2, 4).reshape(B, -1, H, D)[:, :T]

    def untile(x, like):  # [B, Hkv, nK, bk, E] -> [B, S, Hkv, E]
        return x.transpose(0, 2, 3, 1, 4).reshape(B, -1, Hkv, x.shape[-1])[:, :like.shape[1]].astype(like.dtype)

    return dq.astype(q.dtype), untile(dk_tiles, k), untile(dv_tiles, v), None


_xla_core.defvjp(_xla_core_fwd, _xla_core_bwd)
