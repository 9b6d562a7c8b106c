"""The registry of attention methods that :class:`jattn.nn.Attention` can run, one adapter per name.

An adapter turns ``(q [B, T, H, D], k [B, S, Hkv, D], v [B, S, Hkv, D])`` into ``out [B, T, H, D]`` for one
jattn method. Adding a method is one :func:`register_method` call with:

* ``apply(q, k, v, *, causal, mask, scale, return_probs, **config)``: the prefill/training computation,
  returning ``out`` or ``(out, probs [B, H, T, S])`` when ``return_probs``;
* ``validate(config) -> config``: checks and normalises the method's keyword config (raising errors
  that name the argument), so bad configs fail when the module is built, not inside jit;
* ``options``: the documented keyword config, one :class:`Option` per key (name, default, meaning);
  :func:`describe_method` prints them and :func:`make_validate` builds ``validate`` from them;
* ``cache``: how decoding works. ``"kv"``: keys and values are cached and each new query attends over
  the cache through ``apply`` with ``causal=False`` and the dense mask ``decode_mask(config)`` evaluated
  at absolute positions (exact for every method whose visibility is a mask function). ``"state"``: the
  method is a recurrence and ``apply`` takes ``initial_state`` / ``return_final_state`` (linear
  attention). ``None``: no decoding.

The generic methods (softmax, sliding_window, masked, block_sparse, sigmoid, lightning) are here; the
paper methods (radial, s2, moa, neighborhood, ...) are in ``paper_methods.py``, registered from the
catalogue (``jattn/catalog.py``, ``Paper.layer_methods``). ``available_methods()`` lists every name.

Windows follow jattn's one convention (``jattn.attention``): ``window=(left, right)`` counts the keys on
each side of the query, the query's own key always included; an int ``n`` means ``(n, n)``, which under
``causal=True`` is ``(n, 0)``: the query and the ``n`` keys before it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable

from jattn.core import checks, masks
from jattn.core.block_mask import BlockMask
from jattn.core.reference import reference_attention
from jattn.methods.linear.linfusion import FEATURE_MAPS
from jattn.methods.linear.sigmoid import sigmoid_attention
from jattn.methods.linear.transnormer import DECAYS, norm_linear_attention, tnl_decay
from jattn.ops.attention import attention
from jattn.ops.block_sparse import block_sparse_attention

Config = dict[str, Any]


class _Required:
    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()   # an Option default: the key must be given


@dataclasses.dataclass(frozen=True)
class Option:
    """One documented config key of a method: ``convert(key, value) -> value`` checks it (naming the key)."""
    name: str
    default: Any
    doc: str
    convert: Callable[[str, Any], Any] | None = None


@dataclasses.dataclass(frozen=True)
class AttentionMethod:
    name: str
    apply: Callable[..., Any]
    validate: Callable[[Config], Config]
    cache: str | None = "kv"
    decode_mask: Callable[[Config], masks.MaskFn] | None = None
    supports_probs: bool = True
    # Decoding over a KV cache with an absolute-position mask; None means `apply` does it.
    decode_apply: Callable[..., Any] | None = None
    # Decodes with jattn.decode_attention (the split-K decode kernel), given decode_kernel(config): its keyword
    # arguments (window, softcap); methods without it decode through decode_apply and a dense mask.
    decode_kernel: Callable[[Config], dict] | None = None
    # Per-layer config the model fills in (e.g. TNL decay slopes depend on the layer index).
    layer_aware: bool = False
    description: str = ""
    # The documented keyword config (keys, defaults, meaning); see describe_method.
    options: tuple[Option, ...] = ()


_REGISTRY: dict[str, AttentionMethod] = {}


def register_method(method: AttentionMethod, *, overwrite: bool = False) -> AttentionMethod:
    """Adds a method adapter under ``method.name``; re-registering a name needs ``overwrite=True``."""
    if not isinstance(method, AttentionMethod):
        raise TypeError(f"method must be an AttentionMethod, got {type(method).__name__}")
    if method.cache not in ("kv", "state", None):
        raise ValueError(f"method.cache must be 'kv', 'state' or None, got {method.cache!r}")
    if method.cache == "kv" and method.decode_mask is None:
        raise ValueError(f"method {method.name!r} has cache='kv' but no decode_mask")
    if method.name in _REGISTRY and not overwrite:
        raise ValueError(f"attention method {method.name!r} is already registered (pass overwrite=True)")
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> AttentionMethod:
    """Removes a registered method (e.g. one a test or a notebook added) and returns it."""
    method = get_method(name)
    del _REGISTRY[name]
    return method


def get_method(name: str) -> AttentionMethod:
    if not isinstance(name, str):
        raise TypeError(f"method must be a method name (str), got {name!r}")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown attention method {name!r}{hint}; method must be one of {available_methods()}")
    return _REGISTRY[name]


def available_methods() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def describe_method(name: str) -> str:
    """``name``, its description and its config keys with their defaults and meaning (one per line)."""
    method = get_method(name)
    lines = [f"{name}: {method.description}"]
    for option in method.options:
        default = "required" if option.default is REQUIRED else f"default {option.default!r}"
        lines.append(f"  {option.name} ({default}): {option.doc}")
    if not method.options:
        lines.append("  (no config keys)")
    return "\n".join(lines)


def _check_config_keys(method: str, config: Config, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"method {method!r} got unknown config {unknown}{hint}; it accepts {allowed}")


def make_validate(method: str, options: tuple[Option, ...]) -> Callable[[Config], Config]:
    """A ``validate`` from documented options: unknown keys (with the closest valid one), missing required
    keys and each value's ``convert`` raise errors that name the key; returns the config with defaults."""
    allowed = tuple(option.name for option in options)

    def validate(config: Config) -> Config:
        _check_config_keys(method, config, allowed)
        out = {}
        for option in options:
            if option.name not in config:
                if option.default is REQUIRED:
                    raise TypeError(f"method {method!r} needs config {option.name!r} ({option.doc}); it accepts "
                                    f"{allowed}")
                out[option.name] = option.default
                continue
            value = config[option.name]
            out[option.name] = option.convert(option.name, value) if option.convert else value
        return out
    return validate


