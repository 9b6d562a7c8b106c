"""KV bytes per token and layer of every KV-cache method, from each method's formula function, for one
Llama-3.2-1B-like layer (Hkv=8, D=64, fp16 elements and scales) at a 32K context. The tests check each
formula against the bytes its cache pytree really stores (tests/methods/kv/).

    python benchmarks/kv_bytes.py [--context 32768]
"""
from __future__ import annotations

import argparse

from jattn.methods.kv import duo_attention, quantized, x_ecomla, zipcache

HKV, D = 8, 64


def rows(context: int):
    fp16 = 2 * HKV * D * 2
    yield "fp16 (GQA)", "2 Hkv D 2", fp16
    for bits in (8, 4):
        yield (f"int{bits} KIVI-style (group 32)", "2 Hkv ceil(D b/8) + 2 Hkv D 2/32 + 2 Hkv 2",
               quantized.bytes_per_token(head_dim=D, kv_heads=HKV, bits=bits))
    yield ("P24 ZipCache (r=0.4, 4/2 bits)", "codes 3.2 b/elem + stats + mask (zipcache_bytes_per_token)",
           zipcache.zipcache_bytes_per_token(head_dim=D, kv_heads=HKV, length=context))
    dims = x_ecomla.MLADims(32, 32, 32, 64, 64, 1424)
    yield "P19 MLA (r_kv=64, d_r=32)", "(r_kv + d_r) 2", x_ecomla.kv_values_per_token(dims) * 2
    yield ("P45 DuoAttention (half the kv heads streaming, 64+256)",
           "2 D 2 (n_full L + n_stream (sink+recent)) / L",
           duo_attention.duo_kv_bytes(context, num_retrieval=HKV // 2, num_streaming=HKV // 2, sink=64, recent=256,
                                      head_dim=D) / context)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    args = parser.parse_args(argv)
    fp16 = 2 * HKV * D * 2
    print(f"Hkv={HKV} D={D}, context {args.context}: KV bytes per token per layer")
    print("| cache | formula | bytes/token | vs fp16 |\n|---|---|---|---|")
    for name, formula, value in rows(args.context):
        print(f"| {name} | {formula} | {value:.1f} | {fp16 / value:.2f}x |")


if __name__ == "__main__":
    main()
