"""``python -m train.segmentation``: context and gating modules in one small U-Net, segmenting the procedural shapes
set (``train.images.shapes``: 4 classes, background + circle / square / triangle), at equal steps over seeds.

The backbone (``SegUNet``): two encoder levels (conv3-BN-ReLU x2, max-pool), a bottleneck at 1/4 resolution, two
decoder levels (transposed conv, concatenated skip, conv3-BN-ReLU x2) and a 1x1 classifier. Variants differ only
at the bottleneck or the skips:

* ``plain``: the bottleneck is the conv block alone;
* ``se``: a squeeze-excitation gate after it (the usual channel-attention baseline, reduction 4);
* ``dual``: P51 DAUNet's PAM + CAM bottleneck (``jattn.methods.vision.DualAttentionBottleneck``) after it;
* ``gates``: P51 AGUNet's additive attention gates on both skip connections;
* ``dappm``: P69 DDRNet's DAPPM after it (a pooling pyramid, no attention);
* ``convs2`` / ``convs4``: the parameter-matched controls for ``dappm`` / ``dual``: 2 or 4 residual
  conv3-BN-ReLU layers after the bottleneck (within a few percent of those modules' parameter counts; ``se`` and
  ``gates`` are within 2 % of ``plain``);
* ``sdanet``: P10 SDANet's selective dense attention neck (``jattn.methods.vision.SelectiveDenseAttentionNeck``)
  over the three encoder levels, as a neck over an FPN: the skips ``s1`` (full size), ``s2`` (1/2) and the
  bottleneck output (1/4) get 1x1 lateral convs to a common ``C = 2 * width`` channels, the neck gathers them at
  the middle level (1/2: max-pool / nearest, as in Libra R-CNN's balanced pyramid), fuses them (cross-level channel
  selection, spatial gate, non-local refinement) and adds the fused map back to every level; a 1x1 conv per level
  (zero-initialised, so the variant starts as ``plain``) maps each level's output back to its own width and adds it
  to the skip / bottleneck the decoder reads;
* ``bfp``: its parameter-matched control, the same laterals and back-projections with the neck replaced by the
  balanced pyramid without refinement (gather, average the levels, redistribute: ``out_l = f_l +
  resize(mean_l gather(f))``), i.e. everything but SDANet's three attentions (3.7 % fewer parameters);
* ``psa`` / ``psa_seq``: P42 polarized self-attention (``jattn.methods.vision.PolarizedSelfAttention``, paper
  form) after the bottleneck, parallel / sequential layout;
* ``pw2``: their parameter-matched control, 2 residual 1x1 conv-BN-ReLU layers after the bottleneck (within 0.5 %).

Loss: pixel cross entropy (the same for every variant; DAUNet's paper uses a soft Dice). AdamW at a constant
rate. Metric: mean IoU over the 4 classes on held-out images (indices disjoint from training), mean and sample
std over seeds; parameter counts are printed beside (they differ: see the docs' table).

Run: ``python -m train.segmentation`` (every variant, 3 seeds), ``--variants psa,pw2`` for some, or one row from its
config, ``python -m train --config configs/segmentation_psa.py`` (= ``python -m train.segmentation --config
configs/segmentation_psa.py``; a config's ``get_config()`` holds keys of :data:`DEFAULTS` plus ``name``, and flags
given on the command line override it). ``--img DIR`` saves each attention / gate variant's maps
(:func:`attention_maps`) on held-out image :data:`MAP_IMAGE` from the first seed's model as ``DIR/seg_<variant>.png``.
FLOPs: XLA's compiled cost analysis of the inference forward pass on one image (``--flops-only`` prints them
without training).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jattn.methods.vision.dappm import DAPPM
from jattn.methods.vision.dual_attention import AttentionGate, DualAttentionBottleneck
from jattn.methods.vision.psa import PolarizedSelfAttention
from jattn.methods.vision.sdanet import SelectiveDenseAttentionNeck, gather_levels, resize_to
from train.config import fill_defaults, read_config
from train.images import shapes

VARIANTS = ("plain", "se", "gates", "convs2", "dappm", "convs4", "dual", "bfp", "sdanet", "pw2", "psa", "psa_seq")
LEVEL_VARIANTS = ("bfp", "sdanet")        # variants that fuse the encoder levels (a neck), not only the bottleneck
NUM_CLASSES = 4
DEFAULTS = dict(width=8, steps=300, batch=16, lr=3e-3, train_images=1024, eval_images=256, size=32,
                seeds="0,1,2", variants=",".join(VARIANTS))
CONFIG_KEYS = ("name", *DEFAULTS)      # what a configs/segmentation_<variant>.py may set
MAP_VARIANTS = ("se", "gates", "dual", "sdanet", "psa", "psa_seq")   # variants with an attention / gate map
MAP_IMAGE = 1       # the held-out image the maps are drawn on (index 1,000,001: a square and a circle)


def segmentation_targets(data) -> np.ndarray:
    """Per-pixel labels ``[N, S, S]``: 0 background, ``1 + kind`` under each object's mask."""
    labels = np.zeros(data.masks.shape[:1] + data.masks.shape[2:], np.int32)
    for j in range(data.masks.shape[1]):
        labels = np.where(data.masks[:, j], 1 + np.maximum(data.kinds[:, j], 0)[:, None, None], labels)
    return labels


