#!/usr/bin/env bash
# One device call (one H200) for issue 16, the fused loss head: device `run` from the repository root, carry
# [".gpuwhl", ".gpuliger"] (wheels for Python 3.12: megatron-core 0.16.1 in .gpuwhl, as for the testbed, and
# liger-kernel 0.8.5 apart in .gpuliger, so that the testbed's calls, which carry .gpuwhl and the 47 MiB base,
# stay under the 64 MiB a call carries: pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_28_x86_64 megatron-core==0.16.1 -d .gpuwhl; the same with liger-kernel==0.8.5
# -d .gpuliger), then:  bash bench/run_gpu_lm_head.sh
#   1. bench/lm_head_bench.py: GEMM floor, logits path, the recomputing fused head (2**29 tiles), the single
#      pass (2**29, 2**29.25 -- its default since round 15 -- and 2**30 chunks: 1, 2 and 3 sequences of 2048
#      tokens a chunk at the full vocabulary, with and without megatron's main_grad) and Liger, at TP = 1 and on
#      a V/4 shard, 16k and 32k tokens, and memory against T at the default chunk -> $OUT/lm_head/lm_head_<card>.
#      {md,json}, with a torch.profiler table of the logits path and the single pass at 2**29 and 2**29.25 at
#      each shape (profile_*.txt: where the time over the floor goes)
#   2. bench/lm_head_step_memory.py on the Qwen3-30B-A3B slice, short rows (64 x (32 + 224) tokens): logits
#      path, fused head, single pass -> $OUT/lm_head/lm_head_step_memory.jsonl
#   3. bench/lm_head_on_policy_check.py: the single pass's old-log-prob pass against its training pass at these
#      shapes (bitwise?), and the recomputing head's tiles against it -> $OUT/lm_head/on_policy_check.json
# LM_HEAD_ARGS / STEP_ARGS replace the two scripts' arguments (defaults below; on CPU: LM_HEAD_ARGS="--cpu-smoke"
# STEP_ARGS="--cpu-smoke" CHECK_ARGS="--cpu-smoke" PYTHON=.venv/bin/python WHEELS_DIR=none OUT=/tmp/x checks this script). Logs: $OUT/lm_head/.
set -uo pipefail
W=${WORK_DIR:-/tmp}
PY=${PYTHON:-python3}
WHEELS=${WHEELS_DIR:-.gpuwhl}
LIGER=${LIGER_DIR:-.gpuliger}
wheels=$(ls "$WHEELS"/*.whl "$LIGER"/*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
  # shellcheck disable=SC2086
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" $wheels || exit 1
fi
export PYTHONPATH=$W/site:$PWD PYTHONUNBUFFERED=1
[ -e vespo_megatron/patches ] || ln -s ../patches vespo_megatron/patches
mkdir -p "$OUT/lm_head"
T0=$(date +%s)
# shellcheck disable=SC2086
$PY bench/lm_head_bench.py --out "$OUT/lm_head" ${LM_HEAD_ARGS:---chunks 29 --single-chunks 29,29.25,30 --profile logits,single_29,single_29.25} \
  > "$OUT/lm_head/bench.log" 2>&1
echo "[$(( $(date +%s) - T0 )) s] lm_head_bench rc=$?"
grep -hE "^\| " "$OUT"/lm_head/lm_head_*.md 2>/dev/null | head -60
for mode in "--fused 0" "--fused 1" "--fused 1 --single-pass"; do
  # shellcheck disable=SC2086
  $PY -m torch.distributed.run --nproc-per-node 1 bench/lm_head_step_memory.py $mode \
    ${STEP_ARGS:---samples 64 --prompt 32 --response 224} --out "$OUT/lm_head" >> "$OUT/lm_head/step_memory.log" 2>&1
  echo "[$(( $(date +%s) - T0 )) s] step memory $mode rc=$?"
done
cat "$OUT/lm_head/lm_head_step_memory.jsonl" 2>/dev/null
# shellcheck disable=SC2086
$PY bench/lm_head_on_policy_check.py --out "$OUT/lm_head/on_policy_check.json" ${CHECK_ARGS:-} \
  > "$OUT/lm_head/on_policy_check.log" 2>&1
echo "[$(( $(date +%s) - T0 )) s] on-policy check rc=$?"
grep -E "^\| " "$OUT/lm_head/on_policy_check.log"
