"""Layout invariance and routing-replay exactness of the RL step on real NCCL (or gloo on CPU).

Each launch runs one or more layouts of the same global batch through `run_rl_layout` (the trainer's path:
RLStep + megatron's schedules + megatron's DDP reducing the gradients) and a record-then-replay pass
(R2: record the routing in a forward-only pass, replay it in a second one: the log-probs must be identical
and the agreement metric 1). Rank 0 writes `<out>/<layout>.pt`; `--compare` prints the table against `ref`
and writes `<out>/layouts.{json,md}`.

    torchrun --nproc-per-node 1 bench/gpu_layouts.py --preset qwen3-slice --layouts ref --out OUT
    torchrun --nproc-per-node 2 bench/gpu_layouts.py --preset qwen3-slice --layouts ep2,tp2_sp,cp2,pp2 --out OUT
    python bench/gpu_layouts.py --compare OUT

`qwen3-slice` is Qwen3-30B-A3B's shape (hidden 2048, 32 query / 4 KV heads of 128, 128 experts, top-8, expert
FFN 768, vocab 151936) with 4 layers; `tiny` runs on CPU in seconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYOUT_FLAGS = {
    "ref": {}, "dp2": {}, "ep2": {"ep": 2}, "tp2_sp": {"tp": 2, "sp": True}, "cp2": {"cp": 2}, "pp2": {"pp": 2},
    "ep4": {"ep": 4}, "ep8": {"ep": 8}, "tp2_sp_ep2": {"tp": 2, "sp": True, "ep": 2},
    # 8 GPUs: TP2+SP x CP2 x PP2 with EP4 (experts split over the TP x CP ranks of a stage)
    "tp2_sp_cp2_pp2_ep4": {"tp": 2, "sp": True, "cp": 2, "pp": 2, "ep": 4},
}


def model_config(preset: str):
    from vespo_megatron.megatron.model import TinyMoEConfig

    if preset == "qwen3-slice":
        return TinyMoEConfig(vocab_size=151936, hidden_size=2048, num_layers=4, num_attention_heads=32,
                             num_query_groups=4, head_dim=128, ffn_hidden_size=6144, num_experts=128,
                             moe_router_topk=8, moe_ffn_hidden_size=768, seq_length=1024, seed=7)
    return TinyMoEConfig(hidden_size=32, num_layers=2, moe_layer_freq=(1, 0), ffn_hidden_size=64, seq_length=64)


def replay_exactness(layout, model_cfg, mbs):
    """Record (R2, forward only) then replay: max |logp difference| and the agreement metrics."""
    import dataclasses

    from vespo_megatron.base.metric import finalize_metrics
    from vespo_megatron.compat import get_forward_backward_func
    from vespo_megatron.megatron.cpu_shim import cpu_device_context
    from vespo_megatron.megatron.model import build_gpt_model
    from vespo_megatron.megatron.parallel_setup import destroy_parallel, initialize_parallel
    from vespo_megatron.megatron.rl_batch import build_rl_microbatch, common_seq_len
    from vespo_megatron.megatron.step import RLStep, RLStepConfig, StepGroups
    from vespo_megatron.parallel.reduce_metrics import all_reduce_metrics
    from vespo_megatron.routing.replay import RoutingReplay, RoutingReplayConfig

    groups = initialize_parallel(layout)
    try:
        cfg = dataclasses.replace(model_cfg, moe_enable_routing_replay=True)
        model = build_gpt_model(cfg, layout, groups, attention_backend="reference")
        mine = mbs[groups.dp_rank::groups.dp_size]
        seq_len = common_seq_len(mbs, pad_multiple=8)
        local = [build_rl_microbatch(m, cp_size=groups.cp_size, cp_rank=groups.cp_rank, pad_multiple=8, seq_len=seq_len)
                 for m in mine]
        step = RLStep(RLStepConfig(loss_name="vespo"), StepGroups(tp=groups.tp, cp=groups.cp))
        replay = RoutingReplay(RoutingReplayConfig(mode="r2"), [model], tp_size=groups.tp_size, tp_rank=groups.tp_rank)
        results = {}
        for kind in ("old_logp", "update"):
            replay.begin_pass(kind)
            with torch.no_grad(), cpu_device_context():
                outs = get_forward_backward_func()(
                    forward_step_func=step.logprob_forward_step(), data_iterator=replay.data_iterator(local),
                    model=[model], num_microbatches=len(local), seq_length=local[0].tokens.size(1) * groups.cp_size,
                    micro_batch_size=1, forward_only=True)
            metrics = replay.end_pass()
            results[kind] = ([o["logp"].float().cpu() for o in outs], metrics)
        diff = 0.0
        if groups.is_last_stage:
            diff = max(float((a - b).abs().max()) for a, b in zip(results["old_logp"][0], results["update"][0], strict=True))
        agree = finalize_metrics(all_reduce_metrics(results["update"][1], dist.group.WORLD))
        everyone = [None] * groups.world_size
        dist.all_gather_object(everyone, diff)
        replay.close()
        return {"replay_max_abs_logp_diff": max(everyone), "replay_agree_exact": agree.get("routing/agree_exact"),
                "replay_overlap": agree.get("routing/overlap")}
    finally:
        destroy_parallel()


def run(args) -> None:
    from vespo_megatron.megatron.parallel_setup import ParallelConfig
    from vespo_megatron.megatron.step import RLStepConfig
    from vespo_megatron.testing.layouts import random_rl_micro_batches, run_rl_layout
    from vespo_megatron.training.launch import init_distributed

    rank, world = init_distributed()
    cfg = model_config(args.preset)
    big = args.preset == "qwen3-slice"
    # A randomly initialised LM head gives random tokens slightly less than uniform mass (about 0.42 nats
    # below -log V for this slice): behaviour log-probs there keep log W O(1), so phi is not vanishingly small.
    mbs = random_rl_micro_batches(cfg.vocab_size, num_micro=4, per_micro=2, max_prompt=64 if big else 5,
                                  max_response=32 if big else 9, logp_gap=0.42 if big else 0.0,
                                  noise=0.1 if big else 0.3)
    os.makedirs(args.out, exist_ok=True)
    for name in args.layouts.split(","):
        layout = ParallelConfig(**LAYOUT_FLAGS[name])
        record = {"layout": name, "world": world,
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
        for loss in args.losses.split(","):
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
            t0 = time.time()
            res = run_rl_layout(layout, cfg, mbs, RLStepConfig(loss_name=loss), ddp=True,
                                grads="norms" if big else "full", attention_backend="reference")
            elapsed = time.time() - t0
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
            mems = [None] * world
            dist.all_gather_object(mems, (before, peak))
            record[loss] = {"loss": res.loss, "seq_log_ratio": res.seq_log_ratio, "seq_phi": res.seq_phi,
                            "grads": res.grads, "metrics": res.metrics, "seconds": elapsed, "mem_gib": mems}
            if rank == 0:
                print(f"{name} {loss}: loss {res.loss:.6g} {elapsed:.1f}s mem (before, peak) {mems}", flush=True)
        record["replay"] = replay_exactness(layout, cfg, mbs)
        if rank == 0:
            torch.save(record, os.path.join(args.out, f"{name}.pt"))
            print(f"{name}: replay {record['replay']}", flush=True)
    dist.destroy_process_group()


def compare(out: str) -> None:
    ref_all = torch.load(os.path.join(out, "ref.pt"), weights_only=False)
    losses = [k for k in ref_all if isinstance(ref_all[k], dict) and "grads" in ref_all[k]]
    rows = []
    for fname in sorted(os.listdir(out)):
        if not fname.endswith(".pt") or fname == "ref.pt":
            continue
        r_all = torch.load(os.path.join(out, fname), weights_only=False)
        for loss in losses:
            ref, r = ref_all[loss], r_all[loss]
            # full gradients (tiny) or per-parameter gradient norms (qwen3-slice): relative L2 error each
            g_rel = max(float((r["grads"][k].double() - v.double()).norm() / v.double().norm())
                        for k, v in ref["grads"].items() if float(v.double().norm()) > 0)
            phi_err = float("nan")
            if ref["seq_phi"] is not None:
                phi_err = float(((r["seq_phi"] - ref["seq_phi"]).abs() / ref["seq_phi"].abs().clamp(min=1e-30)).max())
            rows.append({
                "layout": r_all["layout"], "loss_fn": loss, "world": r_all["world"], "device": r_all["device"],
                "loss": r["loss"], "loss_rel_err": abs(r["loss"] - ref["loss"]) / abs(ref["loss"]),
                "log_w_max_abs_err": float((r["seq_log_ratio"] - ref["seq_log_ratio"]).abs().max()),
                "phi_max_rel_err": phi_err, "grad_norm_max_rel_err": g_rel, "grads_compared": len(ref["grads"]),
                "replay_max_abs_logp_diff": r_all["replay"]["replay_max_abs_logp_diff"],
                "replay_agree_exact": r_all["replay"]["replay_agree_exact"],
                # the first loss of a fresh process (vespo) starts from nothing allocated: its peak is the
                # layout's; later runs in the same process start above leftovers of the earlier models
                "step_peak_gib_above_start": max(m[1] - m[0] for m in r["mem_gib"]),
                "seconds": r["seconds"],
            })
    ref_row = {"layout": "ref", "world": ref_all["world"], "device": ref_all["device"], "replay": ref_all["replay"],
               **{loss: {"loss": ref_all[loss]["loss"],
                         "peak_mem_gib": max(m[1] - m[0] for m in ref_all[loss]["mem_gib"]),
                         "log_w": ref_all[loss]["seq_log_ratio"].tolist(),
                         "phi": None if ref_all[loss]["seq_phi"] is None else ref_all[loss]["seq_phi"].tolist()}
                  for loss in losses}}
    with open(os.path.join(out, "layouts.json"), "w") as f:
        json.dump({"reference": ref_row, "layouts": rows}, f, indent=2, default=float)
    cols = ["layout", "loss_fn", "world", "loss", "loss_rel_err", "log_w_max_abs_err", "phi_max_rel_err",
            "grad_norm_max_rel_err", "replay_max_abs_logp_diff", "replay_agree_exact", "step_peak_gib_above_start", "seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")
    table = "\n".join(lines)
    with open(os.path.join(out, "layouts.md"), "w") as f:
        f.write(f"Reference: {ref_row}\n\n{table}\n")
    print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "qwen3-slice"], default="tiny")
    p.add_argument("--layouts", default="ref")
    p.add_argument("--losses", default="vespo,grpo,gspo")
    p.add_argument("--out", default="bench/results/layouts_tmp")
    p.add_argument("--compare", metavar="DIR")
    args = p.parse_args()
    if args.compare:
        compare(args.compare)
    else:
        run(args)


if __name__ == "__main__":
    main()
