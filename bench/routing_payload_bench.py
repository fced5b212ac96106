"""Benchmark: SGLang routed-experts payload -> RoutingRecord, bytes per token and decode throughput. Not a test.

Model: Qwen3-30B-A3B routing (48 layers, all MoE, top-8 of 128 experts). One sample of ``--tokens`` tokens
(default 16384: P=2048 prompt + 14336 output), so the payload has P + O - 1 rows of 48 x 8 int32 ids.
Synthetic ids: per row and layer, 8 distinct experts (a random base plus strides of 16, through a random
permutation of the 128 experts).

Reports bytes per routed token (per row):
* on the wire: SGLang's base64 text of int32 (4/3 x 48 x 8 x 4 = 2048 B) and its decoded int32 bytes (1536 B)
* in memory: our uint8 RoutingRecord (384 B) and the transient int64 tensor handed to RouterReplay (3072 B)

and times, median of ``--repeats``, rows per second:
* b64 only          the base64 decode alone (stdlib ``base64.b64decode(validate=True)`` / ``pybase64``)
* sglang one-liner  ``np.frombuffer(b64decode(s), np.int32).reshape(-1, 48, 8)``, no validation (the floor)
* decode_routed_experts  our full path: base64, length/range/distinctness checks, narrowing to uint8
* to_int64          RoutingRecord -> int64 torch tensor [N, 48, 8]

CPU only. Command: ``/work/venv/bin/python bench/routing_payload_bench.py`` (writes
bench/results/routing_payload_cpu.json and .md, or under --out).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from vespo_megatron.models import preset_config
from vespo_megatron.rollout.sglang import routed_experts as sglang_payload
from vespo_megatron.rollout.sglang.routed_experts import decode_routed_experts
from vespo_megatron.routing import RoutingSpec

HERE = os.path.dirname(os.path.abspath(__file__))


def synthetic_routing(num_rows: int, spec: RoutingSpec, seed: int = 0) -> np.ndarray:
    """int32 [N, L, K]: K distinct experts per row and layer (needs K * stride <= E)."""
    rng = np.random.default_rng(seed)
    stride = spec.num_experts // spec.top_k
    base = rng.integers(0, spec.num_experts, size=(num_rows, spec.num_hidden_layers, 1))
    ids = (base + np.arange(spec.top_k) * stride) % spec.num_experts
    return rng.permutation(spec.num_experts).astype(np.int32)[ids]


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()

    spec = RoutingSpec.from_hf_config(preset_config("qwen3-30b-a3b"))
    p, o = args.prompt_tokens, args.tokens - args.prompt_tokens
    rows = p + o - 1
    ids = synthetic_routing(rows, spec)
    payload = base64.b64encode(ids.tobytes()).decode("ascii")
    raw_bytes = ids.nbytes
    record = decode_routed_experts(payload, spec=spec, sample_id=0, num_prompt_tokens=p, num_output_tokens=o)
    assert np.array_equal(record.expert_ids, ids)

    sizes = {
        "sglang_base64_wire": len(payload) / rows,
        "sglang_int32_raw": raw_bytes / rows,
        "record_uint8": record.nbytes / rows,
        "router_replay_int64": rows * spec.num_hidden_layers * spec.top_k * 8 / rows,
    }

    backends = ["stdlib"] + (["pybase64"] if sglang_payload._load_pybase64() is not None else [])
    timings = []
    for be in backends:
        decoder = sglang_payload._b64decoder(be)
        cases = {
            "b64 only": lambda decoder=decoder: decoder(payload),
            "sglang one-liner (no checks)": lambda decoder=decoder: np.frombuffer(
                decoder(payload), dtype=np.int32).reshape(-1, spec.num_hidden_layers, spec.top_k),
            "decode_routed_experts": lambda be=be: decode_routed_experts(
                payload, spec=spec, sample_id=0, num_prompt_tokens=p, num_output_tokens=o, backend=be),
        }
        for name, fn in cases.items():
            t = timeit(fn, args.repeats)
            timings.append({"backend": be, "step": name, "ms": t * 1e3, "rows_per_s": rows / t,
                            "wire_MB_per_s": len(payload) / t / 1e6})
    t = timeit(record.to_int64, args.repeats)
    timings.append({"backend": "-", "step": "to_int64", "ms": t * 1e3, "rows_per_s": rows / t,
                    "wire_MB_per_s": None})

    env = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
           "pybase64": getattr(sglang_payload._load_pybase64(), "__version__", None),
           "machine": platform.machine(), "cpu_count": os.cpu_count()}
    result = {"model": "Qwen3-30B-A3B routing (48 MoE layers, top-8 of 128)", "prompt_tokens": p,
              "output_tokens": o, "rows": rows, "payload_chars": len(payload), "raw_bytes": raw_bytes,
              "record_bytes": record.nbytes, "bytes_per_row": sizes, "timings": timings, "env": env,
              "repeats": args.repeats, "command": "python bench/routing_payload_bench.py"}

    lines = [f"# routed-experts payload bench: cpu ({result['model']})", "",
             f"One sample, P={p} + O={o} tokens -> {rows} routed rows; median of {args.repeats}; "
             f"python {env['python']}, numpy {env['numpy']}, torch {env['torch']}, pybase64 {env['pybase64']}; "
             f"command: `{result['command']}`", "",
             "| representation | bytes / token | total for the sample |", "|---|---:|---:|"]
    labels = {"sglang_base64_wire": "SGLang wire: base64 of int32", "sglang_int32_raw": "SGLang int32, decoded",
              "record_uint8": "RoutingRecord uint8 (kept)", "router_replay_int64": "int64 for RouterReplay (transient)"}
    for key, per in sizes.items():
        lines.append(f"| {labels[key]} | {per:.1f} | {per * rows / 2**20:.1f} MiB |")
    lines += ["", "| backend | step | ms | rows / s | wire MB / s |", "|---|---|---:|---:|---:|"]
    for row in timings:
        mbs = "-" if row["wire_MB_per_s"] is None else f"{row['wire_MB_per_s']:.0f}"
        lines.append(f"| {row['backend']} | {row['step']} | {row['ms']:.1f} | {row['rows_per_s']:,.0f} | {mbs} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "routing_payload_cpu.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "routing_payload_cpu.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
