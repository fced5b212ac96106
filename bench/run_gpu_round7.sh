#!/usr/bin/env bash
# One device call (one H200), issue 17, after round 6's level mixes up to 12 digits stayed at pass@1 0.00:
# (1) one SFT base, alone on the GPU, on the easier mix (levels 3-6, SFT lr 2e-3), eval every 40 steps,
# stopping at pass@1 >= 0.25 or 200 s; (2) from the better base: GRPO at N = 1 with lr 1e-6 / 3e-6 / 1e-5 and
# vespo, grpo+tis, gspo, sapo at N = 1 with lr 1e-5 (seed 0, 32 prompts x 8 samples), all at once, until the
# call's time is up (runs are cut there: partial). The base comes back as tar
# pieces (sft_base.tar.part-*); logs and run records as tars.
#   device run, carry [".gpuwhl"]:  bash bench/run_gpu_round7.sh
set -uo pipefail
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpuwhl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
[ -e vespo_megatron/patches ] || ln -s ../patches vespo_megatron/patches
mkdir -p "$OUT/sft" /tmp/logs
nvidia-cuda-mps-control -d 2>/dev/null && echo "MPS on"
finish() {  # whatever ran, its records come back
  (cd /tmp && tar cf "$OUT/logs.tar" logs sft_*/sft.json 2>/dev/null)
  (cd /tmp && find sw -name '*.jsonl' -o -name 'config.json' | tar cf "$OUT/runs.tar" -T - 2>/dev/null)
}
trap finish EXIT
echo "[$(el) s] SFT variants"
sft() {  # name, then vespo-train flags
  local name=$1; shift
  timeout 280 python3 examples/testbed_sft.py --out-dir /tmp/sft_$name --eval-every 40 --time-limit-s 200 \
    -- --threads 2 "$@" > /tmp/logs/sft_$name.log 2>&1
  echo "== $name rc $?"; grep -E '^\{"sft_step|^base' /tmp/logs/sft_$name.log | cut -c1-160 | tail -12
}
sft L6 --levels 3,4,5,6 --sft-lr 2e-3 &
wait
echo "[$(el) s] SFT done"
base=$(python3 -c "
import json, os
best = max(((json.load(open(f'/tmp/sft_{n}/sft.json'))['eval/pass@1'], n) for n in ('L8', 'L6')
            if os.path.exists(f'/tmp/sft_{n}/sft.json')), default=(0, ''))
print(best[1])")
[ -n "$base" ] || base=$(ls -d /tmp/sft_*/hf 2>/dev/null | head -1 | sed 's#/tmp/sft_##; s#/hf##')
echo "base: $base"; [ -n "$base" ] || exit 0
(cd /tmp/sft_$base && tar cf - hf sft.json | split -b 15M - "$OUT/sft_base.tar.part-")
levels=$(python3 -c "import json; f=json.load(open('/tmp/sft_$base/sft.json'))['flags']; print(f[f.index('--levels')+1])")
left=$(( 575 - $(el) )); echo "[$(el) s] lr sweep + N = 1 runs for $left s, levels $levels"
common=(--init-checkpoint /tmp/sft_$base/hf --runs-dir /tmp/sw --prompts-per-step 32 --jobs 8)
timeout $left python3 examples/sweep.py --preset lr_sweep "${common[@]}" --seeds 0 --results-dir /tmp/lr_report \
  -- --base testbed --levels $levels > /tmp/logs/lr_sweep.log 2>&1 &
timeout $left python3 examples/sweep.py --name n1 --losses vespo grpo+tis gspo sapo --staleness 1 --seeds 0 --steps 100 \
  "${common[@]}" --results-dir /tmp/n1_report -- --base testbed --levels $levels --lr 1e-5 > /tmp/logs/n1.log 2>&1 &
wait
echo "[$(el) s] done"
python3 - <<'PY'
import glob, json, os
for path in sorted(glob.glob("/tmp/sw/*/*.jsonl")):
    recs = [json.loads(l) for l in open(path) if l.strip()]
    steps = [r for r in recs if "time/step_s" in r]
    ev = [(r.get("step"), round(r["eval/pass@1"], 3)) for r in recs if "eval/pass@1" in r]
    if steps:
        n = max(1, len(steps) - 1)
        print(os.path.basename(path), "steps", len(steps), "step_s", round(sum(r["time/step_s"] for r in steps[1:]) / n, 2),
              "rollout_s", round(sum(r.get("time/rollout_s", 0) for r in steps[1:]) / n, 2),
              "reward", round(steps[-1].get("reward/mean", -1), 3), "len", round(steps[-1].get("response/length_mean", -1), 1),
              "eval", ev)
PY
