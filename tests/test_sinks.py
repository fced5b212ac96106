"""Logging sinks (console, JSONL with resume, wandb offline), LoggingConfig validation, the plot command."""

from __future__ import annotations

import io
import json
import math
import re

import pytest
import torch

from vespo_megatron.metrics import ConsoleSink, JsonlSink, LoggingConfig, MetricsLogger, WandbSink
from vespo_megatron.metrics.sinks import format_duration, format_value, resolve_wandb_mode


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- console


def test_format_helpers():
    assert [format_value(v) for v in (0.0, 0.51234, 1234.5, 1.2e-5, 3e7, math.nan)] == [
        "0", "0.5123", "1234", "1.20e-05", "3.00e+07", "nan"]
    assert [format_duration(s) for s in (5, 65, 3725, math.nan)] == ["0:05", "1:05", "1:02:05", "?"]


def test_console_plain_lines():
    clock, out = FakeClock(), io.StringIO()
    sink = ConsoleSink(10, {"reward/mean": "reward", "mismatch/kl_k3": "kl3", "absent": "x"},
                       stream=out, clock=clock)
    assert not sink.is_tty  # StringIO is not a terminal
    clock.now += 4.0
    sink.log(1, {"reward/mean": 0.5, "mismatch/kl_k3": 1.25e-4, "other": 3.0})
    clock.now += 4.0
    sink.log(2, {"reward/mean": 0.625})
    sink.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "step  1/10 0:04<0:36 | reward 0.5 | kl3 1.25e-04",
        "step  2/10 0:08<0:32 | reward 0.625",
    ]


def test_console_shows_a_label_once_when_aliases_are_present():
    sink = ConsoleSink(10, {"reward/mean": "reward", "reward_mean": "reward", "loss": "loss"},
                       stream=io.StringIO(), clock=FakeClock())
    line = sink.format_line(1, {"reward_mean": 0.25, "reward/mean": 0.5, "loss": 1.0})
    assert line.endswith("| reward 0.5 | loss 1")
    assert sink.format_line(2, {"reward_mean": 0.25}).endswith("| reward 0.25")


def test_console_shows_eval_metrics_and_a_dash_for_no_data():
    """Issue 13: eval results never reached the console, and phi- printed `nan` when no advantage was negative."""
    sink = ConsoleSink(10, stream=io.StringIO(), clock=FakeClock())  # the default keys
    line = sink.format_line(1, {"reward/mean": 0.5, "vespo/phi_pos_mean": 0.75, "vespo/phi_neg_mean": float("nan"),
                                "eval/pass@1": 0.25, "eval/mean@4": 0.3, "eval/pass@4": 0.5, "eval/errors": 0.0})
    assert line.endswith("| reward 0.5 | phi+ 0.75 | phi- \u2013 | eval pass@1 0.25 | eval pass@4 0.5 | "
                         "eval mean@4 0.3")
    assert "nan" not in line
    assert "eval" not in sink.format_line(2, {"reward/mean": 0.5})  # steps without eval show none


def test_console_tty_redraws_one_line():
    clock, out = FakeClock(), io.StringIO()
    sink = ConsoleSink(4, ["loss"], stream=out, is_tty=True, bar_width=8, clock=clock)
    sink.log(2, {"loss": 1.5})  # e.g. a resumed run starting at step 2
    clock.now += 10.0
    sink.log(3, {"loss": 1.25})
    text = out.getvalue()
    assert "\n" not in text
    frames = [f.replace("\x1b[K", "") for f in text.split("\r")[1:]]
    assert frames == ["[####....] 2/4 0:00<0:00 | loss 1.5", "[######..] 3/4 0:10<0:05 | loss 1.25"]
    sink.close()
    assert out.getvalue().endswith("\n")


# ------------------------------------------------------------------------------------------------- jsonl


def test_jsonl_writes_and_flushes(tmp_path):
    path = tmp_path / "sub" / "run.jsonl"
    sink = JsonlSink(path)
    sink.log(1, {"a": 1.0, "b": math.nan, "c": math.inf})
    first = records(path)  # flushed before close
    assert first[0]["step"] == 1 and first[0]["a"] == 1.0 and first[0]["b"] is None and first[0]["c"] is None
    assert isinstance(first[0]["time"], float)
    sink.log(2, {"a": 2.0})
    sink.close()
    assert [r["step"] for r in records(path)] == [1, 2]
    with pytest.raises(ValueError, match="reserved"):
        JsonlSink(path).log(3, {"step": 1.0})


def test_jsonl_resume_truncates_later_steps(tmp_path):
    path = tmp_path / "run.jsonl"
    sink = JsonlSink(path)
    for step in range(1, 8):
        sink.log(step, {"loss": float(step)})
    sink.close()
    with open(path, "a") as f:
        f.write('{"step": 8, "lo')  # a crash mid-line
    # the checkpoint was taken after step 4: the resumed run logs from step 5 on
    sink = JsonlSink(path, resume_from_step=5)
    assert [r["step"] for r in records(path)] == [1, 2, 3, 4]
    sink.log(5, {"loss": 50.0})
    sink.close()
    got = records(path)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5] and got[-1]["loss"] == 50.0


