"""P20 LinFusion and P63 CLEAR: distilling the trained tiny DiT's softmax attention into a linear / local student.

Subject: the trained ``TinyDiT`` of ``runs/dit_digits`` (16 image tokens: 4x4 patches of 4 on 16x16 digits,
dim 64, 4 blocks, 4 heads). A *student* is the teacher with every block's attention replaced:

* ``"linfusion"`` (P20): :class:`LinFusionDiTAttention` — ``q = W_q(x + f_q(x))``, ``k = W_k(x + f_k(x))``,
  ``v = W_v x`` with ``f = Linear -> LayerNorm -> LeakyReLU -> Linear`` (``jattn.methods.linear.linfusion.
  FeatureMLP``, hidden = dim), then the normalised non-causal linear attention
  ``generalized_linear_attention`` (elu+1, eps 1e-4) and ``W_out``. ``W_q, W_k, W_v, W_out`` (with their
  biases) are the teacher's; only ``f_q, f_k`` train (the spec: "only new attention params trained").
* ``"clear"`` (P63): ``jattn.nn.Attention(method="clear", grid=(4, 4), radius=r)`` — softmax over the image
  keys with ``dy^2 + dx^2 < r^2`` (strict). The teacher's q/k/v/o are copied and they are what trains (the
  spec: "only attention q, k, v, o projections trainable"; there is no pooled branch, so no new parameter).

Everything else (patch/time/class embeddings, adaLN, MLPs, final layer) is the teacher's and frozen.

Distillation loss on noised digits at uniform random timesteps (``DigitDiffusionTask`` batches: train split,
class dropout 0.1 to the null label), student and teacher each run their own forward
(:func:`dit_forward` returns each block's attention-sublayer output)::

    L = noise_weight * mean((eps_s - noise)^2)          # L_noise (P20) / L_flow-matching -> eps here (P63)
      + output_weight * mean((eps_s - eps_t)^2)         # L_KD on the final prediction
      + layer_weight * R_l mean((a_s^l - a_t^l)^2)      # attention outputs, R = sum (P20) or mean (P63)

Defaults per spec: weights 1, 0.5, 0.5; LinFusion sums over layers, CLEAR averages (CLEAR distils every
4th single-stream FLUX block; the tiny DiT has 4 blocks and we distil all of them).

Deliberate deviations: AdamW lr 1e-3 (spec: 1e-4 LinFusion, Prodigy lr 1 CLEAR) because the budget is a few
hundred CPU steps; float32; ``f_q, f_k``'s last Linear is zero-initialised so the un-distilled LinFusion
student is exactly plain elu+1 linear attention with the teacher's projections (the honest "replacement
without training" baseline). CLEAR's window: on a 4x4 token grid a useful disc must be small; ``radius=1.5``
(strict ``< r^2``) is the 3x3 neighbourhood — 9 keys for the 4 interior queries, 4 for corners, 6.25 of 16
on average (39 %). ``radius=1`` would be self-attention only; ``radius >= 3.7`` is full attention.

Run: ``python -m train.dit_distill`` (see ``docs/dit_distill.md`` for the measured table).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jattn.methods.linear.linfusion import FeatureMLP, generalized_linear_attention
from jattn.nn.attention import Attention
from jattn.nn.dit import TinyDiT, modulate

STUDENTS = ("linfusion", "clear")
LAYER_REDUCE = ("sum", "mean")
SPEC_WEIGHTS = {  # (noise_weight, output_weight, layer_weight, layer_reduce) per the two specs
    "linfusion": (1.0, 0.5, 0.5, "sum"),
    "clear": (1.0, 0.5, 0.5, "mean"),
}


# --- students ------------------------------------------------------------------------------------------

class LinFusionDiTAttention(nnx.Module):
    """P20's ``GeneralizedLinearAttention`` in the DiT's attention slot: ``attn`` is a ``jattn.nn.Attention``
    (``method="linfusion"``) holding the teacher's q/k/v/o (with biases); ``phi_q, phi_k`` are the new
    feature MLPs added to the input of ``W_q`` and ``W_k``. Called like an ``Attention``: ``x [B, N, dim]``."""

    def __init__(self, attn: Attention, *, hidden: int | None = None, zero_init: bool = True, rngs: nnx.Rngs):
        if not isinstance(attn, Attention) or attn.method != "linfusion":
            raise TypeError(f"attn must be a jattn.nn.Attention with method='linfusion', got "
                            f"{type(attn).__name__}{'' if not isinstance(attn, Attention) else ' ' + attn.method}")
        self.attn = attn
        self.method = "linfusion"
        self.phi_q = FeatureMLP(attn.dim, hidden or attn.dim, rngs=rngs)
        self.phi_k = FeatureMLP(attn.dim, hidden or attn.dim, rngs=rngs)
        if zero_init:
            for phi in (self.phi_q, self.phi_k):
                phi.fc2.kernel[...] = jnp.zeros_like(phi.fc2.kernel[...])
                phi.fc2.bias[...] = jnp.zeros_like(phi.fc2.bias[...])

    def __call__(self, x, *, return_probs: bool = False, **_):
        if return_probs:
            raise ValueError("return_probs must be False: LinFusion forms no attention probabilities")
        a = self.attn
        B, N, _ = x.shape
        heads = (B, N, a.num_heads, a.head_dim)
        q = a.query(x + self.phi_q(x)).reshape(heads)
        k = a.key(x + self.phi_k(x)).reshape(heads)
        v = a.value(x).reshape(heads)
        out = generalized_linear_attention(q, k, v, **a.method_config)
        return a.finish(x, out)


def _copy_projections(src: Attention, dst: Attention) -> None:
    for name in ("query", "key", "value", "out"):
        nnx.update(getattr(dst, name), jax.tree.map(jnp.copy, nnx.state(getattr(src, name))))


def build_student(teacher: TinyDiT, method: str, *, radius: float = 1.5, seed: int = 0) -> TinyDiT:
    """A deep copy of ``teacher`` whose every ``blocks[i].attn`` is the ``method`` student (module docstring),
    starting from the teacher's q/k/v/o weights (bit-identical copies). The teacher is not modified."""
    if not isinstance(teacher, TinyDiT):
        raise TypeError(f"teacher must be a jattn.nn.dit.TinyDiT, got {type(teacher).__name__}")
    if method not in STUDENTS:
        raise ValueError(f"method must be one of {STUDENTS}, got {method!r}")
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0 or not math.isfinite(radius):
        raise ValueError(f"radius must be a finite number > 0 (circular window on the token grid), got {radius!r}")
    student = nnx.clone(teacher)
    rngs = nnx.Rngs(seed)
    for block in student.blocks:
        t = block.attn
        if method == "linfusion":
            core = Attention(t.dim, t.num_heads, method="linfusion", causal=False, use_bias=True, rngs=rngs)
            _copy_projections(t, core)
            block.attn = LinFusionDiTAttention(core, rngs=rngs)
        else:
            new = Attention(t.dim, t.num_heads, method="clear", causal=False, use_bias=True, rngs=rngs,
                            grid=(teacher.grid, teacher.grid), radius=radius)
            _copy_projections(t, new)
            block.attn = new
    return student


