"""A tiny captioning vision-language model (issue 16): a ViT encoder feeding a LLaVA-style prefix decoder.

``TinyVLM(images [B, S, S, C], tokens [B, T]) -> logits [B, T, V]``:

1. **Encoder** (a ViT without class token): an optional convolutional stem (``stem_layers`` 3x3
   stride-1 SAME convolutions with ``stem_channels`` channels, each followed by GELU; ``stem_channels=0``
   is no stem), then non-overlapping ``patch_size`` patches of the (stem) feature map (32x32 images with
   patches of 4: 64 image tokens), a linear patch embedding, learned positions, ``encoder_layers``
   bidirectional :class:`~jattn.nn.models.TransformerBlock` s (pre-LayerNorm, GELU MLP), a final norm.
   The stem is local (receptive field ``2 * stem_layers + 1`` pixels) and keeps the token grid aligned
   with the image: :meth:`TinyVLM.embed_patches` token ``(i, j)`` depends only on pixels within
   ``stem_layers`` of patch ``(i, j)``. It is there because objects of radius 3-5 px span 2-3 patches of
   4: a linear patch embedding named colours and counts but could not tell circles, squares and
   triangles apart (23% exact match on held-out shapes without it; see docs/vlm.md).
2. **Projector**: ``Linear -> GELU -> Linear`` into the decoder width (LLaVA-1.5's two-layer MLP).
3. **Decoder**: one sequence ``[image tokens (N), text tokens (T)]`` through ``decoder_layers``
   pre-norm blocks whose :class:`~jattn.nn.Attention` runs any registered ``method`` under the
   **prefix-LM mask** of :func:`prefix_lm_mask`: image tokens attend to every image token (a
   bidirectional prefix) and to no text; text token ``t`` attends to every image token and to text
   tokens ``<= t``. The text tokens get a word embedding plus a learned position ``0..T-1`` counted from
   the first text token, and the image tokens a learned "image" type embedding; the decoder uses no
   other position information, so the number of image tokens ``N`` may differ from the encoder's
   (token dropping/merging at inference, DyMU P67) and a masked-out image token (``image_mask``) is
   exactly a removed one. Logits come from an untied linear head at the text positions only.

Everything the attention-over-image methods need is exposed: :meth:`TinyVLM.encode_image` (the
projected image tokens), :meth:`TinyVLM.decode` (any ``[B, N, dim]`` image tokens, ``image_mask``,
``return_probs=True`` gives one ``[B, H, N+T, N+T]`` map per decoder layer) and :func:`token_layout`
(which positions are image and which text).

Greedy decoding, :func:`greedy_decode`, is one compiled ``fori_loop`` over a fixed ``[B, max_len]``
buffer (bos, then pads): the prefix mask makes the positions after ``t`` invisible to the logits at
``t``, so each step re-runs the short sequence without a KV cache and the loop compiles once per shape.
A row that emitted ``eos`` is padded from there on.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.core import checks
from jattn.nn.attention import _positive_int
from jattn.nn.models import TransformerBlock, check_token_ids, layer_method_configs, make_norm


def prefix_lm_mask(num_image: int, num_text: int, image_mask=None):
    """The decoder's mask ``[B|1, 1, N+T, N+T]`` (True = attend) for ``N`` image then ``T`` text tokens.

    Image rows see all (kept) image columns and no text; text row ``t`` sees all (kept) image columns and
    text columns ``<= t``. ``image_mask [B, N]`` (True = keep) removes image columns for every row; a
    dropped image token's own row still sees itself, so no row is fully masked.
    """
    N, T = int(num_image), int(num_text)
    if N < 0 or T < 0 or N + T == 0:
        raise ValueError(f"num_image and num_text must be >= 0 with a positive sum, got {N} and {T}")
    L = N + T
    rows, cols = np.arange(L)[:, None], np.arange(L)[None, :]
    base = (cols < N) & ((rows >= N) | (cols < N))              # everyone sees the image prefix (image rows: only it)
    base |= (rows >= N) & (cols >= N) & (cols <= rows)          # causal text
    mask = jnp.asarray(base)[None, None]
    if image_mask is None:
        return mask
    image_mask = jnp.asarray(image_mask)
    if image_mask.ndim != 2 or image_mask.shape[1] != N or image_mask.dtype != jnp.bool_:
        raise ValueError(f"image_mask must be a bool array [B, N={N}], got {checks.describe(image_mask)}")
    keep = jnp.concatenate([image_mask, jnp.ones((image_mask.shape[0], T), bool)], axis=1)   # [B, L]
    eye = jnp.eye(L, dtype=bool)[None, None]
    return (mask & keep[:, None, None, :]) | eye


def token_layout(num_image: int, num_text: int) -> dict:
    """Where the decoder's tokens sit: ``{"image": slice(0, N), "text": slice(N, N+T), "is_image": bool [N+T]}``."""
    N, T = int(num_image), int(num_text)
    return {"image": slice(0, N), "text": slice(N, N + T), "is_image": np.arange(N + T) < N}


