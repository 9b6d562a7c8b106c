"""Layer-wise distillation of teacher attention into student attention (LinFusion, CLEAR, X-EcoMLA style).

Each student :class:`jattn.nn.Attention` replaces the teacher's attention of one layer of a pre-norm
:class:`jattn.nn.DecoderLM`. Both see the same input — the teacher's normalised hidden state entering
that layer — and the loss is, summed over layers,

    output_weight * mean((student_out - teacher_out)^2)
  + map_weight    * mean over rows of KL(teacher_probs || student_probs)   (students with probabilities)

The teacher is frozen (its outputs are constants); only the students train, through the ordinary
:func:`train.loop.train`, so checkpoints, resume and logs work the same.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.nn.attention import Attention
from jattn.nn.models import DecoderLM


class Students(nnx.Module):
    """The trainable student attention modules, one per teacher layer."""

    def __init__(self, attentions: list[Attention]):
        self.layers = nnx.List(attentions)


def students_like(teacher: DecoderLM, method: str, *, copy_projections: bool = True, seed: int = 0,
                  **method_config) -> Students:
    """One student per teacher layer with the same shape and method ``method``; with
    ``copy_projections`` the students start from the teacher's q/k/v/o weights (the usual recipe)."""
    students = []
    for block in teacher.blocks:
        t = block.attention
        student = Attention(t.dim, t.num_heads, num_kv_heads=t.num_kv_heads, head_dim=t.head_dim, method=method,
                            causal=t.causal, rope=t.rope, rope_theta=t.rope_theta, rngs=nnx.Rngs(seed),
                            use_bias=t.query.bias is not None, output_gate=t.gate is not None, **method_config)
        if copy_projections:
            for name in ("query", "key", "value", "out") + (("gate",) if t.gate is not None else ()):
                nnx.update(getattr(student, name), jax.tree.map(jnp.copy, nnx.state(getattr(t, name))))
        students.append(student)
    return Students(students)


def teacher_layer_inputs(teacher: DecoderLM, tokens):
    """The normalised input of every layer's attention (pre-norm blocks), from one teacher forward."""
    if any(block.norm_position != "pre" for block in teacher.blocks):
        raise ValueError("distillation reads pre-norm layer inputs; the teacher has post-norm blocks")
    x = teacher.embed(tokens).astype(teacher.dtype)
    inputs = []
    for block in teacher.blocks:
        inputs.append(block.attn_norm(x))
        x = block(x)
    return inputs


def attention_map_kl(teacher_probs, student_probs, eps: float = 1e-9):
    """Mean over rows of ``KL(teacher || student)`` for maps ``[B, H, T, S]``."""
    t = teacher_probs.astype(jnp.float32)
    s = student_probs.astype(jnp.float32)
    kl = jnp.sum(jnp.where(t > 0, t * (jnp.log(jnp.maximum(t, eps)) - jnp.log(jnp.maximum(s, eps))), 0.0), -1)
    return jnp.mean(kl)


def make_distill_loss(teacher_graphdef, teacher_state, *, output_weight: float = 1.0, map_weight: float = 0.0):
    """``loss(students, batch) -> (loss, metrics)`` for :func:`train.loop.train` (batch ``inputs [B, T]``)."""
    if output_weight < 0 or map_weight < 0 or output_weight + map_weight == 0:
        raise ValueError(f"output_weight and map_weight must be >= 0 and not both 0, got {output_weight}, {map_weight}")

    def loss(students: Students, batch):
        teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_state))
        inputs = teacher_layer_inputs(teacher, batch["inputs"])
        total_out, total_map = 0.0, 0.0
        for block, student, x in zip(teacher.blocks, students.layers, inputs):
            want_maps = map_weight > 0 and student.spec.supports_probs
            t_out, t_probs = block.attention(x, return_probs=True) if want_maps else (block.attention(x), None)
            t_out = jax.lax.stop_gradient(t_out)
            if want_maps:
                s_out, s_probs = student(x, return_probs=True)
                total_map = total_map + attention_map_kl(jax.lax.stop_gradient(t_probs), s_probs)
            else:
                s_out = student(x)
            total_out = total_out + jnp.mean(jnp.square(s_out - t_out))
        value = output_weight * total_out + map_weight * total_map
        return value, {"output_mse": jnp.asarray(total_out), "map_kl": jnp.asarray(total_map)}

    return loss
