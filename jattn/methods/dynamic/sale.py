"""P32 — SALE: Low-bit Estimation for Efficient Sparse Attention in Long-context LLM Prefilling.

A dynamic selector for causal prefill (``T == S``). Queries are cut into blocks of ``block_q`` (paper 64),
keys into blocks of ``block_k`` (paper 32); ``nQ = ceil(T / block_q)``, ``nK = ceil(T / block_k)``;
``scale = D ** -0.5``; GQA query head ``h`` reads kv head ``h // (H // Hkv)``. Per (batch, query head ``h``,
query block ``i`` with rows ``[i b_q, e_i)``, ``e_i = min((i + 1) b_q, T)``):

1. Smoothing (softmax-invariant): ``k' = k - mean_s k`` (per kv head, over the sequence) and ``q' = q -
   q_bar`` with ``q_bar = mean_t q`` (per query head). ``q . k'_j = q' . k'_j + q_bar . k'_j``.
2. Quantisation: symmetric ``bits``-bit (``qmax = 2^(bits-1) - 1 = 7`` for INT4) with one scale per
   ``quant_block`` consecutive tokens (``quant_block = 1``: per-token scales, the official default
   ``quant_mode = 2``; ``quant_block > 1``: per-block scales, as the official per-warp ``quant_mode = 3``):
   ``a = max |x|`` over the group's tokens and dims, ``int(x) = clip(round_half_even(x * qmax / a), +-qmax)``,
   ``s_x = a / qmax`` (``a = 0`` gives zeros). The estimate of the smoothed logit is
   ``s~_tj = s_q(t) s_k(j) (int(q'_t) . int(k'_j)) + q_bar . k'_j`` (the integer dot product is computed
   exactly in float32: ``|sum| <= qmax^2 D < 2^24``). ``bits=None`` uses the full-precision
   ``q_t . k'_j`` instead (the "oracle" estimator of the spec's tests).
3. Sink and local tiles, computed exactly: the sink is key tile 0; the local tiles are the key tiles that
   intersect ``[max(0, i b_q - local_window), e_i)`` (the diagonal plus ``local_window`` recent keys). Over
   their causally visible elements, in full precision, each row ``t`` keeps ``m_t = max_j scale q_t . k'_j``
   and ``l_t = sum_j exp(scale q_t . k'_j - m_t)``.
4. Relative attention score ``exp(scale s~_tj - m_t) / l_t`` (relative to the sink+local partial softmax):
   a *candidate* tile ``(i, c)`` (every tile strictly left of the local ones, except the sink; all of its
   elements are causally visible) is kept iff some real row ``t`` of block ``i`` and key ``j`` of tile ``c``
   have ``scale s~_tj > m_t + ln(tau_h l_t)``, i.e. a relative score above ``tau_h``.
5. The kept tiles are sink + local + selected candidates; attention is ``jattn.block_sparse_attention(...,
   causal=True)`` over them (every element of a listed tile visible, up to the causal mask).

Dense paths (official): ``T <= dense_len`` (official 1024) keeps every causal tile; a head with
``tau_h < 1e-5`` keeps every causal tile (``tau = 0`` is also dense by the rule itself: ``ln 0 = -inf``).

Defaults (official ``flash_attn_func_int4_skip``, README): ``tau = 0.004`` for all heads, ``block_q = 64``,
``block_k = 32``, ``local_window = 128``, INT4, per-token scales, ``dense_len = 1024``. ``tau`` may be one
float or a tuple of ``H`` floats (the paper calibrates one per head offline; the calibration script is not
reproduced here).

Official-code readings (``BirdChristopher/SALE``: ``int4_flash_attn/quant_triton.py``,
``csrc/flash_attn/src/flash_fwd_int4_sparse_kernel_v2.h``, ``softmax.h``): the threshold
``threshold_temp = log2(l tau) / scale_log2 + m`` compares the dequantised raw logit with ``m + ln(tau l) /
scale``, which is the rule of step 4 in scaled units; scales ``7 / max|x|``, round-to-nearest-even
(``float2int_rn``); both q and k are mean-smoothed and ``q_bar . k'_j`` (``qmk``) is added back after the
integer product; the exact sink/local pass runs on the smoothed keys.

Deliberate deviations:

* The official kernel enlarges the local region so that the scanned candidate region is a whole number of
  ``block_seg``-key segments (``n_supplement_seg``). jattn uses the clean local window of step 3 (no
  segment alignment), so ``block_seg`` is not a parameter.
* ``qmk`` is added in float (the per-token mode); the per-warp mode rounds ``qmk / (s_q s_k)`` to the
  integer grid before adding it. The rest of the per-warp mode is ``quant_block > 1``.
* The selection reads the whole ``[b_q, T]`` estimate row block (one ``lax.map`` step per query block,
  ``O(T^2 D)`` integer-valued work, ``O(b_q T)`` memory) and, for the exact statistics, only the sink tile
  and a static-width window of ``(ceil((local_window + b_q) / b_k) + 1) b_k`` keys holding the local tiles;
  the official kernel streams the estimate in 128/256-key segments and fuses it with the sink/local flash
  pass. The sparse pass is the shared block-sparse kernel
  (fp32), not SageAttention INT8.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.ops.block_sparse import block_sparse_attention

HIGHEST = jax.lax.Precision.HIGHEST
DENSE_TAU = 1e-5  # official: a head threshold below this runs dense

__all__ = ["sale_attention", "sale_block_mask", "sale_select", "quantize_symmetric", "quantize_int4_per_token",
           "sale_estimate_logits"]


# ---------------------------------------------------------------------------------------- validation

def _head_taus(tau, H: int) -> np.ndarray:
    """``tau`` (one float or ``H`` floats, each in ``[0, 1]``) -> float64 ``[H]``."""
    if isinstance(tau, (tuple, list)):
        if len(tau) != H:
            raise ValueError(f"tau must be one float or a tuple of H={H} per-head floats, got {len(tau)} values")
        return np.asarray([checks.check_float_in(f"tau[{h}]", t, 0.0, 1.0) for h, t in enumerate(tau)])
    return np.full(H, checks.check_float_in("tau", tau, 0.0, 1.0))


def _check_args(q, k, tau, block_q, block_k, local_window, bits, quant_block, dense_len, smooth):
    """Validates the selector's inputs; returns ``(B, T, H, Hkv, D, taus [H])``."""
    B, T, H, Hkv, D = checks.check_self_attention_qk(q, k, "SALE (causal prefill)")
    taus = _head_taus(tau, H)
    block_q = checks.check_int("block_q", block_q, 1)
    block_k = checks.check_int("block_k", block_k, 1)
    checks.check_int("local_window", local_window, 0)
    if bits is not None:
        checks.check_int("bits", bits, 2)
        if bits > 8:
            raise ValueError(f"bits must be an int in [2, 8] or None (full precision), got {bits!r}")
    quant_block = checks.check_int("quant_block", quant_block, 1)
    if block_q % quant_block or block_k % quant_block:
        raise ValueError(f"quant_block={quant_block} (tokens per quantisation scale) must divide block_q={block_q} "
                         f"and block_k={block_k}")
    checks.check_int("dense_len", dense_len, 0)
    checks.check_bool("smooth", smooth)
    return B, T, H, Hkv, D, taus


