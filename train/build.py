"""Builds the task (data + loss) and the model that a config names."""
from __future__ import annotations

import dataclasses
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


def build_task(cfg: dict) -> Task:
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    if kind == "text":
        data = ByteCorpus(cfg.pop("seq_len", 128), max_bytes=cfg.pop("max_bytes", 2_000_000))
        task = Task(data, lm_loss, 256, data.seq_len)
    elif kind == "mqar":
        data = MQAR(**{k: cfg.pop(k) for k in ("num_pairs", "num_queries", "vocab_size") if k in cfg})
        task = Task(data, lm_loss, data.vocab_size, data.seq_len)
    elif kind == "needle":
        data = NeedleInHaystack(**{k: cfg.pop(k) for k in ("seq_len", "vocab_size") if k in cfg})
        task = Task(data, lm_loss, data.vocab_size, data.seq_len)
    elif kind == "copy":
        data = Copying(**{k: cfg.pop(k) for k in ("length", "vocab_size") if k in cfg})
        task = Task(data, lm_loss, data.vocab_size, data.seq_len)
    elif kind == "icl_regression":
        data = ICLRegression(**{k: cfg.pop(k) for k in ("dim", "num_context", "noise") if k in cfg})
        task = Task(data, regression_loss, None, data.num_context + 1)
    else:
        raise ValueError(f"task.kind must be one of {TASKS}, got {kind!r}")
    if cfg:
        raise ValueError(f"task {kind!r} got unknown settings {sorted(cfg)}")
    return task


MODELS = ("decoder_lm", "icl_mhsa")


def build_model(cfg: dict, task: Task, seed: int):
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


def count_params(model) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
