"""P04 — Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation.

A static mask for video diffusion transformers. The sequence is ``F`` frames of ``S`` tokens each
(``V = F * S`` video tokens, frame-major) followed by ``n_text`` text tokens. For a query in frame ``i``
at in-frame index ``r`` and a key in frame ``j`` at in-frame index ``c``, with ``dist = |i - j|`` and
``g = dist.bit_length()`` (0 for 0, 1 for 1, 2 for 2-3, 3 for 4-7, ...):

* text rows and text columns are always visible (text sees everything, video sees all text);
* ``model="wan"`` only: key frame ``j == 0`` is fully visible (attention sink);
* otherwise the pair is visible where ``|c - r| <= w(dist)`` and the frame pair survives thinning:

      w(dist)  = S                                            if dist <= 1
               = max(2**S.bit_length() / 2**g * decay_factor, block)   otherwise
      survives = True                                         if 2**S.bit_length() / 2**g >= block
               = dist % int(block / (2**S.bit_length() / 2**g)) == 0    otherwise

  so the spatial band halves every time the frame distance doubles, and beyond the point where the band
  would be narrower than a block, only every 2nd, 4th, ... frame pair is kept (O(log F) pairs per row).

That token-level mask is ``radial_mask_fn``. The official kernel runs a *block* mask derived from it
(``radial_block_mask``, the default ``granularity="block"``): for every frame pair, its token mask is
placed on the global ``block x block`` grid and a tile is kept when more than 60% of its non-empty key
columns have column density above 1/3 (``shrinkMaskStrict``); the pair votes are OR-ed, and every tile row
or column that contains a text token is dense. Attention is then exact dense attention with that tile mask
expanded (kept tiles are entirely visible).

Following the official ``mit-han-lab/radial-attention`` (``radial_attn/attn_mask.py``), a pair's vote
covers ``ceil(S / block)`` tile rows and columns starting at the tile of its first token; a frame that
straddles one more tile boundary does not vote for that last partial tile (the official truncation). The
official code hard-codes the thinning threshold to 128, "equal to block-size"; jattn uses ``block`` for
both thresholds, identical at the default ``block=128``. Dense schedule: layers ``layer_idx <
dense_layers`` and denoising steps ``timestep < dense_timesteps`` use dense attention (Wan2.1:
``decay_factor=0.2, dense_layers=1, dense_timesteps=12``; HunyuanVideo: ``0.95, 0, 12``).

Fully masked rows: none at token granularity (a frame always sees itself). At block granularity, when
``tokens_per_frame < block / 3`` no pair can reach the 1/3 column density and whole tile rows may be
dropped; those rows output 0 (never NaN), as everywhere in jattn.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core import checks
from jattn.core.block_mask import BlockMask
from jattn.ops.attention import attention
from jattn.ops.block_sparse import block_sparse_attention

MODELS = ("wan", "hunyuan")
GRANULARITIES = ("block", "token")


@dataclasses.dataclass(frozen=True)
class RadialDefaults:
    """The official per-model settings (1x length inference scripts)."""
    decay_factor: float
    dense_layers: int
    dense_timesteps: int


MODEL_DEFAULTS = {
    "wan": RadialDefaults(decay_factor=0.2, dense_layers=1, dense_timesteps=12),
    "hunyuan": RadialDefaults(decay_factor=0.95, dense_layers=0, dense_timesteps=12),
}


# ---------------------------------------------------------------------------------------- validation

def _check_optional_int(name: str, value, minimum: int = 0) -> int | None:
    return None if value is None else checks.check_int(name, value, minimum)


@dataclasses.dataclass(frozen=True)
class RadialLayout:
    """Validated static description of one radial mask."""
    num_frames: int
    tokens_per_frame: int
    n_text: int
    block: int
    decay_factor: float
    model: str

    @property
    def video_tokens(self) -> int:
        return self.num_frames * self.tokens_per_frame

    @property
    def seq_len(self) -> int:
        return self.video_tokens + self.n_text

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.seq_len / self.block)


def _layout(num_frames, tokens_per_frame, n_text, block, decay_factor, model) -> RadialLayout:
    checks.check_choice("model", model, MODELS)
    decay_factor = MODEL_DEFAULTS[model].decay_factor if decay_factor is None else decay_factor
    return RadialLayout(num_frames=checks.check_int("num_frames", num_frames, 1),
                        tokens_per_frame=checks.check_int("tokens_per_frame", tokens_per_frame, 1),
                        n_text=checks.check_int("n_text", n_text, 0), block=checks.check_int("block", block, 1),
                        decay_factor=checks.check_positive_float("decay_factor", decay_factor, allow_none=False),
                        model=model)


# ------------------------------------------------------------------------------- the per-distance rule

def _full_decay_length(tokens_per_frame: int, dist: int) -> float:
    """``2**S.bit_length() / 2**g``: the band width before ``decay_factor`` (a power of two)."""
    return 2.0 ** tokens_per_frame.bit_length() / 2.0 ** dist.bit_length()


def radial_window(dist: int, tokens_per_frame: int, *, decay_factor: float, block: int) -> int:
    """Largest visible ``|c - r|`` (in-frame index offset) for frames ``dist`` apart.

    The official code compares the integer offset with a float32 width; the floor of that width is the
    same test on integers.
    """
    if dist <= 1:
        return tokens_per_frame
    width = max(_full_decay_length(tokens_per_frame, dist) * decay_factor, block)
    return int(math.floor(np.float32(width)))


def radial_pair_survives(dist: int, tokens_per_frame: int, *, block: int) -> bool:
    """Temporal thinning: far frame pairs are kept only at every ``block / decay_length``-th distance."""
    decay_length = _full_decay_length(tokens_per_frame, dist)
    if decay_length >= block:
        return True
    return dist % int(block / decay_length) == 0


def _distance_table(layout: RadialLayout) -> list[tuple[int, int, int]]:
    """``(group g, window, thinning period)`` for every group of frame distances that occurs.

    Within a group (the same ``bit_length``) the window and the period are constant, so a mask function can
    look them up from ``g`` with a short ``where`` chain of Python constants.
    """
    table = []
    for g in range((layout.num_frames - 1).bit_length() + 1):
        dist = 0 if g == 0 else 1 << (g - 1)  # smallest distance of the group
        window = radial_window(dist, layout.tokens_per_frame, decay_factor=layout.decay_factor,
                               block=layout.block)
        decay_length = _full_decay_length(layout.tokens_per_frame, dist)
        period = 1 if decay_length >= layout.block else int(layout.block / decay_length)
        table.append((g, window, period))
    return table


# ------------------------------------------------------------------------------------ token-level mask

def radial_mask_fn(num_frames: int, tokens_per_frame: int, n_text: int = 0, *, block: int = 128,
                   decay_factor: float | None = None, model: str = "wan"):
    """The token-level radial mask as ``mask_fn(b, h, q_idx, kv_idx) -> bool`` (pure index arithmetic,
    usable inside the Pallas kernel). ``decay_factor=None`` takes the model's default."""
    layout = _layout(num_frames, tokens_per_frame, n_text, block, decay_factor, model)
    S, V = layout.tokens_per_frame, layout.video_tokens
    table = _distance_table(layout)
    wan = layout.model == "wan"

    def mask_fn(b, h, q_idx, kv_idx):
        q_frame, kv_frame = q_idx // S, kv_idx // S
        offset = jnp.abs((kv_idx - kv_frame * S) - (q_idx - q_frame * S))
        dist = jnp.abs(q_frame - kv_frame)
        group = sum((dist >= (1 << k)).astype(jnp.int32) for k in range(len(table) - 1))  # bit_length
        window, period = table[0][1], table[0][2]
        for g, w, p in table[1:]:
            window = jnp.where(group == g, w, window)
            period = jnp.where(group == g, p, period)
        radial = (offset <= window) & (dist % period == 0)
        if wan:
            radial = radial | (kv_frame == 0)
        return (q_idx >= V) | (kv_idx >= V) | radial

    return mask_fn