def _check_impl(config: Config) -> None:
    checks.check_choice("impl", config.get("impl", "auto"), checks.IMPLS)


# ----------------------------------------------------------------------------------------------------
# softmax family: plain softmax, sliding window, any static mask pattern


def dense_softmax(q, k, v, *, causal, mask, scale, return_probs, window=None, softcap=None, impl="auto",
                  sinks=None):
    """Softmax attention; probabilities (when asked) come from the fp32 reference."""
    if return_probs or impl == "reference":
        return reference_attention(q, k, v, mask=mask, causal=causal, window=window, scale=scale,
                                   softcap=softcap, sinks=sinks, return_probs=return_probs)
    return attention(q, k, v, mask=mask, causal=causal, window=window, scale=scale, softcap=softcap,
                     sinks=sinks, impl=impl)


def dense_softmax_decode(q, k, v, *, causal, mask, scale, return_probs, window=None, softcap=None,
                         impl="auto", sinks=None, mask_fn=None, block_size=None):
    """Decoding over a KV cache: a few queries against the whole cache under an absolute-position
    ``mask`` (``window``/``mask_fn`` are already folded into it). Runs the exact reference, whose cost
    per query is O(S) like a decode kernel's; jattn.ops.decode takes over once it exists."""
    return reference_attention(q, k, v, mask=mask, causal=causal, scale=scale, softcap=softcap, sinks=sinks,
                               return_probs=return_probs)


def _validate_softmax(config: Config) -> Config:
    _check_config_keys("softmax", config, ("softcap", "impl"))
    checks.check_positive_float("softcap", config.get("softcap"))
    _check_impl(config)
    return dict(config)


def _validate_sliding_window(config: Config) -> Config:
    _check_config_keys("sliding_window", config, ("window", "softcap", "impl"))
    if "window" not in config:
        raise TypeError("method 'sliding_window' needs config 'window' (an int n = keys on each side, or a "
                        "pair (left, right)); it accepts ('window', 'softcap', 'impl')")
    try:
        window = checks.check_window(config["window"])
    except (TypeError, ValueError) as err:
        raise type(err)(f"method 'sliding_window': {err}") from None
    checks.check_positive_float("softcap", config.get("softcap"))
    _check_impl(config)
    return {**config, "window": window}


def _sliding_window_apply(q, k, v, *, causal, mask, scale, return_probs, window, softcap=None, impl="auto"):
    # `window` is jattn.attention's: (left, right) keys on each side of the query (an int n was made (n, n)
    # by validation); the causal flag cuts the right side.
    return dense_softmax(q, k, v, causal=causal, mask=mask, scale=scale, return_probs=return_probs,
                         window=window, softcap=softcap, impl=impl)


def _validate_masked(config: Config) -> Config:
    _check_config_keys("masked", config, ("mask_fn", "softcap", "impl"))
    if not callable(config.get("mask_fn")):
        raise TypeError(f"method 'masked' needs mask_fn = a jattn.core.masks mask function, got {config.get('mask_fn')!r}")
    checks.check_positive_float("softcap", config.get("softcap"))
    _check_impl(config)
    return dict(config)