class TinyVLM(nnx.Module):
    """ViT encoder + projector + prefix-LM decoder (see the module docstring).

    Args:
      vocab_size: the word vocabulary (``train.captioning.Vocab``).
      image_size, patch_size, channels: the image frame; ``(image_size // patch_size) ** 2`` image tokens.
      stem_channels, stem_layers: the convolutional stem before patchifying (``stem_channels=0``: none).
      dim: the decoder width; ``encoder_dim`` the encoder's (default ``dim``).
      encoder_layers, decoder_layers, num_heads: depths and heads (both stacks).
      max_text_len: the longest token sequence the decoder takes (learned text positions).
      method, method_config: the decoder attention's jattn method (the encoder is plain softmax);
        ``layer_methods`` one ``(name, config)`` per decoder layer instead.
    """

    def __init__(self, vocab_size: int, *, rngs: nnx.Rngs, image_size: int = 32, patch_size: int = 4,
                 channels: int = 3, stem_channels: int = 0, stem_layers: int = 2, dim: int = 64,
                 encoder_dim: int | None = None, encoder_layers: int = 2,
                 decoder_layers: int = 2, num_heads: int = 4, mlp_dim: int | None = None, max_text_len: int = 16,
                 method: str = "softmax", method_config: dict | None = None,
                 layer_methods: Sequence[tuple[str, dict]] | None = None):
        self.vocab_size = _positive_int("vocab_size", vocab_size)
        self.image_size = _positive_int("image_size", image_size)
        self.patch_size = _positive_int("patch_size", patch_size)
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        self.channels = _positive_int("channels", channels)
        if isinstance(stem_channels, bool) or not isinstance(stem_channels, int) or stem_channels < 0:
            raise ValueError(f"stem_channels must be an int >= 0 (0: no stem), got {stem_channels!r}")
        self.stem_channels = stem_channels
        self.stem_layers = _positive_int("stem_layers", stem_layers) if stem_channels else 0
        self.dim = _positive_int("dim", dim)
        enc_dim = _positive_int("encoder_dim", dim if encoder_dim is None else encoder_dim)
        self.encoder_layers = _positive_int("encoder_layers", encoder_layers)
        self.decoder_layers = _positive_int("decoder_layers", decoder_layers)
        self.max_text_len = _positive_int("max_text_len", max_text_len)
        self.num_image_tokens = (image_size // patch_size) ** 2
        init = lambda shape: jax.random.normal(rngs.params(), shape, jnp.float32) * 0.02  # noqa: E731

        self.stem = nnx.List([
            nnx.Conv(channels if i == 0 else stem_channels, stem_channels, (3, 3), padding="SAME", rngs=rngs)
            for i in range(self.stem_layers)])
        feature_channels = stem_channels if stem_channels else channels
        self.patch_embed = nnx.Linear(patch_size * patch_size * feature_channels, enc_dim, rngs=rngs)
        self.pos_embed = nnx.Param(init((1, self.num_image_tokens, enc_dim)))
        self.encoder = nnx.List([
            TransformerBlock(enc_dim, num_heads, rngs=rngs, mlp_dim=mlp_dim, mlp="gelu", norm="layer",
                             causal=False, use_bias=True, method="softmax")
            for _ in range(self.encoder_layers)])
        self.encoder_norm = make_norm("layer", enc_dim, rngs=rngs)
        self.project_in = nnx.Linear(enc_dim, dim, rngs=rngs)
        self.project_out = nnx.Linear(dim, dim, rngs=rngs)

        self.image_type = nnx.Param(init((1, 1, dim)))
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.text_pos = nnx.Param(init((1, self.max_text_len, dim)))
        self.decoder = nnx.List([
            TransformerBlock(dim, num_heads, rngs=rngs, mlp_dim=mlp_dim, mlp="gelu", norm="layer",
                             causal=False, use_bias=True, method=name, **config)
            for name, config in layer_method_configs(self.decoder_layers, method, method_config, layer_methods)])
        self.final_norm = make_norm("layer", dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab_size, rngs=rngs)

    # --- encoder --------------------------------------------------------------------------------

    def patchify(self, images):
        B, S, _, C = images.shape
        p = self.patch_size
        x = images.reshape(B, S // p, p, S // p, p, C).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(B, (S // p) ** 2, p * p * C)

    def embed_patches(self, images):
        """``images [B, S, S, C]`` -> the encoder's input tokens ``[B, N, encoder_dim]`` (stem, patchify,
        linear embedding, learned positions; row-major patches)."""
        checks.check_float_array("images", images, 4)
        want = (self.image_size, self.image_size, self.channels)
        if tuple(images.shape[1:]) != want:
            raise ValueError(f"images must be [B, {want[0]}, {want[1]}, {want[2]}], got shape {tuple(images.shape)}")
        x = images.astype(jnp.float32)
        for conv in self.stem:
            x = jax.nn.gelu(conv(x))
        return self.patch_embed(self.patchify(x)) + self.pos_embed[...]

    def encode_image(self, images, *, return_probs: bool = False):
        """``images [B, S, S, C]`` in [0, 1] -> projected image tokens ``[B, N, dim]`` (row-major patches)
        (and the encoder's per-layer maps ``[B, H, N, N]`` with ``return_probs``)."""
        x = self.embed_patches(images)
        maps = []
        for block in self.encoder:
            result = block(x, return_probs=return_probs)
            x, probs = result if return_probs else (result, None)
            maps.append(probs)
        x = self.project_out(jax.nn.gelu(self.project_in(self.encoder_norm(x))))
        return (x, maps) if return_probs else x

    # --- decoder --------------------------------------------------------------------------------

    def decode(self, image_tokens, tokens, *, image_mask=None, return_probs: bool = False):
        """``image_tokens [B, N, dim]`` (any ``N >= 1``), ``tokens [B, T]`` -> logits ``[B, T, V]`` at the text
        positions (and one decoder map ``[B, H, N+T, N+T]`` per layer with ``return_probs``; positions as in
        :func:`token_layout`). ``image_mask [B, N]`` bool (True = keep) hides image tokens from every query."""
        checks.check_float_array("image_tokens", image_tokens, 3)
        if image_tokens.shape[-1] != self.dim:
            raise ValueError(f"image_tokens must be [B, N, dim={self.dim}], got shape {tuple(image_tokens.shape)}")
        B, N = image_tokens.shape[:2]
        if N < 1:
            raise ValueError(f"image_tokens must hold at least one token, got shape {tuple(image_tokens.shape)}")
        tokens = self.check_tokens(tokens, B)
        T = tokens.shape[1]
        if image_mask is not None:
            image_mask = jnp.asarray(image_mask)
            if image_mask.shape != (B, N) or image_mask.dtype != jnp.bool_:
                raise ValueError(f"image_mask must be a bool array [B={B}, N={N}], got {checks.describe(image_mask)}")
        mask = prefix_lm_mask(N, T, image_mask)
        text = self.embed(tokens) + self.text_pos[:, :T]
        x = jnp.concatenate([image_tokens.astype(jnp.float32) + self.image_type[...], text], axis=1)
        maps = []
        for block in self.decoder:
            result = block(x, mask=mask, return_probs=return_probs)
            x, probs = result if return_probs else (result, None)
            maps.append(probs)
        logits = self.head(self.final_norm(x[:, N:])).astype(jnp.float32)
        return (logits, maps) if return_probs else logits

    def check_tokens(self, tokens, batch: int | None = None):
        """``tokens`` as an int array ``[B, T]`` with ``1 <= T <= max_text_len`` and (concrete) ids in range."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array [B, T], got {checks.describe(tokens)}")
        if batch is not None and tokens.shape[0] != batch:
            raise ValueError(f"tokens has batch {tokens.shape[0]} but the image tokens have batch {batch}")
        if not 1 <= tokens.shape[1] <= self.max_text_len:
            raise ValueError(f"tokens must have 1..max_text_len={self.max_text_len} positions, got T={tokens.shape[1]}")
        check_token_ids("tokens", tokens, self.vocab_size)
        return tokens

    def __call__(self, images, tokens, *, image_mask=None, return_probs: bool = False):
        """``decode(encode_image(images), tokens)``; with ``return_probs`` the maps are the decoder's."""
        self.check_tokens(tokens, jnp.shape(images)[0] if jnp.ndim(images) else None)
        return self.decode(self.encode_image(images), tokens, image_mask=image_mask, return_probs=return_probs)

    def generate(self, images, *, bos: int, eos: int, pad: int, max_len: int | None = None, image_tokens=None,
                 image_mask=None):
        """Greedy captions ``[B, max_len]`` int32 (bos first, pads after eos) of ``images`` — or of the given
        ``image_tokens`` (then ``images`` may be None). See :func:`greedy_decode`."""
        max_len = self.max_text_len if max_len is None else _positive_int("max_len", max_len)
        if max_len > self.max_text_len:
            raise ValueError(f"max_len must be <= max_text_len={self.max_text_len}, got {max_len}")
        if image_tokens is None:
            image_tokens = self.encode_image(images)
        graphdef, state = nnx.split(self)
        fn = make_generate_fn(graphdef, bos=bos, eos=eos, pad=pad, max_len=max_len)
        return fn(state, image_tokens, image_mask)


def make_generate_fn(graphdef, *, bos: int, eos: int, pad: int, max_len: int):
    """A compiled ``fn(state, image_tokens, image_mask) -> [B, max_len]`` greedy captioner for a split
    :class:`TinyVLM` (``graphdef, state = nnx.split(model)``): build it once and reuse it (one compile per
    input shape; NNX graph definitions are not hashable, so this cannot be a static ``jit`` argument)."""
    bos, eos, pad, max_len = int(bos), int(eos), int(pad), _positive_int("max_len", max_len)

    def run(state, image_tokens, image_mask):
        model = nnx.merge(graphdef, state)

        def logits_fn(buffer):
            return model.decode(image_tokens, buffer, image_mask=image_mask)

        return greedy_decode(logits_fn, image_tokens.shape[0], max_len, bos=bos, eos=eos, pad=pad)

    return jax.jit(run)


def greedy_decode(logits_fn, batch_size: int, max_len: int, *, bos: int, eos: int, pad: int):
    """Greedy decoding with a causal ``logits_fn(tokens [B, max_len]) -> [B, max_len, V]``.

    Starts from ``[bos, pad, ...]``; step ``t`` writes ``argmax(logits[:, t])`` at ``t + 1``. Once a row has
    written ``eos`` it writes ``pad`` from then on (the row has stopped). Returns ``[B, max_len]`` int32.
    ``logits_fn`` must be causal: its logits at ``t`` may not depend on tokens after ``t``.
    """
    B, L = _positive_int("batch_size", batch_size), _positive_int("max_len", max_len)
    buffer = jnp.full((B, L), pad, jnp.int32).at[:, 0].set(bos)

    def body(t, carry):
        buffer, done = carry
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits_fn(buffer), t, axis=1, keepdims=False), -1)
        nxt = jnp.where(done, pad, nxt).astype(jnp.int32)
        buffer = jax.lax.dynamic_update_index_in_dim(buffer, nxt, t + 1, axis=1)
        return buffer, done | (nxt == eos)

    buffer, _ = jax.lax.fori_loop(0, L - 1, body, (buffer, jnp.zeros((B,), bool)))
    return buffer
