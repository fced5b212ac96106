"""GPU check: do CUDA graphs of the decode steps (`EmbeddedEngineConfig.cuda_graphs`) make the eager engine's
generations under the engine's other options? Not a test (tests/test_decode_graphs.py checks the bookkeeping on
CPU with a stand-in capture; this checks real graphs).

    python bench/engine_graph_check.py --out OUT.json [--size testbed|tiny] [--rows 256] [--new-tokens 64]

For each setting (fp32; bf16 autocast + fp8 per-row GEMMs, the sweep's mismatch rows; each with and without the
R3 routing record; lag 1 after one weight update): the eager cached engine and a graph engine generate the same
batches (two batches of other prompts, then the first again: captures, then replays), and the script reports
whether tokens, log-probs and recorded routing are identical, and how many graphs were captured. Prints a
markdown table and writes the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from engine_bench import SIZES, _init_dist, _requests  # noqa: E402

SETTINGS = {
    "fp32": dict(),
    "bf16+fp8": dict(precision="bf16", fp8="per_row"),
}


class _Weights:
    def __init__(self, model):
        self.model = model


def _summary(gens):
    return [(g.output_ids, g.output_logprobs, None if g.routing is None else g.routing.expert_ids.tolist())
            for g in gens]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="testbed")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    _init_dist()
    from vespo_megatron.megatron.model import TinyMoEConfig, build_gpt_model
    from vespo_megatron.megatron.parallel_setup import ParallelConfig, initialize_parallel
    from vespo_megatron.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig

    size = SIZES[args.size]
    cfg = TinyMoEConfig(**size["model"], seq_length=size["prompt"][1] + args.new_tokens, init_method_std=0.05,
                        moe_enable_routing_replay=True)
    layout = ParallelConfig()
    groups = initialize_parallel(layout)
    model = build_gpt_model(cfg, layout, groups, attention_backend="auto")
    V, L = cfg.vocab_size, cfg.num_layers
    batches = [_requests(args.rows, args.new_tokens, size["prompt"], V, seed=s) for s in (1, 2)]
    batches.append(batches[0])
    rows = []
    for name, kw in SETTINGS.items():
        for record in (False, True):
            for lag in (0, 1):
                def engine(graphs, kw=kw, record=record, lag=lag):
                    eng = EmbeddedEngine(EmbeddedEngineConfig(cuda_graphs=graphs, lag=lag, **kw), model, groups,
                                         vocab_size=V, eos_id=-1, moe_layers=tuple(range(L)),
                                         num_experts=cfg.num_experts, record_routing=record)
                    eng.sync_weights(_Weights(model), 0)
                    return eng

                reqs = [[dataclasses.replace(r, return_routing=record) for r in b] for b in batches]
                engines = (engine(False), engine(True))
                if lag:  # one update after the sync: both engines must sample with the version-0 weights
                    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
                    with torch.no_grad():
                        for prm in model.parameters():
                            prm.add_(torch.randn_like(prm) * 1e-2)
                    for e in engines:
                        e.sync_weights(_Weights(model), 1)
                outs = [[_summary(e.generate(b, seed=7 + i)) for i, b in enumerate(reqs)] for e in engines]
                if lag:
                    model.load_state_dict(state, strict=False)
                eager, graphs = outs
                rows.append(dict(setting=name, record_routing=record, lag=lag, graph_reason=engines[1].graph_reason,
                                 graphs=engines[1]._graphs.num_graphs,
                                 identical=[a == b for a, b in zip(eager, graphs, strict=True)]))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    lines = [f"# CUDA graphs vs the eager cached engine ({args.size}, {args.rows} rows x {args.new_tokens} tokens, "
             f"{device})", "", "| setting | R3 record | lag | graph reason | graphs held | identical (batch 1, 2, 1 again) |",
             "|---|---|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['record_routing']} | {r['lag']} | {r['graph_reason'] or 'none (used)'} | "
                     f"{r['graphs']} | {', '.join(map(str, r['identical']))} |")
    md = "\n".join(lines) + "\n"
    print(md)
    with open(args.out, "w") as f:
        json.dump(dict(device=device, rows=rows, command="python bench/engine_graph_check.py "
                       + " ".join(argv if argv is not None else sys.argv[1:])), f, indent=2)
    return rows


if __name__ == "__main__":
    main()
