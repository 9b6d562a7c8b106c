"""One-shot GPU benchmark suite: every jattn kernel against cuDNN / XLA, in under 8 minutes on an H200.

Usage::

    python benchmarks/gpu_suite.py            # GPU: full shapes, JSON to benchmarks/results/
    python benchmarks/gpu_suite.py --smoke    # any machine: tiny shapes, Pallas in interpret mode
    python benchmarks/gpu_suite.py --only flash --out /tmp/r.json

It counts every case's FLOPs first (printed before any timing, so a crash still leaves the floor),
compiles and warms each case up, times it with ``block_until_ready`` and reports medians, prints a
table last (TFLOP/s and the ratio to the case's baseline) and writes JSON.

Case protocol (for sibling modules)
-----------------------------------
Any of ``benchmarks/sparse_cases.py``, ``benchmarks/linear_cases.py`` (and the others listed in
``CASE_MODULES``) may define::

    def gpu_cases(smoke: bool) -> list[dict]

Each dict describes one timed case:

* ``"name"``: unique string, ``family/kernel/variant`` (e.g. ``"sparse/block_sparse/fwd/50%"``);
* ``"fn"``: a callable, ideally ``jax.jit``-ed, run as ``fn(*args)``; its result is waited on with
  ``jax.block_until_ready``;
* ``"args"``: tuple of device arrays (pass arrays as arguments, never close over them: closed-over
  arrays become compile-time constants);
* ``"flops"``: the algorithmic FLOP count of one call (count only work that is not masked away);
* ``"baseline"`` (optional): the ``name`` of another case (from any module) to compare against;
  the table shows ``ratio = TFLOP/s(case) / TFLOP/s(baseline)``;
* ``"bytes"`` (optional): bytes that must move at least once (the memory floor), for memory-bound
  kernels; reported as GB/s.

With ``smoke=True`` a module must return tiny shapes that finish in seconds on a CPU (Pallas with
``interpret=True``; baselines with ``implementation="xla"``). A module that is absent is skipped; a
module that raises while importing or building cases is reported as an error row, and so is a case
that fails to compile or run, without stopping the suite.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from pallas_kernels.attention import BlockSizes, flash_attention  # noqa: E402

CASE_MODULES = ("sparse_cases", "linear_cases", "neighborhood_cases", "decode_cases")
TIME_BUDGET_S = 7.5 * 60  # stop starting new cases after this (the suite must finish in 8 minutes)
PER_CASE_TIMING_S = 2.0   # timed iterations per case stop after this much time (at least 3)


# ------------------------------------------------------------------------------------------
# FLOP counts.
# ------------------------------------------------------------------------------------------

def attention_flops(B, T, S, H, D, *, causal: bool, backward: bool) -> float:
    """Two matmuls of 2*T*S*D each per head; causal does half; backward adds 2.5x (five matmuls)."""
    forward = 4.0 * B * H * T * S * D * (0.5 if causal else 1.0)
    return forward * (3.5 if backward else 1.0)


# ------------------------------------------------------------------------------------------
# The flash cases.
# ------------------------------------------------------------------------------------------

def _with_backward(attention):
    """``(q, k, v, d_out) -> (dq, dk, dv)``, forward included, as a training step would run it."""
    def step(q, k, v, d_out):
        _, vjp = jax.vjp(attention, q, k, v)
        return vjp(d_out)
    return jax.jit(step)


def flash_cases(smoke: bool) -> list[dict]:
    if smoke:
        B, T, H, D = 1, 64, 2, 32
        blocks = dict(block_sizes=BlockSizes(16, 16, 16, 16, 16, 16), interpret=True)
        baseline_impl = "xla"
    else:
        B, T, H, D = 2, 8192, 8, 128
        blocks = dict(block_sizes=BlockSizes(128, 128, 64, 64, 64, 64), interpret=None)  # Triton on the GPU
        baseline_impl = "cudnn"
    dtype = jnp.bfloat16
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, d_out = (jax.random.normal(key, (B, T, H, D), jnp.float32).astype(dtype) for key in keys)
    cases = []
    for causal in (False, True):
        tag = "causal" if causal else "full"

        def flash(q, k, v, causal=causal):
            return flash_attention(q, k, v, causal=causal, scale=D ** -0.5, **blocks)[0]

        def baseline(q, k, v, causal=causal):
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=baseline_impl)

        for backward in (False, True):
            phase = "fwd+bwd" if backward else "fwd"
            flops = attention_flops(B, T, T, H, D, causal=causal, backward=backward)
            args = (q, k, v, d_out) if backward else (q, k, v)
            wrap = _with_backward if backward else jax.jit
            base_name = f"{baseline_impl}/{phase}/{tag}"
            cases.append(dict(name=base_name, fn=wrap(baseline), args=args, flops=flops))
            cases.append(dict(name=f"flash/{phase}/{tag}", fn=wrap(flash), args=args, flops=flops,
                              baseline=base_name))
    return cases


# ------------------------------------------------------------------------------------------
# Collecting and timing cases.
# ------------------------------------------------------------------------------------------

def _normalise(case, source):
    if isinstance(case, (tuple, list)):  # (name, fn, args, flops) is accepted too
        name, fn, args, flops = case
        case = dict(name=name, fn=fn, args=args, flops=flops)
    missing = [key for key in ("name", "fn", "args", "flops") if key not in case]
    if missing:
        raise ValueError(f"{source}: case {case.get('name', case)!r} lacks {missing}")
    return dict(case, source=source)


def collect_cases(smoke: bool, only: str | None):
    cases, errors = [], []
    builders = [("gpu_suite", flash_cases)]
    for module_name in CASE_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                continue  # that family has no benchmark yet
            errors.append(dict(name=module_name, error=f"import failed: {err!r}"))
            continue
        except Exception as err:  # noqa: BLE001 - one broken module must not stop the suite
            errors.append(dict(name=module_name, error=f"import failed: {err!r}"))
            continue
        if hasattr(module, "gpu_cases"):
            builders.append((module_name, module.gpu_cases))
    for source, build in builders:
        try:
            for case in build(smoke):
                cases.append(_normalise(case, source))
        except Exception as err:  # noqa: BLE001
            errors.append(dict(name=source, error=f"building cases failed: {err!r}"))
            traceback.print_exc()
    if only:
        chosen = {c["name"] for c in cases if only in c["name"]}
        chosen |= {c["baseline"] for c in cases if c["name"] in chosen and c.get("baseline")}
        cases = [c for c in cases if c["name"] in chosen]
    return cases, errors


def time_case(case, *, min_iters: int, max_iters: int):
    """Compile + warm up, then time single calls; returns a result dict with the median."""
    fn, args = case["fn"], case["args"]
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))  # compile
    compile_s = time.perf_counter() - start
    jax.block_until_ready(fn(*args))  # warm
    samples = []
    loop_start = time.perf_counter()
    while len(samples) < max_iters and (len(samples) < min_iters
                                        or time.perf_counter() - loop_start < PER_CASE_TIMING_S):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - t0)
    median = statistics.median(samples)
    result = dict(median_ms=median * 1e3, min_ms=min(samples) * 1e3, iters=len(samples),
                  compile_s=compile_s, tflops=case["flops"] / median / 1e12)
    if case.get("bytes"):
        result["gbps"] = case["bytes"] / median / 1e9
    return result


def _row(name, res, ratio):
    if "error" in res:
        return f"{name:<40} {'ERROR: ' + res['error'][:80]}"
    gbps = f"{res['gbps']:8.1f}" if "gbps" in res else f"{'':8}"
    ratio_text = f"{ratio:6.2f}x" if ratio is not None else f"{'':7}"
    return (f"{name:<40} {res['median_ms']:10.3f} {res['tflops']:9.2f} {gbps} {ratio_text} "
            f"{res['iters']:5d} {res['compile_s']:8.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode, any backend")
    parser.add_argument("--only", default=None, help="run cases whose name contains this (plus baselines)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu_suite_<date>.json; "
                                                   "none in --smoke mode unless given)")
    args = parser.parse_args(argv)
    suite_start = time.perf_counter()
    backend = jax.default_backend()
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, backend {backend}, device {getattr(device, 'device_kind', device)}"
          f"{', SMOKE' if args.smoke else ''}", flush=True)
    if not args.smoke and backend != "gpu":
        print("warning: not on a GPU; cuDNN cases will fail (use --smoke on CPU)", flush=True)

    cases, errors = collect_cases(args.smoke, args.only)
    print(f"\n{'case':<40} {'GFLOP':>12}  source")
    for case in cases:
        print(f"{case['name']:<40} {case['flops'] / 1e9:12.3f}  {case['source']}")
    print(flush=True)

    results = {}
    for case in cases:
        if time.perf_counter() - suite_start > TIME_BUDGET_S:
            results[case["name"]] = dict(error="skipped: suite time budget spent")
            continue
        try:
            results[case["name"]] = time_case(case, min_iters=3, max_iters=5 if args.smoke else 50)
        except Exception as err:  # noqa: BLE001 - report and go on
            results[case["name"]] = dict(error=f"{type(err).__name__}: {err}"[:2000])
        res = results[case["name"]]
        status = "error" if "error" in res else f"{res['median_ms']:.3f} ms"
        print(f"  done {case['name']}: {status}", flush=True)

    rows = []
    for case in cases:
        res = results[case["name"]]
        base = results.get(case.get("baseline") or "", {})
        ratio = None
        if "error" not in res and base and "error" not in base:
            ratio = res["tflops"] / base["tflops"]
        res["ratio"] = ratio
        res["baseline"] = case.get("baseline")
        res["flops"] = case["flops"]
        res["source"] = case["source"]
        rows.append(_row(case["name"], res, ratio))
    for err in errors:
        rows.append(_row(err["name"], err, None))

    report = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), jax=jax.__version__,
                  backend=backend, device=str(getattr(device, "device_kind", device)),
                  smoke=args.smoke, wall_s=time.perf_counter() - suite_start, cases=results,
                  errors=errors)
    out = args.out
    if out is None and not args.smoke:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join(HERE, "results", f"gpu_suite_{stamp}.json")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=2, default=str)

    print(f"\n{'case':<40} {'median ms':>10} {'TFLOP/s':>9} {'GB/s':>8} {'ratio':>7} {'iters':>5} "
          f"{'compile':>8}")
    print("\n".join(rows))
    print(f"\nwall {report['wall_s']:.1f} s" + (f"; JSON: {out}" if out else ""), flush=True)
    return 0 if not errors and all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
