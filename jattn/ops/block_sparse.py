"""``block_sparse_attention``: exact attention over the tiles a ``BlockMask`` lists.

This is the one kernel every sparse selector in jattn calls. It computes *exactly* dense attention
(``jattn.core.reference``) with the element mask

    visible(b, h, i, j) = tile listed AND (tile full OR mask_fn(b, h, i, j)) AND (not causal OR j <= i)

i.e. ``block_mask.to_dense_mask(mask_fn)`` intersected with the causal mask. Work and memory are
proportional to the listed tiles, forward and backward.

Impls:

* ``"reference"``: materialises the dense mask and calls ``reference_attention`` (tests, tiny shapes).
* ``"xla"``: the CPU fast path, ``jattn.ops.block_sparse_xla``: one flat work list of the listed tiles,
  processed in fixed-size chunks with a per-q-block online-softmax merge; forward and ``custom_vjp``
  backward cost the listed tiles (not ``max_kv_blocks`` per row).
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
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.core.reference import reference_attention
from jattn.core.softmax import merge_sinks
from jattn.ops.block_sparse_xla import block_sparse_xla
from jattn.ops.dispatch import auto_is_pallas, run_impl
from pallas_kernels.block_sparse import block_sparse_attention_pallas

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
    mask_fn = block_mask.resolve_mask_fn(mask_fn)   # the carried one; a conflicting one raises
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
    """Static geometry policy only (e.g. tile padding): "auto" counts as pallas, see ``jattn.ops.dispatch``."""
    return "pallas" if auto_is_pallas(impl) else impl


# ---------------------------------------------------------------------------------- public API

def block_sparse_attention(q, k, v, block_mask: BlockMask, *, mask_fn: Callable | None = None,
                           causal: bool = False, scale: float | None = None, softcap: float | None = None,
                           sinks=None, impl: str = "auto", return_lse: bool = False):
    """Exact softmax attention restricted to the tiles of ``block_mask``.

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, S, Hkv, D]`` (H a multiple of Hkv: GQA/MQA).
      block_mask: a ``BlockMask`` built for ``(seq_q, seq_k) = (T, S)`` with batch dim 1 or B and head
        dim 1 or H. Its block sizes are the kernel's tile sizes (pallas needs powers of two >= 16).
      mask_fn: ``mask_fn(b, h, q_idx, kv_idx) -> bool`` applied on the partial tiles. Default: the one
        ``block_mask`` carries (``BlockMask.resolve_mask_fn``); passing a different one is a ValueError.
      causal: additionally require ``kv_idx <= q_idx`` everywhere.
      scale: logit scale (default ``D ** -0.5``). softcap: ``s -> softcap * tanh(s / softcap)``.
      sinks: ``[H]`` logits of one value-less extra term in each row's softmax denominator.
      impl: "auto" | "xla" | "pallas" | "reference".
      return_lse: also return the float32 log-sum-exp ``[B, T, H]`` (sink included; -inf on empty rows).

    Returns ``out [B, T, H, D]`` in q's dtype (0 on rows with nothing visible), and ``lse`` when asked.
    """
    checks.check_static("block_sparse_attention", causal=causal, scale=scale, softcap=softcap, impl=impl, return_lse=return_lse)
    (B, T, S, H, Hkv, D), cfg = _validate(q, k, v, block_mask, mask_fn=mask_fn, causal=causal, scale=scale,
                                          softcap=softcap, sinks=sinks, impl=impl, return_lse=return_lse)
    mask_fn = cfg.mask_fn
    if impl == "reference":
        dense = block_mask.to_dense_mask(mask_fn, batch=B, heads=H)
        return reference_attention(q, k, v, mask=dense, causal=causal, scale=cfg.scale, softcap=softcap,
                                   sinks=sinks, return_lse=return_lse)

    def xla(q, k, v, tables):
        out, lse = block_sparse_xla(cfg, q, k, v, tables)
        return out, jnp.swapaxes(lse, 1, 2)

    def pallas(q, k, v, tables):
        out, lse = block_sparse_attention_pallas(
            q, k, v, *tables, block_q=cfg.block_q, block_k=cfg.block_k, scale=cfg.scale, softcap=softcap,
            causal=causal, mask_fn=mask_fn, out_dtype=F32 if sinks is not None else q.dtype)
        return out, jnp.swapaxes(lse, 1, 2)

    tables = (block_mask.kv_indices, block_mask.kv_counts, block_mask.kv_full, block_mask.q_indices,
              block_mask.q_counts, block_mask.q_full)
    out, lse = run_impl(impl, (q, k, v, tables), xla=lambda q, k, v, t: xla(q, k, v, t[:3]), pallas=pallas)
    if sinks is not None:
        out, lse = merge_sinks(out, lse, sinks)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out
