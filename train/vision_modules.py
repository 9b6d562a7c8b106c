"""Issue 18's training table: every vision module in one small backbone, on real digits, at equal parameters.

Data: ``train.images.digits(16)`` (sklearn's 1,797 real 8x8 digits upsampled to 16x16, fixed stratified split,
1,437 train / 360 test). Task: 10-way classification, metric top-1 on the test split.

Two shared backbones (channels-last ``[B, H, W, C]``):

* ``cnn`` (gating modules P00 DAAM, P01 GAAM, P06 ULSAM, P10 SDANet, P12 ELA, P42 PSA, the SE baseline, and the
  P47 FDConv conv layer)::

      conv3x3(1 -> w) BN relu | conv3x3(w -> w) BN relu, MODULE | avgpool2 | conv3x3(w -> 2w) BN relu, MODULE
      | avgpool2 | global mean | linear(2w -> hidden) relu | linear(hidden -> 10)

  ``BN`` is the config's ``norm``: ``"batch"`` (default; ``nnx.BatchNorm``, momentum 0.9, batch statistics in
  training, running statistics in eval), ``"group"`` (``nnx.GroupNorm``, 4 groups) or ``"none"`` (the table's
  first version, which trained too slowly to compare modules: 59% top-1 for the plain CNN at 150 steps, seed 0,
  vs 92% with BatchNorm; see docs/vision.md "Diagnosis").

  ``MODULE`` is the module under test (identity for ``plain``), inserted after each of the two stages. P10
  ``sdanet`` is ``DenseAttentionModule`` (a self-built 3-level pyramid through the selective dense attention
  neck, ``x + R``). P47 ``fdconv`` is a conv layer, not a MODULE: it replaces the two stage convs
  (``conv3x3(w -> w)`` and ``conv3x3(w -> 2w)``; the 1-channel stem stays plain) and MODULE is the identity;
  ``min_channels=0`` switches off the official code's "plain conv when min(Cin, Cout) <= 16" rule.
* ``tokens`` (complete models P18 VAN, P52 DaViT, P61 BiFormer, P73 NiNformer, P29 Agent Attention, and a plain
  ViT)::

      patch conv (2x2 stride 2: 16x16 -> 8x8 grid of ``dim``) + learned position | ``depth`` BLOCKs
      | LayerNorm | mean over tokens | linear(dim -> 10)

  ``BLOCK`` is ``vit`` (pre-norm MHA through ``jattn.attention`` + MLP), ``agent`` (pre-norm
  ``AgentAttention`` + MLP), ``van`` (BatchNorm-free VAN block: pre-norm ``VANAttention`` + MLP), ``davit``
  (``DualAttentionBlock``: a spatial-window block then a channel-group block; ``depth`` counts dual blocks),
  ``biformer`` (``BiFormerBlock``, 4x4 regions of 2x2 tokens, top-k regions) or ``ninformer`` (``NiNBlock``).

Parameter matching (``match_params``): every row of one backbone is brought to the same ``target_params``
(within 5%) by one fine-grained knob that the module does not touch -- the hidden width of the classifier head
MLP for ``cnn``, the MLP hidden width of every block for ``tokens``. The plain and SE baselines are thus
parameter-matched controls of each module row. ``count_params`` counts ``nnx.Param`` leaves only (BatchNorm
running statistics are state, not parameters).

SE baseline (Hu et al.): ``x * sigmoid(W2 relu(W1 mean_HW(x) + b1) + b2)`` with reduction ``r = 4``.

Training: AdamW (lr 3e-3, cosine to 0.1x, weight decay 1e-4), batch 64, ``steps`` steps, no augmentation; batches
drawn by ``train.data.batch_rng(seed, step)``; parameters initialised from ``seed``. FLOPs: the compiled cost
analysis of the forward pass on one image (``jax.jit(f).lower(...).compile().cost_analysis()['flops']``);
ms/step: median wall time of a jitted training step after warm-up (on a shared CPU: a rough figure).

Maps (``gate_map``): the module's own map on one test image at stage 1 -- SE: gated-feature mean (channel gate
applied); DAAM/GAAM: the gate averaged over channels; ULSAM: the subspace maps averaged over groups; ELA:
``mean_C(y_h y_w^T)``; PSA: the spatial gate ``A_sp``; SDANet: the spatial gate ``g`` of the fused map;
FDConv: conv1's FBM band gates ``2 sigmoid(conv3x3)`` averaged over bands; VAN: the LKA gate averaged over
channels; Agent: the agent-broadcast attention averaged over heads and agents (query-token mass); other token
models: input-gradient saliency ``|d logit_y / d x|`` (labelled as such; not a module map).

Run: ``python -m train.vision_modules --config configs/vision_ela.py`` (one row, its seeds) or ``--all`` (every
``configs/vision_*.py``), ``--out DIR`` for JSON results and PNGs.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jattn
from jattn.methods.linear.agent import AgentAttention, agent_attention, pool_agents
from jattn.methods.linear.lka import VANAttention, lka_gate
from jattn.methods.linear.ninformer import NiNBlock
from jattn.methods.sparse.biformer import BiFormerBlock
from jattn.methods.sparse.davit import DualAttentionBlock
from jattn.methods.vision.ela import ELA
from jattn.methods.vision.fdconv import FDConv
from jattn.methods.vision.gaussian_adaptive import DensityBlock, MultiHeadDensityGate
from jattn.methods.vision.psa import PolarizedSelfAttention
from jattn.methods.vision.sdanet import DenseAttentionModule
from jattn.methods.vision.ulsam import ULSAM
from train.config import fill_defaults, read_config
from train.data import batch_rng
from train.images import digits

# P47 rows: the code's FDConv, and FDConv with its two departures for Adam (dft_scale="unit",
# filter_gate_init="one"; jattn.methods.vision.fdconv.dft_parameter_scale says why).
FDCONV_MODULES = {"fdconv": {}, "fdconv_adam": {"dft_scale": "unit", "filter_gate_init": "one"}}
CNN_MODULES = ("plain", "se", "daam", "gaam", "ulsam", "ela", "psa_parallel", "psa_sequential", "sdanet",
               "fdconv", "fdconv_adam")
TOKEN_BLOCKS = ("vit", "agent", "van", "davit", "biformer", "ninformer")
BACKBONES = ("cnn", "tokens")
CNN_NORMS = ("batch", "group", "none")
CONFIG_KEYS = ("name", "backbone", "module", "width", "hidden", "target_params", "depth", "heads", "patch",
               "steps", "batch_size", "lr", "seeds", "size", "norm", "fdconv_options")
DEFAULTS = {"width": 16, "hidden": 32, "target_params": None, "depth": 2, "heads": 2, "patch": 2, "steps": 300,
            "batch_size": 64, "lr": 3e-3, "seeds": (0, 1, 2), "size": 16, "norm": "batch", "fdconv_options": None}
PAPERS = {"plain": "-", "se": "SE (baseline)", "daam": "P00", "gaam": "P01", "ulsam": "P06", "ela": "P12",
          "psa_parallel": "P42", "psa_sequential": "P42", "vit": "-", "agent": "P29", "van": "P18", "davit": "P52",
          "biformer": "P61", "ninformer": "P73", "sdanet": "P10", "fdconv": "P47", "fdconv_adam": "P47"}


def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------- SE baseline
def se_gate(x, w1, b1, w2, b2):
    """Squeeze-excitation gate ``sigmoid(W2 relu(W1 mean_HW(x) + b1) + b2)`` -> ``[B, 1, 1, C]``."""
    if x.ndim != 4:
        raise ValueError(f"x must be [B, H, W, C] (channels-last), got shape {x.shape}")
    if w1.shape[0] != x.shape[-1]:
        raise ValueError(f"w1 must be [C={x.shape[-1]}, C/r], got shape {w1.shape}")
    s = jnp.mean(x, axis=(1, 2))
    return jax.nn.sigmoid(jax.nn.relu(s @ w1 + b1) @ w2 + b2)[:, None, None, :]


def squeeze_excite(x, w1, b1, w2, b2):
    """``x * se_gate(x, ...)``."""
    return x * se_gate(x, w1, b1, w2, b2)


class SqueezeExcite(nnx.Module):
    """SE block on ``[B, H, W, C]``, reduction ``r`` (hidden ``max(1, C // r)``)."""

    def __init__(self, channels: int, reduction: int = 4, *, rngs: nnx.Rngs):
        channels, reduction = _check_int("channels", channels), _check_int("reduction", reduction)
        hidden = max(1, channels // reduction)
        init = nnx.initializers.lecun_normal()
        self.w1 = nnx.Param(init(rngs.params(), (channels, hidden), jnp.float32))
        self.b1 = nnx.Param(jnp.zeros((hidden,), jnp.float32))
        self.w2 = nnx.Param(init(rngs.params(), (hidden, channels), jnp.float32))
        self.b2 = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def gate(self, x):
        return se_gate(x, self.w1[...], self.b1[...], self.w2[...], self.b2[...])

    def __call__(self, x):
        return x * self.gate(x)


class _Identity(nnx.Module):
    def __call__(self, x):
        return x


def make_norm(norm: str, channels: int, *, rngs: nnx.Rngs):
    """The cnn backbone's normalisation after each conv: ``"batch"``, ``"group"`` (4 groups) or ``"none"``."""
    if norm not in CNN_NORMS:
        raise ValueError(f"norm must be one of {CNN_NORMS}, got {norm!r}")
    if norm == "batch":
        return nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, rngs=rngs)
    if norm == "group":
        return nnx.GroupNorm(channels, num_groups=math.gcd(4, channels), epsilon=1e-5, rngs=rngs)
    return _Identity()


def make_module(name: str, channels: int, *, rngs: nnx.Rngs):
    """The gating module ``name`` (one of ``CNN_MODULES``) for ``channels`` channels."""
    if name not in CNN_MODULES:
        raise ValueError(f"module must be one of {CNN_MODULES} for backbone 'cnn', got {name!r}")
    if name == "plain" or name in FDCONV_MODULES:   # FDConv replaces the stage convs instead (GatedCNN)
        return _Identity()
    if name == "se":
        return SqueezeExcite(channels, rngs=rngs)
    if name == "daam":      # P00: product of Gaussians, c ~ randn; residual as in GaussianBlock
        return DensityBlock(4, 4, axis=-1, mode="product", c_init="randn", rngs=rngs)
    if name == "gaam":      # P01 MHGAAM: mixture, c = 2
        return DensityBlock(4, 4, axis=-1, mode="mixture", c_init=2.0, rngs=rngs)
    if name == "ulsam":
        return ULSAM(channels, 4, rngs=rngs)
    if name == "ela":
        return ELA(channels, kernel=7, conv_groups=None, gn_groups=min(16, channels), rngs=rngs)
    if name == "sdanet":    # P10: levels avgpool_s(x), s = 1, 2, 4; x + nonlocal(spatial(channel-select))
        return DenseAttentionModule(channels, scales=(1, 2, 4), kernel=7, rngs=rngs)
    layout = name.split("_")[1]
    return PolarizedSelfAttention(channels, layout=layout, variant="paper", rngs=rngs)


class GatedCNN(nnx.Module):
    """The shared small CNN (module docstring) with ``module`` after each stage: ``[B, S, S, 1] -> [B, 10]``.

    ``norm`` (``"batch"`` default, ``"group"``, ``"none"``) follows each of the three convs, before the relu.
    ``fdconv_options``: FDConv arguments over the row's own (``FDCONV_MODULES[module]``), for an FDConv module.
    """

    def __init__(self, module: str = "plain", *, width: int = 16, hidden: int = 32, image_size: int = 16,
                 num_classes: int = 10, norm: str = "batch", fdconv_options: dict | None = None, rngs: nnx.Rngs):
        width, hidden = _check_int("width", width, 2), _check_int("hidden", hidden)
        image_size = _check_int("image_size", image_size, 4)
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        if norm not in CNN_NORMS:
            raise ValueError(f"norm must be one of {CNN_NORMS}, got {norm!r}")
        self.image_size, self.module_name, self.norm = image_size, module, norm
        self.stem = nnx.Conv(1, width, (3, 3), rngs=rngs)
        self.norm0 = make_norm(norm, width, rngs=rngs)
        if module in FDCONV_MODULES:
            options = {**FDCONV_MODULES[module], **(fdconv_options or {})}
            conv = lambda cin, cout: FDConv(cin, cout, 3, min_channels=0, rngs=rngs, **options)  # noqa: E731
        else:
            conv = lambda cin, cout: nnx.Conv(cin, cout, (3, 3), rngs=rngs)  # noqa: E731
        self.conv1 = conv(width, width)
        self.norm1 = make_norm(norm, width, rngs=rngs)
        self.mod1 = make_module(module, width, rngs=rngs)
        self.conv2 = conv(width, 2 * width)
        self.norm2 = make_norm(norm, 2 * width, rngs=rngs)
        self.mod2 = make_module(module, 2 * width, rngs=rngs)
        self.fc = nnx.Linear(2 * width, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def stage1(self, images):
        """Stage-1 features before the first module ``[B, S, S, w]``."""
        if not hasattr(images, "shape") or images.ndim != 4 or tuple(images.shape[1:]) != (
                self.image_size, self.image_size, 1):
            raise ValueError(f"images must be [B, {self.image_size}, {self.image_size}, 1], got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        return jax.nn.relu(self.norm1(self.conv1(self.stem_out(images))))

    def stem_out(self, images):
        """``relu(norm0(stem(images)))`` ``[B, S, S, w]`` (no shape check: called after ``stage1``'s)."""
        return jax.nn.relu(self.norm0(self.stem(images)))

    def __call__(self, images):
        x = nnx.avg_pool(self.mod1(self.stage1(images)), (2, 2), strides=(2, 2))
        x = nnx.avg_pool(self.mod2(jax.nn.relu(self.norm2(self.conv2(x)))), (2, 2), strides=(2, 2))
        return self.head(jax.nn.relu(self.fc(jnp.mean(x, axis=(1, 2)))))


# ------------------------------------------------------------------------------------------- token backbone
class _MLP(nnx.Module):
    def __init__(self, dim, hidden, *, rngs):
        self.fc1, self.fc2 = nnx.Linear(dim, hidden, rngs=rngs), nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class MHA(nnx.Module):
    """Plain multi-head self-attention on ``[B, N, dim]`` through ``jattn.attention``."""

    def __init__(self, dim, heads, *, rngs):
        self.heads = heads
        self.qkv, self.proj = nnx.Linear(dim, 3 * dim, rngs=rngs), nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        B, N, dim = x.shape
        q, k, v = (t.reshape(B, N, self.heads, dim // self.heads) for t in jnp.split(self.qkv(x), 3, axis=-1))
        return self.proj(jattn.attention(q, k, v).reshape(B, N, dim))


class TokenBlock(nnx.Module):
    """Pre-norm ``x + mixer(LN x)``, ``x + MLP(LN x)`` on the grid ``[B, h, w, dim]``; mixer by ``kind``."""

    def __init__(self, kind, dim, heads, mlp_hidden, grid, *, rngs):
        self.kind, self.grid = kind, grid
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
        if kind == "vit":
            self.mixer = MHA(dim, heads, rngs=rngs)
        elif kind == "agent":
            self.mixer = AgentAttention(dim, heads, agent_num=16, window=grid, rngs=rngs)
        elif kind == "van":
            self.mixer = VANAttention(dim, rngs=rngs)
        self.mlp = _MLP(dim, mlp_hidden, rngs=rngs)

    def __call__(self, x):
        B, h, w, dim = x.shape
        y = self.norm1(x)
        if self.kind == "van":
            x = x + self.mixer(y) - y       # VANAttention already adds its input (y): keep one residual on x
        else:
            x = x + self.mixer(y.reshape(B, h * w, dim)).reshape(x.shape)
        return x + self.mlp(self.norm2(x))


class TokenNet(nnx.Module):
    """Patch embedding + ``depth`` blocks of ``kind`` + LN + mean pool + linear head: ``[B, S, S, 1] -> [B, 10]``."""

    def __init__(self, kind: str = "vit", *, dim: int = 32, depth: int = 2, heads: int = 2, mlp_hidden: int = 64,
                 patch: int = 2, image_size: int = 16, num_classes: int = 10, rngs: nnx.Rngs):
        if kind not in TOKEN_BLOCKS:
            raise ValueError(f"module must be one of {TOKEN_BLOCKS} for backbone 'tokens', got {kind!r}")
        dim, depth, heads = _check_int("width", dim, 2), _check_int("depth", depth), _check_int("heads", heads)
        mlp_hidden, patch = _check_int("hidden", mlp_hidden), _check_int("patch", patch)
        if image_size % patch:
            raise ValueError(f"patch must divide image_size={image_size}, got {patch}")
        if dim % heads:
            raise ValueError(f"heads={heads} must divide width={dim}")
        g = image_size // patch
        self.kind, self.grid, self.image_size = kind, (g, g), image_size
        self.embed = nnx.Conv(1, dim, (patch, patch), strides=(patch, patch), padding="VALID", rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, g, g, dim), jnp.float32))
        if kind == "davit":
            blocks = [DualAttentionBlock(dim, heads, window=4, mlp_ratio=mlp_hidden / dim, rngs=rngs)
                      for _ in range(depth)]
        elif kind == "biformer":
            blocks = [BiFormerBlock(dim, heads, n_win=4, topk=4, mlp_ratio=mlp_hidden / dim, side_dwconv=3,
                                    rngs=rngs) for _ in range(depth)]
        elif kind == "ninformer":
            blocks = [NiNBlock(g * g, dim, mlp_hidden, dropout=0.0, rngs=rngs) for _ in range(depth)]
        else:
            blocks = [TokenBlock(kind, dim, heads, mlp_hidden, (g, g), rngs=rngs) for _ in range(depth)]
        self.blocks = nnx.List(blocks)
        self.norm = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def tokens(self, images):
        if not hasattr(images, "shape") or images.ndim != 4 or tuple(images.shape[1:]) != (
                self.image_size, self.image_size, 1):
            raise ValueError(f"images must be [B, {self.image_size}, {self.image_size}, 1], got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        return self.embed(images) + self.pos[...]

    def __call__(self, images):
        x = self.tokens(images)
        B, h, w, dim = x.shape
        for block in self.blocks:
            if self.kind == "ninformer":
                x = block(x.reshape(B, h * w, dim)).reshape(B, h, w, dim)
            else:
                x = block(x)
        return self.head(jnp.mean(self.norm(x), axis=(1, 2)))


# --------------------------------------------------------------------------------------------- configs
def check_config(config: dict) -> dict:
    """Validated config with defaults filled; unknown keys or bad values raise ``ValueError`` naming the key."""
    cfg = fill_defaults(config, DEFAULTS, CONFIG_KEYS)
    for key in ("backbone", "module"):
        if key not in config:
            raise ValueError(f"config key {key!r} is required")
    if cfg["backbone"] not in BACKBONES:
        raise ValueError(f"config key 'backbone' must be one of {BACKBONES}, got {cfg['backbone']!r}")
    allowed = CNN_MODULES if cfg["backbone"] == "cnn" else TOKEN_BLOCKS
    if cfg["module"] not in allowed:
        raise ValueError(f"config key 'module' must be one of {allowed} for backbone {cfg['backbone']!r}, "
                         f"got {cfg['module']!r}")
    for key in ("width", "hidden", "depth", "heads", "patch", "steps", "batch_size", "size"):
        _check_int(f"config key {key!r}", cfg[key])
    if cfg["target_params"] is not None:
        _check_int("config key 'target_params'", cfg["target_params"])
    if cfg["norm"] not in CNN_NORMS:
        raise ValueError(f"config key 'norm' must be one of {CNN_NORMS}, got {cfg['norm']!r}")
    if cfg["fdconv_options"] is not None and (cfg["module"] not in FDCONV_MODULES
                                              or not isinstance(cfg["fdconv_options"], dict)):
        raise ValueError(f"config key 'fdconv_options' must be a dict of FDConv arguments for a module in "
                         f"{tuple(FDCONV_MODULES)}, got {cfg['fdconv_options']!r} for module {cfg['module']!r}")
    if not isinstance(cfg["lr"], (int, float)) or isinstance(cfg["lr"], bool) or cfg["lr"] <= 0:
        raise ValueError(f"config key 'lr' must be a float > 0, got {cfg['lr']!r}")
    seeds = cfg["seeds"]
    if isinstance(seeds, str):
        seeds = tuple(int(s) for s in seeds.split(","))
    if not isinstance(seeds, (tuple, list)) or not seeds:
        raise ValueError(f"config key 'seeds' must be a non-empty tuple of ints, got {cfg['seeds']!r}")
    cfg["seeds"] = tuple(_check_int("config key 'seeds'", s, 0) for s in seeds)
    cfg.setdefault("name", f"vision_{cfg['module']}")
    return cfg


def build_model(cfg: dict, hidden: int | None = None, seed: int = 0):
    """The model of a (checked) config with the matching knob ``hidden`` (defaults to ``cfg['hidden']``)."""
    hidden = cfg["hidden"] if hidden is None else hidden
    rngs = nnx.Rngs(seed)
    if cfg["backbone"] == "cnn":
        return GatedCNN(cfg["module"], width=cfg["width"], hidden=hidden, image_size=cfg["size"], norm=cfg["norm"],
                        fdconv_options=cfg["fdconv_options"], rngs=rngs)
    return TokenNet(cfg["module"], dim=cfg["width"], depth=cfg["depth"], heads=cfg["heads"], mlp_hidden=hidden,
                    patch=cfg["patch"], image_size=cfg["size"], rngs=rngs)


def count_params(model) -> int:
    """Number of scalars in the model's ``nnx.Param`` leaves."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _abstract_count(cfg, hidden):
    return count_params(nnx.eval_shape(lambda: build_model(cfg, hidden)))


def match_params(cfg: dict, target: int | None = None, tolerance: float = 0.05) -> tuple[int, int]:
    """``(hidden, params)``: the knob value whose parameter count is closest to ``target`` (default
    ``cfg['target_params']``); raises ``ValueError`` if no value lands within ``tolerance`` (relative)."""
    cfg = check_config(cfg)
    target = cfg["target_params"] if target is None else _check_int("target", target)
    if target is None:
        return cfg["hidden"], _abstract_count(cfg, cfg["hidden"])
    p1, p2 = _abstract_count(cfg, 1), _abstract_count(cfg, 2)
    slope = p2 - p1                          # parameters are affine in the knob
    best = max(1, int(round(1 + (target - p1) / slope)))
    params = _abstract_count(cfg, best)
    if abs(params - target) > tolerance * target:
        raise ValueError(f"cannot match target_params={target} within {tolerance:.0%} for module "
                         f"{cfg['module']!r}: the nearest knob value hidden={best} gives {params}")
    return best, params


# ------------------------------------------------------------------------------------------------ training
def _split(model):
    return nnx.split(model, nnx.Param, ...)


def train_one(cfg: dict, seed: int, *, steps: int | None = None, log_every: int = 0, hidden: int | None = None):
    """Trains one model; returns ``(model, result dict)`` with loss curve ends, test top-1 and ms/step."""
    steps = cfg["steps"] if steps is None else steps
    data = digits(cfg["size"])
    model = build_model(cfg, hidden, seed)
    model.train()
    graphdef, params, rest = _split(model)
    opt = optax.adamw(optax.cosine_decay_schedule(cfg["lr"], steps, alpha=0.1), weight_decay=1e-4)
    opt_state = opt.init(params)

    def loss_fn(params, rest, x, y):
        m = nnx.merge(graphdef, params, rest, copy=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        return loss, _split(m)[2]

    @jax.jit
    def step(params, rest, opt_state, x, y):
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    losses, times = [], []
    for i in range(steps):
        idx = batch_rng(seed, i, stream=18).integers(0, len(data.train_labels), cfg["batch_size"])
        t0 = time.perf_counter()
        params, rest, opt_state, loss = step(params, rest, opt_state, data.train_images[idx], data.train_labels[idx])
        loss = float(loss)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        if log_every and i % log_every == 0:
            print(f"  step {i} loss {loss:.4f}", flush=True)
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    acc = float(np.mean(predict(model, data.test_images) == data.test_labels))
    ms = 1e3 * float(np.median(times[min(5, len(times) - 1):]))
    return model, {"seed": seed, "first_loss": losses[0], "final_loss": float(np.mean(losses[-10:])),
                   "test_top1": acc, "ms_per_step": ms}


def predict(model, images, batch_size: int = 512) -> np.ndarray:
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x: jnp.argmax(nnx.merge(graphdef, s)(x), axis=-1))
    return np.concatenate([np.asarray(fn(state, images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


def forward_flops(model, size: int = 16) -> float:
    """FLOPs of the forward pass on one image from XLA's compiled cost analysis."""
    return compiled_flops(model, jnp.zeros((1, size, size, 1), jnp.float32))


def compiled_flops(model, x, select=None) -> float:
    """FLOPs of ``model(x)`` from XLA's compiled cost analysis
    (``jax.jit(f).lower(state, x).compile().cost_analysis()['flops']``), for any model and input (the
    segmentation, counting and DCAL tables use it with ``x`` one image). ``select(out)`` picks the outputs to
    count (e.g. the density map of a dict output): XLA drops what no output needs, so only their cost is counted.
    Put the model in eval mode first if it has BatchNorm or dropout."""
    graphdef, state = nnx.split(model)
    pick = (lambda out: out) if select is None else select
    cost = jax.jit(lambda s, x: pick(nnx.merge(graphdef, s)(x))).lower(state, x).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


# ---------------------------------------------------------------------------------------------------- maps
def gate_map(model, image) -> tuple[np.ndarray, str]:
    """``(map [h, w], label)``: the module's own map on one image ``[S, S, 1]`` (see module docstring)."""
    x = jnp.asarray(image, jnp.float32)[None]
    if isinstance(model, GatedCNN):
        f = model.stage1(x)
        mod, name = model.mod1, model.module_name
        if name == "plain":
            return np.asarray(f.mean(-1)[0]), "stage-1 features (no module)"
        if name == "sdanet":
            return np.asarray(mod.gates(f)[1][0, ..., 0]), "SDANet: spatial gate of the fused map"
        if name in FDCONV_MODULES:
            h = model.stem_out(x)
            return (np.asarray(model.conv1.fbm_gates(h).mean(0)[0, ..., 0]),
                    "FDConv (conv1): FBM band gates 2sig(conv), mean over bands")
        if name == "se":
            return np.asarray((f * mod.gate(f)).mean(-1)[0]), "SE: channel-gated features, mean over C"
        if name in ("daam", "gaam"):
            return np.asarray(mod.gate.gate(f).mean(-1)[0]), f"{name.upper()}: Gaussian gate, mean over C"
        if name == "ulsam":
            return np.asarray(mod.maps(f).mean(-1)[0]), "ULSAM: subspace maps A, mean over groups"
        if name == "ela":
            yh, yw = mod.gates(f)
            return np.asarray((yh[:, :, None, :] * yw[:, None, :, :]).mean(-1)[0]), "ELA: y_h * y_w, mean over C"
        return np.asarray(mod.gates(f)[1][0, ..., 0]), "PSA: spatial gate A_sp"
    tokens = model.tokens(x)
    block = model.blocks[0]
    if model.kind == "van":
        y = jax.nn.gelu(block.mixer.proj1(block.norm1(tokens)), approximate=False)
        return np.asarray(lka_gate(y, block.mixer.lka.params()).mean(-1)[0]), "VAN: LKA gate, mean over C"
    if model.kind == "agent":
        att = block.mixer
        B, h, w, dim = tokens.shape
        y = block.norm1(tokens).reshape(B, h * w, dim)
        q, k, v = (t.reshape(B, h * w, att.num_heads, dim // att.num_heads)
                   for t in jnp.split(att.qkv(y), 3, axis=-1))
        agents = pool_agents(q, att.hw, att.agent_num)
        b1, b2 = att.biases()
        out = agent_attention(q, k, v, agents, bias_ak=b1, bias_qa=b2, return_probs=True)
        p_ak = out[1][1]                                  # agent aggregation P1 [B, H, n, N]
        return np.asarray(p_ak.mean(axis=(1, 2))[0].reshape(h, w)), "Agent: aggregation attention mass per token"
    label = int(np.argmax(np.asarray(model(x))[0]))
    grad = jax.grad(lambda z: model(z)[0, label])(x)
    return np.asarray(jnp.abs(grad)[0, ..., 0]), f"{model.kind}: input-gradient saliency (not a module map)"


def save_map_png(image, amap, label, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(5, 2.6))
    ax[0].imshow(np.asarray(image)[..., 0], cmap="gray")
    ax[0].set_title("test image")
    im = ax[1].imshow(amap, cmap="magma")
    ax[1].set_title(label, fontsize=7)
    fig.colorbar(im, ax=ax[1], fraction=0.046)
    for a in ax:
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_panels_png(panels, path, *, title: str | None = None, cols: int | None = None, panel_size: float = 2.1):
    """One PNG of several labelled panels (the segmentation, counting and DCAL maps use it).

    ``panels``: a list of dicts, one per panel, with ``"title"`` and one of ``"image"`` (``[H, W]`` or
    ``[H, W, 3]`` in [0, 1], shown as is), ``"map"`` (``[h, w]``, colour-mapped with a colour bar; optional
    ``"vmin"``, ``"vmax"``, ``"cmap"``; optional ``"under"`` ``[H, W(, 3)]`` drawn beneath it at half opacity,
    stretched to the map's extent; optional ``"outline"``: a boolean ``[H, W]`` mask whose boundary is drawn in cyan
    over the map, stretched to its extent; optional ``"marks"``: ``[(row, col), ...]`` cells boxed in green) or
    ``"bars"`` (a 1-d vector drawn as a bar chart, optional ``"ylim"``, ``"labels"``). ``None`` leaves a cell empty."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    n = len(panels)
    cols = min(n, 4) if cols is None else cols
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel_size * cols, panel_size * rows * 1.05), squeeze=False)
    for ax, panel in zip(axes.flat, list(panels) + [None] * (rows * cols - n)):
        if panel is None:
            ax.axis("off")
            continue
        ax.set_title(panel.get("title", ""), fontsize=7)
        if "bars" in panel:
            values = np.asarray(panel["bars"], np.float64).ravel()
            ax.bar(np.arange(len(values)), values, width=0.85, color="tab:purple")
            if "labels" in panel:
                ax.set_xticks(np.arange(len(values)), panel["labels"])
            if "ylim" in panel:
                ax.set_ylim(*panel["ylim"])
            ax.tick_params(labelsize=6)
            continue
        if "image" in panel:
            img = np.clip(np.asarray(panel["image"], np.float64), 0, 1)
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
        else:
            amap = np.asarray(panel["map"], np.float64)
            h, w = amap.shape
            if panel.get("under") is not None:
                under = np.clip(np.asarray(panel["under"], np.float64), 0, 1)
                ax.imshow(under, cmap="gray" if under.ndim == 2 else None, extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                          interpolation="nearest")
            cmap = panel.get("cmap", "magma")
            if isinstance(cmap, (list, tuple)):
                cmap = ListedColormap(list(cmap))
            im = ax.imshow(amap, cmap=cmap, vmin=panel.get("vmin"), vmax=panel.get("vmax"), interpolation="nearest",
                           alpha=0.7 if panel.get("under") is not None else 1.0, aspect=panel.get("aspect", "equal"))
            if panel.get("outline") is not None:        # object outlines: a boolean mask, stretched to the map
                mask = np.asarray(panel["outline"], np.float64)
                mh, mw = mask.shape
                yy = (np.arange(mh) + 0.5) * h / mh - 0.5
                xx = (np.arange(mw) + 0.5) * w / mw - 0.5
                ax.contour(xx, yy, mask, levels=[0.5], colors="cyan", linewidths=0.8)
            for r, c in panel.get("marks", ()):
                ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="lime", linewidth=1.5))
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
            cb.ax.tick_params(labelsize=6)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- running
load_config = read_config


def run_config(config: dict, *, out_dir: str | None = None, img_dir: str | None = None, seeds=None,
               steps: int | None = None) -> dict:
    """All seeds of one row; returns a summary (params, FLOPs, top-1 mean/std, ms/step)."""
    cfg = check_config(config)
    hidden, params = match_params(cfg)
    seeds = cfg["seeds"] if seeds is None else tuple(seeds)
    runs, model = [], None
    for seed in seeds:
        t0 = time.time()
        model, res = train_one(cfg, seed, steps=steps, hidden=hidden)
        res["wall_s"] = time.time() - t0
        print(f"[{cfg['name']}] seed {seed}: top1 {res['test_top1']:.4f} loss {res['first_loss']:.3f}->"
              f"{res['final_loss']:.3f} {res['ms_per_step']:.1f} ms/step ({res['wall_s']:.0f}s)", flush=True)
        runs.append(res)
    accs = np.array([r["test_top1"] for r in runs])
    summary = {"name": cfg["name"], "backbone": cfg["backbone"], "module": cfg["module"],
               "paper": PAPERS[cfg["module"]], "hidden": hidden, "params": params,
               "target_params": cfg["target_params"], "flops": forward_flops(model, cfg["size"]),
               "top1_mean": float(accs.mean()), "top1_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
               "ms_per_step": float(np.median([r["ms_per_step"] for r in runs])), "steps": steps or cfg["steps"],
               "seeds": list(seeds), "runs": runs}
    if img_dir:
        os.makedirs(img_dir, exist_ok=True)
        image = digits(cfg["size"]).test_images[0]
        amap, label = gate_map(model, image)
        save_map_png(image, amap, label, os.path.join(img_dir, f"vision_{cfg['module']}.png"))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{cfg['name']}.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
    return summary


def format_row(s: dict) -> str:
    match = "" if s["target_params"] is None else f" ({100 * (s['params'] / s['target_params'] - 1):+.1f}%)"
    return (f"| {s['module']} | {s['paper']} | {s['backbone']} | {s['params']:,}{match} | {s['flops'] / 1e6:.2f} M "
            f"| {100 * s['top1_mean']:.1f} ± {100 * s['top1_std']:.1f} | {s['ms_per_step']:.1f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="configs/vision_<name>.py (repeatable)")
    parser.add_argument("--all", action="store_true", help="every configs/vision_*.py")
    parser.add_argument("--out", default="runs/vision_modules")
    parser.add_argument("--img", default=None, help="folder for the map PNGs (e.g. docs/img)")
    parser.add_argument("--seeds", default=None, help="override, e.g. 0,1,2")
    parser.add_argument("--steps", type=int, default=None, help="override the config's steps")
    parser.add_argument("--norm", default=None, choices=CNN_NORMS,
                        help="override the cnn backbone's norm (the diagnosis in docs/vision.md)")
    args = parser.parse_args(argv)
    paths = list(args.config)
    if args.all:
        paths += sorted(glob.glob(os.path.join("configs", "vision_*.py")))
    if not paths:
        parser.error("give --config PATH or --all")
    seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",")]
    rows = []
    for path in paths:
        config = load_config(path)
        if args.norm is not None:
            config = {**config, "norm": args.norm}
        rows.append(format_row(run_config(config, out_dir=args.out, img_dir=args.img, seeds=seeds,
                                          steps=args.steps)))
    print("| module | paper | backbone | params (vs target) | FLOPs/img | top-1 % (mean ± sd) | ms/step |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
