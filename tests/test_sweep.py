"""The sweep runner: config validation, run expansion, resume / skip, the collapse rule, the report.
Training is replaced by a fake runner that writes JSONL records (no process starts)."""

import json
import math
from pathlib import Path

import pytest

from vespo_megatron.experiments import cli as sweep_cli
from vespo_megatron.experiments.sweep import (
    TABLE_COLUMNS,
    CollapseRule,
    SpikeRule,
    SweepConfig,
    expand,
    judge,
    markdown_table,
    mean_ci95,
    ordered,
    plot_settings,
    run_status,
    run_sweep,
    summarize,
    write_report,
)


def _flag(run, name):
    return run.flags[run.flags.index(name) + 1]


def _records(rewards, *, length=2.0, length_max=3.0, grad=1.0):
    return [{"step": i, "loss": -0.1, "reward_mean": r, "grad_norm_mean": grad, "response/length_mean": length,
             "response/length_max": length_max, "mismatch/kl_k3": 1e-4, "entropy_mean": 0.5}
            for i, r in enumerate(rewards)]


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("field,value", [
    ("losses", ("vespo", "nope")), ("losses", ()), ("staleness", (0,)), ("staleness", (3,)), ("seeds", ()),
    ("extras", ("sync",)), ("steps", 0), ("base_flags", ("--loss", "grpo")), ("base_flags", ("--seed=3",)),
    ("name", ""), ("async_lag", 0), ("keep_checkpoints", 0), ("base_flags", ("--keep-checkpoints", "3")), ("async_old_logprobs", ("sglang",)), ("mismatch_fold", 1),
])
def test_config_rejects_bad_fields_by_name(field, value):
    with pytest.raises(ValueError, match=f"SweepConfig.{field}"):
        SweepConfig(**{"name": "t", field: value})


