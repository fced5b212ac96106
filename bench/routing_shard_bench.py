# Shape legend: [N] routed token rows of the sample (P + O - 1), [L_moe] its 48 MoE layers, [K] top-8;
# a rank's shard is [N_r, L_stage, K]: its CP share of the rows, its pipeline stage's 12 layers.
"""Benchmark: routing bytes each rank of a replica receives, whole generations (before) vs per-rank shards
(after). Not a test.

Model: Qwen3-30B-A3B routing (48 layers, all MoE, top-8 of 128 experts, uint8 ids: 384 B per token). One
sample of ``--tokens`` tokens (default 16384: P=2048 prompt + 14336 output), so its record is
``[16383, 48, 8]`` = 6.0 MiB. Replica: PP=4 x CP=2 (8 ranks, rank = pp * 2 + cp, no TP), each stage holding
12 MoE layers, THD pad multiple 2 * cp = 4.

before: `ReplicaEngine` broadcasts the whole generations (`broadcast_object_list`): every rank receives the
        whole record.
after:  the replica's first rank cuts each rank's shard (`vespo_megatron.routing.shards.shard_record`: its
        stage's layers, its CP share of the tokens) and scatters them (`scatter_object_list`).

Per rank, the table gives the routing bytes received (``expert_ids.nbytes``) and the pickled bytes of the
whole object each rank receives (what the object collectives serialise for it: the generation's token ids
and log-probs too, the same before and after). Rank 0 is the source: its share never crosses the wire, it
is listed for completeness. The bytes are computed exactly in this process, then (unless ``--no-spawn``)
measured in a real 8-process gloo run on CPU, where every rank also checks its shard against the whole
record and both transports are timed (median of ``--repeats``; shared CPU, indicative only).

Command: ``/work/main/.venv/bin/python bench/routing_shard_bench.py`` (writes
bench/results/routing_shards_cpu.json and .md, or under --out).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import socket
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from routing_payload_bench import synthetic_routing  # noqa: E402

from vespo_megatron.models import preset_config  # noqa: E402
from vespo_megatron.rollout.engine import Generation  # noqa: E402
from vespo_megatron.routing import RoutingRecord, RoutingSpec  # noqa: E402
from vespo_megatron.routing.shards import RankPlan, pad_multiple_for, shard_generations, shard_record  # noqa: E402


def make_generation(tokens: int, prompt_tokens: int, spec: RoutingSpec) -> Generation:
    p, o = prompt_tokens, tokens - prompt_tokens
    ids = synthetic_routing(p + o - 1, spec).astype(spec.dtype)
    record = RoutingRecord(sample_id="s0", expert_ids=ids, num_prompt_tokens=p, num_output_tokens=o,
                           moe_layers=spec.moe_layers, num_experts=spec.num_experts)
    rng = np.random.default_rng(1)
    return Generation(sample_id="s0", prompt_ids=tuple(int(t) for t in rng.integers(0, 151936, p)),
                      output_ids=tuple(int(t) for t in rng.integers(0, 151936, o)),
                      output_logprobs=tuple(float(x) for x in -rng.random(o)), weight_version=0,
                      finish_reason="length", routing=record)


def rank_plans(spec: RoutingSpec, pp: int, cp: int) -> list[RankPlan]:
    """Plans of the replica's ranks, rank = stage * cp + cp_rank; stages hold equal runs of MoE layers."""
    per = spec.num_moe_layers // pp
    pad = pad_multiple_for(cp, 1, False)
    return [RankPlan(moe_layers=spec.moe_layers[s * per:(s + 1) * per], cp_size=cp, cp_rank=c, pad_multiple=pad)
            for s in range(pp) for c in range(cp)]


def exact_rows(gens: list[Generation], plans: list[RankPlan]) -> list[dict]:
    whole = pickle.dumps(gens)
    rows = []
    for rank, plan in enumerate(plans):
        mine = shard_generations(gens, plan)
        r = mine[0].routing
        rows.append({
            "rank": rank, "pp_stage": rank // plan.cp_size, "cp_rank": plan.cp_rank,
            "layers": f"{plan.moe_layers[0]}-{plan.moe_layers[-1]}", "token_rows": r.num_rows,
            "routing_bytes_before": sum(g.routing.nbytes for g in gens),
            "routing_bytes_after": sum(g.routing.nbytes for g in mine),
            "pickled_bytes_before": len(whole), "pickled_bytes_after": len(pickle.dumps(mine)),
        })
    return rows


# ------------------------------------------------------------------------------ the real gloo run


class _Engine:
    def __init__(self, gens):
        self.gens, self.weight_version = gens, 0

    def generate(self, requests, *, seed):
        return list(self.gens)