# ---------------------------------------------------------------------------------------- pure pieces

def quantize_symmetric(x: Float[Array, "B T h D"], *, bits: int = 4,
                       group: int = 1) -> tuple[Float[Array, "B T h D"], Float[Array, "B T h"]]:
    """Symmetric ``bits``-bit quantisation with one scale per ``group`` consecutive tokens (per head).

    Args:
      x: ``[B, T, h, D]`` float.
      bits: bit width (``qmax = 2^(bits-1) - 1``; 4 -> values in ``[-7, 7]``).
      group: tokens sharing a scale (1 = per token); the last group may be short.

    Returns:
      ``(ints [B, T, h, D] float32 holding integers, scales [B, T, h] float32)`` with ``x ~ ints * scale``:
      ``ints = clip(round_half_even(x * qmax / a), -qmax, qmax)``, ``scale = a / qmax``, ``a`` the group's
      largest ``|x|`` (``a = 0`` gives zeros and scale 0).
    """
    B, T, h, D = x.shape
    qmax = 2 ** (bits - 1) - 1
    n = -(-T // group)
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n * group - T), (0, 0), (0, 0))).reshape(B, n, group, h, D)
    amax = jnp.max(jnp.abs(xp), axis=(2, 4), keepdims=True)                    # [B, n, 1, h, 1]
    safe = jnp.where(amax > 0, amax, 1.0)
    ints = jnp.clip(jnp.round(xp * (qmax / safe)), -qmax, qmax)
    scales = jnp.broadcast_to(jnp.where(amax > 0, amax / qmax, 0.0), xp.shape)[..., 0]
    return ints.reshape(B, n * group, h, D)[:, :T], scales.reshape(B, n * group, h)[:, :T]


