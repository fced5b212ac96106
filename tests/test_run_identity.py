"""Run identity (issue 13): each run owns <out-dir>/<run-name>/, resumes only under the config it was started
with (refusals name the flags), says "resumed" / "already complete", never truncates its metrics on a fresh
start, and its end-of-run summary covers every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vespo_megatron.metrics.sinks import JsonlSink
from vespo_megatron.training import run_dir as rd
from vespo_megatron.training.cli import config_from_argv, make_cli

ROOT = Path(__file__).resolve().parents[1]
FLAGS = {p: leaf.flag for p, leaf in make_cli().leaves.items()}


def test_run_dir_is_out_dir_slash_name_and_names_are_checked():
    cfg = config_from_argv([])
    assert cfg.run.run_dir == os.path.join("runs", "toy")  # the README's runs/toy/toy.jsonl
    assert config_from_argv(["--out-dir", "/x", "--run-name", "a"]).run.run_dir == "/x/a"
    with pytest.raises(ValueError, match="run-name"):
        config_from_argv(["--run-name", "a/b"])


def test_differences_name_the_flags_the_user_changed():
    vespo = rd.config_record(config_from_argv(["--loss", "vespo"]))
    grpo = rd.config_record(config_from_argv(["--loss", "grpo", "--rollout-correction", "tis", "--steps", "99"]))
    diffs = rd.config_differences(vespo, grpo, FLAGS)
    # the fields only one loss's config has (--c-pos, --eps-high) follow from --loss: not listed
    assert [(FLAGS[p], a, b) for p, a, b in diffs] == [("--loss", "vespo", "grpo"),
                                                       ("--rollout-correction", "none", "tis")]
    err = rd.ConfigMismatchError("runs/toy", diffs, FLAGS)
    assert "--loss: this run was 'vespo', now 'grpo'" in str(err) and "--allow-config-change" in str(err)


def test_fields_that_may_differ_are_ignored_and_derived_ones_still_count():
    a = rd.config_record(config_from_argv([]))
    b = rd.config_record(config_from_argv(["--steps", "7", "--threads", "1", "--no-console", "--checkpoint-every",
                                           "1", "--keep-checkpoints", "2", "--eval-every", "3", "--out-dir", "o",
                                           "--sglang-timeout-s", "9", "--allow-config-change"]))
    assert rd.config_differences(a, b, FLAGS) == []
    c = rd.config_record(config_from_argv(["--seed", "1"]))  # the model / task seeds follow: only --seed shown
    assert [p for p, _, _ in rd.config_differences(a, c, FLAGS)] == ["run.seed"]
    old = dict(a, run={k: v for k, v in a["run"].items() if k != "sft_lr"})  # a field the record lacks
    assert rd.config_differences(old, a, FLAGS) == [("run.sft_lr", rd._ABSENT, a["run"]["sft_lr"])]
    # fields added after round 8 that do not change what is trained: a record without them resumes
    round8 = dict(a, eval={k: v for k, v in a["eval"].items() if k != "final_k"},
                  algorithm={k: v for k, v in a["algorithm"].items() if k != "logprob_micro_batch_size"})
    later = rd.config_record(config_from_argv(["--eval-final-k", "16", "--logprob-micro-batch-size", "8",
                                               "--micro-batch-size", "8"]))
    assert rd.config_differences(round8, later, FLAGS) == [("algorithm.micro_batch_size", a["algorithm"]["micro_batch_size"], 8)]


def test_check_run_config_records_refuses_and_allows(tmp_path):
    d = str(tmp_path / "toy")
    os.makedirs(d)
    vespo = config_from_argv([])
    rd.check_run_config(d, vespo)  # first start: recorded
    assert json.loads((tmp_path / "toy" / "config.json").read_text())["algorithm"]["loss"] == "vespo"
    rd.check_run_config(d, config_from_argv(["--steps", "100"]))  # same experiment, longer
    grpo = config_from_argv(["--loss", "grpo"])
    with pytest.raises(rd.ConfigMismatchError, match="--loss: this run was 'vespo', now 'grpo'"):
        rd.check_run_config(d, grpo)
    with pytest.raises(rd.ConfigMismatchError):
        rd.check_run_config(d, grpo, rank=1)  # every rank refuses alike
    said = []
    rd.check_run_config(d, config_from_argv(["--loss", "grpo", "--allow-config-change"]), log=said.append)
    assert "--loss" in said[0]
    assert json.loads((tmp_path / "toy" / "config.json").read_text())["algorithm"]["loss"] == "grpo"
    assert json.loads((tmp_path / "toy" / "config.previous.json").read_text())["algorithm"]["loss"] == "vespo"
    rd.check_run_config(d, grpo)  # the new record stands


def test_fresh_start_moves_old_metrics_aside_never_truncates(tmp_path, capsys):
    path = tmp_path / "toy.jsonl"
    path.write_text('{"step": 0, "x": 1}\n{"step": 1, "x": 2}\n')
    JsonlSink(path, resume_from_step=0).close()
    assert path.read_text() == ""
    assert (tmp_path / "toy.jsonl.1.old").read_text().count("\n") == 2
    assert "moved to" in capsys.readouterr().err
    JsonlSink(path, resume_from_step=0).close()  # an empty file is not moved
    assert not (tmp_path / "toy.jsonl.2.old").exists()


def test_history_and_summary_cover_the_whole_run(tmp_path):
    path = tmp_path / "r.jsonl"
    lines = [{"step": s, "reward/mean": 0.1 * s} for s in range(6)] + [{"step": 5, "reward/mean": 0.9}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 6, "rew')
    hist = rd.read_history(path, steps=6)
    assert [h["step"] for h in hist] == list(range(6)) and hist[-1]["reward/mean"] == 0.9
    assert rd.reward_summary(hist) == "reward: mean of the first 2 steps 0.050 -> last 2 steps 0.650 (6 steps)"
    assert rd.reward_summary(hist[:1]) is None


# ------------------------------------------------------------------ end to end, as a user runs it

TINY = ["--hidden-size", "32", "--num-experts", "4", "--moe-ffn-hidden-size", "32", "--max-operand", "3",
        "--prompts-per-step", "4", "--group-size", "2", "--micro-batch-size", "4", "--staleness", "1",
        "--sft-steps", "0", "--threads", "1", "--no-console", "--checkpoint-every", "1"]


def _train(out, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "vespo_megatron.training.cli", *TINY, "--out-dir", str(out), *flags],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def _steps(path):
    return [json.loads(x)["step"] for x in Path(path).read_text().splitlines()]


@pytest.mark.megatron
def test_runs_in_one_out_dir_never_mix(tmp_path):
    a = _train(tmp_path, "--steps", "2")  # the README's demo: VESPO, default name
    assert a.returncode == 0, a.stderr
    toy = tmp_path / "toy"
    assert _steps(toy / "toy.jsonl") == [0, 1] and (toy / "config.json").is_file()
    assert sorted(os.listdir(toy / "checkpoints"))[:2] == ["latest", "step_0000000"]

    b = _train(tmp_path, "--steps", "2", "--loss", "grpo", "--rollout-correction", "tis")  # same dir: refused
    assert b.returncode == 2
    assert "--loss: this run was 'vespo', now 'grpo'" in b.stderr
    assert "--rollout-correction: this run was 'none', now 'tis'" in b.stderr and "Traceback" not in b.stderr
    assert _steps(toy / "toy.jsonl") == [0, 1]  # untouched

    b = _train(tmp_path, "--steps", "2", "--loss", "grpo", "--rollout-correction", "tis", "--run-name", "b")
    assert b.returncode == 0, b.stderr
    assert _steps(tmp_path / "b" / "b.jsonl") == [0, 1] and (tmp_path / "b" / "checkpoints" / "latest").is_file()
    assert "rollout_corr/tis_clip_frac" in (tmp_path / "b" / "b.jsonl").read_text()

    again = _train(tmp_path, "--steps", "2")  # the finished command once more: nothing trained, said so
    assert again.returncode == 0, again.stderr
    assert "already complete (2 steps)" in again.stderr
    assert _steps(toy / "toy.jsonl") == [0, 1]
    assert "(2 steps)" in again.stderr.split("reward:")[1]  # the summary still covers the run

    longer = _train(tmp_path, "--steps", "4")  # a stopped run continued: resumed, metrics kept, summary whole
    assert longer.returncode == 0, longer.stderr
    assert "resumed from step 2" in longer.stderr
    assert _steps(toy / "toy.jsonl") == [0, 1, 2, 3]
    assert "(4 steps)" in longer.stderr.split("reward:")[1]


def _fake_checkpoint(path: Path, seed: int, n: int = 64) -> Path:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(n, generator=g)}, str(path / "model.safetensors"))
    (path / "config.json").write_text('{"model_type": "qwen3_moe"}')
    return path


def test_init_checkpoint_fingerprint_records_refuses_another_base_and_allows(tmp_path, monkeypatch):
    """Every device call unpacks its SFT base to the same path: a run resumed over another base is refused by
    content (sha256), not by path; --allow-config-change records the new one and keeps the old record."""
    import hashlib

    base = _fake_checkpoint(tmp_path / "base", seed=0)
    fp = rd.checkpoint_fingerprint(base)
    h = hashlib.sha256()  # independent: name, size, bytes of each file in name order
    for p in sorted(base.iterdir()):
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode() + p.read_bytes())
    assert fp["sha256"] == h.hexdigest() and fp["method"] == "full"
    assert fp["files"] == ["config.json", "model.safetensors"]

    run = tmp_path / "run"
    run.mkdir()
    assert rd.read_init_checkpoint(run) is None
    first = rd.check_init_checkpoint(str(run), base)
    assert rd.read_init_checkpoint(run) == first and first["path"] == str(base)
    assert rd.check_init_checkpoint(str(run), base) == first  # the same base again: fine

    _fake_checkpoint(base, seed=1)  # another base at the same path (same shapes, same sizes)
    with pytest.raises(rd.ConfigMismatchError, match=r"--hf-checkpoint: this run was .*sha256 "
                                                     + first["sha256"] + ".*, now .*sha256 [0-9a-f]{64}"):
        rd.check_init_checkpoint(str(run), base)
    assert rd.read_init_checkpoint(run) == first  # refused: the record is untouched
    said = []
    new = rd.check_init_checkpoint(str(run), base, allow_change=True, log=said.append)
    assert new["sha256"] != first["sha256"] and rd.read_init_checkpoint(run) == new and said
    assert json.loads((run / "init_checkpoint.previous.json").read_text()) == first
    with pytest.raises(ValueError, match="hf.load: expected a checkpoint directory with \\*.safetensors"):
        rd.checkpoint_fingerprint(tmp_path / "run")

    # large shards are sampled: still tells two trainings apart, reads a bounded amount
    monkeypatch.setattr(rd, "FINGERPRINT_WHOLE_BYTES", 1024)
    monkeypatch.setattr(rd, "_BLOCK", 64)
    a = rd.checkpoint_fingerprint(_fake_checkpoint(tmp_path / "a", seed=0, n=4096))
    b = rd.checkpoint_fingerprint(_fake_checkpoint(tmp_path / "b", seed=1, n=4096))
    assert a["method"] == b["method"] == "sampled" and a["sha256"] != b["sha256"]
    assert a == rd.checkpoint_fingerprint(_fake_checkpoint(tmp_path / "a2", seed=0, n=4096))