def trainable_filter(method: str):
    """The parameters each spec trains: LinFusion's new ``phi_q, phi_k``; CLEAR's attention projections."""
    if method == "linfusion":
        return nnx.All(nnx.Param, nnx.Any(nnx.PathContains("phi_q"), nnx.PathContains("phi_k")))
    if method == "clear":
        return nnx.All(nnx.Param, nnx.PathContains("attn"))
    raise ValueError(f"method must be one of {STUDENTS}, got {method!r}")


# --- forward with the attention outputs -----------------------------------------------------------------

def dit_forward(model: TinyDiT, x, t, y):
    """``(eps, attn_outs)``: ``model(x, t, y)`` and each block's attention-sublayer output ``[B, N, dim]``
    (before the adaLN gate), the quantity both specs distil. Same arithmetic as ``TinyDiT.__call__``."""
    c = model.condition(t, y)
    h = model.patch_embed(model.patchify(x)) + model.pos_embed[...]
    outs = []
    for block in model.blocks:
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(block.adaLN(c), 6, axis=-1)
        a = block.attn(modulate(block.norm1(h), shift1, scale1))
        outs.append(a)
        h = h + gate1[:, None, :] * a
        h = h + gate2[:, None, :] * block.mlp(modulate(block.norm2(h), shift2, scale2))
    shift, scale = jnp.split(model.final_adaLN(c), 2, axis=-1)
    eps = model.unpatchify(model.final_linear(modulate(model.final_norm(h), shift, scale)))
    return eps, outs


