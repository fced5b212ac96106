#!/usr/bin/env bash
# Sets up .venv (ci/setup.sh) and runs the main job: the toy RL run (examples/toy_rl.py) on CPU, a few
# minutes on 2 cores; extra arguments go to the script (e.g. --loss grpo --rollout-correction tis).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/ci/setup.sh"
cd "$root"
exec .venv/bin/python examples/toy_rl.py "$@"
