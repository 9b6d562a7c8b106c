"""The paper methods that :class:`jattn.nn.Attention` runs by name: one adapter per catalogue method.

``jattn/catalog.py`` says which built paper is which ``Attention(method=...)`` name (``Paper.layer_methods``)
and, for a built paper that is not an attention layer, why (``Paper.not_a_layer``). :func:`register_all`
registers the adapters below in that order, and fails when a catalogue name has no adapter or an
adapter has no catalogue row: the registry is derived from the catalogue.

Every adapter takes the layer's ``q [B, T, H, D]``, ``k, v [B, T, Hkv, D]`` (self-attention: ``T == S``)
and a keyword config of plain literals (ints, floats, strings, tuples), so a config file or a command
line (``model.method=radial model.method_config.frames=8``) can choose it. Its options (keys, defaults,
meaning) are documented in ``AttentionMethod.options`` and printed by :func:`jattn.nn.describe_method`.

Mask-pattern methods build the method's own ``BlockMask`` (with the mask function it carries) from the
config and the sequence length, and run ``jattn.block_sparse_attention`` on it, intersected with the
layer's causal flag; with ``causal=False`` each equals the method's op-level function (tests/nn check it).
A padding ``mask`` or ``return_probs=True`` runs the same pattern densely through the fp32 reference.
Methods whose pattern depends on the sequence length have no decoding cache (``cache=None``).
"""
from __future__ import annotations

import functools
import importlib
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core import checks
from jattn.nn.methods import REQUIRED, AttentionMethod, Option, dense_softmax, make_validate

# ---------------------------------------------------------------------------------- option converters


def _int(minimum: int = 0):
    def convert(key, value):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{key} must be an int, got {value!r}")
        if value < minimum:
            raise ValueError(f"{key} must be an int >= {minimum}, got {value!r}")
        return int(value)
    return convert


def _optional(convert):
    return lambda key, value: None if value is None else convert(key, value)


def _positive_float(key, value):
    return checks.check_positive_float(key, value, allow_none=False)


def _power_of_two(key, value):
    return checks.check_block_size(key, value, minimum=16)


def _choice(*allowed):
    def convert(key, value):
        checks.check_choice(key, value, allowed)
        return value
    return convert


def _ints(length: int | None = None, minimum: int = 1):
    """An int, or a tuple/list of ints (of ``length`` when given); returns an int or a tuple."""
    one = _int(minimum)

    def convert(key, value):
        if isinstance(value, (tuple, list)):
            if not value or (length is not None and len(value) != length):
                want = f"{length} ints" if length else "ints"
                raise ValueError(f"{key} must be an int or a tuple of {want}, got {value!r}")
            return tuple(one(key, x) for x in value)
        return one(key, value)
    return convert


def _grid(key, value):
    """A tuple of 1-3 positive ints: the spatial shape the T tokens form (row-major)."""
    if not isinstance(value, (tuple, list)) or not 1 <= len(value) <= 3:
        raise TypeError(f"{key} must be a tuple of 1 to 3 ints (the spatial shape of the T tokens), got {value!r}")
    return tuple(_int(1)(key, x) for x in value)


def _grid2(key, value):
    grid = _grid(key, value)
    if len(grid) != 2:
        raise ValueError(f"{key} must be a pair (height, width), got {value!r}")
    return grid


def _numbers(key, value):
    """A number or a tuple of numbers (one per head)."""
    def number(x):
        if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) or not math.isfinite(x):
            raise TypeError(f"{key} must be a finite number or a tuple of them (one per head), got {value!r}")
        return float(x)
    if isinstance(value, (tuple, list)):
        return tuple(number(x) for x in value)
    return number(value)


def _impl(key, value):
    checks.check_choice(key, value, checks.IMPLS)
    return value


IMPL = Option("impl", "auto", "jattn impl: 'auto' | 'xla' | 'pallas' | 'reference'", _impl)
BLOCK = Option("block", 64, "kernel tile (block_q = block_k), a power of two >= 16", _power_of_two)


# ---------------------------------------------------------------------------------- shared machinery


