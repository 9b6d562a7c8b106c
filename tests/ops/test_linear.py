"""linear_attention, the family test base: ONE feature table (``CASES``) and ONE ``check_against_reference``
run for every impl (the chunked xla form, the recurrence, the Pallas kernel) against the quadratic reference,
forward and gradients (q, k, v, log_decay, initial_state). The kernel has one structure for both targets (only
the compiler parameters differ), so ``interpret="mosaic"`` would run the same interpreter program as
``"triton"``: "pallas" covers it. Then the properties the table cannot express: the oracle against a literal loop, decode and
state handoff, numerical safety, GQA pairing, jit/eager agreement and retracing, decay constructors and
argument errors (P58, P74)."""
from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jattn.core.decay import alibi_log_decay, linear_log_decay
from jattn.ops.linear import linear_attention, linear_attention_step
from tests.conftest import GROUPINGS, assert_close, assert_traced_once


# ---------------------------------------------------------------------------------------------------
# The feature table


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    B: int = 1
    T: int = 13
    H: int = 2
    Hkv: int | None = None       # None: as many kv heads as q heads
    D: int = 4
    E: int = 3
    causal: bool = True
    decay: str = "none"          # "none" | "head" ([H]) | "token" ([B, T, H])
    state: bool = False          # start from a random initial state
    scale: float = 1.0
    chunk_size: int = 4          # the xla form's chunk; the kernels use it when it is a power of two >= 16
    impls: tuple = ("xla", "recurrent", "pallas")   # the impls the case tells something about

    @property
    def kv_heads(self) -> int:
        return self.H if self.Hkv is None else self.Hkv

    @property
    def kernel_chunk(self) -> int:
        c = self.chunk_size
        return c if c >= 16 and not c & (c - 1) else 16

    @property
    def inputs_key(self) -> "Case":
        """The case with only the fields that choose the inputs and the math (cases differing only in how
        an impl chunks share one reference run)."""
        return dataclasses.replace(self, name="", chunk_size=0, impls=())


CASES = [
    Case("no_decay_state", state=True, scale=0.7),
    Case("head_decay_state", B=2, T=37, H=3, D=8, E=5, decay="head", state=True, scale=0.7, chunk_size=8),
    Case("token_decay_state", B=2, T=37, H=3, D=8, E=5, decay="token", state=True, scale=0.7, chunk_size=8),
    Case("noncausal_state", B=2, T=11, H=3, D=8, E=5, causal=False, state=True, scale=0.3, chunk_size=16),
    # odd T, D, E: padded to whole chunks, D 8 -> 16 and E 24 -> 32 on the kernel
    Case("padded_dims", T=45, D=8, E=24, decay="token", state=True, scale=0.6, chunk_size=16),
    # the xla form's chunking: one-token chunks, an odd chunk, one chunk longer than T, scanned segments
    Case("chunk_1", B=2, T=37, H=3, D=8, E=5, decay="token", state=True, scale=0.7, chunk_size=1, impls=("xla",)),
    Case("chunk_3", B=2, T=37, H=3, D=8, E=5, decay="token", state=True, scale=0.7, chunk_size=3, impls=("xla",)),
    Case("chunk_over_T", B=2, T=37, H=3, D=8, E=5, decay="token", state=True, scale=0.7, chunk_size=64,
         impls=("xla",)),
    Case("segments_T64", T=64, D=4, E=3, decay="head", state=True, chunk_size=2, impls=("xla",)),
    Case("segments_T37", T=37, D=4, E=3, decay="head", state=True, chunk_size=2, impls=("xla",)),
] + [  # the head groupings every family is checked with (H, Hkv); the kernel sees repeated heads
    Case(f"gqa_{H}_{Hkv}", T=20, H=H, Hkv=Hkv, D=8, E=5, decay="token", state=True, scale=0.7, chunk_size=16,
         impls=("xla", "recurrent", "pallas") if (H, Hkv) == (6, 2) else ("xla",))
    for H, Hkv in GROUPINGS if H != Hkv
]
CASE = {case.name: case for case in CASES}


