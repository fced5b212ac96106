#!/usr/bin/env bash
# One device call (one H200), issue 17: (1) a profile of the KV-cached engine's decode at 512 rows; (2) three
# SFT bases in parallel (sharing the GPU: their times are upper bounds of a lone run), eval every 25 steps, each
# stopping at pass@1 >= 0.25 or 200 s; (3) from the first base that reached 0.2 (widest level mix first): the
# lr sweep (GRPO, N = 1, lr 1e-6 / 3e-6 / 1e-5, seeds 0 and 1, 32 prompts x 8 samples, 100 steps) and two
# throughput probes at N = 16 and 64, all at once, until the call's time is up. The base comes back as tar
# pieces (sft_base.tar.part-*); logs and run records as tars.
#   device run, carry [".gpuwhl"]:  bash bench/run_gpu_round6.sh
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
echo "[$(el) s] engine profile"
timeout 80 python3 bench/engine_bench.py --size testbed --no-baseline --profile 24 --out "$OUT" > /tmp/logs/engine.log 2>&1
grep -A12 "device_time_total" "$OUT/engine_testbed_profile.txt" | head -16; grep "kv_cache" /tmp/logs/engine.log
echo "[$(el) s] SFT variants"
sft() {  # name, then vespo-train flags
  local name=$1; shift
  timeout 280 python3 examples/testbed_sft.py --out-dir /tmp/sft_$name --eval-every 25 --time-limit-s 200 \
    -- --threads 2 "$@" > /tmp/logs/sft_$name.log 2>&1
  echo "== $name rc $?"; grep -E '^\{"sft_step|^base' /tmp/logs/sft_$name.log | cut -c1-160 | tail -12
}
sft L20lr2 --levels 3,6,9,12,16,20 --sft-lr 2e-3 &
sft L12lr2 --levels 3,6,9,12 --sft-lr 2e-3 &
sft L12lr1 --levels 3,6,9,12 --sft-lr 1e-3 &
wait
echo "[$(el) s] SFT done"
base=""; for name in L20lr2 L12lr2 L12lr1; do
  f=/tmp/sft_$name/sft.json; [ -f $f ] || continue
  python3 -c "import json,sys; sys.exit(0 if json.load(open('$f'))['eval/pass@1'] >= 0.2 else 1)" && { base=$name; break; }
done
[ -n "$base" ] || base=$(ls -d /tmp/sft_*/hf 2>/dev/null | head -1 | sed 's#/tmp/sft_##; s#/hf##')
echo "base: $base"; [ -n "$base" ] || exit 0
(cd /tmp/sft_$base && tar cf - hf sft.json | split -b 15M - "$OUT/sft_base.tar.part-")
levels=$(python3 -c "import json; f=json.load(open('/tmp/sft_$base/sft.json'))['flags']; print(f[f.index('--levels')+1])")
left=$(( 570 - $(el) )); echo "[$(el) s] lr sweep + probes for $left s, levels $levels"
common=(--init-checkpoint /tmp/sft_$base/hf --runs-dir /tmp/sw --prompts-per-step 32 --jobs 8)
timeout $left python3 examples/sweep.py --preset lr_sweep "${common[@]}" --results-dir /tmp/lr_report \
  -- --base testbed --levels $levels > /tmp/logs/lr_sweep.log 2>&1 &
timeout $left python3 examples/sweep.py --name probe --losses vespo --staleness 16 64 --seeds 0 --steps 100 \
  "${common[@]}" --results-dir /tmp/probe_report -- --base testbed --levels $levels --lr 3e-6 > /tmp/logs/probe.log 2>&1 &
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
