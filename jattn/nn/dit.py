"""``TinyDiT``: a small class-conditional diffusion transformer (DiT, Peebles & Xie 2023) built on
:class:`jattn.nn.Attention`, the trained subject of issue 16's diffusion methods.

The computation (the DiT-S recipe at toy size)::

    tokens  = Linear(patchify(x_t))  + pos                      # [B, N, dim], N = (S / p)^2
    c       = MLP(sinusoid(t)) + Embed(y)                       # y in 0..num_classes (num_classes = "null")
    per block (adaLN-Zero):
        shift1, scale1, gate1, shift2, scale2, gate2 = Linear(silu(c))      # zero-initialised
        x = x + gate1 * Attention(LN(x) * (1 + scale1) + shift1)
        x = x + gate2 * MLP(LN(x) * (1 + scale2) + shift2)
    final:  shift, scale = Linear(silu(c)) (zero-init);  eps = unpatchify(Linear(LN(x) * (1 + scale) + shift))

The LayerNorms carry no affine parameters (the modulation supplies them); the modulation linears and the
final projection start at zero, so at initialisation every block is the identity and the model predicts
``eps = 0``. The label ``num_classes`` is the extra "null" class that classifier-free guidance uses for
the unconditional prediction. Timesteps are the integer (or float) DDPM step ``t`` in ``[0, T)``, embedded
with the usual ``[cos, sin]`` of ``t * 10000^(-i / half)`` (``max_period=10000``).

Defaults: ``image_size=16, channels=1, patch_size=2, dim=64, depth=4, num_heads=4, mlp_ratio=4``, a fixed
2-D sincos position embedding (``pos_embed="learned"`` trains one instead), attention ``method="softmax"``
(any registered :mod:`jattn.nn.methods` name with its ``method_config`` plugs in), non-causal.

Reaching the attention (what the training-free diffusion methods act on):

* ``model.blocks[i].attn`` is the layer's :class:`jattn.nn.Attention`; replacing the attribute with another
  ``Attention`` of the same ``dim`` swaps the method of that layer.
* ``model(x, t, y, return_probs=True)`` also returns the per-layer maps ``[B, H, N, N]`` (a list).
* ``prob_mods={i: fn}``: ``fn(probs [B, H, N, N]) -> probs`` rewrites layer ``i``'s normalised softmax
  probabilities before they weight ``v`` (dense path; SoftPAG's ``(1 - u) A + u I``, redistribution).
* ``attn_fns={i: fn}``: ``fn(q [B, N, H, D], k, v) -> out [B, N, H, D]`` replaces layer ``i``'s attention
  core entirely (the q/k/v and output projections are the layer's own): perturbed attention that never
  forms ``A``, shared-KV or masked-key attention, an attention from another model. Such a layer's map in
  ``return_probs`` is ``None``.
* ``return_features=True`` also returns the hidden state after every block (a list of ``[B, N, dim]``).

Deliberate deviations from DiT: no learned-sigma output channels (epsilon only, fixed DDPM variances), no
dropout in the class embedding itself (the trainer replaces labels by the null class instead), and a
pre-activation ``silu`` on the conditioning vector computed once per call, as in the official code.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.core import checks
from jattn.core.reference import reference_attention
from jattn.nn.attention import Attention, _positive_int
from jattn.nn.models import MLP

POS_EMBEDS = ("sincos", "learned")


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding ``[cos(t f_i), sin(t f_i)]`` of timesteps ``t [B]``, ``f_i = max_period^(-i/half)``,
    ``i < half = dim // 2`` (a zero column is appended when ``dim`` is odd). Returns ``[B, dim]`` float32."""
    dim = _positive_int("dim", dim)
    t = jnp.asarray(t)
    if t.ndim != 1:
        raise ValueError(f"t must be a 1-D array of timesteps [B], got shape {t.shape}")
    half = dim // 2
    freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """The fixed 2-D sincos position embedding of MAE/DiT, ``[grid * grid, dim]`` (``dim`` divisible by 4):
    half the channels encode the row, half the column, each as ``[sin(p w_i), cos(p w_i)]``."""
    dim, grid = _positive_int("dim", dim), _positive_int("grid", grid)
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 for the sincos position embedding, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def one_axis(pos):
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    return np.concatenate([one_axis(rows), one_axis(cols)], axis=1).astype(np.float32)


