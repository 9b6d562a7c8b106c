"""P67 DyMU: "Dynamic Merging and Virtual Unmerging for Efficient VLMs" (official code ``MikeWangWZHL/dymu``:
``src/open_clip/tome.py`` for DToMe, ``LLaVA/.../llava_llama.py`` for VTU; the computation follows
``papers/P50-P74.md``).

**DToMe** (:func:`bipartite_merge`, in the vision encoder, per layer, after attention): the metric is the keys
averaged over heads, L2-normalised; the current tokens are split alternately into A (even) and B (odd);
``s_i = max_j cos(a_i, b_j)``; every A token with ``s_i > tau`` (at most ``floor((t - protected) / 2)`` of them,
the most similar first) is merged into its best B token by the size-weighted average ``x <- sum size x / sum
size``; sizes add; ``mapping`` records which slot holds each original position. ``r=`` merges a fixed count
instead (ToMe). ``tau = +inf`` merges nothing.

**Proportional attention** (:func:`proportional_attention`): later encoder layers add ``log(size_j)`` to every
logit of key ``j`` (a per-key bias through :func:`jattn.attention`): a token that stands for ``n`` identical
tokens gets exactly their total weight.

**Threshold calibration** (:func:`batch_level_threshold`): run ToMe with a fixed ``r`` per layer over batches,
flatten all A rows' ``s`` of the batch, sort descending and take ``tau_l = s[r * B]`` (0-based: merging the
``s > tau`` edges merges exactly ``r * B`` of them across the batch when there are no ties; images get different
counts), clamped at 0; average over batches. The batch merge itself uses that batch threshold, so later
layers see the batch-level-merged tokens (the calibration loop is the caller's: ``train/vlm_paint_dymu.py``).

**VTU** (:func:`vtu_expand`, :func:`vtu_merge`, :func:`vtu_attention`): in the language model the merged
visual tokens are expanded to the original ``N`` positions (``x[mapping]``), RoPE is applied with the
*original* positions, full attention runs, and the outputs are re-merged by scatter-mean so the hidden
states stay compressed. Without RoPE on the visual tokens (the tiny VLM's decoder: no positions on image
tokens), the expanded copies of a merged token have identical q, k, v, so expand-then-attend equals
attention over the merged tokens with proportional attention (``log size`` key bias), and since every other
decoder op is per-token, expanding once before the decoder equals per-layer VTU exactly (tested).

**Fixed-shape representation** (deliberate, so everything is jit-able with per-image token counts): a merged
sequence keeps its ``[B, N, C]`` slots; ``sizes [B, N]`` is 0 for a slot whose token was merged away (its
``x`` row is 0 and attention masks it), ``mapping [B, N0]`` gives each original position's slot. The number of
tokens kept is ``(sizes > 0).sum(-1)``; :func:`compact` gathers the kept slots to the front. A and B
alternate over the kept tokens in slot (= spatial) order; ToMe's code reorders the kept tokens as
``[unmerged A, B]`` after a merge, which changes only which tokens are A and B in the next layer (deviation).
Not implemented: the RoPE-decomposed "exact VTU" kernel (it is an optimisation with the same output as
expand-then-attend).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["bipartite_similarity", "bipartite_merge", "proportional_attention", "batch_level_threshold",
           "vtu_expand", "vtu_merge", "vtu_attention", "compact", "tokens_kept", "initial_state"]


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    return f"shape {tuple(shape)} dtype {getattr(x, 'dtype', None)}" if shape is not None else type(x).__name__


def _float_array(name, x, ndim):
    if not hasattr(x, "shape") or not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array, got {_describe(x)}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got {_describe(x)}")
    return x


def _int_array(name, x, shape):
    if not hasattr(x, "shape") or not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an int array, got {_describe(x)}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {_describe(x)}")
    return x


def initial_state(batch: int, num: int):
    """``(sizes [B, N] = 1, mapping [B, N] = arange(N))``: an unmerged sequence."""
    return jnp.ones((batch, num), jnp.float32), jnp.broadcast_to(jnp.arange(num, dtype=jnp.int32), (batch, num))


def tokens_kept(sizes):
    """``[B]`` int: the slots still holding a token (``sizes > 0``)."""
    return (jnp.asarray(sizes) > 0).sum(-1)


def bipartite_similarity(metric, sizes, *, protect_first: bool = False):
    """``(s [B, N], match [B, N], is_a [B, N])``: A = kept tokens at even rank among the kept ones, B = odd
    rank; ``s_i = max_{j in B} cos(metric_i, metric_j)`` for ``i in A`` (``-inf`` elsewhere, and for a protected
    first token: the CLS row), ``match_i`` its argmax."""
    metric = _float_array("metric", metric, 3).astype(jnp.float32)
    B, N, _ = metric.shape
    sizes = _float_array("sizes", sizes, 2)
    if sizes.shape != (B, N):
        raise ValueError(f"sizes must be [B={B}, N={N}], got {_describe(sizes)}")
    return _similarity(metric, sizes, protect_first=bool(protect_first))


@functools.partial(jax.jit, static_argnames=("protect_first",))
def _similarity(metric, sizes, *, protect_first):
    valid = sizes > 0
    rank = jnp.cumsum(valid, axis=-1) - 1
    is_a = valid & (rank % 2 == 0)
    is_b = valid & (rank % 2 == 1)
    if protect_first:
        is_a = is_a.at[:, 0].set(False)
    m = metric / jnp.maximum(jnp.linalg.norm(metric, axis=-1, keepdims=True), 1e-12)
    cos = jnp.einsum("bic,bjc->bij", m, m, precision=jax.lax.Precision.HIGHEST)
    cos = jnp.where(is_b[:, None, :], cos, -jnp.inf)
    s = jnp.where(is_a, cos.max(-1), -jnp.inf)
    return s, jnp.argmax(cos, axis=-1).astype(jnp.int32), is_a


def bipartite_merge(x, metric, sizes=None, mapping=None, *, tau=None, r=None, protect_first: bool = False):
    """One DToMe step: ``(x' [B, N, C], sizes' [B, N], mapping' [B, N0])`` (see the module docstring).

    ``x [B, N, C]`` tokens, ``metric [B, N, Cm]`` (keys averaged over heads), ``sizes [B, N]`` (default 1;
    0 = an empty slot), ``mapping [B, N0]`` (default ``arange(N)``). Exactly one of ``tau`` (a threshold,
    scalar or ``[B]``; ``+inf`` merges nothing) or ``r`` (a fixed count per image, ToMe) is given. At most
    ``floor((t - protected) / 2)`` tokens merge, ``t`` the kept count; the most similar A tokens first.
    ``protect_first``: the first slot (a CLS token) never merges."""
    x = _float_array("x", x, 3)
    B, N, C = x.shape
    if (tau is None) == (r is None):
        raise ValueError(f"give exactly one of tau and r, got tau={tau!r} and r={r!r}")
    if sizes is None or mapping is None:
        s0, m0 = initial_state(B, N)
        sizes = s0 if sizes is None else sizes
        mapping = m0 if mapping is None else mapping
    sizes = jnp.asarray(sizes, jnp.float32)
    if metric.shape[:2] != (B, N):
        raise ValueError(f"metric must be [B={B}, N={N}, Cm], got {_describe(metric)}")
    if not hasattr(mapping, "shape") or mapping.ndim != 2 or mapping.shape[0] != B:
        raise ValueError(f"mapping must be an int array [B={B}, N0], got {_describe(mapping)}")
    _int_array("mapping", mapping, mapping.shape)
    if r is not None:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
            raise ValueError(f"r must be an int >= 0, got {r!r}")
        r = int(r)
    else:
        tau = jnp.asarray(tau, jnp.float32)
        if tau.ndim > 1 or (tau.ndim == 1 and tau.shape[0] != B):
            raise ValueError(f"tau must be a scalar or [B={B}], got {_describe(tau)}")
    return _merge(x, metric, sizes, mapping, tau, r=r, protect_first=bool(protect_first))


@functools.partial(jax.jit, static_argnames=("r", "protect_first"))
def _merge(x, metric, sizes, mapping, tau, *, r, protect_first):
    B, N, _ = x.shape
    s, match, is_a = bipartite_similarity(metric, sizes, protect_first=protect_first)
    t = (sizes > 0).sum(-1, keepdims=True) - (1 if protect_first else 0)
    cap = jnp.maximum(t, 0) // 2
    order = jnp.argsort(-s, axis=-1, stable=True)
    srank = jnp.argsort(order, axis=-1)                                   # 0 = most similar A token
    if r is not None:
        merge = is_a & (srank < jnp.minimum(cap, r))
    else:
        tau = tau.reshape(-1, 1) if tau.ndim == 1 else tau
        merge = is_a & (s > tau) & (srank < cap)
    dest = jnp.where(merge, match, jnp.arange(N)[None])                   # [B, N] slot -> slot
    onehot = jax.nn.one_hot(dest, N, dtype=jnp.float32) * merge[..., None]  # [B, src, dst] merged edges only
    incoming = onehot.sum(1) > 0                                           # [B, N] slots that receive a token
    xf = x.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    num = xf * (sizes * ~merge)[..., None] + jnp.einsum("bij,bi,bic->bjc", onehot, sizes, xf, precision=hi)
    new_sizes = sizes * ~merge + jnp.einsum("bij,bi->bj", onehot, sizes, precision=hi)
    new_x = jnp.where(incoming[..., None], num / jnp.where(new_sizes > 0, new_sizes, 1.0)[..., None], xf)
    new_x = jnp.where(merge[..., None], 0.0, new_x).astype(x.dtype)
    new_mapping = jnp.take_along_axis(dest, mapping, axis=1).astype(jnp.int32)
    return new_x, new_sizes, new_mapping


def proportional_attention(q, k, v, sizes, *, mask=None, **kwargs):
    """``jattn.attention(q, k, v)`` with ``log(sizes_j)`` added to every logit of key ``j`` (``sizes [B, S]``;
    a key with size 0 is masked out). Other keyword arguments go to :func:`jattn.attention`."""
    from jattn.ops.attention import attention
    sizes = _float_array("sizes", sizes, 2)
    if sizes.shape != (k.shape[0], k.shape[1]):
        raise ValueError(f"sizes must be [B={k.shape[0]}, S={k.shape[1]}], got {_describe(sizes)}")
    keep = sizes > 0
    bias = jnp.where(keep, jnp.log(jnp.where(keep, sizes, 1.0)), 0.0)[:, None, None, :]
    key_mask = keep[:, None, None, :]
    mask = key_mask if mask is None else (jnp.asarray(mask) & key_mask)
    return attention(q, k, v, bias=bias, mask=mask, **kwargs)


def batch_level_threshold(s, r: int):
    """The batch threshold of DyMU's calibration: ``s [B, N]`` (A rows finite, others ``-inf``) flattened over
    the batch, sorted descending, the value at 0-based rank ``r * B`` (so ``s > tau`` holds for exactly
    ``r * B`` edges without ties), clamped at 0. Past the last A row it is 0 (merge everything)."""
    s = _float_array("s", s, 2)
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
        raise ValueError(f"r must be an int >= 0, got {r!r}")
    flat = -jnp.sort(-s.reshape(-1))
    index = int(r) * s.shape[0]
    if index >= flat.shape[0]:
        return jnp.float32(0.0)
    value = flat[index]
    return jnp.maximum(jnp.where(jnp.isfinite(value), value, 0.0), 0.0)


def vtu_expand(x_merged, mapping):
    """``x_merged [B, N, ...]`` -> ``[B, N0, ...]``: each original position gets its slot's token."""
    if x_merged.ndim < 2:
        raise ValueError(f"x_merged must be [B, N, ...], got {_describe(x_merged)}")
    mapping = jnp.asarray(mapping)
    if mapping.ndim != 2 or mapping.shape[0] != x_merged.shape[0]:
        raise ValueError(f"mapping must be an int array [B={x_merged.shape[0]}, N0], got {_describe(mapping)}")
    idx = mapping.reshape(mapping.shape + (1,) * (x_merged.ndim - 2))
    return jnp.take_along_axis(x_merged, idx, axis=1)


def vtu_merge(x_full, mapping, num_slots: int):
    """Scatter-mean ``x_full [B, N0, ...]`` back to ``[B, num_slots, ...]`` (an empty slot gets 0)."""
    mapping = jnp.asarray(mapping)
    if mapping.shape != x_full.shape[:2]:
        raise ValueError(f"mapping must be [B, N0] = {tuple(x_full.shape[:2])}, got {_describe(mapping)}")

    return _scatter_mean(x_full, mapping, num_slots=int(num_slots))


@functools.partial(jax.jit, static_argnames=("num_slots",))
def _scatter_mean(x_full, mapping, *, num_slots):
    def one(xb, mb):
        total = jax.ops.segment_sum(xb.astype(jnp.float32), mb, num_segments=num_slots)
        count = jax.ops.segment_sum(jnp.ones(mb.shape, jnp.float32), mb, num_segments=num_slots)
        return total / jnp.maximum(count, 1.0).reshape((-1,) + (1,) * (xb.ndim - 1))

    return jax.vmap(one)(x_full, mapping).astype(x_full.dtype)


def vtu_attention(q_m, k_m, v_m, mapping, *, positions=None, rope_theta: float | None = None, **kwargs):
    """Expand-then-attend VTU: ``q_m, k_m, v_m [B, N, H, D]`` merged slots -> expanded to the ``N0`` original
    positions by ``mapping [B, N0]``, RoPE at ``positions [B|1, N0]`` when ``rope_theta`` is given, full
    :func:`jattn.attention` (``kwargs``), then scatter-mean back to ``[B, N, H, D]``."""
    from jattn.ops.attention import attention
    q, k, v = (vtu_expand(a, mapping) for a in (q_m, k_m, v_m))
    if rope_theta is not None:
        from jattn.nn.attention import apply_rope
        if positions is None:
            positions = jnp.arange(mapping.shape[1])[None]
        q, k = apply_rope(q, positions, theta=rope_theta), apply_rope(k, positions, theta=rope_theta)
    out = attention(q, k, v, **kwargs)
    return vtu_merge(out, mapping, q_m.shape[1])


def compact(x, sizes, mapping):
    """Gathers the kept slots to the front: ``(x [B, K, ...], sizes [B, K], mapping [B, N0])`` with ``K`` the
    largest kept count in the batch (rows with fewer keep zero-size padding slots at the end)."""
    keep = jnp.asarray(sizes) > 0
    K = int(np.asarray(keep.sum(-1)).max())
    order = jnp.argsort(~keep, axis=-1, stable=True)                       # kept slots first, in order
    new_pos = jnp.argsort(order, axis=-1)                                   # old slot -> new slot
    take = order[:, :K]
    xc = jnp.take_along_axis(x, take.reshape(take.shape + (1,) * (x.ndim - 2)), axis=1)
    return xc, jnp.take_along_axis(sizes, take, axis=1), jnp.take_along_axis(new_pos, mapping, axis=1)
