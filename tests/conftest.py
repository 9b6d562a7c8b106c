"""Shared test configuration: deterministic hypothesis profile, random-input helpers, THE tolerance table,
THE head groupings, one ``assert_close`` and the trace-count check every family's test base uses."""
import os
import pathlib

# 8 host CPU devices for the distributed tests (tests/test_distributed.py); must precede JAX's first use.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The suite's time is XLA's compiler (83% of it in a sampled directory: thousands of tiny programs, each run
# once or twice). JATTN_TEST_LLVM_O1=1 compiles with LLVM at -O1 on top of the default below.
if os.environ.get("JATTN_TEST_LLVM_O1", "0") == "1" and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=1"

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings

settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True, print_blob=True,
                          phases=[p for p in Phase if p is not Phase.shrink],
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The suite compiles a few thousand tiny programs and runs each once or twice, so XLA's backend optimisation
# passes cost more than they save (-30% CPU time on tests/core + tests/methods/routing: 180 -> 127 s).
# JATTN_TEST_FAST_COMPILE=0 turns them back on. XLA's CPU compiler has segfaulted, rarely and at random places,
# in full runs with them off, with them on and at LLVM -O1 alike (2026-12-01/02); `make test` re-runs a test whose
# worker process died once, on a fresh worker (pytest-rerunfailures; ordinary failures are never re-run).
# A test whose assertion is about the optimised program (compiled memory or FLOPs) is marked
# ``@pytest.mark.optimized`` and always compiles with the passes on.
OPTIMIZE_ALL = os.environ.get("JATTN_TEST_FAST_COMPILE", "1") != "1"
jax.config.update("jax_disable_most_optimizations", not OPTIMIZE_ALL)

FULL_TIER_LIST = pathlib.Path(__file__).with_name("full_tier.txt")


def pytest_addoption(parser):
    parser.addoption("--full-tier", action="store_true",
                     help="also run the tests listed in tests/full_tier.txt (make test-all); see tests/full_tier.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "optimized: compile with XLA's optimisation passes on (memory/FLOP checks)")


def pytest_collection_modifyitems(config, items):
    """Without ``--full-tier``, leaves out the end-to-end experiment runs and the costly sweep variants that
    ``tests/full_tier.txt`` lists (``tests/full_tier.py`` chooses them by rule from measured times)."""
    if config.getoption("--full-tier"):
        return
    listed = set(FULL_TIER_LIST.read_text().splitlines())
    deselected = [item for item in items if item.nodeid in listed]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.nodeid not in listed]


@pytest.fixture(autouse=True)
def _optimisation_passes(request):
    """Turns XLA's optimisation passes back on for tests marked ``optimized``."""
    if OPTIMIZE_ALL or request.node.get_closest_marker("optimized") is None:
        yield
        return
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", True)

# Tolerances relative to the reference's scale (DESIGN.md); gradients get twice as much.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}
if jax.default_backend() == "gpu":  # f32 dots run as TF32 on GPU
    TOLERANCE[jnp.float32] = 2e-3


# (H, Hkv) head groupings every family is checked with: MHA, MQA, GQA 2:1, GQA 3:1.
GROUPINGS = [(1, 1), (4, 1), (8, 4), (6, 2)]


def assert_traced_once(fn, *calls):
    """``jax.jit(fn)`` called on each argument tuple in ``calls`` (same shapes, fresh values) traces once:
    static configuration is hashable and stable, so a second call with the same shapes reuses the program."""
    chex.clear_trace_counter()

    def traced(*args):  # chex counts traces of a plain function (not a partial)
        return fn(*args)
    jitted = jax.jit(chex.assert_max_traces(traced, n=1))
    return [jax.block_until_ready(jitted(*args)) for args in calls]


def random_qkv(seed: int, B: int, T: int, S: int, H: int, Hkv: int, D: int, dtype=jnp.float32):
    """Fresh normal q [B,T,H,D], k, v [B,S,Hkv,D] (never zeros)."""
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, Hkv, D), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, Hkv, D), jnp.float32).astype(dtype)
    return q, k, v


