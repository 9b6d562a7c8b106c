"""Transformer blocks and models built on :class:`jattn.nn.Attention`: a decoder LM, a ViT and a BERT encoder.

Every model takes ``method`` (a registered attention method name) and ``method_config`` (its keyword
config), or ``layer_methods`` — one ``(name, config)`` per layer — for hybrids.
"""
from __future__ import annotations

import collections
import functools

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.core import checks
from jattn.methods.linear.transnormer import srms_norm
from jattn.nn.attention import Attention, _positive_int
from jattn.nn.methods import get_method

NORMS = ("rms", "layer", "srms")
MLPS = ("swiglu", "gelu", "sglu")


class SRMSNorm(nnx.Module):
    """TransNormerLLM's SRMSNorm (``jattn.methods.linear.transnormer.srms_norm``) as a module: no gain."""

    def __init__(self, eps: float = 1e-6):
        self.eps = eps

    def __call__(self, x):
        return srms_norm(x, self.eps)


def make_norm(kind: str, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6, param_dtype=jnp.float32):
    checks.check_choice("norm", kind, NORMS)
    if kind == "rms":
        return nnx.RMSNorm(dim, epsilon=eps, param_dtype=param_dtype, rngs=rngs)
    if kind == "layer":
        return nnx.LayerNorm(dim, epsilon=eps, param_dtype=param_dtype, rngs=rngs)
    return SRMSNorm(eps)


