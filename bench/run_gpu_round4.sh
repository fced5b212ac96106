#!/usr/bin/env bash
# One device call (one H200): the issue-17 testbed's SFT base (examples/testbed_sft.py, <= 270 s of training
# by its own limit) with its held-out pass@1, then two RL steps of the testbed from it (vespo, N = 1) to time
# a step and its generation share.
#   device run, carry [".gpuwhl"]:  bash bench/run_gpu_round4.sh
# (later calls: SFT_FLAGS="--time-limit-s 230 -- --levels 3,4,5,6" RL_FLAGS="--levels 3,4,5,6": an easier level mix;
# .gpuwhl also holds the mbridge 0.15.1 wheel, which the HF export of the base needs)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpuwhl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
[ -e vespo_megatron/patches ] || ln -s ../patches vespo_megatron/patches
mkdir -p "$OUT/sft" "$OUT/rl"
timeout 300 python3 examples/testbed_sft.py --out-dir /tmp/sft --eval-every 40 --time-limit-s 150 ${SFT_FLAGS:-} 2>&1 | grep -v -i warn | tail -30
cp /tmp/sft/sft.json "$OUT/sft/" 2>/dev/null
timeout 100 python3 -m vespo_megatron.training.cli --base testbed --hf-checkpoint /tmp/sft/hf --steps 2 \
  --eval-every 0 --checkpoint-every 0 --out-dir /tmp/rl --run-name vespo_n1 --no-console ${RL_FLAGS:-} 2>&1 | grep -v -i warn | tail -8
cp /tmp/rl/vespo_n1/vespo_n1.jsonl "$OUT/rl/" 2>/dev/null
python3 - <<'PY'
import json, os
for line in open(os.path.join(os.environ["OUT"], "rl", "vespo_n1.jsonl")):
    r = json.loads(line)
    if "step" in r:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()
               if k in ("step", "time/step_s", "time/rollout_s", "reward/mean", "response/length_mean", "mismatch/kl_k3")})
PY