def assert_close(actual, expected, dtype=jnp.float32, factor: float = 1.0, what: str = ""):
    """|actual - expected| <= tol * max(1, max|expected|), with tol from TOLERANCE[dtype]."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual) == np.isfinite(expected)), f"{what}: finiteness differs"
    finite = np.isfinite(expected)
    scale = max(1.0, float(np.max(np.abs(expected[finite]), initial=0.0)))
    err = float(np.max(np.abs(actual[finite] - expected[finite]), initial=0.0))
    tol = TOLERANCE[dtype] * factor * scale
    assert err <= tol, f"{what}: max error {err:.3g} > tolerance {tol:.3g}"


@pytest.fixture
def qkv_factory():
    return random_qkv


def outputs_and_grads(fn, q, k, v, weights):
    """``(fn(q, k, v), d/d(q, k, v) of sum(weights * out))``, compiled once."""
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * weights), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def assert_matches(fn, reference_fn, q, k, v, seed: int):
    """``fn`` equals ``reference_fn`` forward and in the q/k/v gradients of a random-weighted sum of the
    output; returns ``fn``'s output."""
    weights = jax.random.normal(jax.random.PRNGKey(seed), q.shape)
    out, grads = outputs_and_grads(fn, q, k, v, weights)
    want, want_grads = outputs_and_grads(reference_fn, q, k, v, weights)
    assert np.isfinite(np.asarray(out)).all()
    assert_close(out, want, what="out")
    for name, g, wg in zip("qkv", grads, want_grads):
        assert_close(g, wg, factor=2, what=f"d{name}")
    return out


def masked_reference(mask):
    """The fp32 oracle with a fixed boolean ``mask``, as a function of ``(q, k, v)``."""
    from jattn.core.reference import reference_attention
    return lambda q, k, v: reference_attention(q, k, v, mask=jnp.asarray(mask))


def numpy_qkv(seed: int, B: int, T: int, S: int, H: int, Hkv: int, D: int):
    """Like ``random_qkv`` but drawn with NumPy: no per-shape compile of a JAX RNG."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32))
                 for shape in ((B, T, H, D), (B, S, Hkv, D), (B, S, Hkv, D)))


def random_like(seed: int, x):
    """A fresh normal array of ``x``'s shape (float32, NumPy-drawn)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(x.shape, np.float32))


def vjp_run(fn, q, k, v, w):
    """``fn(q, k, v)`` and the gradients of ``sum(w * fn(q, k, v))`` w.r.t. q, k, v."""
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(w)


@jax.jit
def dense_vjp_run(q, k, v, w, mask):
    """The dense fp32 oracle with an explicit mask, forward and gradients (compiled once per shape)."""
    from jattn.core.reference import reference_attention
    return vjp_run(lambda q, k, v: reference_attention(q, k, v, mask=mask), q, k, v, w)


def random_array(seed: int, *shape):
    """A normal float32 array of ``shape``, NumPy-drawn (in float64, then cast): no per-shape compile."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def forward_and_grads(fn, q, k, v, seed: int = 99):
    """``(fn(q, k, v), (dq, dk, dv))``: the gradients of ``sum(w * fn(q, k, v))`` for ``w =
    random_array(seed, ...)``, forward and backward in one jit."""
    weights = random_array(seed, *jax.eval_shape(fn, q, k, v).shape)
    return jax.jit(lambda q, k, v, w: vjp_run(fn, q, k, v, w))(q, k, v, weights)


def assert_forward_and_grads_close(result, expected, what: str = ""):
    """Two ``(out, (dq, dk, dv))`` results agree: the output at the tolerance, the gradients at twice it."""
    (out, grads), (ref_out, ref_grads) = result, expected
    assert_close(out, ref_out, what=f"{what} out".strip())
    for g, r, n in zip(grads, ref_grads, "qkv"):
        assert_close(g, r, factor=2.0, what=f"{what} d{n}".strip())


def build_module(constructor, seed: int = 0, scale: float = 0.3):
    """An NNX module with fresh random parameters, built without compiling its initializers (eval_shape,
    then NumPy normals times ``scale``): eager initializers cost a compile per parameter shape."""
    from flax import nnx
    graphdef, state = nnx.split(nnx.eval_shape(constructor))
    rng = np.random.default_rng(seed)
    state = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * scale, s.dtype), state)
    return nnx.merge(graphdef, state)


def assert_close_to_scale(actual, expected, dtype=jnp.float32, factor: float = 1.0, what: str = ""):
    """The strict form of ``assert_close``: ``|actual - expected| <= tol * max|expected|`` over the finite
    entries (no floor of 1 on the scale), no NaN in ``actual``, and the same infinities (sign included)."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert not np.isnan(actual).any(), f"{what}: NaN in the result"
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(actual[~finite], expected[~finite], err_msg=f"{what}: infinities differ")
    scale = max(float(np.abs(expected[finite]).max(initial=0.0)), 1e-6)
    err = float(np.abs(actual[finite] - expected[finite]).max(initial=0.0))
    tol = TOLERANCE[dtype] * factor
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * scale {scale:.3g}"
