"""Multi-scale deformable attention (P41 Focus-DETR's encoder cross-attention, Deformable DETR's op).

``ms_deform_attn`` against a literal numpy bilinear-sampling transcription (grid_sample, zeros padding,
align_corners=False) with points inside, exactly on pixel centres and borders, and outside (partly and wholly),
against torch's ``grid_sample`` when torch is installed, and the NNX module's residual, padding mask, offset
normalisation and argument errors. Mutations each test catches are named in the docstrings.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.dynamic.deformable import MSDeformAttn, level_start_index, ms_deform_attn
from tests.conftest import assert_traced_once

SHAPES = ((5, 4), (3, 2), (1, 3))
S = sum(h * w for h, w in SHAPES)


def literal_ms_deform_attn(value, shapes, loc, aw):
    """out[b, q, h] = sum_{l, p} aw * sum over the 4 neighbours inside the map of bilinear weight * value."""
    value, loc, aw = (np.asarray(a, np.float64) for a in (value, loc, aw))
    B, _, H, Dh = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    out = np.zeros((B, Q, H, Dh))
    start = 0
    for lvl, (hl, wl) in enumerate(shapes):
        for b in range(B):
            for q in range(Q):
                for h in range(H):
                    for p in range(P):
                        x = loc[b, q, h, lvl, p, 0] * wl - 0.5
                        y = loc[b, q, h, lvl, p, 1] * hl - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = np.zeros(Dh)
                        for yi in (y0, y0 + 1):
                            for xi in (x0, x0 + 1):
                                if 0 <= xi < wl and 0 <= yi < hl:
                                    wgt = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                    acc += wgt * value[b, start + yi * wl + xi, h]
                        out[b, q, h] += aw[b, q, h, lvl, p] * acc
        start += hl * wl
    return out.reshape(B, Q, H * Dh)


def make_inputs(seed, B=2, Q=3, H=2, Dh=3, P=5):
    rng = np.random.default_rng(seed)  # numpy inputs: eager jax.random ops compile one by one (slow)
    value = rng.standard_normal((B, S, H, Dh)).astype(np.float32)
    loc = rng.uniform(-0.1, 1.1, (B, Q, H, len(SHAPES), P, 2)).astype(np.float32)
    # fixed points: exact pixel centre, the map's corners / edges, half a pixel outside, wholly outside
    loc[0, 0, 0, :, :, :] = [[0.1, 0.5], [0.0, 0.0], [1.0, 1.0], [-0.05, 0.5], [1.7, -0.4]]
    loc[1, 2, 1, 1, :, :] = [[0.25, 1 / 6], [0.75, 0.5], [1.0, 0.0], [0.5, 1.0], [0.0, 1.0]]
    logits = rng.standard_normal((B, Q, H, len(SHAPES) * P))
    aw = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return jnp.asarray(value), jnp.asarray(loc), jnp.asarray(aw.reshape(B, Q, H, len(SHAPES), P), jnp.float32)


def test_matches_literal_bilinear_transcription():
    """Catches align_corners=True (x * (W - 1)), border clamping instead of zero padding, swapped x / y,
    a wrong level offset or a level's sampling read from another level's map."""
    value, loc, aw = make_inputs(0)
    got = jax.jit(ms_deform_attn, static_argnums=1)(value, SHAPES, loc, aw)
    want = literal_ms_deform_attn(value, SHAPES, loc, aw)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_border_and_outside_points():
    """A point at a pixel centre returns that pixel; half a pixel outside returns half the border pixel (zeros
    padding, not clamping); a point far outside returns 0. Catches clamping, -0.5 offset dropped."""
    hl, wl = SHAPES[0]
    value = jnp.asarray(np.random.default_rng(1).standard_normal((1, S, 1, 2)), jnp.float32)
    pts = np.asarray([[(1 + 0.5) / wl, (2 + 0.5) / hl],   # centre of pixel (y=2, x=1)
                       [-0.5 / wl, (0 + 0.5) / hl],        # centre of a virtual pixel left of (0, 0)
                       [0.0, (0 + 0.5) / hl],              # left border: half of pixel (0, 0)
                       [3.0, 3.0]])                        # far outside
    loc = np.zeros((1, 4, 1, len(SHAPES), 1, 2), np.float32)
    loc[0, :, 0, 0, 0] = pts
    aw = np.zeros((1, 4, 1, len(SHAPES), 1), np.float32)
    aw[:, :, :, 0] = 1.0
    out = np.asarray(jax.jit(ms_deform_attn, static_argnums=1)(value, SHAPES, loc, aw))[0]
    v = np.asarray(value)[0, :, 0]
    np.testing.assert_allclose(out[0], v[2 * wl + 1], rtol=1e-6)
    np.testing.assert_allclose(out[1], 0.0, atol=1e-7)
    np.testing.assert_allclose(out[2], 0.5 * v[0], rtol=1e-6)
    np.testing.assert_allclose(out[3], 0.0, atol=1e-7)


def test_matches_torch_grid_sample():
    """Cross-check against torch's grid_sample(bilinear, zeros, align_corners=False) on the grid 2 loc - 1, per
    level and head (Deformable DETR's ms_deform_attn_core_pytorch). Catches any sampling-convention slip."""
    torch = pytest.importorskip("torch")
    value, loc, aw = make_inputs(2)
    B, _, H, Dh = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    v = torch.tensor(np.asarray(value, np.float64))
    g = torch.tensor(2 * np.asarray(loc, np.float64) - 1)
    starts = level_start_index(SHAPES)
    sampled = []
    for lvl, (hl, wl) in enumerate(SHAPES):
        v_l = v[:, starts[lvl]:starts[lvl] + hl * wl].permute(0, 2, 3, 1).reshape(B * H, Dh, hl, wl)
        g_l = g[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(B * H, Q, P, 2)
        sampled.append(torch.nn.functional.grid_sample(v_l, g_l, mode="bilinear", padding_mode="zeros",
                                                       align_corners=False))  # [BH, Dh, Q, P]
    s = torch.stack(sampled, -2).flatten(-2)  # [BH, Dh, Q, L P]
    a = torch.tensor(np.asarray(aw, np.float64)).permute(0, 2, 1, 3, 4).reshape(B * H, 1, Q, L * P)
    want = (s * a).sum(-1).view(B, H * Dh, Q).transpose(1, 2).numpy()
    np.testing.assert_allclose(np.asarray(ms_deform_attn(value, SHAPES, loc, aw)), want, rtol=1e-5, atol=1e-5)


def _module(dim=8, H=2, L=3, P=2, seed=0):
    m = MSDeformAttn(dim, H, L, P, rngs=nnx.Rngs(seed))
    # random (not the zero init) offset / weight projections so the test sees them
    rng = np.random.default_rng(seed + 10)
    m.sampling_offsets.kernel.value = jnp.asarray(0.3 * rng.standard_normal(m.sampling_offsets.kernel.value.shape),
                                                  jnp.float32)
    m.attention_weights.kernel.value = jnp.asarray(rng.standard_normal(m.attention_weights.kernel.value.shape),
                                                   jnp.float32)
    return m


def test_module_matches_manual_composition():
    """loc = ref + offset / (W_l, H_l), softmax over L P per head, query_pos added before the projections,
    residual inside. Catches normalising by (H, W) (swapped), softmax over points only, pos dropped, no residual."""
    m = _module()
    B, Q, d = 2, 4, 8
    rng = np.random.default_rng(3)
    query, pos, value = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((B, Q, d), (B, Q, d), (B, S, d)))
    ref = jnp.asarray(rng.uniform(0, 1, (B, Q, 3, 2)), jnp.float32)
    graphdef, st = nnx.split(m)  # one compiled program: eager op-by-op dispatch is slow on a busy CPU
    got = jax.jit(lambda st, q, v, r, p: nnx.merge(graphdef, st)(q, v, r, SHAPES, query_pos=p))(st, query, value,
                                                                                                 ref, pos)
    qp = np.asarray(query + pos, np.float64)
    kern = lambda lin: (np.asarray(lin.kernel.value, np.float64), np.asarray(lin.bias.value, np.float64))
    (wo, bo), (wa, ba), (wv, bv), (wp, bp) = (kern(m.sampling_offsets), kern(m.attention_weights),
                                              kern(m.value_proj), kern(m.output_proj))
    off = (qp @ wo + bo).reshape(B, Q, 2, 3, 2, 2)
    logits = (qp @ wa + ba).reshape(B, Q, 2, 6)
    aw = np.exp(logits - logits.max(-1, keepdims=True))
    aw = (aw / aw.sum(-1, keepdims=True)).reshape(B, Q, 2, 3, 2)
    norm = np.asarray([[w, h] for h, w in SHAPES], np.float64)
    loc = np.asarray(ref)[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    v = (np.asarray(value, np.float64) @ wv + bv).reshape(B, S, 2, 4)
    core = literal_ms_deform_attn(v, SHAPES, loc, aw)
    want = np.asarray(query, np.float64) + core @ wp + bp
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_key_padding_mask_zeroes_value_rows():
    """Padded value rows do not influence the output (and unpadded ones do). Catches the mask ignored or inverted."""
    m = _module(seed=1)
    B, Q, d = 1, 3, 8
    rng = np.random.default_rng(4)
    query, value, other = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((B, Q, d), (B, S, d), (B, 20, d)))
    ref = jnp.asarray(rng.uniform(0, 1, (B, Q, 3, 2)), jnp.float32)
    pad = jnp.asarray(np.arange(S)[None] < 20)
    graphdef, st = nnx.split(m)
    f = jax.jit(lambda st, q, v, r, pad: nnx.merge(graphdef, st)(q, v, r, SHAPES, key_padding_mask=pad))
    call = lambda q, v, r, key_padding_mask: f(st, q, v, r, key_padding_mask)
    a = call(query, value, ref, key_padding_mask=pad)
    b = call(query, jnp.concatenate([other, value[:, 20:]], 1), ref, key_padding_mask=pad)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = call(query, jnp.concatenate([value[:, :20], 2.0 * value[:, 20:]], 1), ref, key_padding_mask=pad)
    assert not np.allclose(np.asarray(a), np.asarray(c))


def test_default_init_offsets_are_rays():
    """detrex init: zero offset kernel, bias = head h along angle 2 pi h / H, point p at distance p + 1 (in
    pixels, max-abs normalised); zero attention-weight kernel (uniform weights). Catches a zero or random bias."""
    m = MSDeformAttn(8, 4, 2, 3, rngs=nnx.Rngs(0))
    b = np.asarray(m.sampling_offsets.bias.value).reshape(4, 2, 3, 2)
    np.testing.assert_allclose(b[0, 1, 2], [3.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(b[1, 0, 0], [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(b[2, 0, 1], [-2.0, 0.0], atol=1e-6)
    assert not np.any(np.asarray(m.sampling_offsets.kernel.value))
    assert not np.any(np.asarray(m.attention_weights.kernel.value))


def test_jit_traces_once():
    """Static spatial_shapes: a second call with fresh values reuses the program. Catches a shape-dependent trace."""
    v1, l1, a1 = make_inputs(5)
    v2, l2, a2 = make_inputs(6)
    outs = assert_traced_once(lambda v, l, a: ms_deform_attn(v, SHAPES, l, a), (v1, l1, a1), (v2, l2, a2))
    assert not np.allclose(np.asarray(outs[0]), np.asarray(outs[1]))


def test_bad_arguments_name_the_argument():
    """Each wrong input raises naming the argument."""
    value, loc, aw = make_inputs(7)
    with pytest.raises(ValueError, match="value"):
        ms_deform_attn(value[:, 1:], SHAPES, loc, aw)
    with pytest.raises(ValueError, match="sampling_locations"):
        ms_deform_attn(value, SHAPES, loc[..., :1], aw)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, SHAPES, loc, aw[..., :1])
    with pytest.raises(TypeError, match="spatial_shapes"):
        ms_deform_attn(value, ((5, 4.0),), loc, aw)
    with pytest.raises(ValueError, match="dim"):
        MSDeformAttn(10, 4, rngs=nnx.Rngs(0))
    m = _module()
    with pytest.raises(ValueError, match="reference_points"):
        m(jnp.ones((1, 2, 8)), jnp.ones((1, S, 8)), jnp.ones((1, 2, 2, 2)), SHAPES)
