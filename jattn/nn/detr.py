"""A tiny DETR (Carion et al., ECCV 2020) for the procedural shapes set: the subject of the P35 DEIM experiment.

``images [B, S, S, C] -> (logits [L, B, Q, num_classes + 1], boxes [L, B, Q, 4])`` with one entry per decoder
layer ``L`` (the last is the prediction; the others feed DETR's auxiliary losses). Boxes are normalised
``(cx, cy, w, h)`` in [0, 1] (a sigmoid). The last logit is DETR's no-object class; sigmoid-based objectives
(DEIM's MAL, VFL) read only the first ``num_classes``.

* Backbone: ``patch``-strided convolution stack: ``conv 3x3 stride 2 -> GELU -> conv 3x3 stride 2 -> GELU``
  (``S -> S/4``, so 32 px gives an 8x8 grid of 64 tokens), a linear to ``dim`` and a learned position embedding.
* Encoder: ``num_encoder_layers`` pre-norm :class:`jattn.nn.models.TransformerBlock` (non-causal
  :class:`jattn.nn.Attention`, GELU MLP, LayerNorm); ``method=`` picks any registered attention method.
* Decoder: ``num_queries`` learned object queries; each of ``num_decoder_layers`` pre-norm layers runs
  self-attention over the queries (:class:`jattn.nn.Attention`, non-causal), cross-attention from queries to the
  encoder memory (:class:`CrossAttention`, ``jattn.attention`` on ``[B, T, H, D]``) and a GELU MLP; a shared
  LayerNorm, class head (linear) and box head (2-layer MLP, sigmoid) read every layer's output.
``query_mode="tokens"`` (an option added after the learned-query model stayed image-blind for 1,000 steps on
this CPU budget, see docs/detection.md): one query per encoder token, initialised as ``memory + query_embed``,
each box predicted as ``sigmoid(delta + inverse_sigmoid(anchor))`` around its token's grid cell (anchor
``(cx, cy, 0.25, 0.25)``), the dense-query / reference-box idea of two-stage Deformable DETR and RT-DETR
without top-k selection. Matching stays one-to-one. Deliberate simplifications: no CNN ImageNet backbone, no sine position encoding, query embeddings are the
decoder's input (not re-added at every layer), no dropout.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import jattn
from jattn.nn.attention import Attention
from jattn.nn.models import MLP, TransformerBlock


def _pos_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class CrossAttention(nnx.Module):
    """Multi-head cross-attention ``x [B, T, dim]`` over ``memory [B, S, dim]`` via ``jattn.attention``."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.query = nnx.Linear(dim, dim, rngs=rngs)
        self.key = nnx.Linear(dim, dim, rngs=rngs)
        self.value = nnx.Linear(dim, dim, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x, memory):
        B, T, _ = x.shape
        S = memory.shape[1]
        H, D = self.num_heads, self.head_dim
        q = self.query(x).reshape(B, T, H, D)
        k = self.key(memory).reshape(B, S, H, D)
        v = self.value(memory).reshape(B, S, H, D)
        return self.out(jattn.attention(q, k, v, causal=False).reshape(B, T, H * D))


