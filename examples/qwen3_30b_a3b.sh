#!/usr/bin/env bash
# Qwen3-30B-A3B-shaped RL run on a GPU cluster: torchrun on every node, flags grouped as in slime's launch
# scripts. Layout: EP=8, TP=4 with sequence parallelism, CP=1, PP=1 (16 nodes x 8 GPUs by default).
#
#   DRY_RUN=1 bash examples/qwen3_30b_a3b.sh       # validate the layout and batch split for NNODES x 8 GPUs, print the plan
#   NNODES=16 NODE_RANK=$i MASTER_ADDR=... bash examples/qwen3_30b_a3b.sh     # on every node
#
# Until the Hugging Face checkpoint loader lands (issue 6), this trains a randomly initialised model of the
# real shape on the toy arithmetic task: a systems check of the loss, routing replay and layout at full size,
# not a training recipe. CI runs the dry run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

NNODES=${NNODES:-16}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PYTHON=${PYTHON:-python3}

MODEL_ARGS=(
  --model-preset qwen3-30b-a3b        # 48 layers, hidden 2048, 128 experts top-8, vocab 151936
)
PARALLEL_ARGS=(
  --tp 4 --sp
  --cp 1
  --ep 8
  --pp 1
)
ROLLOUT_ARGS=(
  --prompts-per-step 256
  --group-size 8
  --temperature 1.0
  --rollout-precision bf16            # the engine's precision differs from the trainer's, as with SGLang
  --old-logprobs recompute
)
ALGORITHM_ARGS=(
  --loss vespo                        # c_pos = (2, 3), c_neg = (3, 2)
  --staleness 4                       # N = global batch / mini-batch
  --micro-batch-size 8
  --lr 1e-6
  --clip-grad 1.0
  --routing-replay r2
)
LOGGING_ARGS=(
  --steps 200
  --sft-steps 0
  --out-dir runs/qwen3_30b_a3b
  --run-name qwen3_30b_a3b_vespo
  --checkpoint-every 20
  --wandb
)

ARGS=("${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${ALGORITHM_ARGS[@]}" "${LOGGING_ARGS[@]}")

if [ "${DRY_RUN:-0}" = "1" ]; then
  exec "$PYTHON" examples/toy_rl.py "${ARGS[@]}" --dry-run --world-size $((NNODES * GPUS_PER_NODE))
fi
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
exec torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "${NODE_RANK:-0}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  examples/toy_rl.py "${ARGS[@]}"
