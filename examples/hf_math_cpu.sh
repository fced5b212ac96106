#!/usr/bin/env bash
# The real-model path at toy size on a CPU: a tiny Qwen3-MoE HF checkpoint and tokenizer (made here, random
# weights), a JSONL math dataset with chat-templated prompts, math-verify rewards, held-out eval every 5
# steps, and the trained policy written back as a Hugging Face checkpoint (runs/tiny_hf/run/tiny_hf_math/hf/step_<n>).
#   bash examples/hf_math_cpu.sh                 # about 2-3 minutes on 2 cores
#   STEPS=2 SFT_STEPS=2 bash examples/hf_math_cpu.sh   # a smoke run
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/tiny_hf}

"$PYTHON" examples/tiny_hf_math.py --out "$OUT"

CHECKPOINT_ARGS=(--hf-checkpoint "$OUT/ckpt" --seq-length 128 --save-hf-final)
DATA_ARGS=(
  --prompt-data "$OUT/prompts.jsonl"
  --prompt-template "{prompt} Answer in \\boxed{}."
  --max-prompt-tokens 96             # the one over-long row is skipped and counted
  --max-new-tokens 12
  --eval-holdout 16
)
ROLLOUT_ARGS=(--prompts-per-step 16 --group-size 4)
ALGORITHM_ARGS=(--loss vespo --staleness 2 --micro-batch-size 16 --lr 1e-3)
EVAL_ARGS=(--eval-every 5 --eval-k 4)
RUN_ARGS=(--steps "${STEPS:-10}" --sft-steps "${SFT_STEPS:-60}" --out-dir "$OUT/run" --run-name tiny_hf_math)

exec "$PYTHON" examples/toy_rl.py "${CHECKPOINT_ARGS[@]}" "${DATA_ARGS[@]}" "${ROLLOUT_ARGS[@]}" \
  "${ALGORITHM_ARGS[@]}" "${EVAL_ARGS[@]}" "${RUN_ARGS[@]}" "$@"
