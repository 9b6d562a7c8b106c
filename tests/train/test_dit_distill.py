"""Tests of train/dit_distill.py (P20 LinFusion / P63 CLEAR students of a tiny, untrained TinyDiT)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.nn.attention import Attention
from jattn.nn.dit import TinyDiT
from train import dit_distill as dd
from train.diffusion import DigitDiffusionTask, make_noise_schedule


_CACHE = {}


def _teacher(seed=0):
    """A fresh clone of the cached tiny teacher (see _make_teacher)."""
    if seed not in _CACHE:
        _CACHE[seed] = _make_teacher(seed)
    return nnx.clone(_CACHE[seed])


def _make_teacher(seed=0):
    """A tiny TinyDiT (16 tokens on a 4x4 grid) with its zero-initialised adaLN/final layers perturbed, so
    every block and the output actually depend on the attention."""
    m = TinyDiT(rngs=nnx.Rngs(seed), image_size=8, patch_size=2, dim=16, depth=2, num_heads=2, freq_dim=16)
    params = nnx.state(m, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed + 7)                # numpy: no per-leaf eager JAX dispatch
    leaves = [jnp.asarray(np.asarray(p) + 0.2 * rng.standard_normal(p.shape), p.dtype) for p in leaves]
    nnx.update(m, jax.tree.unflatten(tree, leaves))
    return m


_fwd = nnx.jit(dd.dit_forward)                       # one compile instead of eager op-by-op dispatch
_call = nnx.jit(lambda m, x, t, y: m(x, t, y))


def _inputs(seed=1, B=3):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, (B, 8, 8, 1)), jax.random.randint(k2, (B,), 0, 1000),
            jax.random.randint(k3, (B,), 0, 11))


def test_dit_forward_matches_model():
    """dit_forward must be TinyDiT.__call__ (catches a dropped gate / residual / final modulation in the copy)."""
    m = _teacher()
    x, t, y = _inputs()
    eps, outs = _fwd(m, x, t, y)
    np.testing.assert_allclose(eps, _call(m, x, t, y), atol=1e-6)
    assert len(outs) == 2 and outs[0].shape == (3, 16, 16)


@pytest.mark.parametrize("method", dd.STUDENTS)
def test_builder_replaces_every_attention_and_copies_projections(method):
    """Every block gets the student; q/k/v/o kernels and biases are bit-identical to the teacher's; the rest of
    the model is untouched and the teacher is not modified (catches a missed layer, a re-initialised or
    transposed projection, or an in-place edit of the teacher)."""
    teacher = _teacher()
    before = jax.tree.map(np.array, nnx.state(teacher, nnx.Param))
    student = dd.build_student(teacher, method, radius=1.5)
    for tb, sb in zip(teacher.blocks, student.blocks):
        assert tb.attn.method == "softmax"
        core = sb.attn.attn if method == "linfusion" else sb.attn
        assert isinstance(core, Attention) and core.method == method
        for name in ("query", "key", "value", "out"):
            for leaf in ("kernel", "bias"):
                a, b = getattr(getattr(tb.attn, name), leaf)[...], getattr(getattr(core, name), leaf)[...]
                assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(tb.adaLN.kernel[...], sb.adaLN.kernel[...])
    after = jax.tree.map(np.array, nnx.state(teacher, nnx.Param))
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
    x, t, y = _inputs()
    assert not np.allclose(_call(student, x, t, y), _call(teacher, x, t, y))   # the attention really changed


def test_clear_with_full_radius_equals_teacher():
    """A CLEAR disc covering the whole 4x4 grid is full softmax attention, so the student equals the teacher
    (catches a wrong grid, scale or projection copy in the CLEAR student)."""
    teacher = _teacher()
    student = dd.build_student(teacher, "clear", radius=10.0)
    x, t, y = _inputs()
    np.testing.assert_allclose(_call(student, x, t, y), _call(teacher, x, t, y), atol=2e-5)


def test_linfusion_undistilled_is_plain_linear_attention():
    """With zero-initialised f_q, f_k the LinFusion student's attention is elu+1 linear attention on the
    teacher's projections (catches a feature MLP that is not added to x, or one that starts non-zero)."""
    from jattn.methods.linear.linfusion import generalized_linear_attention
    student = dd.build_student(_teacher(), "linfusion")
    layer = student.blocks[0].attn
    h = jax.random.normal(jax.random.key(3), (2, 16, 16))
    q, k, v = layer.attn.project(h, jnp.arange(16)[None])
    want = layer.attn.finish(h, generalized_linear_attention(q, k, v))
    np.testing.assert_allclose(layer(h), want, atol=1e-6)


def test_distill_loss_zero_when_student_is_teacher():
    """A softmax "student" (the teacher itself) has KD and layer terms exactly 0; the total is then the
    noise term alone (catches a KD term against the noise, or layers compared at the wrong index)."""
    m = _teacher()
    x, t, y = _inputs()
    noise = jax.random.normal(jax.random.key(4), x.shape)
    eps, outs = _fwd(m, x, t, y)
    eps2, outs2 = _fwd(nnx.clone(m), x, t, y)
    loss, metrics = dd.distill_loss(eps2, eps, noise, outs2, outs, noise_weight=0.0)
    assert float(loss) == 0.0 and float(metrics["eps_kd_mse"]) == 0.0 and float(metrics["attn_mse"]) == 0.0
    loss, _ = dd.distill_loss(eps2, eps, noise, outs2, outs)
    np.testing.assert_allclose(loss, jnp.mean((eps - noise) ** 2), rtol=1e-6)


