#!/usr/bin/env bash
# Qwen3-30B-A3B RL on a GPU cluster: torchrun on every node, flags grouped as in slime's launch scripts.
# Layout: EP=8, TP=4 with sequence parallelism, CP=1, PP=1 (16 nodes x 8 GPUs by default).
#
#   DRY_RUN=1 bash examples/qwen3_30b_a3b.sh       # validate the layout and batch split for NNODES x 8 GPUs, print the plan
#   HF_CKPT=/ckpt/Qwen3-30B-A3B-Base PROMPT_DATA=/data/dapo-math-17k.parquet SGLANG_URL=http://sglang:30000 \
#   NNODES=16 NODE_RANK=$i MASTER_ADDR=... bash examples/qwen3_30b_a3b.sh      # on every node
#
# What it does: loads the Hugging Face checkpoint into megatron-core under this layout (mbridge's name map;
# the checkpoint's config.json must match the model preset), trains VESPO on a math prompt dataset scored by
# math-verify, generates with an SGLang server (routed experts returned for R3, or R2 without them) that gets
# the new weights after every step as streamed buckets (/update_weights_from_distributed), evaluates pass@1 /
# mean@4 on held-out prompts every 10 steps and writes Hugging Face checkpoints every 50 steps.
# Memory per GPU for this layout (bf16 weights, distributed optimizer, full recomputation):
# examples/qwen3_30b_a3b.memory.md, made by
#   python examples/memory_plan.py --preset qwen3-30b-a3b --tp 4 --ep 8 --pp 1 --cp 1 --etp 1 --gpus 128 \
#     --micro-batch-tokens 32768 --seq-length 4096 --micro-batches-per-step 8 --routing-replay r2 \
#     --gpu-memory-gib 80 141 --variants --search --out examples/qwen3_30b_a3b.memory.md
# The dry run (CI runs it) needs neither checkpoint nor data: without HF_CKPT it plans with the preset's shape.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

NNODES=${NNODES:-16}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# The checkout's .venv (bash ci/setup.sh) when there is one, as the README's commands assume; else python3.
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

HF_CKPT=${HF_CKPT:-}
PROMPT_DATA=${PROMPT_DATA:-}
SGLANG_URL=${SGLANG_URL:-}

if [ -n "$HF_CKPT" ]; then
  MODEL_ARGS=(--hf-checkpoint "$HF_CKPT" --seq-length 4096)   # shape from its config.json
elif [ "${DRY_RUN:-0}" = "1" ]; then
  MODEL_ARGS=(--model-preset qwen3-30b-a3b)   # 48 layers, hidden 2048, 128 experts top-8, vocab 151936
else
  echo "HF_CKPT: expected a Qwen3-30B-A3B Hugging Face checkpoint directory, got nothing" >&2; exit 2
fi
MODEL_ARGS+=(--params-dtype bf16 --recompute)
PARALLEL_ARGS=(
  --tp 4 --sp
  --cp 1
  --ep 8
  --pp 1
)
DATA_ARGS=()
if [ -n "$PROMPT_DATA" ]; then
  DATA_ARGS=(
    --prompt-data "$PROMPT_DATA"        # JSONL or Parquet; DAPO-Math-17k style rows
    --prompt-key prompt
    --answer-key reward_model.ground_truth
    --max-prompt-tokens 1024            # longer prompts are skipped and counted (data/skipped/...)
    --max-new-tokens 3072
    --eval-holdout 256
    --reward-timeout 5
  )
elif [ "${DRY_RUN:-0}" != "1" ]; then
  echo "PROMPT_DATA: expected a .jsonl or .parquet prompt file, got nothing" >&2; exit 2
fi
ROLLOUT_ARGS=(
  --prompts-per-step 256
  --group-size 8
  --temperature 1.0
  --old-logprobs recompute
)
if [ -n "$SGLANG_URL" ]; then
  ROLLOUT_ARGS+=(
    --rollout-engine sglang --sglang-url "$SGLANG_URL"
    --weight-sync distributed --weight-sync-master-address "${WEIGHT_SYNC_ADDR:-$(hostname -i 2>/dev/null | cut -d' ' -f1)}"
    --weight-sync-bucket-mib 1024
  )
fi
ALGORITHM_ARGS=(
  --loss vespo                        # c_pos = (2, 3), c_neg = (3, 2)
  --staleness 4                       # N = global batch / mini-batch
  --micro-batch-size 8
  --lr 1e-6
  --clip-grad 1.0
  --routing-replay r2
  --distributed-optimizer
)
EVAL_ARGS=(
  --eval-every 10
  --eval-k 4
  --eval-max-problems 256
)
LOGGING_ARGS=(
  --steps 200
  --sft-steps 0
  --out-dir runs/qwen3_30b_a3b
  --run-name qwen3_30b_a3b_vespo
  --checkpoint-every 20
  --save-hf-every 50
  --save-hf-final
  --wandb
)

ARGS=("${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${ALGORITHM_ARGS[@]}"
      "${EVAL_ARGS[@]}" "${LOGGING_ARGS[@]}")

if [ "${DRY_RUN:-0}" = "1" ]; then
  exec "$PYTHON" examples/toy_rl.py "${ARGS[@]}" --dry-run --world-size $((NNODES * GPUS_PER_NODE))
fi
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "${NODE_RANK:-0}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  examples/toy_rl.py "${ARGS[@]}"