# ------------------------------------------------------------------------------------ block-level mask

def _pair_token_mask(layout: RadialLayout, i: int, j: int) -> np.ndarray:
    """``[S, S]`` token mask of query frame ``i`` against key frame ``j`` (numpy)."""
    S = layout.tokens_per_frame
    if layout.model == "wan" and j == 0:
        return np.ones((S, S), bool)
    dist = abs(i - j)
    if not radial_pair_survives(dist, S, block=layout.block):
        return np.zeros((S, S), bool)
    window = radial_window(dist, S, decay_factor=layout.decay_factor, block=layout.block)
    index = np.arange(S)
    return np.abs(index[None, :] - index[:, None]) <= window


def _shrink(tile_grid: np.ndarray, block: int) -> np.ndarray:
    """``shrinkMaskStrict`` on a ``[n * block, n * block]`` bool grid -> ``[n, n]`` kept tiles.

    A tile is kept when more than 60% of its non-empty key columns have column density above 1/3 (density =
    visible rows / ``block``). Integer form of the official float tests: ``3 * count > block`` and
    ``5 * high > 3 * non_empty``.
    """
    n = tile_grid.shape[0] // block
    counts = tile_grid.reshape(n, block, n * block).sum(axis=1).reshape(n, n, block)
    non_empty = (counts > 0).sum(axis=-1)
    high = (3 * counts > block).sum(axis=-1)
    return 5 * high > 3 * non_empty


