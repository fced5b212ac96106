#!/usr/bin/env bash
# One device call (one H200) of the issue-17 testbed, reusable across sessions (rounds 5-7 were one-offs):
#   1. the SFT base: unpacked from .gpubase/ when a previous call brought one back (carry it), else trained
#      (examples/testbed_sft.py $SFT_FLAGS, alone on the GPU) and sent back as tar pieces sft_base.tar.part-*
#      (a fresh machine each call: nothing survives on the device);
#   2. a slice of a sweep from that base: examples/sweep.py $SWEEP_ARGS, $JOBS runs at once (MPS on), cut at
#      $BUDGET_S seconds after the call's start (a cut run is reported as partial). Run records come back in
#      runs.tar (the jsonl and config of each run), logs in logs.tar.
# From the repository root, here:
#   device run, carry [".gpuwhl"]:              bash bench/run_gpu_testbed.sh        (trains the base)
#   mkdir -p .gpubase && cp /work/.device/N/sft_base.tar.part-* .gpubase/   (ignored: echo /.gpubase/ >> .git/info/exclude)
#   device run, carry [".gpuwhl", ".gpubase"]:  SWEEP_ARGS="--preset testbed --only 'n1-*-s0'" bash bench/run_gpu_testbed.sh
#   then: mkdir -p runs/sweeps/testbed && tar xf /work/.device/N/runs.tar -C runs/sweeps/testbed --strip-components 1
#         python examples/sweep.py --preset testbed --report-only --results-dir docs/results/testbed/<slice>
#   the next slice: python examples/sweep.py --preset testbed --status   (its last line is the --only list of the
#   unfinished runs; the device starts without the finished ones, so pass it in SWEEP_ARGS)
set -uo pipefail
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
SFT_FLAGS=${SFT_FLAGS:---levels 3,4,5,6 --sft-lr 1e-3}
SFT_TIME=${SFT_TIME:-270}
SWEEP_ARGS=${SWEEP_ARGS:---preset lr_sweep}
JOBS=${JOBS:-8}
BUDGET_S=${BUDGET_S:-570}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpuwhl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
[ -e vespo_megatron/patches ] || ln -s ../patches vespo_megatron/patches
mkdir -p /tmp/logs /tmp/base
nvidia-cuda-mps-control -d 2>/dev/null && echo "MPS on"
finish() {
  (cd /tmp && tar cf "$OUT/logs.tar" logs base/sft.json 2>/dev/null)
  (cd /tmp && find sw \( -name '*.jsonl' -o -name 'config.json' \) 2>/dev/null | tar cf "$OUT/runs.tar" -T - 2>/dev/null)
}
trap finish EXIT
if ls .gpubase/sft_base.tar.part-* >/dev/null 2>&1; then
  cat .gpubase/sft_base.tar.part-* | tar xf - -C /tmp/base || exit 1
  echo "base from .gpubase: $(python3 -c "import json; r=json.load(open('/tmp/base/sft.json')); print(r['eval/pass@1'], r['sft_steps'], r['flags'])")"
else
  echo "[$(el) s] SFT: $SFT_FLAGS"
  # shellcheck disable=SC2086
  timeout $((SFT_TIME + 60)) python3 examples/testbed_sft.py --out-dir /tmp/base --eval-every 40 --time-limit-s "$SFT_TIME" \
    -- --threads 4 $SFT_FLAGS > /tmp/logs/sft.log 2>&1
  grep -E '^\{"sft_step|^base' /tmp/logs/sft.log | cut -c1-200
  [ -f /tmp/base/sft.json ] || { echo "no base"; exit 1; }
  (cd /tmp/base && tar cf - hf sft.json | split -b 15M - "$OUT/sft_base.tar.part-")
fi
left=$(( BUDGET_S - $(el) )); echo "[$(el) s] sweep ($SWEEP_ARGS), $JOBS at once, $left s"
[ "$left" -gt 60 ] || exit 0
eval "set -- $SWEEP_ARGS"
timeout "$left" python3 examples/sweep.py "$@" --init-checkpoint /tmp/base/hf --runs-dir /tmp/sw --jobs "$JOBS" \
  --results-dir /tmp/report > /tmp/logs/sweep.log 2>&1
echo "[$(el) s] done"; sed -n '/^| setting/,$p' /tmp/report/table.md 2>/dev/null | cut -c1-220