def test_expand_names_and_fixed_rollouts_per_step():
    cfg = SweepConfig(name="t", losses=("vespo", "grpo"), staleness=(1, 8, 64), seeds=(0, 1),
                      extras=("async", "mismatch"), base_flags=("--hidden-size", "32"))
    runs = expand(cfg)
    assert runs == expand(cfg)  # deterministic
    assert len({r.name for r in runs}) == len(runs) == 2 * 3 * 2 + 2 * 2 + 4 * 2
    for r in runs:
        n, mbs = int(_flag(r, "--staleness")), int(_flag(r, "--micro-batch-size"))
        assert (256 // n) % mbs == 0 and mbs <= 32  # samples per rank / N divisible by the micro-batch
        assert _flag(r, "--prompts-per-step") == "32" and _flag(r, "--group-size") == "8"
        assert r.flags[-2:] == ("--hidden-size", "32")
    assert [int(_flag(r, "--micro-batch-size")) for r in runs if r.setting == "n64"] == [4] * 4
    assert {r.label for r in runs if r.setting == "mismatch"} == {"vespo", "vespo+r3", "grpo+tis", "grpo+tis+r3"}
    r3 = next(r for r in runs if r.label == "grpo+tis+r3")
    assert _flag(r3, "--routing-replay") == "r3" and _flag(r3, "--rollout-precision") == "bf16"
    assert _flag(r3, "--rollout-correction") == "tis"
    assert {_flag(r, "--async-lag") for r in runs if r.setting.startswith("async")} == {"4"}
    both = expand(SweepConfig(name="t", losses=("vespo",), staleness=(1,), extras=("async", "mismatch"),
                              async_old_logprobs=("recompute", "engine"), mismatch_fold=True))
    assert [r.name for r in both[1:]] == [
        "async_lag4-vespo-s0", "async_lag4-grpo-s0", "async_lag4_engine-vespo-s0", "async_lag4_engine-grpo-s0",
        "mismatch-vespo-s0", "mismatch-vespo_r3-s0", "mismatch-grpo_tis-s0", "mismatch-grpo_tis_r3-s0",
        "mismatch-vespo_fold-s0", "mismatch-vespo_fold_r3-s0"]
    assert _flag(both[3], "--old-logprobs") == "engine" and _flag(both[-1], "--rollout-correction") == "fold"
    cmd = runs[0].command("/x")
    assert cmd[-4:] == ["--out-dir", "/x", "--run-name", "n1-vespo-s0"]  # the trainer's run dir: /x/n1-vespo-s0
    assert runs[0].jsonl("/x") == Path("/x/n1-vespo-s0/n1-vespo-s0.jsonl")


def test_run_sweep_skips_done_and_restarts_partial(tmp_path):
    cfg = SweepConfig(name="t", losses=("vespo", "grpo"), staleness=(1,), steps=4)
    done, partial = expand(cfg)
    _write(done.jsonl(tmp_path), _records([0.1] * 4))
    _write(partial.jsonl(tmp_path), _records([0.1] * 2))
    assert [run_status(r, tmp_path) for r in (done, partial)] == ["done", "partial"]
    calls = []

    def fake(cmd, log_path):
        calls.append(cmd)
        name = cmd[cmd.index("--run-name") + 1]
        _write(tmp_path / name / f"{name}.jsonl", _records([0.1] * 4))  # the trainer resumes and finishes
        return 0

    outcome = run_sweep(cfg, tmp_path, runner=fake, log=lambda _: None)
    assert outcome == {done.name: "skipped", partial.name: "ok"}
    assert calls == [partial.command(tmp_path)]  # same command: the trainer resumes from its checkpoint
    assert "--checkpoint-every" in calls[0]
    assert calls[0][calls[0].index("--keep-checkpoints") + 1] == "1"  # only the newest is needed to resume
    assert run_sweep(cfg, tmp_path, runner=fake, log=lambda _: None) == {done.name: "skipped",
                                                                        partial.name: "skipped"}
    failing = run_sweep(SweepConfig(name="t", losses=("sapo",), staleness=(1,), steps=4), tmp_path,
                        runner=lambda cmd, log: 3, log=lambda _: None)
    assert failing == {"n1-sapo-s0": "failed (rc 3)"}


def test_runs_out_of_device_memory_start_once_more_at_half_the_jobs(tmp_path):
    """Round 11: 18 runs at once (an H200's count) on an H100; 5 died out of GPU memory (round 12: 20 of 20, 4 of
    them in cuBLAS or NCCL, which the first marker list missed). They now start once more
    after the others, half as many at a time, and resume from their checkpoints; other failures are not retried,
    and an old out-of-memory line from an earlier attempt in the same log does not count."""
    import threading

    cfg = SweepConfig(name="t", losses=("vespo", "grpo", "gspo", "sapo"), staleness=(1,), seeds=(0, 1), steps=4)
    runs = expand(cfg)
    # the three ways round 12's runs died without device memory: torch's allocator, cuBLAS's handle, NCCL's buffers
    oom_once = {runs[0].name: "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 54.00 MiB\n",
                runs[3].name: "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`\n",
                runs[5].name: "[rank0]: Last error:\n[rank0]: Failed to CUDA calloc async 608 bytes\n"}
    broken = runs[1].name
    old_oom = runs[2].name  # its log holds an out-of-memory line from before this sweep
    (runs[2].out_dir(tmp_path)).mkdir(parents=True)
    (runs[2].out_dir(tmp_path) / "train.log").write_text("torch.OutOfMemoryError: CUDA out of memory (old)\n")
    lock, active, peak, calls = threading.Lock(), [0], [], []

    def fake(cmd, log_path):
        name = cmd[cmd.index("--run-name") + 1]
        with lock:
            calls.append(name)
            active[0] += 1
            peak.append((len(calls), active[0]))
        try:
            import time

            time.sleep(0.05)
            with open(log_path, "a") as fh:
                if name in oom_once and calls.count(name) == 1:
                    _write(tmp_path / name / f"{name}.jsonl", _records([0.1] * 2))  # cut: resumes from here
                    fh.write(oom_once[name])
                    return 1
                if name in (broken, old_oom):
                    fh.write("ValueError: something else\n")
                    return 2
                _write(tmp_path / name / f"{name}.jsonl", _records([0.1] * 4))
                return 0
        finally:
            with lock:
                active[0] -= 1

    said = []
    outcome = run_sweep(cfg, tmp_path, runner=fake, log=said.append, jobs=4)
    assert outcome == {r.name: "failed (rc 2)" if r.name in (broken, old_oom) else "ok" for r in runs}
    assert sorted(calls[len(runs):]) == sorted(oom_once)  # retried once each, after the first round
    assert max(a for i, a in peak if i > len(runs)) <= 2 and max(a for _, a in peak) <= 4
    assert any("3 runs ran out of device memory with 4 at a time: once more, 2 at a time" in m for m in said)
    assert sum("resuming" in m for m in said) == 3  # the retries resume (their records are partial)

    def oom(cmd, log_path):  # every attempt runs out of memory
        calls.append(cmd)
        with open(log_path, "a") as fh:
            fh.write("torch.OutOfMemoryError: CUDA out of memory\n")
        return 1

    calls.clear()
    left = run_sweep(cfg, tmp_path, runner=oom, log=lambda _: None, jobs=4, oom_retry=False)
    assert len(calls) == 2 and left[broken] == left[old_oom] == "failed (rc 1)"  # no second attempt
    calls.clear()
    run_sweep(cfg, tmp_path, runner=oom, log=lambda _: None, jobs=4)
    assert len(calls) == 4  # one retry each, not more


def test_collapse_rule():
    rule = CollapseRule()
    assert judge(_records([0.3, 0.4, 0.5, 0.6, 0.6, 0.7, 0.7, 0.8, 0.8, 0.8]), rule) == (False, "")
    collapsed, reason = judge(_records([0.6] * 6 + [0.1] * 4), rule)
    assert collapsed and reason.startswith("reward drop")
    assert judge(_records([0.12] * 6 + [0.04] * 4), rule)[0] is False  # below half, but a drop < 0.1
    nan = _records([0.5] * 10)
    nan[3]["grad_norm_mean"] = math.nan
    assert judge(nan, rule) == (True, "non-finite grad norm at step 3")
    inf = _records([0.5] * 10)
    inf[7]["loss"] = math.inf
    assert judge(inf, rule) == (True, "non-finite loss at step 7")
    long = judge(_records([0.02] * 10, length=2.9, length_max=3.0), rule)
    assert long[0] and long[1].startswith("length at cap")
    assert judge(_records([0.02] * 10, length=1.5, length_max=3.0), rule) == (False, "")


def test_summarize_table_and_plots(tmp_path):
    cfg = SweepConfig(name="t", losses=("vespo", "gspo"), staleness=(1, 8), seeds=(0, 1), steps=10,
                      extras=("async",), async_losses=("vespo",))
    runs = expand(cfg)
    for r in runs:
        if r.label == "gspo" and r.setting == "n8":
            _write(r.jsonl(tmp_path), _records([0.6] * 6 + [0.0] * 4))
        elif r.setting.startswith("async") and r.seed == 1:
            _write(r.jsonl(tmp_path), _records([0.3] * 5))  # partial
        else:
            _write(r.jsonl(tmp_path), _records([0.3 + 0.02 * i + 0.01 * r.seed for i in range(10)]))
    summaries = summarize(cfg, tmp_path)
    by = {(s.setting, s.label, s.seed): s for s in summaries}
    assert by[("n8", "gspo", 0)].collapsed and not by[("n8", "vespo", 1)].collapsed
    assert by[("async_lag4", "vespo", 1)].reason == "partial"
    assert by[("n1", "vespo", 0)].final_reward == pytest.approx(0.3 + 0.02 * 8.5)
    table = markdown_table(summaries)
    assert "| n8 | gspo | 2 | 10/10 | 0.000 ± 0.000 |" in table
    collapsed_col = 1 + TABLE_COLUMNS.index("collapsed")
    async_row = next(line for line in table.splitlines() if line.startswith("| async_lag4 | vespo |"))
    assert "| async_lag4 | vespo | 2 | 5/10 |" in table and async_row.split("|")[collapsed_col].strip() == "0/1"
    # a third seed recorded for n1 only (a seed added to some settings): the others count their 2 recorded seeds
    cfg3 = SweepConfig(name="t", losses=("vespo", "gspo"), staleness=(1, 8), seeds=(0, 1, 2), steps=10,
                       extras=("async",), async_losses=("vespo",))
    for r in expand(cfg3):
        if r.setting == "n1" and r.seed == 2:
            _write(r.jsonl(tmp_path), _records([0.3 + 0.02 * i for i in range(10)]))
    table3 = markdown_table(summarize(cfg3, tmp_path))
    assert "| n1 | vespo | 3 | 10/10 |" in table3
    assert "| n8 | gspo | 2 of 3 | 10/10 | 0.000 ± 0.000 |" in table3
    assert "| async_lag4 | vespo | 2 of 3 | 5/10 |" in table3
    n8 = next(line for line in table3.splitlines() if line.startswith("| n8 | vespo |"))
    assert n8.split("|")[collapsed_col].strip() == "0/2" and "s2: missing" in n8
    written = write_report(cfg, tmp_path, tmp_path / "out", command="python examples/sweep.py --name t")
    names = {p.name for p in written}
    assert {"table.md", "summary.json", "staleness.png", "async.png"} <= names
    assert all(p.stat().st_size > 0 for p in written)


def test_plots_leave_out_settings_without_records(tmp_path, monkeypatch):
    """A slice of a sweep (N = 1 only, no async run yet): no empty N = 8 column, no async figure at all."""
    pytest.importorskip("matplotlib")
    cfg = SweepConfig(name="t", losses=("vespo",), staleness=(1, 8), seeds=(0, 1), steps=4, extras=("async",),
                      async_losses=("vespo",))
    for r in expand(cfg):
        if r.setting == "n1" and r.seed == 0:
            _write(r.jsonl(tmp_path), _records([0.3, 0.4, 0.5, 0.6]))
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    written = {p.name: p for p in plot_settings(cfg, tmp_path, tmp_path / "out")}
    assert set(written) == {"staleness.png"}
    (fig,) = figures
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()][0] == "reward"  # rows keep their names
    assert fig.axes[0].get_title() == "N = 1 (1/2 runs)"
    import matplotlib.image as mpimg

    height, width = mpimg.imread(written["staleness.png"]).shape[:2]
    assert width < height  # one column (3.6 in + margin wide, 13 in tall); two would be wider than tall