def case_inputs(case: Case, seed: int = 0):
    """Fresh random ``(q, k, v, log_decay, initial_state)`` for ``case`` (numpy RNG: no compiles)."""
    rng = np.random.default_rng(seed)
    B, T, H, G, D, E = case.B, case.T, case.H, case.kv_heads, case.D, case.E
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, G, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, G, E)), jnp.float32)
    per_token = jnp.asarray(-np.log1p(np.exp(rng.standard_normal((B, T, H)))), jnp.float32)
    decay = {"none": None, "head": per_token[0, 0], "token": per_token}[case.decay]
    state = jnp.asarray(rng.standard_normal((B, H, D, E)), jnp.float32) if case.state else None
    return q, k, v, decay, state


def _public(impl, chunk):
    def fn(case, q, k, v, a, s0):
        return linear_attention(q, k, v, log_decay=a, causal=case.causal, scale=case.scale, initial_state=s0,
                                return_final_state=True, chunk_size=chunk(case), impl=impl)
    return fn


IMPLS = {
    "reference": _public("reference", lambda case: 64),
    "xla": _public("xla", lambda case: case.chunk_size),
    "recurrent": _public("recurrent", lambda case: case.chunk_size),
    "pallas": _public("pallas", lambda case: case.kernel_chunk),    # the kernel (interpreter on CPU)
}


@functools.lru_cache(maxsize=None)
def outputs_and_grads(impl: str, case: Case):
    """``(out, final state)`` and the gradients of a random-weighted sum of both w.r.t. every array input."""
    q, k, v, a, s0 = case_inputs(case)
    rng = np.random.default_rng(1)
    w_out = jnp.asarray(rng.standard_normal((case.B, case.T, case.H, case.E)), jnp.float32)
    w_state = jnp.asarray(rng.standard_normal((case.B, case.H, case.D, case.E)), jnp.float32)

    def loss(q, k, v, a, s0):
        out, state = IMPLS[impl](case, q, k, v, a, s0)
        return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(state * w_state), (out, state)

    grads, outs = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(q, k, v, a, s0)
    return outs, grads


def check_against_reference(impl: str, case: Case):
    """``impl`` equals the quadratic reference on ``case``: output, final state and every gradient."""
    (out, state), grads = outputs_and_grads(impl, case)
    (want_out, want_state), want_grads = outputs_and_grads("reference", case.inputs_key)
    chex.assert_shape(out, (case.B, case.T, case.H, case.E))
    chex.assert_shape(state, (case.B, case.H, case.D, case.E))
    assert np.isfinite(np.asarray(out)).all(), "non-finite output (an unwritten NaN-poisoned tile?)"
    assert_close(out, want_out, what=f"{impl} out")
    assert_close(state, want_state, what=f"{impl} final state")
    for name, got, want in zip(("dq", "dk", "dv", "dlog_decay", "dinitial_state"), grads, want_grads):
        if want is not None:
            assert_close(got, want, factor=_grad_factor(name, case), what=f"{impl} {name}")


def _grad_factor(name: str, case: Case) -> float:
    """Gradients get twice the output's tolerance; a per-head decay's gradient four times: it is one number per
    head summed over every (t, d, e) product of the sequence, so its float32 error grows with T. segments_T64
    (chunk 2, 32 chunks): the xla path is 3.3e-4 off a float64 reference (2.0e-5 of the scale 16.07, just over
    the factor-2 bound 3.2e-4), the quadratic float32 reference 7.6e-6."""
    return 4.0 if name == "dlog_decay" and case.decay == "head" else 2.0


@pytest.mark.parametrize("impl, case", [
    pytest.param(impl, case, id=f"{impl}-{case.name}")
    for impl in ("xla", "recurrent", "pallas") for case in CASES if impl in case.impls])
def test_matches_reference(impl, case):
    check_against_reference(impl, case)


def test_noncausal_reference_is_the_closed_form():
    """The oracle's non-causal form: ``o = scale q (S_0 + K^T V)``, ``S_T = S_0 + K^T V``."""
    case = CASE["noncausal_state"]
    q, k, v, _, s0 = case_inputs(case)
    (out, state), _ = outputs_and_grads("reference", case.inputs_key)
    kv = np.einsum("bthd,bthe->bhde", k, v) + np.asarray(s0)
    assert_close(out, case.scale * np.einsum("bthd,bhde->bthe", q, kv))
    assert_close(state, kv)


# ---------------------------------------------------------------------------------------------------
# Properties beyond the table


@functools.lru_cache(maxsize=None)
def _jitted(static_items):
    static = dict(static_items)
    return jax.jit(lambda q, k, v, a, s0: linear_attention(q, k, v, log_decay=a, initial_state=s0, **static))


