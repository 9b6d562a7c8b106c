"""P30 AFA — "Ensembling Diffusion Models via Adaptive Feature Aggregation" (official code: Tenvence/afa,
``models/modules/aggregator.py``; here ported to this project's :class:`jattn.nn.dit.TinyDiT`).

The "attention map" of AFA is a per-pixel softmax over *models*, not a ``QK^T`` map. ``M`` frozen denoisers
of identical architecture run side by side; after every block an aggregator (SABW, "spatial-aware block-wise"
weighting) mixes their ``M`` features ``F_m [B, N, C]`` (``N`` tokens on an ``h x w`` grid)::

    z   = Linear_{M C -> hidden}(concat_m F_m)                     # 1x1 conv
    z   = ResBlock(z, temb)              # GroupNorm-SiLU-3x3 conv, + Linear(SiLU(temb)), GroupNorm-SiLU-3x3 conv
    z   = z + SelfAttention(LN(z)) ;  z = z + CrossAttention(LN(z), cond) ;  z = z + MLP(LN(z))   # 1 layer
    L   = Linear_{hidden -> M}(z)                                  # ZERO-initialised: uniform weights at start
    A   = softmax_m(L)                      [B, M, N]              # per token (pixel), sums to 1 over models
    F   = sum_m A_m * F_m                   [B, N, C]              (spatial_softmax_aggregate)

and the aggregated ``F`` replaces *every* expert's hidden state as the input of the next block. Only the
aggregators train, with the standard epsilon-prediction MSE (:func:`afa_loss`, :func:`make_afa_train_step`).

Insertion points on the DiT (the UNet's ``conv_in``, blocks, ``conv_out``): after the patch embedding
(+ position embedding), after each of the ``depth`` blocks, and on the final layer's token output (the
predicted epsilon patches, before ``unpatchify``): ``depth + 2`` aggregators. The time embedding the
aggregators read is the mean of the experts' conditioning vectors ``silu(temb + class_emb)`` (the official
code averages the experts' ``temb``; the DiT folds the class label into the same vector).

Defaults (tiny, CPU): ``hidden=32, num_heads=4``; the paper's are hidden 128, 8 heads, 1 transformer layer.
Deliberate deviations:
* Cross-attention to the text states becomes cross-attention to the single conditioning token. With one
  key the softmax is 1, so it is *exactly* ``out_proj(v_proj(LN(cond)))`` broadcast over tokens: it is
  implemented as that (a Linear of the normalised condition), not through an attention call.
* GroupNorm uses ``min(8, hidden)`` groups (diffusers: 32); the 3x3 convolutions run on the token grid.
* The self-attention is :class:`jattn.nn.Attention` (softmax, non-causal), so any jattn method plugs in.

Identities (tested): zero-initialised logits give exactly the mean of the experts at every insertion point;
identical experts give that expert's output under any aggregator weights (a convex combination of equal
features); the weights sum to 1 per token.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jattn.core import checks
from jattn.nn.attention import Attention
from jattn.nn.dit import TinyDiT, modulate
from jattn.nn.models import MLP

__all__ = ["spatial_softmax_aggregate", "SABWAggregator", "AFAEnsemble", "afa_loss", "make_afa_train_step",
           "check_experts"]


def spatial_softmax_aggregate(features, logits):
    """``features [M, *lead, C]`` (``M`` models' features), ``logits [M, *lead]`` -> ``(F [*lead, C],
    A [M, *lead])`` with ``A = softmax(logits, axis=0)`` and ``F = sum_m A_m F_m``. Float32 accumulation;
    ``F`` in ``features``' dtype, ``A`` float32."""
    checks.check_float_array("features", features)
    checks.check_float_array("logits", logits)
    if features.ndim < 2 or tuple(logits.shape) != tuple(features.shape[:-1]):
        raise ValueError(f"logits must be features' shape without the channel axis, {tuple(features.shape[:-1])}, "
                         f"got features {checks.describe(features)} and logits {checks.describe(logits)}")
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=0)
    mixed = jnp.sum(weights[..., None] * features.astype(jnp.float32), axis=0)
    return mixed.astype(features.dtype), weights


class ResBlock(nnx.Module):
    """diffusers' ``ResnetBlock2D`` at toy size on ``[B, h, w, C]``: ``x + conv(silu(gn(conv(silu(gn(x))) +
    Linear(silu(temb)))))``."""

    def __init__(self, channels: int, temb_dim: int, *, rngs: nnx.Rngs):
        groups = min(8, channels) if channels % min(8, channels) == 0 else 1
        self.norm1 = nnx.GroupNorm(channels, num_groups=groups, rngs=rngs)
        self.conv1 = nnx.Conv(channels, channels, (3, 3), padding="SAME", rngs=rngs)
        self.temb = nnx.Linear(temb_dim, channels, rngs=rngs)
        self.norm2 = nnx.GroupNorm(channels, num_groups=groups, rngs=rngs)
        self.conv2 = nnx.Conv(channels, channels, (3, 3), padding="SAME", rngs=rngs)

    def __call__(self, x, temb):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.temb(jax.nn.silu(temb))[:, None, None, :]
        return x + self.conv2(jax.nn.silu(self.norm2(h)))


