"""P33 — AnchorAttention: Difference-Aware Sparse Attention with Stripe Granularity.

A dynamic selector for causal prefill (``T == S``). Queries are pooled in sub-blocks of ``block_size``
(paper ``B = 128``) queries; ``step`` (paper ``S = 16``) sub-blocks form a *big block* of ``G = block_size *
step`` (2048) queries; big block ``g`` holds queries ``[g G, min((g + 1) G, T))``, ``nG = ceil(T / G)``.
``scale = D ** -0.5``; GQA query head ``h`` reads kv head ``h // (H // Hkv)``. Per (batch, query head):

1. Anchor. Query ``t`` in big block ``g`` computes exact causal softmax statistics over its *anchor keys*
   ``j <= t`` with ``j < init_blocks G`` (the initial big blocks) or ``j >= (g - local_blocks + 1) G`` (its
   own and the previous ``local_blocks - 1`` big blocks): ``m_t = max_j scale q_t . k_j`` (the anchor, an
   approximate row max, natural-log units), ``l_t = sum_j exp(scale q_t . k_j - m_t)`` and
   ``acc_t = sum_j exp(...) v_j`` (``anchor_stats``).
2. Difference-aware stripe identification, per big block ``g``: each sub-block ``s`` of ``g`` pools
   ``q_bar_s = mean(q_t)`` and ``a_bar_s = mean(m_t)`` over its real queries. A key ``j`` among the
   *candidates* ``[init_blocks G, (g - local_blocks + 1) G)`` (causal keys outside init and local) is selected
   for the whole big block iff some sub-block has ``scale q_bar_s . k_j + theta >= a_bar_s``: its estimated
   logit comes within ``theta`` of the anchor. This yields a token-granular stripe set per big block
   (``anchor_select``: a bitmask ``[B, H, nG, T]`` plus compacted ascending indices and counts).
3. Sparse computation: each query attends its anchor keys and its big block's selected stripe keys.

Stripes as a ``BlockMask`` (the choice made here). Tiles are ``block_q x block_k`` with ``block_q`` and
``block_k`` dividing ``G``, so each query tile lies in one big block and each key tile lies wholly inside or
outside the init/local/candidate ranges. A tile ``(i, c)`` is listed iff it holds at least one element of the
token rule above (``visible(t, j) = j <= t and (anchor key or j in stripes[g(t)])``): causal init/local tiles
and every candidate tile containing a selected key. This is the minimal tile cover of the token rule
(``tests/methods/dynamic/test_anchor.py`` proves both directions). Two granularities run on it:

* ``granularity="tile"`` (default; pure and jit-able): every element of a listed tile is visible, so a
  query also sees the unselected keys that share a tile with a selected stripe key (a superset of the
  token rule: never less exact against dense attention);
* ``granularity="token"`` (the paper's exact stripe rule): the same tiles carry ``anchor_stripe_mask_fn``,
  the element rule, so the kernel computes exactly the token-granular attention. The mask function closes
  over the concrete bitmask, so this path needs concrete (not traced) q and k: it is for eager use,
  tests and analysis, and raises under ``jit``.

Defaults (paper/authors' code): ``theta = 12``, ``block_size = 128``, ``step = 16``, one init and one local
big block, tiles ``block_q = block_k = 128``.

Official-code readings (the authors' Triton file: ``get_mask_fused_anchor_triton``, ``get_q_mask_triton``,
``_triton_stripe_sparse_attn_fwd_kernel_step3``; repository name unresolved, so unverified): the anchor
runs in log2 units (``q * sm_scale * log2 e``) and ``theta`` is added to the log2-unit pooled logit; jattn
works in natural-log units with ``theta`` in natural-log units (the spec's reading: the code multiplies
``theta`` by ``log2 e``). The pooled query is the plain mean of the sub-block's queries and the pooled anchor
the plain mean of their ``m``.

Deliberate deviations:

* Candidate range: the official scan covers keys ``[B, g G - B)``; it overlaps the init region (keys
  ``B .. G - 1`` may be counted twice, once as init and once as a stripe) and skips ``[g G - B, g G)``.
  jattn uses the clean candidates ``[init_blocks G, (g - local_blocks + 1) G)``: disjoint from the anchor
  keys, so ``theta = +inf`` is exactly dense causal attention (spec recommendation; intent unverified).
* ``T`` need not be a multiple of ``G``: the last big block and its last sub-block may be short (pooling
  uses their real queries only; an empty sub-block does not vote).
* Cost: the anchor pass reads ``(init_blocks + local_blocks) G`` keys per query (``lax.map`` over query
  steps), the stripe pass ``O(T^2 D / block_size)`` pooled logits; both in plain jnp (no fused kernel).
* The sparse pass is the shared block-sparse kernel over tiles (fresh online softmax), not the official
  gather kernel continuing from the anchor's ``(m, l, acc)``; the result is the same attention.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.ops.block_sparse import block_sparse_attention

HIGHEST = jax.lax.Precision.HIGHEST

__all__ = ["anchor_attention", "anchor_block_mask", "anchor_select", "anchor_stats", "anchor_tile_map",
           "anchor_stripe_mask_fn"]


# ---------------------------------------------------------------------------------------- validation

def _check_qk(q, k, who: str = "AnchorAttention"):
    B, T, H, Hkv, D = checks.check_self_attention_qk(q, k, who)
    return B, T, H, Hkv, D


def _check_pooling(block_size, step, init_blocks, local_blocks) -> int:
    """Validates the pooling geometry; returns the big block ``G = block_size * step``."""
    block_size = checks.check_int("block_size", block_size, 1)
    step = checks.check_int("step", step, 1)
    checks.check_int("init_blocks", init_blocks, 0)
    checks.check_int("local_blocks", local_blocks, 1)
    return block_size * step


def _check_theta(theta) -> float:
    if isinstance(theta, bool) or not isinstance(theta, (int, float, np.floating, np.integer)):
        raise TypeError(f"theta must be a real number (natural-log units; +-inf allowed), got {theta!r}")
    if math.isnan(float(theta)):
        raise ValueError(f"theta must not be NaN (use +inf for dense, -inf for anchors only), got {theta!r}")
    return float(theta)


def _check_tiles(block_q, block_k, G: int) -> None:
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        checks.check_int(name, value, 1)
        if G % value:
            raise ValueError(f"{name}={value} must divide the big block block_size * step = {G} (tiles may not "
                             f"straddle a big block)")


# ---------------------------------------------------------------------------------------- pure pieces

def _grouped_logits(q_rows, keys):
    """``q_rows [B, n, H, D]`` . ``keys [B, S, Hkv, D]`` -> ``[B, H, n, S]`` (GQA)."""
    B, n, H, D = q_rows.shape
    Hkv = keys.shape[2]
    out = jnp.einsum("bnkgd,bskd->bkgns", q_rows.reshape(B, n, Hkv, H // Hkv, D), keys, precision=HIGHEST)
    return out.reshape(B, H, n, keys.shape[1])


def anchor_stats(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"] | None = None,
                 *, block_size: int = 128, step: int = 16, init_blocks: int = 1, local_blocks: int = 1,
                 rows_per_step: int = 128):
    """Step 1: exact softmax statistics of every query over its anchor keys (init + local, causal).

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      v: ``[B, T, Hkv, D]`` or None (then ``acc`` is None).
      block_size: queries per pooling sub-block.
      step: sub-blocks per big block.
      init_blocks: initial big blocks every query sees.
      local_blocks: big blocks (its own included) of recent keys every query sees.
      rows_per_step: query rows per ``lax.map`` step (its gcd with ``G``, so a step stays in one big block).

    Returns:
      ``(m [B, H, T], l [B, H, T], acc [B, H, T, D] or None)`` float32: ``m`` the anchor (max scaled logit,
      natural-log units), ``l = sum exp(s - m)``, ``acc = sum exp(s - m) v``.
    """
    B, T, H, Hkv, D = _check_qk(q, k)
    G = _check_pooling(block_size, step, init_blocks, local_blocks)
    rows_per_step = math.gcd(checks.check_int("rows_per_step", rows_per_step, 1), G)  # one big block per step
    n = -(-T // rows_per_step)
    q_pad = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, n * rows_per_step - T), (0, 0), (0, 0)))
    # Each step reads the init keys [0, init G) and a window of local_blocks * G keys: O(T (init + local) G).
    init_width, local_width = init_blocks * G, local_blocks * G
    kv_pad = ((0, 0), (0, max(0, init_width - T) + local_width), (0, 0), (0, 0))
    kf = jnp.pad(k.astype(jnp.float32), kv_pad)
    vf = None if v is None else jnp.pad(v.astype(jnp.float32), kv_pad)
    scale = D ** -0.5

    def window(x, start):
        return jnp.concatenate([x[:, :init_width], jax.lax.dynamic_slice_in_dim(x, start, local_width, 1)], 1)

    def one_step(i):
        rows = i * rows_per_step + jnp.arange(rows_per_step)
        local_start = jnp.maximum((i * rows_per_step // G - local_blocks + 1) * G, 0)
        positions = jnp.concatenate([jnp.arange(init_width), local_start + jnp.arange(local_width)])
        in_anchor = jnp.concatenate([jnp.ones(init_width, bool), local_start + jnp.arange(local_width) >= init_width])
        anchor = in_anchor[None, :] & (positions[None, :] <= rows[:, None]) & (positions < T)[None, :]
        q_rows = jax.lax.dynamic_slice_in_dim(q_pad, i * rows_per_step, rows_per_step, 1)
        s = scale * _grouped_logits(q_rows, window(kf, local_start))
        m = jnp.max(jnp.where(anchor, s, -jnp.inf), axis=-1)
        p = jnp.where(anchor, jnp.exp(s - m[..., None]), 0.0)
        acc = None
        if vf is not None:
            width = init_width + local_width
            acc = jnp.einsum("bkgns,bskd->bkgnd", p.reshape(B, Hkv, H // Hkv, rows_per_step, width),
                             window(vf, local_start), precision=HIGHEST).reshape(B, H, rows_per_step, D)
        return m, jnp.sum(p, axis=-1), acc

    m, l, acc = jax.lax.map(one_step, jnp.arange(n))
    flat = lambda x: jnp.moveaxis(x, 0, 2).reshape(B, H, n * rows_per_step, *x.shape[4:])[:, :, :T]
    return flat(m), flat(l), (None if acc is None else flat(acc))


def _pooled_mean(x, block_size: int, T: int):
    """Mean over consecutive groups of ``block_size`` along axis 1 (real entries only): ``[B, T, ...]`` ->
    ``[B, nSub, ...]``."""
    n = -(-T // block_size)
    xp = jnp.pad(x, ((0, 0), (0, n * block_size - T)) + ((0, 0),) * (x.ndim - 2))
    sizes = jnp.minimum(block_size, T - jnp.arange(n) * block_size).astype(jnp.float32)
    return xp.reshape(x.shape[0], n, block_size, *x.shape[2:]).sum(2) / sizes.reshape((1, n) + (1,) * (x.ndim - 2))


def anchor_select(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], anchors: Float[Array, "B H T"], *,
                  theta: float = 12.0, block_size: int = 128, step: int = 16, init_blocks: int = 1,
                  local_blocks: int = 1
                  ) -> tuple[Bool[Array, "B H nG T"], Int[Array, "B H nG T"], Int[Array, "B H nG"]]:
    """Step 2: the stripe keys of every big block, from pooled queries and pooled anchors.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      anchors: ``[B, H, T]`` the anchor ``m`` of each query (``anchor_stats``).
      theta: the difference margin (natural-log units); ``+inf`` selects every candidate, ``-inf`` none.
      block_size: queries per pooling sub-block.
      step: sub-blocks per big block.
      init_blocks: initial big blocks (never candidates).
      local_blocks: big blocks of recent keys (never candidates).

    Returns:
      ``(selected [B, H, nG, T] bool, indices [B, H, nG, T] int32, counts [B, H, nG] int32)``: the bitmask of
      selected keys per big block, the same keys compacted in ascending order (then padded with -1) and
      their number.
    """
    B, T, H, Hkv, D = _check_qk(q, k)
    G = _check_pooling(block_size, step, init_blocks, local_blocks)
    theta = _check_theta(theta)
    checks.check_float_array("anchors", anchors, 3)
    if tuple(anchors.shape) != (B, H, T):
        raise ValueError(f"anchors must have shape [B, H, T] = {(B, H, T)}, got {checks.describe(anchors)}")
    nG, n_sub = -(-T // G), -(-T // block_size)
    q_bar = _pooled_mean(q.astype(jnp.float32), block_size, T)                 # [B, nSub, H, D]
    a_bar = jnp.moveaxis(_pooled_mean(jnp.moveaxis(anchors.astype(jnp.float32), 2, 1), block_size, T), 1, 2)
    pooled = (D ** -0.5) * _grouped_logits(q_bar, k.astype(jnp.float32))      # [B, H, nSub, T]
    votes = pooled + theta >= a_bar[..., None]
    votes = jnp.pad(votes, ((0, 0), (0, 0), (0, nG * step - n_sub), (0, 0)))   # empty sub-blocks do not vote
    hits = votes.reshape(B, H, nG, step, T).any(axis=3)
    keys = jnp.arange(T)
    local_start = (jnp.arange(nG) - local_blocks + 1) * G                      # [nG]
    candidate = (keys[None, :] >= init_blocks * G) & (keys[None, :] < local_start[:, None])
    selected = hits & candidate
    indices = jnp.sort(jnp.where(selected, keys, T), axis=-1)
    return selected, jnp.where(indices < T, indices, -1).astype(jnp.int32), selected.sum(-1, dtype=jnp.int32)


def anchor_tile_map(selected: Bool[Array, "B H nG T"], *, T: int, block_q: int, block_k: int, block_size: int = 128,
                    step: int = 16, init_blocks: int = 1, local_blocks: int = 1) -> Bool[Array, "B H nQ nK"]:
    """The minimal tile cover of the token rule: causal init/local tiles plus tiles holding a selected key.

    Args:
      selected: ``[B, H, nG, T]`` stripe bitmask (``anchor_select``).
      T: sequence length.
      block_q: queries per tile (divides ``G``).
      block_k: keys per tile (divides ``G``).
      block_size, step, init_blocks, local_blocks: as ``anchor_select``.

    Returns:
      ``[B, H, nQ, nK]`` bool.
    """
    G = _check_pooling(block_size, step, init_blocks, local_blocks)
    _check_tiles(block_q, block_k, G)
    B, H = selected.shape[:2]
    nQ, nK = -(-T // block_q), -(-T // block_k)
    stripe_tiles = jnp.pad(selected, ((0, 0), (0, 0), (0, 0), (0, nK * block_k - T))).reshape(
        B, H, selected.shape[2], nK, block_k).any(-1)                          # [B, H, nG, nK]
    q_first = np.arange(nQ) * block_q
    q_last = np.minimum(q_first + block_q, T) - 1
    big = q_first // G
    k_first = np.arange(nK) * block_k
    causal = k_first[None, :] <= q_last[:, None]
    anchor = (k_first[None, :] < init_blocks * G) | (k_first[None, :] >= ((big - local_blocks + 1) * G)[:, None])
    return (jnp.asarray(causal & anchor) | jnp.take(stripe_tiles, jnp.asarray(big), axis=2)) & jnp.asarray(causal)


class _StripeMask:
    """``mask_fn(b, h, q_idx, kv_idx)``: the token rule over a concrete stripe bitmask (hashable by identity)."""

    def __init__(self, selected: np.ndarray, G: int, init_blocks: int, local_blocks: int):
        self.selected, self.G, self.init_blocks, self.local_blocks = selected, G, init_blocks, local_blocks

    def __repr__(self) -> str:
        return (f"anchor_stripe_mask_fn(selected{list(self.selected.shape)}, G={self.G}, "
                f"init_blocks={self.init_blocks}, local_blocks={self.local_blocks})")

    def __call__(self, b, h, q_idx, kv_idx):
        selected = jnp.asarray(self.selected)
        T = selected.shape[-1]
        big = jnp.clip(q_idx, 0, T - 1) // self.G
        kv = jnp.clip(kv_idx, 0, T - 1)
        anchor = (kv < self.init_blocks * self.G) | (kv >= (big - self.local_blocks + 1) * self.G)
        return anchor | selected[b, h, big, kv]


def anchor_stripe_mask_fn(selected, *, block_size: int = 128, step: int = 16, init_blocks: int = 1,
                          local_blocks: int = 1):
    """The element rule ``anchor key or j in stripes[g(t)]`` as a ``mask_fn`` (the causal cut is the kernel's).

    Args:
      selected: concrete ``[B, H, nG, T]`` stripe bitmask (``anchor_select``); not a tracer.
      block_size, step, init_blocks, local_blocks: as ``anchor_select``.

    Returns:
      A hashable ``mask_fn(b, h, q_idx, kv_idx) -> bool`` for ``BlockMask.with_mask_fn`` /
      ``block_sparse_attention`` (``impl="xla"`` or ``"reference"``: it reads a captured array).

    Raises:
      TypeError: ``selected`` is traced (under ``jit``).
    """
    if checks.is_traced(selected):
        raise TypeError("selected must be concrete for granularity='token' (the mask function captures it); "
                        "call anchor_attention(..., granularity='token') outside jax.jit, or use "
                        "granularity='tile' under jit")
    G = _check_pooling(block_size, step, init_blocks, local_blocks)
    return _StripeMask(np.asarray(selected, bool), G, init_blocks, local_blocks)


# ---------------------------------------------------------------------------------------- selector

@functools.partial(jax.jit, static_argnames=("theta", "block_q", "block_k", "block_size", "step", "init_blocks",
                                             "local_blocks"))
def _select_tiles(q, k, *, theta, block_q, block_k, block_size, step, init_blocks, local_blocks):
    """Steps 1-2 and the tile cover, compiled as one program (inlined under an outer ``jit``)."""
    pooling = dict(block_size=block_size, step=step, init_blocks=init_blocks, local_blocks=local_blocks)
    m, _, _ = anchor_stats(q, k, **pooling, rows_per_step=block_q)
    selection = anchor_select(q, k, m, theta=theta, **pooling)
    return selection, anchor_tile_map(selection[0], T=q.shape[1], block_q=block_q, block_k=block_k, **pooling)


def anchor_block_mask(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], *, theta: float = 12.0,
                      block_size: int = 128, step: int = 16, init_blocks: int = 1, local_blocks: int = 1,
                      block_q: int = 128, block_k: int = 128, granularity: str = "tile",
                      return_selection: bool = False):
    """AnchorAttention's ``BlockMask`` ``[B, H, nQ, nK]`` (run it with ``causal=True``).

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]`` (GQA: H a multiple of Hkv).
      theta: difference margin (natural-log units; ``+inf`` dense, ``-inf`` anchors only).
      block_size: queries per pooling sub-block (paper 128).
      step: sub-blocks per big block (paper 16).
      init_blocks: initial big blocks every query sees (>= 0).
      local_blocks: big blocks of recent keys every query sees (>= 1; its own big block included).
      block_q: queries per kernel tile (divides ``block_size * step``).
      block_k: keys per kernel tile (divides ``block_size * step``).
      granularity: ``"tile"`` (listed tiles fully visible; jit-able) or ``"token"`` (the tiles carry the
        exact stripe ``mask_fn``; needs concrete q and k).
      return_selection: also return ``(selected, indices, counts)`` from ``anchor_select``.

    Returns:
      A ``BlockMask`` (and the selection with ``return_selection``).

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: an argument is out of range or the shapes disagree (the message names it).
    """
    _check_qk(q, k)
    G = _check_pooling(block_size, step, init_blocks, local_blocks)
    _check_theta(theta)
    _check_tiles(block_q, block_k, G)
    checks.check_choice("granularity", granularity, ("tile", "token"))
    checks.check_bool("return_selection", return_selection)
    pooling = dict(block_size=block_size, step=step, init_blocks=init_blocks, local_blocks=local_blocks)
    if granularity == "token" and checks.is_traced((q, k)):
        anchor_stripe_mask_fn(q, **pooling)                                    # raises the explanatory error
    T = q.shape[1]
    selection, tiles = _select_tiles(q, k, theta=theta, block_q=block_q, block_k=block_k, **pooling)
    mask_fn = anchor_stripe_mask_fn(selection[0], **pooling) if granularity == "token" else None
    bm = BlockMask.from_dense_block_map(tiles, block_q=block_q, block_k=block_k, seq_q=T, seq_k=T, mask_fn=mask_fn)
    return (bm, selection) if return_selection else bm


def anchor_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"], *,
                     theta: float = 12.0, block_size: int = 128, step: int = 16, init_blocks: int = 1,
                     local_blocks: int = 1, block_q: int = 128, block_k: int = 128, granularity: str = "tile",
                     scale: float | None = None, impl: str = "auto") -> Float[Array, "B T H D"]:
    """AnchorAttention causal prefill: ``anchor_block_mask`` then ``jattn.block_sparse_attention(..., causal=True)``.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      v: ``[B, T, Hkv, D]``.
      theta, block_size, step, init_blocks, local_blocks, block_q, block_k, granularity: as
        ``anchor_block_mask`` (``granularity="token"`` needs concrete inputs and ``impl`` "xla"/"reference").
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
    bm = anchor_block_mask(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), theta=theta, block_size=block_size,
                           step=step, init_blocks=init_blocks, local_blocks=local_blocks, block_q=block_q,
                           block_k=block_k, granularity=granularity)
    if granularity == "token":  # eager by construction: compile the kernel call rather than run it op by op
        return _compiled_block_sparse(q, k, v, bm, causal=True, scale=scale, impl=impl)
    return block_sparse_attention(q, k, v, bm, causal=True, scale=scale, impl=impl)


_compiled_block_sparse = jax.jit(block_sparse_attention, static_argnames=("causal", "scale", "impl"))
