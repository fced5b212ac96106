#!/usr/bin/env bash
# The comparison of the product card, on one seed, with a real train/inference mismatch (the embedded
# engine samples in bf16, the trainer computes in fp32): VESPO alone, GRPO + truncated IS, GRPO + routing
# replay (R3: the engine's routing replayed in the trainer), VESPO + R3. Then one plot per metric.
# Each run has its own directory $OUT/<run>/ (checkpoints, <run>.jsonl); a run re-started with the same
# flags resumes (or says it is complete), one started with other flags under the same name is refused.
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
RUNS=(vespo grpo_tis grpo_r3 vespo_r3)
JSONL=()
for run in "${RUNS[@]}"; do
  JSONL+=("$OUT/$run/$run.jsonl")
  # a run without records would silently drop out of the plot: fail, naming it
  [[ -s "$OUT/$run/$run.jsonl" ]] || { echo "error: run '$run' produced no records ($OUT/$run/$run.jsonl)" >&2; exit 1; }
done
"$PYTHON" -m vespo_megatron.metrics.plot "${JSONL[@]}" --out "$OUT"/plots
