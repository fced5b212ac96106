#!/usr/bin/env bash
# Staleness: N = global batch / mini-batch optimizer updates per rollout batch (the paper's knob), for VESPO
# and GRPO on the same seed and rollouts per step.
#   bash examples/staleness.sh [extra flags]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/staleness}
for n in ${STALENESS:-1 4 8}; do
  for loss in vespo grpo; do
    "$PYTHON" examples/toy_rl.py --seed 0 --out-dir "$OUT" --no-console --run-name "${loss}_n${n}" \
      --loss "$loss" --staleness "$n" --micro-batch-size $((256 / n < 32 ? 256 / n : 32)) "$@"
  done
done
"$PYTHON" -m vespo_megatron.metrics.plot "$OUT"/*.jsonl --out "$OUT"/plots