class SABWAggregator(nnx.Module):
    """One AFA aggregator: ``(features [M, B, N, C], temb [B, temb_dim]) -> (F [B, N, C], A [B, M, N])``
    over an ``hw = (h, w)`` token grid (``N = h w``, row-major). The logits head is zero-initialised, so a
    fresh aggregator returns the mean of the ``M`` features (see the module docstring)."""

    def __init__(self, num_models: int, channels: int, *, hw, temb_dim: int, hidden: int = 32,
                 num_heads: int = 4, rngs: nnx.Rngs):
        self.num_models = checks.check_int("num_models", num_models, 1)
        self.channels = checks.check_int("channels", channels)
        self.hw = checks.check_int_tuple("hw", hw, 2, what="(h, w)")
        temb_dim, hidden = checks.check_int("temb_dim", temb_dim), checks.check_int("hidden", hidden)
        if hidden % checks.check_int("num_heads", num_heads):
            raise ValueError(f"hidden={hidden} must be a multiple of num_heads={num_heads}")
        self.proj_in = nnx.Linear(num_models * channels, hidden, rngs=rngs)
        self.res = ResBlock(hidden, temb_dim, rngs=rngs)
        self.norm_attn = nnx.LayerNorm(hidden, rngs=rngs)
        self.attn = Attention(hidden, num_heads, method="softmax", causal=False, use_bias=True, rngs=rngs)
        self.norm_cond = nnx.LayerNorm(temb_dim, rngs=rngs)
        self.cross = nnx.Linear(temb_dim, hidden, rngs=rngs)     # = out_proj(v_proj(.)) of a 1-token cross-attention
        self.norm_mlp = nnx.LayerNorm(hidden, rngs=rngs)
        self.mlp = MLP(hidden, 4 * hidden, kind="gelu", use_bias=True, rngs=rngs)
        self.logits = nnx.Linear(hidden, num_models, kernel_init=nnx.initializers.zeros,
                                 bias_init=nnx.initializers.zeros, rngs=rngs)

    def weight_logits(self, features, temb):
        """The per-token logits ``[M, B, N]`` (before the softmax over models)."""
        checks.check_float_array("features", features, 4)
        M, B, N, C = features.shape
        if M != self.num_models or C != self.channels or N != self.hw[0] * self.hw[1]:
            raise ValueError(f"features must be [M={self.num_models}, B, N={self.hw[0] * self.hw[1]}, "
                             f"C={self.channels}], got {checks.describe(features)}")
        checks.check_float_array("temb", temb, 2)
        if temb.shape[0] != B:
            raise ValueError(f"temb must be [B={B}, temb_dim], got {checks.describe(temb)}")
        z = self.proj_in(jnp.moveaxis(features, 0, 2).reshape(B, N, M * C))
        z = self.res(z.reshape(B, *self.hw, -1), temb).reshape(B, N, -1)
        z = z + self.attn(self.norm_attn(z))
        z = z + self.cross(self.norm_cond(temb))[:, None, :]
        z = z + self.mlp(self.norm_mlp(z))
        return jnp.moveaxis(self.logits(z), -1, 0)

    def __call__(self, features, temb):
        mixed, weights = spatial_softmax_aggregate(features, self.weight_logits(features, temb))
        return mixed, jnp.moveaxis(weights, 0, 1)


def check_experts(experts) -> tuple:
    """``experts``: a non-empty sequence of :class:`TinyDiT` with identical architecture (as a tuple)."""
    if not isinstance(experts, (list, tuple)) or not experts:
        raise TypeError(f"experts must be a non-empty list of TinyDiT, got {type(experts).__name__}")
    keys = ("image_size", "channels", "patch_size", "dim", "depth", "num_classes", "freq_dim")
    for i, expert in enumerate(experts):
        if not isinstance(expert, TinyDiT):
            raise TypeError(f"experts[{i}] must be a TinyDiT, got {type(expert).__name__}")
        if any(getattr(expert, key) != getattr(experts[0], key) for key in keys):
            mine, first = ([getattr(e, k) for k in keys] for e in (expert, experts[0]))
            raise ValueError(f"experts must share one architecture {keys}; experts[{i}] has {mine}, experts[0] {first}")
    return tuple(experts)


