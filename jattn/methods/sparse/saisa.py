"""P43 — SAISA: Towards MLLMs with Both Training and Inference Efficiency (NAAViT attention).

The LLM input is laid out ``[sys (P) | visual (V) | text (T)]``, ``N = P + V + T`` tokens.

**NAAViT** (No Attention Among ViSual Tokens). Visual positions are never queries; every token is a key.
With ``i`` a query position and ``j`` a key position in the full sequence::

    visual(i)     = P <= i < P + V
    allowed(i, j) = not visual(i) and j <= i

so system rows are causal over the system prompt, text rows see all of sys, all visual tokens and the text
up to themselves, and visual rows see nothing: their attention output is 0 (the official layer zeroes it
and keeps only the residual). Non-visual rows therefore get exactly their causal-attention output.
The official code computes queries only for the ``P + T`` non-visual rows (the "row-subset" form);
row ``r`` of that form sits at position ``pos(r) = r + V * [r >= P]`` and ``allowed(r, j) = j <= pos(r)``.

**Decoder layer** (official ``LlavaLlamaDecoderLayer``, read in icip-cas/SAISA): visual rows skip the
attention output and the FFN (residual only); RoPE rotates each query at its original position.
**SAISA** ("self-attention input space alignment", ``visual_inputs_per_layer=True``): before a layer's
input norm, the visual hidden states are overwritten by that layer's own projection of the vision
features, ``Linear(vision_dim, dim) -> GELU (exact) -> Linear(dim, dim)`` (the per-layer
``mm_projector`` applied to the vision-tower output in the official ``generate`` path). Decoding needs
nothing new: a text query attends causally over a KV cache that holds the visual K, V.

Entry points: ``naavit_mask_fn`` / ``naavit_rows_mask_fn`` (mask functions, pure index arithmetic, so
they run inside the Pallas kernel), ``naavit_mask`` / ``naavit_rows_mask`` (dense bool),
``naavit_block_mask``, ``naavit_attention`` (row-subset form), ``saisa_attention`` (full sequence, visual
rows 0), ``naavit_query_positions``, ``naavit_layer_flops`` and the NNX ``SAISADecoderBlock``.
The layout ``(P, V)`` is static and shared by the batch, as in the official code (one
``image_start_idx`` per batch); per-sample visual positions are not supported.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.ops.block_sparse import block_sparse_attention

DEFAULT_BLOCK = 64


# ------------------------------------------------------------------------------------------ validation

def _layout(num_prefix, num_visual, num_text) -> tuple[int, int, int]:
    P, V, T = checks.check_int("num_prefix", num_prefix, 0), checks.check_int("num_visual", num_visual, 0), checks.check_int("num_text", num_text, 0)
    if P + T < 1:
        raise ValueError(f"the layout needs at least one non-visual token (num_prefix + num_text >= 1), "
                         f"got num_prefix={P}, num_text={T}")
    return P, V, T


def _block(name: str, value) -> int:
    return DEFAULT_BLOCK if value is None else checks.check_block_size(name, value, minimum=16)


# ------------------------------------------------------------------------------------------ masks

@dataclasses.dataclass(frozen=True)
class NaavitMaskFn:
    """``allowed(i, j) = not (P <= i < P + V) and j <= i`` on full-sequence positions (hashable)."""
    num_prefix: int
    num_visual: int

    def __call__(self, b, h, q_idx, kv_idx):
        visual = (q_idx >= self.num_prefix) & (q_idx < self.num_prefix + self.num_visual)
        return jnp.logical_not(visual) & (kv_idx <= q_idx)


@dataclasses.dataclass(frozen=True)
class NaavitRowsMaskFn:
    """Row-subset form: query row ``r`` sits at ``r + V * [r >= P]`` and sees keys up to there (hashable)."""
    num_prefix: int
    num_visual: int

    def __call__(self, b, h, q_idx, kv_idx):
        position = jnp.where(q_idx >= self.num_prefix, q_idx + self.num_visual, q_idx)
        return kv_idx <= position


def naavit_mask_fn(num_prefix: int, num_visual: int) -> NaavitMaskFn:
    """Mask function of NAAViT over the full sequence (query and key indices are positions)."""
    return NaavitMaskFn(checks.check_int("num_prefix", num_prefix, 0), checks.check_int("num_visual", num_visual, 0))


def naavit_rows_mask_fn(num_prefix: int, num_visual: int) -> NaavitRowsMaskFn:
    """Mask function of NAAViT for the ``P + T`` non-visual query rows against all ``N`` keys."""
    return NaavitRowsMaskFn(checks.check_int("num_prefix", num_prefix, 0), checks.check_int("num_visual", num_visual, 0))


def naavit_query_positions(num_prefix: int, num_visual: int, num_text: int) -> np.ndarray:
    """Original positions ``[P + T]`` (int32) of the non-visual rows: ``0..P-1, P+V..N-1`` (for RoPE)."""
    P, V, T = _layout(num_prefix, num_visual, num_text)
    return np.concatenate([np.arange(P), np.arange(P + V, P + V + T)]).astype(np.int32)


def naavit_mask(num_prefix: int, num_visual: int, num_text: int):
    """Dense bool ``[N, N]`` NAAViT mask on the full sequence (visual rows all False)."""
    P, V, T = _layout(num_prefix, num_visual, num_text)
    N = P + V + T
    return NaavitMaskFn(P, V)(0, 0, jnp.arange(N)[:, None], jnp.arange(N)[None, :])


def naavit_rows_mask(num_prefix: int, num_visual: int, num_text: int):
    """Dense bool ``[P + T, N]`` mask of the row-subset form (sys rows causal over sys; text rows see
    sys, visual and causal text)."""
    P, V, T = _layout(num_prefix, num_visual, num_text)
    return NaavitRowsMaskFn(P, V)(0, 0, jnp.arange(P + T)[:, None], jnp.arange(P + V + T)[None, :])


def naavit_block_mask(num_prefix: int, num_visual: int, num_text: int, *, block_q: int | None = None,
                      block_k: int | None = None, rows_only: bool = False) -> BlockMask:
    """``BlockMask`` of the NAAViT mask (shared by batch and heads): the tiles with a visible entry, full
    where every entry is visible. ``rows_only=True``: the row-subset form ``[P + T, N]``; otherwise the
    full ``[N, N]`` sequence, where q blocks made only of visual rows list no tile."""
    P, V, T = _layout(num_prefix, num_visual, num_text)
    rows_only = checks.check_bool("rows_only", rows_only)
    bq, bk = _block("block_q", block_q), _block("block_k", block_k)
    mask_fn = NaavitRowsMaskFn(P, V) if rows_only else NaavitMaskFn(P, V)
    seq_q = P + T if rows_only else P + V + T
    # Static pattern: build the tables eagerly even under jit, so they keep their true (narrow) widths.
    with jax.ensure_compile_time_eval():
        return BlockMask.from_mask_fn(mask_fn, 1, 1, seq_q, P + V + T, bq, bk)


# ------------------------------------------------------------------------------------------ attention

def naavit_attention(q_rows, k, v, *, num_prefix: int, num_visual: int, block_q: int | None = None,
                     block_k: int | None = None, scale: float | None = None, impl: str = "auto"):
    """NAAViT attention in the official row-subset form.

    Args:
      q_rows: ``[B, P + T, H, D]`` queries of the non-visual rows only (sys rows, then text rows).
      k, v: ``[B, N, Hkv, D]`` keys and values of the whole sequence ``[sys | visual | text]``.
      num_prefix, num_visual: ``P`` and ``V`` (``T`` follows from ``q_rows``).
      block_q, block_k: tile sizes (powers of two >= 16, default 64). impl: as ``block_sparse_attention``.

    Returns ``[B, P + T, H, D]``: each row's causal attention output at its original position.
    """
    B, R, N, H, Hkv, D = checks.check_qkv(q_rows, k, v)
    P, V = checks.check_int("num_prefix", num_prefix, 0), checks.check_int("num_visual", num_visual, 0)
    T = R - P
    if T < 0 or P + V + T != N:
        raise ValueError(f"q_rows must hold the P + T non-visual rows of k's sequence N = P + V + T: got "
                         f"q_rows {checks.describe(q_rows)}, k {checks.describe(k)}, num_prefix={P}, "
                         f"num_visual={V} (expected q_rows length N - V = {N - V})")
    block_mask = naavit_block_mask(P, V, T, block_q=block_q, block_k=block_k, rows_only=True)
    return block_sparse_attention(q_rows, k, v, block_mask, mask_fn=NaavitRowsMaskFn(P, V), scale=scale,
                                  impl=impl)


def saisa_attention(q, k, v, *, num_prefix: int, num_visual: int, block_q: int | None = None,
                    block_k: int | None = None, scale: float | None = None, impl: str = "auto"):
    """NAAViT attention over the full sequence ``q [B, N, H, D]``, ``k, v [B, N, Hkv, D]``.

    Returns ``[B, N, H, D]``: non-visual rows get their causal attention output, visual rows are exactly
    0 (fully masked rows; their gradient is 0 too). Tiles of all-visual q blocks are never visited.
    """
    B, N, H, Hkv, D = checks.check_self_attention_qkv(q, k, v, "saisa_attention")
    P, V = checks.check_int("num_prefix", num_prefix, 0), checks.check_int("num_visual", num_visual, 0)
    if P + V > N:
        raise ValueError(f"num_prefix + num_visual = {P + V} exceeds the sequence length N={N} of q "
                         f"{checks.describe(q)}")
    if N == V:  # an all-visual sequence has no query at all
        return jnp.zeros_like(q)
    block_mask = naavit_block_mask(P, V, N - P - V, block_q=block_q, block_k=block_k)
    return block_sparse_attention(q, k, v, block_mask, mask_fn=NaavitMaskFn(P, V), scale=scale, impl=impl)


# ------------------------------------------------------------------------------------------ FLOPs

def naavit_layer_flops(num_prefix: int, num_visual: int, num_text: int, *, dim: int, num_heads: int,
                       head_dim: int, mlp_dim: int, num_kv_heads: int | None = None, mlp: str = "swiglu",
                       naavit: bool = True) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) of one decoder layer's matmuls, NAAViT or dense causal.

    NAAViT: queries, o-projection and FFN run on the ``P + T`` non-visual rows and the attention on the
    NAAViT mask's visible pairs; dense (``naavit=False``): all ``N`` rows, causal pairs. K/V projections
    run on all ``N`` rows in both (visual tokens are keys). Returns the parts and their ``"total"``.
    """
    P, V, T = _layout(num_prefix, num_visual, num_text)
    dim, H, D, F = (checks.check_int(n, x, 1) for n, x in (("dim", dim), ("num_heads", num_heads),
                                                 ("head_dim", head_dim), ("mlp_dim", mlp_dim)))
    Hkv = H if num_kv_heads is None else checks.check_int("num_kv_heads", num_kv_heads, 1)
    checks.check_choice("mlp", mlp, ("swiglu", "gelu"))
    N = P + V + T
    rows = P + T if naavit else N
    # Visible (query, key) pairs: causal rows i see i + 1 keys; NAAViT drops the visual rows P..P+V-1.
    pairs = N * (N + 1) // 2
    if naavit:
        pairs -= V * P + V * (V + 1) // 2
    parts = {
        "q_proj": 2 * rows * dim * H * D,
        "kv_proj": 2 * 2 * N * dim * Hkv * D,
        "attention": 2 * 2 * pairs * H * D,           # q k^T and p v
        "o_proj": 2 * rows * H * D * dim,
        "ffn": 2 * rows * dim * F * (3 if mlp == "swiglu" else 2),
    }
    parts["total"] = sum(parts.values())
    return parts