def test_jsonl_append_after_partial_line_without_resume(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"step": 1, "x": 1.0}\n{"step": 2, "x"')
    sink = JsonlSink(path)
    sink.log(3, {"x": 3.0})
    sink.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 3 and len(lines) == 3


# ---------------------------------------------------------------------------------------- logger / config


def test_logging_config_validation():
    LoggingConfig(out_dir="x", run_name="r", wandb_mode="online")
    for kwargs, field in [
        (dict(run_name=""), "run_name"),
        (dict(run_name="a/b"), "run_name"),
        (dict(wandb_mode="cloud"), "wandb_mode"),
        (dict(log_interval=0), "log_interval"),
        (dict(console="yes"), "console"),
        (dict(wandb_project=""), "wandb_project"),
        (dict(out_dir=""), "out_dir"),
    ]:
        with pytest.raises(ValueError, match=f"LoggingConfig.{field}"):
            LoggingConfig(**kwargs)
    with pytest.raises(TypeError):
        LoggingConfig("runs")  # keyword-only


def test_logger_from_config_rank0_only_and_interval(tmp_path):
    cfg = LoggingConfig(out_dir=str(tmp_path), run_name="demo", log_interval=3)
    out = io.StringIO()
    other = MetricsLogger.from_config(cfg, total_steps=7, run_config={}, rank=1, stream=out)
    assert other.sinks == [] and not other.should_log(3)
    other.log(3, {"loss": 1.0})
    assert not cfg.jsonl_path.exists()

    with MetricsLogger.from_config(cfg, total_steps=7, run_config={"lr": 1e-6}, rank=0, stream=out) as logger:
        for step in range(1, 8):
            logger.log(step, {"loss": torch.tensor(step / 10, dtype=torch.float64), "n": step})
    assert [r["step"] for r in records(cfg.jsonl_path)] == [3, 6, 7]  # interval and the last step
    assert records(cfg.jsonl_path)[0]["loss"] == pytest.approx(0.3)
    assert len(out.getvalue().splitlines()) == 3
    with pytest.raises(ValueError, match="expected a number"):
        MetricsLogger([], rank=0).log(1, {"bad": "text"})


def test_wandb_mode_resolution(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert resolve_wandb_mode(None) == "online"
    assert resolve_wandb_mode("disabled") == "disabled"
    with pytest.raises(ValueError, match="wandb mode"):
        resolve_wandb_mode("cloud")


def test_wandb_missing_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=re.escape("pip install 'vespo-megatron[wandb]'")):
        WandbSink("p", "r")


def test_wandb_offline_writes_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = LoggingConfig(out_dir=str(tmp_path / "runs"), run_name="offline-demo", console=False, wandb=True)
    logger = MetricsLogger.from_config(cfg, total_steps=2, run_config={"lr": 1e-6, "loss": "vespo"})
    sink = next(s for s in logger.sinks if isinstance(s, WandbSink))
    assert sink.mode == "offline"
    logger.log(1, {"loss": 0.5, "reward/mean": 0.25})
    logger.log(2, {"loss": 0.4, "reward/mean": 0.5})
    logger.close()
    run_dirs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    assert list(run_dirs[0].glob("*.wandb")), sorted(p.name for p in run_dirs[0].iterdir())
    assert cfg.jsonl_path.exists()


# -------------------------------------------------------------------------------------------------- plot


def write_run(path, num_steps, seed, with_phi=True):
    g = torch.Generator().manual_seed(seed)
    sink = JsonlSink(path)
    for step in range(1, num_steps + 1):
        noise = torch.randn(6, generator=g).tolist()
        values = {
            "reward/mean": min(1.0, 0.2 + 0.6 * step / num_steps + 0.05 * noise[0]),
            "mismatch/kl_k3": 1e-3 * math.exp(0.2 * noise[1]),
            "grad_norm": 0.5 + 0.1 * abs(noise[2]),
            "response/length_mean": 300 + 5 * step + 20 * noise[3],
        }
        if with_phi:
            values["vespo/phi_pos_mean"] = 0.9 + 0.02 * noise[4]
            values["vespo/phi_neg_mean"] = 0.7 + 0.02 * noise[5]
        sink.log(step, values)
    sink.close()


def test_plot_command_writes_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from vespo_megatron.metrics import plot

    write_run(tmp_path / "vespo.jsonl", 40, seed=0)
    write_run(tmp_path / "grpo.jsonl", 30, seed=1, with_phi=False)
    out = tmp_path / "plots"
    assert plot.main([str(tmp_path / "vespo.jsonl"), str(tmp_path / "grpo.jsonl"), "--out", str(out),
                      "--smooth", "3"]) == 0
    printed = capsys.readouterr()
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["grad_norm.png", "kl.png", "overview.png", "phi.png", "response_length.png", "reward.png"]
    assert "skipping 'entropy'" in printed.err  # no run logs entropy: a note, not an error
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_plot_missing_file_and_empty(tmp_path):
    pytest.importorskip("matplotlib")
    from vespo_megatron.metrics import plot

    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)])
    (tmp_path / "empty.jsonl").write_text("")
    notes = []
    assert plot.plot_runs([tmp_path / "empty.jsonl"], tmp_path / "out", log=notes.append) == []
    assert any("nothing to plot" in n for n in notes)
