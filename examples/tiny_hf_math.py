"""Make a tiny Qwen3-MoE Hugging Face checkpoint and a math prompt file, to try the real-model path on a CPU.

What it writes under --out (default runs/tiny_hf):
  ckpt/           a Qwen3-MoE checkpoint saved by `transformers` (random weights; 2 layers, hidden 64,
                  4 experts top-2; sharded safetensors with an index) and a tiny byte-level tokenizer with a
                  Qwen-like chat template (`vespo_megatron.data.testing_tokenizer`; no hub access needed)
  prompts.jsonl   "What is a+b?" rows with reference answers, plus one row without an answer and one prompt
                  that is too long (both skipped and counted by the trainer)

Simplifications: random weights and a byte-level tokenizer, so the supervised warm start has to teach the
answer format (`\\boxed{n}`) before RL can reward anything. Everything after that is the real path: the
checkpoint loaded through the HF bridge, chat-templated prompts, math-verify rewards in worker processes,
held-out eval, HF checkpoints written back. `examples/hf_math_cpu.sh` runs all of it; by hand:
    .venv/bin/python examples/tiny_hf_math.py --out runs/tiny_hf
    .venv/bin/python examples/toy_rl.py --hf-checkpoint runs/tiny_hf/ckpt --prompt-data runs/tiny_hf/prompts.jsonl \\
        --eval-holdout 16 --eval-every 5 --save-hf-final --max-new-tokens 12 --sft-steps 30
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def make(out: Path, *, seed: int = 0, rows: int = 400) -> tuple[Path, Path]:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from vespo_megatron.data.testing_tokenizer import tiny_chat_tokenizer

    tok = tiny_chat_tokenizer()
    ckpt = out / "ckpt"
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=-(-len(tok) // 64) * 64, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False,
        rope_theta=10000.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen3MoeForCausalLM(config).save_pretrained(ckpt, max_shard_size="200KB")
    tok.save_pretrained(ckpt)
    rng = random.Random(seed)
    data = out / "prompts.jsonl"
    with data.open("w") as f:
        for _ in range(rows):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"prompt": f"What is {a}+{b}?", "answer": str(a + b)}) + "\n")
        f.write(json.dumps({"prompt": "What is 1+1?"}) + "\n")  # no answer
        f.write(json.dumps({"prompt": "What is " + "1+" * 400 + "1?", "answer": "401"}) + "\n")  # too long
    return ckpt, data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/tiny_hf")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ckpt, data = make(Path(args.out), seed=args.seed)
    print(f"checkpoint: {ckpt}\nprompts: {data}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
