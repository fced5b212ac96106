"""The example scripts: shell syntax, the Qwen3-30B-A3B launch script's dry run (CI's check of the GPU
launch), clear errors for bad layouts, and the loss comparison end to end at toy size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "examples").glob("*.sh"))


def _env(**extra):
    # PYTHONPATH: the checkout under test is the one the scripts import (a worktree's, not the installed one)
    return dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", **{"PYTHONPATH": str(ROOT), **extra})


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_shell_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def _as_printed_env(**extra):
    """A user's shell: no PYTHON (issue 13: the README's command failed without it, and CI always set it).
    PYTHONPATH only makes the checkout under test the one imported (in a plain checkout it is anyway)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    return dict(env, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)


def test_qwen3_launch_script_dry_run():
    """`DRY_RUN=1 bash examples/qwen3_30b_a3b.sh` exactly as the README prints it, from the repository root."""
    readme = (ROOT / "README.md").read_text()
    assert "DRY_RUN=1 bash examples/qwen3_30b_a3b.sh" in readme
    out = subprocess.run(["bash", "examples/qwen3_30b_a3b.sh"], cwd=ROOT, env=_as_printed_env(DRY_RUN="1"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout)
    assert plan["world_size"] == 128 and plan["data_parallel"] == 32
    assert plan["layout"]["ep"] == 8 and plan["layout"]["tp"] == 4 and plan["layout"]["sp"] is True
    # Qwen3-30B-A3B: about 30.5B parameters, 3.3B active per token
    assert 30.0 < plan["total_params_billion"] < 31.0 and 3.0 < plan["active_params_per_token_billion"] < 3.6


@pytest.mark.parametrize("flags, message", [
    (["--tp", "3", "--sp"], "error: world_size: expected a multiple of tp*cp*pp=3, got 8"),
    (["--staleness", "3"], "error: --staleness: expected a divisor of the 32 samples per DP rank"),
    (["--ep", "3"], "error: world_size: expected a multiple of etp*ep*pp=3, got 8"),
    (["--ep", "8", "--num-experts", "4"], "error: --ep: expected a divisor of num_experts=4, got 8"),
])
def test_dry_run_rejects_bad_layouts(flags, message):
    """Issue 13: these were tracebacks naming dataclass fields (`AlgorithmConfig.staleness`)."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "toy_rl.py"), *flags, "--dry-run", "--world-size", "8"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.startswith(message) and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


@pytest.mark.megatron
def test_compare_losses_runs_and_plots(tmp_path):
    """Enough steps to write checkpoints (every step, 2 steps): each run must train in its own directory, not
    resume another run's checkpoint (the four once shared <out>/checkpoints and three of them logged nothing)."""
    flags = ["--steps", "2", "--checkpoint-every", "1", "--sft-steps", "2", "--hidden-size", "32",
             "--prompts-per-step", "4", "--group-size", "4", "--micro-batch-size", "4", "--threads", "1"]
    subprocess.run(["bash", str(ROOT / "examples" / "compare_losses.sh"), *flags], env=_env(OUT=str(tmp_path)),
                   check=True, capture_output=True, timeout=900, cwd=ROOT)
    losses = {"vespo": "vespo", "grpo_tis": "grpo", "grpo_r3": "grpo", "vespo_r3": "vespo"}
    for run, loss in losses.items():
        lines = (tmp_path / run / f"{run}.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [0, 1], run
        assert (tmp_path / run / "checkpoints" / "latest").read_text().strip() == "step_0000001", run
        assert json.loads((tmp_path / run / "config.json").read_text())["algorithm"]["loss"] == loss, run
    r3 = json.loads((tmp_path / "grpo_r3" / "grpo_r3.jsonl").read_text().splitlines()[-1])
    assert 0 <= r3["routing/agree_exact"] <= 1  # replay on: the agreement metric is logged
    tis = json.loads((tmp_path / "grpo_tis" / "grpo_tis.jsonl").read_text().splitlines()[-1])
    assert "rollout_corr/tis_clip_frac" in tis
    pytest.importorskip("matplotlib")
    assert list((tmp_path / "plots").glob("*.png"))


@pytest.mark.megatron
@pytest.mark.parametrize("script, env, runs", [
    ("staleness.sh", {"STALENESS": "1 2"}, ["vespo_n1", "grpo_n1", "vespo_n2", "grpo_n2"]),
    ("async.sh", {"LAG": "1"}, ["vespo_lag1", "grpo_lag1"]),
])
def test_staleness_and_async_scripts_write_every_run(tmp_path, script, env, runs):
    """The other two comparison scripts, short but checkpointing: every run trains in its own directory and
    logs every step (they once shared one checkpoint directory, so later runs resumed the first one's)."""
    flags = ["--steps", "2", "--checkpoint-every", "1", "--sft-steps", "2", "--hidden-size", "32",
             "--prompts-per-step", "4", "--group-size", "4", "--micro-batch-size", "4", "--threads", "1"]
    subprocess.run(["bash", str(ROOT / "examples" / script), *flags], env=_env(OUT=str(tmp_path), **env),
                   check=True, capture_output=True, timeout=900, cwd=ROOT)
    for run in runs:
        lines = (tmp_path / run / f"{run}.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [0, 1], run
        assert (tmp_path / run / "checkpoints" / "latest").read_text().strip() == "step_0000001", run
    pytest.importorskip("matplotlib")
    assert list((tmp_path / "plots").glob("*.png"))


@pytest.mark.parametrize("script, first", [("compare_losses.sh", "vespo"), ("staleness.sh", "vespo_n1"),
                                           ("async.sh", "vespo_lag2")])
def test_scripts_fail_naming_a_run_without_records(tmp_path, script, first):
    """A trainer that exits 0 but logs nothing (here a stand-in for python) must fail the script, not drop
    the run from the plot with a note."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    out = subprocess.run(["bash", str(ROOT / "examples" / script)], env=_env(OUT=str(tmp_path)) | {"PYTHON": str(fake)},
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode != 0
    assert f"error: run '{first}' produced no records" in out.stderr


def test_hf_math_cpu_script_smoke(tmp_path):
    """The real-model path end to end through the shell script: tiny HF checkpoint, dataset, eval, HF save."""
    pytest.importorskip("transformers")
    pytest.importorskip("math_verify")
    out = tmp_path / "tiny_hf"
    subprocess.run(["bash", str(ROOT / "examples" / "hf_math_cpu.sh"), "--eval-every", "1", "--threads", "1",
                    "--no-console"], env=_env(OUT=str(out), STEPS="1", SFT_STEPS="1"), check=True, cwd=ROOT,
                   capture_output=True, text=True, timeout=600)
    run = out / "run" / "tiny_hf_math"  # --out-dir $OUT/run --run-name tiny_hf_math
    (row,) = [json.loads(line) for line in (run / "tiny_hf_math.jsonl").read_text().splitlines()]
    assert row["eval/num_problems"] == 16 and 0 <= row["eval/pass@1"] <= row["eval/pass@4"] <= 1
    assert row["data/skipped/missing_answer"] == 1 and row["data/skipped/prompt_too_long"] == 1
    assert (run / "hf" / "step_0000001" / "config.json").is_file()
