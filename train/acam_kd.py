"""P17 ACAM-KD on the tiny DETR: distil a wider, deeper teacher TinyDETR into the small one on the shapes set.

    python -m train.acam_kd --config configs/acam_kd_shapes.py            # teacher (cached), then all students
    python -m train.acam_kd --config configs/acam_kd_shapes.py --seeds 0  # one seed

The teacher (``config["teacher"]``: wider and deeper than the student) is trained once with the plain DETR set
loss on the same training pool and cached under ``runs/acam_kd/`` (git-ignored; the file name encodes the
teacher config, so changing it retrains). Students (``config["student"]``, the ``configs/detr_shapes.py`` model)
are then trained for ``train.steps`` steps in three variants from the *same* initial weights (``nnx.Rngs(seed)``)
on the *same* batches (``default_rng([seed, 17])``), so the only difference is the added term:

* ``none``: DETR set loss only (the student baseline);
* ``feature``: + ``kd.weight`` x plain feature KD, MSE between the 1x1-projected student feature and the teacher's
  (:func:`jattn.methods.objectives.acam_kd.feature_kd_loss`);
* ``acam``: + ``kd.weight`` x ACAM-KD (:func:`jattn.methods.objectives.acam_kd.acam_kd_loss`): cross-attention
  fusion (teacher queries, student keys/values), adaptive spatial/channel masks from the fusion, mask-normalised
  distillation and the Dice diversity term.

The distilled feature is the encoder memory (after ``enc_norm``), ``[B, (S/4)^2, dim]`` (an 8 x 8 grid for 32 px):
the dense feature map the decoder's cross-attention reads, i.e. DETR's "neck" feature. :func:`encode` /
:func:`decode` recompute TinyDETR's forward from its own submodules (``jattn/nn/detr.py`` has no feature hook);
``tests/train/test_acam_kd.py`` checks that ``decode(encode(x)) == model(x)`` exactly, so a change to TinyDETR's
forward breaks that test rather than silently distilling the wrong tensor.

The KD projector / fusion / mask generator weights (``init_params``) are trained with the student by the same
AdamW step; the teacher gets no gradient. Metric: mAP@0.5 on ``data.test_images`` held-out images (another shapes
stream), :func:`train.detection.evaluate`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jattn.methods.objectives import acam_kd
from jattn.nn.detr import TinyDETR
from train import detection as D
from train.images import shapes

VARIANTS = ("none", "feature", "acam")
CACHE_DIR = os.path.join("runs", "acam_kd")

_SECTIONS = {
    "data": ("size", "pool", "data_seed", "test_images", "test_seed", "max_targets"),
    "student": ("dim", "heads", "queries", "encoder_layers", "decoder_layers", "query_mode"),
    "teacher": ("dim", "heads", "queries", "encoder_layers", "decoder_layers", "query_mode", "steps", "seed"),
    "optim": ("lr", "warmup", "clip", "weight_decay"),
    "train": ("steps", "batch_size", "eval_at"),
    "kd": ("weight", "num_masks", "num_heads", "div_weight", "combine"),
}
_TOP = ("name", "variants", "seeds") + tuple(_SECTIONS)


def _int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config key {name!r} must be an int >= {minimum}, got {value!r}")
    return value


def _float(name, value, minimum=0.0):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ValueError(f"config key {name!r} must be a number >= {minimum}, got {value!r}")
    return value


def check_config(config: dict) -> dict:
    """Raises ``ValueError`` naming the key for a missing or unknown key or a bad value; returns ``config``."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(_TOP))
    missing = sorted(set(_TOP) - set(config))
    if unknown or missing:
        raise ValueError(f"config keys: unknown {unknown}, missing {missing}; expected exactly {sorted(_TOP)}")
    for section, keys in _SECTIONS.items():
        sub = config[section]
        if not isinstance(sub, dict):
            raise ValueError(f"config key {section!r} must be a dict, got {type(sub).__name__}")
        unknown, missing = sorted(set(sub) - set(keys)), sorted(set(keys) - set(sub))
        if unknown or missing:
            raise ValueError(f"config section {section!r}: unknown {unknown}, missing {missing}; expected "
                             f"{sorted(keys)}")
    d, s, t, tr, o, kd = (config[k] for k in ("data", "student", "teacher", "train", "optim", "kd"))
    for k in ("size", "pool", "test_images", "max_targets"):
        _int(f"data.{k}", d[k])
    for k in ("data_seed", "test_seed"):
        _int(f"data.{k}", d[k], 0)
    if d["size"] % 4:
        raise ValueError(f"config key 'data.size' must be a multiple of 4, got {d['size']}")
    for name, m in (("student", s), ("teacher", t)):
        for k in ("dim", "heads", "queries", "encoder_layers", "decoder_layers"):
            _int(f"{name}.{k}", m[k])
        if m["query_mode"] not in ("learned", "tokens"):
            raise ValueError(f"config key '{name}.query_mode' must be 'learned' or 'tokens', got {m['query_mode']!r}")
        if m["queries"] < d["max_targets"]:
            raise ValueError(f"config key '{name}.queries'={m['queries']} must be >= data.max_targets="
                             f"{d['max_targets']}")
    _int("teacher.steps", t["steps"])
    _int("teacher.seed", t["seed"], 0)
    _float("optim.lr", o["lr"], 1e-12)
    _int("optim.warmup", o["warmup"], 0)
    _float("optim.clip", o["clip"], 1e-12)
    _float("optim.weight_decay", o["weight_decay"])
    _int("train.steps", tr["steps"])
    _int("train.batch_size", tr["batch_size"])
    if not isinstance(tr["eval_at"], (list, tuple)) or not tr["eval_at"]:
        raise ValueError(f"config key 'train.eval_at' must be a non-empty list of steps, got {tr['eval_at']!r}")
    for e in tr["eval_at"]:
        _int("train.eval_at", e)
        if e > tr["steps"]:
            raise ValueError(f"config key 'train.eval_at' has step {e} > train.steps={tr['steps']}")
    _float("kd.weight", kd["weight"])
    _int("kd.num_masks", kd["num_masks"])
    _int("kd.num_heads", kd["num_heads"])
    _float("kd.div_weight", kd["div_weight"])
    if kd["combine"] not in ("separate", "product"):
        raise ValueError(f"config key 'kd.combine' must be 'separate' or 'product', got {kd['combine']!r}")
    if t["dim"] % kd["num_heads"]:
        raise ValueError(f"config key 'kd.num_heads'={kd['num_heads']} must divide teacher.dim={t['dim']}")
    for v in _split(config["variants"], "variants"):
        if v not in VARIANTS:
            raise ValueError(f"config key 'variants' must list names from {VARIANTS}, got {v!r}")
    for seed in _split(config["seeds"], "seeds"):
        _int("seeds", int(seed), 0)
    return config


