#!/usr/bin/env bash
# Sets up .venv (ci/setup.sh) and runs the whole test suite on CPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/ci/setup.sh"
cd "$root"
exec .venv/bin/python -m pytest -q "$@"