def _masked_apply(q, k, v, *, causal, mask, scale, return_probs, mask_fn, softcap=None, impl="auto"):
    T, S = q.shape[1], k.shape[1]
    pattern = masks.materialize(mask_fn, 1, 1, T, S)
    mask = pattern if mask is None else (mask & pattern)
    return dense_softmax(q, k, v, causal=causal, mask=mask, scale=scale, return_probs=return_probs,
                         softcap=softcap, impl=impl)


# ----------------------------------------------------------------------------------------------------
# sigmoid attention (P50): no row max, no denominator unless normalised


def _validate_sigmoid(config: Config) -> Config:
    _check_config_keys("sigmoid", config, ("normalize", "bias"))
    normalize = config.get("normalize", False)
    if not isinstance(normalize, bool):
        raise TypeError(f"sigmoid normalize must be a bool, got {normalize!r}")
    bias = config.get("bias", 0.0)
    if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
        raise TypeError(f"sigmoid bias must be a finite float, got {bias!r}")
    return {"normalize": normalize, "bias": float(bias)}


def _sigmoid_apply(q, k, v, *, causal, mask, scale, return_probs, normalize=False, bias=0.0):
    return sigmoid_attention(q, k, v, causal=causal, mask=mask, scale=scale, normalize=normalize,
                             bias=bias, return_probs=return_probs)


# ----------------------------------------------------------------------------------------------------
# lightning / TransNormerLLM linear attention (P58, P74): jattn.methods.linear.transnormer's NormAttention


def _validate_lightning(config: Config) -> Config:
    allowed = ("feature_map", "decay", "output_norm", "chunk_size", "impl", "layer_index", "num_layers")
    _check_config_keys("lightning", config, allowed)
    config = {"feature_map": "silu", "decay": "alibi", "output_norm": True, "chunk_size": 64, "impl": "auto",
              "layer_index": None, "num_layers": 1, **config}
    checks.check_choice("feature_map", config["feature_map"], tuple(FEATURE_MAPS))
    checks.check_choice("decay", config["decay"], DECAYS)
    checks.check_bool("output_norm", config["output_norm"])
    return config


def lightning_attention_heads(q, k, v, *, causal, mask, scale, return_probs, feature_map="silu",
                              decay="alibi", output_norm=True, chunk_size=64, impl="auto", layer_index=None,
                              num_layers=1, initial_state=None, return_final_state=False):
    """TransNormerLLM's NormAttention (``jattn.methods.linear.transnormer.norm_linear_attention``) on
    ``phi(q), phi(k)``, with the per-head decay ``tnl_decay(decay, H, layer_index, num_layers)``.

    ``decay="alibi"`` is the official code's ``s_h = 2^(-8(h+1)/H)`` scaled by the layer factor;
    ``"paper_linear"`` the paper text's reading; ``"none"`` no decay. GQA as ``jattn.linear_attention``."""
    if mask is not None:
        raise ValueError("method 'lightning' takes no mask (its causal decay is the pattern); got a mask")
    if return_probs:
        raise ValueError("method 'lightning' has no attention probabilities; return_probs must be False")
    phi = FEATURE_MAPS[feature_map]
    log_decay = tnl_decay(decay, q.shape[2], layer=layer_index, num_layers=num_layers) if causal else None
    return norm_linear_attention(phi(q), phi(k), v, log_decay=log_decay, causal=causal,
                                 scale=1.0 if scale is None else scale, output_norm=output_norm,
                                 initial_state=initial_state, return_final_state=return_final_state,
                                 chunk_size=chunk_size, impl=impl)


# ----------------------------------------------------------------------------------------------------
# a static sparse pattern through the block-sparse kernel


def _validate_block_sparse(config: Config) -> Config:
    _check_config_keys("block_sparse", config, ("mask_fn", "block_size", "softcap", "impl"))
    if not callable(config.get("mask_fn")):
        raise TypeError(f"method 'block_sparse' needs mask_fn = a jattn.core.masks mask function, "
                        f"got {config.get('mask_fn')!r}")
    config = {"block_size": 16, **config}
    checks.check_block_size("block_size", config["block_size"], minimum=16)
    checks.check_positive_float("softcap", config.get("softcap"))
    _check_impl(config)
    return config