def _split(value, name):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"config key {name!r} must be a non-empty comma-separated string, got {value!r}")
    return [x.strip() for x in value.split(",")]


# --------------------------------------------------------------------------------------------------------
# TinyDETR split at the encoder memory


def encode(model: TinyDETR, images):
    """TinyDETR's forward up to the encoder memory (after ``enc_norm``): ``[B, (S/4)^2, dim]``."""
    B = images.shape[0]
    h = jax.nn.gelu(model.conv1(images))
    h = jax.nn.gelu(model.conv2(h))
    memory = model.proj(h.reshape(B, -1, h.shape[-1])) + model.pos[...]
    for block in model.encoder:
        memory = block(memory)
    return model.enc_norm(memory)


def decode(model: TinyDETR, memory):
    """The rest of TinyDETR's forward from the memory: ``(logits [L, B, Q, C+1], boxes [L, B, Q, 4])``."""
    B = memory.shape[0]
    x = jnp.broadcast_to(model.queries[...], (B,) + model.queries.shape[1:])
    ref = 0.0
    if model.query_mode == "tokens":
        x = x + memory
        g = model.image_size // 4
        c = (jnp.arange(g) + 0.5) / g
        cy, cx = jnp.meshgrid(c, c, indexing="ij")
        anchor = jnp.stack([cx.ravel(), cy.ravel(), jnp.full(g * g, 0.25), jnp.full(g * g, 0.25)], -1)
        ref = jnp.log(anchor) - jnp.log1p(-anchor)
    logits, boxes = [], []
    for layer in model.decoder:
        x = layer(x, memory)
        y = model.dec_norm(x)
        logits.append(model.class_head(y))
        boxes.append(jax.nn.sigmoid(model.box_out(jax.nn.relu(model.box_hidden(y))) + ref))
    return jnp.stack(logits), jnp.stack(boxes)


# --------------------------------------------------------------------------------------------------------
# models


def make_detr(m: dict, image_size: int, seed: int) -> TinyDETR:
    return TinyDETR(num_classes=3, image_size=image_size, dim=m["dim"], num_heads=m["heads"],
                    num_queries=m["queries"], num_encoder_layers=m["encoder_layers"],
                    num_decoder_layers=m["decoder_layers"], query_mode=m["query_mode"], rngs=nnx.Rngs(seed))


class Student(nnx.Module):
    """The student TinyDETR plus the KD weights (projector, fusion, mask generators) as ``nnx.Param``s."""

    def __init__(self, detr: TinyDETR, kd_params: dict):
        self.detr = detr
        self.kd_names = tuple(sorted(kd_params))
        for k in self.kd_names:
            setattr(self, "kd_" + k, nnx.Param(kd_params[k]))

    def kd_params(self) -> dict:
        return {k: getattr(self, "kd_" + k)[...] for k in self.kd_names}