def test_distill_loss_hand_values_and_reduce():
    """Known answer: constant differences give MSEs 1, 4 and layers 1, 9 -> sum 10 or mean 5 (catches a
    dropped 0.5 weight, sum-vs-mean swapped, or a missing square)."""
    z = jnp.zeros((2, 4, 4, 1)) + 0.3
    layers_t = [jnp.zeros((2, 4, 8)) + 0.1, jnp.zeros((2, 4, 8)) - 0.2]
    layers_s = [layers_t[0] + 1.0, layers_t[1] - 3.0]
    eps_t, noise = z, z + 1.0
    eps_s = z + 2.0                                   # MSE to noise 1, to teacher 4
    loss, m = dd.distill_loss(eps_s, eps_t, noise, layers_s, layers_t, layer_reduce="sum")
    np.testing.assert_allclose([m["noise_mse"], m["eps_kd_mse"], m["attn_mse"]], [1.0, 4.0, 10.0], rtol=1e-6)
    np.testing.assert_allclose(loss, 1.0 + 0.5 * 4.0 + 0.5 * 10.0, rtol=1e-6)
    loss, m = dd.distill_loss(eps_s, eps_t, noise, layers_s, layers_t, layer_reduce="mean")
    np.testing.assert_allclose(loss, 1.0 + 0.5 * 4.0 + 0.5 * 5.0, rtol=1e-6)


@pytest.mark.parametrize("method", dd.STUDENTS)
def test_few_steps_lower_loss_and_train_only_spec_params(method):
    """A few AdamW steps lower the distillation loss on a fixed batch; only the spec's parameters move
    (LinFusion: phi_q/phi_k; CLEAR: attention projections) (catches a stop_gradient on the student, a
    frozen set that trains, or updates that are never written back)."""
    teacher = _teacher()
    student = dd.build_student(teacher, method, radius=1.5)
    before = nnx.state(student, nnx.Param)
    before = jax.tree.map(np.array, before)

    class OneBatch(DigitDiffusionTask):
        def batch(self, seed, step, batch_size, split="train"):
            return super().batch(seed, 0, batch_size, split)

    task = OneBatch(make_noise_schedule(), size=8)
    log = dd.distill(teacher, student, method, task, steps=5, batch_size=8, lr=1e-2, log_every=1)
    assert log[-1]["loss"] < log[0]["loss"]
    after = nnx.state(student, nnx.Param)
    flat_b = dict(nnx.to_flat_state(nnx.State(before)))
    moved_trainable = []
    for path, var in nnx.to_flat_state(after):
        moved = not np.array_equal(np.asarray(var[...]), np.asarray(flat_b[path][...]))
        names = "/".join(map(str, path))
        should = ("phi_q" in names or "phi_k" in names) if method == "linfusion" else ("attn" in names)
        if should:
            moved_trainable.append(moved)
        else:
            assert not moved, names                    # frozen parameters stay bit-identical
    assert moved_trainable and sum(moved_trainable) >= len(moved_trainable) - 2   # (softmax ignores the key bias)


def test_flops_story():
    """Linear attention saves nothing at 16 tokens but wins at 4,096; CLEAR's core is mean_keys/N of
    softmax's (catches a quadratic term in the linear count or a wrong window count)."""
    f16 = {m: dd.attention_flops(m, 16, 64, 4) for m in ("softmax", "clear", "linfusion")}
    f4k = {m: dd.attention_flops(m, 4096, 64, 4) for m in ("softmax", "clear", "linfusion")}
    assert f16["linfusion"]["total"] > f16["softmax"]["total"]
    assert f4k["linfusion"]["total"] < f4k["softmax"]["total"] / 10
    assert dd.clear_mean_keys(4, 1.5) == 6.25 and dd.clear_mean_keys(4, 1.0) == 1.0
    np.testing.assert_allclose(f16["clear"]["core"] / f16["softmax"]["core"], 6.25 / 16)


def test_bad_arguments_raise_naming_them():
    """Bad method / radius / weights / reduce / steps raise naming the argument."""
    teacher = _teacher()
    with pytest.raises(ValueError, match="method"):
        dd.build_student(teacher, "softmax")
    with pytest.raises(TypeError, match="teacher"):
        dd.build_student(object(), "clear")
    with pytest.raises(ValueError, match="radius"):
        dd.build_student(teacher, "clear", radius=0)
    a = [jnp.ones((1, 2, 2))]
    e = jnp.ones((1, 2, 2, 1))
    with pytest.raises(ValueError, match="layer_weight"):
        dd.distill_loss(e, e, e, a, a, layer_weight=-1.0)
    with pytest.raises(ValueError, match="layer_reduce"):
        dd.distill_loss(e, e, e, a, a, layer_reduce="max")
    with pytest.raises(ValueError, match="attn_s"):
        dd.distill_loss(e, e, e, a, a + a)
    with pytest.raises(ValueError, match="eps_s"):
        dd.distill_loss(e, e[..., :1, :], e, a, a)
    with pytest.raises(ValueError, match="steps"):
        dd.distill(teacher, teacher, "clear", None, steps=0)
    with pytest.raises(ValueError, match="lr"):
        dd.distill(teacher, teacher, "clear", None, lr=-1.0)
    with pytest.raises(TypeError, match="attn"):
        dd.LinFusionDiTAttention(teacher.blocks[0].attn, rngs=nnx.Rngs(0))
