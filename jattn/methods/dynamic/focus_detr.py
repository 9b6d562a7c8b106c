"""P41 — Focus-DETR: Less is More: Focus Attention for Efficient DETR (Zheng et al., ICCV 2023).

A token selector for the DETR encoder: only foreground tokens are updated, and only the most object-like of
them attend to each other densely. Facts from the official code (huawei-noah/noah-research ``Focus-DETR``,
``focus_detr_transformer.py``: ``FOCUS_DETRTransformer``, ``MaskPredictor``; ``detrex/layers/transformer.py``:
``Focus_DETR_BaseTransformerLayer``, the ``"OESM"`` branch):

1. **Foreground score** (``MaskPredictor``, ``top_down_scores``, ``FocusScorer``): ``z = GELU(Linear(LN(x)))``
   (width ``h``), split in a local half and a global half; the global half is replaced by its mean over the
   level's tokens; ``score = Linear(GELU(Linear(GELU(Linear([z_loc, z_glob])))))`` with widths h/2, h/4, 1
   (exact-erf GELU). Levels are flattened finest first; scoring goes **top-down**: the coarsest level is
   scored from its features; each finer level ``l`` is first fused,
   ``feat_l <- feat_l + feat_l * up(score_{l+1}) * alpha_i`` (``up`` = bilinear resize with
   ``align_corners=True`` of the raw score map, ``alpha`` = ``L - 1`` learnable scalars, init U(-0.3, 0.3),
   ``alpha_i`` for the i-th fusion step from the top), then scored. Padding tokens get the global min score.
   Observation (a property of the official code, kept as is): the fusion multiplies each token's features by
   the scalar ``1 + alpha_i up(score)`` and the MaskPredictor begins with a LayerNorm, which is invariant to a
   positive per-token scale; so the fusion changes a score only where that factor is negative (a sign flip)
   or through LN's epsilon. ``test_mask_predictor_and_top_down_fusion_match_numpy`` checks both regimes.
2. **Keep count**: ``K_b = floor(rho N_valid,b) + 1`` (``focus_token_count``); layer ``l`` selects the top
   ``int(cascade[l] * max_b K_b)`` tokens by foreground score (``cascade_topk``; here with static ``N``:
   ``K = min(N, floor(rho N) + 1)``). rho = 0.5, cascade (1, .8, .6, .6, .4, .2).
3. **Encoder layer** (``FocusEncoderLayer``, post-norm, order OESM -> deformable -> norm -> FFN -> norm):
   a. gather the selected tokens, their position embeddings, reference points and foreground scores
      (``topk_gather``);
   b. **OESM** (``oesm_self_attention``): ``mc = max_c class_score(token) * fg_score``; the top
      ``min(300, k)`` selected tokens by ``mc`` do MHA among themselves (q = k = x + pos, v = x, residual
      inside, as detrex's ``MultiheadAttention``), then a LayerNorm (``norm2``), and are scattered back into
      the selected set (the other selected tokens are unchanged by this step);
   c. all selected tokens do multi-scale deformable attention (``jattn.methods.dynamic.deformable``) on the
      value map, residual, LayerNorm, FFN (Linear-ReLU-Linear, residual), LayerNorm;
   d. the updated tokens are scattered into the full map (``scatter_back``); **unselected tokens are
      unchanged** (bit-identical). An optional per-sample ``valid_count`` only scatters the first
      ``valid_count[b]`` ranks, as the code's ``[:focus_token_nums[i]]``.

The dense self-attention of OESM runs on ``jattn.attention`` (flash / xla / reference by ``impl``). All counts
(``k``, the OESM top-k) are static, so every shape is static and the layer is jit-able; the selection itself
is data-dependent (``jax.lax.top_k``). With ``rho = 1``, every cascade entry 1 and the OESM k equal to ``N``
the layer is the dense encoder layer "MHA layer + deformable layer + FFN" over all tokens.

Deliberate deviations / readings:

* ``mc``: the paper multiplies a class *probability* by the foreground *score*; the code multiplies the raw
  ``max`` of the class head's output by the raw MaskPredictor output. ``score_mode="prob"`` (default) applies
  a sigmoid to both (DINO's focal-loss class head and the focal-loss foreground head are sigmoid heads);
  ``score_mode="logits"`` is the code's product.
* The deformable value map defaults to the layer's current full map ``x`` (Deformable DETR / DINO); the
  official encoder passes the *initial* flattened features as ``value`` to every layer; pass ``value=`` for it.
* The ``enc_output`` Linear + LN that the code applies to the features before the MaskPredictor belongs to the
  two-stage head: ``top_down_scores`` scores the features it is given.
* No dropout; the foreground focal loss, FCOS-style labels, decoder and COCO training are out of scope.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import jattn
from jattn.core import checks
from jattn.methods.dynamic.deformable import MSDeformAttn, check_spatial_shapes, level_start_index

__all__ = ["RHO", "CASCADE", "OESM_TOPK", "focus_token_count", "cascade_topk", "topk_gather", "scatter_back",
           "resize_bilinear_align_corners", "MaskPredictor", "top_down_scores", "FocusScorer", "mc_scores",
           "oesm_self_attention", "OESMAttention", "FocusEncoderLayer", "focus_layer_flops"]

RHO = 0.5
CASCADE = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)
OESM_TOPK = 300


def _check_static_k(name: str, k, n: int) -> int:
    if checks.is_traced(k) or not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"{name} must be a static python int, got {k!r}")
    if not 1 <= k <= n:
        raise ValueError(f"{name} must be in [1, {n}] (the number of tokens), got {k}")
    return k


def focus_token_count(n_valid, rho: float = RHO):
    """``K = floor(rho * N_valid) + 1`` per sample (int32 array, the code's ``focus_token_nums``)."""
    rho = checks.check_float_in("rho", rho, 0.0, 1.0, low_open=True)
    n_valid = jnp.asarray(n_valid)
    if not jnp.issubdtype(n_valid.dtype, jnp.integer):
        raise TypeError(f"n_valid must be an integer array, got {checks.describe(n_valid)}")
    return jnp.floor(n_valid.astype(jnp.float32) * rho).astype(jnp.int32) + 1


def cascade_topk(n_tokens: int, rho: float = RHO, cascade: Sequence[float] = CASCADE) -> tuple[int, ...]:
    """Static per-layer keep counts ``int(cascade[l] * K)``, ``K = min(N, floor(rho N) + 1)``, each >= 1."""
    n = checks.check_int("n_tokens", n_tokens)
    rho = checks.check_float_in("rho", rho, 0.0, 1.0, low_open=True)
    if not isinstance(cascade, (tuple, list)) or not cascade:
        raise TypeError(f"cascade must be a non-empty tuple of floats in (0, 1], got {cascade!r}")
    ratios = [checks.check_float_in("cascade", c, 0.0, 1.0, low_open=True) for c in cascade]
    k_max = min(n, math.floor(rho * n) + 1)
    return tuple(max(1, min(n, int(c * k_max))) for c in ratios)


def topk_gather(x, scores, k: int):
    """The ``k`` highest-scoring tokens: x ``[B, N, ...]``, scores ``[B, N]`` -> (``[B, k, ...]``, idx ``[B, k]``).

    Indices are in descending score order (ties to the lower index, as ``jax.lax.top_k``).
    """
    x = jnp.asarray(x)
    checks.check_float_array("scores", scores, 2)
    if x.ndim < 2 or x.shape[:2] != scores.shape:
        raise ValueError(f"x must be [B, N, ...] with [B, N] = scores.shape {scores.shape}, got {checks.describe(x)}")
    k = _check_static_k("k", k, scores.shape[1])
    _, idx = jax.lax.top_k(scores, k)
    return _gather(x, idx), idx


def _gather(x, idx):
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def scatter_back(full, selected, indices, valid=None):
    """Write ``selected [B, k, ...]`` into ``full [B, N, ...]`` at ``indices [B, k]`` (distinct per row).

    Rows of ``full`` not listed are returned unchanged (bit-identical). ``valid [B, k]`` bool: entries with
    ``False`` are not written (the code's ``[:focus_token_nums[b]]``).
    """
    full = jnp.asarray(full)
    selected = jnp.asarray(selected)
    indices = jnp.asarray(indices)
    if indices.ndim != 2 or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"indices must be an integer [B, k] array, got {checks.describe(indices)}")
    B, k = indices.shape
    if full.ndim < 2 or full.shape[0] != B:
        raise ValueError(f"full must be [B={B}, N, ...], got {checks.describe(full)}")
    if selected.shape != (B, k) + full.shape[2:]:
        raise ValueError(f"selected must be {(B, k) + full.shape[2:]} (indices' [B, k] + full's feature dims), got "
                         f"{checks.describe(selected)}")
    if valid is not None:
        valid = jnp.asarray(valid)
        if valid.shape != (B, k) or valid.dtype != jnp.bool_:
            raise ValueError(f"valid must be bool [B, k] = {(B, k)}, got {checks.describe(valid)}")
        old = _gather(full, indices)
        selected = jnp.where(valid.reshape((B, k) + (1,) * (full.ndim - 2)), selected, old)
    b = jnp.arange(B)[:, None]
    return full.at[b, indices].set(selected.astype(full.dtype))