_TX_CACHE: dict = {}


def make_optimizer(module, o: dict):
    key = (o["lr"], o["warmup"], o["clip"], o["weight_decay"])
    if key not in _TX_CACHE:  # one transformation object per setting, so nnx.jit does not recompile per seed
        sched = optax.join_schedules([optax.linear_schedule(0.0, o["lr"], o["warmup"]),
                                      optax.constant_schedule(o["lr"])], [o["warmup"]])
        _TX_CACHE[key] = optax.chain(optax.clip_by_global_norm(o["clip"]),
                                     optax.adamw(sched, weight_decay=o["weight_decay"]))
    return nnx.Optimizer(module, _TX_CACHE[key], wrt=nnx.Param)


def kd_term(variant: str, f_t, f_s, params, kd: dict):
    """The distillation term of a variant (0 for ``none``) and its logged parts."""
    if variant == "none":
        return jnp.zeros((), jnp.float32), {}
    if variant == "feature":
        loss = acam_kd.feature_kd_loss(f_t, f_s, params)
        return loss, {"kd": loss}
    loss, aux = acam_kd.acam_kd_loss(f_t, f_s, params, num_heads=kd["num_heads"], div_weight=kd["div_weight"],
                                     combine=kd["combine"])
    return loss, {"kd": loss, "distill": aux["distill"], "diversity": aux["diversity"]}


@partial(nnx.jit, static_argnames=("variant", "kd_items"))
def student_step(student, optimizer, teacher, images, tgt_boxes, tgt_classes, counts, variant, kd_items):
    kd = dict(kd_items)
    f_t = jax.lax.stop_gradient(encode(teacher, images))

    def loss_fn(student):
        memory = encode(student.detr, images)
        logits, boxes = decode(student.detr, memory)
        det, _ = D.detection_loss(logits, boxes, tgt_boxes, tgt_classes, counts, "detr")
        kd_loss, parts = kd_term(variant, f_t, memory, student.kd_params(), kd)
        return det + kd["weight"] * kd_loss, {"det": det, **parts}

    (loss, parts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(student)
    optimizer.update(student, grads)
    return loss, parts


# --------------------------------------------------------------------------------------------------------
# teacher (trained once, cached)


def teacher_path(cfg: dict, cache_dir: str = CACHE_DIR) -> str:
    key = json.dumps({"teacher": cfg["teacher"], "data": cfg["data"], "optim": cfg["optim"],
                      "batch_size": cfg["train"]["batch_size"]}, sort_keys=True)
    return os.path.join(cache_dir, f"teacher_{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz")


def _leaves(model):
    return jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))


def train_teacher(cfg: dict, pool, log=None) -> TinyDETR:
    t, tr = cfg["teacher"], cfg["train"]
    model = make_detr(t, cfg["data"]["size"], t["seed"])
    optimizer = make_optimizer(model, cfg["optim"])
    rng = np.random.default_rng([t["seed"], 1717])
    start = time.time()
    for step in range(1, t["steps"] + 1):
        idx = rng.integers(0, len(pool.images), tr["batch_size"])
        imgs, b, c, n = D.make_batch(pool, idx, rng, dense_o2o=False, mosaic_prob=0.0,
                                     max_targets=cfg["data"]["max_targets"])
        loss, _ = D.train_step(model, optimizer, jnp.asarray(imgs), jnp.asarray(b), jnp.asarray(c),
                               jnp.asarray(n), "detr")
        if log and (step % 100 == 0 or step == t["steps"]):
            log(f"teacher step={step} loss={float(loss):.3f} ({time.time() - start:.0f}s)")
    return model


def load_or_train_teacher(cfg: dict, pool, cache_dir: str | None = CACHE_DIR, log=None) -> TinyDETR:
    """The cached teacher if ``cache_dir`` holds one for this config, else a freshly trained one (then cached)."""
    path = teacher_path(cfg, cache_dir) if cache_dir else None
    if path and os.path.exists(path):
        model = make_detr(cfg["teacher"], cfg["data"]["size"], cfg["teacher"]["seed"])
        state = nnx.state(model, nnx.Param)
        stored = np.load(path)
        leaves = [stored[f"a{i}"] for i in range(len(stored.files))]
        treedef = jax.tree_util.tree_structure(state)
        if len(leaves) != treedef.num_leaves:
            raise ValueError(f"cached teacher {path} holds {len(leaves)} arrays, the model has {treedef.num_leaves}")
        nnx.update(model, jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves]))
        if log:
            log(f"teacher loaded from {path}")
        return model
    model = train_teacher(cfg, pool, log)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path, **{f"a{i}": np.asarray(x) for i, x in enumerate(_leaves(model))})
    return model


# --------------------------------------------------------------------------------------------------------
# runs