def run(q, k, v, log_decay=None, initial_state=None, **static):
    """linear_attention under jit (eager dispatch compiles op by op: far slower on CPU)."""
    return _jitted(tuple(sorted(static.items())))(q, k, v, log_decay, initial_state)


def make_inputs(seed, B=2, T=37, H=3, D=8, E=5, dtype=jnp.float32):
    """Fresh random q, k, v, per-token log-decays (< 0) and an initial state (numpy RNG: no compiles)."""
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.standard_normal((B, T, H, D)), dtype) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, T, H, E)), dtype)
    per_token = jnp.asarray(-np.log1p(np.exp(rng.standard_normal((B, T, H)))), jnp.float32)
    state = jnp.asarray(rng.standard_normal((B, H, D, E)), jnp.float32)
    return q, k, v, per_token, state


def decay_of(kind, per_token):
    return {"none": None, "head": per_token[0, 0], "token": per_token}[kind]


@pytest.mark.parametrize("transform", [jax.jit, lambda f: f], ids=["jit", "eager"])
def test_traced_and_eager_runs_agree(transform):
    """The same op traced by jax.jit and run eagerly, on one tiny case: both equal the reference."""
    case = CASE["no_decay_state"]
    q, k, v, _, s0 = case_inputs(case)
    fn = transform(lambda q, k, v, s0: linear_attention(q, k, v, initial_state=s0, scale=case.scale, chunk_size=4,
                                                         impl="xla", return_final_state=True))
    out, state = fn(q, k, v, s0)
    (want_out, want_state), _ = outputs_and_grads("reference", case.inputs_key)
    assert_close(out, want_out)
    assert_close(state, want_state)


