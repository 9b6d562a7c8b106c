"""Ring attention's memory on 8 host devices vs single-device flash (issue 13 target: per-device temp
memory <= 1/4 of single-device flash at T = 32K), from the compiled programs' memory analysis.

Causal, f32, B=1, H=8, Hkv=8, D=64. The numbers are XLA's ``memory_analysis()`` of the compiled forward, and
of forward + backward (``jax.grad`` of the sum for q, k, v) (``temp_size_in_bytes``: scratch beyond arguments
and outputs; for the sharded program, per device), so this compiles but does not run the 32K attention. Also prints the per-device KV bytes of the ring from
``jattn.distributed.kv_memory_per_device``: its own K/V shard (an argument) and the two in flight (temp).

    python benchmarks/cpu_distributed.py [--lengths 8192 32768] [--devices 8]
"""
from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":
    devices = sys.argv[sys.argv.index("--devices") + 1] if "--devices" in sys.argv else "8"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jattn  # noqa: E402
from jattn.distributed import kv_memory_per_device, ring_attention  # noqa: E402

B, H, D = 1, 8, 64


def temp_mib(fn, *args) -> float:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--devices", type=int, default=8)
    args = parser.parse_args()
    n = args.devices
    mesh = Mesh(np.array(jax.devices()[:n]), ("seq",))
    print(f"jax {jax.__version__}; {n} host devices; causal f32 B={B} H=Hkv={H} D={D}; compiled temp memory")
    print(f"{'T':>6} {'pass':>8} {'flash MiB':>10} {'ring MiB/device':>16} {'ratio':>6} {'ring KV MiB/device':>19}")

    def flash(q, k, v):
        return jattn.attention(q, k, v, causal=True, impl="xla")

    def ring(q, k, v):
        return ring_attention(q, k, v, mesh=mesh, axis="seq", causal=True, impl="xla", reorder=False)

    def with_grad(fn):
        return jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2))

    for T in args.lengths:
        x = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
        sharded = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32, sharding=NamedSharding(mesh, P(None, "seq")))
        kv = kv_memory_per_device(form="ring", context=T, devices=n, batch=B, kv_heads=H, head_dim=D)
        kv = (kv.resident + kv.in_flight) / 2**20
        for name, wrap in (("forward", lambda fn: fn), ("fwd+bwd", with_grad)):
            single = temp_mib(jax.jit(wrap(flash)), x, x, x)
            per_device = temp_mib(jax.jit(wrap(ring)), sharded, sharded, sharded)
            print(f"{T:>6} {name:>8} {single:>10.1f} {per_device:>16.1f} {per_device / single:>6.2f} {kv:>19.1f}")


if __name__ == "__main__":
    main()
