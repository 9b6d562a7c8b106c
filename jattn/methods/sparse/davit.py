"""P52 — DaViT: Dual Attention Vision Transformers (Ding et al., ECCV 2022).

DaViT alternates two self-attentions over an image ``[B, Hgt, Wid, C]``:

* Spatial window attention: non-overlapping ``wh x ww`` windows (7 x 7; 12 for the large 384 model; no
  shift, no relative bias); token ``(y, x)`` attends exactly the tokens of its window
  ``(y // wh, x // ww)``, per head ``softmax(q k^T / sqrt(D)) v``. The official block zero-pads the
  normalised input to a multiple of the window before the qkv projection (padded tokens are real keys
  with ``k = bias``) and crops after the projection; ``SpatialWindowAttention`` does exactly that. The pure
  ``window_attention_2d`` on q, k, v instead pads and MASKS the missing keys, so on a non-divisible grid
  the edge windows are simply smaller.
* Channel group attention: tokens become the feature dimension. Channels split into G groups of
  ``C_g = C / G`` (G = number of heads); per group ``A = softmax(Q_g^T K_g * C_g^-0.5)`` (``C_g x C_g``,
  softmax over the last axis, a global reduction over all N tokens) and ``out_g = (A V_g^T)^T``, cost
  ``O(N C_g^2)`` per group: linear in N. The official code feeds (its k, v, q) into these (Q, K, V)
  slots (``softmax(k^T v * s) q^T``); ``ChannelGroupAttention`` does the same, so its outputs match the
  released checkpoints' computation.

Window attention runs on ``jattn.block_sparse_attention``: tokens are permuted window-major, each window
one contiguous block of ``block >= wh * ww`` rows (zero padded), and the block-diagonal pattern is
``BlockMask.from_topk_indices`` with one kv block per q block. Blocks: pre-norm (LayerNorm eps 1e-5),
ConvPosEnc (depthwise 3x3 residual) before attention and before the MLP (ratio 4, exact GELU); the dual
block is a spatial block then a channel block. Drop-path is not implemented (inference / eval form).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.core.reference import HIGHEST
from jattn.ops.block_sparse import block_sparse_attention
from jattn.ops.dispatch import resolve_impl
from pallas_kernels.common import MIN_DOT_DIM, next_power_of_two



# ---------------------------------------------------------------------------------------- validation

def _check_window(window) -> tuple[int, int]:
    """``window`` is an int ``w`` (square) or a pair ``(wh, ww)`` of positive ints."""
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise TypeError(f"window must be an int or a pair (wh, ww), got {window!r}")
        return checks.check_int("window[0]", window[0], 1), checks.check_int("window[1]", window[1], 1)
    w = checks.check_int("window", window, 1)
    return w, w


def _check_hw(hw) -> tuple[int, int]:
    return checks.check_int_tuple("hw", hw, 2, what="(Hgt, Wid)")


def _check_image_qkv(q, k, v) -> tuple[int, int, int, int, int, int]:
    """``q [B, Hgt, Wid, H, D]``, ``k, v [B, Hgt, Wid, Hkv, D]``; returns ``(B, Hgt, Wid, H, Hkv, D)``."""
    Hgt, Wid = checks.check_grid_qkv(q, k, v, spatial_dims=2)
    return q.shape[0], Hgt, Wid, q.shape[3], k.shape[3], q.shape[4]


# ---------------------------------------------------------------------------------------- windows

def window_grid(hw, window) -> tuple[int, int]:
    """Number of windows ``(ceil(Hgt / wh), ceil(Wid / ww))`` (the grid is padded up to whole windows)."""
    (Hgt, Wid), (wh, ww) = _check_hw(hw), _check_window(window)
    return -(-Hgt // wh), -(-Wid // ww)


def window_mask_fn(hw, window):
    """``mask_fn(b, h, q_idx, kv_idx)`` over row-major tokens: query and key lie in the same window."""
    (_, Wid), (wh, ww) = _check_hw(hw), _check_window(window)

    def mask_fn(b, h, q_idx, kv_idx):
        same_row = (q_idx // Wid) // wh == (kv_idx // Wid) // wh
        same_col = (q_idx % Wid) // ww == (kv_idx % Wid) // ww
        return same_row & same_col
    return mask_fn


def window_block(window, impl: str, block: int | None = None) -> int:
    """Rows per window block: ``wh * ww`` for xla/reference, the next power of two >= max(16, wh * ww) for
    pallas (hardware tile sizes); an explicit ``block`` must be >= wh * ww."""
    wh, ww = _check_window(window)
    if block is not None:
        block = checks.check_int("block", block, 1)
        if block < wh * ww:
            raise ValueError(f"block must hold a whole window of {wh * ww} tokens, got block={block}")
        return block
    return max(MIN_DOT_DIM, next_power_of_two(wh * ww)) if resolve_impl(impl) == "pallas" else wh * ww


def to_window_major(x, window, block: int):
    """``[B, Hgt, Wid, *rest] -> [B, nW * block, *rest]``: zero-pad the grid to whole windows, one window per
    contiguous block (row-major inside it), windows row-major, each zero padded to ``block`` rows."""
    (wh, ww), (B, Hgt, Wid), rest = _check_window(window), x.shape[:3], x.shape[3:]
    ny, nx = window_grid((Hgt, Wid), (wh, ww))
    x = jnp.pad(x, [(0, 0), (0, ny * wh - Hgt), (0, nx * ww - Wid)] + [(0, 0)] * len(rest))
    x = jnp.moveaxis(x.reshape(B, ny, wh, nx, ww, *rest), 3, 2).reshape(B, ny * nx, wh * ww, *rest)
    x = jnp.pad(x, [(0, 0), (0, 0), (0, block - wh * ww)] + [(0, 0)] * len(rest))
    return x.reshape(B, ny * nx * block, *rest)


def from_window_major(x, hw, window, block: int):
    """Inverse of ``to_window_major``: drops the row padding and the grid padding."""
    (Hgt, Wid), (wh, ww) = _check_hw(hw), _check_window(window)
    ny, nx = window_grid((Hgt, Wid), (wh, ww))
    B, rest = x.shape[0], x.shape[2:]
    x = x.reshape(B, ny, nx, block, *rest)[:, :, :, :wh * ww].reshape(B, ny, nx, wh, ww, *rest)
    return jnp.moveaxis(x, 2, 3).reshape(B, ny * wh, nx * ww, *rest)[:, :Hgt, :Wid]


def window_layout_mask_fn(hw, window, block: int):
    """In the window-major layout, hides keys that are row padding or outside the ``Hgt x Wid`` grid
    (None when there are none). Pure index arithmetic, so it runs inside the Pallas kernel."""
    (Hgt, Wid), (wh, ww) = _check_hw(hw), _check_window(window)
    ny, nx = window_grid((Hgt, Wid), (wh, ww))
    if block == wh * ww and Hgt == ny * wh and Wid == nx * ww:
        return None

    def mask_fn(b, h, q_idx, kv_idx):
        win, offset = kv_idx // block, kv_idx % block
        y = (win // nx) * wh + offset // ww
        x = (win % nx) * ww + offset % ww
        return (offset < wh * ww) & (y < Hgt) & (x < Wid)
    return mask_fn


def window_block_mask(hw, window, block: int) -> BlockMask:
    """Block-diagonal ``BlockMask`` of the window-major layout: q block ``p`` visits kv block ``p`` only."""
    ny, nx = window_grid(hw, window)
    return _diagonal_block_mask(ny * nx, checks.check_int("block", block, 1))


@functools.lru_cache(maxsize=32)
def _diagonal_block_mask(n: int, block: int) -> BlockMask:
    """Static pattern: tables computed eagerly (concrete even under ``jit``) and cached."""
    with jax.ensure_compile_time_eval():
        diagonal = jnp.arange(n, dtype=jnp.int32).reshape(1, 1, n, 1)
        return BlockMask.from_topk_indices(diagonal, block_q=block, block_k=block, seq_q=n * block,
                                           seq_k=n * block)


def window_attention_2d(q, k, v, window, *, scale: float | None = None, block: int | None = None,
                        impl: str = "auto"):
    """Non-overlapping window attention on ``jattn.block_sparse_attention``. ``q [B, Hgt, Wid, H, D]``,
    ``k, v [B, Hgt, Wid, Hkv, D]``; ``window`` an int or ``(wh, ww)``; scale default ``D ** -0.5``.
    Equals dense attention with ``window_mask_fn`` (keys outside the grid are masked, not zeros)."""
    B, Hgt, Wid, H, Hkv, D = _check_image_qkv(q, k, v)
    window = _check_window(window)
    checks.check_choice("impl", impl, checks.IMPLS)
    scale = None if scale is None else checks.check_positive_float("scale", scale)
    block = window_block(window, impl, block)
    out = block_sparse_attention(
        to_window_major(q, window, block), to_window_major(k, window, block), to_window_major(v, window, block),
        window_block_mask((Hgt, Wid), window, block), mask_fn=window_layout_mask_fn((Hgt, Wid), window, block),
        scale=scale, impl=impl)
    return from_window_major(out, (Hgt, Wid), window, block)


def window_attention_2d_direct(q, k, v, window, *, scale: float | None = None):
    """The same window attention by reshaping into windows (the official ``window_partition`` form)."""
    B, Hgt, Wid, H, Hkv, D = _check_image_qkv(q, k, v)
    wh, ww = _check_window(window)
    scale = D ** -0.5 if scale is None else checks.check_positive_float("scale", scale)
    n = wh * ww
    q_w, k_w, v_w = (to_window_major(x.astype(jnp.float32), (wh, ww), n) for x in (q, k, v))
    nW = q_w.shape[1] // n
    q_w = q_w.reshape(B, nW, n, Hkv, H // Hkv, D)
    k_w, v_w = k_w.reshape(B, nW, n, Hkv, D), v_w.reshape(B, nW, n, Hkv, D)
    s = jnp.einsum("bwikgd,bwjkd->bwkgij", q_w, k_w, precision=HIGHEST) * scale
    ny, nx = window_grid((Hgt, Wid), (wh, ww))
    y = (np.arange(nW)[:, None] // nx) * wh + np.arange(n)[None] // ww
    x = (np.arange(nW)[:, None] % nx) * ww + np.arange(n)[None] % ww
    inside = jnp.asarray((y < Hgt) & (x < Wid))                       # [nW, n] keys inside the grid
    s = jnp.where(inside[None, :, None, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bwkgij,bwjkd->bwikgd", p, v_w, precision=HIGHEST).reshape(B, nW * n, H, D)
    return from_window_major(out, (Hgt, Wid), (wh, ww), n).astype(q.dtype)


# ---------------------------------------------------------------------------------------- channel attention

def channel_group_attention(q, k, v, groups: int, *, scale: float | None = None, return_attention: bool = False):
    """Channel group attention. ``q [B, N, C]``, ``k, v [B, N, C_kv]``; ``groups`` query groups of
    ``C_g = C / groups`` channels; k/v hold ``C_kv / C_g`` groups, shared GQA-style (query group g reads kv
    group ``g // (groups / kv_groups)``). Per group ``A = softmax(Q_g^T K_g * scale)`` ``[C_g, C_g]``
    (scale default ``C_g ** -0.5``) and ``out_g = V_g A^T``. Returns ``out [B, N, C]`` (q's dtype) and, when
    asked, ``A [B, groups, C_g, C_g]`` (float32)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        checks.check_float_array(name, x, 3)
    B, N, C = q.shape
    groups = checks.check_int("groups", groups, 1)
    if C % groups:
        raise ValueError(f"q's channels C={C} must be a multiple of groups={groups}, got q {checks.describe(q)}")
    cg = C // groups
    if k.shape != v.shape or k.shape[:2] != (B, N) or k.shape[2] % cg:
        raise ValueError(f"k and v must both be [B={B}, N={N}, C_kv] with C_kv a multiple of C_g={cg}, got "
                         f"k {checks.describe(k)} and v {checks.describe(v)}")
    kv_groups = k.shape[2] // cg
    if groups % kv_groups:
        raise ValueError(f"groups={groups} must be a multiple of the k/v groups C_kv / C_g = {kv_groups}")
    scale = cg ** -0.5 if scale is None else checks.check_positive_float("scale", scale)
    rep = groups // kv_groups
    q_g = q.astype(jnp.float32).reshape(B, N, kv_groups, rep, cg)
    k_g, v_g = k.astype(jnp.float32).reshape(B, N, kv_groups, cg), v.astype(jnp.float32).reshape(B, N, kv_groups, cg)
    logits = jnp.einsum("bnkrc,bnkd->bkrcd", q_g, k_g, precision=HIGHEST) * scale   # [B, Gkv, rep, C_g, C_g]
    attention = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkrcd,bnkd->bnkrc", attention, v_g, precision=HIGHEST).reshape(B, N, C).astype(q.dtype)
    return (out, attention.reshape(B, groups, cg, cg)) if return_attention else out


# ---------------------------------------------------------------------------------------- modules

def _depthwise_conv3x3(x, kernel, bias):
    """Depthwise 3x3 'same' convolution of ``x [B, Hgt, Wid, C]`` (zero padding)."""
    out = jax.lax.conv_general_dilated(x, kernel[:, :, None, :].astype(x.dtype), (1, 1), [(1, 1), (1, 1)],
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=x.shape[-1], precision=HIGHEST)
    return out + bias


def _check_image(x, dim: int):
    checks.check_float_array("x", x, 4)
    if x.shape[3] != dim:
        raise ValueError(f"x must be an image [B, Hgt, Wid, dim={dim}], got {checks.describe(x)}")


def _check_dim_heads(dim, num_heads) -> tuple[int, int]:
    dim, num_heads = checks.check_int("dim", dim, 1), checks.check_int("num_heads", num_heads, 1)
    if dim % num_heads:
        raise ValueError(f"dim={dim} must be a multiple of num_heads={num_heads}")
    return dim, num_heads


class SpatialWindowAttention(nnx.Module):
    """The official ``WindowAttention`` applied over a whole image ``x [B, Hgt, Wid, dim]``: zero-pad to whole
    windows, ``qkv``, per-window MHSA (block-sparse), ``proj``, crop."""

    def __init__(self, dim: int, num_heads: int, window=7, *, qkv_bias: bool = True, impl: str = "auto",
                 rngs: nnx.Rngs):
        self.dim, self.num_heads = _check_dim_heads(dim, num_heads)
        self.window = _check_window(window)
        checks.check_choice("impl", impl, checks.IMPLS)
        self.impl = impl
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        _check_image(x, self.dim)
        B, Hgt, Wid, C = x.shape
        (wh, ww), (ny, nx) = self.window, window_grid((Hgt, Wid), self.window)
        x = jnp.pad(x, [(0, 0), (0, ny * wh - Hgt), (0, nx * ww - Wid), (0, 0)])
        heads = (B, ny * wh, nx * ww, self.num_heads, C // self.num_heads)
        q, k, v = (t.reshape(heads) for t in jnp.split(self.qkv(x), 3, axis=-1))
        out = window_attention_2d(q, k, v, self.window, impl=self.impl).reshape(B, ny * wh, nx * ww, C)
        return self.proj(out)[:, :Hgt, :Wid]


class ChannelGroupAttention(nnx.Module):
    """The official ``ChannelAttention`` over ``x [B, Hgt, Wid, dim]``: ``q, k, v = qkv(x)`` split into
    ``num_heads`` groups, ``softmax(k^T v * C_g^-0.5) q^T`` per group, ``proj``."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, rngs: nnx.Rngs):
        self.dim, self.num_heads = _check_dim_heads(dim, num_heads)
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        _check_image(x, self.dim)
        B, Hgt, Wid, C = x.shape
        q, k, v = jnp.split(self.qkv(x.reshape(B, Hgt * Wid, C)), 3, axis=-1)
        out = channel_group_attention(k, v, q, self.num_heads)   # the official role assignment
        return self.proj(out).reshape(B, Hgt, Wid, C)


class _DaViTBlock(nnx.Module):
    """Shared skeleton: ConvPosEnc, pre-norm attention residual, ConvPosEnc, pre-norm MLP residual."""

    def __init__(self, dim: int, attn, mlp_ratio: float, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.cpe_kernels = nnx.Param(init(rngs.params(), (2, 3, 3, dim), jnp.float32))
        self.cpe_biases = nnx.Param(jnp.zeros((2, dim), jnp.float32))
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
        self.attn = attn
        hidden = int(dim * mlp_ratio)
        self.fc1, self.fc2 = nnx.Linear(dim, hidden, rngs=rngs), nnx.Linear(hidden, dim, rngs=rngs)

    def _cpe(self, i: int, x):
        return x + _depthwise_conv3x3(x, self.cpe_kernels[i], self.cpe_biases[i])

    def __call__(self, x):
        _check_image(x, self.attn.dim)
        x = self._cpe(0, x)
        x = x + self.attn(self.norm1(x))
        x = self._cpe(1, x)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))


class DaViTSpatialBlock(_DaViTBlock):
    """``SpatialBlock``: ConvPosEnc -> x + WindowAttn(LN x) -> ConvPosEnc -> x + MLP(LN x)."""

    def __init__(self, dim: int, num_heads: int, window=7, *, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 impl: str = "auto", rngs: nnx.Rngs):
        super().__init__(dim, SpatialWindowAttention(dim, num_heads, window, qkv_bias=qkv_bias, impl=impl,
                                                     rngs=rngs), mlp_ratio, rngs)


class DaViTChannelBlock(_DaViTBlock):
    """``ChannelBlock``: ConvPosEnc -> x + ChannelAttn(LN x) -> ConvPosEnc -> x + MLP(LN x)."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 rngs: nnx.Rngs):
        super().__init__(dim, ChannelGroupAttention(dim, num_heads, qkv_bias=qkv_bias, rngs=rngs), mlp_ratio, rngs)


class DualAttentionBlock(nnx.Module):
    """DaViT's dual block: a spatial-window block, then a channel-group block, on ``x [B, Hgt, Wid, dim]``."""

    def __init__(self, dim: int, num_heads: int, window=7, *, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 impl: str = "auto", rngs: nnx.Rngs):
        self.spatial = DaViTSpatialBlock(dim, num_heads, window, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                         impl=impl, rngs=rngs)
        self.channel = DaViTChannelBlock(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, rngs=rngs)

    def __call__(self, x):
        return self.channel(self.spatial(x))


class DaViT(nnx.Module):
    """DaViT classifier ``images [B, Hgt, Wid, in_chans] -> logits [B, num_classes]``.

    Stem: 7x7 stride-4 conv (padding 3) + LN; later stages: LN + 2x2 stride-2 conv (the official
    non-overlapped patch merging; inputs are zero padded on the bottom/right to a multiple of the stride);
    ``depths[i]`` dual blocks per stage; global average pool, LN, linear head. DaViT-T: dims (96, 192, 384,
    768), heads (3, 6, 12, 24), depths (1, 1, 3, 1), window 7.
    """

    def __init__(self, *, num_classes: int = 1000, in_chans: int = 3, dims=(96, 192, 384, 768),
                 heads=(3, 6, 12, 24), depths=(1, 1, 3, 1), window=7, mlp_ratio: float = 4.0,
                 impl: str = "auto", rngs: nnx.Rngs):
        if not (len(dims) == len(heads) == len(depths) >= 1):
            raise ValueError(f"dims, heads and depths must have the same length >= 1, got {dims}, {heads}, {depths}")
        self.dims = tuple(checks.check_int("dims[i]", d, 1) for d in dims)
        self.stem = nnx.Conv(in_chans, dims[0], (7, 7), strides=(4, 4), padding=[(3, 3), (3, 3)], rngs=rngs)
        self.stem_norm = nnx.LayerNorm(dims[0], epsilon=1e-5, rngs=rngs)
        self.merge_norms = nnx.List([nnx.LayerNorm(dims[i], epsilon=1e-5, rngs=rngs)
                                     for i in range(len(dims) - 1)])
        self.merges = nnx.List([nnx.Conv(dims[i], dims[i + 1], (2, 2), strides=(2, 2), padding="VALID", rngs=rngs)
                                for i in range(len(dims) - 1)])
        self.stages = nnx.List([nnx.List([DualAttentionBlock(dims[i], heads[i], window, mlp_ratio=mlp_ratio,
                                                             impl=impl, rngs=rngs) for _ in range(depths[i])])
                                for i in range(len(dims))])
        self.norm = nnx.LayerNorm(dims[-1], epsilon=1e-5, rngs=rngs)
        self.head = nnx.Linear(dims[-1], num_classes, rngs=rngs)

    @staticmethod
    def _pad_to(x, stride: int):
        return jnp.pad(x, [(0, 0), (0, (-x.shape[1]) % stride), (0, (-x.shape[2]) % stride), (0, 0)])

    def __call__(self, images):
        checks.check_float_array("images", images, 4)
        x = self.stem_norm(self.stem(self._pad_to(images, 4)))
        for i, blocks in enumerate(self.stages):
            if i > 0:
                x = self.merges[i - 1](self._pad_to(self.merge_norms[i - 1](x), 2))
            for block in blocks:
                x = block(x)
        return self.head(self.norm(x.mean(axis=(1, 2))))
