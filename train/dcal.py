"""P23 DCAL on real digits: the issue-18 tokens ViT trained plain vs with GLCA / PWCA / both, at equal steps.

Data: ``train.images.digits(size)`` (sklearn's real digits, fixed stratified split 1,437 / 360). Backbone: the
``tokens`` ViT of ``train.vision_modules`` (``TokenNet("vit")``: 2x2 patch conv + learned positions, ``depth``
pre-norm ``TokenBlock("vit")`` blocks, LayerNorm, linear head), built by its own constructor and driven by
``jattn.methods.vision.dcal.DCAL``, which adds a learned CLS token and reads the class from it (TokenNet itself
mean-pools; every variant here, the plain baseline included, classifies from the CLS token, so the only difference
between rows is the DCAL branches).

Variants (all: same data order ``batch_rng(seed, step, stream=18)``, same init seed, same steps):

* ``plain``: SA only, cross-entropy.
* ``glca``: SA + GLCA (one extra block with its own weights, own norm + classifier), uncertainty-weighted loss;
  test scores ``log(softmax(SA) + softmax(GLCA))``.
* ``pwca``: SA + PWCA (weights shared with SA; distractor = the next image of the batch), uncertainty-weighted
  loss; PWCA is not run at test time, so the test model is exactly the plain architecture.
* ``dcal``: SA + GLCA + PWCA.

Sizes (``configs/dcal_digits.py``): width 32, 2 blocks, 2 heads, MLP 64, patch 4 (a 4x4 grid: 16 patch tokens + CLS;
patch 2's 64 tokens made a DCAL step ~4x slower than the shared 2-core CPU allows for 3 seeds x 4 variants), batch
32, 300 steps; GLCA ratio 0.25 (R = 4 of 16 patches; the paper's 10% of 16 would keep a single patch -- the paper
uses 10% of 784 for FGVC and 30% for Re-ID).

Reported per variant: test top-1 (the inference scores above), test top-1 of the SA head alone, train top-1 on the
whole train split (train - test = generalisation gap, the paper's "PWCA regularises" claim), params, ms/step.
Optimiser: AdamW (lr ``lr``, cosine to 0.1x, weight decay 1e-4), batch ``batch_size``, no augmentation -- as in
``train.vision_modules``.

Run: ``python -m train.dcal --config configs/dcal_digits.py [--seeds 0,1,2] [--steps N] [--variants plain,dcal]``.
FLOPs: XLA's compiled cost analysis of the inference forward pass on one image (``forward_flops``: GLCA on where the
variant has it, PWCA never runs at test time); ``--flops-only`` prints them without training. ``--img DIR`` saves
``DIR/dcal_glca.png``: for the first seed's model of each GLCA variant run, the CLS attention of each SA block, the
attention rollout's CLS row and the GLCA-selected top-R patches on test digit :data:`MAP_IMAGE`
(:func:`save_glca_png`).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jattn.methods.vision.dcal import DCAL, attention_rollout, dcal_loss
from train.config import add_seeds_steps_flags, fill_defaults
from train.config import read_config as load_config
from train.data import batch_rng
from train.images import digits
from train.vision_modules import TokenBlock, TokenNet, compiled_flops, count_params, save_panels_png

VARIANTS = {"plain": ("sa",), "glca": ("sa", "glca"), "pwca": ("sa", "pwca"), "dcal": ("sa", "glca", "pwca")}
CONFIG_KEYS = ("name", "variants", "width", "depth", "heads", "hidden", "patch", "glca_ratio", "steps",
               "batch_size", "lr", "seeds", "size")
DEFAULTS = {"name": "dcal_digits", "variants": ("plain", "glca", "pwca", "dcal"), "width": 32, "depth": 2,
            "heads": 2, "hidden": 64, "patch": 4, "glca_ratio": 0.25, "steps": 300, "batch_size": 32, "lr": 3e-3,
            "seeds": (0, 1, 2), "size": 16}
MAP_IMAGE = 0        # the test digit of the GLCA map


def _int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"config key {name!r} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _tuple(name, value):
    if isinstance(value, str):
        value = tuple(s.strip() for s in value.split(",") if s.strip())
    if not isinstance(value, (tuple, list)) or not value:
        raise ValueError(f"config key {name!r} must be a non-empty tuple (or comma string), got {value!r}")
    return tuple(value)


def check_config(config: dict) -> dict:
    """Validated config with defaults filled; unknown keys or bad values raise ``ValueError`` naming the key."""
    cfg = fill_defaults(config, DEFAULTS, CONFIG_KEYS)
    cfg["variants"] = _tuple("variants", cfg["variants"])
    bad = [v for v in cfg["variants"] if v not in VARIANTS]
    if bad:
        raise ValueError(f"config key 'variants' must name variants among {tuple(VARIANTS)}, got {bad}")
    for key in ("width", "depth", "heads", "hidden", "patch", "steps", "batch_size", "size"):
        cfg[key] = _int(key, cfg[key])
    if cfg["width"] % cfg["heads"]:
        raise ValueError(f"config key 'heads' ({cfg['heads']}) must divide 'width' ({cfg['width']})")
    if cfg["size"] not in (8, 16, 32) or cfg["size"] % cfg["patch"]:
        raise ValueError(f"config key 'size' must be 8, 16 or 32 and a multiple of 'patch' ({cfg['patch']}), "
                         f"got {cfg['size']}")
    if cfg["batch_size"] < 2:
        raise ValueError(f"config key 'batch_size' must be >= 2 (PWCA pairs images in a batch), got "
                         f"{cfg['batch_size']}")
    for key in ("lr", "glca_ratio"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or (key == "glca_ratio" and v > 1):
            raise ValueError(f"config key {key!r} must be a float in {'(0, 1]' if key == 'glca_ratio' else '> 0'}"
                             f", got {v!r}")
    cfg["seeds"] = tuple(_int("seeds", int(s) if isinstance(s, str) else s, 0) for s in _tuple("seeds", cfg["seeds"]))
    return cfg


class DCALDigits(nnx.Module):
    """``TokenNet("vit")``'s patch embedding, positions, blocks, norm and head driven by ``DCAL``."""

    def __init__(self, variant: str, cfg: dict, *, rngs: nnx.Rngs):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
        self.net = TokenNet("vit", dim=cfg["width"], depth=cfg["depth"], heads=cfg["heads"],
                            mlp_hidden=cfg["hidden"], patch=cfg["patch"], image_size=cfg["size"], rngs=rngs)
        grid, dim = self.net.grid, cfg["width"]
        self.dcal = DCAL(self.net.blocks, dim=dim, num_classes=10, branches=VARIANTS[variant],
                         glca_ratio=cfg["glca_ratio"], norm=self.net.norm, head=self.net.head,
                         make_block=lambda r: TokenBlock("vit", dim, cfg["heads"], cfg["hidden"], grid, rngs=r),
                         rngs=rngs)

    def tokens(self, images):
        x = self.net.tokens(images)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def branch_logits(self, images, *, train: bool, partner=None):
        return self.dcal.branch_logits(self.tokens(images), train=train, partner=partner)

    def __call__(self, images):
        return self.dcal(self.tokens(images))


