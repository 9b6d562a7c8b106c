"""P08 — Kinetics: Rethinking Test-Time Scaling Laws (block top-k sparse attention and its eFLOPs cost model).

Three pieces, all pure functions:

**1. The cost model** (``kinetics_cost``, ``dense_cost``, ``zero_overhead_sparse_cost``, ``block_sparse_cost``,
``expected_cost``), in plain Python floats, the formulas of the official ``Infini-AI-Lab/Kinetics``
``cost_model/utils.py`` with the model description of ``cost_model/best_of_N/cost_model_ntrial.py``. A cost is
``(compute, memory)`` in units of 1e12 (the code's ``* 1e-12``); the *eFLOPs* total is ``compute + memory`` where
memory traffic is already weighted by ``I = e_flops = 562.5`` FLOPs per byte-equivalent (a B200-like ratio).
With prompt ``S``, generation ``G``, ``n`` trials, ``P`` parameters, ``Hq``/``Hkv`` heads and ``d`` the head dim
*times the number of layers* (the code folds layers into ``head_dim``):

* dense: ``compute = n [2 P G + 2 (2 S + G) G Hq d]``; ``memory = I * 2 (2 S + G n) G Hkv d`` (the prompt's
  KV is read once per step for all ``n`` trials; parameter memory ``2 P G`` is commented out in the code and
  left out here too);
* top-k with a token budget ``b`` (the code's ``zero_overhead_sparse_cost``): ``KV = b G + 1/2 max(0, b - S)^2``;
  ``compute = n [2 P G + 4 KV Hq d]``; ``memory = I * n * 4 KV Hkv d``;
* block top-k (``block_sparse_cost``), ``b = local + block_size * block_topk``:
  ``KV = b G - 1/2 max(0, b - S)^2``; ``compute = n [2 P G + 4 KV Hq d + ((2 S + G) // block_size) G Hq d]``;
  ``memory = I [n 4 KV Hkv d + ((2 S + G n) // block_size) G Hkv d]`` (the second terms are the block-summary
  search; ``//`` is the code's integer division).

The sign of the ``1/2 max(0, b - S)^2`` correction differs between the two sparse functions of the same file
(``+`` for top-k, ``-`` for block top-k; ``-`` is the right one: while the context is shorter than the budget
each step reads the context, not ``b``). ``kv_correction="subtract"`` (default) follows the current
``block_sparse_cost``; ``"add"`` reproduces the published CSV tables (``cost_model/aime24/block_topk/*.csv``), which
were written by an older revision that used ``+``: e.g. Qwen3-4B, block 16, top-64, ``S = 155`` and the 32
generation lengths of AIME24 query 0 give ``(147.902147..., 1906.172399...)`` exactly, as the tests check.
``QWEN3`` holds the six models: parameter counts from the code's ``model_sizes`` table; heads, kv heads, head
dim and layers from the models' Hugging Face ``config.json`` (the code reads them with ``AutoConfig``).

**2. Block top-k prefill selector** (``kinetics_block_mask``, ``kinetics_attention``): the decode rule turned
into tiles for causal prefill (``T == S``). Keys are cut into blocks of ``block_size`` (the kernel's key tile),
queries into blocks of ``block_q``. For query block ``i`` (queries ``[i b_q, e_i)``) and kv head ``g``:

1. always kept: the *sink* tiles ``c < ceil(sink / block_size)`` and the *local* tiles covering keys
   ``[max(0, i b_q - local), e_i)`` (so the diagonal tile is always kept and no row is empty);
2. candidates: the key blocks strictly between them, ``ceil(sink / b) <= c < floor(max(0, i b_q - local) / b)``
   (all fully visible to every query of the block);
3. score of candidate ``c``: the mean logit ``q_t . k_s`` over the block's real queries ``t``, the ``G`` query heads
   of kv head ``g`` and the block's keys ``s``; by linearity this is ``qbar . kbar_c`` (mean query times mean key),
   which is how it is computed (``kinetics_block_scores``): ``O(T D)`` to pool plus ``O(nQ nK D)`` for the scores;
4. the ``topk`` best candidates (ties to the lower block) are kept; all candidates when there are fewer. The
   choice is shared by the ``G`` query heads of a kv head, as in the official code.

Attention is ``jattn.block_sparse_attention(..., causal=True)`` on the tiles. ``topk = 0`` keeps sink + local
only; ``topk = nK`` (every key block) keeps every causal tile: dense causal attention.

**3. Block top-k decode** (``block_topk_decode``): one decode step over a head-major cache, the official
``LiteSys`` ``blockwise_topk_sparsity``: for a sequence of length ``L``, if ``L <= n_full = ceil((sink + local +
topk block) / block) block`` every key is kept (dense). Otherwise ``n_dyn = (L - local - sink) // block * block``
middle keys ``[sink, sink + n_dyn)`` are cut into blocks of ``block`` *starting at ``sink``*, the local window
widens to ``L - sink - n_dyn`` keys (it absorbs the remainder), each block's score is the mean over the ``G``
query heads and the block's keys of the logit (= ``mean_g q_g . kbar``), the ``topk`` best blocks are kept
and everything else in the middle is dropped. The kept positions (sink + blocks + local, a static
``sink + local + block - 1 + topk block`` entries per head) go to ``jattn.methods.kv.gather.gathered_decode_attention``,
the project's exact gathered decode kernel; with ``topk`` blocks covering the whole middle it is dense decode.

Defaults: ``block_size = 16``, ``sink = 4``, ``topk = 64``, ``local = 0`` (the released AIME24 runs:
``local0_block16_blocktopk64``); ``block_q = 64``.

Deviations, deliberate:

* Prefill: the official method is a decode-time rule (LiteSys computes all exact logits first and masks the
  rest to ``-inf``; it has no prefill selector). Here key blocks are the kernel's tiles, aligned at 0 (not at
  ``sink``), the local window is a tile cover of ``[i b_q - local, e_i)`` rather than exactly ``local`` keys per
  query, and the mean logit is also averaged over the query block's queries (one choice per tile row).
* Decode: by default the block means are computed from the cache at every step (``O(S D)`` key reads, so
  no saving over dense decode); a serving loop should keep ``kinetics_block_summary`` next to the cache and
  pass it as ``k_summary`` (then a step reads ``S / block`` summaries plus the kept rows). Updating that
  summary as blocks fill, and a Pallas gather kernel over selected pages, are not built: the gathered rows
  run through ``gathered_decode_attention`` (``take_along_axis`` + exact softmax).
* Ties: the lower block wins (a stable sort); ``torch.topk`` leaves ties unspecified.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.methods.kv.gather import check_decode_caches, gathered_decode_attention
from jattn.ops.block_sparse import block_sparse_attention

HIGHEST = jax.lax.Precision.HIGHEST
E_FLOPS = 562.5
COST_MODES = ("dense", "topk", "block_topk")
KV_CORRECTIONS = ("subtract", "add")

__all__ = ["KineticsModel", "QWEN3", "dense_cost", "zero_overhead_sparse_cost", "block_sparse_cost",
           "expected_cost", "kinetics_cost", "kinetics_block_scores", "kinetics_select", "kinetics_block_mask",
           "kinetics_attention", "kinetics_block_summary", "block_topk_decode_indices", "block_topk_decode"]


# ---------------------------------------------------------------------------------------------- cost model

@dataclasses.dataclass(frozen=True)
class KineticsModel:
    """What the cost model needs of a model: parameters, heads, kv heads, per-layer head dim, layers."""
    nparams: float
    num_attn_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int

    @property
    def folded_head_dim(self) -> int:
        """``head_dim * num_layers``: the code's ``head_dim`` (every layer's KV counted at once)."""
        return self.head_dim * self.num_layers


QWEN3 = {  # nparams: the code's model_sizes (billions); heads/kv heads/head dim/layers: HF config.json
    "Qwen3-0.6B": KineticsModel(0.752e9, 16, 8, 128, 28),
    "Qwen3-1.7B": KineticsModel(2.03e9, 16, 8, 128, 28),
    "Qwen3-4B": KineticsModel(4.02e9, 32, 8, 128, 36),
    "Qwen3-8B": KineticsModel(8.19e9, 32, 8, 128, 36),
    "Qwen3-14B": KineticsModel(14.77e9, 40, 8, 128, 40),
    "Qwen3-32B": KineticsModel(32.76e9, 64, 8, 128, 64),
}


def _model(model) -> KineticsModel:
    if isinstance(model, str):
        if model not in QWEN3:
            raise ValueError(f"model must be a KineticsModel or one of {sorted(QWEN3)}, got {model!r}")
        return QWEN3[model]
    if not isinstance(model, KineticsModel):
        raise TypeError(f"model must be a KineticsModel or a name in QWEN3, got {type(model).__name__}")
    return model


def _lengths(context_length, generation_length, num_trials):
    return (checks.check_int("context_length", context_length, 0),
            checks.check_int("generation_length", generation_length, 0),
            checks.check_int("num_trials", num_trials, 1))


def dense_cost(model, *, context_length: int, generation_length: int, num_trials: int = 1,
               e_flops: float = E_FLOPS) -> tuple[float, float]:
    """Dense attention: ``(compute, memory)`` eFLOPs / 1e12 (formulas in the module docstring).

    Args:
      model: a ``KineticsModel`` or a name in ``QWEN3``.
      context_length: S, prompt tokens (shared by the trials).
      generation_length: G, tokens generated per trial.
      num_trials: n, parallel samples.
      e_flops: I, FLOPs per unit of memory traffic (562.5).

    Returns:
      ``(compute, memory)`` floats.
    """
    m = _model(model)
    S, G, n = _lengths(context_length, generation_length, num_trials)
    I = checks.check_positive_float("e_flops", e_flops, allow_none=False)
    d = m.folded_head_dim
    compute = (2 * m.nparams * G + 2 * (2 * S + G) * G * m.num_attn_heads * d) * n * 1e-12
    memory = 2 * (2 * S + G * n) * G * m.num_kv_heads * d * I * 1e-12
    return compute, memory


def zero_overhead_sparse_cost(model, *, context_length: int, generation_length: int, budget: int,
                              num_trials: int = 1, e_flops: float = E_FLOPS) -> tuple[float, float]:
    """Top-k attention with a free (oracle) search and a token ``budget`` (the code's ``+`` correction)."""
    m = _model(model)
    S, G, n = _lengths(context_length, generation_length, num_trials)
    b = checks.check_int("budget", budget, 0)
    I = checks.check_positive_float("e_flops", e_flops, allow_none=False)
    d = m.folded_head_dim
    kv = b * G + 0.5 * max(0, b - S) ** 2
    compute = (2 * m.nparams * G + 4 * kv * m.num_attn_heads * d) * n * 1e-12
    memory = 4 * kv * m.num_kv_heads * d * n * I * 1e-12
    return compute, memory


def block_sparse_cost(model, *, context_length: int, generation_length: int, local: int = 0, block_size: int = 16,
                      block_topk: int = 64, num_trials: int = 1, e_flops: float = E_FLOPS,
                      kv_correction: str = "subtract") -> tuple[float, float]:
    """Block top-k attention, budget ``local + block_size * block_topk``, with the block-summary search cost.

    ``kv_correction``: ``"subtract"`` (current code) or ``"add"`` (the revision that wrote the published CSVs).
    """
    m = _model(model)
    S, G, n = _lengths(context_length, generation_length, num_trials)
    local = checks.check_int("local", local, 0)
    block_size = checks.check_int("block_size", block_size, 1)
    block_topk = checks.check_int("block_topk", block_topk, 0)
    I = checks.check_positive_float("e_flops", e_flops, allow_none=False)
    checks.check_choice("kv_correction", kv_correction, KV_CORRECTIONS)
    d = m.folded_head_dim
    b = local + block_size * block_topk
    sign = -1 if kv_correction == "subtract" else 1
    kv = b * G + sign * 0.5 * max(0, b - S) ** 2
    search_compute = (2 * S + G) // block_size * G * m.num_attn_heads * d
    compute = (2 * m.nparams * G + 4 * kv * m.num_attn_heads * d + search_compute) * n * 1e-12
    search_memory = (2 * S + G * n) // block_size * G * m.num_kv_heads * d
    memory = (4 * kv * m.num_kv_heads * d * n + search_memory) * I * 1e-12
    return compute, memory


def kinetics_cost(model, context_length: int, generation_length: int, num_trials: int = 1, *, mode: str = "dense",
                  budget: int | None = None, local: int = 0, block_size: int = 16, block_topk: int = 64,
                  e_flops: float = E_FLOPS, kv_correction: str = "subtract") -> dict:
    """The eFLOPs of one request: ``dict(compute, memory, total)`` (units of 1e12).

    Args:
      model: a ``KineticsModel`` or a name in ``QWEN3``.
      context_length: S.
      generation_length: G.
      num_trials: n.
      mode: ``"dense"``, ``"topk"`` (``zero_overhead_sparse_cost`` with ``budget``) or ``"block_topk"``.
      budget: top-k token budget (``mode="topk"`` only).
      local: local window (``"block_topk"``).
      block_size: block size (``"block_topk"``).
      block_topk: blocks kept (``"block_topk"``).
      e_flops: I.
      kv_correction: ``"subtract"`` or ``"add"`` (``"block_topk"``).

    Returns:
      ``dict(compute=..., memory=..., total=compute + memory)``.

    Raises:
      TypeError, ValueError: an argument is malformed (named).
    """
    checks.check_choice("mode", mode, COST_MODES)
    common = dict(context_length=context_length, generation_length=generation_length, num_trials=num_trials,
                  e_flops=e_flops)
    if mode == "dense":
        compute, memory = dense_cost(model, **common)
    elif mode == "topk":
        if budget is None:
            raise ValueError("budget (tokens kept per step) is required for mode='topk'")
        compute, memory = zero_overhead_sparse_cost(model, budget=budget, **common)
    else:
        compute, memory = block_sparse_cost(model, local=local, block_size=block_size, block_topk=block_topk,
                                            kv_correction=kv_correction, **common)
    return dict(compute=compute, memory=memory, total=compute + memory)


def expected_cost(cost_fn, generation_lengths, *, num_trials: int = 1, **kwargs) -> tuple[float, float]:
    """The code's ``expected_cost``: the mean ``(compute, memory)`` of ``cost_fn`` over ``generation_lengths``."""
    costs = [cost_fn(generation_length=int(g), num_trials=num_trials, **kwargs) for g in generation_lengths]
    if not costs:
        raise ValueError("generation_lengths must not be empty")
    return (sum(c for c, _ in costs) / len(costs), sum(m for _, m in costs) / len(costs))


# ------------------------------------------------------------------------------------------ prefill selector

def _check_selector_args(q, k, topk, block_q, block_size, local, sink):
    B, T, H, Hkv, D = checks.check_self_attention_qk(q, k, "Kinetics prefill (causal)")
    block_q = checks.check_int("block_q", block_q, 1)
    block_size = checks.check_int("block_size", block_size, 1)
    topk = checks.check_int("topk", topk, 0)
    checks.check_int("local", local, 0)
    checks.check_int("sink", sink, 0)
    nK = -(-T // block_size)
    if topk > nK:
        raise ValueError(f"topk={topk} is larger than the number of key blocks nK=ceil(T / block_size)={nK} "
                         f"(T={T}, block_size={block_size})")
    return B, T, H, Hkv, D


def _block_means(x, block: int, length: int):
    """``x [B, T, N, D]`` -> mean over each block's real tokens ``[B, nb, N, D]`` (float32)."""
    B, T, N, D = x.shape
    nb = -(-T // block)
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * block - T), (0, 0), (0, 0)))
    sums = xp.reshape(B, nb, block, N, D).sum(axis=2)
    counts = jnp.minimum(block, length - jnp.arange(nb) * block).astype(jnp.float32)
    return sums / counts[None, :, None, None]


