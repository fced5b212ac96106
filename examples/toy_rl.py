"""Off-policy RL of a tiny Qwen3-MoE-shaped megatron-core model on a verifiable arithmetic task.

Simplifications: a character tokenizer and procedurally generated problems (`a+b=` -> digits, <eos>);
the embedded engine (the policy samples itself, no KV cache); a short supervised warm start so that RL
begins from a non-trivial reward. Everything else is the real path: megatron-core model, schedules, DDP and
optimizer, the chosen policy loss, the global normaliser, rollout correction, checkpoints, metrics.

Run (CPU, a few minutes, from the repository root after `bash ci/setup.sh`):
    .venv/bin/python examples/toy_rl.py
    .venv/bin/python examples/toy_rl.py --loss grpo --rollout-correction tis          # a baseline
    .venv/bin/python examples/toy_rl.py --staleness 8                                 # 8 updates per rollout
    .venv/bin/python examples/toy_rl.py --async-lag 2                                 # fully async, lag 2
    .venv/bin/python examples/toy_rl.py --rollout-precision bf16                      # train/inference mismatch
Several processes (any TP / SP / CP / EP / PP / DP that divides the world; gloo on CPU, NCCL on GPUs):
    torchrun --nproc-per-node 2 examples/toy_rl.py --ep 2
    torchrun --nproc-per-node 2 examples/toy_rl.py --tp 2 --sp
A run killed at any point and restarted with the same command resumes from its last checkpoint.
Plots of a run:  .venv/bin/python -m vespo_megatron.metrics.plot runs/toy/toy.jsonl --out runs/toy/plots
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from vespo_megatron.losses import RolloutCorrectionConfig
from vespo_megatron.megatron.model import TinyMoEConfig
from vespo_megatron.megatron.parallel_setup import ParallelConfig
from vespo_megatron.metrics.sinks import LoggingConfig, MetricsLogger
from vespo_megatron.training.config import (
    AlgorithmConfig,
    EvalConfig,
    HFCheckpointConfig,
    RolloutConfig,
    RunConfig,
    TrainerConfig,
)
from vespo_megatron.training.launch import init_distributed
from vespo_megatron.training.toy_task import ArithmeticTaskConfig, CharTokenizer
from vespo_megatron.training.weight_sync import WeightSyncConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model-preset", choices=sorted(PRESETS), default=None,
                   help="fill the model flags below with a known shape (explicit flags still win)")
    m.add_argument("--hidden-size", type=int, default=64)
    m.add_argument("--num-layers", type=int, default=2)
    m.add_argument("--num-attention-heads", type=int, default=4)
    m.add_argument("--num-query-groups", type=int, default=2)
    m.add_argument("--head-dim", type=int, default=None)
    m.add_argument("--ffn-hidden-size", type=int, default=None, help="dense FFN (default 2 * hidden)")
    m.add_argument("--num-experts", type=int, default=4)
    m.add_argument("--moe-router-topk", type=int, default=2)
    m.add_argument("--moe-ffn-hidden-size", type=int, default=64)
    m.add_argument("--vocab-size", type=int, default=None, help="default: the toy tokenizer's (64)")
    m.add_argument("--seq-length", type=int, default=64)
    par = p.add_argument_group("parallelism")
    par.add_argument("--tp", type=int, default=1)
    par.add_argument("--sp", action="store_true", help="sequence parallelism (required by MoE with TP > 1)")
    par.add_argument("--cp", type=int, default=1)
    par.add_argument("--ep", type=int, default=1)
    par.add_argument("--pp", type=int, default=1)
    t = p.add_argument_group("task and rollout")
    t.add_argument("--max-operand", type=int, default=9)
    t.add_argument("--ops", default="+", help="operators of the arithmetic task, a subset of '+-*'")
    t.add_argument("--prompts-per-step", type=int, default=32)
    t.add_argument("--group-size", type=int, default=8)
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--rollout-precision", choices=["fp32", "bf16"], default="fp32")
    t.add_argument("--async-lag", type=int, default=0, help="rollouts by weights this many syncs old")
    t.add_argument("--old-logprobs", choices=["recompute", "engine"], default="recompute")
    t.add_argument("--rollout-engine", choices=["embedded", "sglang"], default="embedded")
    t.add_argument("--sglang-url", default=None, help="with --rollout-engine sglang: http://host:port")
    a = p.add_argument_group("algorithm")
    a.add_argument("--loss", default="vespo", help="vespo | vespo_sqrt | vespo_lin | grpo | gspo | sapo | reinforce")
    a.add_argument("--rollout-correction", choices=["none", "tis", "mis", "fold"], default="none")
    a.add_argument("--rollout-correction-level", choices=["token", "sequence", "geometric"], default="token")
    a.add_argument("--staleness", type=int, default=2, help="N = global batch / mini-batch (updates per rollout)")
    a.add_argument("--micro-batch-size", type=int, default=32)
    a.add_argument("--lr", type=float, default=3e-4)
    a.add_argument("--clip-grad", type=float, default=1.0)
    a.add_argument("--routing-replay", choices=["off", "r2", "r3"], default="off",
                   help="r3: replay the engine's routing; r2: replay the trainer's own recorded routing")
    h = p.add_argument_group("checkpoint (Hugging Face)")
    h.add_argument("--hf-checkpoint", default=None,
                   help="start from this Qwen3-MoE HF checkpoint dir; the model flags come from its config.json "
                        "(model flags given explicitly must match it)")
    h.add_argument("--params-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="trainer parameter dtype (bf16: fp32 main weights in the optimizer)")
    h.add_argument("--recompute", action="store_true", help="full activation recomputation (memory for compute)")
    h.add_argument("--distributed-optimizer", action="store_true",
                   help="shard main weights and Adam moments over data parallelism")
    h.add_argument("--save-hf-every", type=int, default=0, help="write <out-dir>/hf/step_<n> every K steps")
    h.add_argument("--save-hf-final", action="store_true", help="write <out-dir>/hf/step_<steps> at the end")
    h.add_argument("--weight-sync", choices=["disk", "distributed"], default="disk",
                   help="SGLang: HF checkpoint on a shared disk (/update_weights_from_disk) or streamed buckets "
                        "(/update_weights_from_distributed)")
    h.add_argument("--weight-sync-master-address", default="127.0.0.1",
                   help="with --weight-sync distributed: this host's address as the SGLang server sees it")
    h.add_argument("--weight-sync-bucket-mib", type=int, default=512)
    d = p.add_argument_group("data (default: the toy arithmetic task)")
    d.add_argument("--prompt-data", default=None, help="a JSONL or Parquet file of prompts with reference answers")
    d.add_argument("--prompt-key", default="prompt")
    d.add_argument("--answer-key", default="answer", help="dotted keys allowed, e.g. reward_model.ground_truth")
    d.add_argument("--prompt-template", default=None, help="e.g. '{prompt} Put your final answer in \\boxed{}.'")
    d.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: --hf-checkpoint)")
    d.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts are skipped and counted")
    d.add_argument("--max-new-tokens", type=int, default=1024)
    d.add_argument("--eval-holdout", type=int, default=0, help="dataset rows held out for evaluation")
    d.add_argument("--reward-timeout", type=float, default=5.0, help="seconds per math-verify check")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-every", type=int, default=0, help="pass@1 / mean@k on held-out prompts every K steps")
    e.add_argument("--eval-k", type=int, default=4)
    e.add_argument("--eval-temperature", type=float, default=1.0)
    e.add_argument("--eval-max-problems", type=int, default=None)
    r = p.add_argument_group("run, checkpoints and logging")
    r.add_argument("--steps", type=int, default=60)
    r.add_argument("--sft-steps", type=int, default=40)
    r.add_argument("--sft-micro-batch-size", type=int, default=None, help="default: --micro-batch-size")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out-dir", default="runs/toy")
    r.add_argument("--run-name", default="toy")
    r.add_argument("--checkpoint-every", type=int, default=10)
    r.add_argument("--wandb", action="store_true", help="also log to wandb (offline unless WANDB_MODE=online)")
    r.add_argument("--no-console", action="store_true")
    r.add_argument("--threads", type=int, default=0, help="torch intra-op threads per process (0: torch default)")
    r.add_argument("--dry-run", action="store_true",
                   help="validate the configuration for --world-size ranks, print the plan, start nothing")
    r.add_argument("--world-size", type=int, default=None, help="with --dry-run: the number of ranks to plan for")
    args = p.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    args.explicit = {a.dest for a in p._actions if any(o in given or any(g.startswith(o + "=") for g in given)
                                                       for o in a.option_strings)}
    if args.model_preset:
        for key, value in PRESETS[args.model_preset].items():
            if key not in args.explicit:
                setattr(args, key, value)
    return args


MODEL_FLAGS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "head_dim",
               "ffn_hidden_size", "num_experts", "moe_router_topk", "moe_ffn_hidden_size")


# Qwen3-30B-A3B: 48 layers, hidden 2048, 32 query / 4 KV heads of 128, 128 experts top-8 (expert FFN 768),
# vocab 151936, every layer MoE.
PRESETS = {
    "qwen3-30b-a3b": dict(hidden_size=2048, num_layers=48, num_attention_heads=32, num_query_groups=4, head_dim=128,
                          ffn_hidden_size=6144, num_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768,
                          vocab_size=151936, seq_length=4096),
}


def build_model_config(args: argparse.Namespace) -> TinyMoEConfig:
    """From --hf-checkpoint's config.json when given (explicit model flags override, and TrainerConfig.validate
    then names every one that disagrees with the checkpoint), else from the flags."""
    dtype = torch.bfloat16 if args.params_dtype == "bf16" else torch.float32
    if args.hf_checkpoint:
        from vespo_megatron.hf.config import load_hf_config, model_config_from_hf

        model = model_config_from_hf(load_hf_config(args.hf_checkpoint), seq_length=args.seq_length, dtype=dtype,
                                     seed=args.seed + 1234)
        overrides = {k: getattr(args, k) for k in MODEL_FLAGS if k in args.explicit}
        return dataclasses.replace(model, recompute=args.recompute, **overrides)
    return TinyMoEConfig(vocab_size=args.vocab_size or CharTokenizer().vocab_size, hidden_size=args.hidden_size,
                         num_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
                         num_query_groups=args.num_query_groups, head_dim=args.head_dim,
                         ffn_hidden_size=args.ffn_hidden_size or 2 * args.hidden_size,
                         num_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
                         moe_ffn_hidden_size=args.moe_ffn_hidden_size, seq_length=args.seq_length, dtype=dtype,
                         recompute=args.recompute, seed=args.seed + 1234)


def build_task_config(args: argparse.Namespace):
    if args.prompt_data is None:
        return ArithmeticTaskConfig(max_operand=args.max_operand, ops=args.ops, seed=args.seed)
    from vespo_megatron.data import MathRewardConfig, MathTaskConfig, PromptDataConfig

    data = PromptDataConfig(path=args.prompt_data, prompt_key=args.prompt_key, answer_key=args.answer_key,
                            prompt_template=args.prompt_template, max_prompt_tokens=args.max_prompt_tokens,
                            eval_count=args.eval_holdout, seed=args.seed)
    return MathTaskConfig(data=data, reward=MathRewardConfig(timeout_s=args.reward_timeout),
                          max_new_tokens=args.max_new_tokens)


def build_config(args: argparse.Namespace) -> TrainerConfig:
    options = {}
    if args.rollout_correction != "none":
        options["rollout_correction"] = RolloutCorrectionConfig(mode=args.rollout_correction,
                                                                level=args.rollout_correction_level)
    return TrainerConfig(
        model=build_model_config(args),
        parallel=ParallelConfig(tp=args.tp, sp=args.sp, cp=args.cp, ep=args.ep, pp=args.pp),
        task=build_task_config(args),
        hf=HFCheckpointConfig(load=args.hf_checkpoint, save_every=args.save_hf_every, save_final=args.save_hf_final,
                              tokenizer=args.tokenizer),
        eval=EvalConfig(every=args.eval_every, k=args.eval_k, temperature=args.eval_temperature,
                        max_problems=args.eval_max_problems),
        weight_sync=WeightSyncConfig(mode=args.weight_sync, master_address=args.weight_sync_master_address,
                                     bucket_bytes=args.weight_sync_bucket_mib * 2**20),
        rollout=RolloutConfig(prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                              temperature=args.temperature, precision=args.rollout_precision,
                              async_lag=args.async_lag, old_logprobs=args.old_logprobs,
                              engine=args.rollout_engine, sglang_url=args.sglang_url),
        algorithm=AlgorithmConfig(loss=args.loss, loss_options=options, staleness=args.staleness,
                                  micro_batch_size=args.micro_batch_size, lr=args.lr, clip_grad=args.clip_grad,
                                  routing_replay=args.routing_replay,
                                  distributed_optimizer=args.distributed_optimizer),
        run=RunConfig(steps=args.steps, seed=args.seed, sft_steps=args.sft_steps, out_dir=args.out_dir,
                      sft_micro_batch_size=args.sft_micro_batch_size,
                      checkpoint_every=args.checkpoint_every),
    )


def dry_run(cfg: TrainerConfig, world_size: int) -> None:
    """Validate for `world_size` ranks and print the plan: layout, batch split, parameter count."""
    cfg.validate(world_size)
    m, p, r, a = cfg.model, cfg.parallel, cfg.rollout, cfg.algorithm
    dp = p.data_parallel_size(world_size)
    head_dim = m.head_dim or m.hidden_size // m.num_attention_heads
    attn = m.hidden_size * head_dim * (2 * m.num_attention_heads + 2 * m.num_query_groups)
    experts = m.num_experts * 3 * m.hidden_size * m.moe_ffn_hidden_size
    params = m.num_layers * (attn + experts + m.hidden_size * m.num_experts) + 2 * m.vocab_size * m.hidden_size
    print(json.dumps({
        "world_size": world_size, "layout": dataclasses.asdict(p), "data_parallel": dp,
        "samples_per_step": r.samples_per_step, "samples_per_dp_rank": r.samples_per_step // dp,
        "mini_batches_per_step (staleness N)": a.staleness,
        "micro_batches_per_mini_batch": r.samples_per_step // dp // a.staleness // a.micro_batch_size,
        "loss": a.loss, "routing_replay": a.routing_replay,
        "total_params_billion": round(params / 1e9, 2),
        "active_params_per_token_billion": round((m.num_layers * (attn + m.moe_router_topk * experts // m.num_experts)
                                                  + 2 * m.vocab_size * m.hidden_size) / 1e9, 2),
    }, indent=2))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_config(args)  # bad flags fail here, before any process group or model exists
    if args.dry_run:
        dry_run(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", "1")))
        return 0
    rank, world = init_distributed()
    from vespo_megatron.training.trainer import Trainer  # imports megatron-core

    trainer = Trainer(cfg)
    start = trainer.resume()
    logging_cfg = LoggingConfig(out_dir=args.out_dir, run_name=args.run_name, console=not args.no_console,
                                wandb=args.wandb)
    run_config = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    with MetricsLogger.from_config(logging_cfg, cfg.run.steps, run_config, rank=0 if trainer.is_log_rank else 1,
                                   resume_from_step=start) as logger:
        trainer.log_fn = logger.log
        history = trainer.run(start)
    if trainer.is_log_rank:
        rewards = [h["reward_mean"] for h in history]
        k = max(1, min(10, len(rewards) // 3))
        if len(rewards) >= 2 * k:
            print(f"reward: mean of the first {k} steps {sum(rewards[:k]) / k:.3f} -> last {k} steps "
                  f"{sum(rewards[-k:]) / k:.3f}", file=sys.stderr)
        print(f"metrics: {os.path.join(args.out_dir, args.run_name)}.jsonl", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
