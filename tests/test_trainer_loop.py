"""The RL loop end to end at toy size: one process (async lag, bf16 engine mismatch), every 2-rank layout,
and a run killed with SIGKILL then restarted with the same command resuming to the same metrics."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_harness import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.megatron]

ROOT = Path(__file__).resolve().parents[1]
# Small enough for seconds per run; the warm start gets the reward off zero (0.3-0.4), so advantages and
# gradients are not trivially zero.
TINY = ["--hidden-size", "32", "--num-experts", "4", "--moe-ffn-hidden-size", "32", "--max-operand", "3",
        "--prompts-per-step", "4", "--group-size", "4", "--micro-batch-size", "4", "--staleness", "2",
        "--sft-steps", "40", "--threads", "1"]


def _train(rank, world_size, argv_list, out_dir):
    from vespo_megatron.megatron.parallel_setup import destroy_parallel
    from vespo_megatron.training import cli as train_cli
    from vespo_megatron.training.trainer import Trainer

    results = {}
    for name, argv in argv_list:
        cfg = train_cli.config_from_argv([*argv, "--out-dir", os.path.join(out_dir, name)])
        trainer = Trainer(cfg)
        try:
            results[name] = (trainer.is_log_rank, trainer.run())
        finally:
            destroy_parallel()
    return results


def _log_rank_history(results, name):
    return next(hist for is_log, hist in (r[name] for r in results) if is_log)


def test_single_process_async_and_mismatch(tmp_path):
    runs = [("async_bf16", [*TINY, "--steps", "3", "--async-lag", "1", "--rollout-precision", "bf16",
                            "--rollout-correction", "tis"])]
    hist = _log_rank_history(run_distributed(_train, 1, runs, str(tmp_path)), "async_bf16")
    assert len(hist) == 3
    assert any(v["grad_norm_mean"] > 0 for v in hist)
    for step, values in enumerate(hist):
        assert math.isfinite(values["loss"]) and math.isfinite(values["grad_norm_mean"])
        assert values["weight_version"] == step + 1
        # lag 1: step s samples with the weights of version s - 1 (step 0: the warm-started version 0)
        assert values["staleness/max"] == (0.0 if step == 0 else 1.0)
        assert values["mismatch/log_ratio_abs_mean"] > 0  # bf16 engine vs fp32 trainer
        assert "rollout_corr/tis_clip_frac" in values
        assert values["mismatch/kl_k3"] > 0 and values["mismatch/ppl_ratio"] > 0
        assert values["staleness/lag_1_plus" if step else "staleness/lag_0"] == 16  # every sample of the step
        # the engine's share of the rollout's time, inside the step's
        assert 0 < values["time/generate_s"] <= values["time/rollout_s"] <= values["time/step_s"]


def test_old_logprob_pass_in_larger_micro_batches_changes_nothing(tmp_path):
    """--logprob-micro-batch-size 16: the recompute pass runs on one pack of 16 samples instead of four of 4;
    mu, and so every metric of the step, is the same as with the update's micro-batches (bf16 engine, so the
    trainer-vs-engine metrics are not trivially 0; N = 2 updates, so mu enters the ratio)."""
    base = [*TINY, "--steps", "2", "--rollout-precision", "bf16", "--rollout-correction", "tis"]
    runs = [("per_update", base), ("one_pack", [*base, "--logprob-micro-batch-size", "16"])]
    results = run_distributed(_train, 1, runs, str(tmp_path))
    a, b = _log_rank_history(results, "per_update"), _log_rank_history(results, "one_pack")
    assert len(a) == len(b) == 2
    for va, vb in zip(a, b, strict=True):
        assert va["reward/mean"] == vb["reward/mean"]  # same rollouts
        for key in ("loss", "grad_norm_mean", "mismatch/kl_k3", "mismatch/log_ratio_abs_mean",
                    "mismatch/seq_log_ratio_abs_max", "ratio/log_ratio_abs_mean"):
            assert va[key] == pytest.approx(vb[key], rel=1e-5, abs=1e-7), key
        assert va["mismatch/log_ratio_abs_mean"] > 0


@pytest.mark.parametrize("layouts", [[("dp2", []), ("ep2", ["--ep", "2"]), ("tp2_sp", ["--tp", "2", "--sp"])],
                                     [("cp2", ["--cp", "2"]), ("pp2", ["--pp", "2"])]])
def test_two_rank_layouts_train(tmp_path, layouts):
    runs = [(name, [*TINY, "--steps", "2", *flags]) for name, flags in layouts]
    results = run_distributed(_train, 2, runs, str(tmp_path))
    for name, _ in layouts:
        hist = _log_rank_history(results, name)
        assert len(hist) == 2, name
        for values in hist:
            assert math.isfinite(values["loss"]) and math.isfinite(values["grad_norm_mean"]), (name, values)
            assert values["mismatch/log_ratio_abs_max"] < 1e-4, name  # fp32 engine = trainer
        assert any(v["grad_norm_mean"] > 0 and 0 < v["reward/mean"] < 1 for v in hist), (name, hist)


def _cmd(out_dir):
    return [sys.executable, str(ROOT / "examples" / "toy_rl.py"), *TINY, "--steps", "5", "--checkpoint-every", "2",
            "--out-dir", str(out_dir), "--no-console"]


def _lines(out_dir):
    path = Path(out_dir) / "toy" / "toy.jsonl"  # the run's directory: <out-dir>/<run-name>/
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _comparable(line):
    return {k: v for k, v in line.items() if not k.startswith("time") and k != "time"}


def test_sigkill_and_restart_resumes_identically(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cmd(ref_dir), check=True, env=env, timeout=600, capture_output=True)
    proc = subprocess.Popen(_cmd(killed_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed_dir / "toy" / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.read_text().strip() == "step_0000001"
    assert len(_lines(killed_dir)) < 5  # killed mid-run
    restart = subprocess.run(_cmd(killed_dir), check=True, env=env, timeout=600, capture_output=True, text=True)
    assert "resumed from step 2" in restart.stderr
    assert "(5 steps)" in restart.stderr.split("reward:")[1]  # the summary covers the killed process's steps too
    ref, resumed = _lines(ref_dir), _lines(killed_dir)
    assert [x["step"] for x in resumed] == [0, 1, 2, 3, 4]
    assert any(x["grad_norm_mean"] > 0 for x in ref[2:])  # the compared steps really train
    for a, b in zip(ref, resumed, strict=True):
        assert _comparable(a) == _comparable(b), a["step"]
