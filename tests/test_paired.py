"""Paired-by-seed differences of a sweep's losses against a reference loss (experiments/paired.py)."""

from __future__ import annotations

import math
import statistics

import pytest

from vespo_megatron.experiments.paired import paired_differences, paired_table
from vespo_megatron.experiments.sweep import RunSummary


def _s(setting, label, seed, reward, final_eval=0.5, best_eval=0.6, reason=""):
    return RunSummary(name=f"{setting}-{label}-s{seed}", setting=setting, label=label, seed=seed, steps_done=10,
                      steps=10, final_reward=reward, best_reward=reward, final_eval=final_eval,
                      best_eval=best_eval, reason=reason)


def test_paired_differences_and_their_interval_against_a_loop():
    ref = {0: 0.70, 1: 0.60, 2: 0.80}
    shift = {0: -0.011, 1: -0.015, 2: -0.013}  # a small, consistent gap under a large seed spread
    summaries = [_s("n16", "grpo+tis", k, r) for k, r in ref.items()]
    summaries += [_s("n16", "gspo", k, ref[k] + shift[k], final_eval=0.4 + k / 10) for k in ref]
    summaries += [_s("n1", "gspo", 0, 0.5)]  # no reference in that setting: left out
    diffs = paired_differences(summaries)
    assert set(diffs) == {("n16", "gspo")}
    assert {k: round(v["final_reward"], 12) for k, v in diffs[("n16", "gspo")].items()} == shift
    d = list(shift.values())
    mean, half = statistics.fmean(d), 4.303 * statistics.stdev(d) / math.sqrt(3)  # t_{0.975, 2}
    assert half < 0.01 < abs(mean)  # resolved paired, though the unpaired spread is 0.1
    table = paired_table(summaries)
    row = next(line for line in table.splitlines() if line.startswith("| n16 | gspo |"))
    assert f"{mean:+.3f} ± {half:.3f}" in row and row.endswith("| 0,1,2 |")
    assert "| n1 |" not in table


def test_unfinished_runs_are_not_paired_and_one_seed_has_no_interval():
    summaries = [_s("m", "grpo+tis", 0, 0.6), _s("m", "vespo", 0, 0.65), _s("m", "grpo+tis", 1, 0.6),
                 _s("m", "vespo", 1, 0.1, reason="partial"), _s("m", "vespo", 2, 0.7)]
    diffs = paired_differences(summaries)
    assert list(diffs[("m", "vespo")]) == [0]  # seed 1: vespo partial; seed 2: no reference
    row = next(line for line in paired_table(summaries).splitlines() if line.startswith("| m | vespo |"))
    assert "| +0.050 |" in row and "±" not in row
    assert paired_table([_s("m", "vespo", 0, 0.5)]) == ""


@pytest.mark.parametrize("reference", ["vespo", "sapo"])
def test_any_loss_can_be_the_reference(reference):
    summaries = [_s("n1", loss, 0, r) for loss, r in (("vespo", 0.5), ("sapo", 0.4), ("grpo+tis", 0.45))]
    diffs = paired_differences(summaries, reference=reference)
    assert ("n1", reference) not in diffs and len(diffs) == 2