def forward_flops(model: DCALDigits, size: int = 16) -> float:
    """Inference FLOPs on one ``[1, size, size, 1]`` image (XLA's compiled cost analysis of ``model(x)``: SA, plus
    GLCA when the variant has it; PWCA is training-only and never in the count)."""
    return compiled_flops(model, jnp.zeros((1, size, size, 1), jnp.float32))


@functools.partial(jax.jit, static_argnums=0)
def _glca_arrays(graphdef, state, x):
    """Per-block SA probabilities, the rollout and the GLCA indices (one compile per model structure)."""
    model = nnx.merge(graphdef, state)
    x0 = model.dcal._with_cls(model.tokens(x))
    _, _, _, probs = model.dcal.sa_stream(x0, need_probs=True)
    return probs, attention_rollout(probs), model.dcal.glca_indices(model.tokens(x))


def glca_maps(model: DCALDigits, image) -> dict:
    """On one digit ``[S, S, 1]``: ``cls_attention`` (per SA block, the CLS row over the patches, mean over heads,
    ``[g, g]`` each), ``rollout`` (the rollout's CLS row over the patches ``[g, g]``: what GLCA ranks) and
    ``selected`` (the GLCA top-R patches as ``(row, col)`` grid cells, best first)."""
    dcal = model.dcal
    if "glca" not in dcal.branches:
        raise ValueError(f"model must have a GLCA branch, got branches {dcal.branches}")
    g = model.net.grid
    graphdef, state = nnx.split(model)
    probs, rollout, index = _glca_arrays(graphdef, state, jnp.asarray(image, jnp.float32)[None])
    grid = lambda row: np.asarray(row).reshape(g)
    return {"cls_attention": [grid(jnp.mean(p[0, :, 0, 1:], axis=0)) for p in probs],
            "rollout": grid(rollout[0, 0, 1:]),
            "selected": [divmod(int(i) - 1, g[1]) for i in np.asarray(index)[0, 1:]]}


