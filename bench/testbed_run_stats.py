"""Per-run numbers of a testbed sweep that its table does not show, from the run records (`<runs-dir>/<run>/
<run>.jsonl`): median step and rollout seconds, wall seconds, steps; how far the data went off-policy (mean and max
token log-ratio, VESPO's sequence log-weight range and smallest phi); for each setting and seed, whether its losses
made the same run (the first step where their rewards differ, the largest difference of their grad norms); and
with --against, the same for each run and the run of that name in another directory (another round's code).
Not a test: it prints a table.

    mkdir -p runs/sweeps && tar xzf docs/results/testbed/round8/runs.tar.gz -C runs/sweeps
    python bench/testbed_run_stats.py runs/sweeps/testbed            # every run
    python bench/testbed_run_stats.py runs/sweeps/lr_sweep --no-pairs
    python bench/testbed_run_stats.py runs/round10/testbed --no-pairs --against runs/round9/testbed
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / f"{run_dir.name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def run_row(name: str, rows: list[dict]) -> str:
    def col(key):
        return [r[key] for r in rows if key in r]

    def agg(fn, key):
        values = col(key)
        return fn(values) if values else None

    phi = [min(r["vespo/phi_pos_min"], r["vespo/phi_neg_min"]) for r in rows if "vespo/phi_pos_min" in r]
    cells = [name, str(len(rows)), _fmt(agg(statistics.median, "time/step_s")),
             _fmt(agg(statistics.median, "time/rollout_s")), _fmt(rows[-1]["time"] - rows[0]["time"]),
             _fmt(agg(statistics.fmean, "ratio/log_ratio_abs_mean")), _fmt(agg(max, "ratio/log_ratio_max")),
             _fmt(agg(min, "vespo/log_w_neg_min")), _fmt(agg(max, "vespo/log_w_pos_max")),
             _fmt(min(phi) if phi else None)]
    return "| " + " | ".join(cells) + " |"


def compare(a: list[dict], b: list[dict]) -> str:
    """Two runs' records step by step (over the steps both have): the first step whose reward differs."""
    diff = next((x["step"] for x, y in zip(a, b, strict=False) if x["reward/mean"] != y["reward/mean"]), None)
    gap = max(abs(x["grad_norm_mean"] - y["grad_norm_mean"]) for x, y in zip(a, b, strict=False))
    both = min(len(a), len(b))
    return (f"same reward at every step of {both}" if diff is None else f"rewards differ from step {diff} of {both}") \
        + f"; largest grad-norm difference {gap:.2g}"


def same_run_pairs(runs: dict[str, list[dict]]) -> list[str]:
    """For each setting and seed (`<setting>-<loss>-s<seed>`), each loss against the first one: on-policy (N = 1)
    every loss is the same estimator, and a loss whose weights are exactly 1 (TIS without mismatch) too."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in sorted(runs):
        parts = name.split("-")
        if len(parts) >= 3:
            groups.setdefault((parts[0], parts[-1]), []).append(name)
    lines = []
    for (_, seed), names in sorted(groups.items()):
        for other in names[1:]:
            lines.append(f"{seed}: {names[0]} vs {other}: {compare(runs[names[0]], runs[other])}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir")
    p.add_argument("--no-pairs", action="store_true", help="skip the same-run check between a setting's losses")
    p.add_argument("--against", help="another runs directory: each run against the run of the same name there")
    args = p.parse_args(argv)
    runs = {d.name: rows for d in sorted(Path(args.runs_dir).iterdir()) if d.is_dir() and (rows := _records(d))}
    if not runs:
        print(f"no run records under {args.runs_dir}", file=sys.stderr)
        return 1
    print("| run | steps | median s/step | median rollout s | wall s | mean abs token log-ratio | max token log-ratio "
          "| min log W | max log W | min phi |")
    print("|" + " --- |" * 10)
    for name, rows in runs.items():
        print(run_row(name, rows))
    if not args.no_pairs:
        print()
        for line in same_run_pairs(runs):
            print(line)
    if args.against:
        other = {d.name: rows for d in sorted(Path(args.against).iterdir()) if d.is_dir() and (rows := _records(d))}
        print()
        for name in sorted(set(runs) & set(other)):
            print(f"{name} vs {args.against}: {compare(runs[name], other[name])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
