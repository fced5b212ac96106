#!/usr/bin/env bash
# Slices of the stability sweep (examples/sweep.py) on one GPU lease: many small toy_rl.py runs at once on one
# GPU (each run is launch-bound, so they overlap well), under a wall-clock limit that leaves time to pack the
# results. Each slice is "JOBS GLOB [GLOB...]" and runs as its own sweep process (so a slow slice, e.g. N = 64,
# starts at once instead of after the fast ones). Runs cut off by the limit stay partial (their JSONL is kept).
# Result: OUT/runs.tgz (every run's JSONL and train.log; checkpoints are dropped) and OUT/sweep-*.log.
#   bash bench/run_gpu_sweep.sh OUT SECONDS PRESET "7 n64-*-s0" "9 n1-* n4-*"
set -uo pipefail
out=${1:?usage: bench/run_gpu_sweep.sh OUT SECONDS PRESET SLICE...}
limit=${2:?seconds}
preset=${3:?preset}
shift 3
py=${PYTHON:-python3}
runs="${RUNS_DIR:-/tmp/sweep-runs}"
mkdir -p "$out" "$runs"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1 || true
start=$(date +%s)
i=0
for slice in "$@"; do
  read -r jobs globs <<< "$slice"
  # shellcheck disable=SC2086
  timeout --signal=TERM --kill-after=10 "$limit" $py examples/sweep.py --preset "$preset" --jobs "$jobs" \
    --only $globs --runs-dir "$runs" --results-dir "$out/results-$i" > "$out/sweep-$i.log" 2>&1 &
  i=$((i + 1))
done
wait
echo "wall_s=$(( $(date +%s) - start ))" | tee -a "$out/sweep-0.log"
(cd "$runs" && tar czf "$out/runs.tgz" --exclude=checkpoints ./*/*.jsonl ./*/train.log 2>/dev/null)
for f in "$runs"/*/*.jsonl; do [ -f "$f" ] && echo "$(basename "$f") $(wc -l < "$f")"; done
