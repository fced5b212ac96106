#!/usr/bin/env bash
# One device call (one H200; python3.12 + torch + Triton there, megatron-core carried as a wheel in .gpuwhl/):
# the KV-cached engine at the testbed size (issue 17), the mismatch knob at that size, and the whole-step peak
# memory of the Qwen3-30B-A3B slice with and without the fused LM head at short rows (issue 16).
#   device run, carry [".gpuwhl"]:  bash bench/run_gpu_round3.sh
# Results land in $OUT (engine/, knob/, mem/) and are copied to bench/results/ by hand.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpuwhl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# the package from the source tree: its patches/ is installed as vespo_megatron.patches (pyproject package-dir)
[ -e vespo_megatron/patches ] || ln -s ../patches vespo_megatron/patches
mkdir -p "$OUT/engine" "$OUT/knob" "$OUT/mem"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 240 python3 bench/engine_bench.py --size testbed --out "$OUT/engine" 2>&1 | grep -v Warning | tail -25
timeout 120 python3 bench/mismatch_knob.py --size testbed --out "$OUT/knob" 2>&1 | grep -v Warning | tail -20
for fused in 0 1; do
  timeout 90 torchrun --nproc-per-node 1 bench/lm_head_step_memory.py --fused $fused --samples 64 --prompt 32 \
    --response 224 --out "$OUT/mem" 2>&1 | grep -v Warning | tail -4
done
cat "$OUT/mem/lm_head_step_memory.jsonl"
