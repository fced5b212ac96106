#!/usr/bin/env bash
# The comparison of the product card.
#
# Default (CPU, the toy task, one seed, a few minutes): a real train/inference mismatch (the embedded engine
# samples in bf16, the trainer computes in fp32): VESPO alone, GRPO + truncated IS, GRPO + routing replay (R3:
# the engine's routing replayed in the trainer), VESPO + R3. Then one plot per metric.
# Each run has its own directory $OUT/<run>/ (checkpoints, <run>.jsonl); a run re-started with the same
# flags resumes (or says it is complete), one started with other flags under the same name is refused.
#   bash examples/compare_losses.sh [extra flags for every run, e.g. --steps 30]
#
# --preset gpu (one GPU, the issue-17 testbed; docs/testbed.md): the SFT base (cached in $OUT/sft; <= 5 min on
# an H200), then the `headline` sweep preset, 16 runs at a time ($JOBS): vespo, grpo+tis, gspo, sapo at N = 1 and
# 16, 3 seeds, 100 steps of 32 x 8 rollouts on scratchpad addition; ~15 minutes on one H200 (estimated from
# round 8's timings, docs/results/testbed/README.md). Table (with each loss
# minus grpo+tis paired by seed) and figures in $OUT/results. Run it again after an interruption: finished runs
# are skipped, the others resume from their checkpoints. GPU memory: an N = 1 run peaks at ~5 GiB, an N = 16 run
# at ~1 GiB (round 9); on an 80 GB card use JOBS=8 (a run that still runs out of device memory starts once more
# after the others, half as many at a time). Expandable segments are on so that freed memory goes back.
#   bash examples/compare_losses.sh --preset gpu [sweep flags, e.g. --only 'n16-*']
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}

if [[ "${1:-}" == "--preset" ]]; then
  if [[ "${2:-}" != "gpu" ]]; then
    echo "error: --preset: expected gpu, got '${2:-}'" >&2
    exit 2
  fi
  shift 2
  OUT=${OUT:-runs/compare_gpu}
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  "$PYTHON" examples/testbed_sft.py --out-dir "$OUT/sft"
  "$PYTHON" examples/sweep.py --preset headline --init-checkpoint "$OUT/sft/hf" --runs-dir "$OUT/runs" \
    --results-dir "$OUT/results" --jobs "${JOBS:-16}" "$@"
  exit 0
fi

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
