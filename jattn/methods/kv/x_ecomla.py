"""P19 — X-EcoMLA: Upcycling Pre-trained Attention into MLA for Efficient and Extreme KV Compression.

**Multi-head latent attention** (DeepSeek-V2/V3's MLA, the form X-EcoMLA's ``hybrid_mla_layer.py``
converts into). With weights as ``[in, out]`` matrices (``x @ W``), per token ``x``::

    q        = (x W_qa) W_qb                 split per head into q_nope [d_n] and q_rope [d_r]
    c_kv     = x W_kva                       the latent, r_kv values
    k_rope   = RoPE(x W_kr)                  one [d_r] key shared by every head
    [k_nope; v]_h = (c_kv W_kvb)_h           k_nope [d_n], v [d_v] per head
    score_h(i, j) = (q_nope_h(i) . k_nope_h(j) + RoPE(q_rope_h)(i) . k_rope(j)) / sqrt(d_n + d_r)
    out      = concat_h(softmax(score_h) v_h) W_o

Only ``c_kv`` and ``k_rope`` are cached: ``r_kv + d_r`` values per token and layer, against
``2 * Hkv * D`` for GQA (Llama-3.2-1B: 1024 vs 96 at ``r_kv = 64, d_r = 32``, 10.67x).

**Absorbed decode.** ``q_nope . k_nope_h(j) = (q_nope W_kb,h^T) . c_kv(j)``, so a new token's query is
moved into the latent space once and attends straight to the cache: keys ``[c_kv; k_rope]`` and values
``c_kv``, shared by all heads. That is multi-query attention with ``D = r_kv + d_r`` and ``Dv = r_kv``, so
it runs on ``jattn.decode_attention`` with ``Hkv = 1``; the per-head value up-projection ``W_vb,h`` is
applied to the latent output afterwards.

**Upcycling (SVD initialisation).** From a trained GQA layer (``W_q [dim, H*D]``, ``W_k, W_v [dim,
Hkv*D]``, RoPE on all D dims):

* ``W_q = A S B^T`` (truncated to ``r_q``): ``W_qa = A_r S_r``, ``W_qb = B_r^T``. Within each head the first
  ``d_n`` dims of ``q`` become ``q_nope`` and the last ``d_r`` become ``q_rope`` (``d_n + d_r = D``).
* ``W_k`` and ``W_v`` are repeated to the H query heads and concatenated, ``[W_k | W_v] = A S B^T``:
  ``W_kva = A_r S_r``, ``W_kvb = B_r^T`` with each head's key part truncated to its first ``d_n`` dims.
* ``W_kr`` = the mean over kv heads of the last ``d_r`` key dims of each head.

At full rank the nope and value projections are reproduced exactly; the rope part is exact only when
every kv head's rope dims agree (MQA), and the nope dims lose their rotation (the paper recovers both by
distillation: :func:`kd_kl_loss`, ``KL(teacher || student)`` on next-token distributions). A rank can be
fixed or chosen by energy: the smallest ``r`` with ``sum_{i<r} s_i^2 / sum s_i^2 >= ratio``, rounded up to a
multiple of 8 (as the official ``compute_svd``). DeepSeek's RMSNorm on the latents is left out (the
upcycled initialisation is exact only without it).

Our RoPE is jattn's rotate-half layout over the ``d_r`` rope dims (``jattn.nn.attention.apply_rope``).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from jattn.core import checks
from jattn.nn.attention import Attention, apply_rope
from jattn.ops.attention import attention
from jattn.ops.decode import decode_attention


class MLADims(NamedTuple):
    num_heads: int
    nope_dim: int       # d_n
    rope_dim: int       # d_r
    value_dim: int      # d_v
    kv_rank: int        # r_kv
    q_rank: int         # r_q

    @property
    def scale(self) -> float:
        return (self.nope_dim + self.rope_dim) ** -0.5


class MLAWeights(NamedTuple):
    w_qa: jax.Array     # [dim, r_q]
    w_qb: jax.Array     # [r_q, H * (d_n + d_r)]
    w_kva: jax.Array    # [dim, r_kv]
    w_kvb: jax.Array    # [r_kv, H * (d_n + d_v)]
    w_kr: jax.Array     # [dim, d_r]
    w_o: jax.Array      # [H * d_v, dim]


def check_dims(dims: MLADims) -> MLADims:
    for name, value in zip(MLADims._fields, dims):
        checks.check_int(f"dims.{name}", value)
    if dims.rope_dim % 2:
        raise ValueError(f"dims.rope_dim must be even (RoPE rotates pairs), got {dims.rope_dim}")
    return dims


def kv_values_per_token(dims: MLADims) -> int:
    """Cached values per token and layer: ``r_kv + d_r`` (the latent and the shared rope key)."""
    return dims.kv_rank + dims.rope_dim


def kv_compression(dims: MLADims, *, kv_heads: int, head_dim: int) -> float:
    """GQA's ``2 * Hkv * D`` cached values per token over MLA's ``r_kv + d_r``."""
    return 2 * kv_heads * head_dim / kv_values_per_token(dims)


# ------------------------------------------------------------------------------------------ forward

def mla_project(x: Float[Array, "B T dim"], weights: MLAWeights, dims: MLADims, positions: Int[Array, "B T"],
                *, theta: float = 10000.0):
    """``(q_nope [B,T,H,d_n], q_rope [B,T,H,d_r], c_kv [B,T,r_kv], k_rope [B,T,d_r])``, RoPE applied."""
    B, T, _ = x.shape
    H, dn, dr = dims.num_heads, dims.nope_dim, dims.rope_dim
    q = ((x @ weights.w_qa) @ weights.w_qb).reshape(B, T, H, dn + dr)
    q_nope, q_rope = q[..., :dn], apply_rope(q[..., dn:], positions, theta=theta)
    c_kv = x @ weights.w_kva
    k_rope = apply_rope((x @ weights.w_kr)[:, :, None], positions, theta=theta)[:, :, 0]
    return q_nope, q_rope, c_kv, k_rope


def expand_latent(c_kv: Float[Array, "B S r"], w_kvb, dims: MLADims):
    """The per-head ``k_nope [B,S,H,d_n]`` and ``v [B,S,H,d_v]`` a latent stands for."""
    B, S, _ = c_kv.shape
    kv = (c_kv @ w_kvb).reshape(B, S, dims.num_heads, dims.nope_dim + dims.value_dim)
    return kv[..., :dims.nope_dim], kv[..., dims.nope_dim:]


def mla_attention(x: Float[Array, "B T dim"], weights: MLAWeights, dims: MLADims, *, causal: bool = True,
                  positions=None, theta: float = 10000.0, impl: str = "auto") -> Float[Array, "B T dim"]:
    """MLA self-attention, the non-absorbed (prefill/training) form: latents expanded per head, then
    ``jattn.attention``.

    Args:
      x: ``[B, T, dim]`` inputs.
      weights: :class:`MLAWeights`.
      dims: :class:`MLADims`.
      causal: causal self-attention.
      positions: ``[B|1, T]`` RoPE positions (default ``0..T-1``).
      theta: RoPE base.
      impl: the ``jattn.attention`` impl.

    Returns:
      ``[B, T, dim]``.
    """
    checks.check_float_array("x", x, 3)
    check_dims(dims)
    B, T, _ = x.shape
    positions = jnp.arange(T)[None] if positions is None else positions
    q_nope, q_rope, c_kv, k_rope = mla_project(x, weights, dims, positions, theta=theta)
    k_nope, v = expand_latent(c_kv, weights.w_kvb, dims)
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], k_nope.shape[:3] + (dims.rope_dim,))], -1)
    # jattn.attention needs Dv == D: pad the values with zeros and drop the padding after
    pad = dims.nope_dim + dims.rope_dim - dims.value_dim
    if pad >= 0:
        out = attention(q, k, jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, pad))), causal=causal, scale=dims.scale,
                        impl=impl)[..., :dims.value_dim]
    else:
        q, k = (jnp.pad(t, ((0, 0), (0, 0), (0, 0), (0, -pad))) for t in (q, k))
        out = attention(q, k, v, causal=causal, scale=dims.scale, impl=impl)
    return out.reshape(B, T, -1) @ weights.w_o


def absorbed_query(q_nope: Float[Array, "B *T H dn"], q_rope, w_kvb, dims: MLADims):
    """A query moved into the latent space: ``[q_nope W_kb,h^T ; q_rope]``, ``[..., H, r_kv + d_r]``."""
    w_kb = w_kvb.reshape(dims.kv_rank, dims.num_heads, dims.nope_dim + dims.value_dim)[..., :dims.nope_dim]
    return jnp.concatenate([jnp.einsum("...hn,rhn->...hr", q_nope, w_kb), q_rope], axis=-1)


def mla_decode_absorbed(q_nope: Float[Array, "B Tq H dn"], q_rope: Float[Array, "B Tq H dr"],
                        latent_cache: Float[Array, "B 1 S R"], lengths: Int[Array, "B"], w_kvb,
                        dims: MLADims, *, impl: str = "auto") -> Float[Array, "B Tq H dv"]:
    """New tokens attending to an MLA latent cache without expanding it (the absorbed form).

    Args:
      q_nope: ``[B, Tq, H, d_n]`` query nope parts.
      q_rope: ``[B, Tq, H, d_r]`` query rope parts, RoPE applied.
      latent_cache: ``[B, 1, S_max, r_kv + d_r]``: ``[c_kv ; k_rope]`` per cached token (head-major, one
        "kv head"), the new tokens included.
      lengths: ``[B]`` valid cached tokens.
      w_kvb: ``[r_kv, H * (d_n + d_v)]``.
      dims: :class:`MLADims`.
      impl: the ``jattn.decode_attention`` impl.

    Returns:
      ``[B, Tq, H, d_v]`` per-head outputs (before ``W_o``), equal to the non-absorbed form.
    """
    check_dims(dims)
    R = dims.kv_rank + dims.rope_dim
    if latent_cache.ndim != 4 or latent_cache.shape[1] != 1 or latent_cache.shape[3] != R:
        raise ValueError(f"latent_cache must be [B, 1, S_max, r_kv + d_r = {R}], got {checks.describe(latent_cache)}")
    q_latent = absorbed_query(q_nope, q_rope, w_kvb, dims)
    out_latent = decode_attention(q_latent.astype(latent_cache.dtype), latent_cache,
                                  latent_cache[..., :dims.kv_rank], lengths, scale=dims.scale, impl=impl)
    w_vb = w_kvb.reshape(dims.kv_rank, dims.num_heads, dims.nope_dim + dims.value_dim)[..., dims.nope_dim:]
    return jnp.einsum("bthr,rhv->bthv", out_latent.astype(jnp.float32), w_vb)


# ------------------------------------------------------------------------------------------ upcycling

def energy_rank(singular_values, ratio: float, *, multiple: int = 8) -> int:
    """The smallest rank keeping ``ratio`` of the squared singular values, rounded up to ``multiple``."""
    ratio = checks.check_float_in("ratio", ratio, 0.0, 1.0, low_open=True)
    energy = np.cumsum(np.asarray(singular_values, np.float64) ** 2)
    rank = int(np.searchsorted(energy / energy[-1], ratio - 1e-12)) + 1
    return min(-(-rank // multiple) * multiple, len(energy))


def low_rank_factors(w, rank: int):
    """``(down [in, r], up [r, out])`` with ``down @ up`` the best rank-``r`` approximation of ``w``."""
    a, s, bt = jnp.linalg.svd(jnp.asarray(w, jnp.float32), full_matrices=False)
    return a[:, :rank] * s[:rank], bt[:rank]


def upcycle_gqa_to_mla(w_q: Float[Array, "dim HD"], w_k: Float[Array, "dim HkvD"], w_v: Float[Array, "dim HkvD"],
                       w_o: Float[Array, "HD dim"], *, num_heads: int, num_kv_heads: int, head_dim: int,
                       rope_dim: int, q_rank: int | None = None, kv_rank: int | None = None,
                       energy_ratio: float | None = None) -> tuple[MLAWeights, MLADims]:
    """MLA weights initialised from a trained GQA layer by SVD (X-EcoMLA's ``re_init_q``/``re_init_kv``).

    Args:
      w_q: ``[dim, H * D]``.
      w_k: ``[dim, Hkv * D]``.
      w_v: ``[dim, Hkv * D]``.
      w_o: ``[H * D, dim]`` (kept: ``d_v = D``).
      num_heads: H.
      num_kv_heads: Hkv.
      head_dim: D = ``d_n + d_r``.
      rope_dim: d_r, the last dims of each head that keep RoPE.
      q_rank: r_q (default: full rank).
      kv_rank: r_kv (default: ``energy_ratio``'s rank, else full rank).
      energy_ratio: choose ``r_kv`` (and ``r_q`` when not given) by kept energy.

    Returns:
      ``(MLAWeights, MLADims)``.

    Raises:
      ValueError: a weight whose shape does not match the head counts, or ``rope_dim`` outside ``(0, D)``.
    """
    H, Hkv, D = (checks.check_int(n, v) for n, v in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                                                    ("head_dim", head_dim)))
    dim = w_q.shape[0]
    for name, w, cols in (("w_q", w_q, H * D), ("w_k", w_k, Hkv * D), ("w_v", w_v, Hkv * D)):
        if w.ndim != 2 or w.shape != (dim, cols):
            raise ValueError(f"{name} must be [dim={dim}, {cols}], got {checks.describe(w)}")
    if w_o.shape != (H * D, dim):
        raise ValueError(f"w_o must be [{H * D}, dim={dim}], got {checks.describe(w_o)}")
    if H % Hkv:
        raise ValueError(f"num_heads={H} must be a multiple of num_kv_heads={Hkv}")
    if not 0 < rope_dim < D or rope_dim % 2:
        raise ValueError(f"rope_dim must be even and in (0, head_dim={D}), got {rope_dim}")
    dn = D - rope_dim
    per_head = lambda w, heads: w.reshape(dim, heads, D)  # noqa: E731
    k_heads = jnp.repeat(per_head(w_k, Hkv), H // Hkv, axis=1)                     # [dim, H, D]
    v_heads = jnp.repeat(per_head(w_v, Hkv), H // Hkv, axis=1)
    kv = jnp.concatenate([k_heads.reshape(dim, H * D), v_heads.reshape(dim, H * D)], axis=1)
    kv_singular = jnp.linalg.svd(kv, compute_uv=False)
    full = int(min(kv.shape))
    kv_rank = kv_rank or (energy_rank(kv_singular, energy_ratio) if energy_ratio else full)
    q_rank = q_rank or (energy_rank(jnp.linalg.svd(w_q, compute_uv=False), energy_ratio) if energy_ratio
                        else int(min(w_q.shape)))
    w_qa, w_qb = low_rank_factors(w_q, q_rank)
    w_kva, up = low_rank_factors(kv, kv_rank)
    up_k = up[:, :H * D].reshape(kv_rank, H, D)[..., :dn]                           # keys: nope dims only
    up_v = up[:, H * D:].reshape(kv_rank, H, D)
    w_kvb = jnp.concatenate([up_k, up_v], axis=-1).reshape(kv_rank, H * (dn + D))
    w_kr = jnp.mean(per_head(w_k, Hkv)[..., dn:], axis=1)
    dims = MLADims(H, dn, rope_dim, D, kv_rank, q_rank)
    return MLAWeights(w_qa, w_qb, w_kva, w_kvb, w_kr, jnp.asarray(w_o, jnp.float32)), dims


# ------------------------------------------------------------------------------------------ distillation

def kd_kl_loss(teacher_logits: Float[Array, "*N V"], student_logits: Float[Array, "*N V"], mask=None):
    """``KL(teacher || student)`` of next-token distributions, averaged over (masked) positions."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), -1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(t) * (t - s), -1)
    if mask is None:
        return jnp.mean(kl)
    mask = mask.astype(jnp.float32)
    return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class MLAAttention(nnx.Module):
    """An NNX MLA layer (``x [B, T, dim] -> [B, T, dim]``), causal, with a latent decoding cache.

    Build one from scratch (random weights) or from a trained :class:`jattn.nn.Attention` with
    :meth:`from_attention` (SVD upcycling)."""

    def __init__(self, dim: int, dims: MLADims, *, rngs: nnx.Rngs, rope_theta: float = 10000.0):
        self.dims = check_dims(MLADims(*dims))
        H, dn, dr, dv, r_kv, r_q = self.dims
        init = nnx.initializers.lecun_normal()
        shapes = dict(w_qa=(dim, r_q), w_qb=(r_q, H * (dn + dr)), w_kva=(dim, r_kv), w_kvb=(r_kv, H * (dn + dv)),
                      w_kr=(dim, dr), w_o=(H * dv, dim))
        for name, shape in shapes.items():
            setattr(self, name, nnx.Param(init(rngs.params(), shape, jnp.float32)))
        self.dim, self.rope_theta = dim, float(rope_theta)
        self.latent_cache, self.cache_lengths = nnx.data(None), nnx.data(None)

    @classmethod
    def from_attention(cls, layer: Attention, *, rope_dim: int, q_rank: int | None = None,
                       kv_rank: int | None = None, energy_ratio: float | None = None) -> "MLAAttention":
        """The MLA layer upcycled from a trained ``jattn.nn.Attention`` (softmax, no biases, no gate)."""
        if layer.query.bias is not None or layer.gate is not None:
            raise ValueError("from_attention needs an Attention without biases or output gate")
        weights, dims = upcycle_gqa_to_mla(
            layer.query.kernel[...], layer.key.kernel[...], layer.value.kernel[...], layer.out.kernel[...],
            num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads, head_dim=layer.head_dim,
            rope_dim=rope_dim, q_rank=q_rank, kv_rank=kv_rank, energy_ratio=energy_ratio)
        mla = cls(layer.dim, dims, rngs=nnx.Rngs(0), rope_theta=layer.rope_theta)
        for name, value in weights._asdict().items():
            getattr(mla, name)[...] = value
        return mla

    def weights(self) -> MLAWeights:
        return MLAWeights(*(getattr(self, name)[...] for name in MLAWeights._fields))

    def init_cache(self, batch_size: int, max_length: int, *, kind: str = "contiguous", page_size: int = 16) -> None:
        """An empty latent cache ``[B, 1, max_length, r_kv + d_r]`` (``max_length`` rounded up to
        ``page_size``; ``kind`` must be "contiguous": MLA's cache is one latent buffer)."""
        checks.check_choice("kind", kind, ("contiguous",))
        page_size = checks.check_block_size("page_size", page_size, minimum=16)
        length = -(-checks.check_int("max_length", max_length) // page_size) * page_size
        B = checks.check_int("batch_size", batch_size)
        self.latent_cache = nnx.Cache(jnp.zeros((B, 1, length, kv_values_per_token(self.dims)), jnp.float32))
        self.cache_lengths = nnx.Cache(jnp.zeros((B,), jnp.int32))

    def __call__(self, x, *, mask=None, positions=None, return_probs: bool = False, decode: bool = False,
                 prefill: bool = False):
        """``x [B, T, dim] -> [B, T, dim]``; the keywords match :class:`jattn.nn.Attention` so the layer
        drops into a ``TransformerBlock``. ``decode=True`` appends to the latent cache and attends in the
        absorbed form (``prefill`` changes nothing: the absorbed form is exact for a prompt too)."""
        checks.check_float_array("x", x, 3)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, dim={self.dim}], got shape {x.shape}")
        if mask is not None or return_probs:
            raise ValueError("MLAAttention is causal self-attention: mask must be None and return_probs False")
        if not decode:
            return mla_attention(x, self.weights(), self.dims, positions=positions, theta=self.rope_theta)
        if self.latent_cache is None:
            raise ValueError("decode=True needs a cache: call init_cache(batch_size, max_length) first")
        B, T, _ = x.shape
        cache, lengths = self.latent_cache[...], self.cache_lengths[...]
        capacity = cache.shape[2]
        if not checks.is_traced(lengths) and int(jnp.max(lengths)) + T > capacity:
            raise ValueError(f"appending {T} tokens passes the latent cache's capacity {capacity}")
        positions = lengths[:, None] + jnp.arange(T)[None]
        w = self.weights()
        q_nope, q_rope, c_kv, k_rope = mla_project(x, w, self.dims, positions, theta=self.rope_theta)
        new = jnp.concatenate([c_kv, k_rope], axis=-1)[:, None]                    # [B, 1, T, R]
        fits = lengths + T <= capacity

        def write(buffer, new, at, ok):  # an overflowing (traced) append rewrites what is there
            at = (0, jnp.minimum(at, capacity - T), 0)
            return jax.lax.dynamic_update_slice(buffer, jnp.where(ok, new, jax.lax.dynamic_slice(buffer, at, new.shape)), at)
        cache = jax.vmap(write)(cache, new.astype(cache.dtype), lengths, fits)
        # an overflowed sequence gets length capacity + 1, which decode_attention turns into NaN rows
        lengths = jnp.where(fits, lengths + T, capacity + 1).astype(jnp.int32)
        self.latent_cache[...], self.cache_lengths[...] = cache, lengths
        out = mla_decode_absorbed(q_nope, q_rope, cache, lengths, w.w_kvb, self.dims)
        return out.reshape(B, T, -1) @ w.w_o