@functools.lru_cache(maxsize=64)
def _radial_block_map(layout: RadialLayout) -> np.ndarray:
    S, block, nb = layout.tokens_per_frame, layout.block, layout.num_blocks
    pair_tiles = math.ceil(S / block)
    span = pair_tiles * block
    block_map = np.zeros((nb, nb), bool)
    votes = {}  # the vote depends only on the pair's token mask and its offsets inside the first tiles
    for i in range(layout.num_frames):
        for j in range(layout.num_frames):
            sink = layout.model == "wan" and j == 0
            dist = abs(i - j)
            key = ("sink" if sink else dist if dist <= 1 else
                   (radial_pair_survives(dist, S, block=block), dist.bit_length()),
                   (i * S) % block, (j * S) % block)
            if key not in votes:
                row0, col0 = key[1], key[2]
                grid = np.zeros((row0 + span, col0 + span), bool)
                grid[row0:row0 + S, col0:col0 + S] = _pair_token_mask(layout, i, j)
                votes[key] = _shrink(grid[:span, :span], block)  # official truncation to pair_tiles
            tile_row, tile_col = (i * S) // block, (j * S) // block
            vote = votes[key][:nb - tile_row, :nb - tile_col]
            block_map[tile_row:tile_row + vote.shape[0], tile_col:tile_col + vote.shape[1]] |= vote
    if layout.n_text:
        first_text_tile = layout.video_tokens // block
        block_map[first_text_tile:, :] = True
        block_map[:, first_text_tile:] = True
    block_map.setflags(write=False)
    return block_map


def radial_block_mask(num_frames: int, tokens_per_frame: int, n_text: int = 0, *, block: int = 128,
                      decay_factor: float | None = None, model: str = "wan") -> np.ndarray:
    """The official (shrunk) radial tile mask: numpy bool ``[nb, nb]``, ``nb = ceil((F*S + n_text) / block)``.

    Static and cached; ``decay_factor=None`` takes the model's default (wan 0.2, hunyuan 0.95).
    """
    layout = _layout(num_frames, tokens_per_frame, n_text, block, decay_factor, model)
    return _radial_block_map(layout).copy()


