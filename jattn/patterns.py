"""Named attention patterns that ``jattn show-mask NAME`` (and ``jattn.viz.plot_mask``) can draw.

A pattern is a *builder*: a function whose parameters are all keyword options with int, float or bool
defaults, returning one of

* a dense bool mask ``[T, S]``, ``[H, T, S]`` or ``[B, H, T, S]`` (True = attend),
* a ``BlockMask``, or
* a pair ``(BlockMask, mask_fn)``: the tiles plus the element mask applied inside partial tiles.

The defaults must give a picture that is readable at a glance (about 64 positions a side, option
``seq``). The CLI turns ``--set key=value`` into these keyword options, using each default's type.

Adding a pattern: write a builder below (import what it needs *inside* the builder, so importing this
module stays cheap and one broken method cannot break the others) and add one ``register_pattern``
line to the list at the end of the file. Names must be unique; registration checks the builder's
options so that every entry works from the command line.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

# Option types the command line can parse, checked in this order (bool before int: bool is an int).
OPTION_TYPES = (bool, int, float)


@dataclasses.dataclass(frozen=True)
class Pattern:
    """One registry entry: ``builder(**options)`` makes the mask; ``help`` is a one-line description."""
    name: str
    builder: Callable[..., Any]
    help: str

    @property
    def options(self) -> dict[str, int | float | bool]:
        """The builder's keyword options and their defaults, in signature order."""
        return {name: p.default for name, p in inspect.signature(self.builder).parameters.items()}

    def build(self, **options):
        """``(mask, mask_fn)``: the builder's result with ``options`` overriding its defaults.

        ``mask`` is a dense bool array or a ``BlockMask``; ``mask_fn`` is None unless the builder
        returned a ``(BlockMask, mask_fn)`` pair.
        """
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(f"pattern {self.name!r} has no option {unknown[0]!r}; expected one of: "
                            f"{describe_options(self)}")
        result = self.builder(**options)
        if isinstance(result, tuple):
            mask, mask_fn = result
            return mask, mask_fn
        return result, None


PATTERNS: dict[str, Pattern] = {}


def option_type(default) -> type:
    """The type (bool, int or float) that an option with this default takes."""
    for kind in OPTION_TYPES:
        if isinstance(default, kind):
            return kind
    raise TypeError(f"an option default must be a bool, int or float, got {default!r}")


def describe_options(pattern: Pattern) -> str:
    """``"seq=64 (int), block=0 (int)"``: a pattern's options for help and error messages."""
    text = ", ".join(f"{k}={v!r} ({option_type(v).__name__})" for k, v in pattern.options.items())
    return text or "(no options)"


def register_pattern(name: str, builder: Callable[..., Any], help: str) -> Pattern:
    """Adds ``builder`` to ``PATTERNS`` under ``name``; returns the entry.

    Raises ``ValueError`` for an empty or taken name and ``TypeError`` when a builder parameter is not
    a keyword option with a bool/int/float default (the command line could not set it).
    """
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"pattern name must be a non-empty string without spaces, got {name!r}")
    if name in PATTERNS:
        raise ValueError(f"pattern {name!r} is already registered (by {PATTERNS[name].builder.__qualname__})")
    if not callable(builder):
        raise TypeError(f"builder for pattern {name!r} must be callable, got {builder!r}")
    for param in inspect.signature(builder).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.default is param.empty:
            raise TypeError(f"builder for pattern {name!r}: parameter {param.name!r} must be a keyword option "
                            f"with a default")
        try:
            option_type(param.default)
        except TypeError as err:
            raise TypeError(f"builder for pattern {name!r}: option {param.name!r}: {err}") from None
    PATTERNS[name] = Pattern(name, builder, help)
    return PATTERNS[name]


# ------------------------------------------------------------------------------------------ builders

