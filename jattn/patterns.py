"""Named attention patterns that ``jattn show-mask NAME`` (and ``jattn.viz.plot_mask``) can draw.

A pattern is a *builder*: a function whose parameters are all keyword options with int, float or bool
defaults, returning one of

* a dense bool mask ``[T, S]``, ``[H, T, S]`` or ``[B, H, T, S]`` (True = attend),
* a ``BlockMask``, or
* a pair ``(BlockMask, mask_fn)``: the tiles plus the element mask applied inside partial tiles.

The defaults must give a picture that is readable at a glance (about 64 positions a side, option
``seq``). The CLI turns ``--set key=value`` into these keyword options, using each default's type.

Per-head patterns (``s2``, ``moa``, ``sinklora_s2``, ``sinklora_sf``) return every head (a dense
``[H, T, S]`` mask or a BlockMask with ``H`` heads); the picture's head is chosen when drawing
(``plot_mask(head=)``, ``jattn show-mask --head``). Every other pattern has a head dim of 1.

Sizes. Builders never allocate a huge ``[T, S]`` mask. A mask-function pattern with ``block=0`` is
materialised up to :data:`DENSE_LIMIT` elements; beyond it the builder returns its BlockMask with about
:data:`AUTO_TILES` tiles a side instead (drawn tile by tile). Classifying tiles evaluates the mask
function once per position, one block row at a time, and is refused beyond :data:`EVAL_LIMIT`
positions; a BlockMask is refused beyond :data:`TILE_LIMIT` tiles, and a dense-only pattern beyond
:data:`DENSE_LIMIT` elements. Each refusal is a ``ValueError`` naming the option to lower.

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

DENSE_LIMIT = 4096 * 4096     # elements (all heads) a builder materialises as a dense mask
EVAL_LIMIT = 32768 * 32768    # mask-function evaluations (all heads) to find each tile's kind
TILE_LIMIT = 2048 * 2048      # tiles (all heads) of a BlockMask (its tile map is dense)
AUTO_TILES = 512              # tiles a side when a large block=0 pattern switches to tiles


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

def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _heads_text(heads: int) -> str:
    return "" if heads == 1 else f" x {heads} heads"


def _lower(options: str) -> str:
    """``"height=100 x width=100"`` -> ``"height or width"``: the options named in ``options``."""
    import re
    names = re.findall(r"(\w+)=", options)
    return (", ".join(names[:-1]) + " or " + names[-1]) if len(names) > 1 else (names[0] if names else options)


def check_dense_size(options: str, seq_q: int, seq_k: int, heads: int = 1) -> None:
    """``ValueError`` when a dense ``[heads, seq_q, seq_k]`` mask would exceed :data:`DENSE_LIMIT`."""
    if heads * seq_q * seq_k > DENSE_LIMIT:
        raise ValueError(f"{options} gives a {seq_q} x {seq_k}{_heads_text(heads)} mask "
                         f"({heads * seq_q * seq_k:.3g} elements); this pattern is drawn from a dense mask, "
                         f"limited to {DENSE_LIMIT:.3g} elements: lower {_lower(options)}")


def check_tile_size(options: str, seq_q: int, seq_k: int, block: int, heads: int = 1, *,
                    evaluated: bool) -> None:
    """``ValueError`` when a BlockMask of these sizes has more than :data:`TILE_LIMIT` tiles or, when its
    tiles are classified by evaluating a mask function (``evaluated``), more than :data:`EVAL_LIMIT`
    positions."""
    n_q, n_k = -(-seq_q // block), -(-seq_k // block)
    if heads * n_q * n_k > TILE_LIMIT:
        raise ValueError(f"{options} with block={block} gives {n_q} x {n_k}{_heads_text(heads)} tiles "
                         f"({heads * n_q * n_k:.3g}), more than {TILE_LIMIT:.3g}: raise block or lower {_lower(options)}")
    if evaluated and heads * seq_q * seq_k > EVAL_LIMIT:
        side = int((EVAL_LIMIT / heads) ** 0.5)
        raise ValueError(f"{options} gives a {seq_q} x {seq_k}{_heads_text(heads)} mask ({heads * seq_q * seq_k:.3g} "
                         f"positions), too large to draw: its tiles are found by evaluating the mask at every "
                         f"position, limited to {EVAL_LIMIT:.3g} (about {side} a side): lower "
                         f"{_lower(options)}")


def auto_block(seq: int) -> int:
    """The power-of-two tile size that gives at most :data:`AUTO_TILES` tiles a side."""
    block = 1
    while -(-seq // block) > AUTO_TILES:
        block *= 2
    return block


def _from_mask_fn(mask_fn, seq: int, block: int, heads: int = 1):
    """Dense ``[seq, seq]`` (``[heads, seq, seq]``) mask of ``mask_fn`` when ``block == 0`` and it fits in
    :data:`DENSE_LIMIT`; else ``(BlockMask, mask_fn)`` with ``block`` (or :func:`auto_block`) tiles."""
    from jattn.core.block_mask import BlockMask
    from jattn.core.masks import materialize

    _check_int("seq", seq, 1)
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
        raise ValueError(f"block must be 0 (element mask) or a tile size >= 1, got {block!r}")
    if block == 0 and heads * seq * seq <= DENSE_LIMIT:
        dense = materialize(mask_fn, 1, heads, seq, seq)[0]
        return dense[0] if heads == 1 else dense
    block = block or auto_block(seq)
    check_tile_size(f"seq={seq}", seq, seq, block, heads, evaluated=True)
    return BlockMask.from_mask_fn(mask_fn, 1, heads, seq, seq, block, block), mask_fn


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
    """One head's ``[T, S]`` slice of a dense mask whose leading dims are all 1 (or of head ``head``)."""
    import numpy as np
    mask = np.asarray(mask)
    return mask.reshape(-1, *mask.shape[-2:])[head]