def _worker(rank, world, port, out_dir, args, plans):
    import torch
    import torch.distributed as dist

    from vespo_megatron.rollout.replica import ReplicaEngine, replica_of

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        spec = RoutingSpec.from_hf_config(preset_config("qwen3-30b-a3b"))
        replica = replica_of(0, 1)
        gens = [make_generation(args.tokens, args.prompt_tokens, spec)] if replica.is_source else []
        engines = {"before": ReplicaEngine(_Engine(gens), replica),
                   "after": ReplicaEngine(_Engine(gens), replica, plan=plans[rank])}
        out = {}
        for name, engine in engines.items():
            times = []
            for _ in range(args.repeats):
                dist.barrier()
                t0 = time.perf_counter()
                got = engine.generate([], seed=0)
                dist.barrier()
                times.append(time.perf_counter() - t0)
            out[name] = {"routing_bytes": sum(g.routing.nbytes for g in got), "pickled_bytes": len(pickle.dumps(got)),
                         "seconds": statistics.median(times), "token_rows": got[0].routing.num_rows}
            if name == "after":  # the shard this rank received is exactly its cut of the whole record
                ref = make_generation(args.tokens, args.prompt_tokens, spec).routing
                want = shard_record(ref, plans[rank])
                out["exact"] = bool(np.array_equal(got[0].routing.expert_ids, want.expert_ids)
                                    and got[0].routing.moe_layers == want.moe_layers
                                    and got[0].routing.cp_share == want.cp_share)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def spawn_run(args, plans) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(len(plans), port, out_dir, args, plans), nprocs=len(plans), join=True,
                           start_method="spawn")
        results = []
        for r in range(len(plans)):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                results.append(json.load(f))
        return results


# ------------------------------------------------------------------------------ report


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--cp", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-spawn", action="store_true", help="exact bytes only, no gloo run")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()

    spec = RoutingSpec.from_hf_config(preset_config("qwen3-30b-a3b"))
    gens = [make_generation(args.tokens, args.prompt_tokens, spec)]
    plans = rank_plans(spec, args.pp, args.cp)
    rows = exact_rows(gens, plans)
    measured = None if args.no_spawn else spawn_run(args, plans)
    if measured is not None:
        for row, m in zip(rows, measured, strict=True):
            # The gloo run's receivers measure the same bytes as computed here.
            assert m["after"]["routing_bytes"] == row["routing_bytes_after"], (row, m)
            assert m["before"]["routing_bytes"] == row["routing_bytes_before"], (row, m)
            assert m["exact"], row
            row.update(measured_pickled_before=m["before"]["pickled_bytes"], measured_pickled_after=m["after"]["pickled_bytes"],
                       seconds_before=m["before"]["seconds"], seconds_after=m["after"]["seconds"])

    total_before = sum(r["routing_bytes_before"] for r in rows[1:])
    total_after = sum(r["routing_bytes_after"] for r in rows[1:])
    result = {
        "model": "Qwen3-30B-A3B", "tokens": args.tokens, "prompt_tokens": args.prompt_tokens,
        "moe_layers": spec.num_moe_layers, "top_k": spec.top_k, "num_experts": spec.num_experts,
        "dtype": str(spec.dtype), "pp": args.pp, "cp": args.cp, "pad_multiple": plans[0].pad_multiple,
        "gloo_run": measured is not None, "repeats": args.repeats, "rows": rows,
        "routing_bytes_over_wire_before": total_before, "routing_bytes_over_wire_after": total_after,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
    }
    lines = [
        f"# Routing bytes received per rank: whole generations vs per-rank shards (CPU{', gloo' if measured else ''})",
        "",
        f"Qwen3-30B-A3B routing ({spec.num_moe_layers} MoE layers, top-{spec.top_k} of {spec.num_experts}, "
        f"{spec.dtype}), one sample of {args.tokens} tokens (P={args.prompt_tokens}), "
        f"{args.tokens - 1} routed rows; PP={args.pp} x CP={args.cp} replica, pad multiple "
        f"{plans[0].pad_multiple}. Command: `/work/main/.venv/bin/python bench/routing_shard_bench.py`.",
        "",
        "| rank | stage | cp | MoE layers | token rows | routing before | routing after | pickled before | pickled after |"
        + (" gloo pickled after | gloo s before | gloo s after |" if measured else ""),
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if measured else ""),
    ]
    for r in rows:
        line = (f"| {r['rank']}{' (source)' if r['rank'] == 0 else ''} | {r['pp_stage']} | {r['cp_rank']} | "
                f"{r['layers']} | {r['token_rows']} | {mib(r['routing_bytes_before'])} | "
                f"{mib(r['routing_bytes_after'])} | {mib(r['pickled_bytes_before'])} | {mib(r['pickled_bytes_after'])} |")
        if measured:
            line += (f" {mib(r['measured_pickled_after'])} | {r['seconds_before']:.3f} | {r['seconds_after']:.3f} |")
        lines.append(line)
    lines += [
        "",
        f"Routing bytes over the wire (ranks 1-{len(rows) - 1}): before {mib(total_before)}, after "
        f"{mib(total_after)} ({total_before / total_after:.1f}x less). 'pickled' is the whole object each rank "
        "receives (token ids and log-probs as Python tuples included, the same before and after).",
    ]
    if measured:
        lines.append(f"gloo run: {len(rows)} processes on CPU, every rank's shard equal to its cut of the whole "
                     f"record; times are the median of {args.repeats} (shared CPU: indicative only; 'after' includes "
                     "the source cutting the shards).")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "routing_shards_cpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "routing_shards_cpu.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
