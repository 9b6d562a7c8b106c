"""The training loop: a jit-compiled AdamW step with gradient accumulation, eval, JSONL logs, orbax resume.

The loop is functional: the NNX model is split once into ``graphdef`` and its ``Param`` state, the step is
a pure function of ``(params, opt_state, batch)`` compiled ahead of time (which also yields its memory
analysis), and batches are pure functions of ``(seed, step)``. So a run stopped at any point and resumed
from its latest checkpoint repeats exactly the computation of an uninterrupted run.

Resuming (``train.resume``, the default, with checkpoints in ``out_dir``) prints ``resumed from step N``
to stderr. The learning-rate schedule keeps the horizon it was checkpointed with: raising ``train.steps``
to continue a finished run trains the extra steps at the schedule's final rate and says so; set
``optim.schedule_steps`` to stretch the schedule instead. A checkpoint of another model shape raises
:class:`~train.checkpoint.CheckpointMismatchError` naming a differing array and the two ways out.
``train.resume=False`` starts afresh and deletes the checkpoints already in ``out_dir``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train.checkpoint import CheckpointMismatchError, Checkpointer
from train.optim import make_optimizer


class TrainState(NamedTuple):
    """What a checkpoint holds (the names become the leaf paths in its metadata)."""
    params: Any
    opt_state: Any


def notice(message: str) -> None:
    """One line to stderr (stdout stays for results, e.g. the CLI's JSON summary)."""
    print(message, file=sys.stderr, flush=True)


def schedule_horizon(steps: int, ocfg: dict, stored: int | None) -> tuple[int, str | None]:
    """The number of steps the learning-rate schedule spans, and a notice when it is not ``steps``.

    ``optim.schedule_steps`` wins when set. Otherwise a resumed run keeps the horizon ``stored`` with its
    checkpoint (so a longer ``train.steps`` does not silently re-stretch the schedule), and a new run
    (``stored`` None) spans ``train.steps``."""
    asked = ocfg.get("schedule_steps")
    if asked is not None:
        if isinstance(asked, bool) or not isinstance(asked, int) or asked < 1:
            raise ValueError(f"optim.schedule_steps must be None or an int >= 1, got {asked!r}")
        if stored is not None and asked != stored:
            return asked, (f"optim.schedule_steps={asked}: the learning-rate schedule is re-stretched from the "
                           f"{stored} steps it spanned when checkpointed to {asked} steps")
        return asked, None
    if stored is None or stored == steps:
        return steps, None
    if ocfg.get("schedule", "cosine") == "constant":
        return stored, None
    past = " (steps past it run at the schedule's final learning rate)" if steps > stored else ""
    return stored, (f"train.steps={steps} differs from the {stored}-step learning-rate schedule stored with the "
                    f"checkpoint: keeping its horizon at {stored} steps{past}; set optim.schedule_steps={steps} "
                    f"to re-stretch it")


def make_loss_of(graphdef, rest, loss_fn):
    def loss_of(params, batch):
        return loss_fn(nnx.merge(graphdef, params, rest), batch)
    return loss_of


def make_train_step(loss_of: Callable, optimizer, grad_accum: int = 1):
    """``step(params, opt_state, batch) -> (params, opt_state, metrics)``. With ``grad_accum > 1`` the batch
    is cut into that many equal micro-batches whose gradients and metrics are averaged (exactly the
    full-batch gradient when every micro-batch scores the same number of tokens)."""
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum must be an int >= 1, got {grad_accum!r}")
    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def step(params, opt_state, batch):
        if grad_accum == 1:
            (loss, metrics), grads = grad_fn(params, batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

            def accumulate(total, micro_batch):
                (loss, metrics), grads = grad_fn(params, micro_batch)
                return jax.tree.map(jnp.add, total, grads), (loss, metrics)

            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, (losses, metrics) = jax.lax.scan(accumulate, zeros, micro)
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            loss, metrics = jnp.mean(losses), jax.tree.map(jnp.mean, metrics)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}

    return step


class JsonlLogger:
    """Appends one JSON object per line; on resume, drops records past the restored step."""

    def __init__(self, path: str | None, *, resume_step: int | None = None):
        self.path = path
        if path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(kept)

    def log(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclasses.dataclass
class TrainResult:
    graphdef: Any
    params: Any
    rest: Any
    opt_state: Any
    step: int
    history: list[dict]
    tokens_per_second: float | None
    step_memory_bytes: int | None
    seconds: float

    def model(self):
        return nnx.merge(self.graphdef, self.params, self.rest)


def _floats(metrics) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def compiled_memory_bytes(compiled) -> int | None:
    """Bytes the compiled step needs (arguments + outputs + temporaries - aliased), from XLA's analysis."""
    try:
        analysis = compiled.memory_analysis()
        return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                   + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    except Exception:  # some backends have no memory analysis
        return None


def train(config: dict, model, task, *, on_step: Callable[[int, dict], None] | None = None,
          quiet: bool = False) -> TrainResult:
    """Trains ``model`` on ``task`` for ``config['train']['steps']`` steps (see ``train.config.DEFAULTS``).

    With ``train.out_dir`` set, metrics go to ``out_dir/metrics.jsonl`` and, with
    ``train.checkpoint_every > 0``, checkpoints to ``out_dir/checkpoints`` (also at the last step); a
    rerun with ``train.resume`` continues from the latest one. ``on_step(step, metrics)`` runs after each
    step (tests use it to kill a run)."""
    tcfg, ocfg, seed = config["train"], dict(config["optim"]), int(config["seed"])
    steps, batch_size, grad_accum = int(tcfg["steps"]), int(tcfg["batch_size"]), int(tcfg["grad_accum"])
    if batch_size % grad_accum:
        raise ValueError(f"train.batch_size={batch_size} must be a multiple of train.grad_accum={grad_accum}")
    out_dir = tcfg.get("out_dir")
    checkpointer = None
    if out_dir and tcfg.get("checkpoint_every", 0):
        checkpointer = Checkpointer(os.path.join(out_dir, "checkpoints"))
    try:  # the checkpointer's background threads are shut down whatever happens
        return _train(config, model, task, tcfg, ocfg, seed, steps, batch_size, grad_accum, out_dir,
                      checkpointer, on_step, quiet)
    finally:
        if checkpointer is not None:
            checkpointer.close()


def _train(config, model, task, tcfg, ocfg, seed, steps, batch_size, grad_accum, out_dir, checkpointer,
           on_step, quiet) -> TrainResult:
    meta = {}
    if checkpointer is not None and checkpointer.latest_step() is not None:
        if tcfg.get("resume", True):
            meta = checkpointer.read_meta()
        else:
            notice(f"train.resume=False: deleting the checkpoints at steps {checkpointer.all_steps()} in "
                   f"{checkpointer.directory}")
            checkpointer.delete_all()
    horizon, message = schedule_horizon(steps, ocfg, meta.get("schedule_steps"))
    ocfg.pop("schedule_steps", None)
    optimizer, schedule = make_optimizer(total_steps=horizon, **ocfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = optimizer.init(params)
    loss_of = make_loss_of(graphdef, rest, task.loss)

    start = 0
    if meta:
        try:
            (params, opt_state), _ = checkpointer.restore(TrainState(params, opt_state))
        except CheckpointMismatchError as err:
            raise CheckpointMismatchError(
                f"cannot resume from train.out_dir={out_dir!r}: {err}\nTwo ways out: train.resume=False starts this "
                f"run afresh in that directory (deleting its checkpoints), or a new train.out_dir keeps them.") from None
        start = int(meta["step"])
        notice(f"resumed from step {start} ({checkpointer.directory})")
        if start >= steps:
            notice(f"train.steps={steps} is already reached: nothing to train")
    if message:
        notice(message)
    logger = JsonlLogger(os.path.join(out_dir, "metrics.jsonl") if out_dir else None,
                         resume_step=start if start else None)

    example = task.batch(seed, start, batch_size)
    step_fn = jax.jit(make_train_step(loss_of, optimizer, grad_accum), donate_argnums=(0, 1))
    compiled = step_fn.lower(params, opt_state, example).compile()
    memory = compiled_memory_bytes(compiled)
    eval_fn = jax.jit(loss_of)
    tokens_per_step = batch_size * (task.seq_len or 1)

    progress = None
    if tcfg.get("progress", True) and not quiet:
        from tqdm.auto import tqdm
        progress = tqdm(total=steps, initial=start, desc=config.get("name", "train"), leave=False)
    history = []
    began = ended = time.perf_counter()
    first_done = None  # timing starts after the first step, which may include one-time work
    for step in range(start, steps):
        batch = task.batch(seed, step, batch_size)
        params, opt_state, metrics = compiled(params, opt_state, batch)
        done = step + 1
        last = done == steps
        if first_done is None:
            jax.block_until_ready(params)
            first_done = time.perf_counter()
        if last:
            jax.block_until_ready(params)
            ended = time.perf_counter()
        if done % tcfg.get("log_every", 10) == 0 or last or on_step is not None:
            metrics = _floats(metrics)
            record = {"step": done, "split": "train", "lr": float(schedule(step)), **metrics}
            history.append(record)
            logger.log(record)
            if progress is not None:
                progress.set_postfix(loss=f"{metrics['loss']:.4f}")
        eval_every, eval_batches = tcfg.get("eval_every", 0), tcfg.get("eval_batches", 2)
        if eval_batches and ((eval_every and done % eval_every == 0) or last):
            record = {"step": done, "split": "eval",
                      **evaluate(eval_fn, params, task, seed, batch_size, eval_batches)}
            history.append(record)
            logger.log(record)
        if checkpointer is not None and (done % tcfg["checkpoint_every"] == 0 or last):
            checkpointer.save(done, TrainState(params, opt_state), {"schedule_steps": horizon})
        if progress is not None:
            progress.update(1)
        if on_step is not None:
            on_step(done, metrics)
    if progress is not None:
        progress.close()
    timed_steps = steps - start - 1
    rate = tokens_per_step * timed_steps / (ended - first_done) if timed_steps > 0 else None
    seconds = time.perf_counter() - began
    return TrainResult(graphdef, params, rest, opt_state, max(steps, start), history, rate, memory, seconds)


def evaluate(eval_fn, params, task, seed: int, batch_size: int, num_batches: int) -> dict:
    """Mean loss and metrics over ``num_batches`` fixed held-out batches (the same at every eval)."""
    totals: dict[str, float] = {}
    for index in range(num_batches):
        loss, metrics = eval_fn(params, task.batch(seed, index, batch_size, split="eval"))
        for key, value in {"loss": loss, **metrics}.items():
            totals[key] = totals.get(key, 0.0) + float(value) / num_batches
    return totals