# --- the loss (pure) ------------------------------------------------------------------------------------

def _check_weight(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


def distill_loss(eps_s, eps_t, noise, attn_s, attn_t, *, noise_weight: float = 1.0, output_weight: float = 0.5,
                 layer_weight: float = 0.5, layer_reduce: str = "sum"):
    """``(loss, metrics)``: ``noise_weight * MSE(eps_s, noise) + output_weight * MSE(eps_s, eps_t)
    + layer_weight * reduce_l MSE(attn_s[l], attn_t[l])`` (``layer_reduce`` "sum" (P20) or "mean" (P63)).
    Teacher quantities are taken as constants (``stop_gradient``)."""
    noise_weight = _check_weight("noise_weight", noise_weight)
    output_weight = _check_weight("output_weight", output_weight)
    layer_weight = _check_weight("layer_weight", layer_weight)
    if noise_weight + output_weight + layer_weight == 0:
        raise ValueError("noise_weight, output_weight and layer_weight must not all be 0")
    if layer_reduce not in LAYER_REDUCE:
        raise ValueError(f"layer_reduce must be one of {LAYER_REDUCE}, got {layer_reduce!r}")
    if eps_s.shape != eps_t.shape or eps_s.shape != noise.shape:
        raise ValueError(f"eps_s, eps_t and noise must have one shape, got {eps_s.shape}, {eps_t.shape}, {noise.shape}")
    if len(attn_s) != len(attn_t) or not attn_s:
        raise ValueError(f"attn_s and attn_t must be equal-length non-empty lists, got {len(attn_s)} and {len(attn_t)}")
    for i, (a, b) in enumerate(zip(attn_s, attn_t)):
        if a.shape != b.shape:
            raise ValueError(f"attn_s[{i}] and attn_t[{i}] must have one shape, got {a.shape} and {b.shape}")
    sg = jax.lax.stop_gradient
    mse = lambda a, b: jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))
    l_noise = mse(eps_s, noise)
    l_kd = mse(eps_s, sg(eps_t))
    per_layer = jnp.stack([mse(a, sg(b)) for a, b in zip(attn_s, attn_t)])
    l_layers = jnp.sum(per_layer) if layer_reduce == "sum" else jnp.mean(per_layer)
    loss = noise_weight * l_noise + output_weight * l_kd + layer_weight * l_layers
    return loss, {"noise_mse": l_noise, "eps_kd_mse": l_kd, "attn_mse": l_layers}


# --- training -------------------------------------------------------------------------------------------