def modulate(x, shift, scale):
    """``x * (1 + scale) + shift`` with per-sample ``shift, scale [B, dim]`` broadcast over tokens."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def _zero_linear(din, dout, rngs, use_bias=True):
    return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=nnx.initializers.zeros,
                      bias_init=nnx.initializers.zeros, rngs=rngs)


def _check_hooks(name: str, hooks, depth: int) -> dict:
    if hooks is None:
        return {}
    if not isinstance(hooks, Mapping):
        raise TypeError(f"{name} must be a dict {{layer index: callable}}, got {type(hooks).__name__}")
    for key, fn in hooks.items():
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or not 0 <= key < depth:
            raise ValueError(f"{name} keys must be layer indices in [0, {depth}), got {key!r}")
        if not callable(fn):
            raise TypeError(f"{name}[{key}] must be callable, got {type(fn).__name__}")
    return {int(k): v for k, v in hooks.items()}


class DiTBlock(nnx.Module):
    """One adaLN-Zero DiT block: ``x + g1 * attn(mod(LN(x))) ; x + g2 * mlp(mod(LN(x)))`` (see module doc)."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, mlp_ratio: float = 4.0,
                 method: str = "softmax", method_config: dict | None = None):
        self.dim = _positive_int("dim", dim)
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-6, use_scale=False, use_bias=False, rngs=rngs)
        self.attn = Attention(dim, num_heads, method=method, causal=False, use_bias=True, rngs=rngs,
                              **(method_config or {}))
        self.norm2 = nnx.LayerNorm(dim, epsilon=1e-6, use_scale=False, use_bias=False, rngs=rngs)
        self.mlp = MLP(dim, int(round(dim * mlp_ratio)), kind="gelu", use_bias=True, rngs=rngs)
        self.adaLN = _zero_linear(dim, 6 * dim, rngs)

    def attention(self, h, *, return_probs: bool = False, prob_mod: Callable | None = None,
                  attn_fn: Callable | None = None):
        """The attention sublayer on the modulated input ``h [B, N, dim]``, honouring a hook."""
        attn = self.attn
        if prob_mod is None and attn_fn is None:
            return attn(h, return_probs=return_probs)
        q, k, v = attn.project(h, jnp.arange(h.shape[1])[None])
        probs = None
        if attn_fn is not None:
            out = attn_fn(q, k, v)
            if not hasattr(out, "shape") or out.shape != q.shape:
                raise ValueError(f"attn_fn must return out [B, N, H, D] = {q.shape}, got "
                                 f"{getattr(out, 'shape', type(out).__name__)}")
        else:
            if attn.method != "softmax":
                raise ValueError(f"prob_mods need a softmax layer (method='softmax'), layer has {attn.method!r}")
            out, probs = reference_attention(q, k, v, causal=False, scale=attn.scale, prob_mod=prob_mod,
                                             return_probs=True)
        out = attn.finish(h, out)
        return (out, probs) if return_probs else out

    def __call__(self, x, c, *, return_probs: bool = False, prob_mod: Callable | None = None,
                 attn_fn: Callable | None = None):
        """``x [B, N, dim]``, conditioning ``c [B, dim]`` (already through ``silu``) -> ``x`` (, probs)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.adaLN(c), 6, axis=-1)
        result = self.attention(modulate(self.norm1(x), shift1, scale1), return_probs=return_probs,
                                prob_mod=prob_mod, attn_fn=attn_fn)
        out, probs = result if return_probs else (result, None)
        x = x + gate1[:, None, :] * out
        x = x + gate2[:, None, :] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return (x, probs) if return_probs else x


class TinyDiT(nnx.Module):
    """Class-conditional DiT predicting epsilon: ``model(x_t [B, S, S, C], t [B], y [B]) -> eps [B, S, S, C]``.

    ``y`` holds class ids in ``[0, num_classes]``; ``num_classes`` (:attr:`null_class`) is the
    unconditional "null" label. See the module docstring for the hooks (``prob_mods``, ``attn_fns``) and
    what ``return_probs`` / ``return_features`` add to the result.
    """

    def __init__(self, *, rngs: nnx.Rngs, image_size: int = 16, channels: int = 1, patch_size: int = 2,
                 dim: int = 64, depth: int = 4, num_heads: int = 4, num_classes: int = 10,
                 mlp_ratio: float = 4.0, pos_embed: str = "sincos", method: str = "softmax",
                 method_config: dict | None = None, freq_dim: int = 64):
        self.image_size = _positive_int("image_size", image_size)
        self.channels = _positive_int("channels", channels)
        self.patch_size = _positive_int("patch_size", patch_size)
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        self.dim = _positive_int("dim", dim)
        self.depth = _positive_int("depth", depth)
        self.num_classes = _positive_int("num_classes", num_classes)
        self.freq_dim = _positive_int("freq_dim", freq_dim)
        if not isinstance(mlp_ratio, (int, float)) or isinstance(mlp_ratio, bool) or mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be a float > 0, got {mlp_ratio!r}")
        checks.check_choice("pos_embed", pos_embed, POS_EMBEDS)
        if method_config is not None and not isinstance(method_config, dict):
            raise TypeError(f"method_config must be a dict or None, got {type(method_config).__name__}")
        self.grid = image_size // patch_size
        num_patches = self.grid ** 2
        patch_dim = patch_size * patch_size * channels
        self.patch_embed = nnx.Linear(patch_dim, dim, rngs=rngs)
        if pos_embed == "sincos":
            self.pos_embed = nnx.Variable(jnp.asarray(sincos_pos_embed_2d(dim, self.grid))[None])
        else:
            self.pos_embed = nnx.Param(jax.random.normal(rngs.params(), (1, num_patches, dim)) * 0.02)
        self.t_mlp1 = nnx.Linear(freq_dim, dim, rngs=rngs,
                                 kernel_init=nnx.initializers.normal(0.02))
        self.t_mlp2 = nnx.Linear(dim, dim, rngs=rngs, kernel_init=nnx.initializers.normal(0.02))
        self.y_embed = nnx.Embed(num_classes + 1, dim, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.blocks = nnx.List([DiTBlock(dim, num_heads, rngs=rngs, mlp_ratio=mlp_ratio, method=method,
                                         method_config=method_config) for _ in range(depth)])
        self.final_norm = nnx.LayerNorm(dim, epsilon=1e-6, use_scale=False, use_bias=False, rngs=rngs)
        self.final_adaLN = _zero_linear(dim, 2 * dim, rngs)
        self.final_linear = _zero_linear(dim, patch_dim, rngs)

    @property
    def null_class(self) -> int:
        """The label of the unconditional ("null") class: ``num_classes``."""
        return self.num_classes

    def patchify(self, images):
        B, S, _, C = images.shape
        p, g = self.patch_size, self.grid
        x = images.reshape(B, g, p, g, p, C).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(B, g * g, p * p * C)

    def unpatchify(self, tokens):
        B = tokens.shape[0]
        p, g, C = self.patch_size, self.grid, self.channels
        x = tokens.reshape(B, g, g, p, p, C).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(B, g * p, g * p, C)

    def condition(self, t, y):
        """The conditioning vector ``silu(MLP(sinusoid(t)) + Embed(y)) [B, dim]`` every block reads."""
        temb = self.t_mlp2(jax.nn.silu(self.t_mlp1(timestep_embedding(t, self.freq_dim))))
        return jax.nn.silu(temb + self.y_embed(y))

    def _check_inputs(self, x, t, y):
        checks.check_float_array("x", x, 4)
        want = (self.image_size, self.image_size, self.channels)
        if tuple(x.shape[1:]) != want:
            raise ValueError(f"x must be [B, {want[0]}, {want[1]}, {want[2]}], got shape {x.shape}")
        B = x.shape[0]
        t, y = jnp.asarray(t), jnp.asarray(y)
        if t.shape != (B,):
            raise ValueError(f"t must be [B={B}] timesteps, got shape {t.shape}")
        if y.shape != (B,) or not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"y must be an int array [B={B}] of labels, got {checks.describe(y)}")
        if not checks.is_traced(y) and y.size and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(f"y must hold labels in [0, {self.num_classes}] ({self.num_classes} = null class), "
                             f"got values in [{int(y.min())}, {int(y.max())}]")
        return t, y

    def __call__(self, x, t, y, *, return_probs: bool = False, return_features: bool = False,
                 prob_mods: Mapping[int, Callable] | None = None, attn_fns: Mapping[int, Callable] | None = None):
        """``eps [B, S, S, C]``; with ``return_probs`` / ``return_features`` a tuple
        ``(eps, maps?, features?)`` in that order (maps: per-layer ``[B, H, N, N]``, features: per-block
        ``[B, N, dim]``)."""
        t, y = self._check_inputs(x, t, y)
        prob_mods = _check_hooks("prob_mods", prob_mods, self.depth)
        attn_fns = _check_hooks("attn_fns", attn_fns, self.depth)
        both = set(prob_mods) & set(attn_fns)
        if both:
            raise ValueError(f"prob_mods and attn_fns both name layers {sorted(both)}: give one hook per layer")
        c = self.condition(t, y)
        h = self.patch_embed(self.patchify(x)) + self.pos_embed[...]
        maps, features = [], []
        for index, block in enumerate(self.blocks):
            result = block(h, c, return_probs=return_probs, prob_mod=prob_mods.get(index),
                           attn_fn=attn_fns.get(index))
            h, probs = result if return_probs else (result, None)
            maps.append(probs)
            features.append(h)
        shift, scale = jnp.split(self.final_adaLN(c), 2, axis=-1)
        eps = self.unpatchify(self.final_linear(modulate(self.final_norm(h), shift, scale)))
        if not (return_probs or return_features):
            return eps
        return (eps,) + ((maps,) if return_probs else ()) + ((features,) if return_features else ())
