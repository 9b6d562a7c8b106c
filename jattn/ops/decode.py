"""``jattn.decode_attention``: a few new query tokens against a KV cache (contiguous or paged).

The decode family (P65 Lean Attention, P22 Duplex): ``impl="reference"`` is the dense fp32 oracle
(``decode_reference.py``), ``"xla"`` one pass over the cache in its own layout (``decode_xla.py``, the CPU
path), ``"pallas"`` the split-K, GQA-packed kernel (``pallas_kernels/decode.py``), whose per-split
partials are merged exactly with ``merge_partials``; ``"auto"`` is decided when the program is lowered
(``jattn.ops.dispatch``).

The rule: ``lengths[b]`` counts the valid keys of sequence ``b``, the ``Tq`` new tokens included (they are
already appended). New token ``t`` sits at position ``p = lengths[b] - Tq + t`` and sees keys ``kv`` with
``kv <= p`` (causal within the new tokens), ``kv < lengths[b]``, and with a window ``kv >= p - left``.
A row that sees nothing (``lengths[b] = 0``) gives ``out = 0`` and ``lse = -inf`` (``lse = sinks[h]`` with
sinks), as in ``jattn.core.reference``.

Gradients: every impl is differentiable in ``q`` and the caches (and ``sinks``). The Pallas impl's backward
is a Pallas kernel of the same split-K structure (``decode_partials_grad``): per split it recomputes its
tiles' probabilities from the merged forward's ``lse`` and writes dk/dv per logical tile and a dq partial;
XLA sums dq over the splits and reshapes dk/dv into a contiguous cache or scatter-adds them into the pool
through the page table. Both the ``out`` and the ``lse`` cotangents are used (``return_lse`` and the sinks,
merged outside the kernel's ``custom_vjp``, reach the kernel through ``lse``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jattn.core import checks
from jattn.core.softmax import merge_partials, merge_sinks
from jattn.ops.decode_reference import decode_attention_reference
from jattn.ops.decode_xla import decode_attention_xla
from jattn.ops.dispatch import run_impl
from pallas_kernels import common
from pallas_kernels.decode import decode_partials, decode_partials_grad

DEFAULT_PAGE = 128          # contiguous caches are cut into pages of this many keys (or the largest that divides)
MIN_PAGE = common.MIN_DOT_DIM
# Split-K: aim for this many (batch, kv head, split) programs, so a single sequence fills a GPU.
TARGET_PROGRAMS = 256


def _check_caches(q, k_cache, v_cache, page_table):
    """Returns ``(B, Tq, H, D, Hkv, Dv, capacity, page_size or None)`` after checking every shape and dtype."""
    checks.check_float_array("q", q)
    if q.ndim not in (3, 4):
        raise ValueError(f"q must be [B, H, D] (one new token) or [B, Tq, H, D], got {checks.describe(q)}")
    q4 = q[:, None] if q.ndim == 3 else q
    B, Tq, H, D = q4.shape
    checks.check_float_array("k_cache", k_cache, 4)
    checks.check_float_array("v_cache", v_cache, 4)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {checks.describe(cache)}")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"v_cache must match k_cache in all but the last dim, got k_cache "
                         f"{checks.describe(k_cache)} and v_cache {checks.describe(v_cache)}")
    Hkv, Dk, Dv = k_cache.shape[0 if page_table is not None else 1], k_cache.shape[3], v_cache.shape[3]
    if Dk != D:
        raise ValueError(f"k_cache's head dim must be q's D={D}, got {checks.describe(k_cache)}")
    if H % Hkv:
        raise ValueError(f"q's heads H={H} must be a multiple of the caches' kv heads Hkv={Hkv}")
    if page_table is None:
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache must be [B={B}, Hkv, S_max, D] (contiguous; pass page_table for a page "
                             f"pool [Hkv, num_pages, page_size, D]), got {checks.describe(k_cache)}")
        return B, Tq, H, D, Hkv, Dv, k_cache.shape[2], None
    if not hasattr(page_table, "dtype") or not jnp.issubdtype(page_table.dtype, jnp.integer):
        raise TypeError(f"page_table must be an integer array [B, max_pages], got {checks.describe(page_table)}")
    if page_table.ndim != 2 or page_table.shape[0] != B:
        raise ValueError(f"page_table must be [B={B}, max_pages], got {checks.describe(page_table)}")
    page_size = k_cache.shape[2]
    return B, Tq, H, D, Hkv, Dv, page_table.shape[1] * page_size, page_size


def _check_lengths(lengths, B: int, capacity: int):
    if not hasattr(lengths, "dtype") or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"lengths must be an integer array [B], got {checks.describe(lengths)}")
    if tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must have shape [B] = ({B},), got {checks.describe(lengths)}")
    if not checks.is_traced(lengths):
        values = np.asarray(lengths)
        if values.min(initial=0) < 0 or values.max(initial=0) > capacity:
            raise ValueError(f"lengths must lie in [0, S_max={capacity}], got {values.tolist()}")


def _check_page_table(page_table, lengths, num_pages: int, page_size: int):
    """Concrete tables: every page a sequence needs must exist in the pool."""
    if page_table is None or checks.is_traced((page_table, lengths)):
        return
    table, lens = np.asarray(page_table), np.asarray(lengths)
    for b in range(table.shape[0]):
        needed = table[b, :-(-int(lens[b]) // page_size)]
        if needed.size and (needed.min() < 0 or needed.max() >= num_pages):
            raise ValueError(f"page_table[{b}] points outside the pool of {num_pages} pages: it needs pages "
                             f"{needed.tolist()} for length {int(lens[b])}")


def _invalid_rows(lengths, page_table, capacity: int, num_pages: int, page_size: int):
    """``[B]`` bool: traced lengths or tables that are out of range (their rows become NaN, never silent)."""
    bad = (lengths < 0) | (lengths > capacity)
    if page_table is not None:
        tile = jnp.arange(page_table.shape[1])[None, :]
        needed = tile < (lengths[:, None] + page_size - 1) // page_size
        outside = (page_table < 0) | (page_table >= num_pages)
        bad = bad | jnp.any(needed & outside, axis=1)
    return bad


def decode_attention(q: Float[Array, "B *Tq H D"], k_cache: Float[Array, "..."], v_cache: Float[Array, "..."],
                     lengths: Int[Array, "B"], *, page_table: Int[Array, "B W"] | None = None, window=None,
                     sinks: Float[Array, "H"] | None = None, softcap: float | None = None,
                     scale: float | None = None, return_lse: bool = False, impl: str = "auto",
                     page_size: int | None = None, num_splits: int | None = None, interpret=None,
                     poison_outputs: bool = False):
    """Attention of new query tokens against a KV cache.

    Args:
      q: ``[B, H, D]`` (one new token per sequence) or ``[B, Tq, H, D]`` (a few: speculative or chunked
        prefill), causal within the new tokens.
      k_cache: head-major ``[B, Hkv, S_max, D]`` (contiguous), or a page pool
        ``[Hkv, num_pages, page_size, D]`` with ``page_table``. H must be a multiple of Hkv (GQA/MQA).
        Same dtype as q. (Head-major, as PyTorch's SDPA and JAX's TPU paged attention: each kv head's keys
        are contiguous, so every path reads them in place.)
      v_cache: like ``k_cache``, value dim ``Dv``.
      lengths: ``[B]`` int valid keys per sequence, the new tokens included, in ``[0, S_max]``. Cache rows
        past a sequence's length are never read, whatever they hold (NaN or Inf from a recycled page
        included), forward and backward.
      page_table: ``[B, max_pages]`` int: the pool page holding logical page ``i`` of sequence ``b``
        (S_max = max_pages * page_size). None for a contiguous cache.
      window: keys before each new token it may see: an int ``n`` or ``(left, right)`` in jattn's one window
        convention; decode is causal, so only ``left`` matters.
      sinks: ``[H]`` logits of one value-less extra softmax term per row (GPT-OSS).
      softcap: logits become ``softcap * tanh(s / softcap)``.
      scale: logit scale, default ``D ** -0.5``.
      return_lse: also return the float32 log-sum-exp.
      impl: "auto" | "xla" | "pallas" | "reference".
      page_size: the Pallas kernel's tile over a contiguous cache (a power of two >= 16 dividing S_max;
        default: the largest such <= 128). A page pool's tile is its page.
      num_splits: split-K ranges per sequence (default: enough for ~256 programs).
      interpret: Pallas only: None (decided at lowering), True/"triton" or "mosaic" (interpreted).
      poison_outputs: Pallas only: NaN-fill the kernel's outputs first (tests).

    Returns:
      ``out`` (q's shape with Dv, q's dtype), and with ``return_lse`` the float32 ``lse`` ``[B, H]`` or
      ``[B, Tq, H]``. Out-of-range traced ``lengths`` or page-table entries make that sequence's rows NaN.

    Raises:
      ValueError: a shape, a length or a page-table entry is out of range (named, before any kernel runs).
      TypeError: a dtype or a static argument is wrong (named, before any kernel runs).
    """
    checks.check_static("decode_attention", window=window, softcap=softcap, scale=scale, return_lse=return_lse,
                        impl=impl, page_size=page_size, num_splits=num_splits)
    B, Tq, H, D, Hkv, Dv, capacity, pool_page = _check_caches(q, k_cache, v_cache, page_table)
    _check_lengths(lengths, B, capacity)
    num_pages = k_cache.shape[1] if page_table is not None else B * capacity
    _check_page_table(page_table, lengths, num_pages, pool_page or 1)
    window = checks.check_window(window)
    window_left = None if window is None else window[0]
    checks.check_sinks(sinks, H)
    softcap = checks.check_positive_float("softcap", softcap)
    scale = D ** -0.5 if scale is None else checks.check_positive_float("scale", scale, allow_none=False)
    checks.check_choice("impl", impl, checks.IMPLS)
    page_size = checks.check_block_size("page_size", page_size, minimum=MIN_PAGE)
    if num_splits is not None:
        num_splits = checks.check_int("num_splits", num_splits)
    q4 = q[:, None] if q.ndim == 3 else q
    static = dict(window_left=window_left, softcap=softcap, scale=scale)

    def reference(q4, k_cache, v_cache, lengths, page_table, sinks):
        return decode_attention_reference(q4, k_cache, v_cache, lengths, page_table=page_table, sinks=sinks,
                                          **static)

    def xla(q4, k_cache, v_cache, lengths, page_table, sinks):
        return decode_attention_xla(q4, k_cache, v_cache, lengths, page_table=page_table, sinks=sinks, **static)

    def pallas(q4, k_cache, v_cache, lengths, page_table, sinks):
        tile = pool_page or _contiguous_page(capacity, page_size, impl)
        problem = _kernel_problem(D, Dv, tile)
        if problem is not None:
            if impl == "pallas":
                raise ValueError(problem)
            shapes = [jax.ShapeDtypeStruct((B, Tq, H, Dv), jnp.float32), jax.ShapeDtypeStruct((B, Tq, H), jnp.float32)]
            return tuple(common.unsupported_on_target(problem, shapes)(q4, k_cache, v_cache, lengths))
        plan = dict(tile=tile, num_splits=num_splits, interpret=interpret, poison_outputs=bool(poison_outputs),
                    **static)
        out, lse = _pallas_decode(_freeze(plan), q4, k_cache, v_cache, lengths, page_table)
        if sinks is not None:
            out, lse = merge_sinks(out, lse, sinks)
        return out, lse

    safe_lengths = jnp.clip(lengths, 0, capacity).astype(jnp.int32)
    safe_table = None if page_table is None else jnp.clip(page_table, 0, num_pages - 1).astype(jnp.int32)
    out, lse = run_impl(impl, (q4, k_cache, v_cache, safe_lengths, safe_table, sinks), xla=xla, pallas=pallas,
                        reference=reference)
    bad = _invalid_rows(lengths, page_table, capacity, num_pages, pool_page or 1)
    out = jnp.where(bad[:, None, None, None], jnp.nan, out).astype(q.dtype)
    lse = jnp.where(bad[:, None, None], jnp.nan, lse)
    if q.ndim == 3:
        out, lse = out[:, 0], lse[:, 0]
    return (out, lse) if return_lse else out


def _contiguous_page(capacity: int, page_size: int | None, impl: str) -> int | None:
    """The kernel's tile over a contiguous cache of ``capacity`` keys (None: no legal tile)."""
    if page_size is not None:
        if capacity % page_size:
            if impl == "pallas":
                raise ValueError(f"page_size={page_size} must divide the cache length S_max={capacity}")
            return None
        return page_size
    tile = DEFAULT_PAGE
    while tile >= MIN_PAGE and capacity % tile:
        tile //= 2
    return tile if tile >= MIN_PAGE else None