def mean_iou(predicted, labels, num_classes: int = NUM_CLASSES) -> tuple[float, np.ndarray]:
    """Mean over classes of ``|pred = c and label = c| / |pred = c or label = c|`` on the whole set (classes absent
    from both count as IoU 1); returns ``(mean, per-class)``."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape:
        raise ValueError(f"predicted and labels must share a shape, got {predicted.shape} and {labels.shape}")
    ious = []
    for c in range(num_classes):
        p, t = predicted == c, labels == c
        union = np.logical_or(p, t).sum()
        ious.append(1.0 if union == 0 else np.logical_and(p, t).sum() / union)
    return float(np.mean(ious)), np.array(ious)


class ConvBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.layers = nnx.Sequential(
            nnx.Conv(cin, cout, (3, 3), padding="SAME", rngs=rngs), nnx.BatchNorm(cout, rngs=rngs), jax.nn.relu,
            nnx.Conv(cout, cout, (3, 3), padding="SAME", rngs=rngs), nnx.BatchNorm(cout, rngs=rngs), jax.nn.relu)

    def __call__(self, x):
        return self.layers(x)


class SqueezeExcitation(nnx.Module):
    """``x * sigmoid(W2 ReLU(W1 mean_spatial(x)))``."""

    def __init__(self, channels: int, reduction: int = 4, *, rngs: nnx.Rngs):
        self.down = nnx.Linear(channels, max(1, channels // reduction), rngs=rngs)
        self.up = nnx.Linear(max(1, channels // reduction), channels, rngs=rngs)

    def __call__(self, x):
        gate = jax.nn.sigmoid(self.up(jax.nn.relu(self.down(jnp.mean(x, axis=(1, 2))))))
        return x * gate[:, None, None, :]


class ConvStack(nnx.Module):
    """``x + f(x)`` with ``f`` = ``depth`` convK-BN-ReLU layers at constant width (a parameter-matched control;
    ``kernel`` 3 for ``convsN``, 1 for ``pw2``)."""

    def __init__(self, channels: int, depth: int, kernel: int = 3, *, rngs: nnx.Rngs):
        layers = []
        for _ in range(depth):
            layers += [nnx.Conv(channels, channels, (kernel, kernel), padding="SAME", rngs=rngs),
                       nnx.BatchNorm(channels, rngs=rngs), jax.nn.relu]
        self.layers = nnx.Sequential(*layers)

    def __call__(self, x):
        return x + self.layers(x)


class LevelFusion(nnx.Module):
    """The ``sdanet`` / ``bfp`` neck over U-Net levels ``[s1, s2, bottleneck]`` (widths ``widths``, sizes 1, 1/2,
    1/4): ``f_l = lateral_l(x_l)`` (1x1 conv to ``channels``), ``o = neck([f_l])`` (``attention=True``: SDANet's
    selective dense attention neck refined at level ``refine_level``; ``False``: the balanced pyramid without
    refinement, ``o_l = f_l + resize(mean_l gather(f))``), ``x_l + back_l(o_l)`` with ``back_l`` a zero-initialised
    1x1 conv (so the fusion starts as the identity)."""

    def __init__(self, widths, channels: int, *, attention: bool, refine_level: int = 1, rngs: nnx.Rngs):
        self.refine_level = refine_level
        self.lateral = nnx.List([nnx.Conv(w, channels, (1, 1), rngs=rngs) for w in widths])
        self.neck = (SelectiveDenseAttentionNeck(channels, len(widths), refine_level, rngs=rngs) if attention
                     else None)
        self.back = nnx.List([nnx.Conv(channels, w, (1, 1), kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
                              for w in widths])

    def __call__(self, levels):
        feats = [lat(x) for lat, x in zip(self.lateral, levels)]
        if self.neck is not None:
            outs = self.neck(feats)
        else:
            mean = jnp.mean(gather_levels(feats, feats[self.refine_level].shape[1:3]), axis=0)
            outs = [f + resize_to(mean, f.shape[1:3]) for f in feats]
        return [x + back(o) for x, back, o in zip(levels, self.back, outs)]


class SegUNet(nnx.Module):
    """The shared two-level U-Net with one of :data:`VARIANTS` at its bottleneck or skips."""

    def __init__(self, variant: str = "plain", *, width: int = 16, in_channels: int = 3,
                 num_classes: int = NUM_CLASSES, rngs: nnx.Rngs):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        w1, w2, w3 = width, 2 * width, 4 * width
        self.variant = variant
        self.enc1, self.enc2 = ConvBlock(in_channels, w1, rngs=rngs), ConvBlock(w1, w2, rngs=rngs)
        self.bottleneck = ConvBlock(w2, w3, rngs=rngs)
        self.context = {"plain": lambda: None,
                        "se": lambda: SqueezeExcitation(w3, rngs=rngs),
                        "dual": lambda: DualAttentionBottleneck(w3, rngs=rngs),
                        "gates": lambda: None,
                        "dappm": lambda: DAPPM(w3, (9 * w3) // 16, w3, rngs=rngs),  # branch width: parameters match convs2
                        "convs2": lambda: ConvStack(w3, 2, rngs=rngs),
                        "convs4": lambda: ConvStack(w3, 4, rngs=rngs),
                        "pw2": lambda: ConvStack(w3, 2, kernel=1, rngs=rngs),
                        "psa": lambda: PolarizedSelfAttention(w3, layout="parallel", rngs=rngs),
                        "psa_seq": lambda: PolarizedSelfAttention(w3, layout="sequential", rngs=rngs),
                        "bfp": lambda: None, "sdanet": lambda: None}[variant]()
        if variant == "gates":
            self.gate2, self.gate1 = AttentionGate(w2, w3, rngs=rngs), AttentionGate(w1, w2, rngs=rngs)
        if variant in LEVEL_VARIANTS:
            self.fusion = LevelFusion((w1, w2, w3), w2, attention=variant == "sdanet", rngs=rngs)
        self.up2 = nnx.ConvTranspose(w3, w2, (2, 2), strides=(2, 2), rngs=rngs)
        self.dec2 = ConvBlock(2 * w2, w2, rngs=rngs)
        self.up1 = nnx.ConvTranspose(w2, w1, (2, 2), strides=(2, 2), rngs=rngs)
        self.dec1 = ConvBlock(2 * w1, w1, rngs=rngs)
        self.classify = nnx.Conv(w1, num_classes, (1, 1), rngs=rngs)

    @staticmethod
    def _pool(x):
        return nnx.max_pool(x, (2, 2), strides=(2, 2))

    def __call__(self, images):
        s1 = self.enc1(images)
        s2 = self.enc2(self._pool(s1))
        x = self.bottleneck(self._pool(s2))
        if self.context is not None:
            x = self.context(x)
        if self.variant in LEVEL_VARIANTS:
            s1, s2, x = self.fusion([s1, s2, x])
        skip2 = self.gate2(s2, x)[0] if self.variant == "gates" else s2
        x = self.dec2(jnp.concatenate([skip2, self.up2(x)], axis=-1))
        skip1 = self.gate1(s1, x)[0] if self.variant == "gates" else s1
        x = self.dec1(jnp.concatenate([skip1, self.up1(x)], axis=-1))
        return self.classify(x)


def parameter_count(model) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def train_run(variant: str, *, seed: int, width: int, steps: int, batch: int, lr: float, train_images: int,
              eval_images: int, size: int) -> dict:
    """Trains one variant; returns its held-out mean IoU, per-class IoU and cost."""
    return train_model(variant, seed=seed, width=width, steps=steps, batch=batch, lr=lr, train_images=train_images,
                       eval_images=eval_images, size=size)[1]


def train_model(variant: str, *, seed: int, width: int, steps: int, batch: int, lr: float, train_images: int,
                eval_images: int, size: int):
    """:func:`train_run` that also returns the trained model (in eval mode): ``(model, row)``."""
    train_set = shapes(train_images, seed=0, size=size, start=0)
    eval_set = shapes(eval_images, seed=0, size=size, start=1_000_000)
    x_train, y_train = jnp.asarray(train_set.images), jnp.asarray(segmentation_targets(train_set))
    model = SegUNet(variant, width=width, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    optimizer = nnx.Optimizer(model, optax.adamw(lr, weight_decay=0.0), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, images, labels):
        def loss_fn(model):
            logits = model(images)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    order = np.random.default_rng(seed)
    model.train()
    start = time.perf_counter()
    loss = jnp.nan
    for _ in range(steps):
        idx = order.integers(0, train_images, batch)
        loss = step(model, optimizer, x_train[idx], y_train[idx])
    jax.block_until_ready(loss)
    seconds = time.perf_counter() - start
    model.eval()
    predict = nnx.jit(lambda m, x: jnp.argmax(m(x), axis=-1))
    predicted = np.concatenate([np.asarray(predict(model, jnp.asarray(eval_set.images[i:i + 64])))
                                for i in range(0, eval_images, 64)])
    miou, per_class = mean_iou(predicted, segmentation_targets(eval_set))
    return model, {"variant": variant, "seed": seed, "miou": miou,
                   "per_class_iou": [round(float(v), 4) for v in per_class], "final_loss": float(loss),
                   "params": parameter_count(model), "seconds": round(seconds, 1),
                   "ms_per_step": round(1000 * seconds / steps, 1)}


def forward_flops(model, size: int = 32) -> float:
    """Inference FLOPs of ``model`` on one ``[1, size, size, 3]`` image (XLA's compiled cost analysis; the model is
    put in eval mode: BatchNorm running statistics, no dropout)."""
    from train.vision_modules import compiled_flops
    model.eval()
    return compiled_flops(model, jnp.zeros((1, size, size, 3), jnp.float32))


# -------------------------------------------------------------------------------------------------------- maps
def attention_maps(model: SegUNet, image, objects=None) -> list[dict]:
    """The module's own maps on one image ``[S, S, 3]`` (eval mode), as panels for
    ``train.vision_modules.save_panels_png`` (after the image, label and prediction panels of :func:`save_maps_png`):

    * ``gates`` (P51 AG): the gate coefficients ``alpha`` of each skip (full size and 1/2), in (0, 1);
    * ``dual`` (P51 PAM + CAM): PAM's attention row of the bottleneck position with the largest attention mass
      received (softmax over the 1/4-size grid), the mass each position receives (column sums / N), CAM's channel
      affinity ``softmax_row(A^T A)`` ``[C, C]``; the learned ``gamma`` of each is in the titles (0 = unused);
    * ``sdanet`` (P10 neck): the 7x7 spatial gate ``g`` of the fused map (1/2 size) and the cross-level channel
      selection weights ``a`` ``[levels, C]`` (softmax over levels);
    * ``psa`` / ``psa_seq`` (P42): the spatial gate ``A_sp`` (1/4 size) and the channel gate ``A_ch`` per channel;
    * ``se``: the channel gate per bottleneck channel.

    ``objects``: an optional ``[S, S]`` boolean mask (the image's objects) outlined on the spatial maps.
    """
    model.eval()
    variant = model.variant
    if variant not in MAP_VARIANTS:
        raise ValueError(f"variant must be one of {MAP_VARIANTS} to have a map, got {variant!r}")
    x = jnp.asarray(image, jnp.float32)[None]
    pool = SegUNet._pool
    s1 = model.enc1(x)
    s2 = model.enc2(pool(s1))
    b = model.bottleneck(pool(s2))
    grid = lambda m: np.asarray(m)[0, ..., 0]
    if variant == "se":
        se = model.context
        gate = jax.nn.sigmoid(se.up(jax.nn.relu(se.down(jnp.mean(b, axis=(1, 2))))))
        return [{"bars": np.asarray(gate)[0], "ylim": (0, 1), "title": f"SE channel gate ({b.shape[-1]} channels)"}]
    if variant in ("psa", "psa_seq"):
        a_ch, a_sp = model.context.gates(b)
        name = "PSA par." if variant == "psa" else "PSA seq."
        return [{"map": grid(a_sp), "outline": objects, "vmin": 0, "vmax": 1,
                 "title": f"{name}: A_sp ({b.shape[1]}x{b.shape[2]})"},
                {"bars": np.asarray(a_ch).reshape(-1), "ylim": (0, 1), "title": f"{name}: A_ch per channel"}]
    if variant == "dual":
        pam, cam = model.context.pam, model.context.cam
        flat = lambda y: y.reshape(y.shape[0], -1, y.shape[-1])
        weights = np.asarray(jax.nn.softmax(jnp.einsum("bnc,bmc->bnm", flat(pam.query(b)), flat(pam.key(b))),
                                            axis=-1))[0]                        # [N, N], rows sum to 1
        h, w = b.shape[1:3]
        received = weights.mean(0)
        q = int(np.argmax(received))
        row = weights[q].reshape(h, w)
        from jattn.methods.vision.dual_attention import channel_attention_weights
        affinity = np.asarray(channel_attention_weights(b))[0]
        return [{"map": row, "outline": objects, "marks": [divmod(q, w)],
                 "title": f"PAM row {divmod(q, w)}, gamma {float(pam.gamma[...]):.2f}"},
                {"map": received.reshape(h, w), "outline": objects, "title": "PAM: attention received"},
                {"map": affinity, "title": f"CAM affinity [C, C], gamma {float(cam.gamma[...]):.2f}"}]
    if variant == "gates":
        x4 = model.context(b) if model.context is not None else b
        _, alpha2 = model.gate2(s2, x4)
        d2 = model.dec2(jnp.concatenate([alpha2 * s2, model.up2(x4)], axis=-1))
        _, alpha1 = model.gate1(s1, d2)
        gate = dict(outline=objects, vmin=0, vmax=1)
        return [{"map": grid(alpha1), "title": "AG alpha, skip 1 (full size)", **gate},
                {"map": grid(alpha2), "title": "AG alpha, skip 2 (1/2 size)", **gate}]
    fusion = model.fusion                                                       # sdanet
    feats = [lat(f) for lat, f in zip(fusion.lateral, (s1, s2, b))]
    a, g = fusion.neck.maps(feats)
    return [{"map": grid(g), "outline": objects, "vmin": 0, "vmax": 1,
             "title": f"SDANet spatial gate g ({g.shape[1]}x{g.shape[2]})"},
            {"map": np.asarray(a)[0], "vmin": 0, "vmax": 1, "cmap": "viridis", "aspect": "auto",
             "title": "level weights a: rows full, 1/2, 1/4; cols C"}]


def save_maps_png(model: SegUNet, path: str, *, size: int = DEFAULTS["size"], title: str | None = None):
    """The held-out image :data:`MAP_IMAGE`, its labels, the model's prediction and :func:`attention_maps`, as one
    PNG at ``path``."""
    from train.vision_modules import save_panels_png
    data = shapes(max(MAP_IMAGE + 1, 2), seed=0, size=size, start=1_000_000)
    image = data.images[MAP_IMAGE]
    labels = segmentation_targets(data)[MAP_IMAGE]
    model.eval()
    predicted = np.asarray(jnp.argmax(model(jnp.asarray(image, jnp.float32)[None]), axis=-1))[0]
    classes = dict(vmin=-0.5, vmax=NUM_CLASSES - 0.5, cmap=["#333333", "tab:orange", "tab:green", "tab:blue"])
    panels = [{"image": image, "title": f"held-out image {MAP_IMAGE}"},
              {"map": labels, "title": "labels: 0 bg 1 circle 2 sq. 3 tri.", **classes},
              {"map": predicted, "title": f"{model.variant}: prediction", **classes}]
    save_panels_png(panels + attention_maps(model, image, labels > 0), path, title=title, cols=3)


def summarize(rows: list[dict]) -> dict:
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        miou = np.array([r["miou"] for r in mine])
        out[variant] = {"n": len(mine), "miou_mean": float(miou.mean()),
                        "miou_std": float(miou.std(ddof=1)) if len(miou) > 1 else 0.0,
                        "params": mine[0]["params"], "ms_per_step": float(np.mean([r["ms_per_step"] for r in mine]))}
        if "flops" in mine[0]:
            out[variant]["flops"] = mine[0]["flops"]
    return out


def _comma(name, value):
    if isinstance(value, (tuple, list)):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str) or not [v for v in value.split(",") if v.strip()]:
        raise ValueError(f"config key {name!r} must be a non-empty tuple or comma string, got {value!r}")
    return ",".join(v.strip() for v in value.split(",") if v.strip())


def check_config(config: dict) -> dict:
    """``config`` (keys of :data:`CONFIG_KEYS`) with :data:`DEFAULTS` filled; ``seeds`` / ``variants`` may be tuples
    or comma strings (returned as comma strings). Unknown keys, unknown variants and bad values raise
    ``ValueError`` naming the key."""
    cfg = fill_defaults(config, DEFAULTS, CONFIG_KEYS)
    cfg["seeds"], cfg["variants"] = _comma("seeds", cfg["seeds"]), _comma("variants", cfg["variants"])
    bad = [v for v in cfg["variants"].split(",") if v not in VARIANTS]
    if bad:
        raise ValueError(f"config key 'variants': unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    try:
        [int(s) for s in cfg["seeds"].split(",")]
    except ValueError:
        raise ValueError(f"config key 'seeds' must hold ints, got {cfg['seeds']!r}") from None
    for key in ("width", "steps", "batch", "train_images", "eval_images", "size"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"config key {key!r} must be an int >= 1, got {v!r}")
    if cfg["size"] % 4:
        raise ValueError(f"config key 'size' must be a multiple of 4 (two poolings), got {cfg['size']}")
    if isinstance(cfg["lr"], bool) or not isinstance(cfg["lr"], (int, float)) or cfg["lr"] <= 0:
        raise ValueError(f"config key 'lr' must be a float > 0, got {cfg['lr']!r}")
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None,
                        help="a configs/segmentation_<variant>.py (its get_config() sets keys of DEFAULTS; flags win)")
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=None, help=f"default {value}")
    parser.add_argument("--out", default=None, help="write the rows and summary as JSON here")
    parser.add_argument("--img", default=None, help="folder for the seg_<variant>.png maps (first seed's model)")
    parser.add_argument("--flops-only", action="store_true", help="print each variant's FLOPs/image; no training")
    args = vars(parser.parse_args(argv))
    out_path, img_dir, flops_only, path = args.pop("out"), args.pop("img"), args.pop("flops_only"), args.pop("config")
    try:
        config = read_config(path) if path else {}
        config.update({k: v for k, v in args.items() if v is not None})
        cfg = check_config(config)
    except (ValueError, TypeError, FileNotFoundError) as err:
        parser.error(str(err))
    name = cfg.pop("name", None)
    seeds = [int(s) for s in cfg.pop("seeds").split(",")]
    variants = cfg.pop("variants").split(",")
    if flops_only:
        print(f"{'variant':8s} {'params':>8s} {'MFLOPs/img':>10s}")
        for variant in variants:
            model = SegUNet(variant, width=cfg["width"], rngs=nnx.Rngs(params=0, dropout=1))
            print(f"{variant:8s} {parameter_count(model):8d} {forward_flops(model, cfg['size']) / 1e6:10.2f}")
        return 0
    rows = []
    for seed in seeds:
        for variant in variants:
            model, row = train_model(variant, seed=seed, **cfg)
            row["flops"] = forward_flops(model, cfg["size"])
            rows.append(row)
            print(json.dumps(row), flush=True)
            if img_dir and seed == seeds[0] and variant in MAP_VARIANTS:
                png = os.path.join(img_dir, f"seg_{variant}.png")
                save_maps_png(model, png, size=cfg["size"],
                              title=f"{variant}: seed {seed}, {cfg['steps']} steps, held-out mIoU {row['miou']:.3f}")
                print(f"wrote {png}", flush=True)
    summary = summarize(rows)
    print(f"{'variant':8s} {'params':>8s} {'MFLOPs':>8s} {'mIoU':>16s} {'ms/step':>8s}")
    for variant, s in summary.items():
        print(f"{variant:8s} {s['params']:8d} {s['flops'] / 1e6:8.2f} {s['miou_mean']:.4f} ± {s['miou_std']:.4f} "
              f"{s['ms_per_step']:8.1f}")
    if out_path:
        with open(out_path, "w") as f:
            json.dump({"args": {**cfg, "name": name, "seeds": seeds, "variants": variants}, "rows": rows,
                       "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
