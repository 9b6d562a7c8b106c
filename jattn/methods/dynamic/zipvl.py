"""P13 — ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification (prefill half).

A layer-adaptive *token* selector for causal prefill (``T == S``): each layer keeps the smallest set of tokens
that holds a fraction ``tau`` of the (normalised) attention mass, and attention runs among those tokens only.
Per sequence ``b`` of one layer:

1. **Probe queries** (``jattn.methods.kv.zipcache.probe_positions``, shared with P24 ZipCache, same first
   author): the recent ``[int(T - f_r T), T)`` plus ``int(f_x T)`` positions drawn uniformly with replacement
   from the earlier ones (a PRNG key from ``seed``; a duplicate counts twice). ``f_r = f_x = 0.05``.
2. **Normalised attention score** (``normalized_attention_score``): ``A_h = softmax(scale q_probe k^T)`` per
   query head ``h`` with probe ``p`` (at position ``pos_p``) seeing keys ``j <= pos_p``; the layer score of key
   ``j`` is ``s_j = (1 / H) sum_h (1 / n_j) sum_{p : pos_p >= j} A_h[p, j]`` with ``n_j = #{p : pos_p >= j}``
   (the column mean over the probes that can see ``j``: the causal lower-triangle correction; 0 if none).
   Computed with ZipCache's ``normalized_attention_score(..., denominator="visible")``, summed over kv heads.
   One score per token for the whole layer: the important set is the same for every head.
3. **Adaptive ratio** (``adaptive_keep_count``): sort ``s`` descending; ``p = min{p : sum_{j <= p} s_(j) >= tau
   sum_j s_j}`` (``p = T`` when ``tau = 1``, so float rounding in the prefix sums cannot drop a token); the
   important set is the ``p`` best tokens (ties to the lower position).
4. **Token-sparse attention** (``token_sparse_attention``, ``zipvl_attention``): the important tokens, in
   position order, are gathered to the front of a ``T``-long buffer, causal attention runs on it with a
   ``BlockMask`` that keeps only the tiles of the first ``p`` buffer rows and columns (static shape, data-dependent
   counts: the kernel skips the rest), and the outputs are scattered back. So important query ``t`` attends
   the important keys ``s <= t``; this equals dense attention under the mask ``imp[t] & imp[s] & s <= t``.

**Unimportant tokens' outputs** (the paper does not say; no official code was read): they get **0**, i.e. the
attention adds nothing to their residual stream (the mask reading: a row with nothing visible gives 0, jattn's
convention). ``zipvl_block_mask`` gives the tile cover of that mask on the original sequence, for
``jattn.eval.sparse_quality`` and plots.

Defaults: ``tau = 0.975`` (the paper's range 0.97-0.975, unverified), probe fractions 0.05 + 0.05 (P24's).

Deliberate deviations / readings:

* The layer score is the mean over all query heads (GQA: ZipCache's per-kv-head sums added over kv heads).
* Probe selection is by a fixed ``seed`` so the selector is deterministic and jit-able with static arguments.
* Decode-time mixed-precision KV (v1) / eviction (v2) is P24's machinery (``jattn.methods.kv.zipcache``), not
  repeated here.
* The gathered buffer keeps the static length ``T`` (the kernel skips tiles past ``p``), rather than a
  dynamically sized sub-sequence.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.methods.kv import zipcache
from jattn.ops.block_sparse import block_sparse_attention

HIGHEST = jax.lax.Precision.HIGHEST
TAU = 0.975
PROBE_FRACTION = zipcache.PROBE_FRACTION

__all__ = ["normalized_attention_score", "adaptive_keep_count", "important_tokens", "zipvl_token_mask",
           "zipvl_block_mask", "gathered_block_mask", "token_sparse_attention", "zipvl_attention",
           "zipvl_probe_positions"]


def _check_tau(tau) -> float:
    return checks.check_float_in("tau", tau, 0.0, 1.0, low_open=True)


def zipvl_probe_positions(seq_len: int, *, seed: int = 0, recent_fraction: float = PROBE_FRACTION,
                          random_fraction: float = PROBE_FRACTION) -> Int[Array, "P"]:
    """ZipCache's probe positions (recent first, then random earlier ones) drawn with ``jax.random.key(seed)``."""
    checks.check_int("seed", seed, 0)
    return zipcache.probe_positions(jax.random.PRNGKey(seed), seq_len=seq_len, recent_fraction=recent_fraction,
                                    random_fraction=random_fraction)


