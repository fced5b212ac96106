#!/usr/bin/env bash
# Layout invariance + replay exactness on GPUs: the single-GPU reference, then one torchrun launch per
# layout (a fresh process per layout: run_rl_layout's models are not all freed inside one process, and the
# peak memory of the first loss run in a fresh process is the per-layout number), then the comparison.
#   bash bench/run_gpu_layouts.sh OUT_DIR            (env: PRESET=qwen3-slice, NPROC=2, LAYOUTS="ep2 tp2_sp cp2 pp2")
set -euo pipefail
out=${1:?usage: bench/run_gpu_layouts.sh OUT_DIR}
preset=${PRESET:-qwen3-slice}
py=${PYTHON:-python3}
run="$py -m torch.distributed.run"
$run --nproc-per-node 1 bench/gpu_layouts.py --preset "$preset" --layouts ref --out "$out"
for layout in ${LAYOUTS:-ep2 tp2_sp cp2 pp2}; do
  $run --nproc-per-node "${NPROC:-2}" bench/gpu_layouts.py --preset "$preset" --layouts "$layout" --out "$out"
done
$py bench/gpu_layouts.py --compare "$out"
