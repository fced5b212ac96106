"""Per-GPU memory plan of a MoE training run under a megatron-core layout, before launching it.

Prints a markdown report (parameters, weights, fp32 grads, Adam state, activations with and without full
recomputation, RL extras, whether it fits each GPU size) and, with --out, writes it and a JSON next to it.
The numbers come from `vespo_megatron.planning.memory` (pure Python; the assumptions are listed in the report).

    python examples/memory_plan.py --preset qwen3-30b-a3b --tp 4 --ep 8 --gpus 128 \\
        --micro-batch-tokens 32768 --seq-length 4096 --gpu-memory-gib 80 141
    python examples/memory_plan.py --hf-config path/to/config.json --tp 2 --ep 8 --dp 8 \\
        --micro-batch-tokens 8192 --search --out plan.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

from vespo_megatron.planning.memory import (
    GIB,
    PRESETS,
    Layout,
    MemoryPlan,
    ModelShape,
    RunSetup,
    count_params,
    minimal_gpus,
    plan_memory,
    routing_record_host_bytes,
    search_layouts,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--hf-config", help="a Hugging Face config.json of a registered model family (qwen3_moe, mixtral)")
    model.add_argument("--preset", choices=sorted(PRESETS))
    lay = p.add_argument_group("layout (world = tp * cp * pp * dp; sequence parallelism on when tp > 1)")
    for name in ("tp", "cp", "ep", "etp", "pp"):
        lay.add_argument(f"--{name}", type=int, default=1)
    size = lay.add_mutually_exclusive_group()
    size.add_argument("--dp", type=int, default=None, help="data-parallel size (default 1)")
    size.add_argument("--gpus", type=int, default=None, help="total GPUs; dp = gpus / (tp * cp * pp)")
    run = p.add_argument_group("run")
    run.add_argument("--micro-batch-tokens", type=int, default=8192,
                     help="packed tokens of one micro-batch of one DP replica, before the CP split")
    run.add_argument("--seq-length", type=int, default=None, help="tokens per sequence (default: the micro-batch)")
    run.add_argument("--micro-batches-per-step", type=int, default=1,
                     help="micro-batches of one DP rank per RL step (sizes the routing-replay ids)")
    run.add_argument("--params-dtype", choices=["bf16", "fp32"], default="bf16")
    run.add_argument("--no-distributed-optimizer", action="store_true")
    run.add_argument("--attention", choices=["flash", "unfused"], default="flash")
    run.add_argument("--routing-replay", choices=["off", "r2", "r3"], default="off")
    run.add_argument("--loss-head", choices=["fused", "logits"], default="fused",
                     help="fused: the trainer's default (--fused-lm-head, its single pass); logits: --no-fused-lm-head")
    run.add_argument("--gpu-memory-gib", type=float, nargs="+", default=[80.0], help="GPU sizes to check")
    run.add_argument("--headroom", type=float, default=0.10,
                     help="fraction of each GPU kept free for the CUDA context, NCCL and fragmentation")
    out = p.add_argument_group("output")
    out.add_argument("--search", action="store_true",
                     help="also try tp 1,2,4,8 x ep 1..32 x pp 1,2,4 x cp 1,2 on the same GPUs, and find the "
                          "fewest GPUs (powers of two up to --max-gpus) with a layout that fits")
    out.add_argument("--max-gpus", type=int, default=None, help="--search: largest GPU count (default: world)")
    out.add_argument("--search-top", type=int, default=20,
                     help="--search: rows of fitting layouts in the report (the JSON lists all)")
    out.add_argument("--variants", action="store_true",
                     help="also tabulate bf16 / fp32 parameters with and without the distributed optimizer")
    out.add_argument("--out", default=None, help="write the markdown here and a .json next to it")
    return p.parse_args(argv)


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def _billions(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _variant(plan: MemoryPlan) -> str:
    setup = plan.setup
    return f"{setup.params_dtype}, {'distributed' if setup.distributed_optimizer else 'replicated'} optimizer"


def _row(plan: MemoryPlan, label=None) -> list[str]:
    s, gpus = plan.worst(False), plan.setup.gpu_memory_gib
    fits = [f"{_yes(plan.fits(g, False))} / {_yes(plan.fits(g, True))}" for g in gpus]
    return [label(plan) if label else plan.layout.name(), str(plan.layout.world), str(s.stage), _billions(s.params.dense),
            _billions(s.params.expert), _gib(s.weights), _gib(s.grads), _gib(s.optimizer),
            _gib(s.activations["no_recompute"]), _gib(plan.worst(True).activations["full_recompute"]),
            _gib(sum(s.rl_extras.values())), _gib(plan.peak(False)), _gib(plan.peak(True)), *fits]


def _table(plans: list[MemoryPlan], label=None, first: str = "layout") -> list[str]:
    gpus = plans[0].setup.gpu_memory_gib
    head = [first, "GPUs", "worst stage", "dense params/GPU", "expert params/GPU", "weights GiB", "grads GiB",
            "optimizer GiB", "act. GiB (no recompute)", "act. GiB (full recompute)", "RL extras GiB",
            "total GiB (no recompute)", "total GiB (full recompute)",
            *[f"fits {g:g} GiB (no rc / rc)" for g in gpus]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_row(p, label)) + " |" for p in plans]
    return lines


def render(plan: MemoryPlan, name: str, command: str, search=None, variants=None, search_top: int = 20) -> str:
    m, lay, setup = plan.shape, plan.layout, plan.setup
    counts = count_params(m)
    moe = m.moe_layers()
    L = [f"# GPU memory plan: {name}, {lay.name()} ({lay.world} GPUs)", "",
         "Generated by (from the repository root):", "", "```bash", command, "```", "",
         "Numbers are per GPU, in GiB (2^30 bytes), for one rank of the worst pipeline stage; "
         f"'fits' keeps {setup.headroom:.0%} of each GPU free (CUDA context, NCCL buffers, fragmentation).", "",
         "## Model", "",
         f"{m.num_hidden_layers} layers ({sum(moe)} MoE, {len(moe) - sum(moe)} dense), hidden {m.hidden_size}, "
         f"{m.num_attention_heads} query / {m.num_key_value_heads} KV heads of {m.kv_channels}, "
         f"{m.num_experts} experts top-{m.num_experts_per_tok} of width {m.moe_intermediate_size}, "
         f"vocab {m.vocab_size}, {'tied' if m.tie_word_embeddings else 'untied'} embeddings.", "",
         "| part | parameters |", "|---|---|"]
    for key in ("embedding", "output_layer", "attention", "norms", "router", "experts", "dense_mlp", "total",
                "active", "non_embedding"):
        L.append(f"| {key.replace('_', ' ')} | {getattr(counts, key):,} ({_billions(getattr(counts, key))}) |")
    L += ["", "Active = every parameter but the experts a token is not routed to (embedding and output layer "
          "included).", "",
          "## Layout", "",
          f"- world {lay.world} = tp {lay.tp} x cp {lay.cp} x pp {lay.pp} x dp {lay.dp}; sequence parallelism "
          f"{'on' if lay.sp else 'off (tp = 1)'}",
          f"- dense grads / optimizer shards over dp x cp = {lay.dp_cp} ranks; expert grads / optimizer shards "
          f"over expert-dp = world / (etp x ep x pp) = {lay.expert_dp} ranks",
          f"- {m.num_experts // lay.ep if m.num_experts else 0} experts per EP rank (etp {lay.etp}); "
          f"{m.num_hidden_layers // lay.pp} layers per pipeline stage",
          f"- micro-batch: {setup.micro_batch_tokens} tokens ({setup.micro_batch_tokens // setup.seq_length} "
          f"sequences of {setup.seq_length}); per rank {setup.micro_batch_tokens // lay.cp} after CP, "
          f"{setup.micro_batch_tokens // lay.cp // lay.tp} after the SP split; "
          f"{setup.micro_batches_per_step} micro-batches per DP rank and step",
          f"- {setup.params_dtype} parameters, fp32 main grads, Adam, distributed optimizer "
          f"{'on' if setup.distributed_optimizer else 'off'}, {setup.attention} attention, routing replay "
          f"{setup.routing_replay}, {setup.loss_head} loss head", "",
          "## Memory per GPU", "", *_table([plan]), ""]
    if variants:
        L += ["### Precision and optimizer variants of this layout", "",
              *_table(variants, label=_variant, first="variant"), ""]
    if lay.pp > 1:
        L += ["### Per pipeline stage", "",
              "| stage | layers | in-flight micro-batches | dense params | expert params | static GiB | "
              "act. GiB (no rc) | act. GiB (full rc) | total GiB (no rc) | total GiB (full rc) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for s in plan.stages:
            L.append(f"| {s.stage} | {s.layers[0]}-{s.layers[1]} | {s.in_flight} | {_billions(s.params.dense)} | "
                     f"{_billions(s.params.expert)} | {_gib(s.static)} | {_gib(s.activations['no_recompute'])} | "
                     f"{_gib(s.activations['full_recompute'])} | {_gib(s.total(False))} | {_gib(s.total(True))} |")
        L.append("")
    s = plan.worst(False)
    L += [f"### Worst stage ({s.stage}) in detail", "", "| item | GiB |", "|---|---|"]
    for k, v in s.params.parts.items():
        L.append(f"| params: {k.replace('_', ' ')} ({_billions(v)}) | {_gib(v * setup.param_bytes)} |")
    for k, v in s.activation_parts.items():
        L.append(f"| activations (no recompute, {s.in_flight} micro-batch(es) in flight): {k} | {v / GIB:.2f} |")
    for k, v in s.rl_extras.items():
        L.append(f"| RL extra: {k} | {v / GIB:.3f} |")
    host = routing_record_host_bytes(m, lay, setup)
    if host:
        L.append(f"| host memory (not GPU): R3 compact routing record of the step | {host / GIB:.3f} |")
    L.append("")
    if search is not None:
        plans, skipped, minimal = search
        fitting = [p for p in plans if any(p.fits(g, rc) for g in setup.gpu_memory_gib for rc in (False, True))]
        L += [f"## Search: layouts of {lay.world} GPUs that fit (sorted by total without recomputation)", ""]
        L += _table(fitting[:search_top]) if fitting else ["None of the grid's layouts fits."]
        L += ["", f"{len(plans)} valid layouts tried (tp 1,2,4,8 x ep 1,2,4,8,16,32 x pp 1,2,4 x cp 1,2, etp "
              f"{lay.etp}), {len(fitting)} fit on at least one GPU size"
              + (f" (the first {search_top} shown; the JSON lists all)" if len(fitting) > search_top else "")
              + "; invalid combinations skipped: "
              + (", ".join(f"{k} ({n})" for k, n in sorted(skipped.items())) or "none") + ".", "",
              "### Fewest GPUs (powers of two, same grid) with a layout that fits", ""]
        for (gib, rc), found in minimal.items():
            mode = f"{gib:g} GiB, {'full recompute' if rc else 'no recompute'}"
            if found is None:
                L.append(f"- {mode}: none up to the largest GPU count tried")
            else:
                gpus, best = found
                L.append(f"- {mode}: **{gpus} GPUs**, e.g. {best.layout.name()} "
                         f"({_gib(best.peak(rc))} GiB peak)")
        L.append("")
    L += ["## Assumptions", "", *[f"- {a}" for a in ASSUMPTIONS], ""]
    return "\n".join(L)


ASSUMPTIONS = [
    "Weights in the parameter dtype (2 B bf16 / 4 B fp32); main gradients fp32, 4 B/param (megatron DDP "
    "`grad_reduce_in_fp32`, megatron-lm `--accumulate-allreduce-grads-in-fp32`), one full-size buffer per rank "
    "even with the distributed optimizer.",
    "Adam: bf16 parameters keep fp32 master weights + m + v = 12 B/param, fp32 parameters m + v = 8 B/param; "
    "the distributed optimizer shards dense parameters (the router included) over dp x cp and expert "
    "parameters over expert-dp = world / (etp x ep x pp).",
    "Parameters: embedding on the first stage and output layer on the last, both split over TP (a tied "
    "output layer costs nothing with pp = 1 and is a copy on the last stage with pp > 1); attention "
    "projections split over TP; norms and the router replicated over TP; experts split over EP (whole "
    "experts) and expert-TP (columns); dense MLP layers split over TP; layers split evenly over PP.",
    "Activations (Korthikanti et al. 2022, arXiv:2205.05198, section 4, adapted): no dropout; flash "
    "attention saves q, k, v, its output and an fp32 log-sum-exp per head (no [s, s] tensor; `--attention "
    "unfused` adds the softmax probabilities); QK-norm inputs saved; SwiGLU saves fc1 input, fc1 output "
    "[2I] and fc2 input [I]; sequence parallelism stores the norm inputs and GEMM inputs as tokens / (cp x tp) "
    "shards; activations in the parameter dtype.",
    "MoE: uniform routing, so a rank's local experts process (tokens / (cp x tp)) x topk x etp routed copies "
    "whatever EP is (each rank receives its EP peers' tokens); per copy fc1 input, fc1 output, fc2 input, an "
    "fp32 probability and an int64 index; the router saves its input and fp32 softmax. Real routing is "
    "uneven: the busiest rank of a layer can receive several times the average without a capacity factor.",
    "Full recomputation (megatron `--recompute-granularity full --recompute-method uniform "
    "--recompute-num-layers 1`): each layer's input (tokens / (cp x tp) x h) is kept, one layer is "
    "rematerialised at a time in the backward pass.",
    "Pipeline 1F1B (no interleaving): stage i holds min(pp - i, micro-batches per step) micro-batches in "
    "flight, so the first stage holds pp micro-batches of L / pp layers; the last stage holds one plus the "
    "loss.",
    "Loss (last stage), `--loss-head fused` (the trainer's default, the fused head's single pass): one tile of "
    "2^29.25 logits in the parameter dtype (a chunk of whole sequences; a sequence up to twice that, at most "
    "2^30, held whole), d W of the output-layer shard in fp32, d hidden [tokens / cp, h] held from the forward "
    "to the backward pass, fp32 per-token statistics. `--loss-head logits`: logits [tokens / cp, vocab / tp] in the "
    "parameter dtype saved for the chunked log-prob backward plus their gradient of the same size (= 4 B per "
    "logit for bf16, the size of fp32 logits), one fp32 chunk of about 2^25 logits, fp32 per-token statistics.",
    "RL extras: the micro-batch tensors (int64 tokens / positions / labels / sequence ids / token index, "
    "bool loss mask, fp32 old and rollout log-probs) per in-flight micro-batch; with routing replay the "
    "int64 [tokens / (cp x tp), topk] ids per MoE layer of the stage for every micro-batch of the step (R2: "
    "the recorded routing; R3: megatron's RouterReplay keeps each replayed target until the pass ends); "
    "the compact R3 record (uint8 ids for <= 256 experts, else int16) stays in host memory.",
    "Not counted, covered by the headroom: CUDA context, NCCL and communication buffers (SP all-gathers, "
    "EP all-to-all, gradient buckets, distributed-optimizer all-gathers), GEMM workspaces, the old-log-prob "
    "(forward-only) pass, which needs less than the update, and the rollout engine (SGLang, when colocated, "
    "must release its memory during training).",
]


def main(argv=None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.preset:
        shape, name = PRESETS[args.preset], args.preset
    else:
        shape, name = ModelShape.from_hf_json(args.hf_config), Path(args.hf_config).parent.name or args.hf_config
    sizes = dict(tp=args.tp, cp=args.cp, ep=args.ep, etp=args.etp, pp=args.pp)
    layout = Layout.from_gpus(args.gpus, **sizes) if args.gpus is not None else Layout(dp=args.dp or 1, **sizes)
    setup = RunSetup(micro_batch_tokens=args.micro_batch_tokens,
                     seq_length=args.seq_length or args.micro_batch_tokens,
                     micro_batches_per_step=args.micro_batches_per_step, params_dtype=args.params_dtype,
                     distributed_optimizer=not args.no_distributed_optimizer, attention=args.attention,
                     routing_replay=args.routing_replay, loss_head=args.loss_head,
                     gpu_memory_gib=tuple(args.gpu_memory_gib),
                     headroom=args.headroom)
    plan = plan_memory(shape, layout, setup)
    search = None
    if args.search:
        plans, skipped = search_layouts(shape, setup, layout.world, etp=args.etp)
        top = args.max_gpus or layout.world
        candidates = sorted({1 << i for i in range(top.bit_length()) if 1 << i <= top} | {top})
        minimal = {(gib, rc): minimal_gpus(shape, setup, gib, rc, candidates, etp=args.etp)
                   for gib in setup.gpu_memory_gib for rc in (False, True)}
        search = (plans, skipped, minimal)
    variants = None
    if args.variants:
        variants = [plan_memory(shape, layout, dataclasses.replace(setup, params_dtype=dtype, distributed_optimizer=dist))
                    for dtype in ("bf16", "fp32") for dist in (True, False)]
    command = shlex.join(["python", "examples/memory_plan.py", *raw])
    text = render(plan, name, command, search, variants, args.search_top)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        data = {"command": command, "plan": plan.summary()}
        if variants:
            data["variants"] = [{"params_dtype": v.setup.params_dtype,
                                 "distributed_optimizer": v.setup.distributed_optimizer,
                                 "peak_bytes": {"no_recompute": v.peak(False), "full_recompute": v.peak(True)},
                                 "fits": v.summary()["fits"]} for v in variants]
        if search is not None:
            data["search"] = {
                "fitting": [{"layout": p.layout.name(), "gpus": p.layout.world,
                             "peak_bytes": {"no_recompute": p.peak(False), "full_recompute": p.peak(True)},
                             "fits": p.summary()["fits"]} for p in search[0]
                            if any(p.fits(g, rc) for g in setup.gpu_memory_gib for rc in (False, True))],
                "skipped": search[1],
                "minimal_gpus": [{"gpu_memory_gib": gib, "recompute": rc,
                                  "gpus": None if f is None else f[0],
                                  "layout": None if f is None else f[1].layout.name()}
                                 for (gib, rc), f in search[2].items()],
            }
        out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
