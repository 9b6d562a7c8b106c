"""Optimizer and learning-rate schedules: AdamW with linear warmup, then cosine or WSD."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "wsd", "constant")


def _check_fraction(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")
    return float(value)


def make_schedule(kind: str, *, peak_lr: float, total_steps: int, warmup_steps: int = 0,
                  min_lr_ratio: float = 0.1, decay_fraction: float = 0.2):
    """``cosine``: warmup to ``peak_lr`` then cosine to ``min_lr_ratio * peak_lr`` at ``total_steps``.
    ``wsd`` (warmup-stable-decay): warmup, flat at ``peak_lr``, then linear decay to ``min_lr_ratio * peak_lr``
    over the last ``decay_fraction`` of training. ``constant``: warmup then flat."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if not isinstance(peak_lr, (int, float)) or isinstance(peak_lr, bool) or not peak_lr > 0:
        raise ValueError(f"lr must be a float > 0, got {peak_lr!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {total_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be an int in [0, steps={total_steps}), got {warmup_steps!r}")
    min_lr = peak_lr * _check_fraction("min_lr_ratio", min_lr_ratio)
    warmup = optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1))
    if kind == "cosine":
        after = optax.cosine_decay_schedule(peak_lr, total_steps - warmup_steps, alpha=min_lr / peak_lr)
        return optax.join_schedules([warmup, after], [warmup_steps]) if warmup_steps else after
    if kind == "constant":
        after = optax.constant_schedule(peak_lr)
        return optax.join_schedules([warmup, after], [warmup_steps]) if warmup_steps else after
    decay_steps = max(1, int(round(_check_fraction("decay_fraction", decay_fraction) * total_steps)))
    stable_end = max(warmup_steps, total_steps - decay_steps)
    stable = optax.constant_schedule(peak_lr)
    decay = optax.linear_schedule(peak_lr, min_lr, total_steps - stable_end)
    parts, bounds = ([warmup, stable, decay], [warmup_steps, stable_end]) if warmup_steps else ([stable, decay], [stable_end])
    return optax.join_schedules(parts, bounds)


def decay_mask(params):
    """Weight decay on matrices only (not norms' gains, biases or scalars)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(*, lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
                   weight_decay: float = 0.1, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   clip_norm: float | None = 1.0, min_lr_ratio: float = 0.1, decay_fraction: float = 0.2):
    """``clip_by_global_norm`` (if ``clip_norm``) then AdamW on the schedule. Returns ``(optimizer, schedule)``."""
    lr_schedule = make_schedule(schedule, peak_lr=lr, total_steps=total_steps, warmup_steps=warmup_steps,
                                min_lr_ratio=min_lr_ratio, decay_fraction=decay_fraction)
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a float >= 0, got {weight_decay!r}")
    adamw = optax.adamw(lr_schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if clip_norm is None:
        return adamw, lr_schedule
    if not isinstance(clip_norm, (int, float)) or clip_norm <= 0:
        raise ValueError(f"clip_norm must be a float > 0 or None, got {clip_norm!r}")
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw), lr_schedule