def kinetics_block_scores(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], *, block_q: int = 64,
                          block_size: int = 16) -> Float[Array, "B Hkv nQ nK"]:
    """Mean logit of every (query block, key block) tile over the tile's real queries and keys and the ``G``
    query heads of each kv head, computed as ``qbar . kbar`` (linearity; unscaled dot products).

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      block_q: queries per block.
      block_size: keys per block.

    Returns:
      float32 ``[B, Hkv, nQ, nK]``.
    """
    _check_selector_args(q, k, 0, block_q, block_size, 0, 0)
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    q_bar = _block_means(q, block_q, T).reshape(B, -1, Hkv, H // Hkv, D).mean(axis=3)   # [B, nQ, Hkv, D]
    k_bar = _block_means(k, block_size, T)                                                # [B, nK, Hkv, D]
    return jnp.einsum("bigd,bcgd->bgic", q_bar, k_bar, precision=HIGHEST)


def _always_kept(T: int, block_q: int, block_size: int, local: int, sink: int):
    """``(kept [nQ, nK], candidate [nQ, nK])``: the sink + local tile cover, and the searchable blocks."""
    nQ, nK = -(-T // block_q), -(-T // block_size)
    start = jnp.arange(nQ) * block_q
    last = jnp.minimum(start + block_q, T) - 1
    local_first = jnp.maximum(start - local, 0) // block_size                             # [nQ]
    c = jnp.arange(nK)[None, :]
    sink_blocks = -(-sink // block_size)
    causal = c * block_size <= last[:, None]
    local_tiles = (c >= local_first[:, None]) & (c <= (last // block_size)[:, None])
    kept = ((c < sink_blocks) & causal) | local_tiles
    candidate = (c >= sink_blocks) & (c < local_first[:, None])
    return kept, candidate


def kinetics_select(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], *, topk: int = 64, block_q: int = 64,
                    block_size: int = 16, local: int = 0, sink: int = 4) -> Bool[Array, "B H nQ nK"]:
    """Kinetics' block top-k tile choice for causal prefill (rule in the module docstring).

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]`` (GQA: H a multiple of Hkv; a kv head's query heads share the choice).
      topk: key blocks chosen per (query block, kv head) beyond sink and local (``0 <= topk <= nK``).
      block_q: queries per block.
      block_size: keys per block.
      local: recent keys always attended (tile cover, the diagonal tile included).
      sink: first keys always attended.

    Returns:
      ``[B, H, nQ, nK]`` bool tile map (causal tiles only).

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: an argument is out of range or the shapes disagree (the message names it).
    """
    B, T, H, Hkv, D = _check_selector_args(q, k, topk, block_q, block_size, local, sink)
    nQ, nK = -(-T // block_q), -(-T // block_size)
    kept, candidate = _always_kept(T, block_q, block_size, local, sink)
    chosen = jnp.zeros((B, Hkv, nQ, nK), bool)
    if topk > 0:
        scores = kinetics_block_scores(q, k, block_q=block_q, block_size=block_size)
        scores = jnp.where(candidate, scores, -jnp.inf)
        order = jnp.argsort(-scores, axis=-1, stable=True)[..., :topk]                 # ties: lower block
        best = jnp.take_along_axis(candidate[None, None] & jnp.ones_like(chosen), order, axis=-1)
        rows = jnp.arange(nQ)[None, None, :, None]
        chosen = chosen.at[jnp.arange(B)[:, None, None, None], jnp.arange(Hkv)[None, :, None, None], rows,
                           order].set(best)
    tiles = chosen | kept[None, None]
    return jnp.repeat(tiles, H // Hkv, axis=1)


def kinetics_block_mask(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], *, topk: int = 64,
                        block_q: int = 64, block_size: int = 16, local: int = 0, sink: int = 4) -> BlockMask:
    """Kinetics' ``BlockMask`` ``[B, H, nQ, nK]`` (tiles fully visible; run it with ``causal=True``).

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      topk: key blocks chosen per (query block, kv head), ``0 <= topk <= nK``.
      block_q: queries per block (the kernel's query tile).
      block_size: keys per block (the kernel's key tile).
      local: recent keys always attended.
      sink: first keys always attended.

    Returns:
      A ``BlockMask``.

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: an argument is out of range or the shapes disagree (the message names it).
    """
    tiles = kinetics_select(q, k, topk=topk, block_q=block_q, block_size=block_size, local=local, sink=sink)
    T = q.shape[1]
    return BlockMask.from_dense_block_map(tiles, block_q=block_q, block_k=block_size, seq_q=T, seq_k=T)


def kinetics_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"], *,
                       topk: int = 64, block_q: int = 64, block_size: int = 16, local: int = 0, sink: int = 4,
                       scale: float | None = None, impl: str = "auto") -> Float[Array, "B T H D"]:
    """Kinetics block top-k causal prefill: ``kinetics_block_mask`` then ``jattn.block_sparse_attention``.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, T, Hkv, D]``.
      v: ``[B, T, Hkv, D]``.
      topk: key blocks chosen per (query block, kv head).
      block_q: queries per block.
      block_size: keys per block.
      local: recent keys always attended.
      sink: first keys always attended.
      scale: logit scale (default ``D ** -0.5``; the selection ranks raw means, scale-free).
      impl: ``"auto" | "xla" | "pallas" | "reference"``.

    Returns:
      ``[B, T, H, D]`` in q's dtype.

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: an argument is out of range or the shapes disagree (the message names it).
    """
    checks.check_qkv(q, k, v)
    bm = kinetics_block_mask(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), topk=topk, block_q=block_q,
                             block_size=block_size, local=local, sink=sink)
    return block_sparse_attention(q, k, v, bm, causal=True, scale=scale, impl=impl)


# -------------------------------------------------------------------------------------------------- decode

def _check_decode_budget(S: int, block: int, topk: int, local: int, sink: int):
    block = checks.check_int("block", block, 1)
    topk = checks.check_int("topk", topk, 1)
    local = checks.check_int("local", local, 0)
    sink = checks.check_int("sink", sink, 0)
    n_blocks = -(-S // block)
    if topk > n_blocks:
        raise ValueError(f"topk={topk} is larger than the cache's number of blocks ceil(S_max / block)={n_blocks} "
                         f"(S_max={S}, block={block})")
    return block, topk, local, sink


def kinetics_block_summary(k_cache: Float[Array, "B Hkv S D"], *, block: int = 16, sink: int = 4
                           ) -> Float[Array, "B Hkv nb D"]:
    """Mean key of every decode block ``[sink + c block, sink + (c + 1) block)``, ``nb = (S_max - sink) // block``
    (float32). A serving loop keeps this next to the cache and updates one row when a block fills; pass it to
    ``block_topk_decode(..., k_summary=...)`` so a step reads ``nb`` summaries instead of every key."""
    checks.check_float_array("k_cache", k_cache, 4)
    B, Hkv, S, D = k_cache.shape
    block = checks.check_int("block", block, 1)
    sink = checks.check_int("sink", sink, 0)
    nb = max(0, (S - sink) // block)
    mid = k_cache[:, :, sink:sink + nb * block].astype(jnp.float32).reshape(B, Hkv, nb, block, D)
    return mid.mean(axis=3)


def block_topk_decode_indices(q: Float[Array, "B H D"], k_cache: Float[Array, "B Hkv S D"],
                              lengths: Int[Array, "B"], *, block: int = 16, topk: int = 64, local: int = 0,
                              sink: int = 4, k_summary: Float[Array, "B Hkv nb D"] | None = None
                              ) -> tuple[Int[Array, "B H K"], Bool[Array, "B H K"]]:
    """The cache positions one decode step keeps (LiteSys ``blockwise_topk_sparsity``; module docstring).

    Args:
      q: ``[B, H, D]`` the new token's queries.
      k_cache: head-major ``[B, Hkv, S_max, D]``.
      lengths: ``[B]`` int valid keys (the new token included).
      block: keys per block.
      topk: blocks kept in the middle (``1 <= topk <= ceil(S_max / block)``).
      local: recent keys always kept (widened by up to ``block - 1``).
      sink: first keys always kept.
      k_summary: ``kinetics_block_summary(k_cache, block=block, sink=sink)`` if the caller maintains it
        (default: computed here from the cache).

    Returns:
      ``(idx [B, H, K], valid [B, H, K])`` with the static ``K = min(S_max, sink + local + block - 1 + topk block)``;
      the kept set is shared by the query heads of a kv head.
    """
    B, Hkv, S, D = k_cache.shape
    block, topk, local, sink = _check_decode_budget(S, block, topk, local, sink)
    H = q.shape[1]
    G = H // Hkv
    K = min(S, sink + local + block - 1 + topk * block)
    n_full = -(-(sink + local + topk * block) // block) * block
    L = lengths.astype(jnp.int32)[:, None]                                               # [B, 1]
    n_dyn = jnp.maximum(L - local - sink, 0) // block * block                           # [B, 1]
    dense = L <= n_full
    # block scores: middle blocks start at `sink`; mean over the group's heads of q . kbar (= mean logit)
    nb = max(0, (S - sink) // block)
    if k_summary is None:
        k_summary = kinetics_block_summary(k_cache, block=block, sink=sink)
    else:
        checks.check_float_array("k_summary", k_summary, 4)
        if tuple(k_summary.shape) != (B, Hkv, nb, D):
            raise ValueError(f"k_summary must be [B, Hkv, nb=(S_max - sink) // block, D] = {(B, Hkv, nb, D)}, got "
                             f"{checks.describe(k_summary)}")
    if nb:
        k_bar = k_summary.astype(jnp.float32)                                             # [B, Hkv, nb, D]
        q_bar = q.astype(jnp.float32).reshape(B, Hkv, G, D).mean(axis=2)
        scores = jnp.einsum("bgd,bgcd->bgc", q_bar, k_bar, precision=HIGHEST)
        real = jnp.arange(nb)[None, None, :] < (n_dyn // block)[:, :, None]
        scores = jnp.where(real, scores, -jnp.inf)
        _, picked = jax.lax.top_k(scores, min(topk, nb))                                 # ties: lower block
        picked = jnp.sort(picked, axis=-1)
        block_idx = (sink + picked[..., None] * block + jnp.arange(block)).reshape(B, Hkv, -1)
    else:
        block_idx = jnp.zeros((B, Hkv, 0), jnp.int32)
    sink_idx = jnp.broadcast_to(jnp.arange(sink, dtype=jnp.int32), (B, Hkv, sink))
    local_start = sink + n_dyn                                                             # [B, 1]
    local_idx = local_start[:, :, None] + jnp.arange(local + block - 1, dtype=jnp.int32)
    local_idx = jnp.broadcast_to(local_idx, (B, Hkv, local + block - 1))
    sparse_idx = jnp.concatenate([sink_idx, block_idx.astype(jnp.int32), local_idx], axis=-1)[..., :K]
    pad = K - sparse_idx.shape[-1]
    if pad > 0:
        sparse_idx = jnp.concatenate([sparse_idx, jnp.full((B, Hkv, pad), S, jnp.int32)], axis=-1)
    dense_idx = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (B, Hkv, K))
    idx = jnp.where(dense[:, :, None], dense_idx, sparse_idx)
    valid = idx < L[:, :, None]
    idx = jnp.repeat(idx, G, axis=1)
    valid = jnp.repeat(valid, G, axis=1)
    return jnp.where(valid, idx, 0), valid


def block_topk_decode(q: Float[Array, "B H D"], k_cache: Float[Array, "B Hkv S D"],
                      v_cache: Float[Array, "B Hkv S Dv"], lengths: Int[Array, "B"], *, block: int = 16,
                      topk: int = 64, local: int = 0, sink: int = 4, scale: float | None = None,
                      k_summary: Float[Array, "B Hkv nb D"] | None = None) -> Float[Array, "B H Dv"]:
    """One Kinetics block top-k decode step: ``block_topk_decode_indices`` then the exact gathered decode.

    Args:
      q: ``[B, H, D]`` the new token's queries (its K/V already in the cache at ``lengths - 1``).
      k_cache: head-major ``[B, Hkv, S_max, D]``.
      v_cache: ``[B, Hkv, S_max, Dv]``.
      lengths: ``[B]`` int valid keys per sequence.
      block: keys per block (16).
      topk: blocks kept (``1 <= topk <= ceil(S_max / block)``).
      local: recent keys always kept.
      sink: first keys always kept (4).
      scale: logit scale, default ``D ** -0.5``.
      k_summary: the maintained ``kinetics_block_summary`` (default: computed from the cache).

    Returns:
      ``[B, H, Dv]`` in q's dtype.

    Raises:
      TypeError, ValueError: an argument is malformed (named, before any compute).
    """
    B, Tq, H, Hkv, S = check_decode_caches(q, k_cache, v_cache, lengths)
    if q.ndim != 3:
        raise ValueError(f"q must be one new token per sequence [B, H, D], got {checks.describe(q)}")
    idx, valid = block_topk_decode_indices(q, k_cache, lengths, block=block, topk=topk, local=local, sink=sink,
                                           k_summary=k_summary)
    return gathered_decode_attention(q, k_cache, v_cache, idx, valid, lengths, scale=scale)