def normalized_attention_score(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"],
                               probe_positions: Int[Array, "P"], *, scale: float | None = None
                               ) -> Float[Array, "B T"]:
    """The layer's normalised attention score of every token (step 2 of the module docstring).

    Args:
      q: ``[B, T, H, D]`` all queries (the probes are read at ``probe_positions``).
      k: ``[B, T, Hkv, D]``.
      probe_positions: ``[P]`` int positions in ``[0, T)``.
      scale: logit scale, default ``D ** -0.5``.

    Returns:
      float32 ``[B, T]``: per key, the mean over heads and over the probes that see it of its probability.

    Raises:
      TypeError, ValueError: an argument is malformed (named).
    """
    B, T, H, Hkv, D = checks.check_self_attention_qk(q, k, "ZipVL prefill (causal)")
    if not hasattr(probe_positions, "dtype") or not jnp.issubdtype(probe_positions.dtype, jnp.integer) \
            or probe_positions.ndim != 1:
        raise TypeError(f"probe_positions must be an integer array [P], got {checks.describe(probe_positions)}")
    q_probe = jnp.take(q, jnp.clip(probe_positions, 0, T - 1), axis=1)
    per_kv = zipcache.normalized_attention_score(q_probe, probe_positions, k, denominator="visible", scale=scale)
    return per_kv.sum(axis=1) / H


def adaptive_keep_count(scores: Float[Array, "B T"], tau: float = TAU) -> Int[Array, "B"]:
    """``p = min{p : sum of the p largest scores >= tau * sum of all}`` per row (``T`` when ``tau = 1``).

    Args:
      scores: ``[B, T]`` non-negative scores.
      tau: mass fraction in ``(0, 1]``.

    Returns:
      int32 ``[B]`` in ``[1, T]``.

    Raises:
      TypeError, ValueError: ``scores`` is not a rank-2 float array or ``tau`` is outside ``(0, 1]`` (named).
    """
    checks.check_float_array("scores", scores, 2)
    tau = _check_tau(tau)
    T = scores.shape[1]
    if tau >= 1.0:
        return jnp.full(scores.shape[:1], T, jnp.int32)
    s = jnp.sort(scores.astype(jnp.float32), axis=-1)[:, ::-1]
    prefix = jnp.cumsum(s, axis=-1)
    below = jnp.sum(prefix < tau * prefix[:, -1:], axis=-1)
    return jnp.clip(below + 1, 1, T).astype(jnp.int32)