def _block_sparse_apply(q, k, v, *, causal, mask, scale, return_probs, mask_fn, block_size=16, softcap=None,
                        impl="auto"):
    if mask is not None or return_probs:
        # padding masks and attention maps: the same pattern, densely, through the reference
        pattern = masks.materialize(mask_fn, 1, 1, q.shape[1], k.shape[1])
        return dense_softmax(q, k, v, causal=causal, mask=pattern if mask is None else mask & pattern,
                             scale=scale, return_probs=return_probs, softcap=softcap, impl="reference")
    block_mask = BlockMask.from_mask_fn(mask_fn, 1, 1, q.shape[1], k.shape[1], block_size, block_size)
    return block_sparse_attention(q, k, v, block_mask, mask_fn=mask_fn, causal=causal, scale=scale,
                                  softcap=softcap, impl=impl)


# ----------------------------------------------------------------------------------------------------

register_method(AttentionMethod(
    "softmax", dense_softmax, _validate_softmax, cache="kv",
    decode_mask=lambda config: masks.full_mask(), decode_apply=dense_softmax_decode,
    decode_kernel=lambda config: dict(softcap=config.get("softcap")),
    options=(Option("softcap", None, "logit soft cap s -> softcap * tanh(s / softcap)"),
             Option("impl", "auto", "jattn.attention impl: 'auto' | 'xla' | 'pallas' | 'reference'")),
    description="exact softmax attention (jattn.attention: the flash kernel)"))
register_method(AttentionMethod(
    "sliding_window", _sliding_window_apply, _validate_sliding_window, cache="kv",
    decode_mask=lambda config: masks.sliding_window_mask(*config["window"]),
    decode_apply=dense_softmax_decode, decode_kernel=lambda config: dict(window=config["window"]),
    options=(Option("window", REQUIRED, "keys seen on each side of the query, its own key not counted: an int n "
                    "means (n, n), with the layer's causal=True (n, 0) (the query and the n keys before it); "
                    "or a pair (left, right). The same meaning as jattn.attention(window=...)"),
             Option("softcap", None, "logit soft cap s -> softcap * tanh(s / softcap)"),
             Option("impl", "auto", "jattn.attention impl")),
    description="softmax attention over a sliding window (jattn.attention's window convention)"))
register_method(AttentionMethod(
    "masked", _masked_apply, _validate_masked, cache="kv",
    decode_mask=lambda config: config["mask_fn"],
    decode_apply=dense_softmax_decode,
    options=(Option("mask_fn", REQUIRED, "a mask function mask_fn(b, h, q_idx, kv_idx) -> bool (Python only: "
                    "from a config file or the command line use a named pattern method instead)"),
             Option("softcap", None, "logit soft cap"), Option("impl", "auto", "jattn.attention impl")),
    description="softmax under any static mask function (dense; block_sparse runs the same pattern fast)"))
register_method(AttentionMethod(
    "sigmoid", _sigmoid_apply, _validate_sigmoid, cache="kv",
    decode_mask=lambda config: masks.full_mask(),
    options=(Option("normalize", False, "divide each row by its sum (+1e-8)"),
             Option("bias", 0.0, "added to the logits before the sigmoid")),
    description="P50 sigmoid attention, unnormalised by default"))
register_method(AttentionMethod(
    "lightning", lightning_attention_heads, _validate_lightning, cache="state", supports_probs=False,
    layer_aware=True, description="P58/P74 lightning attention (TransNormerLLM NormAttention)",
    options=(Option("feature_map", "silu", f"phi of q and k: one of {tuple(FEATURE_MAPS)}"),
             Option("decay", "alibi", f"per-head decay: one of {DECAYS}"),
             Option("output_norm", True, "SRMSNorm over all heads' output"),
             Option("chunk_size", 64, "chunk length of the chunked kernel"),
             Option("impl", "auto", "jattn.linear_attention impl"),
             Option("layer_index", None, "filled in by the model (layer-dependent decay)"),
             Option("num_layers", 1, "filled in by the model"))))
register_method(AttentionMethod(
    "block_sparse", _block_sparse_apply, _validate_block_sparse, cache="kv",
    decode_mask=lambda config: config["mask_fn"], decode_apply=dense_softmax_decode,
    options=(Option("mask_fn", REQUIRED, "a mask function (Python only; see the named pattern methods)"),
             Option("block_size", 16, "kernel tile, a power of two >= 16"),
             Option("softcap", None, "logit soft cap"), Option("impl", "auto", "block_sparse_attention impl")),
    description="softmax under a static mask function, run by the block-sparse kernel"))

# The paper methods, registered from the catalogue (jattn/catalog.py, Paper.layer_methods).
from jattn.nn import paper_methods as _paper_methods  # noqa: E402

_paper_methods.register_all(register_method, _REGISTRY)
