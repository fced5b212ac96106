#!/usr/bin/env bash
# One device call (one H200), issue 17 after the attention moved to torch's fused SDPA kernels on CUDA:
#   1. the KV-cached engine at 512 x 256 alone on the GPU (bench/engine_bench.py --size testbed);
#   2. four SFT bases in parallel (level mixes / SFT lr), each stopping at pass@1 >= 0.25 or 230 s;
#   3. RL throughput with many runs sharing the GPU: 12 testbed runs from the first base that reached the target,
#      for whatever time is left (their per-step records say how fast a sweep slice runs).
# The chosen base comes back as tar pieces (sft_base.tar.part-*), so later calls can carry it.
#   device run, carry [".gpuwhl"]:  bash bench/run_gpu_round5.sh
set -uo pipefail
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpuwhl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
[ -e vespo_megatron/patches ] || ln -s ../patches vespo_megatron/patches
mkdir -p "$OUT/sft" "$OUT/rl" "$OUT/engine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d 2>/dev/null; then
  python3 -c "import torch; torch.ones(1, device='cuda'); print('MPS on')" || { echo quit | nvidia-cuda-mps-control; echo "MPS off"; }
else echo "MPS: not available"; fi
echo "[$(el) s] engine bench"
timeout 150 python3 bench/engine_bench.py --size testbed --out "$OUT/engine" 2>&1 | grep -v -i warn | tail -12
echo "[$(el) s] SFT variants"
sft() {  # name, then flags for vespo-train
  local name=$1; shift
  timeout 300 python3 examples/testbed_sft.py --out-dir /tmp/sft_$name --eval-every 40 --time-limit-s 230 \
    -- --threads 2 "$@" > /tmp/sft_$name.log 2>&1
  cp /tmp/sft_$name/sft.json "$OUT/sft/sft_$name.json" 2>/dev/null; grep -v -i warn /tmp/sft_$name.log | tail -4
}
sft L12 --levels 3,6,9,12 &
sft L12lr2 --levels 3,6,9,12 --sft-lr 2e-3 &
sft L20lr2 --levels 3,6,9,12,16,20 --sft-lr 2e-3 &
sft L28 --sft-lr 2e-3 &
wait
echo "[$(el) s] SFT done"
base=""; for name in L20lr2 L12lr2 L12 L28; do
  f=/tmp/sft_$name/sft.json; [ -f $f ] || continue
  python3 -c "import json,sys; r=json.load(open('$f')); sys.exit(0 if r['eval/pass@1'] >= 0.2 else 1)" && { base=$name; break; }
done
[ -n "$base" ] || base=$(ls -d /tmp/sft_*/hf 2>/dev/null | head -1 | sed 's#/tmp/sft_##; s#/hf##')
echo "base: $base"; [ -n "$base" ] || exit 0
(cd /tmp/sft_$base && tar cf - hf sft.json | split -b 15M - "$OUT/sft_base.tar.part-")
levels=$(python3 -c "import json; f=json.load(open('/tmp/sft_$base/sft.json'))['flags']; print(f[f.index('--levels')+1] if '--levels' in f else '3,6,9,12,16,20,24,28')")
left=$(( 560 - $(el) )); echo "[$(el) s] RL throughput probe, $left s, levels $levels"
rl() {  # name, then flags
  local name=$1; shift
  timeout $left python3 -m vespo_megatron.training.cli --base testbed --hf-checkpoint /tmp/sft_$base/hf --levels $levels \
    --threads 1 --checkpoint-every 0 --out-dir /tmp/rl --run-name $name --no-console "$@" > /tmp/rl_$name.log 2>&1
  cp /tmp/rl/$name/$name.jsonl "$OUT/rl/" 2>/dev/null
}
tis="--loss grpo --rollout-correction tis"
for lr in 1e-6 3e-6 1e-5; do rl grpo-lr$lr-s0 --loss grpo --lr $lr --seed 0 & done
rl n1-vespo --loss vespo --lr 3e-6 & rl n1-grpo_tis $tis --lr 3e-6 &
rl n1-gspo --loss gspo --lr 3e-6 & rl n1-sapo --loss sapo --lr 3e-6 &
rl n16-vespo --loss vespo --lr 3e-6 --staleness 16 & rl n16-grpo_tis $tis --lr 3e-6 --staleness 16 &
rl n64-vespo --loss vespo --lr 3e-6 --staleness 64 --micro-batch-size 8 &
rl n64-grpo_tis $tis --lr 3e-6 --staleness 64 --micro-batch-size 8 &
rl p32-vespo --loss vespo --lr 3e-6 --prompts-per-step 32 &
wait
echo "[$(el) s] done"
cd "$OUT/rl" && tar cf ../rl_probe.tar *.jsonl && rm -f *.jsonl
python3 - <<'PY'
import json, os, tarfile
with tarfile.open(os.path.join(os.environ["OUT"], "rl_probe.tar")) as t:
    for m in sorted(t.getmembers(), key=lambda m: m.name):
        recs = [json.loads(l) for l in t.extractfile(m).read().decode().splitlines() if l.strip()]
        steps = [r for r in recs if "time/step_s" in r]
        if not steps:
            print(m.name, "no steps"); continue
        last = steps[-1]
        ev = [r for r in recs if "eval/pass@1" in r]
        print(m.name, "steps", len(steps), "step_s", round(sum(r["time/step_s"] for r in steps[1:]) / max(1, len(steps) - 1), 2),
              "rollout_s", round(sum(r.get("time/rollout_s", 0) for r in steps[1:]) / max(1, len(steps) - 1), 2),
              "reward", round(last.get("reward/mean", -1), 3), "len", round(last.get("response/length_mean", -1), 1),
              "eval", [round(e["eval/pass@1"], 3) for e in ev])
PY
