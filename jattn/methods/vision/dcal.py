"""P23 DCAL: Dual Cross-Attention Learning -- global-local cross-attention (GLCA) and pair-wise cross-attention
(PWCA) around a pre-norm ViT with a class token (Zhu et al., CVPR 2022).

No official code was released; the computation below follows the paper's text (Sec. 3 and the implementation
details), read from the transcription in ``mossbee/final_dcal`` (``dual_cross_attention_learning.md``). The
layout is jattn's ``[B, T, H, D]``; token 0 is the class token (CLS) wherever a model is involved.

Pure functions
--------------
* ``attention_rollout(attn_list, alpha=0.5)``: ``S_bar_l = alpha * mean_heads(S_l) + (1 - alpha) * I`` and
  ``S_hat = S_bar_L @ S_bar_{L-1} @ ... @ S_bar_1`` (later layers multiply on the left), ``[B, N, N]``. Rows of a
  row-stochastic ``S_l`` stay row-stochastic, so no re-normalisation is applied (third-party code re-normalises,
  which is a no-op on softmax maps).
* ``num_selected(n, ratio) = max(1, floor(n * ratio))`` and ``top_r_indices(response, r)``: the ``r`` largest
  responses in descending order (ties: lower index first, ``jax.lax.top_k``).
* ``glca_select(rollout_cls, ratio)``: the CLS row of the rollout ``[B, N]`` -> indices ``[B, 1 + R]``: CLS (0)
  first, then the top ``R = num_selected(N - 1, ratio)`` patch tokens (columns ``1..N-1``) by response.
* ``glca(q, k, v, rollout_cls, ratio)``: ``softmax(Q^l K^T / sqrt(d)) V`` with ``Q^l`` the gathered selected
  queries and the global ``K, V`` (all tokens, CLS included) -> ``(out [B, 1+R, H, D], index [B, 1+R])``.
* ``pwca(q1, k1, v1, k2, v2)``: ``softmax(Q1 [K1; K2]^T / sqrt(d)) [V1; V2]`` -- ONE softmax over the 2N keys of
  the image and its distractor.
* ``uncertainty_weighted_loss(losses, w) = 0.5 * sum_i (exp(-w_i) L_i + w_i)`` (Kendall et al.; the paper's total).

NNX model (``DCAL``)
--------------------
``DCAL(blocks, dim=, num_classes=, make_block=)`` wraps L pre-norm blocks (``x + proj(attn(LN1 x))``,
``x + MLP(LN2 x)``). A block is anything with ``norm1``, ``norm2``, ``mlp`` and an attention submodule at ``attn``
or ``mixer`` that has ``qkv`` (``dim -> 3 dim``), ``proj`` and ``heads`` (or ``num_heads``); ``DCALBlock`` is
one, and so is ``train.vision_modules.TokenBlock("vit", ...)``. It prepends a learned CLS token to ``[B, N, dim]``
tokens and runs up to three branches:

* SA (always): the L blocks; classifier ``head(norm(x_L[:, 0]))``.
* GLCA (M = 1 block, its own weights from ``make_block``, its own norm and classifier): parallel to the LAST SA
  block. Rollout over all L SA maps (``stop_gradient``), CLS + top-R patch queries of the GLCA block's own
  projection of ``x_{L-1}`` (the last SA block's input), global K/V from the same projection; residual on the
  selected rows of ``x_{L-1}``, then its MLP; classifier on the GLCA output's CLS row.
* PWCA (T = L blocks, training only, weights shared with SA, including norm and classifier): the target stream
  ``x1`` runs every block with ``pwca``; the distractor's ``K2, V2`` at block l are the SA stream's keys and
  values of the partner image (``partner[b]``, default the next image of the batch, ``roll(-1)``) at that block,
  computed with the same (shared) weights. Only the target's loss is used (the PWCA target is image 1's label).

Training loss ``dcal_loss``: uncertainty-weighted sum over the active branches (``w`` learnable, init 0); a model
with only SA uses plain cross-entropy (the baseline). Inference (``train=False``; ``__call__``): SA + GLCA, scores
``log(softmax(z_SA) + softmax(z_GLCA))`` (argmax = the paper's "add class probabilities"); PWCA is never run.

Deliberate choices where the paper is silent (documented, not verified against official code): the GLCA query set
keeps the CLS query (the paper concatenates "two final class tokens of SA and GLCA" for Re-ID, so GLCA has one)
and the GLCA classifier reads it; GLCA sits parallel to the last SA block; the distractor's K/V come from its SA
stream (the paper: "query, key and value vectors are separately computed for both images").
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import jattn
from jattn.core.reference import HIGHEST, reference_attention

__all__ = ["attention_rollout", "num_selected", "top_r_indices", "glca_select", "glca", "pwca",
           "uncertainty_weighted_loss", "DCALAttention", "DCALBlock", "DCAL", "dcal_loss", "BRANCHES"]

BRANCHES = ("sa", "glca", "pwca")


def _is_float_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"ratio must be a float in (0, 1], got {ratio!r}")
    return float(ratio)


# ------------------------------------------------------------------------------------------------ rollout
def attention_rollout(attn_list: Sequence, alpha: float = 0.5):
    """``S_bar_L @ ... @ S_bar_1`` with ``S_bar_l = alpha * mean_heads(S_l) + (1 - alpha) I``: ``[B, N, N]`` f32.

    ``attn_list``: per-layer attention probabilities, first layer first, each ``[B, H, N, N]`` (or ``[B, N, N]``,
    already head-averaged)."""
    if isinstance(attn_list, (str, bytes)) or not isinstance(attn_list, (list, tuple)) or not attn_list:
        raise ValueError(f"attn_list must be a non-empty list of [B, H, N, N] maps, got {type(attn_list).__name__}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
    maps = []
    for i, s in enumerate(attn_list):
        if not _is_float_array(s) or s.ndim not in (3, 4) or s.shape[-1] != s.shape[-2]:
            raise ValueError(f"attn_list[{i}] must be a float [B, H, N, N] or [B, N, N] map, got "
                             f"{getattr(s, 'shape', type(s).__name__)}")
        s = s.astype(jnp.float32)
        maps.append(jnp.mean(s, axis=1) if s.ndim == 4 else s)
    if len({m.shape for m in maps}) != 1:
        raise ValueError(f"attn_list maps must share [B, N, N] after head averaging, got {[m.shape for m in maps]}")
    eye = jnp.eye(maps[0].shape[-1], dtype=jnp.float32)
    out = None
    for m in maps:
        bar = alpha * m + (1.0 - alpha) * eye
        out = bar if out is None else jnp.einsum("bij,bjk->bik", bar, out, precision=HIGHEST)
    return out


# ---------------------------------------------------------------------------------------------- selection
def num_selected(n: int, ratio: float) -> int:
    """``R = max(1, floor(n * ratio))`` (the paper's "top R% tokens"; 10% of 784 -> 78)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return max(1, int(math.floor(n * _check_ratio(ratio) + 1e-9)))


def top_r_indices(response, r: int):
    """Indices ``[B, r]`` (int32) of the ``r`` largest entries of ``response [B, N]``, largest first."""
    if not _is_float_array(response) or response.ndim != 2:
        raise ValueError(f"response must be a float [B, N] array, got {getattr(response, 'shape', response)!r}")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= response.shape[1]:
        raise ValueError(f"r must be an int in [1, N={response.shape[1]}], got {r!r}")
    return jax.lax.top_k(response, r)[1].astype(jnp.int32)


def glca_select(rollout_cls, ratio: float):
    """``[B, 1 + R]`` int32: CLS (0) then the top ``R = num_selected(N - 1, ratio)`` patches of ``rollout_cls``
    ``[B, N]`` (the CLS row of the rollout; column 0 is CLS itself and is not ranked)."""
    if not _is_float_array(rollout_cls) or rollout_cls.ndim != 2 or rollout_cls.shape[1] < 2:
        raise ValueError(f"rollout_cls must be a float [B, N] array with N >= 2 (CLS + patches), got "
                         f"{getattr(rollout_cls, 'shape', rollout_cls)!r}")
    B, N = rollout_cls.shape
    top = top_r_indices(rollout_cls[:, 1:], num_selected(N - 1, ratio)) + 1
    return jnp.concatenate([jnp.zeros((B, 1), jnp.int32), top], axis=1)


def _gather_tokens(x, index):
    """``x [B, N, ...]`` rows ``index [B, R]`` -> ``[B, R, ...]``."""
    return jax.vmap(lambda xb, ib: xb[ib])(x, index)


# -------------------------------------------------------------------------------------------- attentions
def glca(q, k, v, rollout_cls, ratio: float, *, scale: float | None = None, impl: str = "auto"):
    """Global-local cross-attention: ``softmax(Q^l K^T scale) V`` for the CLS + top-R queries.

    ``q, k, v``: ``[B, N, H, D]`` (token 0 = CLS); ``rollout_cls``: ``[B, N]``. Returns ``(out [B, 1+R, H, D],
    index [B, 1+R])``; ``out[:, j]`` is the attention output of query ``index[:, j]`` over all N keys."""
    if not _is_float_array(q) or q.ndim != 4:
        raise ValueError(f"q must be a float [B, N, H, D] array, got {getattr(q, 'shape', q)!r}")
    if not _is_float_array(rollout_cls) or rollout_cls.shape != q.shape[:2]:
        raise ValueError(f"rollout_cls must be a float [B, N] = {q.shape[:2]} array, got "
                         f"{getattr(rollout_cls, 'shape', rollout_cls)!r}")
    index = glca_select(rollout_cls, ratio)
    return jattn.attention(_gather_tokens(q, index), k, v, scale=scale, impl=impl), index


def pwca(q1, k1, v1, k2, v2, *, scale: float | None = None, impl: str = "auto"):
    """Pair-wise cross-attention ``softmax(Q1 [K1; K2]^T scale) [V1; V2]``: one joint softmax over the image's
    own ``S1`` keys and the distractor's ``S2`` keys. ``q1 [B, T, H, D]``, ``k1, v1 [B, S1, Hkv, D]``,
    ``k2, v2 [B, S2, Hkv, D]`` -> ``[B, T, H, D]``."""
    for name, a, b in (("k2", k1, k2), ("v2", v1, v2)):
        if not _is_float_array(b) or not _is_float_array(a) or b.ndim != 4 or a.ndim != 4 or (
                b.shape[0], b.shape[2:]) != (a.shape[0], a.shape[2:]):
            raise ValueError(f"{name} must be a float [B, S2, Hkv, D] array matching {name[0]}1's B, Hkv, D "
                             f"{getattr(a, 'shape', a)!r}, got {getattr(b, 'shape', b)!r}")
    if k2.shape[1] != v2.shape[1]:
        raise ValueError(f"k2 and v2 must have the same length S2, got {k2.shape} and {v2.shape}")
    k = jnp.concatenate([k1, k2.astype(k1.dtype)], axis=1)
    v = jnp.concatenate([v1, v2.astype(v1.dtype)], axis=1)
    return jattn.attention(q1, k, v, scale=scale, impl=impl)


def uncertainty_weighted_loss(losses, w):
    """``0.5 * sum_i (exp(-w_i) L_i + w_i)`` for scalar ``losses`` (a sequence or ``[n]``) and ``w [n]``."""
    losses = jnp.stack([jnp.asarray(l, jnp.float32) for l in losses]) if isinstance(losses, (list, tuple)) \
        else jnp.asarray(losses, jnp.float32)
    if losses.ndim != 1 or not _is_float_array(w) or w.shape != losses.shape:
        raise ValueError(f"losses must be n scalars and w a float [n] array, got losses {losses.shape} and w "
                         f"{getattr(w, 'shape', w)!r}")
    w = w.astype(jnp.float32)
    return 0.5 * jnp.sum(jnp.exp(-w) * losses + w)


# --------------------------------------------------------------------------------------------- NNX layers
class DCALAttention(nnx.Module):
    """Multi-head attention parameters (``qkv: dim -> 3 dim``, ``proj: dim -> dim``); the math is in ``DCAL``."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        if isinstance(dim, bool) or not isinstance(dim, int) or isinstance(heads, bool) or not isinstance(
                heads, int) or heads < 1 or dim < 1 or dim % heads:
            raise ValueError(f"heads must be an int >= 1 dividing dim, got dim={dim!r}, heads={heads!r}")
        self.heads = heads
        self.qkv, self.proj = nnx.Linear(dim, 3 * dim, rngs=rngs), nnx.Linear(dim, dim, rngs=rngs)


class _MLP(nnx.Module):
    def __init__(self, dim, hidden, *, rngs):
        self.fc1, self.fc2 = nnx.Linear(dim, hidden, rngs=rngs), nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class DCALBlock(nnx.Module):
    """Pre-norm transformer block parameters: ``norm1``, ``attn`` (``DCALAttention``), ``norm2``, ``mlp``."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
        self.attn = DCALAttention(dim, heads, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
        self.mlp = _MLP(dim, mlp_hidden, rngs=rngs)


def _attn_of(block):
    att = getattr(block, "attn", None) or getattr(block, "mixer", None)
    heads = getattr(att, "heads", None) or getattr(att, "num_heads", None)
    if att is None or not hasattr(att, "qkv") or not hasattr(att, "proj") or not heads or not all(
            hasattr(block, n) for n in ("norm1", "norm2", "mlp")):
        raise TypeError(f"block must have norm1, norm2, mlp and an attention (attn or mixer) with qkv, proj and "
                        f"heads; got {type(block).__name__}")
    return att, heads


def block_qkv(block, x):
    """``q, k, v [B, N, H, D]`` of a block on its input ``x [B, N, dim]`` (pre-norm projection)."""
    att, heads = _attn_of(block)
    B, N, dim = x.shape
    return tuple(t.reshape(B, N, heads, dim // heads) for t in jnp.split(att.qkv(block.norm1(x)), 3, axis=-1))


def block_finish(block, x, o):
    """``x + proj(o)`` then ``+ MLP(LN2 .)``: the rest of a pre-norm block after its attention output ``o``."""
    att, _ = _attn_of(block)
    x = x + att.proj(o.reshape(*o.shape[:2], -1))
    return x + block.mlp(block.norm2(x))


class DCAL(nnx.Module):
    """SA + GLCA (+ PWCA when training) around ``blocks`` (module docstring). Input: tokens ``[B, N, dim]``
    (patch embeddings with positions, no CLS)."""

    def __init__(self, blocks, *, dim: int, num_classes: int, make_block: Callable | None = None,
                 branches: Sequence[str] = BRANCHES, glca_ratio: float = 0.1, norm=None, head=None,
                 rngs: nnx.Rngs):
        branches = tuple(branches)
        if "sa" not in branches or not set(branches) <= set(BRANCHES) or len(set(branches)) != len(branches):
            raise ValueError(f"branches must be distinct names from {BRANCHES} including 'sa', got {branches!r}")
        self.branches = tuple(b for b in BRANCHES if b in branches)
        self.glca_ratio = _check_ratio(glca_ratio)
        blocks = list(blocks)
        if not blocks:
            raise ValueError("blocks must be a non-empty sequence of pre-norm blocks")
        for b in blocks:
            _attn_of(b)
        self.blocks = blocks if isinstance(blocks, nnx.List) else nnx.List(blocks)
        self.cls = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, dim), jnp.float32))
        self.norm = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs) if norm is None else norm
        self.head = nnx.Linear(dim, num_classes, rngs=rngs) if head is None else head
        if "glca" in self.branches:
            if make_block is None:
                raise ValueError("make_block (rngs -> a new block) is required when 'glca' is in branches")
            self.glca_block = make_block(rngs)
            _attn_of(self.glca_block)
            self.glca_norm = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
            self.glca_head = nnx.Linear(dim, num_classes, rngs=rngs)
        self.loss_w = nnx.Param(jnp.zeros((len(self.branches),), jnp.float32))

    # -- branches
    def _with_cls(self, tokens):
        if not _is_float_array(tokens) or tokens.ndim != 3 or tokens.shape[-1] != self.cls.shape[-1]:
            raise ValueError(f"tokens must be a float [B, N, dim={self.cls.shape[-1]}] array, got "
                             f"{getattr(tokens, 'shape', tokens)!r}")
        cls = jnp.broadcast_to(self.cls[...].astype(tokens.dtype), (tokens.shape[0], 1, tokens.shape[-1]))
        return jnp.concatenate([cls, tokens], axis=1)

    def sa_stream(self, x, *, need_probs: bool):
        """SA over ``x [B, N+1, dim]``: ``(x_L, inputs [x_0..x_{L-1}], kvs [(k, v) per block], probs or None)``."""
        inputs, kvs, probs = [], [], []
        for block in self.blocks:
            q, k, v = block_qkv(block, x)
            inputs.append(x)
            kvs.append((k, v))
            if need_probs:
                o, p = reference_attention(q, k, v, return_probs=True)
                probs.append(p)
            else:
                o = jattn.attention(q, k, v)
            x = block_finish(block, x, o)
        return x, inputs, kvs, (probs if need_probs else None)

    def glca_branch(self, x_in, probs):
        """GLCA block on ``x_in`` (the last SA block's input) with the rollout of ``probs``: CLS-row output
        ``[B, dim]`` and the selected indices ``[B, 1+R]``."""
        rollout = jax.lax.stop_gradient(attention_rollout(probs))
        q, k, v = block_qkv(self.glca_block, x_in)
        o, index = glca(q, k, v, rollout[:, 0, :], self.glca_ratio)
        y = block_finish(self.glca_block, _gather_tokens(x_in, index), o)
        return y[:, 0], index

    def pwca_branch(self, x, kvs, partner):
        """PWCA target stream from ``x [B, N+1, dim]``; the distractor K/V of block l are ``kvs[l]`` rows
        ``partner``. Returns the final CLS features ``[B, dim]`` (before the shared norm)."""
        for block, (k_sa, v_sa) in zip(self.blocks, kvs):
            q1, k1, v1 = block_qkv(block, x)
            x = block_finish(block, x, pwca(q1, k1, v1, k_sa[partner], v_sa[partner]))
        return x[:, 0]

    def branch_logits(self, tokens, *, train: bool, partner=None) -> dict:
        """``{"sa": [B, C], "glca": [B, C] (if enabled), "pwca": [B, C] (if enabled and train)}``."""
        x0 = self._with_cls(tokens)
        B = x0.shape[0]
        use_glca, use_pwca = "glca" in self.branches, train and "pwca" in self.branches
        if use_pwca:
            partner = jnp.roll(jnp.arange(B), -1) if partner is None else jnp.asarray(partner)
            if partner.shape != (B,) or not jnp.issubdtype(partner.dtype, jnp.integer):
                raise ValueError(f"partner must be an int [B={B}] index array, got {partner.shape} {partner.dtype}")
        xL, inputs, kvs, probs = self.sa_stream(x0, need_probs=use_glca)
        out = {"sa": self.head(self.norm(xL[:, 0]))}
        if use_glca:
            feat, _ = self.glca_branch(inputs[-1], probs)
            out["glca"] = self.glca_head(self.glca_norm(feat))
        if use_pwca:
            out["pwca"] = self.head(self.norm(self.pwca_branch(x0, kvs, partner)))
        return out

    def glca_indices(self, tokens):
        """The GLCA selection ``[B, 1+R]`` (CLS first) of the trained model on ``tokens``."""
        x0 = self._with_cls(tokens)
        _, inputs, _, probs = self.sa_stream(x0, need_probs=True)
        return glca_select(attention_rollout(probs)[:, 0, :], self.glca_ratio)

    def __call__(self, tokens):
        """Inference scores ``[B, C]``: SA logits, or ``log(softmax(SA) + softmax(GLCA))``; PWCA never runs."""
        logits = self.branch_logits(tokens, train=False)
        if "glca" not in logits:
            return logits["sa"]
        return jnp.log(jax.nn.softmax(logits["sa"]) + jax.nn.softmax(logits["glca"]))


def dcal_loss(model: DCAL, logits: dict, labels):
    """Training loss: plain cross-entropy for an SA-only model, else ``uncertainty_weighted_loss`` over the
    branches in ``logits`` (order ``BRANCHES``) with ``model.loss_w``. Returns ``(loss, {branch: CE})``."""
    import optax
    ce = {name: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean() for name, z in logits.items()}
    names = [b for b in model.branches if b in ce]
    if names == ["sa"]:
        return ce["sa"], ce
    w = jnp.stack([model.loss_w[...][model.branches.index(n)] for n in names])
    return uncertainty_weighted_loss([ce[n] for n in names], w), ce
