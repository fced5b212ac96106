#!/usr/bin/env bash
# One device call: the engine's CUDA graphs and the fused loss head in the testbed's N = 1 step (issues 16, 17).
# Device `run` from the repository root, carry [".gpuwhl", ".gpubase"] (megatron-core's wheel and the testbed's
# SFT base in pieces: bench/run_gpu_testbed.sh says how both are made), then:  bash bench/run_gpu_step_variants.sh
#   1. bench/engine_bench.py --size testbed --cuda-graphs: 512 x 256 new tokens, eager decode vs replayed graphs
#      (first call with the captures, then steady state) and whether the graphs make the eager tokens;
#   2. the testbed's N = 1 run (grpo+tis, seed 0, from the base) for $STEPS steps, alone on the GPU, once per
#      variant: the eager engine and the logits path (the sweeps' setting until round 12), CUDA graphs, CUDA
#      graphs with the stop check every 8 steps, the fused head in its single pass, and `defaults` (the
#      trainer's defaults: graphs and the fused single pass);
#   3. bench/step_variants.py over the four: s / step, the rollout's share, whether pi / pi_old stays exactly 1
#      and whether each variant makes the eager run step for step -> $OUT/step_variants.{md,json}.
# VARIANTS picks the runs (default: the first four; the first is the reference; graphs_lag0: graphs with the
# "all stopped?" flag read each step, as before round 13; dense_prefill: the defaults with the prefill's MoE
# layers on the dispatcher-free path too, up to 65536 expert rows; compile: the defaults with the decode steps'
# forward through torch.compile, --rollout-compile-decode; compile_bmm: that and the decode attention as batched
# matmuls, --rollout-decode-attention bmm; a name with _p64 runs 64 prompts x 8, the testbed
# config's rollout batch, instead of the sweeps' 32 x 8); ENGINE_BENCH=0 skips step 1 and ENGINE_ARGS replaces
# its size arguments (one bench per line; "new: " first: this tree only). BASELINE_TREE=<dir with an older vespo_megatron/ and bench/> (e.g.
# `git archive <commit> vespo_megatron bench | tar -x -C <dir>`): each engine bench runs with that code too, and a
# variant named base_<variant> is <variant> run by that code (the same call, so the same card).
# On CPU at toy size (tests/test_testbed.py style): WORK_DIR, PYTHON, WHEELS_DIR=none, BASE_DIR=<an HF base dir>,
# ENGINE_ARGS="--size tiny", STEPS=2.
set -uo pipefail
W=${WORK_DIR:-/tmp}
PY=${PYTHON:-python3}
STEPS=${STEPS:-12}
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
WHEELS=${WHEELS_DIR:-.gpuwhl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/site" "$WHEELS"/*.whl || exit 1
fi
export PYTHONPATH=$W/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
[ -e vespo_megatron/patches ] || ln -s ../patches vespo_megatron/patches
mkdir -p "$OUT/engine" "$W/variants"
BASE=${BASE_DIR:-}
if [ -z "$BASE" ]; then
  $PY bench/base_pieces.py unpack "${BASE_PIECES_DIR:-.gpubase}" "$W/base" || exit 1
  BASE=$W/base/hf
fi
BT=${BASELINE_TREE:-}
[ -z "$BT" ] || BT=$(cd "$BT" && pwd)
if [ -n "$BT" ] && [ ! -e "$BT/vespo_megatron/patches" ]; then ln -s "$PWD/patches" "$BT/vespo_megatron/patches"; fi
if [ "${ENGINE_BENCH:-1}" = 1 ]; then
  # one line of ENGINE_ARGS per bench (default: the issue's 512 x 256 shape), each run by this tree and, with
  # BASELINE_TREE, by that one too (its own bench/engine_bench.py) unless the line starts with "new: "
  k=0
  while IFS= read -r args; do
    [ -n "$args" ] || continue
    k=$((k + 1))
    trees=("$PWD")
    if [ "${args#new: }" != "$args" ]; then args=${args#new: }; elif [ -n "$BT" ]; then trees+=("$BT"); fi
    for tree in "${trees[@]}"; do
      tag=$([ "$tree" = "$PWD" ] && echo new || echo base)
      mkdir -p "$OUT/engine/$tag$k"
      echo "[$(el) s] engine bench $tag $k: $args"
      # shellcheck disable=SC2086
      (cd "$tree" && PYTHONPATH=$W/site:$tree $PY bench/engine_bench.py $args --cuda-graphs --no-baseline \
        --out "$OUT/engine/$tag$k" > "$OUT/engine/$tag$k/engine.log" 2>&1)
      echo "rc=$?"; grep -E "^\||CUDA graphs|^Correctness|^# .*engine, " "$OUT/engine/$tag$k/engine.log"
    done
  done <<< "${ENGINE_ARGS:---size testbed}"
fi
RUN=(--loss grpo --rollout-correction tis --staleness 1 --micro-batch-size 128 --seed 0 --steps "$STEPS"
     --prompts-per-step 32 --group-size 8 --checkpoint-every 0 --threads 1 --no-console --hf-checkpoint "$BASE"
     --sft-steps 0 --base testbed --logprob-micro-batch-size 128 --eval-every 0 --eval-final-k 1
     --eval-max-problems 8 --out-dir "$W/variants")
variant() {  # base_<variant>: the same variant run by BASELINE_TREE's code
  local name=$1; shift
  local tree=$PWD
  if [ "${name#base_}" != "$name" ]; then tree=${BT:?base_ variants need BASELINE_TREE}; fi
  echo "[$(el) s] run $name ($tree): $*"
  (cd "$tree" && PYTHONPATH=$W/site:$tree $PY -m vespo_megatron.training.cli "${RUN[@]}" --run-name "$name" "$@" \
    > "$OUT/$name.log" 2>&1)
  echo "rc=$?"; tail -n 3 "$OUT/$name.log" | cut -c1-200
}
# (since round 12 the trainer's defaults are graphs and the fused single pass: each variant names both)
flags_of() {
  case ${1#base_} in
    defaults*) echo "" ;;
    eager*) echo "--no-rollout-cuda-graphs --no-fused-lm-head" ;;
    graphs_check8*) echo "--rollout-cuda-graphs --rollout-stop-check-every 8 --no-fused-lm-head" ;;
    graphs_lag0*) echo "--rollout-cuda-graphs --rollout-stop-read-lag 0 --no-fused-lm-head" ;;
    compile_bmm*) echo "--rollout-compile-decode --rollout-decode-attention bmm" ;;
    compile*) echo "--rollout-compile-decode" ;;  # the defaults, the decode steps' forward through torch.compile
    dense_prefill*) echo "--rollout-dense-moe-rows 65536" ;;  # the defaults, the prefill on the dense MoE path too
    graphs*) echo "--rollout-cuda-graphs --no-fused-lm-head" ;;
    fused_single*) echo "--no-rollout-cuda-graphs --fused-lm-head --lm-head-single-pass" ;;
    *) echo "unknown variant $1" >&2; return 1 ;;
  esac
}
read -ra NAMES <<< "${VARIANTS:-eager graphs graphs_check8 fused_single}"
dirs=()
for name in "${NAMES[@]}"; do
  flags=$(flags_of "$name") || exit 1
  case $name in *_p64*) flags="$flags --prompts-per-step 64" ;; esac  # the testbed config's 64 x 8 batch
  # shellcheck disable=SC2086
  variant "$name" $flags
  dirs+=("$W/variants/$name")
  cp "$W/variants/$name/$name.jsonl" "$OUT/" 2>/dev/null
done
$PY bench/step_variants.py "${dirs[@]}" --reference "${NAMES[0]}" --out "$OUT/step_variants"
echo "[$(el) s] done"
