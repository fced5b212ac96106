"""Probe: a KV-cached decode step's attention, torch's SDPA against two batched matmuls. (Not a test; one GPU.)

    python bench/decode_attention_probe.py [--rows 256 512] [--keys 16 80 144] [--out FILE.md]

Why: in a replayed decode step of the testbed model the fp32 memory-efficient SDPA kernel takes ~33 us a layer
(12 % of the device time, bench/results/engine_round13_h100/), while the step's query is one position: the
kernel's 64-row query tile is mostly empty. `ReferenceAttention._attend_decode`'s layout ([b, ng, rep, hn]
queries over [sk, b, ng, hn] cached keys, GQA without repeating K/V) is timed as is, and as bmm -> softmax ->
bmm on the same strided cache views (no copy: b and ng flatten into one batch stride). Prints and writes a
markdown table: microseconds a call (CUDA events over 200 calls, after a warm-up) and the largest |difference|.
Both kernels are the engine's own (`megatron.reference_attention.decode_attention`).

Shape legend: b rows, ng K/V groups, rep query heads per group, hn head dim, sk cached keys.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vespo_megatron.megatron.reference_attention import decode_attention  # noqa: E402


def _time(fn, *args, calls: int = 200) -> float:
    for _ in range(10):
        fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[256, 512])
    p.add_argument("--keys", type=int, nargs="+", default=[16, 80, 144])
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--rep", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    ng, rep, hn = args.groups, args.rep, args.head_dim
    scale = 1 / math.sqrt(hn)
    lines = [f"# Decode attention: SDPA vs bmm ({torch.cuda.get_device_name(0)}, torch {torch.__version__}, fp32)", "",
             f"`python bench/decode_attention_probe.py --rows {' '.join(map(str, args.rows))} --keys "
             f"{' '.join(map(str, args.keys))}`; {ng} K/V groups x {rep} query heads, head dim {hn}", "",
             "| rows | keys | SDPA us | bmm us | max abs diff |", "|---:|---:|---:|---:|---:|"]
    for b in args.rows:
        for sk in args.keys:
            g = torch.Generator(device=dev).manual_seed(0)
            cache_k = torch.randn(sk, b, ng, hn, device=dev, generator=g)  # [sk, b, ng, hn] as the static cache
            cache_v = torch.randn(sk, b, ng, hn, device=dev, generator=g)
            q = torch.randn(b, ng, rep, hn, device=dev, generator=g)
            k, v = (x.permute(1, 2, 0, 3) for x in (cache_k, cache_v))  # [b, ng, sk, hn] strided views
            diff = float((decode_attention(q, k, v, scale, "sdpa") - decode_attention(q, k, v, scale, "bmm")).abs().max())
            lines.append(f"| {b} | {sk} | {_time(decode_attention, q, k, v, scale, 'sdpa'):.1f} | "
                         f"{_time(decode_attention, q, k, v, scale, 'bmm'):.1f} | {diff:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
