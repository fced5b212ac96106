"""Plot runs' JSONL metrics (written by `JsonlSink`) to PNGs: one file per panel plus an overview figure.

    python -m vespo_megatron.metrics.plot runs/qwen3-vespo.jsonl --out plots/
    python -m vespo_megatron.metrics.plot runs/vespo.jsonl runs/grpo.jsonl --out plots/compare --smooth 10

Several files draw one line per run (legend: the file name without `.jsonl`). A panel draws the first of its
candidate keys found in a run; keys no run has are skipped with a note. Needs matplotlib (Agg backend,
imported only here): pip install matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Panel", "DEFAULT_PANELS", "read_jsonl", "plot_runs", "main"]


@dataclass(frozen=True)
class Panel:
    """One plot: `series` is a list of (label, candidate keys); the first candidate a run has is drawn."""

    name: str
    title: str
    series: tuple[tuple[str, tuple[str, ...]], ...]
    log_y: bool = False


DEFAULT_PANELS: tuple[Panel, ...] = (
    Panel("reward", "reward (mean)", (("reward", ("reward/mean", "reward_mean", "reward")),)),
    Panel("kl", "KL(rollout || train), k3", (("k3", ("mismatch/kl_k3", "mismatch/k3_kl")),), log_y=True),
    Panel("grad_norm", "gradient norm", (("grad norm", ("grad_norm", "grad_norm_mean", "optim/grad_norm")),),
          log_y=True),
    Panel("response_length", "response length (mean)", (("length", ("response/length_mean", "response_length_mean")),)),
    Panel("phi", "VESPO phi (mean)", (("phi, A >= 0", ("vespo/phi_pos_mean",)),
                                      ("phi, A < 0", ("vespo/phi_neg_mean",)))),
    Panel("entropy", "token entropy (mean)", (("entropy", ("entropy/token_mean", "entropy_mean", "entropy")),)),
)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file; unparsable lines (a crash mid-write) are skipped. When a step appears
    twice (a resume without truncation), the later record wins."""
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue
            by_step[step] = record
    return [by_step[s] for s in sorted(by_step)]


def _series(records: list[dict], candidates: Sequence[str]) -> tuple[str, list[int], list[float]] | None:
    for key in candidates:
        steps, values = [], []
        for r in records:
            v = r.get(key)
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                steps.append(r["step"])
                values.append(float(v))
        if steps:
            return key, steps, values
    return None


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (window 1: unchanged)."""
    if window <= 1:
        return values
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _import_pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    panels: Sequence[Panel] = DEFAULT_PANELS,
    smooth: int = 1,
    names: Sequence[str] | None = None,
    log=print,
) -> list[Path]:
    """Write `<out_dir>/<panel>.png` for every panel some run has data for, and `overview.png` with all of
    them; returns the written paths. `names`: legend labels (default: file stems)."""
    if not paths:
        raise ValueError("plot_runs: expected at least one JSONL file")
    if smooth < 1:
        raise ValueError(f"plot_runs: smooth must be >= 1, got {smooth}")
    names = list(names) if names is not None else [Path(p).stem for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"plot_runs: expected {len(paths)} names, got {len(names)}")
    runs = [(name, read_jsonl(p)) for name, p in zip(names, paths, strict=True)]
    for name, records in runs:
        if not records:
            log(f"note: run {name!r} has no records")

    # panel -> [(legend, steps, values)]
    drawn: list[tuple[Panel, list[tuple[str, list[int], list[float]]]]] = []
    for panel in panels:
        lines = []
        for run_name, records in runs:
            for label, candidates in panel.series:
                found = _series(records, candidates)
                if found is None:
                    continue
                legend = run_name if len(panel.series) == 1 else f"{run_name}: {label}"
                lines.append((legend, found[1], _smooth(found[2], smooth)))
        if lines:
            drawn.append((panel, lines))
        else:
            keys = ", ".join(k for _, cands in panel.series for k in cands)
            log(f"note: skipping {panel.name!r}: no run has {keys}")
    if not drawn:
        log("note: nothing to plot")
        return []

    plt = _import_pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def draw(ax, panel, lines):
        for legend, steps, values in lines:
            ax.plot(steps, values, label=legend, linewidth=1.2, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(panel.title + (f" (moving avg {smooth})" if smooth > 1 else ""))
        ax.set_xlabel("step")
        if panel.log_y and all(v > 0 for _, _, vals in lines for v in vals):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if len(lines) > 1 or len(runs) > 1:
            ax.legend(fontsize=8)

    for panel, lines in drawn:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        draw(ax, panel, lines)
        fig.tight_layout()
        path = out / f"{panel.name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    cols = 2 if len(drawn) > 1 else 1
    rows = math.ceil(len(drawn) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.6 * rows), squeeze=False)
    for ax, (panel, lines) in zip(axes.flat, drawn, strict=False):
        draw(ax, panel, lines)
    for ax in list(axes.flat)[len(drawn):]:
        ax.set_visible(False)
    fig.tight_layout()
    path = out / "overview.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vespo_megatron.metrics.plot", description=__doc__.split("\n")[0])
    parser.add_argument("jsonl", nargs="+", help="run JSONL files (one line per run in each plot)")
    parser.add_argument("--out", required=True, help="output directory for the PNGs")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window in points (default 1: none)")
    parser.add_argument("--name", action="append", default=None,
                        help="legend label of each run, in order (repeat; default: file names)")
    args = parser.parse_args(argv)
    missing = [p for p in args.jsonl if not Path(p).is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    try:
        written = plot_runs(args.jsonl, args.out, smooth=args.smooth, names=args.name,
                            log=lambda msg: print(msg, file=sys.stderr))
    except (ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