class AFAEnsemble(nnx.Module):
    """The ``depth + 2`` aggregators for ``M`` TinyDiT experts of one architecture. The experts are *not*
    part of this module (they stay frozen): ``ensemble(experts, x_t, t, y) -> eps`` runs them block by block,
    aggregating after the embedding, after each block and on the output (see the module docstring)."""

    def __init__(self, template: TinyDiT, num_models: int, *, hidden: int = 32, num_heads: int = 4,
                 rngs: nnx.Rngs):
        check_experts([template])
        self.num_models = checks.check_int("num_models", num_models, 1)
        self.depth = template.depth
        hw = (template.grid, template.grid)
        out_channels = template.patch_size ** 2 * template.channels
        channels = [template.dim] * (template.depth + 1) + [out_channels]
        self.aggregators = nnx.List([SABWAggregator(num_models, c, hw=hw, temb_dim=template.dim, hidden=hidden,
                                                    num_heads=num_heads, rngs=rngs) for c in channels])

    def __call__(self, experts, x, t, y, *, return_weights: bool = False):
        """``eps [B, S, S, C]`` of the aggregated ensemble; with ``return_weights`` also the list of the
        ``depth + 2`` weight maps ``A [B, M, N]``."""
        experts = check_experts(experts)
        if len(experts) != self.num_models:
            raise ValueError(f"experts must hold num_models={self.num_models} TinyDiTs, got {len(experts)}")
        if experts[0].depth != self.depth:
            raise ValueError(f"experts have depth {experts[0].depth}, the aggregators were built for {self.depth}")
        t, y = experts[0]._check_inputs(x, t, y)
        conds = [e.condition(t, y) for e in experts]
        temb = jnp.mean(jnp.stack(conds), axis=0)
        weights = []

        def aggregate(index, feats):
            mixed, w = self.aggregators[index](jnp.stack(feats), temb)
            weights.append(w)
            return mixed

        h = aggregate(0, [e.patch_embed(e.patchify(x)) + e.pos_embed[...] for e in experts])
        for i in range(self.depth):
            h = aggregate(i + 1, [e.blocks[i](h, c) for e, c in zip(experts, conds)])
        outs = []
        for e, c in zip(experts, conds):
            shift, scale = jnp.split(e.final_adaLN(c), 2, axis=-1)
            outs.append(e.final_linear(modulate(e.final_norm(h), shift, scale)))
        eps = experts[0].unpatchify(aggregate(self.depth + 1, outs))
        return (eps, weights) if return_weights else eps


def afa_loss(ensemble: AFAEnsemble, experts, batch: dict, alpha_bars):
    """The epsilon MSE ``mean((AFA(x_t, t, y) - noise)^2)`` with ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise``
    on a batch ``{"x0", "labels", "t", "noise"}`` (``train.diffusion.DigitDiffusionTask``'s layout)."""
    missing = {"x0", "labels", "t", "noise"} - set(batch)
    if missing:
        raise ValueError(f"batch must hold x0, labels, t, noise; missing {sorted(missing)}")
    ab = jnp.asarray(alpha_bars, jnp.float32)[batch["t"]].reshape(-1, 1, 1, 1)
    x_t = jnp.sqrt(ab) * batch["x0"] + jnp.sqrt(1.0 - ab) * batch["noise"]
    eps = ensemble(experts, x_t, batch["t"], batch["labels"])
    return jnp.mean(jnp.square(eps.astype(jnp.float32) - batch["noise"].astype(jnp.float32)))


def make_afa_train_step(ensemble: AFAEnsemble, experts: Sequence[TinyDiT], optimizer, alpha_bars):
    """The frozen-expert training step. Returns ``(step, params, opt_state, expert_states)`` where
    ``step(params, opt_state, expert_states, batch) -> (params, opt_state, loss)`` is pure (jit it):
    gradients flow only to the aggregators' ``nnx.Param``s (the experts enter under ``stop_gradient`` and are
    returned untouched). Rebuild the trained module with ``nnx.update(ensemble, params)``."""
    experts = check_experts(list(experts))
    agg_def, params, rest = nnx.split(ensemble, nnx.Param, ...)
    expert_defs, expert_states = zip(*(nnx.split(e) for e in experts))

    def loss_of(params, expert_states, batch):
        agg = nnx.merge(agg_def, params, rest)
        frozen = [nnx.merge(d, jax.lax.stop_gradient(s)) for d, s in zip(expert_defs, expert_states)]
        return afa_loss(agg, frozen, batch, alpha_bars)

    def step(params, opt_state, expert_states, batch):
        loss, grads = jax.value_and_grad(loss_of)(params, expert_states, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, params, optimizer.init(params), tuple(expert_states)
