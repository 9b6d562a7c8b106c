"""P63 — CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up (Liu et al., 2024).

CLEAR replaces the joint text+image attention of a DiT (FLUX) by a local 2-D *circular* window. The key
sequence is ``[text (text_len tokens) ; image (h * w tokens, row-major) ; pooled (optional)]`` and the
query sequence is ``[text ; image]``. With image token ``t`` at ``(y, x) = divmod(t - text_len, w)`` the
rule is the official flex_attention mask, with a STRICT inequality:

* a text query attends every text and every image key (never a pooled key);
* an image query ``(y_q, x_q)`` attends every text key, every pooled key, and the image keys with
  ``(y_q - y_k)^2 + (x_q - x_k)^2 < r^2`` (a Euclidean disc of radius ``r``, Euclidean distance on the
  integer grid, no wrap-around; an interior query sees ``#{(dy, dx): dy^2 + dx^2 < r^2}`` image keys).

Optional down-sampled branch (``down_factor = f``): ``(h/f) * (w/f)`` pooled keys/values appended to the
keys, ``K_bar[Y, X] = sum_{dy, dx < f} w[dy, dx] * K_img[Y f + dy, X f + dx]`` (the same learned per-offset
weights ``w [f, f]``, init ``1/f^2``, for k and v, shared by heads and channels); only image queries see
them. Scale ``1/sqrt(d)``, or the official "proportional attention" (``proportional_scale``).

The pattern runs on ``jattn.block_sparse_attention`` through ``BlockMask.from_mask_fn``. ``tile=(th, tw)``
re-orders the image tokens tile-major (each block of ``th * tw`` rows is a 2-D tile) so a query block's
disc crosses fewer kv blocks; the mask function then decodes coordinates from the tiled index. Not
implemented: RoPE inside the module (apply it to q, k before ``clear_attention``) and the distillation
training loop (``clear_distillation_loss`` gives its 3-term objective).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.core.masks import materialize
from jattn.ops.block_sparse import block_sparse_attention

TRAIN_SEQ_LEN = 64 ** 2 + 512  # FLUX 1024^2 training length: 4096 image + 512 text tokens


# ---------------------------------------------------------------------------------------- validation

def _check_hw(hw) -> tuple[int, int]:
    return checks.check_int_tuple("hw", hw, 2, what="(h, w)")


def _check_radius(radius) -> float | int:
    """A finite number > 0; an int stays an int."""
    value = checks.check_positive_float("radius", radius, allow_none=False)
    return int(radius) if isinstance(radius, (int, np.integer)) else value


def _check_tile(tile, hw: tuple[int, int]) -> tuple[int, int] | None:
    if tile is None:
        return None
    tile = checks.check_int_tuple("tile", tile, 2, what="(th, tw) or None")
    if hw[0] % tile[0] or hw[1] % tile[1]:
        raise ValueError(f"tile={tile} must divide the image grid hw={hw}")
    return tile


def _check_down_factor(down_factor, hw: tuple[int, int]) -> int | None:
    if down_factor is None:
        return None
    f = checks.check_int("down_factor", down_factor, 1)
    if hw[0] % f or hw[1] % f:
        raise ValueError(f"down_factor={f} must divide the image grid hw={hw} (the pooling takes whole f x f cells)")
    return f


def num_pooled(hw, down_factor) -> int:
    """Number of pooled keys ``(h / f) * (w / f)`` (0 without the down-sampled branch)."""
    hw = _check_hw(hw)
    f = _check_down_factor(down_factor, hw)
    return 0 if f is None else (hw[0] // f) * (hw[1] // f)


# ---------------------------------------------------------------------------------------- the mask

def _image_coords(t, width: int, tile: tuple[int, int] | None):
    """Grid ``(y, x)`` of image-local layout index ``t`` (row-major, or tile-major when ``tile`` is set)."""
    if tile is None:
        return t // width, t % width
    th, tw = tile
    tile_id, offset = t // (th * tw), t % (th * tw)
    tiles_x = width // tw
    return (tile_id // tiles_x) * th + offset // tw, (tile_id % tiles_x) * tw + offset % tw


def clear_mask_fn(hw, text_len: int, radius, *, tile=None):
    """``mask_fn(b, h, q_idx, kv_idx)`` of CLEAR (module docstring) over ``[text ; image ; pooled]``.

    Pure index arithmetic on Python-int constants, so it also runs inside the Pallas kernel. Keys past
    ``text_len + h * w`` are the pooled tokens (seen by image queries only).
    """
    hw = _check_hw(hw)
    return _clear_mask_fn(hw, checks.check_int("text_len", text_len, 0), _check_radius(radius), _check_tile(tile, hw))


@functools.lru_cache(maxsize=64)
def _clear_mask_fn(hw: tuple[int, int], text_len: int, radius, tile):
    """Cached so equal arguments give the same function object (jit caches key on it)."""
    r2 = radius ** 2
    image_end = text_len + hw[0] * hw[1]

    def mask_fn(b, h, q_idx, kv_idx):
        q_text = q_idx < text_len
        kv_text = kv_idx < text_len
        kv_pooled = kv_idx >= image_end
        # Text and pooled positions get dummy coordinates; the disc test only decides image-image pairs.
        qy, qx = _image_coords(jnp.maximum(q_idx - text_len, 0), hw[1], tile)
        ky, kx = _image_coords(jnp.maximum(kv_idx - text_len, 0), hw[1], tile)
        in_disc = (qy - ky) ** 2 + (qx - kx) ** 2 < r2
        return (q_text & ~kv_pooled) | (~q_text & (kv_text | kv_pooled | in_disc))
    return mask_fn


def clear_mask(hw, text_len: int, radius, *, down_factor: int | None = None, tile=None):
    """Dense ``[1, 1, text_len + h w, text_len + h w + num_pooled]`` bool mask (tests, small shapes)."""
    hw = _check_hw(hw)
    seq_q = checks.check_int("text_len", text_len, 0) + hw[0] * hw[1]
    return materialize(clear_mask_fn(hw, text_len, radius, tile=tile), 1, 1, seq_q,
                       seq_q + num_pooled(hw, down_factor))


def clear_block_mask(hw, text_len: int, radius, *, down_factor: int | None = None, tile=None,
                     block_q: int = 64, block_k: int = 64) -> BlockMask:
    """Tiles of ``clear_mask_fn`` with any visible element (full where all are), shared by batch and heads."""
    hw = _check_hw(hw)
    return _block_mask(hw, checks.check_int("text_len", text_len, 0), _check_radius(radius), _check_tile(tile, hw),
                       num_pooled(hw, down_factor), checks.check_int("block_q", block_q, 1), checks.check_int("block_k", block_k, 1))


@functools.lru_cache(maxsize=32)
def _block_mask(hw, text_len: int, radius, tile, n_pooled: int, block_q: int, block_k: int) -> BlockMask:
    """The pattern is static, so its tables are computed eagerly (concrete even when called under ``jit``:
    the xla path then works on the true widest row, not all kv blocks) and cached."""
    seq_q = text_len + hw[0] * hw[1]
    with jax.ensure_compile_time_eval():
        return BlockMask.from_mask_fn(_clear_mask_fn(hw, text_len, radius, tile), 1, 1, seq_q, seq_q + n_pooled,
                                      block_q, block_k)


def window_key_count(radius) -> int:
    """``#{(dy, dx) in Z^2: dy^2 + dx^2 < r^2}``: image keys of an interior query."""
    r = _check_radius(radius)
    span = math.ceil(r)
    d = np.arange(-span, span + 1)
    return int(np.sum(d[:, None] ** 2 + d[None, :] ** 2 < r * r))


