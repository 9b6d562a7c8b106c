"""``block_sparse_attention``: exact attention over the tiles a ``BlockMask`` lists.

This is the one kernel every sparse selector in jattn calls. It computes *exactly* dense attention
(``jattn.core.reference``) with the element mask

    visible(b, h, i, j) = tile listed AND (tile full OR mask_fn(b, h, i, j)) AND (not causal OR j <= i)

i.e. ``block_mask.to_dense_mask(mask_fn)`` intersected with the causal mask. Work and memory are
proportional to the listed tiles, forward and backward.

The block-sparse family's files:

* ``jattn.ops.block_sparse`` (this module): the public API: validation (``jattn.core.checks``), impl
  dispatch (``jattn.ops.dispatch.run_impl``), the sinks merge;
* ``jattn.ops.block_sparse_reference``: ``impl="reference"``, the dense mask and ``reference_attention``
  (tests, tiny shapes);
* ``jattn.ops.block_sparse_xla``: ``impl="xla"``, the CPU fast path: one flat work list of the listed
  tiles, processed in fixed-size chunks with a per-q-block online-softmax merge; forward and
  ``custom_vjp`` backward cost the listed tiles (not ``max_kv_blocks`` per row);
* ``pallas_kernels.block_sparse``: ``impl="pallas"``: visits only the listed tiles of each row, evaluates
  ``mask_fn`` only on partial tiles; Pallas backward (dq over the kv lists, dk/dv over the transposed
  q lists). ``mask_fn`` must be pure index arithmetic there (no captured arrays).

``"auto"`` picks pallas on GPU/TPU and xla on CPU.

Sinks (``sinks [H]``) are merged after the kernel as one value-less partial with ``lse = sinks[h]``
(exact, see ``jattn.core.softmax``); kernels therefore never see them, and their gradient flows through
the kernels' lse cotangent.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from jaxtyping import Array, Float

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.core.score_mod import is_differentiable, trace_score_mod
from jattn.core.softmax import merge_sinks
from jattn.ops.block_sparse_reference import block_sparse_reference
from jattn.ops.block_sparse_xla import SparseConfig, block_sparse_xla
from jattn.ops.dispatch import resolve_impl, run_impl
from pallas_kernels.block_sparse import block_sparse_attention_pallas

# ``SparseConfig`` (the xla path's static config) keeps its old import path here.
__all__ = ["block_sparse_attention", "SparseConfig"]


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


def _validate(q, k, v, block_mask, *, mask_fn, causal, scale, softcap, sinks, impl, return_lse):
    B, T, S, H, Hkv, D = checks.check_qkv(q, k, v)
    _check_block_mask(block_mask, B, T, S, H)
    if mask_fn is not None and not callable(mask_fn):
        raise TypeError(f"mask_fn must be None or a callable mask_fn(b, h, q_idx, kv_idx), got {mask_fn!r}")
    mask_fn = block_mask.resolve_mask_fn(mask_fn)   # the carried one; a conflicting one raises
    causal = checks.check_bool("causal", causal)
    checks.check_bool("return_lse", return_lse)
    scale = checks.check_positive_float("scale", scale)
    softcap = checks.check_positive_float("softcap", softcap)
    checks.check_sinks(sinks, H)
    resolve_impl(impl)
    cfg = SparseConfig(seq_q=T, seq_k=S, block_q=block_mask.block_q, block_k=block_mask.block_k,
                       scale=D ** -0.5 if scale is None else scale, softcap=softcap, causal=causal,
                       mask_fn=mask_fn)
    return (B, T, S, H, Hkv, D), cfg


# ---------------------------------------------------------------------------------- public API

def block_sparse_attention(q: Float[Array, "B T H D"], k: Float[Array, "B S Hkv D"], v: Float[Array, "B S Hkv D"],
                           block_mask: BlockMask, *, mask_fn: Callable | None = None, causal: bool = False,
                           scale: float | None = None, softcap: float | None = None,
                           sinks: Float[Array, "H"] | None = None, score_mod: Callable | None = None,
                           impl: str = "auto", return_lse: bool = False):
    """Exact softmax attention restricted to the tiles of ``block_mask``.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, S, Hkv, D]`` (H a multiple of Hkv: GQA/MQA).
      v: ``[B, S, Hkv, D]``.
      block_mask: a ``BlockMask`` built for ``(seq_q, seq_k) = (T, S)`` with batch dim 1 or B and head
        dim 1 or H. Its block sizes are the kernel's tile sizes (pallas needs powers of two >= 16).
      mask_fn: ``mask_fn(b, h, q_idx, kv_idx) -> bool`` applied on the partial tiles. Default: the one
        ``block_mask`` carries (``BlockMask.resolve_mask_fn``); passing a different one is a ValueError.
      causal: additionally require ``kv_idx <= q_idx`` everywhere.
      scale: logit scale (default ``D ** -0.5``).
      softcap: ``s -> softcap * tanh(s / softcap)``.
      sinks: ``[H]`` logits of one value-less extra term in each row's softmax denominator.
      score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` on each logit after the softcap, run
        only on the listed tiles (``jattn.attention`` documents the contract). Fused into the xla path and the
        Pallas kernel; the kernel does not give the gradient of the mod's float arrays (taking it raises), so
        for a mod that closes over float arrays ``impl="auto"`` runs the xla path on every platform.
      impl: "auto" | "xla" | "pallas" | "reference".
      return_lse: also return the float32 log-sum-exp ``[B, T, H]`` (sink included; -inf on empty rows).

    Returns:
      ``out [B, T, H, D]`` in q's dtype (0 on rows with nothing visible), and ``lse [B, T, H]`` when
      ``return_lse``.

    Raises:
      TypeError, ValueError: an argument is malformed (the message names it), ``mask_fn`` conflicts with
        the carried one, or partial tiles need a mask function and none is known.
    """
    checks.check_static("block_sparse_attention", causal=causal, scale=scale, softcap=softcap, impl=impl, return_lse=return_lse)
    (B, T, S, H, Hkv, D), cfg = _validate(q, k, v, block_mask, mask_fn=mask_fn, causal=causal, scale=scale,
                                          softcap=softcap, sinks=sinks, impl=impl, return_lse=return_lse)
    traced_mod, mod_consts = (None, ()) if score_mod is None else trace_score_mod(score_mod)
    if impl == "auto" and any(is_differentiable(c) for c in mod_consts):
        impl = "xla"  # the kernel cannot give the gradient of a mod's float arrays; the xla path can

    def with_sinks(run):
        """A kernel path (no sinks) with the sinks merged after it as one value-less LSE partial (exact)."""
        def call(q, k, v, tables, sinks, mod_consts):
            out, lse = run(q, k, v, tables, mod_consts)
            if sinks is not None:
                out, lse = merge_sinks(out, lse, sinks)
            return out.astype(q.dtype), lse
        return call

    def xla(q, k, v, tables, mod_consts):
        return block_sparse_xla(cfg, q, k, v, tables[:3], score_mod=traced_mod, mod_consts=mod_consts)

    def pallas(q, k, v, tables, mod_consts):
        return block_sparse_attention_pallas(
            q, k, v, *tables, block_q=cfg.block_q, block_k=cfg.block_k, scale=cfg.scale, softcap=cfg.softcap,
            causal=cfg.causal, mask_fn=cfg.mask_fn, score_mod=traced_mod, mod_consts=mod_consts,
            out_dtype=jnp.float32 if sinks is not None else q.dtype)

    def reference(q, k, v, tables, sinks, mod_consts):
        mod = None if traced_mod is None else traced_mod.scalar_fn(mod_consts)
        return block_sparse_reference(q, k, v, block_mask, mask_fn=cfg.mask_fn, causal=cfg.causal, scale=cfg.scale,
                                      softcap=cfg.softcap, sinks=sinks, score_mod=mod, return_lse=True)

    tables = (block_mask.kv_indices, block_mask.kv_counts, block_mask.kv_full, block_mask.q_indices,
              block_mask.q_counts, block_mask.q_full)
    out, lse = run_impl(impl, (q, k, v, tables, sinks, mod_consts), xla=with_sinks(xla), pallas=with_sinks(pallas),
                        reference=reference)
    return (out, lse) if return_lse else out