def _self_attention(name, q, k):
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"method {name!r} is self-attention and needs T == S (q and k over the same sequence), "
                         f"got q {checks.describe(q)} and k {checks.describe(k)}")
    return q.shape[1], q.shape[2], k.shape[2]


@functools.lru_cache(maxsize=256)
def _cached_block_mask(name, builder, items, T, H, Hkv, causal):
    with jax.ensure_compile_time_eval():  # static pattern: concrete tables even when traced under jit
        return builder(dict(items), T, H, Hkv, causal)


def pattern_block_mask(name: str, config: dict, T: int, H: int, Hkv: int, causal: bool):
    """The ``BlockMask`` (carrying its mask function) that method ``name`` runs for this config and shape."""
    spec = PATTERNS[name]
    items = tuple(sorted((k, v) for k, v in config.items() if k != "impl"))
    return _cached_block_mask(name, spec, items, T, H, Hkv, bool(causal))


def _pattern_apply(name):
    def apply(q, k, v, *, causal, mask, scale, return_probs, impl="auto", **config):
        T, H, Hkv = _self_attention(name, q, k)
        from jattn.ops.block_sparse import block_sparse_attention
        bm = pattern_block_mask(name, config, T, H, Hkv, causal)
        if mask is not None or return_probs:
            pattern = bm.to_dense_mask(heads=H)
            return dense_softmax(q, k, v, causal=causal, mask=pattern if mask is None else mask & pattern,
                                 scale=scale, return_probs=return_probs, impl="reference")
        return block_sparse_attention(q, k, v, bm, causal=bool(causal), scale=scale, impl=impl)
    return apply


# Builders: (config, T, H, Hkv, causal) -> BlockMask carrying its mask function (or with full tiles only).
PATTERNS: dict[str, Callable] = {}


def _pattern(name):
    def register(builder):
        PATTERNS[name] = builder
        return builder
    return register


def _frames_layout(config, T):
    frames, text = config["frames"], config["text"]
    if T <= text or (T - text) % frames:
        raise ValueError(f"method 'radial': T - text = {T} - {text} must be a positive multiple of frames={frames} "
                         f"(T = frames * tokens_per_frame + text)")
    return frames, (T - text) // frames, text


@_pattern("radial")
def _radial(config, T, H, Hkv, causal):
    from jattn.methods.sparse.radial import radial_attention_mask
    frames, per_frame, text = _frames_layout(config, T)
    return radial_attention_mask(frames, per_frame, text, block=config["block"], decay_factor=config["decay_factor"],
                                 model=config["model"], granularity=config["granularity"])


@_pattern("s2")
def _s2(config, T, H, Hkv, causal):
    from jattn.methods.sparse.s2 import s2_attention_mask
    return s2_attention_mask(H, T, config["block"], local_blocks=config["local_blocks"],
                             vert_stride=config["vert_stride"], num_dense_heads=config["num_dense_heads"],
                             head_offset=config["head_offset"], num_kv_heads=Hkv,
                             head_sliding_step=config["head_sliding_step"], causal=causal)


@_pattern("moa")
def _moa(config, T, H, Hkv, causal):
    from jattn.methods.sparse.moa import _alphas_betas, moa_attention_mask
    alphas, betas = _alphas_betas(config["alphas"], config["betas"], H)
    return moa_attention_mask(alphas, betas, T, config["block"])


@_pattern("naavit")
def _naavit(config, T, H, Hkv, causal):
    from jattn.methods.sparse.saisa import naavit_block_mask
    P, V = config["prefix"], config["visual"]
    if P + V > T:
        raise ValueError(f"method 'naavit': prefix + visual = {P + V} exceeds the sequence length T={T}")
    return naavit_block_mask(P, V, T - P - V, block_q=config["block"], block_k=config["block"])


def _group(config, T):
    from jattn.methods.sparse.sinklora import shifted_group_size
    if config["group_size"] is None:
        return shifted_group_size(T, config["group_ratio"])
    if config["group_size"] > T:
        raise ValueError(f"group_size must be <= the sequence length T={T}, got {config['group_size']}")
    return config["group_size"]