def save_glca_png(models: dict, cfg: dict, path: str, *, title: str | None = None):
    """One row per ``{label: model}`` (models with GLCA): the test digit :data:`MAP_IMAGE`, the CLS attention of
    each SA block, the rollout's CLS row with GLCA's top-R patches outlined, and the digit with only those patches
    kept."""
    data = digits(cfg["size"])
    image, label = data.test_images[MAP_IMAGE], int(data.test_labels[MAP_IMAGE])
    p = cfg["patch"]
    panels = []
    for name, model in models.items():
        m = glca_maps(model, image)
        pred = int(_predict(model, image[None])[0])
        panels.append({"image": image[..., 0], "title": f"{name}\ndigit {label}, predicted {pred}"})
        for i, att in enumerate(m["cls_attention"]):
            panels.append({"map": att, "under": image[..., 0], "title": f"SA block {i + 1}: CLS attention"})
        panels.append({"map": m["rollout"], "under": image[..., 0], "marks": m["selected"],
                       "title": f"rollout CLS row, top-{len(m['selected'])} boxed"})
        keep = np.zeros(m["rollout"].shape, bool)
        for r, c in m["selected"]:
            keep[r, c] = True
        kept = image[..., 0] * np.kron(keep, np.ones((p, p)))
        panels.append({"image": kept, "title": "patches GLCA's queries keep"})
    save_panels_png(panels, path, title=title, cols=len(panels) // len(models))


_JIT_CACHE: dict = {}


def _jitted(key, build):
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = build()
    return _JIT_CACHE[key]


def _predict(model, images, fn_name="scores", batch_size=512):
    graphdef, state = nnx.split(model)

    def build():
        def f(s, x):
            m = nnx.merge(graphdef, s)
            return jnp.argmax(m(x) if fn_name == "scores" else m.branch_logits(x, train=False)["sa"], axis=-1)
        return jax.jit(f)

    fj = _jitted(("predict", graphdef, fn_name), build)
    return np.concatenate([np.asarray(fj(state, images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])


def _make_step(graphdef, opt):
    def loss_fn(params, x, y):
        m = nnx.merge(graphdef, params)
        return dcal_loss(m.dcal, m.branch_logits(x, train=True), y)

    @jax.jit
    def step(params, opt_state, x, y):
        (loss, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, ce

    return step


def train_variant(cfg: dict, variant: str, seed: int, *, steps: int | None = None):
    """One run; returns ``(model, result dict)``. The jitted step is shared by runs of the same variant, config
    and steps (one compile per variant, not per seed)."""
    steps = cfg["steps"] if steps is None else steps
    data = digits(cfg["size"])
    model = DCALDigits(variant, cfg, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    key = ("step", graphdef, steps, cfg["lr"])
    opt = optax.adamw(optax.cosine_decay_schedule(cfg["lr"], steps, alpha=0.1), weight_decay=1e-4)
    step = _jitted(key, lambda: _make_step(graphdef, opt))
    opt_state = opt.init(params)
    losses, times, ce = [], [], {}
    for i in range(steps):
        idx = batch_rng(seed, i, stream=18).integers(0, len(data.train_labels), cfg["batch_size"])
        t0 = time.perf_counter()
        params, opt_state, loss, ce = step(params, opt_state, data.train_images[idx], data.train_labels[idx])
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
    model = nnx.merge(graphdef, params)
    test = _predict(model, data.test_images)
    res = {"variant": variant, "seed": seed, "steps": steps, "first_loss": losses[0],
           "final_loss": float(np.mean(losses[-10:])), "final_ce": {k: float(v) for k, v in ce.items()},
           "loss_w": [float(w) for w in np.asarray(model.dcal.loss_w[...])],
           "test_top1": float(np.mean(test == data.test_labels)),
           "test_top1_sa_head": float(np.mean(_predict(model, data.test_images, "sa") == data.test_labels)),
           "train_top1": float(np.mean(_predict(model, data.train_images) == data.train_labels)),
           "params_inference": count_params(model) - len(VARIANTS[variant]),   # minus the loss weights w
           "ms_per_step": 1e3 * float(np.median(times[min(5, len(times) - 1):]))}
    return model, res


def _mean_sd(xs):
    xs = np.asarray(xs, np.float64)
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def run(config: dict, *, seeds=None, steps=None, variants=None, out: str | None = None,
        img: str | None = None) -> dict:
    cfg = check_config(config)
    seeds = cfg["seeds"] if seeds is None else tuple(seeds)
    variants = cfg["variants"] if variants is None else tuple(variants)
    summary = {"config": {**cfg, "seeds": list(seeds), "variants": list(variants)}, "rows": {}}
    glca_models = {}
    for variant in variants:
        runs = []
        for seed in seeds:
            t0 = time.time()
            model, res = train_variant(cfg, variant, seed, steps=steps)
            res["wall_s"] = time.time() - t0
            runs.append(res)
            if img and seed == seeds[0] and "glca" in VARIANTS[variant]:
                glca_models[f"{variant} (seed {seed}, test {100 * res['test_top1']:.1f}%)"] = model
            print(f"[{variant}] seed {seed}: test {res['test_top1']:.4f} (SA head {res['test_top1_sa_head']:.4f}) "
                  f"train {res['train_top1']:.4f} loss {res['first_loss']:.3f}->{res['final_loss']:.3f} "
                  f"w {np.round(res['loss_w'], 2).tolist()} {res['ms_per_step']:.1f} ms/step "
                  f"({res['wall_s']:.0f}s)", flush=True)
        row = {"runs": runs, "params_inference": runs[0]["params_inference"],
               "flops": forward_flops(model, cfg["size"]),
               "ms_per_step": float(np.median([r["ms_per_step"] for r in runs]))}
        for key in ("test_top1", "test_top1_sa_head", "train_top1"):
            row[key] = _mean_sd([r[key] for r in runs])
        row["gap"] = _mean_sd([r["train_top1"] - r["test_top1"] for r in runs])
        summary["rows"][variant] = row
    if img and glca_models:
        png = os.path.join(img, "dcal_glca.png")
        save_glca_png(glca_models, cfg, png, title=f"GLCA selection, R = {cfg['glca_ratio']:g} of the patches, "
                                                   f"{steps or cfg['steps']} steps")
        print(f"wrote {png}", flush=True)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{cfg['name']}.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
    return summary


def format_table(summary: dict) -> str:
    lines = ["| variant | params (inference) | FLOPs/img (inference) | test top-1 % | SA-head top-1 % | train top-1 % "
             "| train-test gap | ms/step |", "|---|---|---|---|---|---|---|---|"]
    pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"
    for v, r in summary["rows"].items():
        flops = f"{r['flops'] / 1e6:.2f} M" if "flops" in r else "-"
        lines.append(f"| {v} | {r['params_inference']:,} | {flops} | {pct(r['test_top1'])} "
                     f"| {pct(r['test_top1_sa_head'])} "
                     f"| {pct(r['train_top1'])} | {pct(r['gap'])} | {r['ms_per_step']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/dcal_digits.py")
    add_seeds_steps_flags(parser)
    parser.add_argument("--variants", default=None, help="override, e.g. plain,dcal")
    parser.add_argument("--out", default="runs/dcal")
    parser.add_argument("--img", default=None, help="folder for dcal_glca.png (first seed of each GLCA variant)")
    parser.add_argument("--flops-only", action="store_true", help="print each variant's inference FLOPs; no training")
    args = parser.parse_args(argv)
    variants = None if args.variants is None else args.variants.split(",")
    if args.flops_only:
        cfg = check_config(load_config(args.config))
        for variant in variants or cfg["variants"]:
            model = DCALDigits(variant, cfg, rngs=nnx.Rngs(0))
            print(f"{variant}: params (inference) {count_params(model) - len(VARIANTS[variant]):,}, "
                  f"FLOPs/img {forward_flops(model, cfg['size']) / 1e6:.2f} M")
        return 0
    summary = run(load_config(args.config), seeds=args.seeds, steps=args.steps, variants=variants, out=args.out,
                  img=args.img)
    print(format_table(summary))
    return summary


if __name__ == "__main__":
    main()
