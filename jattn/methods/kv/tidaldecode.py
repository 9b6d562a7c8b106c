"""P71 — TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse Attention.

Prefill is full attention in every layer. A decode step (one new token per sequence, already appended to
each layer's cache of ``n = lengths[b]`` tokens) runs layer ``l`` as

* ``l < sparse_layer_start`` (default 2): full attention;
* ``l == sparse_layer_start`` or ``l == correction_layer`` (the *token selection* layers): full scores
  ``s_h = q_h K_{h // G}^T / sqrt(d)`` over the whole cache, output = full softmax attention, and the
  selection ``I_h = topk_j(s_{h, j}, min(budget, n))`` is stored per (sequence, query head);
* every other layer ``l > sparse_layer_start``: softmax attention restricted to ``I_h`` of the most recent
  selection layer (``jattn.methods.kv.gather.gathered_decode_attention``: only those rows are read).

The same positions persist across layers ("position persistent"); the selection is made afresh at every
step (the state only carries it from layer to layer). GQA: selection per *query* head, over its kv head
``h // G`` (the reference's ``repeat_kv``).

Follows DerrickYLJ/TidalDecode's reference path ``src/tidal_build/modify_llama.py``
(``llama_tidal_attention_forward``: ``topk`` over all scores, ``pos_dict`` reset per forward in
``src/models/llama_tidaldecoding.py``); defaults ``sparse_layer_start=2``, ``correction_layer=13``
(``src/enable_tidal.py``; ``modify_llama`` defaults to 9). The newest token: the reference path keeps it only
if it is among the top-k (``include_newest=False``, default); the efficient path
(``tidal/utils/controller.py``: "token budget including the last page", top-k over ``kv_indices_without_last``)
takes the top ``budget - 1`` of the older tokens plus the newest one (``include_newest=True``). Ties are
broken by ``lax.top_k`` (the lower position first); the reference leaves them arbitrary.

``tidal_lm_decode_step`` runs a whole ``jattn.nn.DecoderLM`` decode step this way, using the model's
submodules functionally (no change to ``jattn.nn``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from jattn.core import checks
from jattn.core.reference import HIGHEST, softmax_rows
from jattn.methods.kv.gather import check_decode_caches, check_index_array, gathered_decode_attention
from jattn.ops.decode import decode_attention

LAYER_KINDS = ("full", "select", "sparse")


def _check_layers(sparse_layer_start, correction_layer) -> tuple[int, int | None]:
    start = checks.check_int("sparse_layer_start", sparse_layer_start, minimum=0)
    if correction_layer is not None:
        correction_layer = checks.check_int("correction_layer", correction_layer, minimum=0)
        if correction_layer <= start:
            raise ValueError(f"correction_layer must come after sparse_layer_start={start}, got {correction_layer}")
    return start, correction_layer


def layer_kind(layer_idx: int, *, sparse_layer_start: int = 2, correction_layer: int | None = 13) -> str:
    """``"full"`` (before ``sparse_layer_start``), ``"select"`` (a token selection layer) or ``"sparse"``."""
    layer_idx = checks.check_int("layer_idx", layer_idx, minimum=0)
    start, correction = _check_layers(sparse_layer_start, correction_layer)
    if layer_idx < start:
        return "full"
    return "select" if layer_idx in (start, correction) else "sparse"


def selection_size(budget: int, capacity: int) -> int:
    """Entries per head of a selection: ``min(budget, S_max)`` (at most ``lengths[b]`` of them valid)."""
    return min(checks.check_int("budget", budget), capacity)


def decode_scores(q: Float[Array, "B H D"], k_cache: Float[Array, "B Hkv S D"], lengths: Int[Array, "B"], *,
                  scale: float) -> Float[Array, "B H S"]:
    """float32 ``scale * q_h . k_{h // G, j}`` for every cache position, ``-inf`` at ``j >= lengths[b]``."""
    B, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    grouped = q.astype(jnp.float32).reshape(B, Hkv, H // Hkv, D)
    s = jnp.einsum("bkgd,bksd->bkgs", grouped, k_cache.astype(jnp.float32), precision=HIGHEST) * scale
    return jnp.where(jnp.arange(S) < lengths[:, None, None, None], s, -jnp.inf).reshape(B, H, S)


def select_topk_tokens(scores: Float[Array, "B H S"], lengths: Int[Array, "B"], *, k: int,
                       include_newest: bool = False) -> tuple[Int[Array, "B H K"], Bool[Array, "B H K"]]:
    """Per-head top-k positions by score: ``I_h = topk_j(s_{h, j}, min(k, n))`` over ``j < n = lengths[b]``.

    Args:
      scores: ``[B, H, S]`` float logits (entries at ``j >= lengths[b]`` are ignored).
      lengths: ``[B]`` int valid positions per sequence.
      k: the token budget (static).
      include_newest: take the top ``k - 1`` of ``[0, n - 1)`` plus ``n - 1`` (the efficient kernel's rule)
        instead of the top ``k`` of ``[0, n)`` (the reference's).

    Returns:
      ``(idx [B, H, K], valid [B, H, K])``, ``K = min(k, S)``, in descending score order (the newest last
      with ``include_newest``); ``min(k, n)`` entries are valid: the first ones (and the newest, last).

    Raises:
      ValueError: a shape or ``k`` is wrong.
      TypeError: a dtype is wrong.
    """
    checks.check_float_array("scores", scores, 3)
    B, H, S = scores.shape
    check_index_array("lengths", lengths, (B,), kind="int")
    K = selection_size(k, S)
    include_newest = checks.check_bool("include_newest", include_newest)
    if include_newest and K < 2:
        raise ValueError(f"include_newest needs a budget k >= 2 (the newest token plus one), got k={k}")
    j = jnp.arange(S)
    older = (j < lengths[:, None, None] - (1 if include_newest else 0))
    masked = jnp.where(older, scores.astype(jnp.float32), -jnp.inf)
    picked = K - 1 if include_newest else K
    idx = lax.top_k(masked, picked)[1].astype(jnp.int32)
    valid = jnp.broadcast_to(jnp.arange(picked) < jnp.sum(older, axis=-1, keepdims=True), idx.shape)
    if include_newest:
        newest = jnp.broadcast_to((lengths - 1)[:, None, None], (B, H, 1)).astype(jnp.int32)
        idx = jnp.concatenate([idx, newest], axis=-1)
        valid = jnp.concatenate([valid, newest >= 0], axis=-1)
    return idx, valid


def selection_recall(selected_idx: Int[Array, "B H K"], selected_valid: Bool[Array, "B H K"],
                     scores: Float[Array, "B H S"], lengths: Int[Array, "B"], *, k: int) -> Float[Array, "B H"]:
    """Fraction of a layer's own top-``min(k, n)`` positions (by ``scores``) that the persisted selection holds.

    Args:
      selected_idx: ``[B, H, K]`` the persisted positions.
      selected_valid: ``[B, H, K]`` bool, False for padding.
      scores: ``[B, H, S]`` this layer's full logits.
      lengths: ``[B]`` int valid positions.
      k: the budget defining the true top-k.

    Returns:
      ``[B, H]`` float32 recall in ``[0, 1]`` (1 for an empty cache).
    """
    true_idx, true_valid = select_topk_tokens(scores, lengths, k=k)
    B, H, _ = selected_idx.shape
    check_index_array("selected_idx", selected_idx, (B, H, selected_idx.shape[2]), kind="int")
    check_index_array("selected_valid", selected_valid, tuple(selected_idx.shape), kind="bool")
    held = jnp.any((true_idx[..., :, None] == selected_idx[..., None, :]) & selected_valid[..., None, :], axis=-1)
    hits = jnp.sum(held & true_valid, axis=-1)
    return jnp.where(jnp.any(true_valid, -1), hits / jnp.maximum(jnp.sum(true_valid, -1), 1), 1.0).astype(jnp.float32)


def sparse_decode_attention(q: Float[Array, "B H D"], k_cache: Float[Array, "B Hkv S D"],
                            v_cache: Float[Array, "B Hkv S Dv"], idx: Int[Array, "B H K"], valid: Bool[Array, "B H K"],
                            lengths: Int[Array, "B"], *, scale: float | None = None) -> Float[Array, "B H Dv"]:
    """Softmax attention of one new token per sequence over the selected positions only (no RoPE: the cache
    holds rotated keys); ``gathered_decode_attention``. Equals dense decode attention masked to one-hot(idx)."""
    return gathered_decode_attention(q, k_cache, v_cache, idx, valid, lengths, scale=scale)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TidalState:
    """The selection carried from a token selection layer to the sparse layers after it."""
    selected_idx: jax.Array      # [B, H, K] int32
    selected_valid: jax.Array    # [B, H, K] bool

    @classmethod
    def create(cls, batch: int, heads: int, budget: int, capacity: int) -> "TidalState":
        """An empty selection (``K = min(budget, capacity)``): a sparse layer reading it attends nothing."""
        for name, value in (("batch", batch), ("heads", heads), ("capacity", capacity)):
            checks.check_int(name, value)
        shape = (batch, heads, selection_size(budget, capacity))
        return cls(jnp.zeros(shape, jnp.int32), jnp.zeros(shape, bool))


def tidal_decode_step(layer_idx: int, q: Float[Array, "B H D"], k_cache: Float[Array, "B Hkv S D"],
                      v_cache: Float[Array, "B Hkv S Dv"], lengths: Int[Array, "B"], state: TidalState, *,
                      budget: int, sparse_layer_start: int = 2, correction_layer: int | None = 13,
                      scale: float | None = None, include_newest: bool = False, impl: str = "auto"):
    """One layer of a TidalDecode decode step.

    Args:
      layer_idx: this layer's index (a Python int: it chooses full, selection or sparse attention).
      q: ``[B, H, D]`` the new token's queries (RoPE applied, as the cache's keys).
      k_cache: head-major ``[B, Hkv, S_max, D]``, the new token appended.
      v_cache: ``[B, Hkv, S_max, Dv]``.
      lengths: ``[B]`` int tokens in the cache, the new one included.
      state: the ``TidalState`` from the previous layer (``TidalState.create`` before layer 0).
      budget: tokens each head attends in sparse layers.
      sparse_layer_start: the first token selection layer; the layers before it are full.
      correction_layer: the re-selection layer, or None for none.
      scale: logit scale, default ``D ** -0.5``.
      include_newest: the efficient kernel's rule (newest token always kept; see ``select_topk_tokens``).
      impl: ``jattn.decode_attention``'s impl for the full layers.

    Returns:
      ``(out [B, H, Dv], state)``: a selection layer returns its new selection, the others pass it on.

    Raises:
      ValueError: a shape, size or layer setting is wrong (named, before any compute).
      TypeError: a dtype or a static argument is wrong.
    """
    kind = layer_kind(layer_idx, sparse_layer_start=sparse_layer_start, correction_layer=correction_layer)
    B, Tq, H, Hkv, S = check_decode_caches(q, k_cache, v_cache, lengths)
    if q.ndim != 3:
        raise ValueError(f"TidalDecode decodes one token per step: q must be [B, H, D], got {checks.describe(q)}")
    K = selection_size(budget, S)
    if not isinstance(state, TidalState):
        raise TypeError(f"state must be a TidalState (TidalState.create(B, H, budget, S_max)), got "
                        f"{type(state).__name__}")
    check_index_array("state.selected_idx", state.selected_idx, (B, H, K), kind="int")
    check_index_array("state.selected_valid", state.selected_valid, (B, H, K), kind="bool")
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else checks.check_positive_float("scale", scale, allow_none=False)
    if kind == "full":
        return decode_attention(q, k_cache, v_cache, lengths, scale=scale, impl=impl), state
    if kind == "sparse":
        return sparse_decode_attention(q, k_cache, v_cache, state.selected_idx, state.selected_valid, lengths,
                                       scale=scale), state
    scores = decode_scores(q, k_cache, lengths, scale=scale)
    probs, _ = softmax_rows(scores)
    out = jnp.einsum("bkgs,bksd->bkgd", probs.reshape(B, Hkv, H // Hkv, S), v_cache.astype(jnp.float32),
                     precision=HIGHEST).reshape(B, H, v_cache.shape[3])
    idx, valid = select_topk_tokens(scores, lengths, k=budget, include_newest=include_newest)
    return out.astype(q.dtype), TidalState(idx, valid)


# ------------------------------------------------------------------------------------ a DecoderLM driver

def _check_model(model) -> None:
    from jattn.nn.models import DecoderLM
    if not isinstance(model, DecoderLM):
        raise TypeError(f"model must be a jattn.nn.DecoderLM, got {type(model).__name__}")
    for i, block in enumerate(model.blocks):
        att = block.attention
        if att.method != "softmax" or att.method_config.get("softcap") is not None:
            raise ValueError(f"TidalDecode replaces plain softmax attention: layer {i} runs method "
                             f"{att.method!r} with config {att.method_config}")
        if block.norm_position != "pre":
            raise ValueError(f"layer {i} is post-norm; the driver follows DecoderLM's pre-norm blocks")
        if att.cache_index is None:
            raise ValueError("the model has no decoding caches: call model.init_cache(batch, max_length) and "
                             "prefill the prompt with model(prompt, decode=True) first")


def tidal_lm_decode_step(model, tokens: Int[Array, "B 1"], *, budget: int, sparse_layer_start: int = 2,
                         correction_layer: int | None = 13, include_newest: bool = False,
                         return_stats: bool = False):
    """One TidalDecode decode step of a ``jattn.nn.DecoderLM`` (what ``model(tokens, decode=True)`` does with
    full attention), updating the model's caches in place as that call does.

    The blocks' submodules are used as ``DecoderLM`` uses them (pre-norm, ``Attention.project`` /
    ``finish``, the layer's ``kv_cache`` and ``cache_index``); only the attention core is TidalDecode's.
    Jit it the NNX way (``nnx.split`` / ``nnx.merge`` inside ``jax.jit``, as ``DecoderLM.generate``).

    Args:
      model: a ``DecoderLM`` of ``method="softmax"`` layers whose caches hold the prefilled prompt.
      tokens: ``[B, 1]`` int the new token of each sequence.
      budget: tokens each head attends in sparse layers.
      sparse_layer_start: the first token selection layer.
      correction_layer: the re-selection layer, or None.
      include_newest: the efficient kernel's selection rule.
      return_stats: also return per-layer statistics (costs one full attention per sparse layer).

    Returns:
      ``(logits [B, 1, V] float32, state)`` with the last selection; with ``return_stats`` a third item, a
      tuple per layer of ``(recall [B, H], relative_error [B])``: the persisted selection's recall of that
      layer's own top-k (1 in full and selection layers) and ``|out - full| / |full|`` of its attention
      output against full attention on the same inputs (0 in full and selection layers).

    Raises:
      TypeError: ``model`` is not a ``DecoderLM``.
      ValueError: a layer is not plain pre-norm softmax, the caches are missing, or ``tokens`` is not ``[B, 1]``.
    """
    _check_model(model)
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an int array [B, 1] (one new token), got {checks.describe(tokens)}")
    from jattn.nn.models import check_token_ids
    check_token_ids("tokens", tokens, model.vocab_size)
    x = model.embed(tokens).astype(model.dtype)
    state, stats = None, []
    for layer, block in enumerate(model.blocks):
        att = block.attention
        h = block.attn_norm(x)
        index = att.cache_index[...]
        q, k, v = att.project(h, (index + jnp.arange(1))[None])
        cache = att.kv_cache.get_value()
        cache = cache.append(k.astype(cache.dtype), v.astype(cache.dtype))
        att.kv_cache.set_value(cache)
        att.cache_index[...] = index + 1
        k_cache, v_cache = cache.contiguous()
        q = q[:, 0].astype(cache.dtype)
        if state is None:
            state = TidalState.create(q.shape[0], q.shape[1], budget, k_cache.shape[2])
        before = state
        out, state = tidal_decode_step(layer, q, k_cache, v_cache, cache.lengths, state, budget=budget,
                                       sparse_layer_start=sparse_layer_start, correction_layer=correction_layer,
                                       scale=att.scale, include_newest=include_newest)
        if return_stats:
            stats.append(_layer_stats(layer, q, k_cache, v_cache, cache.lengths, before, out, budget=budget,
                                      scale=att.scale, sparse_layer_start=sparse_layer_start,
                                      correction_layer=correction_layer))
        x = x + att.finish(h, out[:, None])
        x = x + block.mlp(block.mlp_norm(x))
    x = model.final_norm(x)
    logits = (model.embed.attend(x) if model.head is None else model.head(x)).astype(jnp.float32)
    return (logits, state, tuple(stats)) if return_stats else (logits, state)


def _layer_stats(layer, q, k_cache, v_cache, lengths, state, out, *, budget, scale, sparse_layer_start,
                 correction_layer):
    """``(recall [B, H], relative error [B])`` of a sparse layer against its own full attention."""
    B, H = q.shape[:2]
    if layer_kind(layer, sparse_layer_start=sparse_layer_start, correction_layer=correction_layer) != "sparse":
        return jnp.ones((B, H), jnp.float32), jnp.zeros((B,), jnp.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = decode_scores(q, k_cache, lengths, scale=scale)
    full = decode_attention(q, k_cache, v_cache, lengths, scale=scale).astype(jnp.float32)
    error = jnp.linalg.norm((out.astype(jnp.float32) - full).reshape(B, -1), axis=-1)
    relative = error / jnp.maximum(jnp.linalg.norm(full.reshape(B, -1), axis=-1), 1e-30)
    recall = selection_recall(state.selected_idx, state.selected_valid, scores, lengths, k=budget)
    return recall, relative