class DecoderLayer(nnx.Module):
    """Pre-norm: ``x += SelfAttn(LN x)``, ``x += CrossAttn(LN x, memory)``, ``x += MLP(LN x)``."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, method: str = "softmax", **method_config):
        self.self_attn = Attention(dim, num_heads, rngs=rngs, causal=False, use_bias=True, method=method,
                                   **method_config)
        self.cross_attn = CrossAttention(dim, num_heads, rngs=rngs)
        self.mlp = MLP(dim, 4 * dim, kind="gelu", use_bias=True, rngs=rngs)
        self.norms = nnx.List([nnx.LayerNorm(dim, rngs=rngs) for _ in range(3)])

    def __call__(self, x, memory):
        x = x + self.self_attn(self.norms[0](x))
        x = x + self.cross_attn(self.norms[1](x), memory)
        return x + self.mlp(self.norms[2](x))


class TinyDETR(nnx.Module):
    """See the module docstring. ``image_size`` must be a multiple of 4."""

    def __init__(self, *, num_classes: int = 3, image_size: int = 32, channels: int = 3, dim: int = 64,
                 num_heads: int = 4, num_queries: int = 20, num_encoder_layers: int = 2,
                 num_decoder_layers: int = 2, method: str = "softmax", query_mode: str = "learned",
                 rngs: nnx.Rngs, **method_config):
        for name, value in (("num_classes", num_classes), ("image_size", image_size), ("channels", channels),
                            ("dim", dim), ("num_heads", num_heads), ("num_queries", num_queries),
                            ("num_encoder_layers", num_encoder_layers), ("num_decoder_layers", num_decoder_layers)):
            _pos_int(name, value)
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two stride-2 convs), got {image_size}")
        self.num_classes, self.image_size, self.channels = num_classes, image_size, channels
        if query_mode not in ("learned", "tokens"):
            raise ValueError(f"query_mode must be 'learned' or 'tokens', got {query_mode!r}")
        self.query_mode = query_mode
        tokens = (image_size // 4) ** 2
        if query_mode == "tokens" and num_queries != tokens:
            raise ValueError(f"query_mode='tokens' uses one query per encoder token: num_queries must be "
                             f"(image_size // 4) ** 2 = {tokens}, got {num_queries}")
        self.num_queries = num_queries
        half = max(dim // 2, 8)
        self.conv1 = nnx.Conv(channels, half, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(half, dim, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)
        tokens = (image_size // 4) ** 2
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, dim)))
        self.encoder = nnx.List([
            TransformerBlock(dim, num_heads, rngs=rngs, mlp="gelu", norm="layer", use_bias=True, causal=False,
                             method=method, **method_config) for _ in range(num_encoder_layers)])
        self.enc_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.queries = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, num_queries, dim)))
        self.decoder = nnx.List([DecoderLayer(dim, num_heads, rngs=rngs, method=method, **method_config)
                                 for _ in range(num_decoder_layers)])
        self.dec_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.class_head = nnx.Linear(dim, num_classes + 1, rngs=rngs)
        self.box_hidden = nnx.Linear(dim, dim, rngs=rngs)
        self.box_out = nnx.Linear(dim, 4, rngs=rngs)

    def __call__(self, images):
        if not hasattr(images, "ndim") or images.ndim != 4 or images.shape[1:] != (
                self.image_size, self.image_size, self.channels):
            raise ValueError(f"images must be [B, {self.image_size}, {self.image_size}, {self.channels}], got "
                             f"{getattr(images, 'shape', type(images))}")
        B = images.shape[0]
        h = jax.nn.gelu(self.conv1(images))
        h = jax.nn.gelu(self.conv2(h))
        memory = self.proj(h.reshape(B, -1, h.shape[-1])) + self.pos[...]
        for block in self.encoder:
            memory = block(memory)
        memory = self.enc_norm(memory)
        x = jnp.broadcast_to(self.queries[...], (B,) + self.queries.shape[1:])
        ref = 0.0
        if self.query_mode == "tokens":
            x = x + memory
            g = self.image_size // 4
            c = (jnp.arange(g) + 0.5) / g
            cy, cx = jnp.meshgrid(c, c, indexing="ij")
            anchor = jnp.stack([cx.ravel(), cy.ravel(), jnp.full(g * g, 0.25), jnp.full(g * g, 0.25)], -1)
            ref = jnp.log(anchor) - jnp.log1p(-anchor)  # inverse sigmoid of each token's anchor box
        logits, boxes = [], []
        for layer in self.decoder:
            x = layer(x, memory)
            y = self.dec_norm(x)
            logits.append(self.class_head(y))
            boxes.append(jax.nn.sigmoid(self.box_out(jax.nn.relu(self.box_hidden(y))) + ref))
        return jnp.stack(logits), jnp.stack(boxes)
