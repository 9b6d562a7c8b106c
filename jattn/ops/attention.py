"""``jattn.attention``: one entry point for softmax attention with every impl behind it.

The softmax family's files:

* ``jattn.ops.attention`` (this module): the public API: validation (``jattn.core.checks``), impl dispatch
  (``jattn.ops.dispatch.run_impl``), the glue around the kernel (segment-id pair, sinks merge);
* ``jattn.ops.attention_reference``: ``impl="reference"``, the dense fp32 oracle (``jattn.core.reference``);
* ``jattn.ops.attention_xla``: ``impl="xla"``, the blockwise O(T)-memory pure-JAX path (the CPU fast path);
* ``pallas_kernels.attention``: ``impl="pallas"``, the flash kernel (compiled on GPU/TPU, interpreted on CPU).

``"auto"`` picks pallas on GPU/TPU and xla on CPU, when the program is lowered. Every impl takes every
argument of the reference and follows its semantics (see ``jattn.core.reference``).
"""
from __future__ import annotations

import functools
from typing import Callable

from jaxtyping import Array, Bool, Float, Int

from jattn.core import checks
from jattn.core.reference import check_prob_mod
from jattn.core.score_mod import trace_score_mod
from jattn.core.softmax import merge_sinks
from jattn.ops.attention_reference import attention_reference
from jattn.ops.attention_xla import flash_attention_xla
from jattn.ops.dispatch import run_impl
from pallas_kernels.attention import BlockSizes, flash_attention as flash_attention_pallas
from pallas_kernels.common import MIN_DOT_DIM, fit_block

# Tile sizes that measured fastest on a 2-core CPU (benchmarks/cpu.py) and on GPU (benchmarks/gpu_suite.py).
# xla: [H, 512, 256] f32 logit tiles. On the 2-core CPU with JAX 0.10.2 (causal, B=1, H=8, D=64, best of 7,
# interleaved) 512x256 was the fastest of 512x128, 512x256, 512x512, 1024x128 and 256x256 at T = 1K, 4K and 8K
# (8K: 710 ms against 1,213 ms for 512x128, whose 128-key dots XLA:CPU ran at about half its GEMM rate), and
# its backward too (4K: 1.18 s against 1.68 s).
# Pallas defaults are per target: pallas_kernels.attention.DEFAULTS
DEFAULT_BLOCKS = {"xla": (512, 256)}
MIN_BLOCK = MIN_DOT_DIM


