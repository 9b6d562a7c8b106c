"""The pure-JAX ("xla") block-sparse path: work proportional to the listed tiles, forward and backward.

``block_sparse_attention(..., impl="xla")`` lands here (the CPU fast path, and the fallback everywhere).

Forward: row by row. Each q tile's listed kv tiles are gathered ``ROW_CHUNK`` (8) at a time into one
``[bq, 8 * bk]`` logit block (two plain GEMMs per chunk) and folded into the row's online softmax. Rows are
sorted by tile count and run in groups of ``ROW_BATCH`` (8) (``lax.map`` over groups, ``vmap`` inside): a
group runs as many chunks as its longest row needs, the last one 4 tiles wide when at most 4 are left, so an
empty row costs nothing and a full one its tiles (rounded up to 4). Slots past a row's count read whatever
the table holds there; their values are zeroed (their probabilities are 0, but ``0 * NaN`` is NaN). Against
the flat work list below, in one process (forward, B=1, H=8, D=64, f32): 1.25x (Bernoulli map), 1.35x
(causal) and 1.37x (vertical-slash) at T=16K with 128-tiles at 10 % density (``benchmarks/cpu_sparse.py``'s
maps), 1.25-1.57x on Kinetics' masks at T=32K: one GEMM pair per 8 tiles instead of per tile, and no segment
reductions or scatters.

Work list (the backward). The BlockMask's kv tables ``[Bm, Hm, nQ, maxK]`` are broadcast to
``[B, H, nQ, maxK]`` and flattened into one list of tiles ``(b, h, q block, kv block)``, in row order (all
tiles of one q block row are consecutive). Its static length is the table's capacity ``B * H * nQ * maxK``;
its dynamic length is the number of listed tiles. Tiles the causal flag hides entirely are dropped. The rest
are split into two lists, each still in row order:

* clean tiles: every element visible (full, or partial with nothing to apply: no ``mask_fn``, inside
  both sequences, below the causal diagonal) -- no mask is evaluated;
* masked tiles: the element mask (sequence end, causal, ``mask_fn`` on partial tiles) is applied.

Each list is processed in chunks of ``C`` tiles by a ``fori_loop`` whose trip count is
``ceil(count / C)`` (dynamic): chunks past the count never run, so a row with 0 tiles costs nothing and
a row with every tile costs its tiles, whatever the widest row. One chunk gathers its ``C`` q tiles and
``C`` kv tiles and computes ``C`` independent ``[bq, bk]`` tiles.

Backward (``custom_vjp``): the same two lists and chunks recompute ``p = exp(s - lse)``; dq is
segment-summed per q block and added to its rows, dk/dv are scatter-added to their kv tiles (GQA heads
sharing a kv head add up). Nothing is materialised per row at the widest row's width.

Semantics are exactly ``jattn.core.reference`` with ``BlockMask.to_dense_mask`` (and the causal flag):
fully masked rows give output 0 and lse ``-inf`` (never NaN); NaN in a visible logit gives NaN in that
row; tiles that are not listed are never read.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jattn.core.score_mod import ScoreModPlan, TracedScoreMod, apply_score_mod
from jattn.core.softmax import MASK_VALUE
from pallas_kernels.block_sparse import SparseConfig
from pallas_kernels.common import finalize_rows, pad_axis

__all__ = ["SparseConfig", "block_sparse_xla", "chunk_size", "work_lists"]

# Score elements per chunk: 8 tiles of 128 x 128, so a chunk's [C, bq, bk] temporaries (512 KiB each) stay
# in cache; on the 2-core CPU, 8 tiles ran ~10% faster than 4 or 16 (T=8K and 16K, 10% Bernoulli maps).
CHUNK_ELEMENTS = 8 * 128 * 128
MAX_CHUNK = 512
# The forward: a row's listed kv tiles ROW_CHUNK at a time, ROW_BATCH rows at a time. On the 2-core CPU, 8 and 8
# beat 4 and 16 tiles per chunk (T=8K Kinetics masks) and ran as fast as 16 rows per group.
ROW_CHUNK = 8
ROW_BATCH = 8


def chunk_size(block_q: int, block_k: int, capacity: int) -> int:
    """Tiles per chunk: about ``CHUNK_ELEMENTS`` score elements, at most the list's capacity."""
    return max(1, min(MAX_CHUNK, CHUNK_ELEMENTS // (block_q * block_k), capacity))


def block_sparse_xla(cfg: SparseConfig, q: Float[Array, "B T H D"], k: Float[Array, "B S Hkv D"],
                     v: Float[Array, "B S Hkv E"],
                     kv_tables: tuple[Int[Array, "Bm Hm nQ W"], Int[Array, "Bm Hm nQ"], Bool[Array, "Bm Hm nQ W"]],
                     *, score_mod: TracedScoreMod | None = None, mod_consts: tuple = ()
                     ) -> tuple[Float[Array, "B T H E"], Float[Array, "B T H"]]:
    """Block-sparse attention over the listed tiles, without sinks (``block_sparse_attention(impl="xla")``).

    Args:
      cfg: the call's static, hashable config, with ``mask_fn`` already resolved against the BlockMask.
      q: ``[B, T, H, D]``.
      k: ``[B, S, Hkv, D]``.
      v: ``[B, S, Hkv, E]``.
      kv_tables: the BlockMask's ``(kv_indices, kv_counts, kv_full)``.
      score_mod: a traced ``jattn.core.score_mod`` applied to every listed tile's logits after the softcap.
      mod_consts: the arrays it closes over; differentiable where float.

    Returns:
      ``out [B, T, H, E]`` float32 and ``lse [B, T, H]`` float32 (``-inf`` on rows with nothing visible).
    """
    mod = ScoreModPlan.of(score_mod, mod_consts)
    return _core(cfg, mod, q, k, v, tuple(kv_tables), tuple(mod_consts))


def _apply_mod(cfg, mod: ScoreModPlan, consts, float_consts, s, ch):
    """The score mod on a chunk's logits ``s [C, bq, bk]`` (padded positions read the last real one)."""
    bq, bk = cfg.block_q, cfg.block_k
    q_pos = jnp.minimum(ch["qb"][:, None, None] * bq + jnp.arange(bq, dtype=jnp.int32)[None, :, None], cfg.seq_q - 1)
    kv_pos = jnp.minimum(ch["kb"][:, None, None] * bk + jnp.arange(bk, dtype=jnp.int32)[None, None, :], cfg.seq_k - 1)
    return apply_score_mod(mod.traced, mod.merge(consts, float_consts), s, ch["b"][:, None, None],
                           ch["h"][:, None, None], q_pos, kv_pos)


# ---------------------------------------------------------------------------------- layout

def _geometry(cfg, q, k):
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    nQ, nK = math.ceil(cfg.seq_q / cfg.block_q), math.ceil(cfg.seq_k / cfg.block_k)
    return B, H, Hkv, nQ, nK


def _tiles(x, n: int, block: int):
    """``[B, L, Hx, E]`` -> ``[B * Hx * n, block, E]`` float32: tile ``(b * Hx + h) * n + i`` holds positions
    ``[i * block, (i + 1) * block)`` of head ``h`` (q rows with ``Hx = H``, kv tiles with ``Hx = Hkv``)."""
    B, _, Hx, E = x.shape
    x = pad_axis(x.astype(jnp.float32), 1, n * block).reshape(B, n, block, Hx, E)
    return x.transpose(0, 3, 1, 2, 4).reshape(B * Hx * n, block, E)


def _untile(x, B: int, Hx: int, length: int):
    """``[B * Hx * n, block, E]`` -> ``[B, length, Hx, E]`` (the inverse of ``_tiles``)."""
    E = x.shape[-1]
    return x.reshape(B, Hx, -1, E).transpose(0, 2, 1, 3)[:, :length]


def _rows_of(x, nQ: int, bq: int):
    """``[B, T, H]`` -> ``[B * H * nQ, bq]`` (the rows of ``_tiles``)."""
    return _tiles(x[..., None], nQ, bq)[..., 0]


# ---------------------------------------------------------------------------------- work lists

def work_lists(cfg: SparseConfig, tables, B: int, H: int, Hkv: int, nQ: int, nK: int):
    """Two row-ordered tile lists (clean, masked), each a dict of ``[N_pad]`` int32 arrays plus a count.

    Entry fields: ``row`` (q tile, ``R = B * H * nQ`` past the count), ``kv`` (kv tile, ``B * Hkv * nK``
    past the count), ``b``, ``h``, ``qb``, ``kb``, ``full``. Returns ``(lists, C)``; a list is None when
    it can hold nothing (decided statically).
    """
    indices, counts, full = tables
    W = indices.shape[-1]
    bq, bk = cfg.block_q, cfg.block_k
    shape = (B, H, nQ, W)
    indices = jnp.broadcast_to(indices, shape).astype(jnp.int32)
    full = jnp.broadcast_to(full, shape)
    counts = jnp.broadcast_to(counts, shape[:3])
    b = jnp.arange(B, dtype=jnp.int32)[:, None, None, None]
    h = jnp.arange(H, dtype=jnp.int32)[None, :, None, None]
    qb = jnp.arange(nQ, dtype=jnp.int32)[None, None, :, None]
    listed = jnp.arange(W, dtype=jnp.int32) < counts[..., None]
    needs_mask = jnp.zeros(shape, bool)
    if cfg.mask_fn is not None:
        needs_mask = needs_mask | ~full
    if cfg.seq_k % bk:
        needs_mask = needs_mask | (indices == nK - 1)
    if cfg.causal:
        q_first, q_last = qb * bq, jnp.minimum(qb * bq + bq, cfg.seq_q) - 1
        listed = listed & (indices * bk <= q_last)                    # tiles above the diagonal see nothing
        needs_mask = needs_mask | ((indices + 1) * bk - 1 > q_first)
    fields = dict(row=(b * H + h) * nQ + qb, kv=(b * Hkv + h // (H // Hkv)) * nK + indices, b=b, h=h, qb=qb,
                  kb=indices, full=full.astype(jnp.int32))
    fields = {name: jnp.broadcast_to(x, shape).reshape(-1) for name, x in fields.items()}
    capacity = B * H * nQ * W
    C = chunk_size(bq, bk, capacity)
    n_pad = -(-capacity // C) * C
    static_masked = cfg.mask_fn is not None or bool(cfg.seq_k % bk) or cfg.causal

    def compact(selected):
        count = jnp.sum(selected, dtype=jnp.int32)
        (order,) = jnp.nonzero(selected.reshape(-1), size=capacity, fill_value=0)
        live = jnp.arange(capacity) < count
        out = {name: jnp.take(x, order) for name, x in fields.items()}
        out["row"] = jnp.where(live, out["row"], B * H * nQ)
        out["kv"] = jnp.where(live, out["kv"], B * Hkv * nK)
        pad = n_pad - capacity
        out = {name: jnp.pad(x, (0, pad), constant_values=0) if pad else x for name, x in out.items()}
        if pad:
            out["row"] = out["row"].at[capacity:].set(B * H * nQ)
            out["kv"] = out["kv"].at[capacity:].set(B * Hkv * nK)
        out["count"] = count
        return out

    clean = compact(listed & ~needs_mask)
    masked = compact(listed & needs_mask) if static_masked else None
    return (clean, masked), C


def _chunk(lst, i, C: int):
    return {name: jax.lax.dynamic_slice_in_dim(x, i * C, C) for name, x in lst.items() if name != "count"}


def _segments(rows, C: int, sentinel: int):
    """Local segment id of each entry (runs of equal row) and each segment's row (``sentinel`` unused)."""
    new = jnp.concatenate([jnp.ones((1,), bool), rows[1:] != rows[:-1]])
    local = jnp.cumsum(new.astype(jnp.int32)) - 1
    seg_row = jnp.full((C,), sentinel, jnp.int32).at[local].set(rows)
    return local, seg_row


def _visibility(cfg, ch, C: int):
    """Element mask ``[C, bq, bk]`` of a chunk of tiles (the backward's masked list, the forward's row chunks)."""
    bq, bk = cfg.block_q, cfg.block_k
    q_pos = ch["qb"][:, None, None] * bq + jnp.arange(bq, dtype=jnp.int32)[None, :, None]
    kv_pos = ch["kb"][:, None, None] * bk + jnp.arange(bk, dtype=jnp.int32)[None, None, :]
    visible = jnp.ones((C, bq, bk), bool)
    if cfg.seq_k % bk:
        visible = visible & (kv_pos < cfg.seq_k)
    if cfg.causal:
        visible = visible & (kv_pos <= q_pos)
    if cfg.mask_fn is not None:
        chosen = cfg.mask_fn(ch["b"][:, None, None], ch["h"][:, None, None], jnp.minimum(q_pos, cfg.seq_q - 1),
                             jnp.minimum(kv_pos, cfg.seq_k - 1))
        chosen = jnp.broadcast_to(chosen, (C, bq, bk)).astype(bool)
        visible = visible & ((ch["full"] > 0)[:, None, None] | chosen)
    return visible


def _scores(cfg, q_t, k_t):
    """Logits ``[C, bq, bk]`` after scale and softcap, and the tanh the softcap backward needs."""
    s = jnp.einsum("cqd,ckd->cqk", q_t, k_t) * cfg.scale
    if cfg.softcap is None:
        return s, None
    t = jnp.tanh(s / cfg.softcap)
    return cfg.softcap * t, t


# ---------------------------------------------------------------------------------- forward

def _forward(cfg, mod, q, k, v, tables, consts):
    """Row by row: each q tile's listed kv tiles, ``ROW_CHUNK`` at a time, gathered into one
    ``[bq, ROW_CHUNK * bk]`` logit block with the online softmax across chunks; rows sorted by their tile
    count, ``ROW_BATCH`` at a time (see the module docstring)."""
    B, H, Hkv, nQ, nK = _geometry(cfg, q, k)
    T, E = q.shape[1], v.shape[-1]
    bq, bk = cfg.block_q, cfg.block_k
    indices, counts, full = tables
    W = indices.shape[-1]
    width = min(ROW_CHUNK, W)
    n_cols = -(-W // width) * width
    shape = (B, H, nQ, W)
    indices = pad_axis(jnp.broadcast_to(indices, shape).astype(jnp.int32), 3, n_cols)
    full = pad_axis(jnp.broadcast_to(full, shape), 3, n_cols, False)
    counts = jnp.broadcast_to(counts, shape[:3]).astype(jnp.int32)
    q_rows = _tiles(q, nQ, bq)                                                  # [B * H * nQ, bq, D]
    k_tiles, v_tiles = _tiles(k, nK, bk), _tiles(v, nK, bk)                     # [B * Hkv * nK, bk, D]
    b, h, qb = (x.reshape(-1) for x in jnp.meshgrid(jnp.arange(B, dtype=jnp.int32), jnp.arange(H, dtype=jnp.int32),
                                                    jnp.arange(nQ, dtype=jnp.int32), indexing="ij"))
    float_consts = () if mod is None else mod.split(consts)

    def chunk(start, size: int, state, x):
        """Tiles ``[start, start + size)`` of one row's list folded into the row's online softmax."""
        m, l, acc = state
        q_t, ids, flags, count, b, h, qb = x
        kv_base = (b * Hkv + h // (H // Hkv)) * nK
        listed = start + jnp.arange(size) < count
        kb = jax.lax.dynamic_slice_in_dim(ids, start, size)
        k_t = jnp.take(k_tiles, kv_base + kb, axis=0, mode="clip").reshape(size * bk, -1)
        v_t = jnp.take(v_tiles, kv_base + kb, axis=0, mode="clip")
        # slots past the count read whatever the table holds there: zero their values (p = 0, but 0 * NaN)
        v_t = jnp.where(listed[:, None, None], v_t, 0.0).reshape(size * bk, E)
        s = jnp.dot(q_t, k_t.T) * cfg.scale                                     # [bq, size * bk]
        if cfg.softcap is not None:
            s = cfg.softcap * jnp.tanh(s / cfg.softcap)
        # the chunk as the work list's [C, bq, bk] tiles (C = size), for the shared mask and score mod
        ch = dict(b=jnp.full((size,), b), h=jnp.full((size,), h), qb=jnp.full((size,), qb), kb=kb,
                  full=jax.lax.dynamic_slice_in_dim(flags, start, size).astype(jnp.int32))
        visible = _visibility(cfg, ch, size) & listed[:, None, None]
        visible = visible.transpose(1, 0, 2).reshape(bq, size * bk)
        if mod is not None:
            s = s.reshape(bq, size, bk).transpose(1, 0, 2)
            s = _apply_mod(cfg, mod, consts, float_consts, s, ch).transpose(1, 0, 2).reshape(bq, size * bk)
            visible = visible & (s > -jnp.inf)
        s = jnp.where(visible, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))                              # [bq]
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)                                              # m = -inf at the start: 0
        return m_new, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + jnp.dot(p, v_t)

    def group(xs):
        """ROW_BATCH rows together, to the group's longest row (a scalar trip count): whole chunks of ``width``
        tiles, then the rest in a chunk of ``width / 2`` when it fits there."""
        state = (jnp.full((ROW_BATCH, bq), -jnp.inf, jnp.float32), jnp.zeros((ROW_BATCH, bq), jnp.float32),
                 jnp.zeros((ROW_BATCH, bq, E), jnp.float32))

        def fold(start, size, state):
            return jax.vmap(functools.partial(chunk, start, size))(state, xs)

        longest = jnp.max(xs[3])
        whole = longest // width
        state = jax.lax.fori_loop(0, whole, lambda c, st: fold(c * width, width, st), state)
        rest, half = longest - whole * width, width // 2
        if half == 0:
            return state
        return jax.lax.switch(jnp.where(rest == 0, 0, jnp.where(rest <= half, 1, 2)),
                              [lambda st: st, lambda st: fold(whole * width, half, st),
                               lambda st: fold(whole * width, width, st)], state)

    rows = (q_rows, indices.reshape(-1, n_cols), full.reshape(-1, n_cols), counts.reshape(-1), b, h, qb)
    # Rows in order of their tile count, so a group runs about as long as each of its rows; padded to whole
    # groups with empty rows.
    R = B * H * nQ
    groups = -(-R // ROW_BATCH)
    order = jnp.argsort(counts.reshape(-1))
    sorted_rows = tuple(pad_axis(jnp.take(x, order, axis=0), 0, groups * ROW_BATCH) for x in rows)
    state = jax.lax.map(group, tuple(x.reshape(groups, ROW_BATCH, *x.shape[1:]) for x in sorted_rows))
    m_row, l_row, acc = (jnp.zeros((R, *x.shape[2:]), x.dtype).at[order].set(x.reshape(-1, *x.shape[2:])[:R])
                         for x in state)
    out, lse = finalize_rows(m_row, l_row, acc)                             # empty rows: l == 0; NaN stays NaN
    return _untile(out, B, H, T), _untile(lse[..., None], B, H, T)[..., 0]


# ---------------------------------------------------------------------------------- custom vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _core(cfg, mod, q, k, v, tables, consts):
    return _forward(cfg, mod, q, k, v, tables, consts)


def _core_fwd(cfg, mod, q, k, v, tables, consts):
    out, lse = _forward(cfg, mod, q, k, v, tables, consts)
    return (out, lse), (q, k, v, tables, consts, out, lse)


def _core_bwd(cfg, mod, residuals, cotangents):
    q, k, v, tables, consts, out, lse = residuals
    d_out, d_lse = cotangents
    B, H, Hkv, nQ, nK = _geometry(cfg, q, k)
    T, S, D = q.shape[1], k.shape[1], q.shape[-1]
    R = B * H * nQ
    bq = cfg.block_q
    q_rows = _tiles(q, nQ, bq)
    k_tiles, v_tiles = _tiles(k, nK, cfg.block_k), _tiles(v, nK, cfg.block_k)
    d_out = d_out.astype(jnp.float32)
    do_rows = _tiles(d_out, nQ, bq)
    # ds = p * (dp - delta), delta = rowsum(dO * out) - dlse (the lse output's own cotangent).
    delta = jnp.einsum("bthe,bthe->bth", d_out, out) - d_lse.astype(jnp.float32)
    delta_rows = _rows_of(delta, nQ, bq)
    lse_rows = _rows_of(jnp.where(jnp.isneginf(lse), 0.0, lse), nQ, bq)   # empty rows: p is masked to 0
    lists, C = work_lists(cfg, tables, B, H, Hkv, nQ, nK)

    def run(lst, masked: bool, state):
        def body(i, state):
            dq, dk, dv, d_consts = state
            ch = _chunk(lst, i, C)
            rows, kv = ch["row"], ch["kv"]
            q_t = jnp.take(q_rows, rows, axis=0, mode="clip")
            do_t = jnp.take(do_rows, rows, axis=0, mode="clip")
            k_t = jnp.take(k_tiles, kv, axis=0, mode="clip")
            v_t = jnp.take(v_tiles, kv, axis=0, mode="clip")
            s, tanh = _scores(cfg, q_t, k_t)
            mod_vjp = None
            if mod is not None:
                s, mod_vjp = jax.vjp(lambda s, fc: _apply_mod(cfg, mod, consts, fc, s, ch), s, mod.split(consts))
            p = jnp.exp(s - jnp.take(lse_rows, rows, axis=0, mode="clip")[..., None])
            if masked:
                p = jnp.where(_visibility(cfg, ch, C), p, 0.0)
            if mod is not None:  # past the count, a chunk's entries repeat real tiles: drop their gradient
                p = jnp.where((i * C + jnp.arange(C) < lst["count"])[:, None, None], p, 0.0)
            dv_t = jnp.einsum("cqk,cqe->cke", p, do_t)
            dp = jnp.einsum("cqe,cke->cqk", do_t, v_t)
            ds = p * (dp - jnp.take(delta_rows, rows, axis=0, mode="clip")[..., None])
            if mod_vjp is not None:
                ds, tile_d_consts = mod_vjp(ds)
                d_consts = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), d_consts, tile_d_consts)
            if tanh is not None:
                ds = ds * (1.0 - tanh * tanh)
            ds = ds * cfg.scale
            dq_t = jnp.einsum("cqk,ckd->cqd", ds, k_t)
            dk_t = jnp.einsum("cqk,cqd->ckd", ds, q_t)
            local, seg_row = _segments(rows, C, R)
            dq_seg = jax.ops.segment_sum(dq_t, local, num_segments=C, indices_are_sorted=True)
            dq = dq.at[seg_row].add(dq_seg, mode="drop")
            dk = dk.at[kv].add(dk_t, mode="drop")                          # past the count: kv is out of range
            dv = dv.at[kv].add(dv_t, mode="drop")
            return dq, dk, dv, d_consts

        n_chunks = (lst["count"] + C - 1) // C
        return jax.lax.fori_loop(0, n_chunks, body, state)

    float_consts = () if mod is None else mod.split(consts)
    state = (jnp.zeros_like(q_rows), jnp.zeros_like(k_tiles), jnp.zeros_like(v_tiles),
             jax.tree.map(lambda c: jnp.zeros(c.shape, jnp.float32), float_consts))
    clean, masked = lists
    state = run(clean, False, state)
    if masked is not None:
        state = run(masked, True, state)
    dq, dk, dv, d_float_consts = state
    dq = _untile(dq, B, H, T).astype(q.dtype)
    dk = _untile(dk, B, Hkv, S).astype(k.dtype)
    dv = _untile(dv, B, Hkv, S).astype(v.dtype)
    d_consts = () if mod is None else mod.merge(tuple(None for _ in consts),
                                                (d.astype(c.dtype) for d, c in zip(d_float_consts, float_consts)))
    return dq, dk, dv, None, d_consts


_core.defvjp(_core_fwd, _core_bwd)
