"""Layer-wise attention distillation: zero loss for an identical student, decreasing loss otherwise."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.nn import DecoderLM
from jattn.nn.methods import available_methods
from train.build import Task
from train.config import DEFAULTS, merge
from train.data import ByteCorpus
from train.distill import attention_map_kl, make_distill_loss, students_like
from train.loop import train

REF = {"impl": "reference"}


def _teacher():
    return DecoderLM(256, 32, 2, 4, method_config=REF, rngs=nnx.Rngs(0))


def _setup(student_method, **config):
    teacher = _teacher()
    graphdef, state = nnx.split(teacher)
    students = students_like(teacher, student_method, **config)
    data = ByteCorpus(32, max_bytes=20_000)
    return teacher, graphdef, state, students, data


def test_a_student_identical_to_the_teacher_has_zero_loss():
    _, graphdef, state, students, data = _setup("softmax", **REF)
    loss_fn = make_distill_loss(graphdef, state, output_weight=1.0, map_weight=1.0)
    loss, metrics = nnx.jit(loss_fn)(students, data.batch(0, 0, 2))
    assert abs(float(loss)) < 1e-6 and abs(float(metrics["map_kl"])) < 1e-6


def test_map_kl_is_zero_for_equal_maps_and_positive_otherwise():
    p = jnp.asarray([[[[0.5, 0.5], [0.9, 0.1]]]])
    assert float(attention_map_kl(p, p)) == 0.0
    assert float(attention_map_kl(p, p[..., ::-1])) > 0.1


@pytest.mark.parametrize("method,config,map_weight", [
    ("sliding_window", {"window": 7, **REF}, 0.0),  # 7 keys back + the query: 8 visible
    ("sigmoid", {"normalize": True}, 0.1),   # dense support, so its maps can match the teacher's
    pytest.param("lightning", {"chunk_size": 16}, 0.0,
                 marks=pytest.mark.skipif("lightning" not in available_methods(), reason="no jattn.ops.linear")),
])
def test_distillation_lowers_the_layerwise_loss(method, config, map_weight):
    _, graphdef, state, students, data = _setup(method, **config)
    task = Task(data, make_distill_loss(graphdef, state, output_weight=1.0, map_weight=map_weight), None, 32)
    cfg = merge(DEFAULTS, {"optim": {"lr": 1e-2, "warmup_steps": 1, "weight_decay": 0.0},
                           "train": {"steps": 15, "batch_size": 4, "log_every": 1, "eval_batches": 1,
                                     "progress": False}})
    held_out = data.batch(0, 0, 4, split="eval")   # the batch the loop's final eval uses
    before = float(nnx.jit(task.loss)(students, held_out)[0])
    result = train(cfg, students, task, quiet=True)
    after = [r for r in result.history if r["split"] == "eval"][-1]["loss"]
    assert after < 0.97 * before   # a clear drop on a fixed held-out batch; the window gap itself stays
    if map_weight:
        assert all(np.isfinite(r["map_kl"]) and r["map_kl"] > 0 for r in result.history if r["split"] == "train")