def neighborhood(height: int = 12, width: int = 12, kernel: int = 5, stride: int = 1, dilation: int = 1,
                 causal: bool = False):
    """P48/P60 NATTEN neighborhood attention on a height x width grid (height=1 gives 1-D)."""
    from jattn.ops.neighborhood import neighborhood_mask
    n = _check_int("height", height, 1) * _check_int("width", width, 1)
    check_dense_size(f"height={height} x width={width}", n, n)
    if height == 1:
        return neighborhood_mask((width,), kernel, stride=stride, dilation=dilation, causal=causal)
    return neighborhood_mask((height, width), kernel, stride=stride, dilation=dilation, causal=causal)


def radial(frames: int = 12, tokens_per_frame: int = 32, text: int = 0, block: int = 8, token_level: bool = True):
    """P04 Radial attention (Wan layout): token-level rule, or the official tile mask."""
    from jattn.methods.sparse.radial import radial_attention_mask, radial_mask_fn
    seq = _check_int("frames", frames, 1) * _check_int("tokens_per_frame", tokens_per_frame, 1) + \
        _check_int("text", text, 0)
    check_tile_size(f"frames={frames} x tokens_per_frame={tokens_per_frame} + text={text}", seq, seq,
                    _check_int("block", block, 1), evaluated=token_level)
    granularity = "token" if token_level else "block"
    bm = radial_attention_mask(frames, tokens_per_frame, text, block=block, granularity=granularity)
    return (bm, radial_mask_fn(frames, tokens_per_frame, text, block=block)) if token_level else bm


def s2(seq: int = 128, heads: int = 4, block: int = 8, local_blocks: int = 2, vert_stride: int = 4):
    """P15 S2-Attention: each head's strided shard plus local blocks (all heads; pick one with --head)."""
    from jattn.methods.sparse.s2 import s2_attention_mask, s2_mask_fn
    check_tile_size(f"seq={seq}", _check_int("seq", seq, 1), seq, _check_int("block", block, 1),
                    _check_int("heads", heads, 1), evaluated=False)
    bm = s2_attention_mask(heads, seq, block, local_blocks=local_blocks, vert_stride=vert_stride)
    return bm, getattr(bm, "mask_fn", None) or s2_mask_fn(heads, block, local_blocks=local_blocks,
                                                           vert_stride=vert_stride)