def resize_bilinear_align_corners(x, size: tuple[int, int]):
    """Bilinear resize of ``x [B, H, W]`` to ``size`` with ``align_corners=True`` (torch ``F.interpolate``)."""
    checks.check_float_array("x", x, 3)
    ho, wo = checks.check_int_tuple("size", size, 2)
    _, hi, wi = x.shape

    def coords(n_out, n_in):
        if n_out == 1 or n_in == 1:
            c = jnp.zeros((n_out,), jnp.float32)
        else:
            c = jnp.arange(n_out, dtype=jnp.float32) * ((n_in - 1) / (n_out - 1))
        i0 = jnp.clip(jnp.floor(c).astype(jnp.int32), 0, n_in - 1)
        i1 = jnp.minimum(i0 + 1, n_in - 1)
        return i0, i1, c - i0

    y0, y1, fy = coords(ho, hi)
    x0, x1, fx = coords(wo, wi)
    xf = x.astype(jnp.float32)
    top = xf[:, y0][:, :, x0] * (1 - fx) + xf[:, y0][:, :, x1] * fx
    bot = xf[:, y1][:, :, x0] * (1 - fx) + xf[:, y1][:, :, x1] * fx
    return (top * (1 - fy)[:, None] + bot * fy[:, None]).astype(x.dtype)


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)


