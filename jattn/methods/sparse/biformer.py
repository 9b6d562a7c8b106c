"""P61 — BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023).

Bi-level routing attention (BRA) on an image ``[B, Hgt, Wid, ...]`` cut into ``S x S`` regions
(``S = n_win``; each region is ``(Hgt/S) x (Wid/S)`` tokens, region id ``r = (y // rh) * S + x // rw``):

1. Region routing (coarse). ``q_r``, ``k_r`` = mean of q and k over each region's tokens, taken over all
   channels (all heads together), on *detached* q and k (no gradient flows through routing). The region
   affinity is ``A_r = q_r k_r^T`` ``[B, S^2, S^2]`` and each query region keeps the ``topk`` regions of
   largest affinity: ``idx = topk(A_r) [B, S^2, topk]`` (shared by every head; a positive logit scale does
   not change it, so it is left out).
2. Token attention (fine). Query token ``i`` attends exactly the tokens ``j`` with
   ``region(j) in idx[b, region(i)]``; per head ``softmax(q k^T * scale) v`` with
   ``scale = qk_dim ** -0.5``, ``qk_dim = H * D`` the FULL query width (the official code's choice, kept
   for checkpoint compatibility; not ``D ** -0.5``).
3. LCE / LePE: ``out += DWConv_{5x5}(v)`` (depthwise, zero 'same' padding, on v re-assembled to the image),
   then the output projection. Released models use ``qk_dim = dim`` and ``kv_downsample_mode='identity'``;
   those are the only settings supported here.

Two exact forms of step 2: ``bra_attention`` gathers the routed regions' tokens (the official formulation)
and ``bra_attention_block_sparse`` permutes tokens region-major so each region is one contiguous block of
``block >= rh * rw`` rows (zero padded; the padding is masked out by ``region_padding_mask_fn``), builds
``BlockMask.from_topk_indices(idx)`` and runs ``jattn.block_sparse_attention``: the routed-region pattern
*is* a top-k block mask. GQA generalises routing as ``A_r = sum_h q_r[h] . k_r[h // (H / Hkv)]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.core.masks import materialize
from jattn.core.reference import HIGHEST
from jattn.ops.block_sparse import block_sparse_attention
from jattn.ops.dispatch import resolve_impl
from pallas_kernels.common import MIN_DOT_DIM, next_power_of_two

FORMS = ("block_sparse", "gather")


# ---------------------------------------------------------------------------------------- validation

def _check_image_qkv(q, k, v) -> tuple[int, int, int, int, int, int]:
    """``q [B, Hgt, Wid, H, D]``, ``k, v [B, Hgt, Wid, Hkv, D]``; returns ``(B, Hgt, Wid, H, Hkv, D)``."""
    Hgt, Wid = checks.check_grid_qkv(q, k, v, spatial_dims=2)
    return q.shape[0], Hgt, Wid, q.shape[3], k.shape[3], q.shape[4]


def region_shape(hw: tuple[int, int], n_win: int) -> tuple[int, int]:
    """Tokens per region ``(rh, rw) = (Hgt / S, Wid / S)``; the grid must divide into ``S x S`` regions."""
    n_win = checks.check_int("n_win", n_win, 1)
    Hgt, Wid = hw
    if Hgt % n_win or Wid % n_win:
        raise ValueError(f"the image grid (Hgt, Wid) = ({Hgt}, {Wid}) must be divisible by n_win={n_win} "
                         f"(pad it first, as BiLevelRoutingAttention(auto_pad=True) does)")
    return Hgt // n_win, Wid // n_win


def _check_idx(idx, n_win: int, B: int | None = None):
    """Routing table ``idx [B, S^2, topk]`` (integer, 1 <= topk <= S^2); B is checked when given."""
    if not (hasattr(idx, "shape") and hasattr(idx, "dtype")) or not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"idx must be an integer array [B, n_win^2, topk], got {checks.describe(idx)}")
    R = checks.check_int("n_win", n_win, 1) ** 2
    batch_ok = idx.ndim == 3 and idx.shape[0] >= 1 and (B is None or idx.shape[0] == B)
    if not batch_ok or idx.shape[1] != R or not 1 <= idx.shape[2] <= R:
        raise ValueError(f"idx must have shape [B{'' if B is None else '=' + str(B)}, n_win^2={R}, topk] with "
                         f"1 <= topk <= {R}, got {checks.describe(idx)}")
    return idx.astype(jnp.int32)


def _default_scale(scale, H: int, D: int) -> float:
    return (H * D) ** -0.5 if scale is None else checks.check_positive_float("scale", scale)


# ---------------------------------------------------------------------------------------- regions

def to_regions(x, n_win: int):
    """``[B, Hgt, Wid, *rest] -> [B, S^2, rh * rw, *rest]``: region-major, row-major inside a region."""
    B, Hgt, Wid = x.shape[:3]
    rh, rw = region_shape((Hgt, Wid), n_win)
    rest = x.shape[3:]
    x = x.reshape(B, n_win, rh, n_win, rw, *rest)
    x = jnp.moveaxis(x, 3, 2)  # [B, S, S, rh, rw, ...]
    return x.reshape(B, n_win * n_win, rh * rw, *rest)


def from_regions(x, n_win: int, hw: tuple[int, int]):
    """Inverse of ``to_regions``: ``[B, S^2, rh * rw, *rest] -> [B, Hgt, Wid, *rest]``."""
    rh, rw = region_shape(hw, n_win)
    B, rest = x.shape[0], x.shape[3:]
    x = x.reshape(B, n_win, n_win, rh, rw, *rest)
    x = jnp.moveaxis(x, 2, 3)  # [B, S, rh, S, rw, ...]
    return x.reshape(B, hw[0], hw[1], *rest)


def token_regions(hw: tuple[int, int], n_win: int) -> np.ndarray:
    """``[Hgt * Wid]`` region id of each row-major token: ``(y // rh) * S + x // rw``."""
    rh, rw = region_shape(hw, n_win)
    y, x = np.divmod(np.arange(hw[0] * hw[1]), hw[1])
    return (y // rh) * n_win + x // rw


# ---------------------------------------------------------------------------------------- routing

def bra_region_scores(q, k, n_win: int):
    """Region affinity ``A_r = q_r k_r^T`` ``[B, S^2, S^2]`` (float32) of region-mean q and k.

    Computed on ``stop_gradient(q), stop_gradient(k)``: routing is not differentiable (the official
    ``diff_routing=False``). GQA: query head h is paired with kv head ``h // (H / Hkv)``.
    """
    checks.check_float_array("q", q, 5)
    checks.check_float_array("k", k, 5)
    if k.shape[:3] != q.shape[:3] or q.shape[4] != k.shape[4] or k.shape[3] == 0 or q.shape[3] % k.shape[3]:
        raise ValueError(f"k must be [B, Hgt, Wid, Hkv, D] matching q {checks.describe(q)} (H a multiple of Hkv), "
                         f"got {checks.describe(k)}")
    q_r = to_regions(jax.lax.stop_gradient(q).astype(jnp.float32), n_win).mean(axis=2)  # [B, R, H, D]
    k_r = to_regions(jax.lax.stop_gradient(k).astype(jnp.float32), n_win).mean(axis=2)  # [B, R, Hkv, D]
    k_r = jnp.repeat(k_r, q.shape[3] // k.shape[3], axis=2)
    return jnp.einsum("bphd,brhd->bpr", q_r, k_r, precision=HIGHEST)


def bra_route(q, k, n_win: int, topk: int):
    """``idx [B, S^2, topk]`` int32: per query region, the ``topk`` regions of largest affinity (descending;
    ties go to the lower region id)."""
    R = checks.check_int("n_win", n_win, 1) ** 2
    topk = checks.check_int("topk", topk, 1)
    if topk > R:
        raise ValueError(f"topk must be <= n_win^2 = {R} regions, got topk={topk}")
    _, idx = jax.lax.top_k(bra_region_scores(q, k, n_win), topk)
    return idx.astype(jnp.int32)


def bra_mask_fn(idx, hw: tuple[int, int], n_win: int):
    """``mask_fn(b, h, q_idx, kv_idx)`` over row-major tokens: ``region(kv) in idx[b, region(q)]``.

    It indexes the captured ``idx``, so it serves ``materialize`` and the xla/reference impls, not the
    Pallas kernel (which runs the region-major block-sparse form instead).
    """
    idx = _check_idx(idx, n_win)
    R = n_win * n_win
    routed = jnp.any(idx[:, :, :, None] == jnp.arange(R), axis=2)  # [B, R(query), R(key)]
    regions = jnp.asarray(token_regions(hw, n_win))

    def mask_fn(b, h, q_idx, kv_idx):
        return routed[b, regions[q_idx], regions[kv_idx]]
    return mask_fn


def bra_dense_mask(idx, hw: tuple[int, int], n_win: int):
    """The dense ``[B, 1, N, N]`` bool mask of ``bra_mask_fn`` (shared over heads; tests, small shapes)."""
    N = hw[0] * hw[1]
    return materialize(bra_mask_fn(idx, hw, n_win), idx.shape[0], 1, N, N)


# ---------------------------------------------------------------------------------------- token attention

def bra_attention(q, k, v, idx, n_win: int, *, scale: float | None = None):
    """Gather form of the token attention: each query region attends the concatenated tokens of its
    routed regions. ``q [B, Hgt, Wid, H, D]``, ``k, v [B, Hgt, Wid, Hkv, D]``, ``idx [B, S^2, topk]``;
    ``scale`` defaults to ``(H * D) ** -0.5``. Returns ``[B, Hgt, Wid, H, D]`` in q's dtype."""
    B, Hgt, Wid, H, Hkv, D = _check_image_qkv(q, k, v)
    region_shape((Hgt, Wid), n_win)
    idx = _check_idx(idx, n_win, B)
    scale = _default_scale(scale, H, D)
    R, topk, g = n_win * n_win, idx.shape[2], H // Hkv
    q_r = to_regions(q.astype(jnp.float32), n_win)                        # [B, R, n, H, D]
    n = q_r.shape[2]
    q_r = q_r.reshape(B, R, n, Hkv, g, D)
    gather = jax.vmap(lambda x, i: x[i])                           # [R, n, ...], [R, topk] -> [R, topk, n, ...]
    k_sel = gather(to_regions(k.astype(jnp.float32), n_win), idx).reshape(B, R, topk * n, Hkv, D)
    v_sel = gather(to_regions(v.astype(jnp.float32), n_win), idx).reshape(B, R, topk * n, Hkv, D)
    s = jnp.einsum("brnkgd,brmkd->brkgnm", q_r, k_sel, precision=HIGHEST) * scale
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("brkgnm,brmkd->brnkgd", p, v_sel, precision=HIGHEST).reshape(B, R, n, H, D)
    return from_regions(out, n_win, (Hgt, Wid)).astype(q.dtype)


def region_block(n_tokens: int, impl: str, block: int | None = None) -> int:
    """Rows per region in the block-sparse layout: ``n_tokens`` for xla/reference; for pallas the next
    power of two >= max(16, n_tokens) (hardware tile sizes). An explicit ``block`` must be >= n_tokens."""
    if block is not None:
        block = checks.check_int("block", block, 1)
        if block < n_tokens:
            raise ValueError(f"block must hold a whole region of {n_tokens} tokens, got block={block}")
        return block
    if resolve_impl(impl) == "pallas":
        return max(MIN_DOT_DIM, next_power_of_two(n_tokens))
    return n_tokens


def region_padding_mask_fn(n_tokens: int, block: int):
    """Hides the zero rows that pad each region to ``block``: ``kv_idx % block < n_tokens`` (None when
    there is no padding). Pure index arithmetic, so it runs inside the Pallas kernel."""
    if n_tokens == block:
        return None

    def mask_fn(b, h, q_idx, kv_idx):
        return (kv_idx % block) < n_tokens
    return mask_fn


def to_region_major(x, n_win: int, block: int):
    """``[B, Hgt, Wid, H, D] -> [B, S^2 * block, H, D]``: each region a contiguous zero-padded block."""
    r = to_regions(x, n_win)
    r = jnp.pad(r, [(0, 0), (0, 0), (0, block - r.shape[2])] + [(0, 0)] * (r.ndim - 3))
    return r.reshape(r.shape[0], -1, *r.shape[3:])


def from_region_major(x, n_win: int, hw: tuple[int, int], block: int):
    """Inverse of ``to_region_major`` (drops the padding rows)."""
    rh, rw = region_shape(hw, n_win)
    r = x.reshape(x.shape[0], n_win * n_win, block, *x.shape[2:])[:, :, :rh * rw]
    return from_regions(r, n_win, hw)


def bra_block_mask(idx, n_win: int, block: int) -> BlockMask:
    """The routed-region pattern in the region-major layout: q block p lists kv blocks ``idx[b, p]``."""
    idx = _check_idx(idx, n_win)
    R = n_win * n_win
    return BlockMask.from_topk_indices(idx[:, None], block_q=block, block_k=block, seq_q=R * block,
                                       seq_k=R * block)


def bra_attention_block_sparse(q, k, v, idx, n_win: int, *, scale: float | None = None,
                               block: int | None = None, impl: str = "auto"):
    """Block-sparse form of ``bra_attention`` (same arguments, same result): region-major permutation,
    ``BlockMask.from_topk_indices(idx)``, ``jattn.block_sparse_attention``, inverse permutation.
    ``block`` (rows per region block) defaults to ``region_block(rh * rw, impl)``."""
    B, Hgt, Wid, H, Hkv, D = _check_image_qkv(q, k, v)
    rh, rw = region_shape((Hgt, Wid), n_win)
    idx = _check_idx(idx, n_win, B)
    scale = _default_scale(scale, H, D)
    checks.check_choice("impl", impl, checks.IMPLS)
    block = region_block(rh * rw, impl, block)
    out = block_sparse_attention(
        to_region_major(q, n_win, block), to_region_major(k, n_win, block), to_region_major(v, n_win, block),
        bra_block_mask(idx, n_win, block), mask_fn=region_padding_mask_fn(rh * rw, block), scale=scale,
        impl=impl)
    return from_region_major(out, n_win, (Hgt, Wid), block)


def bi_level_routing_attention(q, k, v, n_win: int, topk: int, *, scale: float | None = None,
                               form: str = "block_sparse", block: int | None = None, impl: str = "auto",
                               return_routing: bool = False):
    """Route (``bra_route``) then attend (``form``: "block_sparse" or "gather"). Returns ``out`` and, when
    asked, the routing ``idx [B, S^2, topk]``."""
    _check_image_qkv(q, k, v)
    checks.check_choice("form", form, FORMS)
    idx = bra_route(q, k, n_win, topk)
    if form == "gather":
        out = bra_attention(q, k, v, idx, n_win, scale=scale)
    else:
        out = bra_attention_block_sparse(q, k, v, idx, n_win, scale=scale, block=block, impl=impl)
    return (out, idx) if return_routing else out


# ---------------------------------------------------------------------------------------- LCE and modules

def local_context_enhancement(v, kernel, bias=None):
    """LCE / LePE: depthwise 'same' convolution (zero padding) of ``v [B, Hgt, Wid, C]`` with
    ``kernel [k, k, C]`` (odd k) plus ``bias [C]``."""
    checks.check_float_array("v", v, 4)
    checks.check_float_array("kernel", kernel, 3)
    C, ks = v.shape[3], kernel.shape[0]
    if kernel.shape != (ks, ks, C) or ks % 2 == 0:
        raise ValueError(f"kernel must have shape [k, k, C={C}] with k odd, got {checks.describe(kernel)}")
    out = jax.lax.conv_general_dilated(v, kernel[:, :, None, :].astype(v.dtype), (1, 1),
                                       [(ks // 2, ks // 2)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=C, precision=HIGHEST)
    return out if bias is None else out + bias


def _pad_to_regions(x, n_win: int):
    Hgt, Wid = x.shape[1:3]
    pad_b, pad_r = (-Hgt) % n_win, (-Wid) % n_win
    if pad_b or pad_r:
        x = jnp.pad(x, [(0, 0), (0, pad_b), (0, pad_r), (0, 0)])
    return x


class BiLevelRoutingAttention(nnx.Module):
    """BRA over an image ``x [B, Hgt, Wid, dim]`` (the official ``BiLevelRoutingAttention`` with
    ``qk_dim = dim``, ``param_routing = diff_routing = soft_routing = False``, identity kv downsampling).

    ``q, k, v = qkv(x)``; ``idx = bra_route``; token attention (``form``); ``+ LCE(v)``; ``wo``. With
    ``auto_pad`` the image is zero padded to a multiple of ``n_win`` before ``qkv`` and cropped after ``wo``
    (padded tokens take part in routing and attention, as in the official code).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, n_win: int = 7, topk: int = 4, side_dwconv: int = 5,
                 scale: float | None = None, auto_pad: bool = False, form: str = "block_sparse",
                 impl: str = "auto", rngs: nnx.Rngs):
        dim, num_heads, n_win = checks.check_int("dim", dim, 1), checks.check_int("num_heads", num_heads, 1), checks.check_int("n_win", n_win, 1)
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be a multiple of num_heads={num_heads}")
        topk = checks.check_int("topk", topk, 1)
        if topk > n_win * n_win:
            raise ValueError(f"topk must be <= n_win^2 = {n_win * n_win}, got topk={topk}")
        side_dwconv = checks.check_int("side_dwconv", side_dwconv, 0)
        if side_dwconv and side_dwconv % 2 == 0:
            raise ValueError(f"side_dwconv must be 0 (no LCE) or odd, got {side_dwconv}")
        checks.check_choice("form", form, FORMS)
        checks.check_choice("impl", impl, checks.IMPLS)
        self.dim, self.num_heads, self.n_win, self.topk = dim, num_heads, n_win, topk
        self.scale = dim ** -0.5 if scale is None else checks.check_positive_float("scale", scale)
        self.auto_pad, self.form, self.impl = bool(auto_pad), form, impl
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.wo = nnx.Linear(dim, dim, rngs=rngs)
        if side_dwconv:
            init = nnx.initializers.lecun_normal()
            self.lepe_kernel = nnx.Param(init(rngs.params(), (side_dwconv, side_dwconv, dim), jnp.float32))
            self.lepe_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        else:
            self.lepe_kernel = self.lepe_bias = None

    def __call__(self, x, *, return_routing: bool = False):
        checks.check_float_array("x", x, 4)
        if x.shape[3] != self.dim:
            raise ValueError(f"x must be [B, Hgt, Wid, dim={self.dim}], got {checks.describe(x)}")
        Hgt, Wid = x.shape[1:3]
        if self.auto_pad:
            x = _pad_to_regions(x, self.n_win)
        else:
            region_shape((Hgt, Wid), self.n_win)
        B, Hp, Wp, C = x.shape
        heads = (B, Hp, Wp, self.num_heads, C // self.num_heads)
        q, k, v = (t.reshape(heads) for t in jnp.split(self.qkv(x), 3, axis=-1))
        out, idx = bi_level_routing_attention(q, k, v, self.n_win, self.topk, scale=self.scale, form=self.form,
                                              impl=self.impl, return_routing=True)
        out = out.reshape(B, Hp, Wp, C)
        if self.lepe_kernel is not None:
            out = out + local_context_enhancement(v.reshape(B, Hp, Wp, C), self.lepe_kernel[...],
                                                  self.lepe_bias[...])
        out = self.wo(out)[:, :Hgt, :Wid]
        return (out, idx) if return_routing else out


class BiFormerBlock(nnx.Module):
    """``x += DWConv3x3(x); x += BRA(LN(x)); x += MLP(LN(x))`` (LN eps 1e-6, MLP ratio 3, exact GELU)."""

    def __init__(self, dim: int, num_heads: int = 8, *, n_win: int = 7, topk: int = 4, mlp_ratio: float = 3.0,
                 side_dwconv: int = 5, auto_pad: bool = False, form: str = "block_sparse", impl: str = "auto",
                 rngs: nnx.Rngs):
        self.attn = BiLevelRoutingAttention(dim, num_heads, n_win=n_win, topk=topk, side_dwconv=side_dwconv,
                                            auto_pad=auto_pad, form=form, impl=impl, rngs=rngs)
        init = nnx.initializers.lecun_normal()
        self.pos_kernel = nnx.Param(init(rngs.params(), (3, 3, dim), jnp.float32))
        self.pos_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
        hidden = int(mlp_ratio * dim)
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        x = x + local_context_enhancement(x, self.pos_kernel[...], self.pos_bias[...])
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))
