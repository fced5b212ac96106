"""Measure the embedded engine's mismatch knob: KL k3 and per-layer routing flip rate per setting. Not a test.

    python bench/mismatch_knob.py                  # CPU toy model -> bench/results/mismatch_knob_cpu.md
    python bench/mismatch_knob.py --size testbed   # one GPU, the issue-17 testbed model, random init
    python bench/mismatch_knob.py --hf-checkpoint runs/testbed/sft/hf   # a trained testbed base (an SFT'd
                                                   # model, `vespo-train --base testbed` shape) on the task's
                                                   # held-out prompts, sampled at T = 1 until <eos>

For each setting the engine generates (KV-cached, record_routing on) and the trainer's view is computed
independently: one plain fp32 forward of the final sequences without the knob (teacher forcing), recorded
with RouterReplay. Reported per setting:
  kl_k3     mean over generated tokens of e^d - d - 1, d = log pi_train - log mu_engine (KL(engine || train))
  flip[l]   share of processed tokens (prompt + output but the last) whose top-k expert set at MoE layer l
            differs between the engine's decode-time routing and the trainer's routing
A random-init model is nearly uniform over its vocabulary, which hides logit errors; --init-std sets how
peaked it is (the toy default 0.2 gives per-token entropies well below log V). The lead's GPU numbers on the
SFT'd testbed model are the ones to calibrate the default against.

Shape legend: [T] tokens, [T, L, K] routing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from engine_bench import SIZES, _init_dist, _requests  # noqa: E402

SETTINGS = (
    dict(name="fp32 (no mismatch)"),
    dict(name="bf16", precision="bf16"),
    dict(name="fp8 per_tensor", fp8="per_tensor"),
    dict(name="fp8 per_row", fp8="per_row"),
    dict(name="router noise 0.05", router_noise=0.05),
    dict(name="router noise 0.2", router_noise=0.2),
    dict(name="bf16 + fp8 per_row + noise 0.05", precision="bf16", fp8="per_row", router_noise=0.05),
    dict(name="bf16 + fp8 per_row (the sweep's MISMATCH_FLAGS)", precision="bf16", fp8="per_row"),
    dict(name="fp8 per_row + noise 0.2", fp8="per_row", router_noise=0.2),
    dict(name="bf16 + noise 0.2", precision="bf16", router_noise=0.2),
)


@torch.no_grad()
def _trainer_view(model, prompt, output, vocab):
    """Teacher-forced fp32 log-probs [n] of `output` and the routing [P+n-1, L, K] the trainer computes."""
    from vespo_megatron.compat import RouterReplay, RouterReplayAction

    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt) + list(output)], device=device)
    RouterReplay.clear_global_indices()
    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    model.eval()
    try:
        logits = model(input_ids=ids, position_ids=torch.arange(ids.size(1), device=device)[None], attention_mask=None)
        routing = torch.stack([r.cpu() for r in RouterReplay.get_recorded_data()], dim=1)  # [S, L, K]
    finally:
        RouterReplay.set_global_router_replay_action(None)
        RouterReplay.clear_global_indices()
        model.train()
    logp = torch.log_softmax(logits[0, :, :vocab].double(), dim=-1).cpu()
    P, n = len(prompt), len(output)
    lp = logp[P - 1 : P - 1 + n].gather(1, torch.tensor(output)[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)[P - 1 : P - 1 + n]
    return lp, routing[: P + n - 1], ent


def _random(args, size):
    """A random-init model of `size` and random prompts; EOS off, so every row makes `new_tokens` tokens."""
    from vespo_megatron.megatron.model import TinyMoEConfig, build_gpt_model
    from vespo_megatron.megatron.parallel_setup import ParallelConfig, initialize_parallel

    cfg = TinyMoEConfig(**size["model"], seq_length=size["prompt"][1] + args.new_tokens,
                        init_method_std=args.init_std, moe_enable_routing_replay=True)
    layout = ParallelConfig()
    groups = initialize_parallel(layout)
    model = build_gpt_model(cfg, layout, groups, attention_backend="auto")
    reqs = [r.__class__(**{**r.__dict__, "return_routing": True})
            for r in _requests(args.samples, args.new_tokens, size["prompt"], cfg.vocab_size, seed=7)]
    what = f"model {size['model']}, init std {args.init_std}, {args.samples} samples x {args.new_tokens} new tokens"
    return model, groups, cfg.vocab_size, -1, tuple(range(sum(cfg.moe_pattern()))), cfg.num_experts, reqs, what


def _trained(args):
    """The trainer's own model loaded from an HF checkpoint (`--base testbed` shape, routing recorded) and the
    task's first `samples` held-out prompts, sampled at T = 1 up to the task's max_new_tokens or <eos>."""
    from vespo_megatron.rollout.engine import GenerationRequest
    from vespo_megatron.training import cli as train_cli
    from vespo_megatron.training.trainer import Trainer

    flags = ["--base", "testbed", "--hf-checkpoint", args.hf_checkpoint, "--routing-replay", "r3",
             "--eval-count", str(args.samples), "--out-dir", "/tmp/mismatch_knob", "--no-console"]
    trainer = Trainer(train_cli.config_from_argv(flags + (["--levels", args.levels] if args.levels else [])))
    task = trainer.task
    reqs = [GenerationRequest(sample_id=str(i), prompt_ids=tuple(p.prompt_ids), max_new_tokens=task.max_new_tokens,
                              temperature=1.0, return_routing=True) for i, p in enumerate(task.eval_problems())]
    what = (f"trained model {args.hf_checkpoint} ({trainer.cfg.model.num_layers} layers, hidden "
            f"{trainer.cfg.model.hidden_size}, {trainer.cfg.model.num_experts} experts), {len(reqs)} held-out "
            f"prompts (levels {task.cfg.levels}) sampled at T = 1 until <eos>")
    return (trainer.model, trainer.groups, task.tok.vocab_size, task.tok.EOS, tuple(trainer.moe_layers),
            trainer.cfg.model.num_experts, reqs, what)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--init-std", type=float, default=0.2)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--hf-checkpoint", default=None, metavar="DIR",
                   help="a trained testbed model (HF checkpoint of `vespo-train --base testbed` shape) instead of a "
                        "random one; prompts are the reasoning task's held-out problems")
    p.add_argument("--levels", default=None, help="with --hf-checkpoint: the task's level mix (default: the testbed's)")
    args = p.parse_args(argv)
    size = SIZES[args.size]
    _init_dist()
    from vespo_megatron.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
    from vespo_megatron.rollout.mismatch import kl_k3, routing_flip_rate

    if args.hf_checkpoint:
        model, groups, vocab, eos, moe_layers, num_experts, reqs, what = _trained(args)
    else:
        model, groups, vocab, eos, moe_layers, num_experts, reqs, what = _random(args, size)
    rows = []
    for setting in SETTINGS:
        kw = {k: v for k, v in setting.items() if k != "name"}
        eng = EmbeddedEngine(EmbeddedEngineConfig(**kw), model, groups, vocab_size=vocab, eos_id=eos,
                             moe_layers=moe_layers, num_experts=num_experts, record_routing=True)
        gens = eng.generate(reqs, seed=5)
        mu, pi, ents, r_eng, r_tr = [], [], [], [], []
        for r, g in zip(reqs, gens, strict=True):
            lp, routing, ent = _trainer_view(model, r.prompt_ids, g.output_ids, vocab)
            mu.append(torch.tensor(g.output_logprobs, dtype=torch.float64))
            pi.append(lp)
            ents.append(ent)
            r_eng.append(torch.from_numpy(g.routing.expert_ids.astype("int64")))
            r_tr.append(routing.long())
        flips = routing_flip_rate(torch.cat(r_eng), torch.cat(r_tr))
        rows.append(dict(setting=setting["name"], **kw, kl_k3=kl_k3(torch.cat(pi), torch.cat(mu)),
                         flip_rate_per_layer=[round(float(f), 5) for f in flips],
                         entropy=float(torch.cat(ents).mean())))
    cmd = "python bench/mismatch_knob.py " + " ".join(argv if argv is not None else sys.argv[1:])
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    name = "trained testbed" if args.hf_checkpoint else args.size
    lines = [f"# Mismatch knob: KL k3 and routing flips ({name} model, {device})", "", f"`{cmd}`", "",
             f"{what}, KV-cached engine; trainer = fp32 teacher-forced forward without the knob.", "",
             "| setting | KL k3 | routing flip rate per MoE layer | mean entropy (nats) |", "|---|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['kl_k3']:.2e} | {', '.join(f'{f:.3f}' for f in r['flip_rate_per_layer'])} "
                     f"| {r['entropy']:.2f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    os.makedirs(args.out, exist_ok=True)
    tag = ("trained_testbed_" if args.hf_checkpoint else "") + (
        "cpu" if not torch.cuda.is_available() else f"{args.size}_cuda")
    with open(os.path.join(args.out, f"mismatch_knob_{tag}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, f"mismatch_knob_{tag}.json"), "w") as f:
        json.dump(dict(command=cmd, device=device, rows=rows), f, indent=2)
    import torch.distributed as dist

    dist.destroy_process_group()
    return dict(rows=rows)


if __name__ == "__main__":
    main()
