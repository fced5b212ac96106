"""Probe: can torch.compile take the embedded engine's KV-cached decode step? (Not a test; CPU or one GPU.)

    python bench/compile_decode_probe.py [--size tiny] [--rows 4] [--steps 6] [--out bench/results/compile_decode_probe_cpu.md]

Why: on an H100 the replayed decode step is bound by its ~200 small kernels (bench/results/engine_round13_h100/),
and fusing them is what is left; megatron fuses RoPE and the norms only through transformer-engine. This compiles
the model's forward (`torch.compile(dynamic=True)`, so the cache offset and position need not be constants) and
decodes `--steps` positions with it after one eager prefill, beside an eager engine-style forward on its own
static inference context: compile seconds, whether later positions recompile, dynamo's graph count and graph
breaks (reason, count), and the largest |logit difference| against eager. Writes a markdown report to --out.
The engine's dynamo stand-ins for megatron's two graph breaks (`rollout.compiled_decode`) are registered unless
--without-stand-ins (results/compile_decode_probe_cpu.md is without them: 16 graphs; with them: one).

Shape legend: [B] rows, [B, 1] one decode position, [B, 1, V] its logits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import engine_bench  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(engine_bench.SIZES), default="tiny")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--prompt", type=int, default=6)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=None)
    p.add_argument("--without-stand-ins", action="store_true",
                   help="plain torch.compile, without the engine's dynamo stand-ins for megatron's two graph breaks "
                        "(rollout.compiled_decode)")
    args = p.parse_args(argv)
    engine_bench._init_dist()
    import torch._dynamo as dynamo

    from vespo_megatron.compat import static_inference_context
    from vespo_megatron.megatron.model import TinyMoEConfig, build_gpt_model
    from vespo_megatron.megatron.parallel_setup import ParallelConfig, initialize_parallel
    from vespo_megatron.megatron.small_batch_moe import dense_small_batches

    size = engine_bench.SIZES[args.size]
    S = args.prompt + args.steps + 1
    cfg = TinyMoEConfig(**size["model"], seq_length=max(64, S), init_method_std=0.05)
    layout = ParallelConfig()
    model = build_gpt_model(cfg, layout, initialize_parallel(layout)).eval()
    device = next(model.parameters()).device
    B = args.rows
    tokens = torch.randint(1, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(0)).to(device)
    contexts = {"eager": static_inference_context(B, S), "compiled": static_inference_context(B, S)}

    def forward(name, toks, positions):
        return model(input_ids=toks, position_ids=positions, attention_mask=None, inference_context=contexts[name],
                     runtime_gather_output=True)

    if not args.without_stand_ins:
        from vespo_megatron.rollout.compiled_decode import _register_polyfills

        _register_polyfills()
    compiled = torch.compile(forward, dynamic=True)
    dynamo.reset()
    rows, max_diff = [], 0.0
    with torch.no_grad(), dense_small_batches(model, 8192):
        for name in contexts:  # the prefill, eager for both
            forward(name, tokens[:, : args.prompt], torch.arange(args.prompt, device=device).expand(B, -1))
            contexts[name].increment_sequence_len_offset(args.prompt)
            contexts[name].enable_decode_mode()
        for pos in range(args.prompt, args.prompt + args.steps):
            column, where = tokens[:, pos : pos + 1], torch.full((B, 1), pos, device=device)
            ref = forward("eager", column, where)
            frames = dynamo.utils.counters["stats"]["unique_graphs"]
            t = time.perf_counter()
            got = compiled("compiled", column, where)
            seconds = time.perf_counter() - t
            diff = float((got.float() - ref.float()).abs().max())
            max_diff = max(max_diff, diff)
            rows.append((pos, seconds, dynamo.utils.counters["stats"]["unique_graphs"] - frames, diff))
            for c in contexts.values():
                c.increment_sequence_len_offset(1)
    def short(reason: str) -> str:  # the reason's first line and its explanation
        lines = [x.strip() for x in reason.splitlines() if x.strip()]
        why = next((x for x in lines if x.startswith("Explanation:")), "")
        return f"{lines[0]} ({why[len('Explanation:'):].strip()})"[:220]

    breaks: dict[str, int] = {}
    for reason, n in dynamo.utils.counters["graph_break"].items():
        breaks[short(reason)] = breaks.get(short(reason), 0) + n
    lines = [f"# torch.compile of the KV-cached decode step ({args.size} model, {B} rows, {torch.__version__}, "
             f"{device.type})", "", f"`python bench/compile_decode_probe.py --size {args.size} --rows {B} "
             f"--prompt {args.prompt} --steps {args.steps}{' --without-stand-ins' if args.without_stand_ins else ''}`",
             "", f"dynamo stand-ins for megatron's graph breaks (rollout.compiled_decode): {not args.without_stand_ins}", "",
             "| position | seconds | new dynamo graphs | max abs logit diff vs eager |", "|---:|---:|---:|---:|"]
    lines += [f"| {pos} | {s:.2f} | {g} | {d:.2e} |" for pos, s, g, d in rows]
    lines += ["", f"dynamo graphs in all: {dynamo.utils.counters['stats']['unique_graphs']}; graph breaks:", ""]
    lines += [f"- {n} x {reason}" for reason, n in sorted(breaks.items(), key=lambda kv: -kv[1])] or ["- none"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return {"rows": rows, "breaks": breaks, "max_diff": max_diff}


if __name__ == "__main__":
    main()