class MLP(nnx.Module):
    """``swiglu``: ``(silu(x W_g) * x W_u) W_d``; ``gelu``: ``gelu(x W_u) W_d`` (exact erf GELU, as BERT);
    ``sglu``: ``(x W_g * x W_u) W_d`` with no activation (TransNormerLLM)."""

    def __init__(self, dim: int, hidden_dim: int, *, kind: str = "swiglu", use_bias: bool = False,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        checks.check_choice("mlp", kind, MLPS)
        self.kind = kind

        def linear(din, dout):
            return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.up = linear(dim, hidden_dim)
        self.gate = linear(dim, hidden_dim) if kind != "gelu" else None
        self.down = linear(hidden_dim, dim)

    def __call__(self, x):
        if self.kind == "gelu":
            return self.down(jax.nn.gelu(self.up(x), approximate=False))
        gate = self.gate(x)
        if self.kind == "swiglu":
            gate = jax.nn.silu(gate)
        return self.down(gate * self.up(x))


def check_token_ids(name: str, ids, vocab_size: int, vocab_name: str = "vocab_size") -> None:
    """``ValueError`` when a concrete id array holds an id outside ``[0, vocab_size)``.

    Only concrete arrays are checked (outside ``jit``: one device-to-host read of the min and max). Under
    ``jit`` the ids are tracers and cannot be checked without a runtime check: there ``nnx.Embed``'s
    ``jnp.take`` returns NaN rows for ids ``>= vocab_size`` (the NaN spreads through attention, so logits
    and loss turn NaN) and wraps negative ids around from the end. Check the data before it enters a
    jitted step.
    """
    if checks.is_traced(ids) or ids.size == 0:
        return
    low, high = int(jnp.min(ids)), int(jnp.max(ids))
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise ValueError(f"{name} holds token id {bad} (ids range over [{low}, {high}]), outside "
                         f"[0, {vocab_name}={vocab_size}): ids must be < {vocab_name}")


class TransformerBlock(nnx.Module):
    """Attention then MLP, each with a residual; ``norm_position="pre"`` (GPT/Llama) or ``"post"`` (BERT).

    Extra keyword arguments go to :class:`Attention` (``method``, its config, ``rope``, ``causal``...)."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, mlp_dim: int | None = None,
                 mlp: str = "swiglu", norm: str = "rms", norm_position: str = "pre", norm_eps: float = 1e-6,
                 use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, **attention_kwargs):
        checks.check_choice("norm_position", norm_position, ("pre", "post"))
        self.norm_position = norm_position
        self.attention = Attention(dim, num_heads, rngs=rngs, use_bias=use_bias, dtype=dtype,
                                   param_dtype=param_dtype, **attention_kwargs)
        self.mlp = MLP(dim, 4 * dim if mlp_dim is None else _positive_int("mlp_dim", mlp_dim), kind=mlp,
                       use_bias=use_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = make_norm(norm, dim, rngs=rngs, eps=norm_eps, param_dtype=param_dtype)
        self.mlp_norm = make_norm(norm, dim, rngs=rngs, eps=norm_eps, param_dtype=param_dtype)

    def __call__(self, x, *, mask=None, positions=None, return_probs: bool = False, decode: bool = False,
                 prefill: bool = False):
        pre = self.norm_position == "pre"
        result = self.attention(self.attn_norm(x) if pre else x, mask=mask, positions=positions,
                                return_probs=return_probs, decode=decode, prefill=prefill)
        attn_out, probs = result if return_probs else (result, None)
        if pre:
            x = x + attn_out
            x = x + self.mlp(self.mlp_norm(x))
        else:
            x = self.attn_norm(x + attn_out)
            x = self.mlp_norm(x + self.mlp(x))
        return (x, probs) if return_probs else x


def layer_method_configs(num_layers: int, method: str, method_config: dict | None,
                         layer_methods: Sequence[tuple[str, dict]] | None) -> list[tuple[str, dict]]:
    """One ``(method, config)`` per layer; layer-aware methods get ``layer_index`` and ``num_layers``."""
    if layer_methods is None:
        layer_methods = [(method, dict(method_config or {}))] * num_layers
    elif len(layer_methods) != num_layers:
        raise ValueError(f"layer_methods must have num_layers={num_layers} entries, got {len(layer_methods)}")
    resolved = []
    for index, (name, config) in enumerate(layer_methods):
        config = dict(config)
        if get_method(name).layer_aware:
            config.update(layer_index=index, num_layers=num_layers)
        resolved.append((name, config))
    return resolved


class DecoderLM(nnx.Module):
    """A causal decoder-only LM (pre-norm, RoPE by default): ``tokens [B, T] int -> logits [B, T, V]``.

    Token ids must lie in ``[0, vocab_size)``: a concrete ``tokens`` array with others raises
    ``ValueError``; under ``jit`` they cannot be checked (see :func:`check_token_ids`)."""

    def __init__(self, vocab_size: int, dim: int, num_layers: int, num_heads: int, *, rngs: nnx.Rngs,
                 num_kv_heads: int | None = None, mlp_dim: int | None = None, mlp: str = "swiglu",
                 norm: str = "rms", method: str = "softmax", method_config: dict | None = None,
                 layer_methods: Sequence[tuple[str, dict]] | None = None, rope: bool = True,
                 rope_theta: float = 10000.0, output_gate: bool = False, tie_embeddings: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.vocab_size = _positive_int("vocab_size", vocab_size)
        self.num_layers = _positive_int("num_layers", num_layers)
        self.embed = nnx.Embed(vocab_size, dim, param_dtype=param_dtype, rngs=rngs)
        self.blocks = nnx.List([
            TransformerBlock(dim, num_heads, rngs=rngs, num_kv_heads=num_kv_heads, mlp_dim=mlp_dim, mlp=mlp,
                             norm=norm, rope=rope, rope_theta=rope_theta, causal=True, output_gate=output_gate,
                             method=name, dtype=dtype, param_dtype=param_dtype, **config)
            for name, config in layer_method_configs(num_layers, method, method_config, layer_methods)])
        self.final_norm = make_norm(norm, dim, rngs=rngs, param_dtype=param_dtype)
        self.head = None if tie_embeddings else nnx.Linear(dim, vocab_size, use_bias=False, dtype=dtype,
                                                           param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype

    def init_cache(self, batch_size: int, max_length: int, *, kind: str = "contiguous", page_size: int = 16,
                   cache_options=None) -> None:
        """Every layer's decoding cache (``Attention.init_cache``; ``kind`` is one of its kinds).

        ``cache_options``: the kind's options (``Attention.init_cache``), one dict for every layer or a list of
        one dict per layer (DuoAttention's ``is_retrieval`` differs by layer)."""
        for block, options in zip(self.blocks, self._layer_cache_options(cache_options)):
            block.attention.init_cache(batch_size, max_length, kind=kind, page_size=page_size, **options)

    def _layer_cache_options(self, cache_options) -> list[dict]:
        if cache_options is None:
            return [{}] * self.num_layers
        if isinstance(cache_options, dict):
            return [dict(cache_options)] * self.num_layers
        if not isinstance(cache_options, (list, tuple)) or len(cache_options) != self.num_layers \
                or not all(isinstance(options, dict) for options in cache_options):
            raise ValueError(f"cache_options must be a dict or a list of {self.num_layers} dicts (one per layer), "
                             f"got {cache_options!r}")
        return [dict(options) for options in cache_options]

    def generate(self, prompt, max_new_tokens: int, *, cache: str = "contiguous", page_size: int = 16,
                 cache_options=None):
        """Greedy generation: the prompt is prefilled into the decoding caches through each method's own
        prefill path (the flash or block-sparse kernel; H2O and DuoAttention caches through their own
        prefill), then each new token is one call of a compiled decode step (traced once for the prompt's
        shape and once for a single token; see ``GENERATION_TRACES``).

        Args:
          prompt: ``[B, T]`` int token ids.
          max_new_tokens: tokens to generate.
          cache: the caches' kind (``Attention.init_cache``): ``"contiguous"``, ``"paged"``, ``"int8"``,
            ``"int4"``, ``"h2o"`` or ``"duo"``; methods with a ``decode_kernel`` attend through
            ``jattn.decode_attention``.
          page_size: the caches' page (and decode-kernel tile) size.
          cache_options: the kind's options, one dict or one per layer (``init_cache``).

        Returns:
          ``[B, max_new_tokens]`` int32 tokens. The model's caches hold the whole sequence afterwards (or, for
          ``"h2o"`` and ``"duo"``, what those caches keep of it).
        """
        prompt = jnp.asarray(prompt)
        if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
            raise ValueError(f"prompt must be an int array [B, T], got {checks.describe(prompt)}")
        check_token_ids("prompt", prompt, self.vocab_size)
        steps = _positive_int("max_new_tokens", max_new_tokens)
        self.init_cache(prompt.shape[0], prompt.shape[1] + steps, kind=cache, page_size=page_size,
                        cache_options=cache_options)
        graphdef, state = nnx.split(self)
        # one compile per shape, per generate call
        step = jax.jit(functools.partial(_greedy_step, graphdef), static_argnames="prefill")
        token, state = step(state, prompt.astype(jnp.int32), prefill=True)
        tokens = [token]
        for _ in range(steps - 1):
            token, state = step(state, token[:, None])
            tokens.append(token)
        nnx.update(self, state)
        return jnp.stack(tokens, axis=1)

    def __call__(self, tokens, *, return_probs: bool = False, decode: bool = False, prefill: bool = False):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array [B, T], got {checks.describe(tokens)}")
        check_token_ids("tokens", tokens, self.vocab_size)
        x = self.embed(tokens).astype(self.dtype)
        maps = []
        for block in self.blocks:
            result = block(x, return_probs=return_probs, decode=decode, prefill=prefill)
            x, probs = result if return_probs else (result, None)
            maps.append(probs)
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.head is None else self.head(x)
        logits = logits.astype(jnp.float32)
        return (logits, maps) if return_probs else logits


# How often _greedy_step was traced, per input shape (a test proves a generation compiles once per shape).
GENERATION_TRACES: collections.Counter = collections.Counter()


def _greedy_step(graphdef, state, tokens, prefill: bool = False):
    """Feeds ``tokens [B, T]`` through the model's caches; returns the next greedy token and the new state."""
    GENERATION_TRACES[tokens.shape] += 1
    model = nnx.merge(graphdef, state)
    logits = model(tokens, decode=True, prefill=prefill)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), nnx.state(model)


class ViT(nnx.Module):
    """Vision transformer: ``images [B, H, W, C] -> logits [B, num_classes]`` (class token, learned positions)."""

    def __init__(self, image_size: int, patch_size: int, channels: int, num_classes: int, dim: int,
                 num_layers: int, num_heads: int, *, rngs: nnx.Rngs, mlp_dim: int | None = None,
                 method: str = "softmax", method_config: dict | None = None, norm: str = "layer",
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.image_size, self.patch_size = _positive_int("image_size", image_size), _positive_int("patch_size", patch_size)
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        self.channels = _positive_int("channels", channels)
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nnx.Linear(patch_size * patch_size * channels, dim, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)
        self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, dim), param_dtype) * 0.02)
        self.pos_embed = nnx.Param(jax.random.normal(rngs.params(), (1, num_patches + 1, dim), param_dtype) * 0.02)
        self.blocks = nnx.List([
            TransformerBlock(dim, num_heads, rngs=rngs, mlp_dim=mlp_dim, mlp="gelu", norm=norm, causal=False,
                             use_bias=True, method=name, dtype=dtype, param_dtype=param_dtype, **config)
            for name, config in layer_method_configs(num_layers, method, method_config, None)])
        self.final_norm = make_norm(norm, dim, rngs=rngs, param_dtype=param_dtype)
        self.head = nnx.Linear(dim, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def patchify(self, images):
        B, Hi, Wi, C = images.shape
        p = self.patch_size
        x = images.reshape(B, Hi // p, p, Wi // p, p, C).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(B, (Hi // p) * (Wi // p), p * p * C)

    def __call__(self, images, *, return_probs: bool = False):
        checks.check_float_array("images", images, 4)
        want = (self.image_size, self.image_size, self.channels)
        if tuple(images.shape[1:]) != want:
            raise ValueError(f"images must be [B, {want[0]}, {want[1]}, {want[2]}], got shape {images.shape}")
        x = self.patch_embed(self.patchify(images))
        cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
        maps = []
        for block in self.blocks:
            result = block(x, return_probs=return_probs)
            x, probs = result if return_probs else (result, None)
            maps.append(probs)
        logits = self.head(self.final_norm(x)[:, 0])
        return (logits, maps) if return_probs else logits


class BertEncoder(nnx.Module):
    """BERT-style encoder (post-norm, GELU, learned absolute positions, token types).

    ``input_ids [B, T]``, ``attention_mask [B, T]`` (1 = token, 0 = padding) -> hidden ``[B, T, dim]``
    (+ per-layer attention maps ``[B, H, T, T]`` with ``return_probs``). Concrete ``input_ids`` and
    ``token_type_ids`` outside their vocabularies raise ``ValueError`` (unchecked under ``jit``: see
    :func:`check_token_ids`)."""

    def __init__(self, vocab_size: int, dim: int, num_layers: int, num_heads: int, *, rngs: nnx.Rngs,
                 mlp_dim: int | None = None, max_position: int = 512, type_vocab_size: int = 2,
                 norm_eps: float = 1e-12, method: str = "softmax", method_config: dict | None = None,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.word_embed = nnx.Embed(_positive_int("vocab_size", vocab_size), dim, param_dtype=param_dtype, rngs=rngs)
        self.max_position = _positive_int("max_position", max_position)
        self.position_embed = nnx.Embed(max_position, dim, param_dtype=param_dtype, rngs=rngs)
        self.type_embed = nnx.Embed(_positive_int("type_vocab_size", type_vocab_size), dim,
                                    param_dtype=param_dtype, rngs=rngs)
        self.embed_norm = nnx.LayerNorm(dim, epsilon=norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.blocks = nnx.List([
            TransformerBlock(dim, num_heads, rngs=rngs, mlp_dim=mlp_dim, mlp="gelu", norm="layer",
                             norm_position="post", norm_eps=norm_eps, use_bias=True, causal=False,
                             method=name, dtype=dtype, param_dtype=param_dtype, **config)
            for name, config in layer_method_configs(num_layers, method, method_config, None)])

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, return_probs: bool = False):
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an int array [B, T], got {checks.describe(input_ids)}")
        B, T = input_ids.shape
        if T > self.max_position:
            raise ValueError(f"input_ids has T={T} tokens, more than max_position={self.max_position}")
        for name, extra in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if extra is not None and tuple(jnp.shape(extra)) != (B, T):
                raise ValueError(f"{name} must have shape {(B, T)} like input_ids, got {checks.describe(extra)}")
        token_type_ids = jnp.zeros_like(input_ids) if token_type_ids is None else jnp.asarray(token_type_ids)
        check_token_ids("input_ids", input_ids, self.word_embed.num_embeddings)
        check_token_ids("token_type_ids", token_type_ids, self.type_embed.num_embeddings, "type_vocab_size")
        x = (self.word_embed(input_ids) + self.position_embed(jnp.arange(T)[None])
             + self.type_embed(token_type_ids))
        x = self.embed_norm(x)
        key_mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
        maps = []
        for block in self.blocks:
            result = block(x, mask=key_mask, return_probs=return_probs)
            x, probs = result if return_probs else (result, None)
            maps.append(probs)
        return (x, maps) if return_probs else x


def mean_pool(hidden, attention_mask):
    """Mean of ``hidden [B, T, D]`` over the tokens where ``attention_mask [B, T]`` is 1 (sentence-transformers)."""
    weights = jnp.asarray(attention_mask).astype(jnp.float32)[..., None]
    return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)


def l2_normalize(x, eps: float = 1e-12):
    """``x / max(||x||, eps)`` along the last axis (torch.nn.functional.normalize)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
