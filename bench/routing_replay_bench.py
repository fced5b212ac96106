"""Benchmark: training-step time with routing replay (R3) vs live routing on megatron-core. Not a test.

One process (world size 1), one packed THD micro-batch, megatron's `get_forward_backward_func` forward +
backward (no optimizer). Modes, each on the same model and batch:
* none            live routing (`RoutingReplay` mode "off"; the model is built with replay enabled, which
                  costs nothing when no action is set)
* r3              replay of the batch's routing (`RLMicroBatch.routed_experts`, cut per rank, handed to
                  `RouterReplay.set_target_indices`), no agreement metric
* r3+agreement    the same plus the per-layer agreement metric (router GEMM + top-k again, no grad)
The replayed ids are synthetic (random distinct top-k per token, uint8 records as SGLang's decode gives).
Includes, per step, `replay_tensors` (uint8 -> int64 for each MoE layer). Median of `--iters` after
`--warmup`; GPU timings use `torch.cuda.synchronize()` around each step.

Presets:
* cpu (default): the tiny test model (hidden 64, 2 MoE layers, 8 experts top-2), T=256, fp32.
* qwen-slice: a Qwen3-30B-A3B-shaped slice: hidden 2048, 32 query / 4 KV heads of 128, 2 layers, both MoE,
  128 experts top-8, expert FFN 768, vocab 4096 (the LM head is not what is measured), T=4096, bf16, EP=1
  on one GPU. Experts run megatron's SequentialMLP (no grouped GEMM without transformer-engine) and our
  reference attention, so the absolute step time is slower than a TE build; the replay cost is the same.

Commands:
    /work/venv/bin/python bench/routing_replay_bench.py                       # CPU, writes routing_replay_cpu.*
    python3 bench/routing_replay_bench.py --preset qwen-slice --tag h100      # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))

PRESETS = {
    "cpu": dict(model=dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, num_experts=8,
                           moe_router_topk=2, moe_ffn_hidden_size=32, vocab_size=128, seq_length=256),
                tokens=256, samples=4, dtype="float32"),
    "qwen-slice": dict(model=dict(hidden_size=2048, num_layers=2, num_attention_heads=32, num_query_groups=4,
                                  head_dim=128, num_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768,
                                  ffn_hidden_size=6144, vocab_size=4096, seq_length=4096),
                       tokens=4096, samples=4, dtype="bfloat16"),
}


def _samples(num_samples, tokens, vocab, spec, seed=0):
    from vespo_megatron.megatron.rl_batch import RLSample
    from vespo_megatron.routing import RoutingRecord

    rng = np.random.default_rng(seed)
    L = tokens // num_samples
    out = []
    for i in range(num_samples):
        P, R = L // 4, L - L // 4
        ids = np.argsort(rng.random((P + R - 1, spec.num_moe_layers, spec.num_experts)), axis=-1)[..., : spec.top_k]
        rec = RoutingRecord(sample_id=i, expert_ids=ids.astype(spec.dtype), num_prompt_tokens=P, num_output_tokens=R,
                            moe_layers=spec.moe_layers, num_experts=spec.num_experts)
        out.append(RLSample(prompt=torch.from_numpy(rng.integers(0, vocab, P)), response=torch.from_numpy(
            rng.integers(0, vocab, R)), old_logp=torch.full((R,), -3.0), advantage=1.0, routing=rec))
    return out


def run(preset: str, warmup: int, iters: int) -> dict:
    from vespo_megatron.compat import get_forward_backward_func
    from vespo_megatron.megatron.cpu_shim import cpu_device_context
    from vespo_megatron.megatron.model import TinyMoEConfig, build_gpt_model
    from vespo_megatron.megatron.parallel_setup import ParallelConfig, destroy_parallel, initialize_parallel
    from vespo_megatron.megatron.rl_batch import build_rl_microbatch
    from vespo_megatron.routing import RoutingSpec
    from vespo_megatron.routing.replay import RoutingReplay, RoutingReplayConfig

    p = PRESETS[preset]
    dtype = getattr(torch, p["dtype"])
    cfg = TinyMoEConfig(**p["model"], dtype=dtype, moe_enable_routing_replay=True)
    layout = ParallelConfig()
    groups = initialize_parallel(layout)
    cuda = torch.cuda.is_available()
    try:
        model = build_gpt_model(cfg, layout, groups, attention_backend="reference")
        spec = RoutingSpec(num_hidden_layers=cfg.num_layers, moe_layers=tuple(range(cfg.num_layers)),
                           top_k=cfg.moe_router_topk, num_experts=cfg.num_experts)
        mb = build_rl_microbatch(_samples(p["samples"], p["tokens"], cfg.vocab_size, spec), layout="thd",
                                 pad_multiple=8)
        if cuda:
            mb = _to_cuda(mb)

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            out = model(input_ids=batch.tokens, position_ids=batch.position_ids, attention_mask=None,
                        packed_seq_params=batch.packed_seq_params)
            return out, lambda logits: (logits.float().mean(), torch.tensor(1, dtype=torch.int), {})

        def step(replay):
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            replay.begin_pass("update")
            with cpu_device_context():
                get_forward_backward_func()(forward_step_func=forward_step, data_iterator=replay.data_iterator([mb]),
                                            model=[model], num_microbatches=1, seq_length=mb.tokens.size(1),
                                            micro_batch_size=1, forward_only=False)
            metrics = replay.end_pass()
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t0, metrics

        modes = {
            "none": RoutingReplayConfig(mode="off"),
            "r3": RoutingReplayConfig(mode="r3", track_agreement=False),
            "r3+agreement": RoutingReplayConfig(mode="r3", track_agreement=True),
        }
        times = {name: [] for name in modes}
        controllers = {name: RoutingReplay(c, [model], spec=spec if c.mode != "off" else None)
                       for name, c in modes.items()}
        agreement = None
        # Interleave the modes round by round so drift (clocks, other jobs) hits all of them alike. Idle
        # controllers (no pass begun) leave the routers alone.
        for replay in controllers.values():
            for _ in range(warmup):
                step(replay)
        for _ in range(iters):
            for name, replay in controllers.items():
                dt, metrics = step(replay)
                times[name].append(dt)
                if metrics:
                    agreement = metrics["routing/agree_exact"].result()
        for replay in controllers.values():
            replay.close()
    finally:
        destroy_parallel()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "preset": preset,
        "model": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in cfg.__dict__.items()},
        "tokens": int(mb.tokens.numel()),
        "warmup": warmup,
        "iters": iters,
        "median_s": med,
        "min_s": {k: min(v) for k, v in times.items()},
        "overhead_vs_none": {k: med[k] / med["none"] - 1.0 for k in med},
        "agreement_exact_random_routing": agreement,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _to_cuda(mb):
    import dataclasses

    from vespo_megatron.compat import PackedSeqParams

    psp = mb.packed_seq_params
    psp = PackedSeqParams(**{f.name: (getattr(psp, f.name).cuda() if isinstance(getattr(psp, f.name), torch.Tensor)
                                      else getattr(psp, f.name)) for f in dataclasses.fields(psp)})
    moved = {f.name: (getattr(mb, f.name).cuda() if isinstance(getattr(mb, f.name), torch.Tensor)
                      and f.name not in ("routed_experts", "token_index") else getattr(mb, f.name))
             for f in dataclasses.fields(mb)}
    moved["packed_seq_params"] = psp
    return type(mb)(**moved)


def to_markdown(r: dict, command: str) -> str:
    lines = [f"# Routing replay step time ({r['preset']}, {r['device']})", "",
             f"Command: `{command}`", "",
             f"Forward + backward of one packed micro-batch of {r['tokens']} tokens; median of {r['iters']} "
             f"steps after {r['warmup']} warm-up, modes interleaved. torch {r['torch']}, {r['threads']} threads.", "",
             "| mode | median ms | min ms | overhead vs none (median) | overhead vs none (min) |",
             "|---|---|---|---|---|"]
    for k, v in r["median_s"].items():
        by_min = r["min_s"][k] / r["min_s"]["none"] - 1.0
        lines.append(f"| {k} | {v * 1e3:.2f} | {r['min_s'][k] * 1e3:.2f} | {r['overhead_vs_none'][k] * 100:+.2f}% "
                     f"| {by_min * 100:+.2f}% |")
    lines += ["", f"Exact top-k agreement of live vs the synthetic (random) replayed routing: "
                  f"{r['agreement_exact_random_routing']:.4f} (the metric's sanity check, not a model property).", ""]
    if r.get("note"):
        lines += [r["note"], ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--tag", default=None, help="results file suffix (default: the preset's device, cpu)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        result = run(args.preset, args.warmup, args.iters)
    finally:
        dist.destroy_process_group()
    tag = args.tag or "cpu"
    os.makedirs(args.out, exist_ok=True)
    command = "python " + " ".join(["bench/routing_replay_bench.py", *os.sys.argv[1:]])
    result["command"] = command
    with open(os.path.join(args.out, f"routing_replay_{tag}.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = to_markdown(result, command)
    with open(os.path.join(args.out, f"routing_replay_{tag}.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
