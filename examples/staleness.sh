#!/usr/bin/env bash
# Staleness: N = global batch / mini-batch optimizer updates per rollout batch (the paper's knob), for VESPO
# and GRPO on the same seed and rollouts per step. Each run has its own directory $OUT/<run>/.
#   bash examples/staleness.sh [extra flags]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/staleness}
JSONL=()
for n in ${STALENESS:-1 4 8}; do
  for loss in vespo grpo; do
    run="${loss}_n${n}"
    "$PYTHON" examples/toy_rl.py --seed 0 --out-dir "$OUT" --no-console --run-name "$run" \
      --loss "$loss" --staleness "$n" --micro-batch-size $((256 / n < 32 ? 256 / n : 32)) "$@"
    # a run without records would silently drop out of the plot: fail, naming it
    [[ -s "$OUT/$run/$run.jsonl" ]] || { echo "error: run '$run' produced no records ($OUT/$run/$run.jsonl)" >&2; exit 1; }
    JSONL+=("$OUT/$run/$run.jsonl")
  done
done
"$PYTHON" -m vespo_megatron.metrics.plot "${JSONL[@]}" --out "$OUT"/plots