def radial_attention_mask(num_frames: int, tokens_per_frame: int, n_text: int = 0, *, block: int = 128,
                          decay_factor: float | None = None, model: str = "wan",
                          granularity: str = "block") -> BlockMask:
    """The ``BlockMask`` that ``radial_attention`` runs (head- and batch-shared).

    ``granularity="block"``: the official shrunk tile mask, every kept tile full (no ``mask_fn`` needed).
    ``granularity="token"``: the tiles of ``radial_mask_fn`` with any visible token (full where all are);
    pass that same ``mask_fn`` to ``block_sparse_attention`` for the partial tiles.
    """
    checks.check_choice("granularity", granularity, GRANULARITIES)
    layout = _layout(num_frames, tokens_per_frame, n_text, block, decay_factor, model)
    T = layout.seq_len
    with jax.ensure_compile_time_eval():  # static: concrete tables even when called under jit
        if granularity == "token":
            mask_fn = radial_mask_fn(num_frames, tokens_per_frame, n_text, block=block,
                                     decay_factor=layout.decay_factor, model=model)
            return BlockMask.from_mask_fn(mask_fn, 1, 1, T, T, block, block)
        block_map = jnp.asarray(_radial_block_map(layout))[None, None]
        return BlockMask.from_dense_block_map(block_map, full_map=block_map, block_q=block, block_k=block,
                                              seq_q=T, seq_k=T)


# --------------------------------------------------------------------------------------- attention

def _uses_dense_step(model: str, layer_idx, timestep, dense_layers, dense_timesteps) -> bool:
    defaults = MODEL_DEFAULTS[model]
    layer_idx = _check_optional_int("layer_idx", layer_idx)
    timestep = _check_optional_int("timestep", timestep)
    dense_layers = _check_optional_int("dense_layers", dense_layers)
    dense_timesteps = _check_optional_int("dense_timesteps", dense_timesteps)
    dense_layers = defaults.dense_layers if dense_layers is None else dense_layers
    dense_timesteps = defaults.dense_timesteps if dense_timesteps is None else dense_timesteps
    return ((layer_idx is not None and layer_idx < dense_layers)
            or (timestep is not None and timestep < dense_timesteps))


def radial_attention(q, k, v, *, num_frames: int, tokens_per_frame: int, n_text: int = 0, block: int = 128,
                     decay_factor: float | None = None, model: str = "wan", granularity: str = "block",
                     layer_idx: int | None = None, timestep: int | None = None, dense_layers: int | None = None,
                     dense_timesteps: int | None = None, scale: float | None = None, impl: str = "auto"):
    """Radial attention over ``[video frames | text]`` tokens: ``q [B, T, H, D]``, ``k, v [B, T, Hkv, D]``
    with ``T = num_frames * tokens_per_frame + n_text``.

    Exact softmax attention restricted to the radial mask (``granularity`` "block": the official tile mask;
    "token": the token-level rule), on ``jattn.block_sparse_attention``. Dense schedule: when ``layer_idx <
    dense_layers`` or ``timestep < dense_timesteps`` (a ``None`` index never triggers; ``None`` thresholds
    take the model's defaults) the call is plain dense attention (``jattn.attention``). All arguments but
    q, k, v are static. ``block`` must be a power of two >= 16 (the kernel tile).
    """
    B, T, S, H, Hkv, D = checks.check_qkv(q, k, v)
    layout = _layout(num_frames, tokens_per_frame, n_text, block, decay_factor, model)
    checks.check_block_size("block", block, minimum=16)
    checks.check_choice("granularity", granularity, GRANULARITIES)
    checks.check_choice("impl", impl, checks.IMPLS)
    if T != S or T != layout.seq_len:
        raise ValueError(f"q and k must both hold num_frames * tokens_per_frame + n_text = {num_frames} * "
                         f"{tokens_per_frame} + {n_text} = {layout.seq_len} tokens, got q {checks.describe(q)} "
                         f"and k {checks.describe(k)}")
    if _uses_dense_step(model, layer_idx, timestep, dense_layers, dense_timesteps):
        return attention(q, k, v, scale=scale, impl=impl)
    block_mask = radial_attention_mask(num_frames, tokens_per_frame, n_text, block=block,
                                       decay_factor=layout.decay_factor, model=model, granularity=granularity)
    mask_fn = None
    if granularity == "token":
        mask_fn = radial_mask_fn(num_frames, tokens_per_frame, n_text, block=block,
                                 decay_factor=layout.decay_factor, model=model)
    return block_sparse_attention(q, k, v, block_mask, mask_fn=mask_fn, scale=scale, impl=impl)