def test_plot_colors_follow_the_loss_across_columns(tmp_path, monkeypatch):
    """Round 11's figure: N = 1 had vespo, grpo+tis, gspo and N = 64 grpo+tis and gspo only; the axes' own color
    cycles gave N = 64's grpo+tis vespo's color under a legend of the first column. One color per loss, and a
    legend of every loss drawn anywhere."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    cfg = SweepConfig(name="t", losses=("vespo", "grpo+tis", "gspo"), staleness=(1, 64), seeds=(0,), steps=4)
    recorded = {("n1", "vespo"), ("n1", "grpo+tis"), ("n64", "grpo+tis"), ("n64", "gspo")}
    for r in expand(cfg):
        if (r.setting, r.label) in recorded:
            _write(r.jsonl(tmp_path), _records([0.3, 0.4, 0.5, 0.6]))
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    plot_settings(cfg, tmp_path, tmp_path / "out")
    (fig,) = figures
    n1, n64 = fig.axes[0], fig.axes[1]  # the reward row's two columns
    color = {(ax.get_title(), line.get_label()): line.get_color() for ax in (n1, n64) for line in ax.get_lines()}
    assert color[("N = 1 (2/3 runs)", "grpo+tis")] == color[("N = 64 (2/3 runs)", "grpo+tis")]
    assert len({color[k] for k in color if k[1] != "grpo+tis"} | {color[("N = 1 (2/3 runs)", "grpo+tis")]}) == 3
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["vespo", "grpo+tis", "gspo"]


def test_testbed_preset_runs_and_priority_order():
    cfg = SweepConfig(**sweep_cli.PRESETS["testbed"])
    runs = ordered(expand(cfg), cfg.priority)
    assert len(runs) == 7 * 4 * 3 + 2 * 2 * 3 + 3 * 2 * 3 == 114
    names = [r.name for r in runs]
    first = [f"n{n}-{loss}-s{seed}" for seed in (0, 1, 2) for n in (1, 16, 64)
             for loss in ("vespo", "grpo_tis", "gspo", "sapo")]
    assert names[:36] == first
    assert all(n.startswith("mismatch-") for n in names[36:54])
    assert all(n.startswith("async_lag") for n in names[54:66])
    assert {r.setting for r in runs[54:66]} == {"async_lag4_engine", "async_lag8_engine"}
    assert sorted(names[66:]) == sorted(set(r.name for r in expand(cfg)) - set(names[:66]))  # the rest, once
    assert {r.label for r in runs[36:54]} == {"vespo", "vespo+r3", "grpo+tis", "grpo+tis+r3", "vespo+fold",
                                             "vespo+fold+r3"}
    for r in runs:
        assert r.steps >= 100 and _flag(r, "--hf-checkpoint") == sweep_cli.TESTBED_CHECKPOINT
        assert _flag(r, "--sft-steps") == "0" and _flag(r, "--base") == "testbed"
        assert int(_flag(r, "--prompts-per-step")) * int(_flag(r, "--group-size")) == 256  # 32 x 8 (the fallback)
        n, mbs = int(_flag(r, "--staleness")), int(_flag(r, "--micro-batch-size"))
        assert (256 // n) % mbs == 0
    mism = next(r for r in runs if r.label == "grpo+tis+r3")
    flags = " ".join(mism.flags)
    assert " ".join(sweep_cli.MISMATCH_FLAGS) in flags and "--routing-replay r3" in flags
    assert all(_flag(r, "--old-logprobs") == "engine" for r in runs if r.setting.startswith("async"))
    assert {r.label for r in runs if r.setting.startswith("async")} == {"vespo", "grpo+tis"}


def test_lr_sweep_preset_and_only_orders(capsys):
    runs = expand(SweepConfig(**sweep_cli.PRESETS["lr_sweep"]))
    assert [(r.setting, _flag(r, "--lr"), _flag(r, "--loss"), _flag(r, "--staleness")) for r in runs[::2]] == [
        ("n1_lr1e-06", "1e-06", "grpo", "1"), ("n1_lr3e-06", "3e-06", "grpo", "1"),
        ("n1_lr1e-05", "1e-05", "grpo", "1")]
    with pytest.raises(ValueError, match="SweepConfig.base_flags"):
        SweepConfig(name="t", lrs=(1e-6,), base_flags=("--lr", "1e-3"))
    assert sweep_cli.main(["--preset", "testbed", "--dry-run", "--only", "n16-*-s2", "mismatch-vespo-s0"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    got = [line.split("--run-name ")[1] for line in lines]
    assert got[-1] == "mismatch-vespo-s0" and len(got) == 8
    assert got[:7] == [f"n16-{loss}-s2" for loss in ("vespo", "grpo_tis", "gspo", "sapo", "vespo_sqrt",
                                                    "vespo_lin", "grpo")]  # the globs' order, then expand's

def test_status_lists_done_partial_new_and_the_rest_as_only(tmp_path, capsys):
    cfg = SweepConfig(**sweep_cli.PRESETS["headline"])
    runs = ordered(expand(cfg), cfg.priority)
    _write(runs[0].jsonl(tmp_path), _records([0.1] * runs[0].steps))  # done
    _write(runs[2].jsonl(tmp_path), _records([0.1] * 3))  # partial
    assert sweep_cli.main(["--preset", "headline", "--status", "--runs-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["done", runs[0].name] and lines[2].split() == ["partial", runs[2].name]
    assert [line.split()[0] for line in lines[: len(runs)]].count("new") == len(runs) - 2
    assert lines[len(runs)] == f"# 1 done, 1 partial, {len(runs) - 2} new of {len(runs)} in {tmp_path}"
    left = lines[-1].split()
    assert left[0] == "--only" and left[1:] == [r.name for r in runs[1:]]
    # the list is a valid --only for the same preset: it selects exactly the unfinished runs
    assert sweep_cli.main(["--preset", "headline", "--status", "--runs-dir", str(tmp_path), *left]) == 0
    again = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in again[: len(runs) - 1]] == left[1:]


def test_mean_ci95_against_t_table():
    mean, half = mean_ci95([0.2, 0.3, 0.4])
    assert mean == pytest.approx(0.3) and half == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert mean_ci95([0.5, math.nan])[0] == 0.5 and math.isnan(mean_ci95([0.5])[1])
    big = [float(i % 2) for i in range(100)]
    assert mean_ci95(big)[1] == pytest.approx(1.96 * 0.5025 / 10, rel=1e-3)


def test_spikes_and_eval_pass_at_1_in_summary(tmp_path):
    cfg = SweepConfig(name="t", losses=("vespo",), staleness=(1,), seeds=(0, 1, 2), steps=20)
    evals = {0: [0.2, 0.35, 0.3], 1: [0.25, 0.3, 0.4], 2: [0.2, 0.2, 0.2]}
    for r in expand(cfg):
        records = _records([0.3] * 20)
        for i, v in enumerate(evals[r.seed]):
            records[5 * i + 4]["eval/pass@1"] = v  # evaluations at steps 4, 9, 14
        if r.seed == 1:
            records[12]["grad_norm_mean"] = 8.0  # 8x the median 1.0: a spike
            records[15]["grad_norm_mean"] = 4.0  # 4x: below the factor 5
        _write(r.jsonl(tmp_path), records)
    by = {s.seed: s for s in summarize(cfg, tmp_path)}
    assert [by[i].final_eval for i in range(3)] == [0.3, 0.4, 0.2]
    assert [by[i].best_eval for i in range(3)] == [0.35, 0.4, 0.2]
    assert [by[i].grad_spikes for i in range(3)] == [0, 1, 0]
    assert SpikeRule(factor=3.0).count([1.0] * 10 + [4.0, 1.0]) == 1
    assert SpikeRule().count([1.0, 100.0]) == 0  # too little history to judge
    row = next(line for line in markdown_table(list(by.values())).splitlines() if line.startswith("| n1 |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    col = dict(zip(TABLE_COLUMNS, cells, strict=True))
    m, h = mean_ci95([0.3, 0.4, 0.2])
    assert col["final eval pass@1"] == f"{m:.3f} ± {h:.3f}" and col["grad spikes"] == "1"
    assert col["best eval pass@1"].startswith(f"{(0.35 + 0.4 + 0.2) / 3:.3f} ± ")


def test_report_at_a_common_horizon_reads_only_the_first_steps(tmp_path):
    """Runs cut at different steps are compared at the horizon all reached: a report with steps=H summarises
    steps [0, H) of every run (final window, last evaluation, done / partial), ignoring what came after."""
    full = SweepConfig(name="t", losses=("vespo", "gspo"), staleness=(1,), seeds=(0,), steps=40)
    lengths = {"vespo": 40, "gspo": 27}  # one run finished, one cut at step 27
    for r in expand(full):
        records = _records([0.01 * i for i in range(lengths[r.label])])
        for i in range(9, lengths[r.label], 10):
            records[i]["eval/pass@1"] = 0.1 * (i + 1) / 10  # evaluations at steps 9, 19, (29, 39)
        _write(r.jsonl(tmp_path), records)
    by = {s.label: s for s in summarize(full, tmp_path)}
    assert by["gspo"].reason == "partial" and by["vespo"].steps_done == 40 and by["vespo"].final_eval == pytest.approx(0.4)
    horizon = SweepConfig(name="t", losses=("vespo", "gspo"), staleness=(1,), seeds=(0,), steps=20)
    w = CollapseRule().window_for(20)
    by = {s.label: s for s in summarize(horizon, tmp_path)}
    for label in ("vespo", "gspo"):
        s = by[label]
        assert (s.steps_done, s.reason) == (20, "")
        assert s.final_reward == pytest.approx(sum(0.01 * i for i in range(20 - w, 20)) / w)
        assert s.final_eval == pytest.approx(0.2) and s.best_eval == pytest.approx(0.2)


def test_report_of_a_slice_and_runs_of_two_start_checkpoints(tmp_path, capsys):
    """`--only` with `--report-only`: the table holds the slice's rows, not the sweep's other settings as
    "missing". Runs whose init_checkpoint.json name two different bases make no table: an error names them."""
    cfg = SweepConfig(**sweep_cli.PRESETS["testbed"])
    runs = {r.name: r for r in expand(cfg)}
    for name in ("n1-vespo-s0", "n1-grpo_tis-s0", "n64-grpo_tis-s0"):
        _write(runs[name].jsonl(tmp_path), _records([0.3 + 0.01 * i for i in range(100)]))
        (runs[name].out_dir(tmp_path) / "init_checkpoint.json").write_text(json.dumps({"sha256": "a" * 64}))
    out = tmp_path / "out"
    argv = ["--preset", "testbed", "--report-only", "--runs-dir", str(tmp_path), "--results-dir", str(out)]
    assert sweep_cli.main([*argv, "--only", "n1-*-s0"]) == 0
    table = (out / "table.md").read_text()
    rows = [line for line in table.split("Paired by seed")[0].splitlines() if line.startswith("| n")]
    assert [r.split("|")[1:3] for r in rows] == [[" n1 ", f" {lab} "] for lab in
                                                 ("vespo", "grpo+tis", "gspo", "sapo", "vespo_sqrt", "vespo_lin", "grpo")]
    assert "n64" not in table and "mismatch" not in table and f"sha256 {'a' * 16} (2 runs)" in table
    assert "n64-grpo_tis-s0" not in (out / "command.md").read_text()

    (runs["n64-grpo_tis-s0"].out_dir(tmp_path) / "init_checkpoint.json").write_text(json.dumps({"sha256": "b" * 64}))
    capsys.readouterr()
    assert sweep_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "2 different start checkpoints" in err and f"sha256 {'b' * 12}: 1 runs (n64-grpo_tis-s0)" in err
    assert sweep_cli.main([*argv, "--only", "n1-*"]) == 0  # each base apart
