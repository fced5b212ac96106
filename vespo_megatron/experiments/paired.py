"""Paired comparisons of a sweep's losses: the per-seed difference to a reference loss in the same setting.

Runs of one seed share their rollout sampling seeds (`training/samples.py: sampling_seed` depends on the run
seed, the step and the rank, not on the loss), so two losses at the same seed start from the same samples and
much of their noise is common. The difference taken seed by seed, then its mean ± 95 % t interval over the
seeds, is then a sharper yardstick than comparing two unpaired intervals (round 8 of the testbed: final reward
gspo - grpo+tis at N = 16 is -0.013 ± 0.005 paired, while the unpaired intervals ±0.008 and ±0.004 touch).

Table: one row per (setting, loss != reference) with at least one seed where both runs finished; columns
"Δ final reward", "Δ final eval pass@1", "Δ best eval pass@1", mean ± 95 % CI over the paired seeds (reduction:
mean over seeds of per-seed differences; one seed: the difference), and the seeds used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .sweep import RunSummary, mean_ci95

__all__ = ["paired_differences", "paired_table", "DEFAULT_REFERENCE", "PAIRED_METRICS"]

DEFAULT_REFERENCE = "grpo+tis"  # the baseline: "VESPO vs GRPO + TIS"
# (column, RunSummary field)
PAIRED_METRICS = (("Δ final reward", "final_reward"), ("Δ final eval pass@1", "final_eval"),
                  ("Δ best eval pass@1", "best_eval"))


def _finished(s: RunSummary) -> bool:
    return s.reason not in ("partial", "missing")


def paired_differences(summaries: Sequence[RunSummary], reference: str = DEFAULT_REFERENCE
                       ) -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    """{(setting, label): {seed: {field: label's value - reference's value}}} over the seeds where both runs
    finished; settings without the reference loss, and the reference itself, are left out."""
    finished = {(s.setting, s.label, s.seed): s for s in summaries if _finished(s)}
    out: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for (setting, label, seed), s in finished.items():
        ref = finished.get((setting, reference, seed))
        if label == reference or ref is None:
            continue
        out.setdefault((setting, label), {})[seed] = {
            f: getattr(s, f) - getattr(ref, f) for _, f in PAIRED_METRICS}
    return out


def _fmt(values: Sequence[float]) -> str:
    mean, half = mean_ci95(values)
    if not math.isfinite(mean):
        return "-"
    return f"{mean:+.3f}" if not math.isfinite(half) else f"{mean:+.3f} ± {half:.3f}"


def paired_table(summaries: Sequence[RunSummary], reference: str = DEFAULT_REFERENCE) -> str:
    """The markdown table of `paired_differences` (empty string when no pair exists)."""
    diffs = paired_differences(summaries, reference)
    if not diffs:
        return ""
    header = ("setting", "loss", *(name for name, _ in PAIRED_METRICS), "seeds")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    order = list(dict.fromkeys((s.setting, s.label) for s in summaries))
    for key in (k for k in order if k in diffs):
        per_seed = diffs[key]
        seeds = sorted(per_seed)
        cells = [_fmt([per_seed[seed][f] for seed in seeds]) for _, f in PAIRED_METRICS]
        lines.append("| " + " | ".join([*key, *cells, ",".join(map(str, seeds))]) + " |")
    return "\n".join(lines) + "\n"
