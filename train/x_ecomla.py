"""P19 X-EcoMLA on a small LM: train a GQA teacher on stdlib bytes, upcycle every attention layer into MLA
by SVD, then recover with knowledge distillation (``KL(teacher || student)``), against the same budget of
plain next-token fine-tuning. Reports held-out cross entropy and the KV values cached per token.

    python -m train.x_ecomla [--seeds 0 1 2] [--teacher-steps 400] [--steps 150] [--kv-rank 16]

Every number is the mean ± std over the seeds (a seed sets the teacher's init and the data order).
"""
from __future__ import annotations

import argparse
import copy
import time

import jax
import numpy as np
from flax import nnx

from jattn.methods.kv import x_ecomla
from jattn.nn.models import DecoderLM
from train.build import Task, lm_loss
from train.config import DEFAULTS, merge
from train.data import ByteCorpus
from train.loop import evaluate, make_loss_of, train

DIM, LAYERS, HEADS, KV_HEADS, ROPE_DIM = 64, 2, 4, 2, 8


def _config(seed: int, steps: int, lr: float) -> dict:
    return merge(DEFAULTS, {"seed": seed, "optim": {"lr": lr, "warmup_steps": 10},
                            "train": {"steps": steps, "batch_size": 16, "progress": False, "log_every": steps}})


def upcycled(teacher: DecoderLM, kv_rank: int) -> DecoderLM:
    """A copy of ``teacher`` whose attention layers are MLA layers initialised from it by SVD."""
    student = copy.deepcopy(teacher)
    for block in student.blocks:
        block.attention = x_ecomla.MLAAttention.from_attention(block.attention, rope_dim=ROPE_DIM,
                                                               kv_rank=kv_rank)
    return student


def kd_loss_against(teacher: DecoderLM):
    graphdef, state = nnx.split(teacher)

    def loss(model, batch):
        teacher_logits = jax.lax.stop_gradient(nnx.merge(graphdef, state)(batch["inputs"]))
        kl = x_ecomla.kd_kl_loss(teacher_logits, model(batch["inputs"]), batch["loss_mask"])
        return kl, {}
    return loss


def eval_loss(model, data, seed: int) -> float:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    eval_fn = jax.jit(make_loss_of(graphdef, rest, lm_loss))
    return evaluate(eval_fn, params, Task(data, lm_loss, 256, data.seq_len), seed, 16, 8)["loss"]


def run(seed: int, *, teacher_steps: int, steps: int, kv_rank: int, seq_len: int = 128) -> dict:
    data = ByteCorpus(seq_len)
    text = Task(data, lm_loss, 256, seq_len)
    teacher = DecoderLM(256, DIM, LAYERS, HEADS, num_kv_heads=KV_HEADS, rngs=nnx.Rngs(seed))
    teacher = train(_config(seed, teacher_steps, 3e-3), teacher, text, quiet=True).model()
    student = upcycled(teacher, kv_rank)
    row = {"teacher": eval_loss(teacher, data, seed), "mla_init": eval_loss(student, data, seed)}
    kd = train(_config(seed + 1000, steps, 1e-3), upcycled(teacher, kv_rank),
               Task(data, kd_loss_against(teacher), 256, seq_len), quiet=True).model()
    ce = train(_config(seed + 1000, steps, 1e-3), upcycled(teacher, kv_rank), text, quiet=True).model()
    row.update(mla_kd=eval_loss(kd, data, seed), mla_ce=eval_loss(ce, data, seed))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--kv-rank", type=int, default=16)
    args = parser.parse_args(argv)
    start = time.time()
    rows = [run(s, teacher_steps=args.teacher_steps, steps=args.steps, kv_rank=args.kv_rank) for s in args.seeds]
    dims = x_ecomla.MLADims(HEADS, DIM // HEADS - ROPE_DIM, ROPE_DIM, DIM // HEADS, args.kv_rank, DIM)
    gqa = 2 * KV_HEADS * (DIM // HEADS)
    print(f"teacher: DecoderLM dim={DIM} layers={LAYERS} H={HEADS} Hkv={KV_HEADS}, {args.teacher_steps} steps; "
          f"MLA r_kv={args.kv_rank} d_r={ROPE_DIM}: {x_ecomla.kv_values_per_token(dims)} cached values/token/layer "
          f"vs GQA {gqa} ({x_ecomla.kv_compression(dims, kv_heads=KV_HEADS, head_dim=DIM // HEADS):.2f}x); "
          f"seeds {args.seeds}; {time.time() - start:.0f} s")
    print("| model | held-out CE (nats/byte) |\n|---|---|")
    for key, label in (("teacher", "GQA teacher"), ("mla_init", "MLA, SVD init only"),
                       ("mla_kd", f"MLA + KD ({args.steps} steps)"),
                       ("mla_ce", f"MLA + next-token fine-tuning ({args.steps} steps, baseline)")):
        values = np.array([r[key] for r in rows])
        print(f"| {label} | {values.mean():.3f} ± {values.std():.3f} |")
    return rows


if __name__ == "__main__":
    main()