def test_second_call_with_the_same_shapes_does_not_retrace_and_is_deterministic():
    case = CASE["token_decay_state"]
    first, second = case_inputs(case, seed=11), case_inputs(case, seed=12)

    def fn(q, k, v, a, s0):
        return linear_attention(q, k, v, log_decay=a, initial_state=s0, return_final_state=True, impl="xla",
                                chunk_size=8)

    results = assert_traced_once(fn, first, second, first)
    assert not np.allclose(np.asarray(results[0][0]), np.asarray(results[1][0]))
    for a, b in zip(jax.tree_util.tree_leaves(results[0]), jax.tree_util.tree_leaves(results[2])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_reference_matches_explicit_loop():
    """The oracle itself against a literal Python loop of S_t = lambda_t S_{t-1} + k_t^T v_t."""
    q, k, v, per_token, s0 = make_inputs(1, B=1, T=6, H=2, D=3, E=4)
    out, final = run(q, k, v, log_decay=per_token, initial_state=s0, scale=0.5,
                     return_final_state=True, impl="reference")
    q, k, v, a, s = map(np.asarray, (q, k, v, per_token, s0))
    expected = np.zeros(out.shape)
    for t in range(6):
        s = np.exp(a[:, t])[:, :, None, None] * s + k[:, t, :, :, None] * v[:, t, :, None, :]
        expected[:, t] = 0.5 * np.einsum("bhd,bhde->bhe", q[:, t], s)
    assert_close(out, expected)
    assert_close(final, s)


def test_no_decay_equals_cumsum_form():
    q, k, v, _, _ = make_inputs(3)
    cumulative_kv = np.cumsum(np.einsum("bthd,bthe->bthde", k, v), axis=1)
    expected = np.einsum("bthd,bthde->bthe", q, cumulative_kv)
    assert_close(run(q, k, v, impl="xla", chunk_size=8), expected)


def test_large_decay_keeps_only_the_diagonal():
    """log_decay -> -inf: o_t = (q_t . k_t) v_t; the chunked form must stay finite (no exp overflow)."""
    q, k, v, _, _ = make_inputs(4, T=70)
    huge = jnp.full((3,), -80.0)
    expected = np.einsum("bthd,bthd->bth", q, k)[..., None] * np.asarray(v)
    for impl in ("xla", "recurrent", "reference"):
        out = run(q, k, v, log_decay=huge, impl=impl, chunk_size=32)
        assert np.isfinite(np.asarray(out)).all()
        assert_close(out, expected)


def _recurrence_float64(q, k, v, log_decay):
    """``S_t = exp(a_t) S_{t-1} + k_t v_t^T``, ``o_t = q_t S_t`` in float64 numpy (per-token decay [B, T, H])."""
    q, k, v, a = (np.asarray(x, np.float64) for x in (q, k, v, log_decay))
    B, T, H, D = q.shape
    state, out = np.zeros((B, H, D, v.shape[-1])), np.zeros((B, T, H, v.shape[-1]))
    for t in range(T):
        state = np.exp(a[:, t])[..., None, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        out[:, t] = np.einsum("bhd,bhde->bhe", q[:, t], state)
    return out


def test_long_sequence_per_token_decay_is_numerically_safe():
    """Cumulative log-decay reaches -20000: the chunked form's exponents stay relative to chunk starts (else
    exp overflows: non-finite output). Checked against the float64 recurrence; on this extreme input the chunked
    float32 form's own error is 1.0e-5 of the output scale (0.000252 at scale 25.3, LLVM -O1 and -O2 alike), the
    float32 table's bound itself, so it gets twice that (the float32 recurrence is at 2e-6)."""
    q, k, v, _, _ = make_inputs(5, B=1, T=500, H=2, D=4, E=4)
    decay = jnp.full((1, 500, 2), -40.0).at[:, ::7].set(-0.01)
    out = run(q, k, v, log_decay=decay, impl="xla", chunk_size=64)
    assert np.isfinite(np.asarray(out)).all()
    exact = _recurrence_float64(q, k, v, decay)
    assert_close(out, exact, factor=2.0)
    assert_close(run(q, k, v, log_decay=decay, impl="recurrent"), exact)


@pytest.mark.parametrize("kind", ["head", "token"])
def test_decode_steps_continue_a_prefill_exactly(kind):
    q, k, v, per_token, _ = make_inputs(6, T=21)
    decay = decay_of(kind, per_token)
    full = run(q, k, v, log_decay=decay, scale=0.9, impl="reference")
    prefix = 13
    prefill_decay = decay if kind == "head" else decay[:, :prefix]
    out, state = run(q[:, :prefix], k[:, :prefix], v[:, :prefix], log_decay=prefill_decay,
                     scale=0.9, return_final_state=True, impl="xla", chunk_size=4)
    assert_close(out, full[:, :prefix])
    step = jax.jit(lambda q, k, v, s, a: linear_attention_step(q, k, v, s, log_decay=a, scale=0.9))
    for t in range(prefix, 21):
        step_decay = decay if kind == "head" else decay[:, t]
        o_t, state = step(q[:, t], k[:, t], v[:, t], state, step_decay)
        assert_close(o_t, full[:, t])


def test_prefill_with_state_composes():
    """Processing [x1; x2] equals processing x2 starting from x1's final state."""
    q, k, v, per_token, s0 = make_inputs(7, T=30)
    whole, whole_state = run(q, k, v, log_decay=per_token, initial_state=s0,
                             return_final_state=True, impl="xla", chunk_size=8)
    cut = 17
    first, state = run(q[:, :cut], k[:, :cut], v[:, :cut], log_decay=per_token[:, :cut],
                       initial_state=s0, return_final_state=True, impl="xla", chunk_size=8)
    second, final = run(q[:, cut:], k[:, cut:], v[:, cut:], log_decay=per_token[:, cut:],
                        initial_state=state, return_final_state=True, impl="xla", chunk_size=8)
    assert_close(jnp.concatenate([first, second], axis=1), whole)
    assert_close(final, whole_state)


def test_feature_split_additivity():
    """q k^T is additive over feature chunks: splitting D and summing outputs is exact (P74's d > 128 split)."""
    q, k, v, per_token, _ = make_inputs(8, D=8)
    whole = run(q, k, v, log_decay=per_token, impl="xla", chunk_size=8)
    parts = sum(run(q[..., s], k[..., s], v, log_decay=per_token, impl="xla", chunk_size=8)
                for s in (slice(0, 3), slice(3, 8)))
    assert_close(parts, whole)


@pytest.mark.parametrize("impl, B, T, H, decay_kind, scale", [("xla", 2, 37, 3, "token", 0.25),
                                                            ("pallas", 1, 33, 2, "head", 1.0)])
def test_bfloat16_inputs_give_bfloat16_outputs_close_to_float32(impl, B, T, H, decay_kind, scale):
    q, k, v, per_token, _ = make_inputs(10, B=B, T=T, H=H, D=16, E=16)
    decay = decay_of(decay_kind, per_token)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = run(*bf, log_decay=decay, scale=scale, impl=impl, chunk_size=16)
    assert out.dtype == jnp.bfloat16
    ref = run(*[x.astype(jnp.float32) for x in bf], log_decay=decay, scale=scale, impl="reference")
    assert_close(out, ref, jnp.bfloat16)


@settings(max_examples=5, deadline=None)
@given(T=st.integers(1, 40), D=st.integers(1, 9), E=st.integers(1, 9), chunk=st.integers(1, 17),
       kind=st.sampled_from(["none", "head", "token"]), seed=st.integers(0, 2 ** 16))
def test_chunked_equals_reference_property(T, D, E, chunk, kind, seed):
    q, k, v, per_token, s0 = make_inputs(seed, B=1, T=T, H=2, D=D, E=E)
    decay = decay_of(kind, per_token)
    ref = run(q, k, v, log_decay=decay, initial_state=s0, impl="reference")
    out = run(q, k, v, log_decay=decay, initial_state=s0, impl="xla", chunk_size=chunk)
    assert_close(out, ref)


# ---------------------------------------------------------------------------------------------------
# GQA / MQA: k, v with fewer heads than q


def group_sum(x, groups):
    """``[B, T, H, F] -> [B, T, H / groups, F]``: sums each run of ``groups`` consecutive query heads."""
    B, T, H, F = x.shape
    return x.reshape(B, T, H // groups, groups, F).sum(axis=3)


# GQA 4/2 and MQA 4/1 on the oracle. Every impl gets the same head repetition before dispatch, and the
# table checks each impl == reference on the GQA/MQA groupings: with this test, each impl == repeated kv.
GQA_CASES = [("reference", 2, True), ("reference", 2, False), ("reference", 1, True)]


@pytest.mark.parametrize("impl, hkv, causal", GQA_CASES)
def test_gqa_equals_explicitly_repeated_kv(impl, hkv, causal):
    """Query head h reads kv head h // (H / Hkv): the GQA call equals the same call with k, v repeated per
    group (forward, final state, and gradients; dk, dv are the repeated call's summed over each group).

    Mutations caught: kv heads tiled (h reads h % Hkv) instead of repeated; GQA rejected or unbroadcast."""
    H, G = 4, 4 // hkv
    q, _, _, per_token, s0 = make_inputs(20, B=1, T=20, H=H, D=8, E=5)
    rng = np.random.default_rng(21)
    k = jnp.asarray(rng.standard_normal((1, 20, hkv, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 20, hkv, 5)), jnp.float32)
    common = dict(log_decay=per_token if causal else None, initial_state=s0, scale=0.7, causal=causal,
                  return_final_state=True, impl=impl, chunk_size=16)
    w_out = jnp.asarray(rng.standard_normal((1, 20, H, 5)), jnp.float32)
    w_state = jnp.asarray(rng.standard_normal(s0.shape), jnp.float32)

    def loss(q, k, v):
        out, state = run(q, k, v, **common)
        return jnp.sum(out * w_out) + jnp.sum(state * w_state), (out, state)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    (dq, dk, dv), (out, state) = grads(q, k, v)
    (dq_r, dk_r, dv_r), (out_r, state_r) = grads(q, jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2))
    assert out.shape == (1, 20, H, 5) and state.shape == (1, H, 8, 5)
    assert_close(out, out_r)
    assert_close(state, state_r)
    assert_close(dq, dq_r, factor=2)
    assert_close(dk, group_sum(dk_r, G), factor=2)
    assert_close(dv, group_sum(dv_r, G), factor=2)
    if hkv > 1:   # the pairing is h // G, not h % Hkv: tiled kv heads give a different result
        tiled = run(q, jnp.tile(k, (1, 1, G, 1)), jnp.tile(v, (1, 1, G, 1)), **common)[0]
        assert np.abs(np.asarray(tiled) - np.asarray(out)).max() > 1e-2


def test_gqa_head_count_errors_name_the_argument():
    q, k, v, _, _ = make_inputs(22, B=1, T=4, H=4, D=3, E=5)
    with pytest.raises(ValueError, match=r"k must have the shape of q .*H=4 a multiple of Hkv"):
        linear_attention(q, k[:, :, :3], v[:, :, :3])                  # 4 % 3 != 0
    with pytest.raises(ValueError, match=r"v must have shape \[B, T, Hkv, E\]"):
        linear_attention(q, k[:, :, :2], v)                            # v must follow k's heads
    with pytest.raises(ValueError, match=r"k must have the shape of q"):
        linear_attention(q[:, :, :2], k, v)                            # more kv heads than q heads


# ---------------------------------------------------------------------------------------------------
# Decay constructors


def test_alibi_log_decay_matches_alibi_slopes():
    np.testing.assert_allclose(alibi_log_decay(8), -(2.0 ** -np.arange(1, 9)), rtol=1e-6)
    # non-power-of-two H: ALiBi's interleave of the next power's slopes
    expected_6 = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    np.testing.assert_allclose(alibi_log_decay(6), -np.asarray(expected_6), rtol=1e-6)
    # TransNormerLLM's per-layer factor 1 - l/(L-1) + 1e-5: the last layer barely decays
    np.testing.assert_allclose(alibi_log_decay(8, layer=3, num_layers=4), -(2.0 ** -np.arange(1, 9)) * 1e-5,
                               rtol=1e-5)
    np.testing.assert_allclose(alibi_log_decay(8, layer=0, num_layers=4), alibi_log_decay(8) * (1 + 1e-5),
                               rtol=1e-6)


def test_linear_log_decay_is_linear_in_head_index():
    decay = np.asarray(linear_log_decay(8, layer=1, num_layers=4))
    np.testing.assert_allclose(decay, -(8.0 * np.arange(8) / 8) * 0.75, rtol=1e-6)
    assert np.allclose(np.diff(decay), decay[1] - decay[0])


# ---------------------------------------------------------------------------------------------------
# Argument errors: raised before any kernel runs, naming the argument


def _errors():
    q, k, v, per_token, s0 = make_inputs(12, B=1, T=4, H=2, D=3, E=5)
    return [
        (dict(q=q[0]), ValueError, "q must have rank 4"),
        (dict(q=q.astype(jnp.int32)), TypeError, "q must have a floating dtype"),
        (dict(k=k[:, :3]), ValueError, "k must have the shape of q"),
        (dict(v=v[:, :, :1]), ValueError, "v must have shape"),
        (dict(v=v.astype(jnp.bfloat16)), TypeError, "share one dtype"),
        (dict(log_decay=per_token[..., :1]), ValueError, "log_decay must have shape"),
        (dict(log_decay=jnp.zeros((2,), jnp.int32)), TypeError, "log_decay must have a floating dtype"),
        (dict(log_decay=per_token[0, 0], causal=False), ValueError, "log_decay needs causal=True"),
        (dict(initial_state=s0[..., :2]), ValueError, "initial_state must have shape"),
        (dict(scale="big"), TypeError, "scale"),
        (dict(scale=math.inf), ValueError, "scale must be finite"),
        (dict(chunk_size=0), ValueError, "chunk_size must be an int >= 1"),
        (dict(chunk_size=2.0), TypeError, "chunk_size must be an int"),
        (dict(chunk_size=24, impl="pallas"), ValueError, "chunk_size must be a power of two"),
        (dict(impl="cuda"), ValueError, "impl must be one of"),
        (dict(causal=1), TypeError, "causal must be a bool"),
        (dict(return_final_state="yes"), TypeError, "return_final_state must be a bool"),
    ], (q, k, v)


def test_argument_errors_name_the_argument():
    cases, (q, k, v) = _errors()
    for overrides, error, message in cases:
        args = dict(q=q, k=k, v=v)
        args.update({name: overrides.pop(name) for name in ("q", "k", "v") if name in overrides})
        with pytest.raises(error, match=message):
            linear_attention(args["q"], args["k"], args["v"], **overrides)


def test_step_and_constructor_errors():
    q, k, v, _, s0 = make_inputs(13, B=1, T=2, H=2, D=3, E=5)
    with pytest.raises(ValueError, match="state must have shape"):
        linear_attention_step(q[:, 0], k[:, 0], v[:, 0], s0[..., :1])
    with pytest.raises(ValueError, match="k_t must have the shape"):
        linear_attention_step(q[:, 0], k[:, 0, :1], v[:, 0], s0)
    with pytest.raises(ValueError, match="log_decay must have shape"):
        linear_attention_step(q[:, 0], k[:, 0], v[:, 0], s0, log_decay=jnp.zeros((3,)))
    with pytest.raises(ValueError, match="num_heads"):
        alibi_log_decay(0)
    with pytest.raises(ValueError, match="layer"):
        alibi_log_decay(8, layer=4, num_layers=4)