@_pattern("sinklora_s2")
def _sinklora_s2(config, T, H, Hkv, causal):
    from jattn.methods.sparse.sinklora import shifted_sparse_block_mask
    return shifted_sparse_block_mask(T, H, _group(config, T), block_q=config["block"], block_k=config["block"])


@_pattern("sinklora_sf")
def _sinklora_sf(config, T, H, Hkv, causal):
    from jattn.methods.sparse.sinklora import sf_block_mask
    return sf_block_mask(T, H, _group(config, T), config["sinks"], block_q=config["block"], block_k=config["block"])


def _check_grid(name, grid, T, text=0):
    if math.prod(grid) + text != T:
        extra = f" + text={text}" if text else ""
        raise ValueError(f"method {name!r}: grid={grid}{extra} holds {math.prod(grid) + text} tokens, but the "
                         f"sequence has T={T}")


@_pattern("davit_window")
def _davit_window(config, T, H, Hkv, causal):
    from jattn.core.block_mask import BlockMask
    from jattn.methods.sparse.davit import window_mask_fn
    _check_grid("davit_window", config["grid"], T)
    fn = window_mask_fn(config["grid"], config["window_size"])
    return BlockMask.from_mask_fn(fn, 1, 1, T, T, config["block"], config["block"])


@_pattern("clear")
def _clear(config, T, H, Hkv, causal):
    from jattn.methods.sparse.clear import clear_block_mask
    _check_grid("clear", config["grid"], T, config["text"])
    return clear_block_mask(config["grid"], config["text"], config["radius"], block_q=config["block"],
                            block_k=config["block"])


# ---------------------------------------------------------------------------------- grid methods


def _neighborhood_apply(q, k, v, *, causal, mask, scale, return_probs, kernel_size, grid=None, stride=1,
                        dilation=1, impl="auto"):
    from jattn.ops.neighborhood import neighborhood_attention, neighborhood_mask
    T, H, Hkv = _self_attention("neighborhood", q, k)
    grid = (T,) if grid is None else grid
    _check_grid("neighborhood", grid, T)
    if mask is not None or return_probs:
        pattern = jnp.asarray(neighborhood_mask(grid, kernel_size, stride=stride, dilation=dilation,
                                                causal=bool(causal)))
        return dense_softmax(q, k, v, causal=False, mask=pattern if mask is None else mask & pattern, scale=scale,
                             return_probs=return_probs, impl="reference")
    B = q.shape[0]
    to_grid = lambda x: x.reshape(B, *grid, *x.shape[2:])
    out = neighborhood_attention(to_grid(q), to_grid(k), to_grid(v), kernel_size, stride=stride, dilation=dilation,
                                 causal=bool(causal), scale=scale, impl=impl)
    return out.reshape(B, T, H, out.shape[-1])


def _non_causal(name, causal, mask, return_probs):
    if causal:
        raise ValueError(f"method {name!r} is bidirectional (its paper defines no causal form, and jattn has none): "
                         f"build Attention(..., causal=False)")
    if mask is not None or return_probs:
        raise ValueError(f"method {name!r} takes no mask and has no attention probabilities "
                         f"(mask=None, return_probs=False)")


def _repeat_kv(k, v, H):
    group = H // k.shape[2]
    return (jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)) if group > 1 else (k, v)


def _biformer_apply(q, k, v, *, causal, mask, scale, return_probs, grid, regions, topk, impl="auto"):
    from jattn.methods.sparse.biformer import bi_level_routing_attention
    _non_causal("biformer", causal, mask, return_probs)
    T, H, Hkv = _self_attention("biformer", q, k)
    _check_grid("biformer", grid, T)
    k, v = _repeat_kv(k, v, H)
    B = q.shape[0]
    to_grid = lambda x: x.reshape(B, *grid, *x.shape[2:])
    out = bi_level_routing_attention(to_grid(q), to_grid(k), to_grid(v), regions, topk, scale=scale, impl=impl)
    return out.reshape(B, T, H, out.shape[-1])


def _linfusion_apply(q, k, v, *, causal, mask, scale, return_probs, feature_map="elu1", eps=1e-4):
    from jattn.methods.linear.linfusion import generalized_linear_attention
    _non_causal("linfusion", causal, mask, return_probs)
    _self_attention("linfusion", q, k)
    k, v = _repeat_kv(k, v, q.shape[2])
    return generalized_linear_attention(q, k, v, eps=eps, feature_map=feature_map)