def proportional_scale(num_keys: int, head_dim: int, *, pooled: bool = False) -> float:
    """Official "proportional attention" scale ``sqrt(log_{4608}(N_k) / d)``; the down-sampled processor
    uses ``log_{4608}(10 N_k)`` (``pooled=True``). ``N_k = text_len + h * w``: the text and image keys
    only, NOT the pooled keys: the official down-sampled processor computes the scale from
    ``key.size(2)`` before it concatenates the pooled keys."""
    n = checks.check_int("num_keys", num_keys, 1) * (10 if pooled else 1)
    return math.sqrt(math.log(n, TRAIN_SEQ_LEN) / checks.check_int("head_dim", head_dim, 1))


# ---------------------------------------------------------------------------------------- layouts

def to_tile_major(x_img, hw, tile):
    """Image tokens ``[B, h * w, ...]`` row-major -> tile-major (identity when ``tile`` is None)."""
    if tile is None:
        return x_img
    (h, w), (th, tw) = hw, tile
    rest = x_img.shape[2:]
    x = x_img.reshape(x_img.shape[0], h // th, th, w // tw, tw, *rest)
    return jnp.moveaxis(x, 3, 2).reshape(x_img.shape[0], h * w, *rest)


def from_tile_major(x_img, hw, tile):
    """Inverse of ``to_tile_major``."""
    if tile is None:
        return x_img
    (h, w), (th, tw) = hw, tile
    rest = x_img.shape[2:]
    x = x_img.reshape(x_img.shape[0], h // th, w // tw, th, tw, *rest)
    return jnp.moveaxis(x, 2, 3).reshape(x_img.shape[0], h * w, *rest)


def downsample_kv(x, hw, text_len: int, down_factor: int, weights=None):
    """Pooled tokens of the image part of ``x [B, text_len + h w, Hkv, D]``: ``[B, (h/f)(w/f), Hkv, D]``,
    ``sum_{dy, dx} weights[dy, dx] * x_img[Y f + dy, X f + dx]`` (weights ``[f, f]``, default ``1/f^2``)."""
    checks.check_float_array("x", x, 4)
    hw = _check_hw(hw)
    text_len = checks.check_int("text_len", text_len, 0)
    f = _check_down_factor(down_factor, hw)
    if f is None:
        raise TypeError("down_factor must be an int >= 1, got None")
    h, w = hw
    if x.shape[1] != text_len + h * w:
        raise ValueError(f"x must have text_len + h*w = {text_len + h * w} tokens, got {checks.describe(x)}")
    if weights is None:
        weights = jnp.full((f, f), 1.0 / (f * f), jnp.float32)
    checks.check_float_array("weights", weights, 2)
    if weights.shape != (f, f):
        raise ValueError(f"weights must have shape [f, f] = ({f}, {f}), got {checks.describe(weights)}")
    img = x[:, text_len:].astype(jnp.float32).reshape(x.shape[0], h // f, f, w // f, f, *x.shape[2:])
    pooled = jnp.einsum("byixjhd,ij->byxhd", img, weights.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return pooled.reshape(x.shape[0], -1, *x.shape[2:]).astype(x.dtype)


# ---------------------------------------------------------------------------------------- attention

def _check_clear_inputs(q, k, v, k_down, v_down, hw, text_len):
    B, T, S, H, Hkv, D = checks.check_qkv(q, k, v)
    L = text_len + hw[0] * hw[1]
    if T != L or S != L:
        raise ValueError(f"q, k, v must hold text_len + h*w = {text_len} + {hw[0]}*{hw[1]} = {L} tokens, "
                         f"got q {checks.describe(q)} and k {checks.describe(k)}")
    if (k_down is None) != (v_down is None):
        raise ValueError("k_down and v_down must be given together (the pooled branch) or both be None")
    if k_down is not None:
        for name, x in (("k_down", k_down), ("v_down", v_down)):
            checks.check_float_array(name, x, 4)
            if x.shape[0] != B or x.shape[1] < 1 or x.shape[2:] != (Hkv, D):
                raise ValueError(f"{name} must have shape [B={B}, n_pooled, Hkv={Hkv}, D={D}], "
                                 f"got {checks.describe(x)}")
        if k_down.shape != v_down.shape:
            raise ValueError(f"k_down and v_down must share a shape, got {checks.describe(k_down)} and "
                             f"{checks.describe(v_down)}")


def clear_attention(q, k, v, hw, text_len: int, radius, k_down=None, v_down=None, *, scale: float | None = None,
                    tile=None, block_q: int = 64, block_k: int = 64, impl: str = "auto"):
    """CLEAR attention over ``[text ; image]`` tokens: ``q [B, text_len + h w, H, D]``, ``k, v`` with Hkv
    heads; optional pooled ``k_down, v_down [B, n_pooled, Hkv, D]`` (``downsample_kv``). Exactly
    ``reference_attention`` with ``clear_mask``; returns ``[B, text_len + h w, H, D]`` in q's dtype."""
    hw = _check_hw(hw)
    text_len = checks.check_int("text_len", text_len, 0)
    _check_clear_inputs(q, k, v, k_down, v_down, hw, text_len)
    radius, tile = _check_radius(radius), _check_tile(tile, hw)
    block_q, block_k = checks.check_int("block_q", block_q, 1), checks.check_int("block_k", block_k, 1)
    checks.check_choice("impl", impl, checks.IMPLS)
    layout = lambda x: jnp.concatenate([x[:, :text_len], to_tile_major(x[:, text_len:], hw, tile)], axis=1)
    q_l, k_l, v_l = layout(q), layout(k), layout(v)
    n_down = 0
    if k_down is not None:
        n_down = k_down.shape[1]
        k_l = jnp.concatenate([k_l, k_down.astype(k.dtype)], axis=1)
        v_l = jnp.concatenate([v_l, v_down.astype(v.dtype)], axis=1)
    mask_fn = _clear_mask_fn(hw, text_len, radius, tile)
    block_mask = _block_mask(hw, text_len, radius, tile, n_down, block_q, block_k)
    out = block_sparse_attention(q_l, k_l, v_l, block_mask, mask_fn=mask_fn, scale=scale, impl=impl)
    return jnp.concatenate([out[:, :text_len], from_tile_major(out[:, text_len:], hw, tile)], axis=1)


def clear_distillation_loss(flow_loss, student_pred, teacher_pred, student_attn, teacher_attn):
    """CLEAR's objective ``L_flow + 0.5 MSE(student, teacher prediction) + 0.5 mean_l MSE(attention outputs)``
    (``student_attn``/``teacher_attn``: sequences of the supervised layers' attention outputs)."""
    if len(student_attn) != len(teacher_attn) or not student_attn:
        raise ValueError(f"student_attn and teacher_attn must be equally long non-empty sequences, got "
                         f"{len(student_attn)} and {len(teacher_attn)}")
    mse = lambda a, b: jnp.mean((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2)
    attn = sum(mse(s, t) for s, t in zip(student_attn, teacher_attn)) / len(student_attn)
    return flow_loss + 0.5 * mse(student_pred, teacher_pred) + 0.5 * attn


class CLEARAttention(nnx.Module):
    """Joint attention ``x [B, text_len + h w, dim] -> same`` with CLEAR's local circular window:
    q, k, v, o projections, optional down-sampled branch with learned ``pool_weights [f, f]`` (init 1/f^2)."""

    def __init__(self, dim: int, num_heads: int, hw, text_len: int, radius, *, down_factor: int | None = None,
                 tile=None, block_q: int = 64, block_k: int = 64, impl: str = "auto", rngs: nnx.Rngs):
        dim, num_heads = checks.check_int("dim", dim, 1), checks.check_int("num_heads", num_heads, 1)
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be a multiple of num_heads={num_heads}")
        self.hw = _check_hw(hw)
        self.text_len, self.radius = checks.check_int("text_len", text_len, 0), _check_radius(radius)
        self.down_factor = _check_down_factor(down_factor, self.hw)
        self.tile = _check_tile(tile, self.hw)
        checks.check_choice("impl", impl, checks.IMPLS)
        self.num_heads, self.block_q, self.block_k, self.impl = num_heads, block_q, block_k, impl
        self.to_q, self.to_k = nnx.Linear(dim, dim, rngs=rngs), nnx.Linear(dim, dim, rngs=rngs)
        self.to_v, self.to_out = nnx.Linear(dim, dim, rngs=rngs), nnx.Linear(dim, dim, rngs=rngs)
        if self.down_factor is not None:
            f = self.down_factor
            self.pool_weights = nnx.Param(jnp.full((f, f), 1.0 / (f * f), jnp.float32))
        else:
            self.pool_weights = None

    def __call__(self, x):
        checks.check_float_array("x", x, 3)
        L = self.text_len + self.hw[0] * self.hw[1]
        if x.shape[1] != L:
            raise ValueError(f"x must have text_len + h*w = {L} tokens, got {checks.describe(x)}")
        B, _, dim = x.shape
        heads = lambda t: t.reshape(B, L, self.num_heads, dim // self.num_heads)
        q, k, v = heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x))
        k_down = v_down = None
        if self.pool_weights is not None:
            w = self.pool_weights[...]
            k_down = downsample_kv(k, self.hw, self.text_len, self.down_factor, w)
            v_down = downsample_kv(v, self.hw, self.text_len, self.down_factor, w)
        out = clear_attention(q, k, v, self.hw, self.text_len, self.radius, k_down, v_down, tile=self.tile,
                              block_q=self.block_q, block_k=self.block_k, impl=self.impl)
        return self.to_out(out.reshape(B, L, dim))
