"""Off-policy RL of a tiny Qwen3-MoE-shaped megatron-core model on a verifiable arithmetic task.

Simplifications: a character tokenizer and procedurally generated problems (`a+b=` -> digits, <eos>);
the embedded engine (the policy samples itself, no KV cache); a short supervised warm start so that RL
begins from a non-trivial reward. Everything else is the real path: megatron-core model, schedules, DDP and
optimizer, the chosen policy loss, the global normaliser, rollout correction, checkpoints, metrics.

Run (CPU, a few minutes, from the repository root after `bash ci/setup.sh`):
    .venv/bin/python examples/toy_rl.py                                               # runs/toy/
    .venv/bin/python examples/toy_rl.py --loss grpo --rollout-correction tis --run-name grpo_tis  # a baseline
    .venv/bin/python examples/toy_rl.py --staleness 8 --run-name n8                   # 8 updates per rollout
    .venv/bin/python examples/toy_rl.py --async-lag 2 --run-name lag2                 # fully async, lag 2
    .venv/bin/python examples/toy_rl.py --rollout-precision bf16 --run-name bf16      # train/inference mismatch
Several processes (any TP / SP / CP / EP / PP / DP that divides the world; gloo on CPU, NCCL on GPUs):
    torchrun --nproc-per-node 2 examples/toy_rl.py --ep 2 --run-name ep2
    torchrun --nproc-per-node 2 examples/toy_rl.py --tp 2 --sp --run-name tp2_sp
Each run owns <out-dir>/<run-name>/ (checkpoints, metrics, exports). A run killed at any point and restarted
with the same command resumes from its last checkpoint; the same name with other flags is refused.
The same command line is installed as `vespo-train` (flags: `--help`; the default of each is the toy run's).
Plots of a run:  .venv/bin/python -m vespo_megatron.metrics.plot runs/toy/toy.jsonl --out runs/toy/plots
"""

import sys

from vespo_megatron.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
