"""Dynamic-sparse selectors on synthetic long-context inputs (issue 14): quality and CPU time vs dense.

For each selector and parameter set, ``jattn.eval.sparse_quality`` on ``synthetic_long_qkv`` (sink, stripes,
local band, slashes; ``jattn.methods.dynamic.synthetic``), printed as a markdown table: density of the kept
causal tiles, recall of the dense attention mass, the oracle's recall at the same tiles per head (each
head's heaviest tiles: what a perfect selector gets at that density), relative output error, selection /
sparse attention / dense attention seconds (best of ``--repeats`` compiled runs, ``impl="xla"`` on CPU; the
dense run once for all rows) and the end-to-end speedup ``dense / (select + attention)``.

    .venv/bin/python benchmarks/cpu_dynamic.py              # T=8192, quick
    .venv/bin/python benchmarks/cpu_dynamic.py --T 32768    # the issue's target size (B=1, H=8, D=64, f32)

Issue 14's target: at T=32K, end to end >= 3x faster than dense at recall >= 0.9, selection <= 20% of the
total.
"""
from __future__ import annotations

import argparse

import jax

from jattn.eval import dense_reference, sparse_quality
from jattn.methods.dynamic.flexprefill import flexprefill_block_mask
from jattn.methods.dynamic.hip import hip_block_mask
from jattn.methods.dynamic.kinetics import kinetics_block_mask
from jattn.methods.dynamic.synthetic import synthetic_long_qkv

SELECTORS = {
    "flexprefill": (flexprefill_block_mask, [
        dict(gamma=0.9, tau=0.1, min_budget=512, block_size=128),      # README defaults
        dict(gamma=0.95, tau=0.1, min_budget=1024, block_size=128),    # benchmark-script defaults
        dict(gamma=0.9, tau=0.1, min_budget=512, block_size=64),
    ]),
    "hip": (hip_block_mask, [
        dict(k_budget=512, block_q=64, block_k=64, window=128),
        dict(k_budget=1024, block_q=64, block_k=64, window=256),
    ]),
    "kinetics": (kinetics_block_mask, [
        dict(topk=8, block_q=128, block_size=128, sink=64, local=128),
        dict(topk=16, block_q=64, block_size=64, sink=64, local=128),
        dict(topk=48, block_q=64, block_size=64, sink=64, local=128),
    ]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=8192)
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--H", type=int, default=8)
    parser.add_argument("--Hkv", type=int, default=8)
    parser.add_argument("--D", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--impl", default="xla")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=None, help="run only this selector")
    parser.add_argument("--first", action="store_true", help="only the first parameter set of each selector")
    args = parser.parse_args()
    q, k, v, _ = synthetic_long_qkv(args.seed, args.T, H=args.H, Hkv=args.Hkv, D=args.D, B=args.B)
    print(f"T={args.T} B={args.B} H={args.H} Hkv={args.Hkv} D={args.D} f32, impl={args.impl}, "
          f"backend={jax.default_backend()}\n")
    print("| method | params | density | recall | oracle recall | rel error | select s | attention s | dense s "
          "| speedup | select share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    reference = dense_reference(q, k, v, causal=True, impl=args.impl, repeats=args.repeats)
    for name, (select, param_sets) in SELECTORS.items():
        if args.only and name != args.only:
            continue
        for params in param_sets[:1] if args.first else param_sets:
            r = sparse_quality(select, q, k, v, causal=True, impl=args.impl,
                               repeats=args.repeats, reference=reference, **params)
            total = r["select_seconds"] + r["attention_seconds"]
            text = ", ".join(f"{key}={value}" for key, value in params.items())
            print(f"| {name} | {text} | {r['density']:.3f} | {r['recall']:.3f} | {r['oracle_recall']:.3f} | "
                  f"{r['rel_error']:.3g} | {r['select_seconds']:.3f} | {r['attention_seconds']:.3f} | "
                  f"{r['dense_seconds']:.3f} | {r['dense_seconds'] / total:.2f}x | {r['select_seconds'] / total:.0%} |",
                  flush=True)


if __name__ == "__main__":
    main()