def distill(teacher: TinyDiT, student: TinyDiT, method: str, task, *, steps: int = 300, batch_size: int = 64,
            lr: float = 1e-3, seed: int = 0, log_every: int = 50, quiet: bool = True, **loss_kwargs):
    """Trains ``student``'s :func:`trainable_filter` parameters in place for ``steps`` AdamW steps on
    ``task.batch(seed, step, batch_size)`` (a ``train.diffusion.DigitDiffusionTask``); returns the log
    (a list of dicts). ``loss_kwargs`` override the spec's weights (``SPEC_WEIGHTS[method]``)."""
    if method not in STUDENTS:
        raise ValueError(f"method must be one of {STUDENTS}, got {method!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a float > 0, got {lr!r}")
    nw, ow, lw, red = SPEC_WEIGHTS[method]
    weights = {"noise_weight": nw, "output_weight": ow, "layer_weight": lw, "layer_reduce": red, **loss_kwargs}
    alpha_bars = jnp.asarray(task.alpha_bars, jnp.float32)
    t_graph, t_state = nnx.split(teacher)
    graph, train_state, frozen = nnx.split(student, trainable_filter(method), ...)
    opt = optax.adamw(lr, weight_decay=0.0)
    opt_state = opt.init(train_state)

    def loss_fn(train_state, frozen, t_state, batch):
        from train.diffusion import q_sample
        s_model = nnx.merge(graph, train_state, frozen)
        t_model = nnx.merge(t_graph, t_state)
        x_t = q_sample(alpha_bars, batch["x0"], batch["t"], batch["noise"])
        eps_t, attn_t = dit_forward(t_model, x_t, batch["t"], batch["labels"])
        eps_s, attn_s = dit_forward(s_model, x_t, batch["t"], batch["labels"])
        return distill_loss(eps_s, eps_t, batch["noise"], attn_s, attn_t, **weights)

    @jax.jit
    def step(train_state, opt_state, frozen, t_state, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_state, frozen, t_state, batch)
        updates, opt_state = opt.update(grads, opt_state, train_state)
        return optax.apply_updates(train_state, updates), opt_state, loss, metrics

    log = []
    for i in range(steps):
        batch = {k: jnp.asarray(v) for k, v in task.batch(seed, i, batch_size).items()}
        train_state, opt_state, loss, metrics = step(train_state, opt_state, frozen, t_state, batch)
        if i == 0 or (i + 1) % log_every == 0 or i == steps - 1:
            row = {"step": i + 1, "loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
            log.append(row)
            if not quiet:
                print(json.dumps(row), flush=True)
    nnx.update(student, train_state)
    return log


def eval_loss(teacher, student, method, task, *, batches: int = 4, batch_size: int = 128, seed: int = 1):
    """Held-out (test split) distillation metrics of ``student``, averaged over ``batches`` batches."""
    alpha_bars = jnp.asarray(task.alpha_bars, jnp.float32)
    nw, ow, lw, red = SPEC_WEIGHTS[method]
    from train.diffusion import q_sample

    @nnx.jit
    def one(teacher, student, batch):
        x_t = q_sample(alpha_bars, batch["x0"], batch["t"], batch["noise"])
        eps_t, attn_t = dit_forward(teacher, x_t, batch["t"], batch["labels"])
        eps_s, attn_s = dit_forward(student, x_t, batch["t"], batch["labels"])
        _, m = distill_loss(eps_s, eps_t, batch["noise"], attn_s, attn_t, noise_weight=nw, output_weight=ow,
                            layer_weight=lw, layer_reduce=red)
        return {**m, "teacher_noise_mse": jnp.mean(jnp.square(eps_t - batch["noise"]))}

    rows = [one(teacher, student, {k: jnp.asarray(v) for k, v in task.batch(seed, i, batch_size, "eval").items()})
            for i in range(batches)]
    return {k: float(np.mean([float(r[k]) for r in rows])) for k in rows[0]}


# --- FLOPs ----------------------------------------------------------------------------------------------

def clear_mean_keys(grid: int, radius: float) -> float:
    """Mean number of image keys per query of CLEAR's disc (``dy^2 + dx^2 < r^2``) on a ``grid x grid`` image."""
    ys, xs = np.divmod(np.arange(grid * grid), grid)
    d2 = (ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2
    return float(np.mean(np.sum(d2 < radius * radius, axis=1)))


def attention_flops(method: str, n: int, dim: int, heads: int, *, radius: float = 1.5) -> dict:
    """Per-layer, per-image FLOPs (2 per multiply-add) of the attention core and of the whole sublayer
    (core + q/k/v/o projections + LinFusion's two feature MLPs) at ``n`` tokens on a square grid."""
    d = dim // heads
    proj = 4 * 2 * n * dim * dim
    if method == "softmax":
        core = 2 * 2 * n * n * dim                       # QK^T and PV
    elif method == "clear":
        grid = int(round(math.sqrt(n)))
        core = 2 * 2 * n * clear_mean_keys(grid, radius) * dim
    elif method == "linfusion":
        core = 2 * 2 * n * heads * d * (d + 1)          # sum phi(k)[v,1]^T, then phi(q) . that
        proj += 2 * 2 * (2 * n * dim * dim)              # phi_q, phi_k: two Linear(dim, dim) each
    else:
        raise ValueError(f"method must be 'softmax', 'clear' or 'linfusion', got {method!r}")
    return {"core": float(core), "total": float(core + proj)}


# --- the experiment -------------------------------------------------------------------------------------

def sample_accuracy(model, schedule, classifier, *, seeds, per_class: int, guidance: float, steps: int):
    from train.diffusion import sample
    from train.digit_classifier import classify_samples
    labels = np.repeat(np.arange(model.num_classes), per_class).astype(np.int32)
    accs, first = [], None
    for s in seeds:
        images = sample(model, schedule, labels, seed=s, guidance=guidance, sampler="ddim", steps=steps)
        first = images if first is None else first
        accs.append(float(np.mean(classify_samples(images, labels, classifier))))
    return accs, first


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="distil the tiny DiT's attention into LinFusion / CLEAR")
    parser.add_argument("--subject", default="runs/dit_digits")
    parser.add_argument("--methods", nargs="+", default=list(STUDENTS), choices=STUDENTS)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--radius", type=float, default=1.5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sample seeds")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--sample-steps", type=int, default=100)
    parser.add_argument("--grid", default=None, help="write a teacher/students sample grid PNG here")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    from train.diffusion import DigitDiffusionTask, load_dit, save_grid
    from train.digit_classifier import default_classifier

    subject = load_dit(args.subject)
    teacher, schedule = subject.model, subject.schedule
    classifier = default_classifier()
    task = DigitDiffusionTask(schedule, size=teacher.image_size)
    kw = dict(seeds=args.seeds, per_class=args.per_class, guidance=args.guidance, steps=args.sample_steps)
    report = {"args": vars(args), "tokens": teacher.grid ** 2, "rows": []}
    began = time.perf_counter()
    accs, img = sample_accuracy(teacher, schedule, classifier.model, **kw)
    report["rows"].append({"model": "teacher (softmax)", "accuracy": accs})
    grids = [img]
    print(json.dumps(report["rows"][-1]), flush=True)
    for method in args.methods:
        student = build_student(teacher, method, radius=args.radius)
        before = eval_loss(teacher, student, method, task)
        accs, _ = sample_accuracy(student, schedule, classifier.model, **kw)
        report["rows"].append({"model": f"{method} un-distilled", "accuracy": accs, "eval": before})
        print(json.dumps(report["rows"][-1]), flush=True)
        t0 = time.perf_counter()
        log = distill(teacher, student, method, task, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      quiet=False)
        seconds = time.perf_counter() - t0
        after = eval_loss(teacher, student, method, task)
        accs, img = sample_accuracy(student, schedule, classifier.model, **kw)
        grids.append(img)
        report["rows"].append({"model": f"{method} distilled", "accuracy": accs, "eval": after,
                               "train_seconds": round(seconds, 1), "log_first": log[0], "log_last": log[-1]})
        print(json.dumps(report["rows"][-1]), flush=True)
    n, dim, heads = teacher.grid ** 2, teacher.dim, teacher.blocks[0].attn.num_heads
    report["flops"] = {str(tokens): {m: attention_flops(m, tokens, dim, heads, radius=args.radius)
                                     for m in ("softmax", "clear", "linfusion")} for tokens in (n, 64 * 64)}
    report["clear_mean_keys"] = clear_mean_keys(teacher.grid, args.radius)
    report["seconds"] = round(time.perf_counter() - began, 1)
    for row in report["rows"]:
        row["mean"], row["std"] = float(np.mean(row["accuracy"])), float(np.std(row["accuracy"]))
    if args.grid:
        per = args.per_class
        pick = [g.reshape(teacher.num_classes, per, *g.shape[1:])[:, :4] for g in grids]
        stacked = np.concatenate(pick, axis=1).reshape(-1, *grids[0].shape[1:])
        save_grid(stacked, args.grid, nrow=teacher.num_classes)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps({k: report[k] for k in ("flops", "clear_mean_keys", "seconds")}))
    for row in report["rows"]:
        print(f"{row['model']:>24s}: {100 * row['mean']:.1f} +- {100 * row['std']:.1f} %  {row['accuracy']}")
    return report


if __name__ == "__main__":
    main()