def quantize_int4_per_token(x: Float[Array, "B T h D"]) -> tuple[Float[Array, "B T h D"], Float[Array, "B T h"]]:
    """SALE's INT4 per-token quantisation: ``quantize_symmetric(x, bits=4, group=1)``."""
    return quantize_symmetric(x, bits=4, group=1)


def _smooth(q, k, smooth: bool):
    """``(q' = q - q_bar, q_bar [B, H, D], k' = k - k_bar)`` in float32 (identity with ``smooth=False``)."""
    qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
    if not smooth:
        return qf, jnp.zeros((q.shape[0], q.shape[2], q.shape[3]), jnp.float32), kf
    q_bar = jnp.mean(qf, axis=1)
    return qf - q_bar[:, None], q_bar, kf - jnp.mean(kf, axis=1, keepdims=True)


def _grouped_logits(q_rows, keys):
    """``q_rows [B, n, H, D]`` . ``keys [B, S, Hkv, D]`` -> ``[B, H, n, S]`` (GQA)."""
    B, n, H, D = q_rows.shape
    Hkv = keys.shape[2]
    out = jnp.einsum("bnkgd,bskd->bkgns", q_rows.reshape(B, n, Hkv, H // Hkv, D), keys, precision=HIGHEST)
    return out.reshape(B, H, n, keys.shape[1])


def sale_estimate_logits(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], *, bits: int | None = 4,
                         quant_block: int = 1, smooth: bool = True) -> Float[Array, "B H T T"]:
    """The dense ``[B, H, T, T]`` low-bit logit estimate ``s~`` of step 2 (unscaled; tests and small shapes).

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      bits: quantisation bits, or None for the full-precision ``q . k'``.
      quant_block: tokens per quantisation scale.
      smooth: mean-smooth q and k first.

    Returns:
      float32 ``[B, H, T, T]`` estimates of ``q_t . k'_j`` (``k'`` the smoothed keys).
    """
    q_rows, q_bar, k_s = _smooth(q, k, smooth)
    if bits is None:
        return _grouped_logits(q.astype(jnp.float32), k_s)
    return _block_estimate(q_rows, q_bar, k_s, *_quantized_keys(k_s, q_bar, bits, quant_block),
                           bits=bits, quant_block=quant_block)


def _quantized_keys(k_s, q_bar, bits, quant_block):
    ik, sk = quantize_symmetric(k_s, bits=bits, group=quant_block)
    B, T, Hkv, D = k_s.shape
    H = q_bar.shape[1]
    qmk = jnp.einsum("bkgd,bskd->bkgs", q_bar.reshape(B, Hkv, H // Hkv, D), k_s,
                     precision=HIGHEST).reshape(B, H, T)                       # q_bar . k'_j
    return ik, sk, qmk


def _block_estimate(q_rows, q_bar, k_s, ik, sk, qmk, *, bits, quant_block):
    """Estimates for the query rows ``q_rows [B, n, H, D]`` (already smoothed) against all keys."""
    iq, sq = quantize_symmetric(q_rows, bits=bits, group=quant_block)
    int_dot = _grouped_logits(iq, ik)                                          # [B, H, n, T], exact integers
    B, n, H, _ = q_rows.shape
    Hkv = k_s.shape[2]
    sk_h = jnp.repeat(jnp.moveaxis(sk, 1, 2), H // Hkv, axis=1)                # [B, H, T]
    return int_dot * jnp.moveaxis(sq, 1, 2)[..., None] * sk_h[:, :, None, :] + qmk[:, :, None, :]


def _causal_tiles(T: int, block_q: int, block_k: int):
    nQ, nK = -(-T // block_q), -(-T // block_k)
    last_query = np.minimum((np.arange(nQ) + 1) * block_q, T) - 1
    return jnp.asarray(np.arange(nK)[None] * block_k <= last_query[:, None])  # [nQ, nK]


# ---------------------------------------------------------------------------------------- selector

def sale_select(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], *, tau: float | tuple = 0.004,
                block_q: int = 64, block_k: int = 32, local_window: int = 128, bits: int | None = 4,
                quant_block: int = 1, dense_len: int = 1024, smooth: bool = True) -> Bool[Array, "B H nQ nK"]:
    """SALE's tile choice (steps 1-5 of the module docstring, with the dense paths).

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]`` (GQA: H a multiple of Hkv).
      tau: relative-attention-score threshold in ``[0, 1]``, one float or a tuple of H per-head floats.
      block_q: queries per tile.
      block_k: keys per tile.
      local_window: recent keys always kept (besides the diagonal tiles).
      bits: estimate bit width (4 = INT4), or None for a full-precision estimate.
      quant_block: tokens per quantisation scale (1 = per token); divides ``block_q`` and ``block_k``.
      dense_len: ``T <= dense_len`` keeps every causal tile (official 1024).
      smooth: mean-smooth q and k before quantising (official).

    Returns:
      ``[B, H, nQ, nK]`` bool tile map (causal tiles only).

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: an argument is out of range or the shapes disagree (the message names it).
    """
    B, T, H, Hkv, D, taus = _check_args(q, k, tau, block_q, block_k, local_window, bits, quant_block, dense_len,
                                        smooth)
    nQ, nK = -(-T // block_q), -(-T // block_k)
    causal = _causal_tiles(T, block_q, block_k)
    if T <= dense_len:
        return jnp.broadcast_to(causal, (B, H, nQ, nK))
    scale = D ** -0.5
    q_rows_all, q_bar, k_s = _smooth(q, k, smooth)
    if bits is not None:
        ik, sk, qmk = _quantized_keys(k_s, q_bar, bits, quant_block)
    pad = ((0, 0), (0, nQ * block_q - T), (0, 0), (0, 0))
    q_pad = jnp.pad(q.astype(jnp.float32), pad)
    q_rows_pad = jnp.pad(q_rows_all, pad)
    key_tile = jnp.arange(T) // block_k
    with np.errstate(divide="ignore"):
        log_tau = jnp.asarray(np.log(taus), jnp.float32)                       # tau = 0 -> -inf: keep all

    # The exact pass reads only the sink tile and a static-width window of keys that holds the local tiles.
    local_width = (-(-(local_window + block_q) // block_k) + 1) * block_k
    k_window = jnp.pad(k_s, ((0, 0), (0, nK * block_k + local_width - T), (0, 0), (0, 0)))

    def exact_stats(q_block, rows, local_first):
        """Row max and sum of the exact scaled logits over the sink tile and the local tiles (causal)."""
        sink_pos = jnp.arange(block_k)
        local_pos = local_first * block_k + jnp.arange(local_width)
        keys = jnp.concatenate([k_window[:, :block_k],
                                jax.lax.dynamic_slice_in_dim(k_window, local_first * block_k, local_width, 1)], 1)
        positions = jnp.concatenate([sink_pos, local_pos])
        in_anchor = jnp.concatenate([sink_pos < T, local_pos >= block_k])      # the sink tile counted once
        visible = in_anchor[None, :] & (positions[None, :] <= rows[:, None]) & (positions < T)[None, :]
        s = scale * _grouped_logits(q_block, keys)                             # [B, H, bq, bk + local_width]
        m = jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1)
        l = jnp.sum(jnp.where(visible, jnp.exp(s - m[..., None]), 0.0), axis=-1)
        return m, l

    def one_block(i):
        rows = i * block_q + jnp.arange(block_q)
        q_block = jax.lax.dynamic_slice_in_dim(q_pad, i * block_q, block_q, axis=1)
        local_first = jnp.maximum(i * block_q - local_window, 0) // block_k   # first local key tile
        m, l = exact_stats(q_block, rows, local_first)                      # [B, H, bq]
        threshold = m + jnp.log(l) + log_tau[None, :, None]
        if bits is None:
            estimate = scale * _grouped_logits(q_block, k_s)
        else:
            q_rows = jax.lax.dynamic_slice_in_dim(q_rows_pad, i * block_q, block_q, axis=1)
            estimate = scale * _block_estimate(q_rows, q_bar, k_s, ik, sk, qmk, bits=bits, quant_block=quant_block)
        candidate = (key_tile > 0) & (key_tile < local_first)                  # left of the local tiles, no sink
        hit = (estimate > threshold[..., None]) & candidate[None, :] & (rows < T)[:, None]
        hit_keys = jnp.any(hit, axis=2)                                        # [B, H, T]
        hit_tiles = jnp.pad(hit_keys, ((0, 0), (0, 0), (0, nK * block_k - T))).reshape(B, H, nK, block_k).any(-1)
        tile = jnp.arange(nK)
        always = (tile == 0) | (tile >= local_first)
        return hit_tiles | always[None, None, :]

    tiles = jnp.moveaxis(jax.lax.map(one_block, jnp.arange(nQ)), 0, 2) & causal   # [B, H, nQ, nK]
    dense_heads = jnp.asarray(taus < DENSE_TAU)
    return jnp.where(dense_heads[None, :, None, None], causal, tiles)


def sale_block_mask(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], *, tau: float | tuple = 0.004,
                    block_q: int = 64, block_k: int = 32, local_window: int = 128, bits: int | None = 4,
                    quant_block: int = 1, dense_len: int = 1024, smooth: bool = True) -> BlockMask:
    """SALE's ``BlockMask`` ``[B, H, nQ, nK]`` (tiles fully visible; run it with ``causal=True``).

    Args: as ``sale_select``.

    Returns:
      A ``BlockMask``.

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: an argument is out of range or the shapes disagree (the message names it).
    """
    tiles = sale_select(q, k, tau=tau, block_q=block_q, block_k=block_k, local_window=local_window, bits=bits,
                        quant_block=quant_block, dense_len=dense_len, smooth=smooth)
    T = q.shape[1]
    return BlockMask.from_dense_block_map(tiles, block_q=block_q, block_k=block_k, seq_q=T, seq_k=T)


def sale_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"], *,
                   tau: float | tuple = 0.004, block_q: int = 64, block_k: int = 32, local_window: int = 128,
                   bits: int | None = 4, quant_block: int = 1, dense_len: int = 1024, smooth: bool = True,
                   scale: float | None = None, impl: str = "auto") -> Float[Array, "B T H D"]:
    """SALE causal prefill: ``sale_block_mask`` then ``jattn.block_sparse_attention(..., causal=True)``.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      v: ``[B, T, Hkv, D]``.
      tau, block_q, block_k, local_window, bits, quant_block, dense_len, smooth: as ``sale_select``.
      scale: attention logit scale (default ``D ** -0.5``); the selection always uses ``D ** -0.5``.
      impl: ``"auto" | "xla" | "pallas" | "reference"``.

    Returns:
      ``[B, T, H, D]`` in q's dtype.

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: an argument is out of range or the shapes disagree (the message names it).
    """
    checks.check_qkv(q, k, v)
    # The selection is discrete: no gradient flows through it (only through the attention).
    bm = sale_block_mask(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), tau=tau, block_q=block_q,
                         block_k=block_k, local_window=local_window, bits=bits, quant_block=quant_block,
                         dense_len=dense_len, smooth=smooth)
    return block_sparse_attention(q, k, v, bm, causal=True, scale=scale, impl=impl)
