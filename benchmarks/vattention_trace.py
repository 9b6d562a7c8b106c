"""P26 vAttention: KV memory accounting over a seeded synthetic serving trace, and (optionally) contiguous
vs paged decode time on this CPU.

The trace: ``--requests`` requests arrive as a Poisson process (``--rate`` per iteration) with log-normal
prompt (median ``--prompt``) and output (median ``--output``) lengths, clipped to ``[16, 8192]`` and
``[8, 2048]`` and to ``L_max`` together. A FCFS continuous-batching scheduler gives each arriving request an
idle slot of ``B_max`` (prefill: the slot's length jumps to the prompt), adds one token per iteration, and
frees the slot after the request's last token. The schedule (which tokens exist when) is the same for every
allocator, so ``used`` is identical across rows; only what each allocator maps differs:

* ``static``: every slot backed to ``L_max`` (a cache without demand paging);
* ``paged-16``: vLLM-style 16-token blocks per (request, layer, K/V), returned at once;
* ``vattn P d e``: ``VirtualKVAllocator`` with page ``P``, deferred reclamation ``d`` (on/off), eager steps
  ``e``; the pool is unlimited, so deferred pages are kept until their slot's next request reuses them;
* ``vattn P defer e10, pool G``: the same with a physical pool of ``--pool-gib`` GiB, so kept pages are
  unmapped on demand when a live request needs them (vAttention's reclaim path).

Columns (means over iterations, then mean ± std over seeds): mapped GiB (and peak), mapped / used bytes,
internal fragmentation GiB (unused tail of the pages live requests need), over-committed + idle GiB (eager pages, a reused slot's
surplus, idle slots' kept pages), page-map calls per 1K iterations (all, and on the critical path), unmap
calls per 1K iterations, and pages found already mapped at admission (reuse). Units differ by design:
a vAttention map call is one physical page of one (layer, K/V) tensor (one ``cuMemMap``), a paged-16 "map
call" is one block-table entry (a block id serves every layer; no driver call). Model: Llama-3-8B-like KV
geometry (32 layers, 8 KV heads, d=128, fp16: 2 KiB per token per layer per K/V, so a 64 KiB page holds
32 tokens and a 2 MiB page 1024).

    python benchmarks/vattention_trace.py [--seeds 0 1 2] [--requests 300] [--decode]

``--decode`` adds a CPU microbenchmark of the xla decode path (``jattn.decode_attention`` through the P26
entry points) at equal lengths: contiguous head-major cache vs a shuffled page pool (16- and 128-token
pages), best of ``--reps`` interleaved rounds.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time

import numpy as np

from jattn.methods.kv.vattention import (KB, MB, PagedBlockAllocator, VirtualKVAllocator,
                                         static_reservation_bytes)

GEOM = dict(num_layers=32, kv_heads=8, head_dim=128, bytes_per_elem=2)
GIB = 2 ** 30


def make_trace(seed: int, requests: int, rate: float, prompt: int, output: int, max_len: int):
    """``[(arrival_iteration, prompt_len, output_len)]`` sorted by arrival."""
    rng = np.random.default_rng(seed)
    arrivals = np.floor(np.cumsum(rng.exponential(1.0 / rate, requests))).astype(int)
    prompts = np.clip(rng.lognormal(np.log(prompt), 0.8, requests), 16, 8192).astype(int)
    outputs = np.clip(rng.lognormal(np.log(output), 0.8, requests), 8, 2048).astype(int)
    prompts = np.minimum(prompts, max_len - outputs)
    return list(zip(arrivals.tolist(), prompts.tolist(), outputs.tolist()))


def simulate(trace, allocator, max_batch: int, assign=None):
    """Runs the FCFS schedule through ``allocator`` (``.step(seq_lens) -> StepStats``); ``assign(prompt)``
    picks a slot (vAttention's best fit) or the first idle slot is taken. Returns per-iteration rows."""
    lens = [0] * max_batch
    left = [0] * max_batch                     # tokens still to generate
    queue, waiting, rows, i = list(trace), [], [], 0
    while queue or waiting or any(lens):
        while queue and queue[0][0] <= i:
            waiting.append(queue.pop(0))
        finished = [r for r in range(max_batch) if lens[r] and left[r] == 0]
        for r in finished:
            lens[r] = 0
            if hasattr(allocator, "free_slot"):
                allocator.free_slot(r)
        for r in range(max_batch):
            if lens[r]:
                lens[r] += 1
                left[r] -= 1
        while waiting and 0 in lens:
            _, prompt, output = waiting.pop(0)
            r = assign(prompt) if assign else lens.index(0)
            lens[r], left[r] = prompt, output - 1   # prefill makes the first output token
        rows.append(allocator.step(lens))
        i += 1
    return rows


def summarize(rows, static_bytes=None):
    mapped = np.array([s.mapped_bytes for s in rows], float) if static_bytes is None else \
        np.full(len(rows), float(static_bytes))
    used = np.array([s.used_bytes for s in rows], float)
    slack = np.array([s.slack_bytes for s in rows], float) if static_bytes is None else mapped - used
    extra = np.array([s.overcommit_bytes + s.idle_bytes for s in rows], float)
    k = 1000.0 / len(rows)
    return dict(mapped=mapped.mean() / GIB, peak=mapped.max() / GIB, used=used.mean() / GIB,
                ratio=mapped.sum() / used.sum(), frag=slack.mean() / GIB,
                extra=0.0 if static_bytes else extra.mean() / GIB,
                calls=k * sum(s.map_calls for s in rows) if static_bytes is None else 0.0,
                sync=k * sum(s.sync_map_calls for s in rows) if static_bytes is None else 0.0,
                unmap=k * sum(s.unmap_calls for s in rows) if static_bytes is None else 0.0,
                iters=len(rows))


def configs(max_batch: int, max_len: int, pool_gib: float):
    yield "static", None
    yield "paged-16", lambda: PagedBlockAllocator(16, max_batch=max_batch, **GEOM)
    for page, name in ((64 * KB, "64K"), (2 * MB, "2M")):
        for deferred in (False, True):
            for eager in (0, 10):
                yield (f"vattn {name} {'defer' if deferred else 'no-defer'} e{eager}",
                       functools.partial(VirtualKVAllocator, page, deferred, eager, max_batch=max_batch,
                                         max_len=max_len, **GEOM))
        if pool_gib:
            yield (f"vattn {name} defer e10, pool {pool_gib:g} GiB",
                   functools.partial(VirtualKVAllocator, page, True, 10, max_batch=max_batch, max_len=max_len,
                                     pool_pages=int(pool_gib * GIB) // page, **GEOM))


def memory_table(args):
    results = {}
    for seed in args.seeds:
        trace = make_trace(seed, args.requests, args.rate, args.prompt, args.output, args.max_len)
        for name, make in configs(args.max_batch, args.max_len, args.pool_gib):
            if make is None:
                alloc = PagedBlockAllocator(1, max_batch=args.max_batch, **GEOM)   # tokens only: the schedule
                row = summarize(simulate(trace, alloc, args.max_batch),
                                static_reservation_bytes(max_batch=args.max_batch, max_len=args.max_len, **GEOM))
                reuse = 0
            else:
                alloc = make()
                assign = getattr(alloc, "alloc_slot", None)
                row = summarize(simulate(trace, alloc, args.max_batch, assign))
                reuse = getattr(alloc, "reused_pages", 0)
            row["reuse"] = reuse
            results.setdefault(name, []).append(row)
    used = {name: [r["used"] for r in rows] for name, rows in results.items()}
    assert all(np.allclose(u, used["static"]) for u in used.values()), "the schedule differs between rows"
    print(f"\nKV memory over the trace: B_max={args.max_batch}, L_max={args.max_len}, {args.requests} requests, "
          f"rate {args.rate}/iter, median prompt {args.prompt}, output {args.output}; seeds {args.seeds}; "
          f"iterations {[r['iters'] for r in results['static']]}; used {np.mean(used['static']):.2f} GiB mean")
    print("| allocator | mapped GiB (mean) | peak GiB | mapped / used | internal frag GiB | over-commit + idle GiB | "
          "map calls / 1K it | sync map calls / 1K it | unmap calls / 1K it | pages reused |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        def ms(key, fmt="{:.2f}"):
            vals = np.array([r[key] for r in rows], float)
            return f"{fmt.format(vals.mean())} ± {fmt.format(vals.std())}"
        print(f"| {name} | {ms('mapped')} | {ms('peak')} | {ms('ratio')} | {ms('frag')} | {ms('extra')} | "
              f"{ms('calls', '{:.0f}')} | {ms('sync', '{:.0f}')} | {ms('unmap', '{:.0f}')} | "
              f"{ms('reuse', '{:.0f}')} |")


def decode_table(args):
    import jax
    import jax.numpy as jnp
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from cpu import best_times
    from jattn.methods.kv.vattention import contiguous_decode_attention, paged_decode_attention

    B, H, HKV, D = 4, 32, 8, 128
    print(f"\nCPU decode (xla path), B={B} H={H} Hkv={HKV} D={D} f32, one new token, every length = S; "
          f"best of {args.reps} interleaved rounds (ms)")
    print("| S | contiguous | paged 16 | paged 128 | paged16 / contiguous |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for S in args.contexts:
        q = jnp.asarray(rng.standard_normal((B, H, D), np.float32))
        k = jnp.asarray(rng.standard_normal((B, HKV, S, D), np.float32))
        v = jnp.asarray(rng.standard_normal((B, HKV, S, D), np.float32))
        lengths = jnp.full((B,), S, jnp.int32)
        cases = {}

        def compiled(fn, *arrays, **static):
            f = jax.jit(functools.partial(fn, impl="xla", layout="bhsd", **static)).lower(*arrays).compile()
            return lambda: f(*arrays).block_until_ready()

        cases["contiguous"] = compiled(contiguous_decode_attention, q, k, v, lengths)
        for P in (16, 128):
            W = S // P
            perm = rng.permutation(B * W)
            pool = lambda c: jnp.zeros((HKV, B * W, P, D), jnp.float32).at[:, perm].set(
                jnp.moveaxis(c.reshape(B, HKV, W, P, D), 1, 0).reshape(HKV, B * W, P, D))
            kp, vp, table = pool(k), pool(v), jnp.asarray(perm.reshape(B, W), jnp.int32)
            cases[f"paged{P}"] = compiled(paged_decode_attention, q, kp, vp, table, lengths)
        best = best_times(cases, args.reps)
        ms = {name: 1e3 * t for name, t in best.items()}
        print(f"| {S} | {ms['contiguous']:.2f} | {ms['paged16']:.2f} | {ms['paged128']:.2f} | "
              f"{ms['paged16'] / ms['contiguous']:.2f}x |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rate", type=float, default=0.12, help="arrivals per iteration")
    parser.add_argument("--prompt", type=int, default=1024, help="median prompt length")
    parser.add_argument("--output", type=int, default=256, help="median output length")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=16384)
    parser.add_argument("--pool-gib", type=float, default=12.0,
                        help="physical pool of the extra 'pool' rows (0: no such rows)")
    parser.add_argument("--decode", action="store_true", help="also time contiguous vs paged decode on CPU")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    memory_table(args)
    if args.decode:
        decode_table(args)
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
