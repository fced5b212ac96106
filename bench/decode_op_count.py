"""Host work of one decode step of the embedded engine, counted on CPU: torch ops dispatched per step, by the code
that issued them, and the host reads of tensor values among them (a device sync each on CUDA).

Why: on the H200 a decode step of the testbed's engine is host bound (bench/README.md, "Embedded engine
throughput": ~20 ms a step at 512 rows against a few ms of GPU work), and rollouts are most of an N = 1 step. It
generates with the KV cache from the testbed's model (random weights, EOS off) for --rows rows of equal prompts
(one prefill, then --steps decode steps) with the fused attention path forced as on CUDA, and divides the counts by
the number of forward calls. Blocking host-to-device copies (a stream sync each on CUDA) are no ops on CPU and are
not counted.

    .venv/bin/python bench/decode_op_count.py [--rows 32] [--steps 20] [--out bench/results/decode_op_count_cpu.md]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import engine_bench  # noqa: E402
from update_op_count import OpCounter  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--size", choices=sorted(engine_bench.SIZES), default="testbed",
                   help="engine_bench's model size (testbed_run: the model the testbed's runs train)")
    p.add_argument("--dense-moe-rows", type=int, default=0,
                   help="EmbeddedEngineConfig.dense_moe_rows (0: megatron's dispatcher in every MoE layer)")
    p.add_argument("--out", default="bench/results/decode_op_count_cpu.md")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    engine_bench._init_dist()
    from vespo_megatron.megatron import reference_attention
    from vespo_megatron.megatron.model import TinyMoEConfig, build_gpt_model
    from vespo_megatron.megatron.parallel_setup import ParallelConfig, initialize_parallel
    from vespo_megatron.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig

    reference_attention.FUSED_KERNELS = True  # the path CUDA takes
    size = engine_bench.SIZES[args.size]
    prompt = size["prompt"][0]
    cfg = TinyMoEConfig(**size["model"], seq_length=prompt + args.steps + 8, init_method_std=0.05)
    layout = ParallelConfig()
    groups = initialize_parallel(layout)
    model = build_gpt_model(cfg, layout, groups)
    engine = EmbeddedEngine(EmbeddedEngineConfig(dense_moe_rows=args.dense_moe_rows), model, groups,
                            vocab_size=cfg.vocab_size, eos_id=-1)
    engine.generate(engine_bench._requests(4, 2, (prompt, prompt), cfg.vocab_size, seed=2), seed=0)  # warm-up
    requests = engine_bench._requests(args.rows, args.steps + 1, (prompt, prompt), cfg.vocab_size, seed=4)
    counter = OpCounter()
    with counter:
        engine.generate(requests, seed=1)
    forwards = args.steps + 1  # the prefill and the decode steps: one forward each
    total, reads = sum(counter.by_source.values()), sum(counter.syncs.values())
    sized = sum(counter.data_sized.values())
    command = f"python bench/decode_op_count.py --size {args.size} --rows {args.rows} --steps {args.steps}" + (
        f" --dense-moe-rows {args.dense_moe_rows}" if args.dense_moe_rows else "")
    lines = [f"# Ops of one decode step of the embedded engine on CPU ({args.size} model, {args.rows} rows)", "",
             f"`{command}` (torch {torch.__version__}, "
             "random weights, KV cache, fused attention path forced; counts over one generation of one prefill and "
             f"{args.steps} decode steps, divided by its {forwards} forward calls).", "",
             f"- ops dispatched per step: **{total / forwards:.0f}**",
             f"- host reads of a tensor value per step (a device sync each on CUDA unless the tensor lives on the "
             f"host there too): **{reads / forwards:.1f}**",
             f"- ops whose output size comes from tensor data (`masked_select`, `nonzero`, `repeat_interleave` by a "
             f"tensor, ...: a sync each on CUDA, none a read on CPU) per step: **{sized / forwards:.1f}**", "",
             "| ops / step | issued by (nearest two frames) | reads / step | data-sized / step |",
             "| ---: | --- | ---: | ---: |"]
    for source, count in counter.by_source.most_common(args.top):
        lines.append(f"| {count / forwards:.1f} | `{source}` | {counter.syncs.get(source, 0) / forwards:.2f} | "
                     f"{counter.data_sized.get(source, 0) / forwards:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