def run_student(cfg: dict, variant: str, seed: int, teacher: TinyDETR, pool, test, log=None) -> dict:
    """One student run; returns ``{"variant", "seed", "map": {step: mAP@0.5}, "loss", "kd", "seconds", "student"}``
    (``loss`` is the detection loss per step, ``kd`` the unweighted KD term, ``student`` the trained module)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    d, tr, kd = cfg["data"], cfg["train"], cfg["kd"]
    detr = make_detr(cfg["student"], d["size"], seed)           # same initial student for every variant
    params = {} if variant == "none" else acam_kd.init_params(
        jax.random.key(seed + 1000), cfg["student"]["dim"], cfg["teacher"]["dim"], num_masks=kd["num_masks"])
    if variant == "feature":
        params = {k: params[k] for k in ("align_w", "align_b")}
    student = Student(detr, params)
    optimizer = make_optimizer(student, cfg["optim"])
    rng = np.random.default_rng([seed, 17])
    kd_items = tuple(sorted(kd.items()))
    maps, losses, kds, start = {}, [], [], time.time()
    for step in range(1, tr["steps"] + 1):
        idx = rng.integers(0, len(pool.images), tr["batch_size"])
        imgs, b, c, n = D.make_batch(pool, idx, rng, dense_o2o=False, mosaic_prob=0.0, max_targets=d["max_targets"])
        loss, parts = student_step(student, optimizer, teacher, jnp.asarray(imgs), jnp.asarray(b), jnp.asarray(c),
                                   jnp.asarray(n), variant, kd_items)
        losses.append(float(parts["det"]))
        kds.append(float(parts.get("kd", 0.0)))
        if step in tr["eval_at"]:
            maps[step] = D.evaluate(student.detr, test, "detr")
            if log:
                log(f"{variant} seed={seed} step={step} det={losses[-1]:.3f} kd={kds[-1]:.4f} "
                    f"mAP50={maps[step]:.3f} ({time.time() - start:.0f}s)")
    return {"variant": variant, "seed": seed, "map": maps, "loss": losses, "kd": kds, "seconds": time.time() - start,
            "student": student}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--variants", default=None, help="comma list overriding the config's variants")
    p.add_argument("--seeds", default=None, help="comma list overriding the config's seeds")
    p.add_argument("--steps", type=int, default=None, help="override train.steps (and clip eval_at)")
    p.add_argument("--teacher-steps", type=int, default=None, help="override teacher.steps")
    p.add_argument("--cache-dir", default=CACHE_DIR, help="teacher cache folder ('' = no cache)")
    p.add_argument("--out", default=None, help="JSONL file for per-run results")
    args = p.parse_args(argv)
    cfg = D.load_config(args.config)
    if args.steps is not None:
        cfg["train"]["steps"] = args.steps
        cfg["train"]["eval_at"] = [s for s in cfg["train"]["eval_at"] if s <= args.steps] or [args.steps]
    if args.teacher_steps is not None:
        cfg["teacher"]["steps"] = args.teacher_steps
    if args.variants:
        cfg["variants"] = args.variants
    if args.seeds:
        cfg["seeds"] = args.seeds
    check_config(cfg)
    variants = _split(cfg["variants"], "variants")
    seeds = [int(s) for s in _split(cfg["seeds"], "seeds")]
    d = cfg["data"]
    pool = shapes(d["pool"], d["data_seed"], size=d["size"], max_objects=3)
    test = shapes(d["test_images"], d["test_seed"], size=d["size"], max_objects=3)
    log = lambda s: print(s, flush=True)  # noqa: E731
    teacher = load_or_train_teacher(cfg, pool, args.cache_dir or None, log)
    teacher_map = D.evaluate(teacher, test, "detr")
    log(f"teacher mAP50={teacher_map:.3f}")
    results = []
    for seed in seeds:
        for v in variants:
            r = run_student(cfg, v, seed, teacher, pool, test, log)
            results.append(r)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({"variant": v, "seed": seed, "map": r["map"], "seconds": r["seconds"],
                                        "teacher_map": teacher_map}) + "\n")
    print("\nvariant   " + "  ".join(f"step {s:>4}" for s in cfg["train"]["eval_at"]))
    for v in variants:
        rs = [r for r in results if r["variant"] == v]
        cells = []
        for s in cfg["train"]["eval_at"]:
            vals = np.array([r["map"][s] for r in rs])
            sd = vals.std(ddof=1) if len(vals) > 1 else 0.0
            cells.append(f"{vals.mean():.3f}±{sd:.3f}")
        print(f"{v:<9} " + "  ".join(cells) + f"   (n={len(rs)} seeds, teacher {teacher_map:.3f})")
    return {"teacher_map": teacher_map, "results": results}


if __name__ == "__main__":
    main(sys.argv[1:])