def _agent_apply(q, k, v, *, causal, mask, scale, return_probs, grid, num_agents):
    from jattn.methods.linear.agent import agent_attention, pool_agents
    _non_causal("agent", causal, mask, return_probs)
    T, H, Hkv = _self_attention("agent", q, k)
    _check_grid("agent", grid, T)
    k, v = _repeat_kv(k, v, H)
    return agent_attention(q, k, v, pool_agents(q, grid, num_agents), scale=scale)


# ---------------------------------------------------------------------------------- dynamic selectors


def _selector_apply(name, module: str, function: str):
    """A dynamic-sparse prefill selector (``jattn.methods.dynamic``): it reads this call's q and k, picks tiles
    and runs the block-sparse kernel on them. Causal self-attention only, no padding mask, no probabilities."""
    def apply(q, k, v, *, causal, mask, scale, return_probs, **config):
        _self_attention(name, q, k)
        if not causal:
            raise ValueError(f"method {name!r} selects tiles for causal prefill (its paper's setting): build "
                             f"Attention(..., causal=True)")
        if mask is not None or return_probs:
            raise ValueError(f"method {name!r} takes no padding mask and returns no attention probabilities; its "
                             f"chosen tiles are jattn.methods.dynamic.{module}.{name}_block_mask")
        attention = getattr(importlib.import_module(f"jattn.methods.dynamic.{module}"), function)
        return attention(q, k, v, scale=scale, **config)
    return apply


def _selector_adapter(name, module, options, description):
    return _adapter(name, _selector_apply(name, module, f"{name}_attention"), (*options, IMPL), description,
                    supports_probs=False)


def _modifier(module: str, factory: str):
    """A training-free modifier's own ``AttentionMethod`` (``jattn.methods.modifiers.<module>.<factory>()``)."""
    return getattr(importlib.import_module(f"jattn.methods.modifiers.{module}"), factory)()


def _fraction(key, value):
    value = _positive_float(key, value)
    if value > 1:
        raise ValueError(f"{key} must be in (0, 1], got {value!r}")
    return value


# ---------------------------------------------------------------------------------- the adapters


def _adapter(name, apply, options, description, *, supports_probs=True):
    return AttentionMethod(name, apply, make_validate(name, options), cache=None, supports_probs=supports_probs,
                           options=tuple(options), description=description)


def _pattern_adapter(name, options, description):
    return _adapter(name, _pattern_apply(name), (*options, BLOCK, IMPL), description)