def _kernel_problem(D: int, Dv: int, tile: int | None) -> str | None:
    """Why the kernel cannot run this cache (the cache is never padded: that would copy it every step)."""
    if tile is None:
        return ("the Pallas decode kernel needs a cache length S_max that a power of two >= 16 divides "
                "(allocate the cache rounded up, or use impl='xla')")
    for name, dim in (("D", D), ("Dv", Dv)):
        if dim < MIN_PAGE or dim & (dim - 1):
            return f"the Pallas decode kernel needs head dims that are powers of two >= 16, got {name}={dim}"
    return None


def _freeze(plan: dict):
    return tuple(sorted(plan.items()))


def split_plan(B: int, Hkv: int, tiles: int, num_splits: int | None) -> tuple[int, int]:
    """``(num_splits, tiles_per_split)`` covering ``tiles`` tiles, about ``TARGET_PROGRAMS`` programs in all."""
    wanted = num_splits or -(-TARGET_PROGRAMS // (B * Hkv))
    per_split = -(-tiles // max(1, min(wanted, tiles)))
    return -(-tiles // per_split), per_split


def _pack_rows(q4, Hkv: int):
    """``[B, Tq, H, D]`` -> ``[B, Hkv, R, D]``: each kv head's rows ``(member, t)``, padded to a legal R."""
    B, Tq, H, D = q4.shape
    rows = (H // Hkv) * Tq
    packed = jnp.transpose(q4.reshape(B, Tq, Hkv, H // Hkv, D), (0, 2, 3, 1, 4)).reshape(B, Hkv, rows, D)
    return common.pad_axis(packed, 2, max(MIN_PAGE, common.next_power_of_two(rows)))


def _unpack_rows(x, Tq: int, H: int):
    """``[B, Hkv, R, ...]`` -> ``[B, Tq, H, ...]`` (drops padding rows)."""
    B, Hkv = x.shape[:2]
    G = H // Hkv
    x = x[:, :, :G * Tq].reshape(B, Hkv, G, Tq, *x.shape[3:])
    return jnp.moveaxis(x, 3, 1).reshape(B, Tq, H, *x.shape[4:])


def _layout(plan: dict, q4, k_cache, v_cache, page_table):
    """The kernels' view of the cache: ``(k_pages, v_pages, table, kernel arguments)`` (see
    ``pallas_kernels.decode``); the forward and the backward share it."""
    B, Tq, H, D = q4.shape
    tile = plan["tile"]
    if page_table is None:      # each sequence's own pages, in order: [B, Hkv, S / tile, tile, D]
        Hkv, S = k_cache.shape[1:3]
        page_table = jnp.broadcast_to(jnp.arange(S // tile, dtype=jnp.int32), (B, S // tile))
        k_pages = k_cache.reshape(B, Hkv, S // tile, tile, D)
        v_pages = v_cache.reshape(B, Hkv, S // tile, tile, v_cache.shape[-1])
    else:                       # one pool shared by every sequence: [1, Hkv, num_pages, page_size, D]
        Hkv = k_cache.shape[0]
        k_pages, v_pages = k_cache[None], v_cache[None]
    splits, per_split = split_plan(B, Hkv, page_table.shape[1], plan["num_splits"])
    width = common.next_power_of_two(max(page_table.shape[1], splits * per_split))
    table = common.pad_axis(page_table.astype(jnp.int32), 1, width)
    kwargs = dict(new_tokens=Tq, group=H // Hkv, num_splits=splits, tiles_per_split=per_split, scale=plan["scale"],
                  softcap=plan["softcap"], window=plan["window_left"], interpret=plan["interpret"],
                  poison_outputs=plan["poison_outputs"])
    return k_pages, v_pages, table, kwargs


def _kernel(plan: tuple, q4, k_cache, v_cache, lengths, page_table):
    plan = dict(plan)
    Tq, H = q4.shape[1:3]
    k_pages, v_pages, table, kwargs = _layout(plan, q4, k_cache, v_cache, page_table)
    Hkv = k_pages.shape[1]
    out, lse = decode_partials(_pack_rows(q4, Hkv), k_pages, v_pages, lengths, table, **kwargs)
    out, lse = merge_partials(jnp.moveaxis(out, 2, 0), jnp.moveaxis(lse[..., 0], 2, 0))
    return _unpack_rows(out, Tq, H), _unpack_rows(lse, Tq, H)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pallas_decode(plan, q4, k_cache, v_cache, lengths, page_table):
    return _kernel(plan, q4, k_cache, v_cache, lengths, page_table)


def _pallas_decode_fwd(plan, q4, k_cache, v_cache, lengths, page_table):
    out, lse = _kernel(plan, q4, k_cache, v_cache, lengths, page_table)
    return (out, lse), (q4, k_cache, v_cache, lengths, page_table, out, lse)


def _pallas_decode_bwd(plan, residuals, cotangents):
    """The split-K backward kernel (``decode_partials_grad``), then XLA: dq summed over the splits, dk/dv per
    logical tile reshaped into a contiguous cache or scatter-ADDED into the pool through the page table (a
    page two sequences share after a fork gets both contributions; tiles a sequence does not need are 0)."""
    q4, k_cache, v_cache, lengths, page_table, out, lse = residuals
    d_out, d_lse = cotangents
    plan = dict(plan)
    B, Tq, H = q4.shape[:3]
    k_pages, v_pages, table, kwargs = _layout(plan, q4, k_cache, v_cache, page_table)
    Hkv = k_pages.shape[1]
    # d lse / d s = p, so an lse cotangent shifts delta; rows that saw nothing (lse = -inf) get +inf: p = 0.
    delta = jnp.sum(out * d_out.astype(jnp.float32), axis=-1) - d_lse.astype(jnp.float32)
    lse_rows = jnp.where(jnp.isneginf(lse), jnp.inf, lse)
    dq, dk, dv = decode_partials_grad(
        _pack_rows(q4, Hkv), k_pages, v_pages, lengths, table, _pack_rows(d_out.astype(q4.dtype), Hkv),
        _pack_rows(lse_rows[..., None], Hkv), _pack_rows(delta[..., None], Hkv), **kwargs)
    dq = _unpack_rows(jnp.sum(dq, axis=2), Tq, H).astype(q4.dtype)
    if page_table is None:
        W = k_cache.shape[2] // plan["tile"]
        dk = dk[:, :, :W].reshape(k_cache.shape)
        dv = dv[:, :, :W].reshape(v_cache.shape)
    else:
        W = page_table.shape[1]
        pages = page_table.reshape(-1)

        def to_pool(tiles, cache):
            per_tile = jnp.moveaxis(tiles[:, :, :W], 1, 0).reshape(Hkv, B * W, *tiles.shape[3:])
            return jnp.zeros(cache.shape, jnp.float32).at[:, pages].add(per_tile)
        dk, dv = to_pool(dk, k_cache), to_pool(dv, v_cache)
    return dq, dk.astype(k_cache.dtype), dv.astype(v_cache.dtype), None, None


_pallas_decode.defvjp(_pallas_decode_fwd, _pallas_decode_bwd)
