"""P11 — MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression.

Each head ``h`` gets its own causal sliding window whose span grows with the input length ``N``:
``S_h(N) = alpha_h + beta_h * N`` tokens, realised (official ``thu-nics/MoA``,
``MoA/universal/elastic_block_sparse.py``) as a BigBird layout on ``block x block`` tiles with one global
(sink) block and no random blocks:

    raw  = int(alpha // block + beta * (N // block))        # Python float floor-div, then truncation
    band = max(2 * raw - 1, 1)                               # odd band width in tiles
    half = (band - 1) // 2                                   # = max(raw - 1, 0)
    keep(h, i, j) = j <= i  AND  ( i - j <= half_h  OR  j == 0 )      (query tile i, key tile j)

and at token level additionally ``kv <= q``. ``beta = 1`` is dense causal for ``alpha >= 0`` (and for
``alpha >= -block`` when ``N`` is a multiple of ``block``; otherwise the ceil tail tile row misses tile 1).

Profile and choose (the MoA search). With ``A`` the attention probabilities and ``g = dL/dA``, masking
entry ``(i, j)`` and renormalising row ``i`` changes the loss, to first order in ``dA``, by

    effect_ij = A_ij * (sum_k A_ik g_ik - g_ij) / (1 - A_ij)          (``attention_influence``)

(``-A_ij g_ij`` when ``A_ij = 1``: the row becomes empty and outputs 0). This is the official profiler's
value after its final negation (the jattn spec entry writes the opposite sign; only ``|effect|`` is used).
``|effect|`` summed over a tile is the tile's importance, and a candidate ``(alpha, beta)``'s loss for a head
is the importance of the causal tiles it drops. ``moa_plan`` then picks one candidate per head minimising the
summed loss over profile lengths subject to a mean-density budget per length (and per head group, e.g. per
layer), as a binary MILP solved with ``scipy.optimize.milp`` (HiGHS) instead of Gurobi. The official search
also sweeps an epsilon-constraint Pareto front over lengths and picks a plan by validation perplexity;
``moa_plan`` returns the weighted-sum optimum (one point of that front).

Densities (``moa_density``): ``"kv"`` (official MILP cost: the most kv tiles any query tile keeps, over
``nb``), ``"causal"`` (kept tiles over causal tiles) or ``"full"`` (over ``nb**2``), with
``nb = ceil(N / block)`` tiles; the official code floors ``N / block`` (same for multiples of ``block``).

Plans are per *query* head (the BlockMask has ``Hm = H``); the official GQA recipe instead takes the max
importance over each KV group and plans per KV head, which jattn does not do.

Never a fully masked row: every query tile keeps its own diagonal tile.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.core.reference import HIGHEST, reference_attention
from jattn.ops.block_sparse import block_sparse_attention

DENSITY_MODES = ("kv", "causal", "full")


# ---------------------------------------------------------------------------------------- validation

def _per_head(name: str, values, num_heads: int | None) -> tuple[float, ...]:
    """A number (the same for every head) or a sequence with one number per head."""
    if isinstance(values, (int, float, np.integer, np.floating)) and not isinstance(values, bool):
        return (checks.check_finite_float(name, values),) * (1 if num_heads is None else num_heads)
    if not isinstance(values, (Sequence, np.ndarray)) or isinstance(values, str):
        raise TypeError(f"{name} must be a number or a sequence of one number per head, got {values!r}")
    values = tuple(checks.check_finite_float(name, x) for x in values)
    if not values or (num_heads is not None and len(values) != num_heads):
        want = f"{num_heads} (one per query head)" if num_heads is not None else ">= 1"
        raise ValueError(f"{name} must have length {want}, got {len(values)}")
    return values


def _alphas_betas(alphas, betas, num_heads=None):
    """Per-head tuples; a single number is repeated for every head (``num_heads``, or the other's length)."""
    if num_heads is None:
        lengths = [len(x) for x in (alphas, betas) if isinstance(x, (Sequence, np.ndarray)) and np.ndim(x) == 1]
        num_heads = lengths[0] if lengths else 1
    alphas = _per_head("alphas", alphas, num_heads)
    betas = _per_head("betas", betas, num_heads)
    return alphas, betas


# -------------------------------------------------------------------------------------- the pattern

def moa_band_blocks(alpha: float, beta: float, N: int, block: int = 64) -> int:
    """Odd band width in tiles for span ``alpha + beta * N`` (official formula)."""
    alpha, beta = checks.check_finite_float("alpha", alpha), checks.check_finite_float("beta", beta)
    N, block = checks.check_int("N", N, 1), checks.check_int("block", block, 1)
    raw = int(alpha // block + beta * (N // block))
    return max(2 * raw - 1, 1)


def _half_band(alpha, beta, N, block) -> int:
    return (moa_band_blocks(alpha, beta, N, block) - 1) // 2


def moa_block_mask(alpha, beta, N: int, block: int = 64) -> np.ndarray:
    """Causal BigBird tile map of the MoA pattern: numpy bool ``[nb, nb]`` for scalar ``alpha, beta``, or
    ``[H, nb, nb]`` for per-head sequences; ``nb = ceil(N / block)``."""
    scalar = np.ndim(alpha) == 0 and np.ndim(beta) == 0
    alphas, betas = _alphas_betas(alpha, beta)
    nb = math.ceil(checks.check_int("N", N, 1) / checks.check_int("block", block, 1))
    halves = np.array([_half_band(a, b, N, block) for a, b in zip(alphas, betas)])[:, None, None]
    i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
    tiles = (j <= i) & ((i - j <= halves) | (j == 0))
    return tiles[0] if scalar else tiles


def moa_density(alpha: float, beta: float, N: int, block: int = 64, mode: str = "kv") -> float:
    """Density of the pattern, by counting (not from a mask): see the module docstring for the modes."""
    checks.check_choice("mode", mode, DENSITY_MODES)
    half = _half_band(alpha, beta, N, block)
    nb = math.ceil(N / block)
    last = nb - 1
    # row i keeps tiles max(0, i - half) .. i plus the global tile 0 when the band does not reach it
    if last <= half:
        band_total = nb * (nb + 1) // 2
    else:
        band_total = (half + 1) * (half + 2) // 2 + (half + 1) * (last - half)
    total = band_total + max(0, last - half)
    if mode == "kv":
        return (min(last, half) + 1 + (1 if last > half else 0)) / nb
    return total / (nb * (nb + 1) / 2) if mode == "causal" else total / nb ** 2


def moa_mask_fn(alphas, betas, N: int, block: int = 64):
    """Token-level MoA mask ``mask_fn(b, h, q_idx, kv_idx)`` for per-head ``alphas, betas`` (pure index
    arithmetic: the per-head band is a ``where`` chain on ``h``, usable inside the Pallas kernel)."""
    alphas, betas = _alphas_betas(alphas, betas)
    halves = [_half_band(a, b, N, block) for a, b in zip(alphas, betas)]

    def mask_fn(b, h, q_idx, kv_idx):
        half = halves[0]
        for head, value in enumerate(halves[1:], start=1):
            half = jnp.where(h == head, value, half)
        q_tile, kv_tile = q_idx // block, kv_idx // block
        return (kv_idx <= q_idx) & ((q_tile - kv_tile <= half) | (kv_tile == 0))

    return mask_fn


def moa_attention_mask(alphas, betas, N: int, block: int = 64) -> BlockMask:
    """Per-head ``BlockMask`` (``Hm = len(alphas)``): kept tiles full except the causal diagonal (partial),
    carrying ``moa_mask_fn(...)`` for the partial tiles (so ``to_dense_mask()`` is the token mask)."""
    alphas, betas = _alphas_betas(alphas, betas)
    tiles = moa_block_mask(list(alphas), list(betas), N, block)
    full = tiles & ~np.eye(tiles.shape[-1], dtype=bool)
    with jax.ensure_compile_time_eval():  # static: concrete tables even when called under jit
        return BlockMask.from_dense_block_map(jnp.asarray(tiles)[None], full_map=jnp.asarray(full)[None],
                                              block_q=block, block_k=block, seq_q=N, seq_k=N,
                                              mask_fn=moa_mask_fn(alphas, betas, N, block))


def moa_attention(q, k, v, *, alphas, betas, block: int = 64, scale: float | None = None, impl: str = "auto"):
    """Causal MoA attention: ``q [B, N, H, D]``, ``k, v [B, N, Hkv, D]``; query head ``h`` uses the window
    ``alphas[h] + betas[h] * N`` (a single number applies to every head). Exact on
    ``jattn.block_sparse_attention``; ``alphas, betas, block`` are static (``block`` a power of two >= 16)."""
    B, T, H, Hkv, D = checks.check_self_attention_qkv(q, k, v, "moa_attention")
    checks.check_block_size("block", block, minimum=16)
    checks.check_choice("impl", impl, checks.IMPLS)
    alphas, betas = _alphas_betas(alphas, betas, H)
    block_mask = moa_attention_mask(alphas, betas, T, block)
    return block_sparse_attention(q, k, v, block_mask, causal=True, scale=scale, impl=impl)


# ---------------------------------------------------------------------------------------- profiling

def moa_candidates(min_length: int, max_profile_length: int, max_length: int, *, alpha_interval: int = 1024,
                   num_betas: int = 9) -> list[tuple[float, float]]:
    """The official search space: ``alpha`` in ``linspace(-min_length, max_profile_length)`` at
    ``alpha_interval`` spacing, ``beta`` in ``linspace(0, 1, num_betas)``; keeps pairs whose span stays in
    ``(0, N]`` at the profile, longest and shortest lengths; sorted by span at ``max_length``."""
    min_length = checks.check_int("min_length", min_length, 1)
    max_profile_length = checks.check_int("max_profile_length", max_profile_length, 1)
    max_length = checks.check_int("max_length", max_length, 1)
    num_alphas = (max_profile_length + min_length) // checks.check_int("alpha_interval", alpha_interval, 1) + 1
    alpha = np.linspace(-min_length, max_profile_length, num_alphas)
    beta = np.linspace(0.0, 1.0, checks.check_int("num_betas", num_betas, 1))
    pairs = [(float(a), float(b)) for a in alpha for b in beta
             if a + b * max_profile_length <= max_profile_length and a + b * max_length <= max_length
             and a + b * min_length > 0]
    return sorted(pairs, key=lambda ab: ab[0] + ab[1] * max_length)   # stable, like the official sort


def attention_influence(A, dA):
    """First-order loss change from masking each attention entry and renormalising its row (see the module
    docstring). ``A, dA``: probabilities and their loss gradient, same shape ``[..., T, S]``; float32."""
    checks.check_float_array("A", A)
    checks.check_float_array("dA", dA)
    if A.shape != dA.shape or A.ndim < 2:
        raise ValueError(f"A and dA must share one shape [..., T, S], got A {checks.describe(A)} and "
                         f"dA {checks.describe(dA)}")
    A, dA = jnp.asarray(A, jnp.float32), jnp.asarray(dA, jnp.float32)
    row = jnp.sum(A * dA, axis=-1, keepdims=True)
    rest = 1.0 - A
    renormalisable = rest > 0
    return jnp.where(renormalisable, A * (row - dA) / jnp.where(renormalisable, rest, 1.0), -A * dA)


def attention_probs_and_grad(q, k, v, d_out, *, scale: float | None = None):
    """Causal probabilities ``A [B, H, T, T]`` and ``dA = dL/dA`` given the output cotangent ``d_out``
    (``dL/d out``, ``[B, T, H, D]``), holding ``v`` fixed as the official profiler does."""
    B, T, S, H, Hkv, D = checks.check_qkv(q, k, v)
    checks.check_float_array("d_out", d_out, 4)
    if d_out.shape != q.shape:
        raise ValueError(f"d_out must have q's shape {tuple(q.shape)}, got {checks.describe(d_out)}")
    _, A = reference_attention(q, k, v, causal=True, scale=scale, return_probs=True)
    v_per_head = jnp.repeat(v.astype(jnp.float32), H // Hkv, axis=2)
    dA = jnp.einsum("bthe,bshe->bhts", d_out.astype(jnp.float32), v_per_head, precision=HIGHEST)
    return A, dA


def block_importance(effect, block: int):
    """``|effect|`` on the causal triangle, summed per ``block x block`` tile: ``[..., T, S] -> [..., nQ, nK]``."""
    checks.check_float_array("effect", effect)
    block = checks.check_int("block", block, 1)
    T, S = effect.shape[-2:]
    nQ, nK = math.ceil(T / block), math.ceil(S / block)
    causal = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]
    magnitude = jnp.where(causal, jnp.abs(effect.astype(jnp.float32)), 0.0)
    pad = [(0, 0)] * (effect.ndim - 2) + [(0, nQ * block - T), (0, nK * block - S)]
    tiles = jnp.pad(magnitude, pad).reshape(*effect.shape[:-2], nQ, block, nK, block)
    return tiles.sum(axis=(-3, -1))


def candidate_losses(importance, candidates, N: int, block: int):
    """Importance of the causal tiles each candidate drops: ``importance [..., nb, nb] -> [..., C]``."""
    importance = np.asarray(importance, np.float64)
    nb = math.ceil(N / block)
    if importance.shape[-2:] != (nb, nb):
        raise ValueError(f"importance must end in [nb, nb] = [{nb}, {nb}] for N={N}, block={block}, got "
                         f"{checks.describe(importance)}")
    causal = np.tril(np.ones((nb, nb), bool))
    dropped = np.stack([causal & ~moa_block_mask(a, b, N, block) for a, b in candidates])   # [C, nb, nb]
    return np.einsum("...ij,cij->...c", importance, dropped.astype(np.float64))


@functools.partial(jax.jit, static_argnames=("block", "scale"))
def _layer_importance(q, k, v, d_out, *, block: int, scale):
    """Tile importance ``[H, nb, nb]`` of one layer, summed over the batch."""
    A, dA = attention_probs_and_grad(q, k, v, d_out, scale=scale)
    return block_importance(attention_influence(A, dA), block).sum(axis=0)


def moa_profile(q, k, v, d_out, candidates, *, block: int = 64, scale: float | None = None,
                density_mode: str = "kv"):
    """Profiles one attention layer at length ``N = T``: ``(losses [H, C], densities [H, C])`` for the given
    ``(alpha, beta)`` candidates, summed over the batch (the calibration samples). ``d_out`` is the loss
    gradient at this layer's attention output. Stack calls at several lengths (and layers) for ``moa_plan``."""
    if not candidates:
        raise ValueError("candidates must list at least one (alpha, beta) pair")
    scale = checks.check_positive_float("scale", scale)
    importance = np.asarray(_layer_importance(q, k, v, d_out, block=checks.check_int("block", block, 1), scale=scale))
    T, H = q.shape[1], q.shape[2]
    losses = candidate_losses(importance, candidates, T, block)
    densities = np.array([moa_density(a, b, T, block, density_mode) for a, b in candidates])
    return losses, np.broadcast_to(densities, (H, len(candidates))).copy()


# ---------------------------------------------------------------------------------------- the plan

def _as_lengths(name: str, x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"{name} must have shape [H, C] or [L, H, C] (lengths, heads, candidates), got "
                         f"{checks.describe(x)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} must be finite")
    return x


def moa_plan(effects, densities, budget, *, groups=None, length_weights=None) -> np.ndarray:
    """One candidate per head: ``argmin sum_l w_l sum_h effects[l, h, c_h]`` subject to, for every length
    ``l`` and head group ``g``, ``mean_{h in g} densities[l, h, c_h] <= budget[l]``.

    Args:
      effects, densities: ``[H, C]`` or ``[L, H, C]`` (profile lengths, heads, candidates), same shape.
      budget: a number or one per length: the mean-density bound.
      groups: ``None`` (one group: all heads, a model-level budget) or ``[H]`` int group ids (e.g. layers).
      length_weights: ``[L]`` positive weights of each length's loss (default 1).

    Returns ``int [H]`` candidate indices. Raises ``ValueError`` when no plan meets the budget.
    """
    effects, densities = _as_lengths("effects", effects), _as_lengths("densities", densities)
    if effects.shape != densities.shape:
        raise ValueError(f"effects and densities must have the same shape, got {effects.shape} and "
                         f"{densities.shape}")
    L, H, C = effects.shape
    budget = np.asarray(budget, np.float64)
    budget = np.full(L, float(budget)) if budget.ndim == 0 else budget
    if budget.shape != (L,) or not np.all(budget > 0):
        raise ValueError(f"budget must be a positive number or {L} positive numbers (one per length), got {budget!r}")
    weights = np.ones(L) if length_weights is None else np.asarray(length_weights, np.float64)
    if weights.shape != (L,) or not np.all(weights > 0):
        raise ValueError(f"length_weights must hold {L} positive numbers, got {length_weights!r}")
    group_ids = np.zeros(H, int) if groups is None else np.asarray(groups)
    if group_ids.shape != (H,) or not np.issubdtype(group_ids.dtype, np.integer):
        raise ValueError(f"groups must be None or {H} integer group ids, got {groups!r}")

    cost = np.einsum("l,lhc->hc", weights, effects).reshape(-1)
    cost = cost / max(np.abs(cost).max(), 1e-300)                # scale-free objective for the solver
    one_each = LinearConstraint(np.kron(np.eye(H), np.ones((1, C))), 1, 1)
    rows, limits = [], []
    for l in range(L):
        for g in np.unique(group_ids):
            members = (group_ids == g)[:, None]
            rows.append((densities[l] * members).reshape(-1))
            limits.append(budget[l] * members.sum())
    within_budget = LinearConstraint(np.array(rows), -np.inf, np.array(limits))
    result = milp(cost, constraints=[one_each, within_budget], integrality=np.ones(H * C),
                  bounds=Bounds(0, 1), options={"mip_rel_gap": 1e-9})
    if result.status != 0 or result.x is None:
        lowest = densities.min(axis=2).mean(axis=1)
        raise ValueError(f"no plan meets budget={budget.tolist()}: the sparsest candidates give mean densities "
                         f"{lowest.tolist()} per length (solver: {result.message})")
    return np.argmax(result.x.reshape(H, C), axis=1)
