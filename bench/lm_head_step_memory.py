"""Whole-step peak GPU memory of one RL step (RLStep through megatron's schedules, forward + backward, VESPO) on
a Qwen3-30B-A3B-shaped slice, with the logits path, the fused LM head or its single pass. Not a test.

The slice is `bench/gpu_layouts.py`'s `qwen3-slice` (hidden 2048, 32 query / 4 KV heads of 128, 128 experts,
top-8, expert FFN 768, vocab 151936, 4 layers) in bf16, one micro-batch of `--samples` sequences of
`--prompt` + `--response` tokens (padded rows), one GPU, reference attention, no optimizer. Each setting runs in
a fresh process (the peak of the first step of a process is the number), so launch once per setting:

    torchrun --nproc-per-node 1 bench/lm_head_step_memory.py --fused 0 --out OUT
    torchrun --nproc-per-node 1 bench/lm_head_step_memory.py --fused 1 --out OUT
    torchrun --nproc-per-node 1 bench/lm_head_step_memory.py --fused 1 --single-pass --out OUT

Appends one JSON line per launch to OUT/lm_head_step_memory.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fused", type=int, choices=(0, 1), required=True)
    ap.add_argument("--single-pass", action="store_true", help="the fused head's single pass (RLStepConfig."
                    "lm_head_single_pass: the loss inside the head, 3 GEMMs instead of 4)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--response", type=int, default=1792)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--layout", default="padded", choices=("padded", "thd"),
                    help="padded [samples, length] rows; thd packs them into one row, and the reference attention "
                         "then materialises [heads, T, T] scores over the whole pack (32 GiB at 16k tokens)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU (gloo): checks the script")
    args = ap.parse_args()
    cuda = not args.cpu_smoke

    from vespo_megatron.losses import RolloutCorrectionConfig, make_loss_config
    from vespo_megatron.megatron.model import TinyMoEConfig
    from vespo_megatron.megatron.parallel_setup import ParallelConfig
    from vespo_megatron.megatron.rl_batch import RLSample
    from vespo_megatron.megatron.step import RLStepConfig
    from vespo_megatron.testing.layouts import run_rl_layout

    dist.init_process_group("nccl" if cuda else "gloo")
    vocab, length = 151936, args.prompt + args.response
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        cfg = TinyMoEConfig(vocab_size=vocab, hidden_size=2048, num_layers=4, num_attention_heads=32,
                            num_query_groups=4, head_dim=128, ffn_hidden_size=6144, num_experts=128, moe_router_topk=8,
                            moe_ffn_hidden_size=768, seq_length=length, seed=7, dtype=dtype)
    else:
        vocab = 128
        cfg = TinyMoEConfig(hidden_size=32, num_layers=2, moe_layer_freq=(1, 0), ffn_hidden_size=64,
                            seq_length=length, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(args.samples):
        old = -torch.log(torch.tensor(float(vocab))) - (0.42 if cuda else 0.0) + 0.1 * torch.randn(args.response, generator=g)
        samples.append(RLSample(prompt=torch.randint(0, vocab, (args.prompt,), generator=g),
                                response=torch.randint(0, vocab, (args.response,), generator=g), old_logp=old,
                                rollout_logp=old + 0.05 * torch.randn(args.response, generator=g),
                                advantage=float(torch.randn(1, generator=g))))
    step_cfg = RLStepConfig(loss_name="vespo", fused_lm_head=bool(args.fused), lm_head_single_pass=args.single_pass,
                            loss_config=make_loss_config("vespo", rollout_correction=RolloutCorrectionConfig(mode="fold")))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    res = run_rl_layout(ParallelConfig(), cfg, [samples], step_cfg, grads="norms", attention_backend="reference",
                        batch_layout=args.layout)
    if cuda:
        torch.cuda.synchronize()
    nan = float("nan")
    record = dict(fused=bool(args.fused), single_pass=args.single_pass, dtype=args.dtype, layout=args.layout, tokens=args.samples * length,
                  response_tokens=args.samples * args.response, loss=res.loss,
                  entropy_mean=res.metrics.get("entropy_mean"),
                  grad_norm_output_layer=float(next(v for k, v in res.grads.items() if "output_layer" in k)),
                  grad_norm_embedding=float(next(v for k, v in res.grads.items() if "word_embeddings" in k)),
                  peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else nan,
                  peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else nan,
                  seconds=time.time() - t0, device=torch.cuda.get_device_name() if cuda else "cpu",
                  torch=torch.__version__)
    print(json.dumps(record), flush=True)
    print("metrics", {k: round(float(v), 6) for k, v in res.metrics.items()}, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lm_head_step_memory.jsonl"), "a") as fh:
        fh.write(json.dumps(record) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
