"""Compare runs of one training command that differ only in how they compute (engine CUDA graphs, the fused loss
head): per-step time, the rollout's share of the step, and whether they made the same run. Not a test.

    python bench/step_variants.py <run_dir> [<run_dir> ...] --reference <name> --out <file stem>

Each run dir holds `<name>.jsonl` (the trainer's per-step records). For each run: median seconds per step and per
rollout over the steps after the first (the first pays one-time costs: CUDA graph captures, kernel autotuning),
the rollout's share of the step, the engine's `generate` inside the rollout (`time/generate_s`), the largest |token log-ratio| of pi against pi_old over all steps (at N = 1 it
is 0 when the old-log-prob pass and the update compute the same numbers), and against the reference run: the
first step whose reward or loss differs (none: the same run, bitwise). Prints a markdown table; writes
<out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics


def _records(run_dir: str) -> list[dict]:
    name = os.path.basename(os.path.normpath(run_dir))
    with open(os.path.join(run_dir, f"{name}.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "time/step_s" in r]  # per-step records (not evaluations)


def _first_difference(a: list[dict], b: list[dict], keys=("reward/mean", "loss")) -> int | None:
    for x, y in zip(a, b, strict=False):
        if any(x.get(k) != y.get(k) for k in keys):
            return int(x["step"])
    return None


def summarize(run_dirs: list[str], reference: str) -> list[dict]:
    runs = {os.path.basename(os.path.normpath(d)): _records(d) for d in run_dirs}
    if reference not in runs:
        raise ValueError(f"--reference: expected one of {sorted(runs)}, got {reference!r}")
    out = []
    for name, rows in runs.items():
        later = rows[1:] or rows
        step = statistics.median(r["time/step_s"] for r in later)
        rollout = statistics.median(r["time/rollout_s"] for r in later)
        generate = (statistics.median(r["time/generate_s"] for r in later)
                    if all("time/generate_s" in r for r in later) else None)  # records since round 13
        out.append(dict(run=name, steps=len(rows), step_s=step, rollout_s=rollout, rollout_share=rollout / step,
                        generate_s=generate,
                        first_step_s=rows[0]["time/step_s"] if rows else None,
                        log_ratio_max=max((abs(r.get("ratio/log_ratio_max", 0.0)) for r in rows), default=0.0),
                        log_ratio_abs_mean_max=max((r.get("ratio/log_ratio_abs_mean", 0.0) for r in rows), default=0.0),
                        first_difference=None if name == reference else _first_difference(rows, runs[reference])))
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--reference", required=True, help="the run the others are compared with (its dir name)")
    p.add_argument("--out", required=True, help="file stem for the .md and .json")
    args = p.parse_args(argv)
    rows = summarize(args.runs, args.reference)
    lines = [f"reference: {args.reference}; medians over the steps after the first", "",
             "| run | steps | first step s | s / step | rollout s / step | engine s / step | rollout share | max abs "
             "token log-ratio | mean abs token log-ratio (max over steps) | first step differing from the reference |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        diff = "-" if r["run"] == args.reference else ("none (same run)" if r["first_difference"] is None
                                                        else str(r["first_difference"]))
        gen = "-" if r["generate_s"] is None else f"{r['generate_s']:.3f}"
        lines.append(f"| {r['run']} | {r['steps']} | {r['first_step_s']:.2f} | {r['step_s']:.3f} | {r['rollout_s']:.3f} | {gen} | "
                     f"{100 * r['rollout_share']:.0f} % | {r['log_ratio_max']:.3g} | {r['log_ratio_abs_mean_max']:.3g} | "
                     f"{diff} |")
    md = "\n".join(lines) + "\n"
    print(md)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