ADAPTERS: dict[str, Callable[[], AttentionMethod]] = {
    "radial": lambda: _pattern_adapter("radial", (
        Option("frames", REQUIRED, "number of video frames F; T = F * tokens_per_frame + text", _int(1)),
        Option("text", 0, "text tokens after the video tokens (attend and are attended densely)", _int(0)),
        Option("decay_factor", None, "window decay; None: the model's default (wan 0.2, hunyuan 0.95)",
               _optional(_positive_float)),
        Option("model", "wan", "'wan' or 'hunyuan' defaults", _choice("wan", "hunyuan")),
        Option("granularity", "block", "'block': the official tile mask; 'token': the token-level rule",
               _choice("block", "token")),
    ), "P04 Radial attention: the spatial window halves with every doubling of frame distance"),
    "s2": lambda: _pattern_adapter("s2", (
        Option("local_blocks", REQUIRED, "local blocks every head sees before the diagonal", _int(0)),
        Option("vert_stride", REQUIRED, "stride of the vertical (strided) blocks; heads share them out", _int(1)),
        Option("num_dense_heads", 0, "heads that stay dense", _int(0)),
        Option("head_offset", 0, "offset of the first head's shard", _int(0)),
        Option("head_sliding_step", None, "shard step between heads (None: the official default)",
               _optional(_int(0))),
    ), "P15 S2-Attention: each head attends a strided shard of the context plus local blocks"),
    "moa": lambda: _pattern_adapter("moa", (
        Option("alphas", REQUIRED, "per-head base window (a number for all heads or one per head)", _numbers),
        Option("betas", REQUIRED, "per-head growth: window = alpha + beta * T (number or one per head)", _numbers),
    ), "P11 MoA: per-head elastic causal windows alpha_h + beta_h * T plus the sink block"),
    "naavit": lambda: _pattern_adapter("naavit", (
        Option("prefix", REQUIRED, "system-prompt tokens before the visual tokens", _int(0)),
        Option("visual", REQUIRED, "visual tokens (never queries: their rows output 0)", _int(0)),
    ), "P43 SAISA/NAAViT: no attention among visual tokens"),
    "sinklora_s2": lambda: _pattern_adapter("sinklora_s2", (
        Option("group_size", None, "group length G (None: int(T * group_ratio))", _optional(_int(1))),
        Option("group_ratio", 0.25, "G = int(T * group_ratio) when group_size is None", _positive_float),
    ), "P70 S2-Attn (LongLoRA): group attention, the second half of the heads shifted by G/2"),
    "sinklora_sf": lambda: _pattern_adapter("sinklora_sf", (
        Option("group_size", None, "group length G (None: int(T * group_ratio))", _optional(_int(1))),
        Option("group_ratio", 0.25, "G = int(T * group_ratio) when group_size is None", _positive_float),
        Option("sinks", 4, "global sink tokens every query sees", _int(0)),
    ), "P70 SF-Attn: S2-Attn groups without the wrap-around, plus global sink tokens"),
    "davit_window": lambda: _pattern_adapter("davit_window", (
        Option("grid", REQUIRED, "(height, width) of the image the T tokens form, row-major", _grid2),
        Option("window_size", REQUIRED, "window tile (an int or (wh, ww)); not a sliding window",
               _ints(length=2)),
    ), "P52 DaViT spatial window attention: non-overlapping windows of the image grid"),
    "clear": lambda: _pattern_adapter("clear", (
        Option("grid", REQUIRED, "(height, width) of the image tokens, row-major, after the text tokens",
               _grid2),
        Option("radius", REQUIRED, "circular window radius r: image keys with dy^2 + dx^2 < r^2", _positive_float),
        Option("text", 0, "text tokens before the image tokens (dense)", _int(0)),
    ), "P63 CLEAR: a circular local window on the image grid (no pooled branch)"),
    "neighborhood": lambda: _adapter("neighborhood", _neighborhood_apply, (
        Option("kernel_size", REQUIRED, "neighborhood per axis (int or tuple)", _ints()),
        Option("grid", None, "spatial shape of the T tokens, 1-3 axes, row-major (None: 1-D, (T,))",
               _optional(_grid)),
        Option("stride", 1, "GNA stride per axis (int or tuple)", _ints()),
        Option("dilation", 1, "dilation per axis (int or tuple)", _ints()),
        IMPL,
    ), "P48/P60 neighborhood attention (NATTEN) on a 1-3-D grid; the layer's causal flag applies per axis"),
    "biformer": lambda: _adapter("biformer", _biformer_apply, (
        Option("grid", REQUIRED, "(height, width) of the image the T tokens form", _grid2),
        Option("regions", REQUIRED, "regions per side S (S x S regions)", _int(1)),
        Option("topk", REQUIRED, "routed regions each region attends", _int(1)),
        IMPL,
    ), "P61 BiFormer bi-level routing attention (non-causal)", supports_probs=False),
    "linfusion": lambda: _adapter("linfusion", _linfusion_apply, (
        Option("feature_map", "elu1", "feature map of q and k (jattn.methods.linear.linfusion.FEATURE_MAPS)",
               _choice("elu1", "relu", "identity")),
        Option("eps", 1e-4, "added to the normaliser", _positive_float),
    ), "P20 LinFusion generalized (normalised, non-causal) linear attention", supports_probs=False),
    "flexprefill": lambda: _selector_adapter("flexprefill", "flexprefill", (
        Option("gamma", 0.9, "cumulative attention budget gamma in (0, 1]", _fraction),
        Option("tau", 0.1, "JS-distance threshold for a query-aware head", _positive_float),
        Option("min_budget", 512, "fewest tokens kept per head", _int(0)),
        Option("max_budget", None, "most tokens kept per head (None: no cap)", _optional(_int(1))),
        Option("block_size", 128, "tile size (block_q = block_k), a power of two >= 16", _power_of_two),
    ), "P38 FlexPrefill: per-head query-aware or vertical-slash tiles from the last block's attention"),
    "hip": lambda: _selector_adapter("hip", "hip", (
        Option("k_budget", 512, "keys kept per query block by the hierarchical top-k search", _int(1)),
        Option("block_q", 32, "query tile, a power of two >= 16", _power_of_two),
        Option("block_k", 16, "key tile, a power of two >= 16", _power_of_two),
        Option("window", 128, "sliding window of recent keys always kept", _int(0)),
    ), "P09 HiP: hierarchical top-k pruning of key blocks plus a sliding window"),
    "kinetics": lambda: _selector_adapter("kinetics", "kinetics", (
        Option("topk", 64, "key blocks kept per query block, by their mean logit", _int(1)),
        Option("block_q", 64, "query tile, a power of two >= 16", _power_of_two),
        Option("block_size", 16, "key block (and tile) size, a power of two >= 16", _power_of_two),
        Option("local", 0, "recent tokens always kept", _int(0)),
        Option("sink", 4, "first tokens always kept", _int(0)),
    ), "P08 Kinetics block top-k: sinks + local window + the top-k key blocks by q . mean(K_block)"),
    "sale": lambda: _selector_adapter("sale", "sale", (
        Option("tau", 0.004, "relative-score threshold of a kept block", _positive_float),
        Option("block_q", 64, "query tile, a power of two >= 16", _power_of_two),
        Option("block_k", 32, "key tile, a power of two >= 16", _power_of_two),
        Option("local_window", 128, "recent tokens always kept", _int(0)),
        Option("bits", 4, "bits of the quantised q . k estimate (None: full precision)", _optional(_int(1))),
        Option("dense_len", 1024, "queries below this position run dense", _int(0)),
    ), "P32 SALE: blocks chosen from a low-bit q . k estimate by their relative attention score"),
    "anchor": lambda: _selector_adapter("anchor", "anchor", (
        Option("theta", 12.0, "difference threshold (logit units) of a kept stripe", _positive_float),
        Option("block_size", 128, "query block the anchor and stripes are computed for", _int(1)),
        Option("step", 16, "stripe width in keys", _int(1)),
        Option("block_q", 128, "query tile, a power of two >= 16", _power_of_two),
        Option("block_k", 128, "key tile, a power of two >= 16", _power_of_two),
    ), "P33 AnchorAttention: an anchor from the initial and local blocks, difference-aware stripes"),
    "entropy_scaled": lambda: _modifier("entropy_scaling", "entropy_method"),
    "act": lambda: _modifier("act", "act_method"),
    "agent": lambda: _adapter("agent", _agent_apply, (
        Option("grid", REQUIRED, "(height, width) of the image the T tokens form", _grid2),
        Option("num_agents", REQUIRED, "agent tokens (a square number), pooled from q", _int(1)),
    ), "P29 Agent attention: softmax to pooled agent tokens, then from them (non-causal)", supports_probs=False),
}


def register_all(register, registered) -> None:
    """Registers every catalogue ``layer_methods`` name (in catalogue order) with ``register``; names already
    in ``registered`` (generic or shared methods) are skipped. Fails on a name without an adapter or an
    adapter without a catalogue row."""
    from jattn.catalog import PAPERS
    used = set()
    for paper in PAPERS:
        for name in paper.layer_methods:
            if name in ADAPTERS:
                if name not in used:
                    register(ADAPTERS[name]())
                    used.add(name)
            elif name not in registered:
                raise RuntimeError(f"catalogue paper {paper.id} names Attention method {name!r}, which has no "
                                   f"adapter in jattn/nn/paper_methods.py")
    orphans = sorted(set(ADAPTERS) - used)
    if orphans:
        raise RuntimeError(f"adapters {orphans} have no row in jattn/catalog.py (Paper.layer_methods)")