class MaskPredictor(nnx.Module):
    """Foreground scorer: LN -> Linear(d, h) -> GELU; [local half, level-mean of the global half] -> MLP -> 1."""

    def __init__(self, dim: int, hidden: int | None = None, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        checks.check_int("dim", dim)
        hidden = dim if hidden is None else checks.check_int("hidden", hidden)
        if hidden % 4:
            raise ValueError(f"hidden must be a multiple of 4 (halves and quarters), got {hidden}")
        self.hidden = hidden
        xav = nnx.initializers.xavier_uniform()
        kw = dict(rngs=rngs, param_dtype=param_dtype, kernel_init=xav)
        self.norm = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs, param_dtype=param_dtype)
        self.fc1 = nnx.Linear(dim, hidden, **kw)
        self.fc2 = nnx.Linear(hidden, hidden // 2, **kw)
        self.fc3 = nnx.Linear(hidden // 2, hidden // 4, **kw)
        self.fc4 = nnx.Linear(hidden // 4, 1, **kw)

    def __call__(self, x):
        """x ``[B, n, d]`` (one level's tokens) -> raw scores ``[B, n]``."""
        checks.check_float_array("x", x, 3)
        z = _gelu(self.fc1(self.norm(x)))
        h2 = self.hidden // 2
        z_glob = jnp.broadcast_to(z[..., h2:].mean(axis=1, keepdims=True), z[..., h2:].shape)
        z = jnp.concatenate([z[..., :h2], z_glob], -1)
        return self.fc4(_gelu(self.fc3(_gelu(self.fc2(z)))))[..., 0]


def top_down_scores(feats, spatial_shapes, predictor: Callable, alpha, padding_mask=None):
    """Top-down multi-level foreground scores.

    Args:
      feats: ``[B, N, d]``, levels flattened finest first (``N = sum H_l W_l``).
      spatial_shapes: static tuple of ``(H_l, W_l)``, finest first.
      predictor: ``[B, n, d] -> [B, n]`` (a ``MaskPredictor``), shared by all levels.
      alpha: ``[L - 1]`` fusion scalars; ``alpha[i - 1]`` is used at the i-th level from the top.
      padding_mask: optional bool ``[B, N]``, True = padding: those tokens get the minimum score.

    Returns:
      raw scores ``[B, N]`` in level order.
    """
    shapes = check_spatial_shapes(spatial_shapes)
    checks.check_float_array("feats", feats, 3)
    B, N, d = feats.shape
    L = len(shapes)
    if N != sum(h * w for h, w in shapes):
        raise ValueError(f"feats must have N = sum(H_l W_l) = {sum(h * w for h, w in shapes)} tokens, got "
                         f"{checks.describe(feats)}")
    alpha = jnp.asarray(alpha)
    if alpha.shape != (L - 1,):
        raise ValueError(f"alpha must have shape (L - 1,) = {(L - 1,)}, got {checks.describe(alpha)}")
    starts = level_start_index(shapes)
    scores = [None] * L
    prev = None
    for i in range(L):
        lvl = L - 1 - i
        h, w = shapes[lvl]
        f = feats[:, starts[lvl]:starts[lvl] + h * w]
        if i > 0:
            up = resize_bilinear_align_corners(prev, (h, w)).reshape(B, h * w, 1)
            f = f + f * up * alpha[i - 1]
        s = predictor(f)
        prev = s.reshape(B, h, w)
        scores[lvl] = s
    out = jnp.concatenate(scores, axis=1)
    if padding_mask is not None:
        if padding_mask.shape != (B, N) or padding_mask.dtype != jnp.bool_:
            raise ValueError(f"padding_mask must be bool [B, N] = {(B, N)}, got {checks.describe(padding_mask)}")
        out = jnp.where(padding_mask, out.min(), out)
    return out


class FocusScorer(nnx.Module):
    """``MaskPredictor`` + the ``L - 1`` top-down fusion scalars ``alpha`` (init U(-0.3, 0.3))."""

    def __init__(self, dim: int, num_levels: int = 4, hidden: int | None = None, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        checks.check_int("num_levels", num_levels)
        self.num_levels = num_levels
        self.predictor = MaskPredictor(dim, hidden, rngs=rngs, param_dtype=param_dtype)
        self.alpha = nnx.Param(jax.random.uniform(rngs.params(), (num_levels - 1,), param_dtype, -0.3, 0.3))

    def __call__(self, feats, spatial_shapes, padding_mask=None):
        shapes = check_spatial_shapes(spatial_shapes)
        if len(shapes) != self.num_levels:
            raise ValueError(f"spatial_shapes must have num_levels={self.num_levels} levels, got {shapes}")
        return top_down_scores(feats, shapes, self.predictor, self.alpha.value, padding_mask)


def mc_scores(class_logits, fg_scores, *, score_mode: str = "prob"):
    """OESM ranking ``max_c class(token) * fg(token)``: class_logits ``[B, n, C]``, fg_scores ``[B, n]`` -> ``[B, n]``.

    ``"prob"``: ``sigmoid(max_c logits) * sigmoid(fg)`` (paper); ``"logits"``: the raw product (official code).
    """
    checks.check_choice("score_mode", score_mode, ("prob", "logits"))
    checks.check_float_array("class_logits", class_logits, 3)
    checks.check_float_array("fg_scores", fg_scores, 2)
    if class_logits.shape[:2] != fg_scores.shape:
        raise ValueError(f"class_logits must be [B, n, C] with [B, n] = fg_scores.shape {fg_scores.shape}, got "
                         f"{checks.describe(class_logits)}")
    m = class_logits.max(-1).astype(jnp.float32)
    f = fg_scores.astype(jnp.float32)
    if score_mode == "prob":
        m, f = jax.nn.sigmoid(m), jax.nn.sigmoid(f)
    return m * f


def oesm_self_attention(tokens, pos, scores, k: int, *, mha: Callable, norm: Callable):
    """OESM: the top-``k`` tokens by ``scores`` do ``norm(mha(x, pos))`` among themselves; others unchanged.

    Args:
      tokens: ``[B, n, d]``; pos: ``[B, n, d]`` position embeddings; scores: ``[B, n]`` (``mc_scores``).
      k: static number of tokens that attend (``min(300, n)`` in the paper).
      mha: ``(x [B, k, d], pos [B, k, d]) -> [B, k, d]``, the residual MHA (``x + MHA(x + pos, x + pos, x)``).
      norm: the LayerNorm applied after it.
    """
    checks.check_float_array("tokens", tokens, 3)
    checks.check_float_array("pos", pos, 3)
    if pos.shape != tokens.shape:
        raise ValueError(f"pos must match tokens {tokens.shape}, got {checks.describe(pos)}")
    if scores.shape != tokens.shape[:2]:
        raise ValueError(f"scores must be [B, n] = {tokens.shape[:2]}, got {checks.describe(scores)}")
    k = _check_static_k("k", k, tokens.shape[1])
    sel, idx = topk_gather(tokens, scores, k)
    sel_pos = _gather(pos, idx)
    return scatter_back(tokens, norm(mha(sel, sel_pos)), idx)


class OESMAttention(nnx.Module):
    """Residual MHA (q = k = x + pos, v = x; detrex ``MultiheadAttention``) + ``norm2`` on the OESM tokens."""

    def __init__(self, dim: int, num_heads: int = 8, *, impl: str = "auto", rngs: nnx.Rngs, param_dtype=jnp.float32):
        checks.check_int("dim", dim)
        checks.check_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"dim must be a multiple of num_heads={num_heads}, got dim={dim}")
        self.dim, self.num_heads, self.impl = dim, num_heads, impl
        xav = nnx.initializers.xavier_uniform()
        kw = dict(rngs=rngs, param_dtype=param_dtype, kernel_init=xav)
        self.q_proj = nnx.Linear(dim, dim, **kw)
        self.k_proj = nnx.Linear(dim, dim, **kw)
        self.v_proj = nnx.Linear(dim, dim, **kw)
        self.out_proj = nnx.Linear(dim, dim, **kw)
        self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs, param_dtype=param_dtype)

    def mha(self, x, pos):
        """``x + out_proj(attention(q_proj(x + pos), k_proj(x + pos), v_proj(x)))`` over ``[B, n, d]``."""
        B, n, d = x.shape
        H = self.num_heads
        qk = x + pos
        split = lambda t: t.reshape(B, n, H, d // H)
        o = jattn.attention(split(self.q_proj(qk)), split(self.k_proj(qk)), split(self.v_proj(x)), impl=self.impl)
        return x + self.out_proj(o.reshape(B, n, d))

    def __call__(self, tokens, pos, scores, k: int):
        return oesm_self_attention(tokens, pos, scores, k, mha=self.mha, norm=self.norm2)


class FocusEncoderLayer(nnx.Module):
    """Focus-DETR encoder layer: top-k foreground tokens -> OESM -> deformable attn -> FFN -> scatter back."""

    def __init__(self, dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                 ffn_dim: int = 1024, num_classes: int = 91, *, oesm_topk: int = OESM_TOPK,
                 score_mode: str = "prob", impl: str = "auto", rngs: nnx.Rngs, param_dtype=jnp.float32):
        checks.check_int("ffn_dim", ffn_dim)
        checks.check_int("num_classes", num_classes)
        checks.check_int("oesm_topk", oesm_topk)
        checks.check_choice("score_mode", score_mode, ("prob", "logits"))
        self.dim, self.oesm_topk, self.score_mode = dim, oesm_topk, score_mode
        self.oesm = OESMAttention(dim, num_heads, impl=impl, rngs=rngs, param_dtype=param_dtype)
        self.deform = MSDeformAttn(dim, num_heads, num_levels, num_points, rngs=rngs, param_dtype=param_dtype)
        xav = nnx.initializers.xavier_uniform()
        kw = dict(rngs=rngs, param_dtype=param_dtype, kernel_init=xav)
        self.class_head = nnx.Linear(dim, num_classes, **kw)  # the code's enhance_MCSP[layer]
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs, param_dtype=param_dtype)
        self.ffn1 = nnx.Linear(dim, ffn_dim, **kw)
        self.ffn2 = nnx.Linear(ffn_dim, dim, **kw)
        self.norm3 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs, param_dtype=param_dtype)

    def update_tokens(self, q, qpos, ref, fg, value, spatial_shapes, oesm_k: int, key_padding_mask=None):
        """The per-selected-token computation (no selection of the k tokens): ``[B, k, d] -> [B, k, d]``."""
        mc = mc_scores(self.class_head(q), fg, score_mode=self.score_mode)
        q = self.oesm(q, qpos, mc, oesm_k)
        q = self.norm1(self.deform(q, value, ref, spatial_shapes, query_pos=qpos, key_padding_mask=key_padding_mask))
        return self.norm3(q + self.ffn2(jax.nn.relu(self.ffn1(q))))

    def __call__(self, x, pos, reference_points, spatial_shapes, fg_scores, k: int, *, value=None,
                 key_padding_mask=None, valid_count=None):
        """Update the top-``k`` tokens of ``x`` by ``fg_scores``; the others are returned bit-identical.

        Args:
          x, pos: ``[B, N, d]`` tokens and position (+ level) embeddings, levels flattened finest first.
          reference_points: ``[B, N, L, 2]`` normalised (x, y) per level (Deformable DETR's encoder points).
          spatial_shapes: static tuple of ``(H_l, W_l)``.
          fg_scores: ``[B, N]`` foreground scores (``FocusScorer``); padding should already hold the minimum.
          k: static number of selected tokens (``cascade_topk(N, rho, cascade)[layer]``).
          value: ``[B, N, d]`` deformable value map, default ``x``.
          key_padding_mask: bool ``[B, N]``, True = padding (zeroes those value rows).
          valid_count: optional int ``[B]``: only the first ``valid_count[b]`` ranks are written back.
        """
        checks.check_float_array("x", x, 3)
        B, N, d = x.shape
        if d != self.dim:
            raise ValueError(f"x must be [B, N, dim={self.dim}], got {checks.describe(x)}")
        for name, arr in (("pos", pos),) + ((("value", value),) if value is not None else ()):
            checks.check_float_array(name, arr, 3)
            if arr.shape != x.shape:
                raise ValueError(f"{name} must match x {x.shape}, got {checks.describe(arr)}")
        checks.check_float_array("reference_points", reference_points, 4)
        if reference_points.shape[:2] != (B, N) or reference_points.shape[3] != 2:
            raise ValueError(f"reference_points must be [B, N, L, 2] with [B, N] = {(B, N)}, got "
                             f"{checks.describe(reference_points)}")
        checks.check_float_array("fg_scores", fg_scores, 2)
        if fg_scores.shape != (B, N):
            raise ValueError(f"fg_scores must be [B, N] = {(B, N)}, got {checks.describe(fg_scores)}")
        k = _check_static_k("k", k, N)
        value = x if value is None else value
        q, idx = topk_gather(x, fg_scores, k)
        qpos, ref, fg = _gather(pos, idx), _gather(reference_points, idx), _gather(fg_scores, idx)
        out = self.update_tokens(q, qpos, ref, fg, value, spatial_shapes, min(self.oesm_topk, k), key_padding_mask)
        valid = None
        if valid_count is not None:
            valid_count = jnp.asarray(valid_count)
            if valid_count.shape != (B,) or not jnp.issubdtype(valid_count.dtype, jnp.integer):
                raise ValueError(f"valid_count must be an int [B] = ({B},) array, got {checks.describe(valid_count)}")
            valid = jnp.arange(k)[None, :] < valid_count[:, None]
        return scatter_back(x, out, idx, valid)


def focus_layer_flops(n_tokens: int, k: int, oesm_k: int, dim: int = 256, num_heads: int = 8, num_levels: int = 4,
                      num_points: int = 4, ffn_dim: int = 1024, num_classes: int = 91) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) of one ``FocusEncoderLayer`` call, by part (matmuls and sampling only).

    ``value_proj`` runs over all ``n_tokens``; everything else scales with ``k`` (and OESM's quadratic part with
    ``oesm_k ** 2``). The dense encoder layer is ``k = oesm_k = n_tokens``.
    """
    n = checks.check_int("n_tokens", n_tokens)
    k = _check_static_k("k", k, n)
    oesm_k = _check_static_k("oesm_k", oesm_k, k)
    d, H, L, P = dim, num_heads, num_levels, num_points
    parts = {
        "class_head": 2 * k * d * num_classes,
        "oesm_proj": 2 * oesm_k * d * d * 4,
        "oesm_attn": 2 * 2 * oesm_k * oesm_k * d,
        "deform_value_proj": 2 * n * d * d,
        "deform_offsets_weights": 2 * k * d * (H * L * P * 3),
        "deform_sampling": 2 * k * H * L * P * 4 * (d // H),
        "deform_out_proj": 2 * k * d * d,
        "ffn": 2 * 2 * k * d * ffn_dim,
    }
    parts["total"] = sum(parts.values())
    return parts
