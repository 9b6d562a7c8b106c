"""Builds the task (data + loss) and the model that a config names."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jattn.nn.icl import OneLayerMHSoftmax
from jattn.nn.models import DecoderLM
from train.data import ByteCorpus
from train.tasks import MQAR, Copying, ICLRegression, NeedleInHaystack


def lm_loss(model, batch):
    """Masked next-token cross entropy and accuracy over ``loss_mask``."""
    logits = model(batch["inputs"])
    mask = batch["loss_mask"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    count = jnp.maximum(jnp.sum(mask), 1.0)
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    return jnp.sum(ce * mask) / count, {"accuracy": jnp.sum(correct * mask) / count}


def regression_loss(model, batch):
    prediction = model(batch["tokens"])
    return jnp.mean(jnp.square(prediction - batch["target"])), {}


@dataclasses.dataclass
class Task:
    data: Any
    loss: Callable
    vocab_size: int | None
    seq_len: int | None

    def batch(self, seed, step, batch_size, split="train"):
        return self.data.batch(seed, step, batch_size, split)


TASKS = ("text", "mqar", "needle", "copy", "icl_regression")
_SYNTHETIC = {"mqar": MQAR, "needle": NeedleInHaystack, "copy": Copying, "icl_regression": ICLRegression}


def task_settings(kind: str) -> tuple[str, ...]:
    """The settings a task kind takes besides ``kind`` (a synthetic task's constructor arguments)."""
    if kind == "text":
        return ("seq_len", "max_bytes")
    return _keyword_names(_SYNTHETIC[kind].__init__, ("self",))


def build_task(cfg: dict) -> Task:
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    if kind not in TASKS:
        raise ValueError(f"task.kind must be one of {TASKS}, got {kind!r}")
    unknown = sorted(set(cfg) - set(task_settings(kind)))
    if unknown:
        raise ValueError(f"task {kind!r} got unknown settings {unknown}; it takes {list(task_settings(kind))}")
    if kind == "text":
        data = ByteCorpus(cfg.pop("seq_len", 128), max_bytes=cfg.pop("max_bytes", 2_000_000))
        return Task(data, lm_loss, 256, data.seq_len)
    data = _SYNTHETIC[kind](**cfg)
    if kind == "icl_regression":
        return Task(data, regression_loss, None, data.num_context + 1)
    return Task(data, lm_loss, data.vocab_size, data.seq_len)


MODELS = ("decoder_lm", "icl_mhsa")


def check_model_method(cfg: dict) -> None:
    """Checks ``model.method`` (a registered ``jattn.nn.Attention`` method name) and ``model.method_config``
    (its documented keyword config: ``jattn.nn.describe_method(name)``) without building anything.

    Raises the method's own ``ValueError``/``TypeError`` (an unknown name lists the valid ones; an unknown
    key names the closest valid one), prefixed with where in the config it is."""
    if cfg.get("kind") != "decoder_lm":
        return
    from jattn.nn.methods import get_method
    method = cfg.get("method", "softmax")
    config = cfg.get("method_config") or {}
    if not isinstance(config, dict):
        raise TypeError(f"model.method_config must be a dict of the method's options, got {config!r}")
    try:
        get_method(method).validate(dict(config))
    except (TypeError, ValueError) as err:
        raise type(err)(f"model.method={method!r}, model.method_config={config!r}: {err}") from None


def build_model(cfg: dict, task: Task, seed: int):
    check_model_method(cfg)
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    rngs = nnx.Rngs(seed)
    if kind == "decoder_lm":
        if task.vocab_size is None:
            raise ValueError("model.kind='decoder_lm' needs a token task (text, mqar, needle, copy)")
        dim, layers, heads = cfg.pop("dim"), cfg.pop("num_layers"), cfg.pop("num_heads")
        return DecoderLM(task.vocab_size, dim, layers, heads, rngs=rngs, **cfg)
    if kind == "icl_mhsa":
        if not isinstance(task.data, ICLRegression):
            raise ValueError("model.kind='icl_mhsa' needs task.kind='icl_regression'")
        return OneLayerMHSoftmax(task.data.dim, cfg.pop("num_heads"), rngs=rngs, **cfg)
    raise ValueError(f"model.kind must be one of {MODELS}, got {kind!r}")


def _keyword_names(fn, skip=()) -> tuple[str, ...]:
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def section_keys(section: str, kind) -> tuple[str, ...] | None:
    """The keys a ``task``/``model``/``analysis`` section of this ``kind`` takes (``kind`` included), or
    None for a kind that does not exist (building it raises the error that lists the kinds)."""
    if section == "task":
        return ("kind", *task_settings(kind)) if kind in TASKS else None
    if section == "model":
        if kind == "decoder_lm":   # vocab_size comes from the task
            return ("kind", *_keyword_names(DecoderLM.__init__, ("self", "vocab_size", "rngs")))
        if kind == "icl_mhsa":     # dim comes from the task
            return ("kind", *_keyword_names(OneLayerMHSoftmax.__init__, ("self", "dim", "rngs")))
        return None
    if section == "analysis":
        from train.experiments import ANALYSES
        fn = ANALYSES.get(kind)
        return None if fn is None else ("kind", *_keyword_names(fn, ("model", "task", "config")))
    raise ValueError(f"section must be 'task', 'model' or 'analysis', got {section!r}")


def count_params(model) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