# ------------------------------------------------------------------------------------------ NNX layer

class VisualProjector(nnx.Module):
    """SAISA's per-layer projector: ``Linear(vision_dim, dim) -> GELU (exact erf) -> Linear(dim, dim)``."""

    def __init__(self, vision_dim: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.fc1 = nnx.Linear(vision_dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, features):
        return self.fc2(jax.nn.gelu(self.fc1(features), approximate=False))


def _split_rows(x, P: int, V: int):
    """``[B, N, ...]`` -> (non-visual rows ``[B, P + T, ...]``, visual rows ``[B, V, ...]``)."""
    return jnp.concatenate([x[:, :P], x[:, P + V:]], axis=1), x[:, P:P + V]


def _merge_rows(rows, visual, P: int):
    return jnp.concatenate([rows[:, :P], visual, rows[:, P:]], axis=1)


class SAISADecoderBlock(nnx.Module):
    """One pre-norm (Llama-style) NAAViT decoder layer over ``x [B, N, dim] = [sys | visual | text]``.

    Non-visual rows: ``x + o(NAAViT-attention(norm1 x))``, then ``+ mlp(norm2 .)``; queries are rotated
    (RoPE) at their original positions. Visual rows: residual only (no attention output, no FFN).
    ``visual_inputs_per_layer=True`` (SAISA) first overwrites the visual rows with this layer's
    ``VisualProjector(vision_features [B, V, vision_dim])``; the call then needs ``vision_features``.
    """

    def __init__(self, dim: int, num_heads: int, *, num_prefix: int, num_visual: int, rngs: nnx.Rngs,
                 num_kv_heads: int | None = None, head_dim: int | None = None, mlp_dim: int | None = None,
                 mlp: str = "swiglu", norm: str = "rms", norm_eps: float = 1e-6,
                 visual_inputs_per_layer: bool = False, vision_dim: int | None = None, rope: bool = True,
                 rope_theta: float = 10000.0, block_q: int | None = None, block_k: int | None = None,
                 impl: str = "auto", dtype=jnp.float32, param_dtype=jnp.float32):
        # Imported here: jattn.nn may register this module as a method, so import it lazily (no cycle).
        from jattn.nn.models import MLP, make_norm

        self.dim, self.num_heads = checks.check_int("dim", dim, 1), checks.check_int("num_heads", num_heads, 1)
        self.num_kv_heads = num_heads if num_kv_heads is None else checks.check_int("num_kv_heads", num_kv_heads, 1)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if head_dim is None and dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads} (or pass head_dim)")
        self.head_dim = dim // num_heads if head_dim is None else checks.check_int("head_dim", head_dim, 1)
        self.num_prefix, self.num_visual = checks.check_int("num_prefix", num_prefix, 0), checks.check_int("num_visual", num_visual, 0)
        visual_inputs_per_layer = checks.check_bool("visual_inputs_per_layer", visual_inputs_per_layer)
        if visual_inputs_per_layer and vision_dim is None:
            raise ValueError("visual_inputs_per_layer=True needs vision_dim (the vision features' width)")
        if rope and self.head_dim % 2:
            raise ValueError(f"rope=True needs an even head_dim, got {self.head_dim}")
        checks.check_choice("impl", impl, checks.IMPLS)
        self.block_q, self.block_k = _block("block_q", block_q), _block("block_k", block_k)
        self.rope, self.rope_theta, self.impl = bool(rope), float(rope_theta), impl
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim

        def linear(din, dout):
            return nnx.Linear(din, dout, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.query, self.key, self.value, self.out = linear(dim, H * D), linear(dim, Hkv * D), \
            linear(dim, Hkv * D), linear(H * D, dim)
        self.attn_norm = make_norm(norm, dim, rngs=rngs, eps=norm_eps, param_dtype=param_dtype)
        self.mlp_norm = make_norm(norm, dim, rngs=rngs, eps=norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(dim, 4 * dim if mlp_dim is None else checks.check_int("mlp_dim", mlp_dim, 1), kind=mlp, rngs=rngs,
                       dtype=dtype, param_dtype=param_dtype)
        self.projector = (VisualProjector(checks.check_int("vision_dim", vision_dim, 1), dim, rngs=rngs, dtype=dtype,
                                          param_dtype=param_dtype) if visual_inputs_per_layer else None)

    def __call__(self, x, vision_features=None):
        from jattn.nn.attention import apply_rope

        checks.check_float_array("x", x, 3)
        B, N, dim = x.shape
        P, V = self.num_prefix, self.num_visual
        if dim != self.dim or N < P + V or N == V:
            raise ValueError(f"x must be [B, N, dim={self.dim}] with N >= num_prefix + num_visual = {P + V} and "
                             f"at least one non-visual token, got {checks.describe(x)}")
        if self.projector is not None:
            if vision_features is None:
                raise ValueError("visual_inputs_per_layer=True needs vision_features [B, V, vision_dim]")
            checks.check_float_array("vision_features", vision_features, 3)
            if vision_features.shape[:2] != (B, V):
                raise ValueError(f"vision_features must be [B={B}, V={V}, vision_dim], got "
                                 f"{checks.describe(vision_features)}")
            x = x.at[:, P:P + V].set(self.projector(vision_features).astype(x.dtype))
        elif vision_features is not None:
            raise ValueError("vision_features were given but visual_inputs_per_layer=False")
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        normed = self.attn_norm(x)
        rows_in, _ = _split_rows(normed, P, V)
        R = rows_in.shape[1]
        q = self.query(rows_in).reshape(B, R, H, D)
        k = self.key(normed).reshape(B, N, Hkv, D)
        v = self.value(normed).reshape(B, N, Hkv, D)
        if self.rope:
            q = apply_rope(q, naavit_query_positions(P, V, N - P - V)[None], theta=self.rope_theta)
            k = apply_rope(k, jnp.arange(N)[None], theta=self.rope_theta)
        attended = naavit_attention(q, k, v, num_prefix=P, num_visual=V, block_q=self.block_q,
                                    block_k=self.block_k, impl=self.impl)
        rows, visual = _split_rows(x, P, V)
        rows = rows + self.out(attended.reshape(B, R, H * D))
        rows = rows + self.mlp(self.mlp_norm(rows))
        return _merge_rows(rows, visual, P)