def important_tokens(scores: Float[Array, "B T"], keep: Int[Array, "B"]) -> Bool[Array, "B T"]:
    """True for the ``keep[b]`` highest scores of each row (ties to the lower position)."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    return rank < keep[:, None]


def zipvl_token_mask(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], *, tau: float = TAU, seed: int = 0,
                     recent_fraction: float = PROBE_FRACTION, random_fraction: float = PROBE_FRACTION,
                     scale: float | None = None) -> tuple[Bool[Array, "B T"], Int[Array, "B"]]:
    """ZipVL's layer-level important set: ``(important [B, T], keep count [B])`` (steps 1-3).

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      tau: attention-mass fraction kept, in ``(0, 1]``.
      seed: PRNG seed of the random probes.
      recent_fraction: share of the recent probe queries.
      random_fraction: share of the random probe queries.
      scale: logit scale, default ``D ** -0.5``.

    Returns:
      ``(important, keep)``.

    Raises:
      TypeError, ValueError: an argument is malformed (named).
    """
    checks.check_self_attention_qk(q, k, "ZipVL prefill (causal)")
    tau = _check_tau(tau)
    positions = zipvl_probe_positions(q.shape[1], seed=seed, recent_fraction=recent_fraction,
                                      random_fraction=random_fraction)
    scores = normalized_attention_score(q, k, positions, scale=scale)
    keep = adaptive_keep_count(scores, tau)
    return important_tokens(scores, keep), keep


def zipvl_block_mask(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], *, tau: float = TAU,
                     block_q: int = 64, block_k: int = 64, seed: int = 0, recent_fraction: float = PROBE_FRACTION,
                     random_fraction: float = PROBE_FRACTION) -> BlockMask:
    """The tile cover ``[B, 1, nQ, nK]`` of ZipVL's mask ``imp[t] & imp[s]`` on the original sequence.

    Tiles holding an important query and an important key are listed (run with ``causal=True``); the exact
    token mask is ``zipvl_token_mask`` (``zipvl_attention`` applies it exactly, through the gather).

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      tau: attention-mass fraction kept, in ``(0, 1]``.
      block_q: queries per tile.
      block_k: keys per tile.
      seed: PRNG seed of the random probes.
      recent_fraction: share of the recent probe queries.
      random_fraction: share of the random probe queries.

    Returns:
      A ``BlockMask`` (head dim 1: the set is the layer's).

    Raises:
      TypeError, ValueError: an argument is malformed (named).
    """
    B, T, H, Hkv, D = checks.check_self_attention_qk(q, k, "ZipVL prefill (causal)")
    block_q = checks.check_int("block_q", block_q, 1)
    block_k = checks.check_int("block_k", block_k, 1)
    important, _ = zipvl_token_mask(q, k, tau=tau, seed=seed, recent_fraction=recent_fraction,
                                    random_fraction=random_fraction)
    nQ, nK = -(-T // block_q), -(-T // block_k)
    pad_q = jnp.pad(important, ((0, 0), (0, nQ * block_q - T))).reshape(B, nQ, block_q).any(-1)
    pad_k = jnp.pad(important, ((0, 0), (0, nK * block_k - T))).reshape(B, nK, block_k).any(-1)
    tiles = pad_q[:, :, None] & pad_k[:, None, :]
    causal = jnp.arange(nK)[None, :] * block_k <= jnp.minimum((jnp.arange(nQ) + 1) * block_q, T)[:, None] - 1
    return BlockMask.from_dense_block_map((tiles & causal)[:, None], block_q=block_q, block_k=block_k, seq_q=T,
                                          seq_k=T)


def _front_order(important):
    """Permutation ``[B, T]`` putting the important tokens first, each group in position order."""
    return jnp.argsort(~important, axis=-1, stable=True)


def gathered_block_mask(count: Int[Array, "B"], *, seq_len: int, block: int = 64) -> BlockMask:
    """The tiles of the gathered buffer that hold kept tokens: causal tiles of the first ``ceil(count / block)``
    block rows and columns, ``[B, 1, nb, nb]`` (static shape, data-dependent counts)."""
    seq_len = checks.check_int("seq_len", seq_len, 1)
    block = checks.check_int("block", block, 1)
    nb = -(-seq_len // block)
    live = jnp.arange(nb) * block < count[:, None]                                     # [B, nb]
    causal = jnp.tril(jnp.ones((nb, nb), bool))
    tiles = live[:, :, None] & live[:, None, :] & causal
    return BlockMask.from_dense_block_map(tiles[:, None], block_q=block, block_k=block, seq_q=seq_len,
                                          seq_k=seq_len)


def token_sparse_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"],
                           important: Bool[Array, "B T"], *, block: int = 64, scale: float | None = None,
                           impl: str = "auto") -> Float[Array, "B T H D"]:
    """Causal attention among the ``important`` tokens only; unimportant tokens' outputs are 0.

    Gathers the important tokens to the front (position order), runs ``jattn.block_sparse_attention`` with the
    tiles of the first ``count`` rows/columns (causal), scatters back.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      v: ``[B, T, Hkv, D]``.
      important: ``[B, T]`` bool.
      block: the kernel's tile (queries and keys).
      scale: logit scale, default ``D ** -0.5``.
      impl: ``"auto" | "xla" | "pallas" | "reference"``.

    Returns:
      ``[B, T, H, D]`` in q's dtype: dense attention under ``important[t] & important[s] & s <= t``.

    Raises:
      TypeError, ValueError: an argument is malformed (named).
    """
    B, T, S, H, Hkv, D = checks.check_qkv(q, k, v)
    if T != S:
        raise ValueError(f"token_sparse_attention is causal self-attention: T={T} != S={S}")
    if not hasattr(important, "dtype") or important.dtype != jnp.bool_ or tuple(important.shape) != (B, T):
        raise TypeError(f"important must be a bool array [B, T] = {(B, T)}, got {checks.describe(important)}")
    block = checks.check_int("block", block, 1)
    order = _front_order(important)                                                    # [B, T]
    count = jnp.sum(important, axis=-1)                                                # [B]
    take = lambda x: jnp.take_along_axis(x, order[:, :, None, None], axis=1)
    bm = gathered_block_mask(count, seq_len=T, block=block)
    out = block_sparse_attention(take(q), take(k), take(v), bm, causal=True, scale=scale, impl=impl)
    out = jnp.where((jnp.arange(T)[None, :] < count[:, None])[:, :, None, None], out, 0)
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(out, inverse[:, :, None, None], axis=1).astype(q.dtype)


def zipvl_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"], *,
                    tau: float = TAU, block: int = 64, seed: int = 0, recent_fraction: float = PROBE_FRACTION,
                    random_fraction: float = PROBE_FRACTION, scale: float | None = None,
                    impl: str = "auto") -> Float[Array, "B T H D"]:
    """ZipVL prefill: the layer's important set (``zipvl_token_mask``) then ``token_sparse_attention``.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      v: ``[B, T, Hkv, D]``.
      tau: attention-mass fraction kept, in ``(0, 1]`` (1: every token, dense causal attention).
      block: the kernel's tile.
      seed: PRNG seed of the random probes.
      recent_fraction: share of the recent probe queries.
      random_fraction: share of the random probe queries.
      scale: logit scale, default ``D ** -0.5``.
      impl: ``"auto" | "xla" | "pallas" | "reference"``.

    Returns:
      ``[B, T, H, D]`` in q's dtype; unimportant tokens' rows are 0.

    Raises:
      TypeError, ValueError: an argument is malformed (named).
    """
    checks.check_qkv(q, k, v)
    important, _ = zipvl_token_mask(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), tau=tau, seed=seed,
                                    recent_fraction=recent_fraction, random_fraction=random_fraction, scale=scale)
    return token_sparse_attention(q, k, v, important, block=block, scale=scale, impl=impl)
