"""The testbed end to end on CPU at toy size: the SFT base command (cached on a second call), then the
`cpu_smoke` sweep preset starting from it (2 runs x 2 steps, eval every step) and its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.megatron
ROOT = Path(__file__).resolve().parents[1]


def _run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, check=True,
                          timeout=300, **kw)


def test_sft_base_then_cpu_smoke_sweep(tmp_path):
    sft = tmp_path / "sft"
    _run(["examples/testbed_sft.py", "--tiny", "--out-dir", str(sft), "--max-steps", "2", "--eval-every", "1"])
    record = json.loads((sft / "sft.json").read_text())
    assert record["sft_steps"] == 2 and record["stopped"] in ("max_steps", "target")
    assert [h["sft_step"] for h in record["history"]][-1] == 2
    assert 0 <= record["eval/pass@1"] <= 1 and record["history"][-1]["eval/num_problems"] == 4
    hf = json.loads((sft / "hf" / "config.json").read_text())
    assert hf["vocab_size"] == 64 and hf["num_experts"] == 4
    again = _run(["examples/testbed_sft.py", "--tiny", "--out-dir", str(sft)])
    assert "cached" in again.stderr  # not trained twice

    runs, results = tmp_path / "runs", tmp_path / "results"
    _run(["examples/sweep.py", "--preset", "cpu_smoke", "--init-checkpoint", str(sft / "hf"), "--runs-dir",
          str(runs), "--results-dir", str(results), "--jobs", "2"])
    for name in ("n1-vespo-s0", "n1-grpo_tis-s0"):
        rows = [json.loads(line) for line in (runs / name / f"{name}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1]
        assert all(0 <= r["eval/pass@1"] <= 1 and r["response/length_mean"] > 0 for r in rows)
    table = (results / "table.md").read_text()
    assert "| n1 | vespo | 1 | 2/2 |" in table and "| n1 | grpo+tis | 1 | 2/2 |" in table
    assert "final eval pass@1" in table


def test_compare_losses_gpu_preset_commands(tmp_path):
    """`--preset gpu` builds the SFT base, then the headline sweep from it (PYTHON replaced by a recorder)."""
    log = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), OUT=str(tmp_path / "out"), JOBS="3")
    subprocess.run(["bash", "examples/compare_losses.sh", "--preset", "gpu", "--only", "n16-*"], env=env, cwd=ROOT,
                   check=True, timeout=60)
    sft, sweep = log.read_text().splitlines()
    assert sft == f"examples/testbed_sft.py --out-dir {tmp_path}/out/sft"
    assert sweep == (f"examples/sweep.py --preset headline --init-checkpoint {tmp_path}/out/sft/hf --runs-dir "
                     f"{tmp_path}/out/runs --results-dir {tmp_path}/out/results --jobs 3 --only n16-*")
    bad = subprocess.run(["bash", "examples/compare_losses.sh", "--preset", "tpu"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--preset" in bad.stderr
