#!/usr/bin/env bash
# Sets up .venv (ci/setup.sh) and runs the main job: for now a demo of the policy losses on synthetic data.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/ci/setup.sh"
cd "$root"
exec .venv/bin/python -m vespo_megatron.demo "$@"
