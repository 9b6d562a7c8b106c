"""``Attention``: multi-head attention whose core is any registered jattn method (see ``methods.py``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.cache import ContiguousKVCache, PagedKVCache
from jattn.core import checks
from jattn.nn.methods import get_method

# Decoding-cache kinds, and the options each takes (``init_cache(kind=..., **options)``): required, then optional.
CACHE_OPTIONS = {
    "contiguous": ((), ()),
    "paged": ((), ()),
    "int8": ((), ("group_size",)),
    "int4": ((), ("group_size",)),
    "h2o": (("n_hh", "n_recent"), ()),
    "duo": (("is_retrieval", "sink", "recent"), ()),
}
# Kinds that decide which tokens they keep: they run their own softmax prefill and per-token step.
SELECTING_KINDS = ("h2o", "duo")


def _check_cache_options(kind: str, options: dict) -> None:
    required, optional = CACHE_OPTIONS[kind]
    unknown = sorted(set(options) - set(required) - set(optional))
    if unknown:
        allowed = ", ".join(required + optional) or "none"
        raise ValueError(f"kind={kind!r} takes the cache options ({allowed}), got {unknown}")
    missing = [name for name in required if name not in options]
    if missing:
        raise ValueError(f"kind={kind!r} needs the cache options {missing}")


def _kv_method_caches():
    """``(QuantizedKVCache, H2OCache, DuoKVCache)``, imported when first needed: ``jattn.methods.kv`` builds
    on this module (P19's ``MLAAttention`` is an ``Attention``)."""
    from jattn.methods.kv.duo_attention import DuoKVCache
    from jattn.methods.kv.h2o import H2OCache
    from jattn.methods.kv.quantized import QuantizedKVCache
    return QuantizedKVCache, H2OCache, DuoKVCache


def _selecting_cache_attend(cache, q, k, v, *, scale, prefill: bool):
    """``(out [B, T, H, D], cache)`` through an H2O / DuoAttention cache: its own prefill over an empty cache
    (``prefill``), else one ``step`` per new token (each step's choice of kept tokens depends on the last)."""
    _, H2OCache, _ = _kv_method_caches()
    if prefill:
        if isinstance(cache, H2OCache):
            return H2OCache.prefill(q, k, v, n_hh=cache.n_hh, n_recent=cache.n_recent, scale=scale)
        return cache.prefill(q, k, v, scale=scale)
    outs = []
    for t in range(q.shape[1]):
        out, cache = cache.step(q[:, t], k[:, t], v[:, t], scale=scale)
        outs.append(out)
    return jnp.stack(outs, axis=1), cache


def rope_frequencies(head_dim: int, theta: float = 10000.0):
    """Inverse frequencies ``theta^(-2i/D)`` for ``i < D/2``."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    return theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def apply_rope(x, positions, *, theta: float = 10000.0):
    """Rotary embedding (rotate-half layout) of ``x [B, T, H, D]`` at integer ``positions [B|1, T]``.

    Rotating q and k this way makes ``q_i . k_j`` depend on positions only through ``i - j``."""
    checks.check_float_array("x", x, 4)
    positions = jnp.asarray(positions)
    if positions.ndim != 2 or positions.shape[1] != x.shape[1]:
        raise ValueError(f"positions must be [B or 1, T={x.shape[1]}], got shape {positions.shape}")
    inv_freq = jnp.asarray(rope_frequencies(x.shape[-1], theta), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, T, D/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


class Attention(nnx.Module):
    """Multi-head attention running jattn method ``method`` with its keyword config.

    ``method`` is any name in :func:`jattn.nn.available_methods` (generic ones and every built paper's
    method, e.g. ``"radial"``, ``"s2"``, ``"neighborhood"``); :func:`jattn.nn.describe_method` lists its
    config keys, defaults and meaning. ``causal`` is the flag of every jattn op; windows
    (``method="sliding_window", window=n``) mean what ``jattn.attention(window=...)`` means.

    ``x [B, T, dim] -> [B, T, dim]``. GQA with ``num_kv_heads``; ``rope=True`` rotates q and k;
    ``output_gate=True`` multiplies the heads' output by a linear gate ``x W_u`` (TransNormerLLM's GLA).
    For decoding, call :meth:`init_cache` once, then ``__call__(x, decode=True)`` with one or more new
    tokens at a time. ``return_probs=True`` also returns the attention map ``[B, H, T, S]``.
    """

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, num_kv_heads: int | None = None,
                 head_dim: int | None = None, method: str = "softmax", causal: bool = True,
                 rope: bool = False, rope_theta: float = 10000.0, use_bias: bool = False,
                 output_gate: bool = False, scale: float | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, **method_config):
        self.dim = _positive_int("dim", dim)
        self.num_heads = _positive_int("num_heads", num_heads)
        self.num_kv_heads = _positive_int("num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if head_dim is None and dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads} (or pass head_dim)")
        self.head_dim = _positive_int("head_dim", dim // num_heads if head_dim is None else head_dim)
        if rope and self.head_dim % 2:
            raise ValueError(f"rope=True needs an even head_dim, got {self.head_dim}")
        self.spec = get_method(method)
        self.method = method
        self.method_config = self.spec.validate(dict(method_config))
        self.causal = bool(causal)
        self.rope, self.rope_theta = bool(rope), float(rope_theta)
        self.scale = checks.check_positive_float("scale", scale)
        self.dtype = dtype
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim

        def linear(din, dout):
            return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.query, self.key, self.value = linear(dim, H * D), linear(dim, Hkv * D), linear(dim, Hkv * D)
        self.out = linear(H * D, dim)
        self.gate = linear(dim, H * D) if output_gate else None
        # Filled by init_cache; declared as data so NNX treats the later Cache variables as state.
        self.kv_cache = nnx.data(None)
        self.cache_state, self.cache_index = nnx.data(None), nnx.data(None)

    # --- decoding cache -------------------------------------------------------------------------

    def init_cache(self, batch_size: int, max_length: int, dtype=None, *, kind: str = "contiguous",
                   page_size: int = 16, **options) -> None:
        """Allocates an empty decoding cache for ``batch_size`` sequences of up to ``max_length`` tokens.

        Args:
          batch_size: sequences decoded together.
          max_length: tokens per sequence (rounded up to ``page_size``).
          dtype: the K/V dtype (default: the layer's dtype).
          kind: what the cache stores:

            * ``"contiguous"`` (``jattn.cache.ContiguousKVCache``) or ``"paged"`` (``jattn.cache.PagedKVCache``,
              a pool of ``batch_size * ceil(max_length / page_size)`` pages): every token, exact;
            * ``"int8"`` / ``"int4"`` (``jattn.methods.kv.quantized.QuantizedKVCache``): every token, keys
              quantised per channel over groups of ``group_size`` tokens (default 32), values per token;
            * ``"h2o"`` (P70's ``H2OCache``): ``n_hh`` heavy hitters plus the ``n_recent`` newest tokens per kv
              head, evicting the rest as decoding goes;
            * ``"duo"`` (P45's ``DuoKVCache``): kv heads flagged in ``is_retrieval [Hkv]`` keep every token,
              the others the ``sink`` first tokens and the ``recent`` newest.

            ``"h2o"`` and ``"duo"`` choose which tokens attention sees, so they need ``method="softmax"``.
          page_size: the page (and decode-kernel tile) size, a power of two >= 16.
          **options: the kind's options above.

        Raises:
          ValueError: an unknown kind, an option the kind does not take or a missing one, a selecting kind on
            a method other than softmax, or a method without decoding.
        """
        if self.spec.cache is None:
            raise ValueError(f"method {self.method!r} does not support decoding")
        B, L = _positive_int("batch_size", batch_size), _positive_int("max_length", max_length)
        checks.check_choice("kind", kind, tuple(CACHE_OPTIONS))
        _check_cache_options(kind, options)
        if self.spec.cache != "kv" and kind != "contiguous":
            raise ValueError(f"method {self.method!r} decodes through a state, not a KV cache; kind must be "
                             f"'contiguous', got {kind!r}")
        if kind in SELECTING_KINDS and self.method != "softmax":
            raise ValueError(f"kind={kind!r} decodes with its own softmax over the tokens it keeps; it needs "
                             f"method='softmax', got method={self.method!r}")
        page_size = checks.check_block_size("page_size", page_size, minimum=16)
        QuantizedKVCache, H2OCache, DuoKVCache = _kv_method_caches()
        dtype = self.dtype if dtype is None else dtype
        Hkv, D = self.num_kv_heads, self.head_dim
        self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))
        if self.spec.cache == "kv":
            pages = -(-L // page_size)
            if kind == "contiguous":
                cache = ContiguousKVCache.create(B, Hkv, L, D, dtype=dtype, page_size=page_size)
            elif kind == "paged":
                cache = PagedKVCache.create(B, Hkv, num_pages=B * pages, page_size=page_size, max_pages=pages,
                                            head_dim=D, dtype=dtype)
            elif kind in ("int8", "int4"):
                cache = QuantizedKVCache.create(B, Hkv, L, D, bits=int(kind[3:]), page_size=page_size,
                                                dtype=dtype, **options)
            elif kind == "h2o":
                cache = H2OCache.create(B, Hkv, D, dtype=dtype, **options)
            else:
                cache = DuoKVCache.create(B, options.pop("is_retrieval"), L, D, dtype=dtype, **options)
            self.kv_cache = nnx.Cache(cache)
        else:
            self.cache_state = nnx.Cache(jnp.zeros((B, self.num_heads, D, D), jnp.float32))
        self.cache_max_length = L

    def _decode_dense(self, cache, q, positions, return_probs):
        """Decoding for a method with a general pattern: ``decode_apply`` over the whole cache with the
        method's absolute-position mask (dense: O(cache length) per token)."""
        k, v = cache.contiguous()
        L = k.shape[2]
        q_pos = positions[0][:, None]
        kv_pos = jnp.arange(L)[None, :]
        visible = (kv_pos <= q_pos) & self.spec.decode_mask(self.method_config)(0, 0, q_pos, kv_pos)
        apply = self.spec.decode_apply or self.spec.apply
        result = apply(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), causal=False, mask=visible[None, None],
                       scale=self.scale, return_probs=return_probs, **self.method_config)
        return result if return_probs else (result, None)

    # --- forward --------------------------------------------------------------------------------

    def project(self, x, positions):
        """``(q [B, T, H, D], k, v [B, T, Hkv, D])`` of ``x [B, T, dim]`` at ``positions [B|1, T]`` (RoPE applied
        when the layer has it): the half of the layer before the attention core. Methods that replace the
        core (TidalDecode, DuoAttention's gates) call it with :meth:`finish`."""
        B, T, _ = x.shape
        q = self.query(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.key(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.value(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        if self.rope:
            q = apply_rope(q, positions, theta=self.rope_theta)
            k = apply_rope(k, positions, theta=self.rope_theta)
        return q, k, v

    def finish(self, x, out):
        """The half after the attention core: heads ``out [B, T, H, D]`` merged, gated, projected to dim."""
        B, T = out.shape[:2]
        out = out.reshape(B, T, self.num_heads * self.head_dim)
        if self.gate is not None:
            out = out * self.gate(x)
        return self.out(out.astype(self.dtype))

    def __call__(self, x, *, mask=None, positions=None, return_probs: bool = False, decode: bool = False,
                 prefill: bool = False):
        """``x [B, T, dim] -> [B, T, dim]`` (and the map ``[B, H, T, S]`` with ``return_probs``).

        ``decode=True`` appends the new tokens' K/V to the cache and attends over it. ``prefill=True``
        (with ``decode=True``) is the first call after :meth:`init_cache`: the tokens are cached and attend
        to each other through the method's own prefill path (the flash or block-sparse kernel), not the
        decode path; the cache must be empty."""
        checks.check_float_array("x", x, 3)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, dim={self.dim}], got shape {x.shape}")
        if return_probs and not self.spec.supports_probs:
            raise ValueError(f"method {self.method!r} has no attention probabilities; return_probs must be False")
        if prefill and not decode:
            raise ValueError("prefill=True fills the decoding cache: it needs decode=True")
        if decode:
            return self._decode(x, mask=mask, return_probs=return_probs, prefill=prefill)
        B, T, _ = x.shape
        if positions is None:
            positions = jnp.arange(T)[None]
        q, k, v = self.project(x, positions)
        result = self.spec.apply(q, k, v, causal=self.causal, mask=mask, scale=self.scale,
                                 return_probs=return_probs, **self.method_config)
        out, probs = result if return_probs else (result, None)
        out = self.finish(x, out)
        return (out, probs) if return_probs else out

    def _decode(self, x, *, mask, return_probs, prefill=False):
        if self.cache_index is None:
            raise ValueError("decode=True needs a cache: call init_cache(batch_size, max_length) first")
        if mask is not None:
            raise ValueError("mask is not supported with decode=True (the method's pattern applies)")
        if not self.causal:
            raise ValueError("decode=True needs a causal Attention (causal=True)")
        B, T, _ = x.shape
        index = self.cache_index[...]
        if prefill and not checks.is_traced(index) and int(index) != 0:
            raise ValueError(f"prefill=True needs an empty cache (call init_cache first); it holds {int(index)} tokens")
        positions = (index + jnp.arange(T))[None]
        q, k, v = self.project(x, positions)
        if self.spec.cache == "state":
            if return_probs:
                raise ValueError(f"method {self.method!r} decodes through a state; return_probs must be False")
            out, state = self.spec.apply(q, k, v, causal=True, mask=None, scale=self.scale,
                                         return_probs=False, initial_state=self.cache_state[...],
                                         return_final_state=True, **self.method_config)
            self.cache_state[...] = state.astype(jnp.float32)
        else:
            cache = self.kv_cache.get_value()
            if cache.lengths.shape[0] != B:
                raise ValueError(f"x has batch {B} but the cache was built for {cache.lengths.shape[0]}")
            if isinstance(cache, _kv_method_caches()[1:]):
                if return_probs:
                    raise ValueError(f"a {type(cache).__name__} keeps no attention maps; return_probs must be False")
                q, k, v = (part.astype(cache.dtype) for part in (q, k, v))
                out, cache = _selecting_cache_attend(cache, q, k, v, scale=self.scale, prefill=prefill)
                self.kv_cache.set_value(cache)
                self.cache_index[...] = index + T
                return self.finish(x, out)
            # Past the cache's capacity an append raises (concrete) or marks the sequence (NaN rows, traced).
            cache = cache.append(k.astype(cache.dtype), v.astype(cache.dtype))
            self.kv_cache.set_value(cache)
            if prefill:  # an empty cache: attention over the cache is the prompt's own causal attention
                result = self.spec.apply(q, k, v, causal=True, mask=None, scale=self.scale,
                                         return_probs=return_probs, **self.method_config)
                out, probs = result if return_probs else (result, None)
            elif self.spec.decode_kernel is not None and not return_probs:
                out, probs = cache.attend(q.astype(cache.dtype), scale=self.scale,
                                          **self.spec.decode_kernel(self.method_config)), None
            else:
                out, probs = self._decode_dense(cache, q, positions, return_probs)
        self.cache_index[...] = index + T
        out = self.finish(x, out)
        return (out, probs) if return_probs else out
