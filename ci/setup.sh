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
# SGLang's own code for tests/test_sglang_contract.py: the pinned release without its dependencies (it pins a
# CUDA torch), plus the light packages its request and encoder modules import. About 40 MB, seconds.
SGLANG_CONTRACT=(sglang==0.5.23)
SGLANG_CONTRACT_DEPS=(msgspec==0.23.0 orjson==3.13.0 pybase64==1.5.1 pydantic==2.14.4)
stamp=.venv/.installed-$(cat pyproject.toml ci/constraints-cpu.txt ci/setup.sh | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c ci/constraints-cpu.txt torch==2.13.0
  .venv/bin/python -m pip install -q -c ci/constraints-cpu.txt -e ".[dev]"
  .venv/bin/python -m pip install -q -c ci/constraints-cpu.txt "${SGLANG_CONTRACT_DEPS[@]}"
  .venv/bin/python -m pip install -q --no-deps "${SGLANG_CONTRACT[@]}"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
