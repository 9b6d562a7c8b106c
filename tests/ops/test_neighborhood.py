"""Neighborhood attention: the family test base, and ``jattn.neighborhood_attention`` against an
independent transcription of NATTEN's mask rules.

The base: one feature table (``CASES``: 1-3-D, stride, dilation, causal, even kernels, odd sizes, every
head grouping of ``tests.conftest.GROUPINGS``) and one ``check_against_reference(impl, case)`` (forward
and q/k/v gradients against the dense oracle with the transcribed NATTEN mask), run for every impl.
"""
import dataclasses
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jattn
from jattn.core.neighborhood import neighborhood_mask, token_permute, token_unpermute
from jattn.ops.neighborhood import neighborhood_attention
from tests.conftest import GROUPINGS, assert_close, assert_matches, assert_traced_once, numpy_qkv


# ---------------------------------------------------------------------------------- the oracle

def natten_axis_allowed(i: int, j: int, L: int, w: int, s: int, d: int, causal: bool) -> bool:
    """NATTEN's per-axis rule, written out literally on Python ints (flex backend's get_na_flex_mask)."""
    gi, gj = i % d, j % d
    if gi != gj:
        return False
    i, j = i // d, j // d
    L = L // d + (1 if gi < L % d else 0)  # length of this dilation group
    if causal:
        leader = min((i // s) * s + s - 1, L - 1)
        return i - j >= 0 and leader - j < w
    left, right = w // 2, w // 2 + (w % 2 - 1)
    leader = min((i // s) * s + s // 2, L - 1)
    centre = max(left, min(leader, L - 1 - right))
    w0, w1 = centre - j, j - centre
    return (0 <= w0 <= left) or (0 <= w1 <= right)


def natten_mask(shape, kernel, stride, dilation, causal) -> np.ndarray:
    coords = list(itertools.product(*(range(L) for L in shape)))
    mask = np.zeros((len(coords), len(coords)), bool)
    for qi, qc in enumerate(coords):
        for ki, kc in enumerate(coords):
            mask[qi, ki] = all(natten_axis_allowed(qc[a], kc[a], shape[a], kernel[a], stride[a], dilation[a],
                                                   causal[a]) for a in range(len(shape)))
    return mask


@st.composite
def na_configs(draw, max_tokens=96):
    ndim = draw(st.integers(1, 3))
    max_len = {1: 40, 2: 10, 3: 5}[ndim]
    shape, kernel, stride, dilation, causal = [], [], [], [], []
    for _ in range(ndim):
        L = draw(st.integers(2, max_len))
        d = draw(st.integers(1, max(1, L // 2)))
        w = draw(st.integers(1, L // d))
        shape.append(L), dilation.append(d), kernel.append(w)
        stride.append(draw(st.integers(1, w)))
        causal.append(draw(st.booleans()))
    if math.prod(shape) > max_tokens:
        shape[0] = max(kernel[0] * dilation[0], max_tokens // math.prod(shape[1:]))
    return tuple(shape), tuple(kernel), tuple(stride), tuple(dilation), tuple(causal)


def grid_qkv(seed, shape, B=1, H=2, Hkv=1, D=8, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (B, *shape, H, D)).astype(dtype)
    k = jax.random.normal(kk, (B, *shape, Hkv, D)).astype(dtype)
    v = jax.random.normal(kv, (B, *shape, Hkv, D)).astype(dtype)
    return q, k, v


def flat(x):
    return x.reshape(x.shape[0], -1, *x.shape[-2:])


def dense_oracle(q, k, v, mask):
    return jattn.reference_attention(flat(q), flat(k), flat(v), mask=jnp.asarray(mask)).reshape(q.shape)


# ---------------------------------------------------------------------------------- the mask

@settings(max_examples=25)
@given(na_configs())
def test_mask_equals_natten_transcription(config):
    shape, kernel, stride, dilation, causal = config
    got = neighborhood_mask(shape, kernel, stride=stride, dilation=dilation, causal=causal)
    np.testing.assert_array_equal(got, natten_mask(shape, kernel, stride, dilation, causal))


def test_stride_one_non_causal_sees_exactly_the_kernel_volume():
    mask = neighborhood_mask((9, 7, 6), (4, 3, 5), dilation=(2, 1, 1))
    assert np.all(mask.sum(axis=1) == 4 * 3 * 5)


def test_full_window_is_dense_attention():
    assert neighborhood_mask((5, 6), (5, 6)).all()
    np.testing.assert_array_equal(neighborhood_mask((7,), 7, causal=True), np.tril(np.ones((7, 7), bool)))


def test_stride_equal_kernel_is_window_partition():
    shape, w = (8, 12), (4, 3)
    mask = neighborhood_mask(shape, w, stride=w)
    window = [np.arange(L) // k for L, k in zip(shape, w)]
    ids = (window[0][:, None] * 100 + window[1][None, :]).reshape(-1)
    np.testing.assert_array_equal(mask, ids[:, None] == ids[None, :])


def test_causal_rows_are_inside_the_causal_mask():
    shape = (6, 5)
    mask = neighborhood_mask(shape, (3, 2), stride=(2, 2), causal=(True, True))
    coords = np.array(list(itertools.product(*(range(L) for L in shape))))
    before = np.all(coords[None, :, :] <= coords[:, None, :], axis=-1)
    assert not np.any(mask & ~before)


# ---------------------------------------------------------------------------------- the attention

@settings(max_examples=4)
@given(na_configs(max_tokens=48), st.sampled_from([(2, 1), (2, 2), (4, 2)]), st.integers(0, 2 ** 16))
def test_xla_forward_equals_dense_reference(config, heads, seed):
    shape, kernel, stride, dilation, causal = config
    q, k, v = grid_qkv(seed, shape, H=heads[0], Hkv=heads[1])
    out = neighborhood_attention(q, k, v, kernel, stride=stride, dilation=dilation, causal=causal, impl="xla",
                                 tile_shape=(3,) * len(shape))
    assert_close(out, dense_oracle(q, k, v, natten_mask(shape, kernel, stride, dilation, causal)))


# ---------------------------------------------------------------------------------- the family test base

IMPLS = ["xla", "pallas"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the feature table: a pattern, a head grouping (H, Hkv) and a batch size."""
    name: str
    shape: tuple
    kernel: tuple
    stride: tuple
    dilation: tuple
    causal: tuple
    heads: tuple
    B: int = 1
    D: int = 8

    def qkv(self, seed: int):
        H, Hkv = self.heads
        T = math.prod(self.shape)
        q, k, v = numpy_qkv(seed, self.B, T, T, H, Hkv, self.D)
        return tuple(x.reshape(self.B, *self.shape, *x.shape[-2:]) for x in (q, k, v))

    def mask(self):
        return natten_mask(self.shape, self.kernel, self.stride, self.dilation, self.causal)

    def op(self, impl: str):
        return lambda q, k, v: neighborhood_attention(q, k, v, self.kernel, stride=self.stride,
                                                      dilation=self.dilation, causal=self.causal, impl=impl)


CASES = [  # odd sizes, even kernels, borders, mixed flags; every grouping of GROUPINGS
    Case("1d-stride-dilation-even-kernel", (37,), (6,), (3,), (2,), (False,), GROUPINGS[1], B=2),
    Case("2d-mixed-causal", (11, 13), (5, 4), (2, 1), (2, 1), (False, True), GROUPINGS[2]),
    Case("3d", (4, 6, 3), (3, 3, 2), (1, 2, 1), (1, 2, 1), (True, False, False), GROUPINGS[3]),
    Case("1d-causal-even-kernel-mha", (23,), (4,), (2,), (1,), (True,), GROUPINGS[0], B=2),
]
assert {case.heads for case in CASES} == set(GROUPINGS)


def check_against_reference(impl: str, case: Case, seed: int = 7):
    """``impl`` equals the dense oracle (NATTEN's transcribed mask) forward and in the q/k/v gradients."""
    q, k, v = case.qkv(seed)
    mask = case.mask()
    out = assert_matches(case.op(impl), lambda q, k, v: dense_oracle(q, k, v, mask), q, k, v, seed=1)
    chex.assert_shape(out, q.shape)
    assert out.dtype == q.dtype


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_forward_and_gradients_equal_dense_reference(impl, case):
    check_against_reference(impl, case)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("transform", [jax.jit, lambda f: f], ids=["jit", "eager"])
def test_traced_and_eager_agree(impl, transform):
    case = CASES[-1]
    q, k, v = case.qkv(3)
    assert_close(transform(case.op(impl))(q, k, v), case.op(impl)(q, k, v), what=impl)


def test_same_shapes_do_not_retrace():
    case = CASES[-1]
    first, second = assert_traced_once(case.op("xla"), case.qkv(4), case.qkv(5))
    chex.assert_shape([first, second], case.qkv(4)[0].shape)
    assert not np.array_equal(np.asarray(first), np.asarray(second))


# ---------------------------------------------------------------------------------- more properties

def test_tile_sizes_do_not_change_the_result():
    shape, kernel = (19, 14), (7, 5)
    q, k, v = grid_qkv(3, shape)
    want = neighborhood_attention(q, k, v, kernel, impl="reference")
    for tile in [(1, 1), (4, 8), (32, 32)]:
        assert_close(neighborhood_attention(q, k, v, kernel, impl="xla", tile_shape=tile), want, what=str(tile))


def test_bfloat16_inputs():
    q, k, v = grid_qkv(4, (12, 10), dtype=jnp.bfloat16)
    out = neighborhood_attention(q, k, v, 5, impl="xla")
    assert out.dtype == jnp.bfloat16
    assert_close(out, neighborhood_attention(q, k, v, 5, impl="reference"), dtype=jnp.bfloat16)


def test_kernel_one_returns_v():
    q, k, v = grid_qkv(5, (6, 5))
    assert_close(neighborhood_attention(q, k, v, 1, impl="xla"), jnp.repeat(v, 2, axis=-2))


def test_full_kernel_equals_full_attention():
    q, k, v = grid_qkv(6, (5, 7))
    want = jattn.reference_attention(flat(q), flat(k), flat(v)).reshape(q.shape)
    assert_close(neighborhood_attention(q, k, v, (5, 7), impl="xla"), want)


def test_causal_full_kernel_1d_equals_causal_attention():
    q, k, v = grid_qkv(7, (23,))
    want = jattn.reference_attention(q, k, v, causal=True)
    assert_close(neighborhood_attention(q, k, v, 23, causal=True, impl="xla"), want)


def test_dilation_equals_na_on_strided_subsequences():
    shape, d = (11, 6), (3, 2)
    q, k, v = grid_qkv(8, shape)
    out = neighborhood_attention(q, k, v, (3, 3), dilation=d, impl="xla")
    for g0 in range(d[0]):
        for g1 in range(d[1]):
            sub = (slice(None), slice(g0, None, d[0]), slice(g1, None, d[1]))
            want = neighborhood_attention(q[sub], k[sub], v[sub], (3, 3), impl="reference")
            assert_close(out[sub], want, what=f"group {(g0, g1)}")


def test_translation_equivariance_away_from_borders():
    q, k, v = grid_qkv(9, (16, 16))
    shifted = [jnp.roll(x, (2, 3), axis=(1, 2)) for x in (q, k, v)]
    out = neighborhood_attention(q, k, v, 5, impl="xla")
    out_shifted = neighborhood_attention(*shifted, 5, impl="xla")
    # queries whose window stays clear of both the border and the wrapped rows in both layouts
    assert_close(out_shifted[:, 7:13, 8:14], out[:, 5:11, 5:11])


def test_every_output_is_finite():
    q, k, v = grid_qkv(10, (9, 11), H=4, Hkv=1)
    out = neighborhood_attention(q * 30, k * 30, v, (3, 4), stride=(3, 2), causal=(True, False), impl="xla")
    assert np.all(np.isfinite(np.asarray(out)))


def test_token_permute_round_trip():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 3, 4))
    permuted = token_permute(x, (2, 4))
    assert permuted.shape == (2, 3 * 2 * 2 * 4, 3, 4)
    np.testing.assert_array_equal(token_unpermute(permuted, (2, 4), (5, 7)), x)
    np.testing.assert_array_equal(permuted[0, :8, 0, 0], x[0, :2, :4, 0, 0].reshape(-1))  # tile 0 first


# ---------------------------------------------------------------------------------- bad input

BAD_CALLS = [
    (dict(kernel_size=9), "kernel_size"),
    (dict(kernel_size=(3, 3, 3)), "kernel_size"),
    (dict(kernel_size=3, stride=4), "stride"),
    (dict(kernel_size=3, dilation=0), "dilation"),
    (dict(kernel_size=3, dilation=3), "kernel_size"),
    (dict(kernel_size=3.0), "kernel_size"),
    (dict(kernel_size=3, causal=1), "causal"),
    (dict(kernel_size=3, impl="cuda"), "impl"),
    (dict(kernel_size=3, scale=-1.0), "scale"),
    (dict(kernel_size=3, tile_shape=(0, 4)), "tile_shape"),
    (dict(kernel_size=3, impl="pallas", tile_shape=(3, 8)), "tile_shape"),
]


@pytest.mark.parametrize("kwargs, argument", BAD_CALLS)
def test_bad_arguments_are_named(kwargs, argument):
    q, k, v = grid_qkv(0, (8, 6))
    with pytest.raises((ValueError, TypeError), match=argument):
        neighborhood_attention(q, k, v, **kwargs)


def test_bad_tensors_are_named():
    q, k, v = grid_qkv(0, (8, 6))
    with pytest.raises(ValueError, match="k must have q's spatial shape"):
        neighborhood_attention(q, k[:, :7], v, 3)
    with pytest.raises(ValueError, match="rank 4 to 6"):
        neighborhood_attention(q[:, 0, 0], k[:, 0, 0], v[:, 0, 0], 3)
    with pytest.raises(TypeError, match="q must have a floating dtype"):
        neighborhood_attention(q.astype(jnp.int32), k, v, 3)
    with pytest.raises(ValueError, match="H"):
        neighborhood_attention(q[..., :1, :], k.repeat(2, axis=-2), v.repeat(2, axis=-2), 3)
