#!/usr/bin/env bash
# The comparison of the product card, on one seed, with a real train/inference mismatch (the embedded
# engine samples in bf16, the trainer computes in fp32): VESPO alone, GRPO + truncated IS, GRPO + routing
# replay (R3: the engine's routing replayed in the trainer), VESPO + R3. Then one plot per metric.
#   bash examples/compare_losses.sh [extra flags for every run, e.g. --steps 30]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/compare}
COMMON=(--rollout-precision bf16 --seed 0 --out-dir "$OUT" --no-console "$@")
"$PYTHON" examples/toy_rl.py "${COMMON[@]}" --run-name vespo --loss vespo
"$PYTHON" examples/toy_rl.py "${COMMON[@]}" --run-name grpo_tis --loss grpo --rollout-correction tis
"$PYTHON" examples/toy_rl.py "${COMMON[@]}" --run-name grpo_r3 --loss grpo --routing-replay r3
"$PYTHON" examples/toy_rl.py "${COMMON[@]}" --run-name vespo_r3 --loss vespo --routing-replay r3
"$PYTHON" -m vespo_megatron.metrics.plot "$OUT"/vespo.jsonl "$OUT"/grpo_tis.jsonl "$OUT"/grpo_r3.jsonl \
  "$OUT"/vespo_r3.jsonl --out "$OUT"/plots
