#!/usr/bin/env bash
# Creates (or reuses) .venv in the repository root and installs the project with its test tools.
# CPU machines take torch from the local CPU build; ci/constraints-cpu.txt pins it so that no resolver
# pulls a CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml ci/constraints-cpu.txt | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c ci/constraints-cpu.txt torch==2.13.0
  .venv/bin/python -m pip install -q -c ci/constraints-cpu.txt -e ".[dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
