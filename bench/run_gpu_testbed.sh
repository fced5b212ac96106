#!/usr/bin/env bash
# One device call (one H200) of the issue-17 testbed, reusable across sessions (rounds 5-7 were one-offs):
#   0. with ENGINE_BENCH=1: bench/engine_bench.py --size testbed, batched experts, megatron's per-expert loop and
#      the dispatcher-free decode steps (--dense-moe-rows 8192), with and without the per-step stop check
#      (--stop-check-every 8) (tables in logs.tar: engine/);
#   1. the SFT base: unpacked from .gpubase/ when a previous call brought one back (carry it), else trained
#      (examples/testbed_sft.py $SFT_FLAGS) and sent back as pieces sft_base.planes.gz.part-* (a fresh machine
#      each call: nothing survives on the device). SFT_FLAGS may hold several flag sets separated by ';': they
#      train at once (MPS) and bench/choose_sft_base.py picks the base (every sft.json comes back in logs.tar);
#   2. a slice of a sweep from that base: examples/sweep.py $SWEEP_ARGS, $JOBS runs at once (MPS on), cut at
#      $BUDGET_S seconds after the call's start (a cut run is reported as partial). Run records come back in
#      runs.tar (the jsonl and config of each run), logs in logs.tar.
# From the repository root, here:
#   device run, carry [".gpuwhl"]:              bash bench/run_gpu_testbed.sh        (trains the base)
#   mkdir -p .gpubase && cp /work/.device/N/sft_base.planes.gz.part-* .gpubase/   (ignored: echo /.gpubase/ >>
#     .git/info/exclude; bench/base_pieces.py: fp32 byte planes, gzipped, the round-8 base in 43.6 MiB, not 51;
#     `python bench/base_pieces.py carried .gpuwhl .gpubase` says what a call carries, at most 64 MiB)
#   device run, carry [".gpuwhl", ".gpubase"]:  SWEEP_ARGS="--preset testbed --only 'n1-*-s0'" bash bench/run_gpu_testbed.sh
#   then: mkdir -p runs/sweeps/testbed && tar xf /work/.device/N/runs.tar -C runs/sweeps/testbed --strip-components 1
#         python examples/sweep.py --preset testbed --report-only --results-dir docs/results/testbed/<slice>
#   the next slice: python examples/sweep.py --preset testbed --status   (its last line is the --only list of the
#   unfinished runs; the device starts without the finished ones, so pass it in SWEEP_ARGS)
# A machine still warm from the previous call keeps $W: its runs (checkpoints included) are still there, so a
# run cut by that call resumes from its newest checkpoint when it is in this call's --only list, and the device
# report also lists that call's runs. Each run keeps one checkpoint (the sweep's --keep-checkpoints 1; round 9
# filled the 64 GiB disk keeping all of them over two calls). The disk left is printed at the end.
# On CPU at toy size (tests/test_testbed.py): WORK_DIR, PYTHON, and toy flags in SFT_FLAGS / SWEEP_ARGS; with no
# wheels in WHEELS_DIR (default .gpuwhl/) the installed megatron-core is used; BASE_PIECES_DIR (default .gpubase/)
# is where a carried base's pieces are looked for.
set -uo pipefail
W=${WORK_DIR:-/tmp}  # scratch: logs, SFT attempts, the base, the runs
PY=${PYTHON:-python3}
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
SFT_FLAGS=${SFT_FLAGS:-}  # empty: --base testbed's own (levels 3-6, SFT lr 5e-4)
SFT_TIME=${SFT_TIME:-270}
SFT_EVAL_EVERY=${SFT_EVAL_EVERY:-20}
SWEEP_ARGS=${SWEEP_ARGS:---preset lr_sweep}
JOBS=${JOBS:-8}
BUDGET_S=${BUDGET_S:-570}
WHEELS=${WHEELS_DIR:-.gpuwhl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then  # the device has no megatron-core: the carried wheels
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/site" "$WHEELS"/*.whl || exit 1
fi
# expandable segments: the caching allocator returns what a run freed, so ~15 runs of ~5 GiB peak share 140 GiB
# (round 9: 20 N = 1-class runs at once ran out of GPU memory without it, each holding up to 11 GiB reserved)
export PYTHONPATH=$W/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
[ -e vespo_megatron/patches ] || ln -s ../patches vespo_megatron/patches
mkdir -p $W/logs $W/base
nvidia-cuda-mps-control -d 2>/dev/null && echo "MPS on"
finish() {
  # the last lines of every run's train.log (a failed run's traceback is there; the whole logs are too big)
  for f in $W/sw/*/train.log; do [ -f "$f" ] && mkdir -p $W/logs/train && tail -n 40 "$f" > "$W/logs/train/$(basename "$(dirname "$f")").log"; done
  (cd "$W" && tar cf "$OUT/logs.tar" logs base/sft.json $(ls sft/*/sft.json 2>/dev/null) 2>/dev/null)
  (cd "$W" && find sw \( -name '*.jsonl' -o -name 'config.json' -o -name 'init_checkpoint.json' \) 2>/dev/null | tar cf "$OUT/runs.tar" -T - 2>/dev/null)
}
trap finish EXIT
if [ "${ENGINE_BENCH:-0}" = 1 ]; then
  mkdir -p $W/logs/engine
  echo "[$(el) s] engine bench: batched experts, the per-expert loop, dense decode MoE"
  $PY bench/engine_bench.py --size testbed --dense-moe-rows 0 --out $W/logs/engine > $W/logs/engine/batched.log 2>&1
  tail -n 6 $W/logs/engine/batched.log
  $PY bench/engine_bench.py --size testbed --dense-moe-rows 0 --sequential-experts --no-baseline --out $W/logs/engine/loop \
    > $W/logs/engine/loop.log 2>&1
  tail -n 4 $W/logs/engine/loop.log
  # the dispatcher-free decode steps (megatron/small_batch_moe.py): 512 rows x 16 experts = 8192 expert rows
  $PY bench/engine_bench.py --size testbed --dense-moe-rows 8192 --no-baseline --out $W/logs/engine/dense \
    > $W/logs/engine/dense.log 2>&1
  tail -n 4 $W/logs/engine/dense.log
  # ... and without the loop's per-step sync either (the only one left in a decode step)
  $PY bench/engine_bench.py --size testbed --dense-moe-rows 8192 --stop-check-every 8 --no-baseline \
    --out $W/logs/engine/dense_check8 > $W/logs/engine/dense_check8.log 2>&1
  tail -n 4 $W/logs/engine/dense_check8.log