def attention(q: Float[Array, "B T H D"], k: Float[Array, "B S Hkv D"], v: Float[Array, "B S Hkv D"], *,
              bias: Float[Array, "..."] | None = None, mask: Bool[Array, "..."] | None = None,
              causal: bool = False, window: int | tuple[int, int] | None = None,
              segment_ids: Int[Array, "B T"] | tuple[Int[Array, "B T"], Int[Array, "B S"]] | None = None,
              scale: float | None = None, softcap: float | None = None, sinks: Float[Array, "H"] | None = None,
              score_mod: Callable | None = None, prob_mod: Callable | None = None, return_lse: bool = False,
              impl: str = "auto",
              block_q: int | None = None, block_k: int | None = None):
    """Softmax attention ``softmax(score_mod(q k^T * scale + bias), masked) v``.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, S, Hkv, D]`` with H a multiple of Hkv (GQA/MQA).
      v: ``[B, S, Hkv, D]``.
      bias: float, broadcastable to ``[B, H, T, S]``, added to the logits (after softcap).
      mask: bool, broadcastable to ``[B, H, T, S]``; True = attend.
      causal: key j visible to query i only if ``j <= i``. (Named ``causal`` like every jattn op's flag;
        ``jax.nn.dot_product_attention`` calls it ``is_causal``.)
      window: ``(left, right)``: query i sees keys ``i - left <= j <= i + right``: ``left``/``right`` count
        the keys on each side, the query's own key always included. An int ``n`` means ``(n, n)``, as
        ``jax.nn.dot_product_attention(local_window_size=n)``; with causal=True that is ``(n, 0)``: the
        query and the n keys before it (n + 1 keys). Every jattn window (``masks.sliding_window_mask``,
        ``nn.Attention(method="sliding_window", window=...)``) means the same.
      segment_ids: ``[B, T]`` (needs T == S) or a pair ``(q_ids [B, T], kv_ids [B, S])``.
      scale: logit scale, default ``D ** -0.5``.
      softcap: ``s -> softcap * tanh(s / softcap)``.
      sinks: ``[H]`` logits of one value-less extra term per row's softmax (GPT-OSS).
      score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score``, FlexAttention's hook: rewrites each float32
        logit (after scale, softcap and bias) from its batch, query head and positions (int32). Elementwise;
        may close over arrays (gradients flow to them); ``-inf`` masks an entry (but skips no tile: prefer
        ``mask``/``causal``/``window`` for structure). Fused into the xla path and the Pallas kernels: no
        ``[T, S]`` array is formed outside ``"reference"``, except that differentiating the arrays it closes
        over on ``impl="pallas"`` takes one dense step, as the bias gradient does. Inside a kernel an array
        may be read at a per-(batch, head) index (``slopes[h]``); a lookup whose index varies across the tile
        (``table[h, q_idx - kv_idx]``) is a gather, which the xla path runs and Triton/Mosaic may not lower.
        Ready-made mods: ``jattn.score_mods``.
      prob_mod: ``prob_mod(probs) -> probs`` on the normalised float32 probabilities ``[B, H, T, S]`` (masked
        entries 0) before they weight ``v``: redistribution, interpolation toward the identity, head masking.
        Dense path only: it needs each whole normalised row, which a one-pass (online-softmax) kernel never
        holds (a row is normalised only after its last tile), so honouring it in a kernel would take a second
        pass over K/V. ``impl="auto"`` then runs ``"reference"``; ``"xla"`` and ``"pallas"`` raise. ``lse``
        stays the softmax's.
      return_lse: also return the float32 log-sum-exp ``[B, T, H]``.
      impl: "auto" | "xla" | "pallas" | "reference".
      block_q: query tile size (a power of two >= 16); None picks the impl's default.
      block_k: key tile size (a power of two >= 16); None picks the impl's default.

    Returns:
      ``out [B, T, H, D]`` in q's dtype, and ``lse [B, T, H]`` (float32, sinks included; ``-inf`` on a row
      with nothing visible and no sinks) when ``return_lse``.

    Raises:
      TypeError, ValueError: an argument is malformed; the message names it (``jattn.core.checks``).
    """
    checks.check_static("attention", causal=causal, window=window, scale=scale, softcap=softcap, return_lse=return_lse, impl=impl, block_q=block_q, block_k=block_k)
    (B, T, S, H, Hkv, D), window, segments, scale = checks.check_attention_args(
        q, k, v, bias=bias, mask=mask, window=window, segment_ids=segment_ids, scale=scale, softcap=softcap,
        sinks=sinks)
    traced_mod, mod_consts = (None, ()) if score_mod is None else trace_score_mod(score_mod)
    if prob_mod is not None:
        check_prob_mod(prob_mod, (B, H, T, S))
        if impl in ("xla", "pallas"):
            raise ValueError(f"prob_mod needs the dense path (impl='reference' or 'auto'), got impl={impl!r}: it "
                             f"rewrites whole normalised rows, which the one-pass {impl} kernels never hold")
        impl = "reference"
    block_q = checks.check_block_size("block_q", block_q, minimum=MIN_BLOCK)
    block_k = checks.check_block_size("block_k", block_k, minimum=MIN_BLOCK)
    static = dict(causal=bool(causal), window=window, scale=scale, softcap=softcap)

    def reference(q, k, v, bias, mask, segments, sinks, mod_consts):
        mod = None if traced_mod is None else traced_mod.scalar_fn(mod_consts)
        return attention_reference(q, k, v, bias=bias, mask=mask, segment_ids=segments, sinks=sinks,
                                   score_mod=mod, prob_mod=prob_mod, return_lse=True, **static)

    def xla(q, k, v, bias, mask, segments, sinks, mod_consts):
        default_q, default_k = DEFAULT_BLOCKS["xla"]
        return flash_attention_xla(
            q, k, v, bias=bias, mask=mask, q_segment_ids=None if segments is None else segments[0],
            kv_segment_ids=None if segments is None else segments[1], sinks=sinks, score_mod=traced_mod,
            mod_consts=mod_consts, block_q=fit_block(default_q, T) if block_q is None else block_q,
            block_k=fit_block(default_k, S) if block_k is None else block_k, **static)

    pallas = functools.partial(_flash_pallas, block_q=block_q, block_k=block_k, score_mod=traced_mod, **static)
    out, lse = run_impl(impl, (q, k, v, bias, mask, segments, sinks, mod_consts), xla=xla, pallas=pallas,
                        reference=reference)
    return (out, lse) if return_lse else out


def _flash_pallas(q, k, v, bias, mask, segments, sinks, mod_consts, *, block_q, block_k, **kwargs):
    """The Pallas flash kernel; sinks are merged after it as one value-less LSE partial (exact)."""
    out, lse = flash_attention_pallas(
        q, k, v, bias=bias, mask=mask, q_segment_ids=None if segments is None else segments[0],
        kv_segment_ids=None if segments is None else segments[1], mod_consts=mod_consts,
        block_sizes=BlockSizes(block_q=block_q, block_k=block_k), **kwargs)
    if sinks is not None:
        out, lse = merge_sinks(out, lse, sinks)
        out = out.astype(q.dtype)
    return out, lse