def _from_mask_fn(mask_fn, seq: int, block: int):
    """Dense ``[seq, seq]`` mask of ``mask_fn`` when ``block == 0``; else its BlockMask (tile ``block``)."""
    from jattn.core.block_mask import BlockMask
    from jattn.core.masks import materialize

    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ValueError(f"seq must be an int >= 1, got {seq!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
        raise ValueError(f"block must be 0 (element mask) or a tile size >= 1, got {block!r}")
    if block == 0:
        return materialize(mask_fn, 1, 1, seq, seq)[0, 0]
    return BlockMask.from_mask_fn(mask_fn, 1, 1, seq, seq, block, block), mask_fn


def causal(seq: int = 64, block: int = 0):
    from jattn.core.masks import causal_mask
    return _from_mask_fn(causal_mask(), seq, block)


def sliding_window(seq: int = 64, left: int = 8, right: int = 0, block: int = 0):
    from jattn.core.masks import sliding_window_mask
    return _from_mask_fn(sliding_window_mask(left, right), seq, block)


def prefix_lm(seq: int = 64, prefix: int = 16, block: int = 0):
    from jattn.core.masks import prefix_lm_mask
    return _from_mask_fn(prefix_lm_mask(prefix), seq, block)


def chunked(seq: int = 64, chunk: int = 16, block: int = 0):
    from jattn.core.masks import chunked_mask
    return _from_mask_fn(chunked_mask(chunk), seq, block)


def sink_local(seq: int = 64, sinks: int = 4, window: int = 16, block: int = 0):
    from jattn.core.masks import sink_local_mask
    return _from_mask_fn(sink_local_mask(sinks, window), seq, block)


def dilated(seq: int = 64, stride: int = 4, offset: int = 0, block: int = 0):
    from jattn.core.masks import dilated_mask
    return _from_mask_fn(dilated_mask(stride, offset), seq, block)


def _head(mask, head: int):
    """One head's ``[T, S]`` slice of a per-head dense mask (the CLI's ``--head`` picks heads too)."""
    import numpy as np
    mask = np.asarray(mask)
    return mask.reshape(-1, *mask.shape[-2:])[head]


def neighborhood(height: int = 12, width: int = 12, kernel: int = 5, stride: int = 1, dilation: int = 1,
                 causal: bool = False):
    """P48/P60 NATTEN neighborhood attention on a height x width grid (height=1 gives 1-D)."""
    from jattn.ops.neighborhood import neighborhood_mask
    if height == 1:
        return neighborhood_mask((width,), kernel, stride=stride, dilation=dilation, is_causal=causal)
    return neighborhood_mask((height, width), kernel, stride=stride, dilation=dilation, is_causal=causal)


def radial(frames: int = 12, tokens_per_frame: int = 32, text: int = 0, block: int = 8, token_level: bool = True):
    """P04 Radial attention (Wan layout): token-level rule, or the official tile mask."""
    from jattn.methods.sparse.radial import radial_attention_mask, radial_mask_fn
    granularity = "token" if token_level else "block"
    bm = radial_attention_mask(frames, tokens_per_frame, text, block=block, granularity=granularity)
    return (bm, radial_mask_fn(frames, tokens_per_frame, text, block=block)) if token_level else bm


def s2(seq: int = 128, heads: int = 4, block: int = 8, local_blocks: int = 2, vert_stride: int = 4, head: int = 0):
    """P15 S2-Attention: one head's strided shard plus local blocks."""
    from jattn.methods.sparse.s2 import s2_attention_mask
    bm = s2_attention_mask(heads, seq, block, local_blocks=local_blocks, vert_stride=vert_stride)
    return _head(bm.to_dense_mask(), head)


def moa(seq: int = 128, block: int = 8, alpha: float = 16.0, beta: float = 0.25):
    """P11 MoA: a causal window of alpha + beta * N tokens plus the sink block."""
    from jattn.methods.sparse.moa import moa_attention_mask
    return _head(moa_attention_mask([alpha], [beta], seq, block).to_dense_mask(), 0)


def naavit(prefix: int = 8, visual: int = 32, text: int = 24):
    """P43 SAISA's NAAViT: no attention among visual tokens (visual rows are not queries)."""
    from jattn.methods.sparse.saisa import naavit_mask
    return naavit_mask(prefix, visual, text)


def sinklora_s2(seq: int = 64, heads: int = 2, group: int = 16, head: int = 1):
    """P70 S2-Attn: group-causal attention, the second half of the heads shifted by half a group."""
    from jattn.methods.sparse.sinklora import shifted_sparse_attention_mask
    return _head(shifted_sparse_attention_mask(seq, heads, group), head)


def sinklora_sf(seq: int = 64, heads: int = 2, group: int = 16, sinks: int = 4, head: int = 1):
    """P70 SF-Attn: S2-Attn groups plus global sink tokens."""
    from jattn.methods.sparse.sinklora import sf_attention_mask
    return _head(sf_attention_mask(seq, heads, group, sinks), head)


def clear(height: int = 12, width: int = 12, text: int = 8, radius: float = 3.0, down_factor: int = 0):
    """P63 CLEAR: a circular window of `radius` on the image grid (plus text, and pooled keys if down_factor)."""
    from jattn.methods.sparse.clear import clear_mask
    mask = clear_mask((height, width), text, radius, down_factor=down_factor or None)
    return _head(mask, 0)


def davit_window(height: int = 12, width: int = 12, window: int = 4):
    """P52 DaViT spatial window attention: query and key in the same window x window window."""
    from jattn.core.masks import materialize
    from jattn.methods.sparse.davit import window_mask_fn
    return materialize(window_mask_fn((height, width), window), 1, 1, height * width, height * width)[0, 0]


def biformer(height: int = 12, width: int = 12, regions: int = 3, topk: int = 2, seed: int = 0):
    """P61 BiFormer: each query region attends its top-k routed regions (routing from random q, k)."""
    import jax
    from jattn.methods.sparse.biformer import bra_dense_mask, bra_route
    q, k = jax.random.normal(jax.random.PRNGKey(seed), (2, 1, height, width, 1, 8))
    return _head(bra_dense_mask(bra_route(q, k, regions, topk), (height, width), regions), 0)


# ------------------------------------------------------------------------------------------ registry
# One line per pattern. ``block=N`` on the mask-function patterns draws the BlockMask with N x N tiles.

register_pattern("causal", causal, "query i sees keys j <= i")
register_pattern("sliding_window", sliding_window, "query i sees keys i-left .. i+right")
register_pattern("prefix_lm", prefix_lm, "bidirectional over the first `prefix` keys, causal after them")
register_pattern("chunked", chunked, "block-diagonal: query and key in the same chunk of `chunk` positions")
register_pattern("sink_local", sink_local, "StreamingLLM: the first `sinks` keys plus a causal window of `window`")
register_pattern("dilated", dilated, "strided: key j visible when (i - j) % stride == offset % stride")
register_pattern("neighborhood", neighborhood, "P48/P60 NATTEN neighborhood attention on a 2-D grid (height=1: 1-D)")
register_pattern("radial", radial, "P04 Radial: the window halves with every doubling of frame distance")
register_pattern("s2", s2, "P15 S2-Attention: per-head strided context shard plus local blocks")
register_pattern("moa", moa, "P11 MoA: per-head causal window alpha + beta*N plus a sink block")
register_pattern("naavit", naavit, "P43 SAISA/NAAViT: no attention among visual tokens")
register_pattern("sinklora_s2", sinklora_s2, "P70 S2-Attn: shifted group attention (LongLoRA)")
register_pattern("sinklora_sf", sinklora_sf, "P70 SF-Attn: shifted groups plus global sink tokens")
register_pattern("clear", clear, "P63 CLEAR: local circular 2-D window")
register_pattern("davit_window", davit_window, "P52 DaViT: non-overlapping spatial windows")
register_pattern("biformer", biformer, "P61 BiFormer: top-k routed regions (random routing)")