fi
BASE_PIECES=${BASE_PIECES_DIR:-.gpubase}
# the pieces: byte planes (bench/base_pieces.py, what this script sends back since round 10), or a plain tar
# (sft_base.tar.part-*, what earlier rounds sent back)
base_from() { echo "base from $BASE_PIECES: $($PY -c "import json; r=json.load(open('$W/base/sft.json')); print(r['eval/pass@1'], r['sft_steps'], r['flags'])")"; }
if ls "$BASE_PIECES"/sft_base.planes.gz.part-* >/dev/null 2>&1; then
  $PY bench/base_pieces.py unpack "$BASE_PIECES" $W/base || exit 1
  base_from
elif ls "$BASE_PIECES"/sft_base.tar.part-* >/dev/null 2>&1; then
  cat "$BASE_PIECES"/sft_base.tar.part-* | tar xf - -C $W/base || exit 1
  base_from
else
  IFS=';' read -ra SFT_SETS <<< "$SFT_FLAGS"
  [ "${#SFT_SETS[@]}" -gt 0 ] || SFT_SETS=("")  # no flags: one attempt with the defaults
  dirs=()
  for i in "${!SFT_SETS[@]}"; do
    echo "[$(el) s] SFT $i: ${SFT_SETS[$i]}"; dirs+=("$W/sft/$i")
    # shellcheck disable=SC2086
    timeout $((SFT_TIME + 60)) $PY examples/testbed_sft.py --out-dir "$W/sft/$i" --eval-every "$SFT_EVAL_EVERY" \
      --time-limit-s "$SFT_TIME" -- --threads 2 ${SFT_SETS[$i]} > "$W/logs/sft$i.log" 2>&1 &
  done
  wait
  for i in "${!SFT_SETS[@]}"; do echo "SFT $i:"; grep -E '^\{"sft_step|^base' "$W/logs/sft$i.log" | cut -c1-200; done
  chosen=$($PY bench/choose_sft_base.py "${dirs[@]}") || { echo "no base"; exit 1; }
  echo "chosen base: $chosen"; rm -rf $W/base; cp -r "$chosen" $W/base
  $PY bench/base_pieces.py pack $W/base "$OUT" >/dev/null || exit 1
fi
left=$(( BUDGET_S - $(el) )); echo "[$(el) s] sweep ($SWEEP_ARGS), $JOBS at once, $left s"
[ "$left" -gt 60 ] || exit 0
eval "set -- $SWEEP_ARGS"
timeout "$left" $PY examples/sweep.py "$@" --init-checkpoint $W/base/hf --runs-dir $W/sw --jobs "$JOBS" \
  --results-dir $W/report > $W/logs/sweep.log 2>&1
echo "[$(el) s] done; disk: $(df -h "$W" | tail -1)"; sed -n '/^| setting/,$p' $W/report/table.md 2>/dev/null | cut -c1-220
