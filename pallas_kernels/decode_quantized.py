"""Split-K decode attention over a quantised KV cache, dequantising each tile in the kernel (P24 ZipCache's
and KIVI's int8 / int4 / int2 caches: ``jattn.methods.kv.quantized.QuantizedKVCache``).

Kernels only, no policy: ``jattn.methods.kv.quantized.quantized_decode_attention`` validates, packs the query
rows, merges the per-split partials with the cache's full-precision residual and the sinks.

What the kernel reads is what the cache stores: packed uint8 codes (``8 / bits`` codes per byte along the
channels; code ``j`` in byte ``j // (8 / bits)`` at bit offset ``(j % (8 / bits)) * bits``), one key
``(scale, min)`` row of ``D`` channels per group of ``group_size`` tokens, and one value ``(scale, min)`` per
token. A float copy of the cache is never formed: each tile is unpacked, dequantised and attended in
registers / VMEM, so the kernel moves ``bits / 32`` of the bytes a float32 cache would.

Tile = one key group (``group_size`` tokens, a power of two >= 16), so a tile has one key-scale row.
Unpacking without lane shuffles: field ``i`` of every byte (``(codes >> i * bits) & (2^bits - 1)``) holds
the channels ``i, i + 8 / bits, ...``; the dot of that field with a 0/1 selection matrix (``[D / (8 / bits),
D]``, ones at ``(m, m * (8 / bits) + i)``) puts each code in its channel. The codes are integers below
2^8 and the matrix is 0/1, so that dot is exact at every dot precision (TF32 and bfloat16 included).
Then ``k = codes * scale + min`` and the tile is ``pallas_kernels.decode``'s: the same visibility rule, the
same online softmax, GQA-packed rows (P22), split-K partials (P65).

The tiles a split visits are the sequence's complete key groups: ``[first, quantized_length / group_size)``,
``quantized_length = length - length % group_size``; the partial group's keys are the cache's
full-precision residual, attended outside the kernel (``group_size`` keys at most) and merged by lse.

Two structures, as ``pallas_kernels.decode``: ``"triton"`` (GPU, the CPU interpreter) loops over its split's
tiles inside a program; ``"mosaic"`` (TPU) puts the tiles on the grid with the lengths scalar-prefetched
into SMEM, steps outside the needed range repeating the nearest needed tile (no new DMA) and skipping
compute. Forward only: the cache's codes have no gradient, and the query's gradient comes from the xla path
(the caller's ``custom_vjp``).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.decode import DecodeConfig, _out_shapes, _split_range, attend_grid_step, attend_split

QUANT_BITS = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class QuantizedDecodeConfig:
    tile: DecodeConfig      # the float kernel's config; its page is one key group
    bits: int
    head_dim: int           # D (the codes hold D * bits / 8 bytes per token)


def unpack_tile(codes, *, bits: int, head_dim: int):
    """float32 ``[T, D]`` codes of a ``[T, D * bits / 8]`` uint8 tile (see the module docstring)."""
    wide = codes.astype(jnp.int32)
    if bits == 8:
        return wide.astype(jnp.float32)
    per_byte = 8 // bits
    packed = codes.shape[-1]
    column = lax.broadcasted_iota(jnp.int32, (packed, head_dim), 0)
    channel = lax.broadcasted_iota(jnp.int32, (packed, head_dim), 1)
    out = None
    for i in range(per_byte):
        field = jnp.bitwise_and(lax.shift_right_logical(wide, jnp.int32(i * bits)), jnp.int32(2 ** bits - 1))
        select = (channel == column * per_byte + i).astype(jnp.float32)
        placed = common.dot_nn(field.astype(jnp.float32), select)
        out = placed if out is None else out + placed
    return out


def _dequantized_tile(cfg: QuantizedDecodeConfig, k_codes, k_scale, k_min, v_codes, v_scale, v_min):
    """``(k [T, D], v [T, D])`` float32 of one key group: per-channel key rows, per-token value columns."""
    k = unpack_tile(k_codes, bits=cfg.bits, head_dim=cfg.head_dim) * k_scale.astype(jnp.float32) + \
        k_min.astype(jnp.float32)
    v = unpack_tile(v_codes, bits=cfg.bits, head_dim=cfg.head_dim) * v_scale.astype(jnp.float32) + \
        v_min.astype(jnp.float32)
    return k, v


def _group_range(cfg: DecodeConfig, split, length, quantized_length):
    """The complete key groups of split ``split``: ``[lo, hi)``, empty when it has none."""
    return _split_range(cfg, split, length, end=lax.div(quantized_length, cfg.page_size))


# ------------------------------------------------------------------- GPU structure: loop inside a program

def _gpu_kernel(length_ref, quantized_ref, q_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, *rest,
                cfg: QuantizedDecodeConfig):
    out_ref, lse_ref = rest[-2:]
    length, q = length_ref[0], q_ref[...]
    lo, hi = _group_range(cfg.tile, pl.program_id(2), length, quantized_ref[0])

    def load_tile(t):
        k, v = _dequantized_tile(cfg, kc_ref[t], ks_ref[t], km_ref[t], vc_ref[t], vs_ref[t], vm_ref[t])
        return k.astype(q.dtype), v.astype(q.dtype)

    out_ref[...], lse_ref[...] = attend_split(cfg.tile, q, lo, hi, length, load_tile, out_ref.shape[-1])


def _gpu_call(cfg: QuantizedDecodeConfig, lengths, quantized, q, k_codes, k_scale, k_min, v_codes, v_scale, v_min):
    B, Hkv, R, D = q.shape
    tiles = k_codes.shape[2]

    def per_head(x):
        return pl.BlockSpec((None, None, tiles, *x.shape[3:]), lambda b, g, s: (b, g, 0, 0, 0))

    row_block = pl.BlockSpec((None, None, None, R, D), lambda b, g, s: (b, g, s, 0, 0))
    caches = (k_codes, k_scale, k_min, v_codes, v_scale, v_min)
    return common.pallas_call(
        functools.partial(_gpu_kernel, cfg=cfg), out_shape=_out_shapes(cfg.tile, B, Hkv, R, D),
        target=cfg.tile.target, interpret=cfg.tile.interpret, name="jattn_decode_quantized",
        grid=(B, Hkv, cfg.tile.num_splits),
        in_specs=[pl.BlockSpec((None, 1), lambda b, g, s: (b, 0)), pl.BlockSpec((None, 1), lambda b, g, s: (b, 0)),
                  pl.BlockSpec((None, None, R, D), lambda b, g, s: (b, g, 0, 0)), *map(per_head, caches)],
        out_specs=[row_block, pl.BlockSpec((None, None, None, R, 1), lambda b, g, s: (b, g, s, 0, 0))],
        poison_outputs=cfg.tile.poison_outputs)(lengths[:, None], quantized[:, None], q, *caches)


# ------------------------------------------------------------- TPU structure: needed tiles on the grid

def _tpu_tile(cfg: DecodeConfig, lengths_ref, quantized_ref, b, split, t):
    """Tile of step ``t`` of a split, clamped into the needed range (no re-fetch outside it)."""
    lo, hi = _group_range(cfg, split, lengths_ref[b], quantized_ref[b])
    end = lax.div(quantized_ref[b], cfg.page_size)
    return jnp.where(hi > lo, jnp.clip(split * cfg.tiles_per_split + t, lo, hi - 1), jnp.maximum(end - 1, 0))


def _tpu_kernel(lengths_ref, quantized_ref, q_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, *rest,
                cfg: QuantizedDecodeConfig):
    b = pl.program_id(0)
    length, dtype = lengths_ref[b], q_ref.dtype
    lo, hi = _group_range(cfg.tile, pl.program_id(2), length, quantized_ref[b])

    def load_tile():
        k, v = _dequantized_tile(cfg, kc_ref[...], ks_ref[...], km_ref[...], vc_ref[...], vs_ref[...], vm_ref[...])
        return k.astype(dtype), v.astype(dtype)

    attend_grid_step(cfg.tile, lo, hi, length, q_ref, load_tile, *rest[-5:])


def _tpu_call(cfg: QuantizedDecodeConfig, lengths, quantized, q, k_codes, k_scale, k_min, v_codes, v_scale, v_min):
    B, Hkv, R, D = q.shape

    def tile_spec(x):
        return pl.BlockSpec((None, None, None, *x.shape[3:]), lambda b, g, s, t, lens, quant: (
            b, g, _tpu_tile(cfg.tile, lens, quant, b, s, t), 0, 0))

    def row_spec(dim):
        return pl.BlockSpec((None, None, None, R, dim), lambda b, g, s, t, lens, quant: (b, g, s, 0, 0))

    caches = (k_codes, k_scale, k_min, v_codes, v_scale, v_min)
    return common.pallas_call(
        functools.partial(_tpu_kernel, cfg=cfg), out_shape=_out_shapes(cfg.tile, B, Hkv, R, D),
        target=cfg.tile.target, interpret=cfg.tile.interpret, name="jattn_decode_quantized",
        grid=(B, Hkv, cfg.tile.num_splits, cfg.tile.tiles_per_split),
        in_specs=[pl.BlockSpec((None, None, R, D), lambda b, g, s, t, lens, quant: (b, g, 0, 0)),
                  *map(tile_spec, caches)],
        out_specs=[row_spec(D), row_spec(1)], poison_outputs=cfg.tile.poison_outputs, num_scalar_prefetch=2,
        scratch_shapes=[common.vmem_scratch((R, 1), jnp.float32), common.vmem_scratch((R, 1), jnp.float32),
                        common.vmem_scratch((R, D), jnp.float32)],
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))(lengths, quantized, q, *caches)


def _build(target: str, interpret: bool, *, cfg: QuantizedDecodeConfig):
    cfg = dataclasses.replace(cfg, tile=dataclasses.replace(cfg.tile, target=target, interpret=interpret))
    return functools.partial(_tpu_call if target == "mosaic" else _gpu_call, cfg)


def quantized_decode_partials(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, lengths, *, bits: int,
                              new_tokens: int, group: int, num_splits: int, tiles_per_split: int, scale: float,
                              softcap: float | None = None, window: int | None = None, interpret=None,
                              poison_outputs: bool = False, quantized_lengths=None):
    """Per-split partial attention of packed decode rows over the complete key groups of a quantised cache.

    Args:
      q: ``[B, Hkv, R, D]`` packed query rows (``R >= group * new_tokens``, a power of two >= 16).
      k_codes: ``[B, Hkv, tiles, group_size, D * bits / 8]`` uint8 packed key codes (one tile per key group).
      k_scale: ``[B, Hkv, tiles, 1, D]`` each group's per-channel key scale.
      k_min: ``[B, Hkv, tiles, 1, D]`` its per-channel minimum.
      v_codes: ``[B, Hkv, tiles, group_size, D * bits / 8]`` uint8 packed value codes.
      v_scale: ``[B, Hkv, tiles, group_size, 1]`` each token's value scale.
      v_min: ``[B, Hkv, tiles, group_size, 1]`` its minimum.
      lengths: ``[B]`` int32 keys per sequence, the new tokens included (the query positions).
      bits: 8, 4 or 2.
      new_tokens: ``Tq``, the new tokens per sequence (the last ``Tq`` positions).
      group: query heads per kv head.
      num_splits: tile ranges per sequence on the grid (split-K); ``num_splits * tiles_per_split >= tiles``.
      tiles_per_split: tiles in each range.
      scale: logit scale.
      softcap: ``softcap * tanh(s / softcap)`` on the logits, or None.
      window: keys back from each query's position that it sees, or None.
      interpret: None (decided at lowering), True/"triton" or "mosaic" (forced, interpreted).
      poison_outputs: NaN-fill every output buffer first (tests: unwritten tiles show).
      quantized_lengths: ``[B]`` keys held as codes, a multiple of ``group_size``: the kernel visits the tiles
        below it and masks keys at or past ``lengths``. Default ``lengths - lengths % group_size`` (a
        ``QuantizedKVCache``'s complete groups; its partial group is a residual). ZipCache passes ``lengths``
        rounded up, its classes' codes padded to whole tiles.

    Returns:
      ``(out [B, Hkv, num_splits, R, D], lse [B, Hkv, num_splits, R, 1])`` float32 partials over the keys
      ``< min(lengths, quantized_lengths)``; a split that saw nothing has ``out = 0, lse = -inf``.
    """
    group_size = k_codes.shape[3]
    tile_cfg = DecodeConfig(new_tokens=int(new_tokens), group=int(group), rows=int(q.shape[2]),
                            page_size=int(group_size), num_splits=int(num_splits),
                            tiles_per_split=int(tiles_per_split), scale=float(scale),
                            softcap=None if softcap is None else float(softcap),
                            window=None if window is None else int(window), per_sequence=True, target="",
                            interpret=False, poison_outputs=bool(poison_outputs))
    cfg = QuantizedDecodeConfig(tile=tile_cfg, bits=int(bits), head_dim=int(q.shape[-1]))
    lengths = lengths.astype(jnp.int32)
    quantized = lengths - lengths % group_size if quantized_lengths is None else quantized_lengths.astype(jnp.int32)
    return common.dispatch(functools.partial(_build, cfg=cfg), lengths, quantized, q, k_codes, k_scale, k_min,
                           v_codes, v_scale, v_min, interpret=interpret)
