"""train/acam_kd.py: the TinyDETR split at the encoder memory, the config checker, the teacher cache and a
two-step ACAM-KD student run, all tiny.

Each test's docstring names the mutation it catches.
"""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import acam_kd as K
from train import detection as D
from train.images import shapes

SHIPPED = D.load_config("configs/acam_kd_shapes.py")


def _tiny():
    cfg = copy.deepcopy(SHIPPED)
    cfg["data"].update(size=16, pool=12, test_images=4, max_targets=4)
    cfg["student"].update(dim=8, heads=2, queries=16)
    cfg["teacher"].update(dim=16, heads=2, queries=16, encoder_layers=1, decoder_layers=1, steps=1)
    cfg["train"].update(steps=2, batch_size=2, eval_at=[2])
    cfg["kd"].update(num_masks=2)
    return cfg


def test_encode_then_decode_is_the_model_forward():
    """decode(encode(x)) equals TinyDETR(x) exactly, for token queries. Catches: the distilled feature taken at a
    different point than the memory the decoder reads (e.g. before enc_norm), or TinyDETR's forward changing
    without this file following."""
    m = K.make_detr({"dim": 8, "heads": 2, "queries": 16, "encoder_layers": 1, "decoder_layers": 1,
                     "query_mode": "tokens"}, 16, 0)
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    mem = K.encode(m, x)
    assert mem.shape == (2, 16, 8)
    logits, boxes = m(x)
    l2, b2 = K.decode(m, mem)
    np.testing.assert_array_equal(np.asarray(l2), np.asarray(logits))
    np.testing.assert_array_equal(np.asarray(b2), np.asarray(boxes))


def test_check_config_accepts_the_shipped_config_and_names_bad_keys():
    """The shipped config passes; an unknown key, a missing section key, an unknown variant and a KD head count
    that does not divide the teacher width raise ValueError naming them. Catches: a checker that ignores typos."""
    assert K.check_config(copy.deepcopy(SHIPPED)) is not None
    bad = copy.deepcopy(SHIPPED)
    bad["kd"]["wieght"] = 1.0
    with pytest.raises(ValueError, match="'kd'.*unknown \\['wieght'\\]"):
        K.check_config(bad)
    bad = copy.deepcopy(SHIPPED)
    del bad["teacher"]["steps"]
    with pytest.raises(ValueError, match="'teacher'.*missing \\['steps'\\]"):
        K.check_config(bad)
    bad = copy.deepcopy(SHIPPED)
    bad["variants"] = "none,mgd"
    with pytest.raises(ValueError, match="'variants'.*'mgd'"):
        K.check_config(bad)
    bad = copy.deepcopy(SHIPPED)
    bad["kd"]["num_heads"] = 3
    with pytest.raises(ValueError, match="kd.num_heads"):
        K.check_config(bad)


def test_teacher_cache_round_trip_and_a_two_step_acam_student(tmp_path):
    """The teacher trained once is cached and reloaded with identical outputs; a two-step ACAM-KD student run
    gives finite losses with a positive KD term, moves the student and every KD weight group (projector, fusion,
    both mask generators) and leaves the teacher untouched; the KD wrapper starts from the baseline's weights. Catches: a cache that
    restores leaves in the wrong order, gradients reaching the teacher, KD weights left out of the optimizer,
    variants starting from different initial students."""
    cfg = _tiny()
    K.check_config(cfg)
    pool = shapes(12, 0, size=16, max_objects=2)
    test = shapes(4, 1, size=16, max_objects=2)
    teacher = K.load_or_train_teacher(cfg, pool, str(tmp_path))
    x = jnp.asarray(pool.images[:2], jnp.float32)
    again = K.load_or_train_teacher(cfg, pool, str(tmp_path))
    np.testing.assert_array_equal(np.asarray(K.encode(again, x)), np.asarray(K.encode(teacher, x)))
    before_t = [np.asarray(a) for a in K._leaves(teacher)]

    r = K.run_student(cfg, "acam", 0, teacher, pool, test)
    assert np.all(np.isfinite(r["loss"])) and min(r["kd"]) > 0 and 2 in r["map"]
    for a, b in zip(before_t, K._leaves(teacher)):
        np.testing.assert_array_equal(a, np.asarray(b))
    # the KD weights and the student moved, from the start every variant shares (make_detr(seed), key(seed+1000))
    student = r["student"]
    init = K.acam_kd.init_params(jax.random.key(1000), 8, 16, num_masks=2)
    base = K.make_detr(cfg["student"], 16, 0)
    for name in ("spatial_w", "channel_w", "w_q", "align_w"):
        assert np.abs(np.asarray(getattr(student, "kd_" + name)[...]) - np.asarray(init[name])).max() > 0, name
    assert np.abs(np.asarray(student.detr.conv1.kernel[...]) - np.asarray(base.conv1.kernel[...])).max() > 0
    # wrapping with KD weights does not change the DETR weights every variant starts from
    fresh = K.Student(K.make_detr(cfg["student"], 16, 0), init)
    np.testing.assert_array_equal(np.asarray(fresh.detr.conv1.kernel[...]), np.asarray(base.conv1.kernel[...]))
