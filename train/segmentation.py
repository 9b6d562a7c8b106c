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
"""
from __future__ import annotations

import argparse
import json
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
from train.images import shapes

VARIANTS = ("plain", "se", "gates", "convs2", "dappm", "convs4", "dual", "bfp", "sdanet", "pw2", "psa", "psa_seq")
LEVEL_VARIANTS = ("bfp", "sdanet")        # variants that fuse the encoder levels (a neck), not only the bottleneck
NUM_CLASSES = 4
DEFAULTS = dict(width=8, steps=300, batch=16, lr=3e-3, train_images=1024, eval_images=256, size=32,
                seeds="0,1,2", variants=",".join(VARIANTS))


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
    return {"variant": variant, "seed": seed, "miou": miou, "per_class_iou": [round(float(v), 4) for v in per_class],
            "final_loss": float(loss), "params": parameter_count(model), "seconds": round(seconds, 1),
            "ms_per_step": round(1000 * seconds / steps, 1)}


def summarize(rows: list[dict]) -> dict:
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        miou = np.array([r["miou"] for r in mine])
        out[variant] = {"n": len(mine), "miou_mean": float(miou.mean()),
                        "miou_std": float(miou.std(ddof=1)) if len(miou) > 1 else 0.0,
                        "params": mine[0]["params"], "ms_per_step": float(np.mean([r["ms_per_step"] for r in mine]))}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--out", default=None, help="write the rows and summary as JSON here")
    args = vars(parser.parse_args(argv))
    seeds = [int(s) for s in args.pop("seeds").split(",") if s]
    variants = [v for v in args.pop("variants").split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    out_path = args.pop("out")
    rows = []
    for seed in seeds:
        for variant in variants:
            rows.append(train_run(variant, seed=seed, **args))
            print(json.dumps(rows[-1]), flush=True)
    summary = summarize(rows)
    print(f"{'variant':8s} {'params':>8s} {'mIoU':>16s} {'ms/step':>8s}")
    for variant, s in summary.items():
        print(f"{variant:8s} {s['params']:8d} {s['miou_mean']:.4f} ± {s['miou_std']:.4f} {s['ms_per_step']:8.1f}")
    if out_path:
        with open(out_path, "w") as f:
            json.dump({"args": {**args, "seeds": seeds, "variants": variants}, "rows": rows, "summary": summary},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
