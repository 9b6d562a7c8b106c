"""CPU benchmark: 2-D neighborhood attention vs dense attention over the same tokens, in one run.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/cpu_neighborhood.py [--grids 64 128] [--kernel 13] [--reps 3]

B=1, H=8, D=64, float32, a square grid of G x G tokens, kernel K x K, forward only. Rows: jattn
``neighborhood_attention`` (xla), jattn dense xla ``attention`` over the G*G flattened tokens, PyTorch's
dense CPU ``scaled_dot_product_attention`` (if torch is installed), and NATTEN's own CPU (flex)
backend when ``natten`` imports (for example ``PYTHONPATH=<NATTEN checkout>/src``; it is skipped at
grids above ``--natten-max-grid``). For NATTEN the script also prints the largest difference between
its output and jattn's. Targets at 128 x 128, K=13: >= 15x vs jattn dense, >= 10x vs torch SDPA.
"""
from __future__ import annotations

import argparse
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from cpu import best_times  # benchmarks/cpu.py (the script's folder is on sys.path)
from jattn.ops.attention import attention
from jattn.ops.neighborhood import neighborhood_attention

B, H, D = 1, 8, 64


def best_time(fn, reps: int) -> float:
    return best_times({"run": fn}, reps)["run"]


def jax_time(fn, args, reps: int) -> float:
    compiled = jax.jit(fn).lower(*args).compile()
    return best_time(lambda: jax.block_until_ready(compiled(*args)), reps)


def torch_sdpa_time(q, k, v, reps: int):
    try:
        import torch
    except ImportError:
        return None
    tq, tk, tv = (torch.from_numpy(np.array(x).reshape(B, -1, H, D)).permute(0, 2, 1, 3).contiguous()
                  for x in (q, k, v))
    with torch.no_grad():
        return best_time(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv), reps)


def natten_run(q, k, v, kernel: int, reps: int):
    """``(time, output)`` of NATTEN's flex backend on CPU, or None when natten is not importable."""
    try:
        import torch
        from natten.functional import na2d
    except ImportError:
        return None
    tq, tk, tv = (torch.from_numpy(np.array(x)) for x in (q, k, v))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = lambda: na2d(tq, tk, tv, kernel_size=kernel, backend="flex-fna")
        return best_time(run, reps), run().numpy()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--grids", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--kernel", type=int, default=13)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--natten-max-grid", type=int, default=64)
    args = parser.parse_args()
    K = args.kernel
    print(f"backend {jax.default_backend()}, jax {jax.__version__}, B={B} H={H} D={D} f32, kernel {K}x{K}, forward")
    print(f"{'grid':>9} {'tokens':>7} {'jattn NA':>9} {'dense xla':>10} {'torch SDPA':>11} {'NATTEN':>8} "
          f"{'xla/NA':>7} {'torch/NA':>9} {'NATTEN/NA':>10}")
    for G in args.grids:
        keys = jax.random.split(jax.random.PRNGKey(G), 3)
        q, k, v = (jax.random.normal(key, (B, G, G, H, D), jnp.float32) for key in keys)
        na = lambda q, k, v: neighborhood_attention(q, k, v, K, impl="xla")
        t_na = jax_time(na, (q, k, v), args.reps)
        flat = lambda x: x.reshape(B, G * G, H, D)
        t_dense = jax_time(lambda q, k, v: attention(flat(q), flat(k), flat(v), impl="xla"), (q, k, v),
                           max(1, args.reps // 2))
        t_torch = torch_sdpa_time(q, k, v, max(1, args.reps // 2))
        natten = natten_run(q, k, v, K, 1) if G <= args.natten_max_grid else None
        fmt = lambda t: f"{t:.3f}" if t is not None else "-"
        ratio = lambda t: f"{t / t_na:.1f}x" if t is not None else "-"
        t_natten = natten[0] if natten else None
        print(f"{G:>4}x{G:<4} {G * G:>7} {t_na:>9.3f} {t_dense:>10.3f} {fmt(t_torch):>11} {fmt(t_natten):>8} "
              f"{ratio(t_dense):>7} {ratio(t_torch):>9} {ratio(t_natten):>10}", flush=True)
        if natten:
            diff = float(np.max(np.abs(natten[1] - np.asarray(na(q, k, v)))))
            print(f"          max |NATTEN - jattn| = {diff:.2e}")


if __name__ == "__main__":
    main()