def moa(seq: int = 128, heads: int = 4, block: int = 8, alpha: float = 16.0, beta: float = 0.25):
    """P11 MoA: head h has the causal window alpha * 2**h + beta * h / (heads - 1) * N plus the sink block."""
    from jattn.methods.sparse.moa import moa_attention_mask, moa_mask_fn
    check_tile_size(f"seq={seq}", _check_int("seq", seq, 1), seq, _check_int("block", block, 1),
                    _check_int("heads", heads, 1), evaluated=False)
    alphas = [float(alpha) * 2 ** h for h in range(heads)]
    betas = [float(beta) * h / max(heads - 1, 1) for h in range(heads)]
    bm = moa_attention_mask(alphas, betas, seq, block)
    return bm, getattr(bm, "mask_fn", None) or moa_mask_fn(alphas, betas, seq, block)


def naavit(prefix: int = 8, visual: int = 32, text: int = 24):
    """P43 SAISA's NAAViT: no attention among visual tokens (visual rows are not queries)."""
    from jattn.methods.sparse.saisa import naavit_mask
    n = _check_int("prefix", prefix, 0) + _check_int("visual", visual, 0) + _check_int("text", text, 0)
    check_dense_size(f"prefix={prefix} + visual={visual} + text={text}", n, n)
    return naavit_mask(prefix, visual, text)


def sinklora_s2(seq: int = 64, heads: int = 2, group: int = 16, block: int = 0):
    """P70 S2-Attn: group-causal attention, the second half of the heads shifted by half a group."""
    from jattn.methods.sparse.sinklora import shifted_sparse_mask_fn
    return _from_mask_fn(shifted_sparse_mask_fn(_check_int("seq", seq, 1), heads, group), seq, block,
                         _check_int("heads", heads, 1))


def sinklora_sf(seq: int = 64, heads: int = 2, group: int = 16, sinks: int = 4, block: int = 0):
    """P70 SF-Attn: S2-Attn groups plus global sink tokens."""
    from jattn.methods.sparse.sinklora import sf_mask_fn
    if _check_int("group", group, 1) > _check_int("seq", seq, 1):
        raise ValueError(f"group must be <= seq={seq}, got {group}")
    return _from_mask_fn(sf_mask_fn(heads, group, sinks), seq, block, _check_int("heads", heads, 1))


def clear(height: int = 12, width: int = 12, text: int = 8, radius: float = 3.0, down_factor: int = 0):
    """P63 CLEAR: a circular window of `radius` on the image grid (plus text, and pooled keys if down_factor)."""
    from jattn.methods.sparse.clear import clear_mask
    n = _check_int("height", height, 1) * _check_int("width", width, 1) + _check_int("text", text, 0)
    check_dense_size(f"height={height} x width={width} + text={text}", n, 2 * n)
    mask = clear_mask((height, width), text, radius, down_factor=down_factor or None)
    return _head(mask, 0)


def davit_window(height: int = 12, width: int = 12, window: int = 4):
    """P52 DaViT spatial window attention: query and key in the same window x window window."""
    from jattn.core.masks import materialize
    from jattn.methods.sparse.davit import window_mask_fn
    n = _check_int("height", height, 1) * _check_int("width", width, 1)
    check_dense_size(f"height={height} x width={width}", n, n)
    return materialize(window_mask_fn((height, width), window), 1, 1, n, n)[0, 0]


def biformer(height: int = 12, width: int = 12, regions: int = 3, topk: int = 2, seed: int = 0):
    """P61 BiFormer: each query region attends its top-k routed regions (routing from random q, k)."""
    import jax
    from jattn.methods.sparse.biformer import bra_dense_mask, bra_route
    n = _check_int("height", height, 1) * _check_int("width", width, 1)
    check_dense_size(f"height={height} x width={width}", n, n)
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
register_pattern("s2", s2, "P15 S2-Attention: per-head strided context shard plus local blocks (--head)")
register_pattern("moa", moa, "P11 MoA: per-head causal window alpha*2^h + beta*h/(heads-1)*N plus a sink block (--head)")
register_pattern("naavit", naavit, "P43 SAISA/NAAViT: no attention among visual tokens")
register_pattern("sinklora_s2", sinklora_s2, "P70 S2-Attn: shifted group attention (LongLoRA; --head 1 is shifted)")
register_pattern("sinklora_sf", sinklora_sf, "P70 SF-Attn: shifted groups plus global sink tokens (--head 1 is shifted)")
register_pattern("clear", clear, "P63 CLEAR: local circular 2-D window")
register_pattern("davit_window", davit_window, "P52 DaViT: non-overlapping spatial windows")
register_pattern("biformer", biformer, "P61 BiFormer: top-k routed regions (random routing)")
