"""`vespo-sweep`: a sweep of training runs (`vespo-train`, the toy run) for the paper's stability claims and write its table and plots.

Simplifications: runs go one after another in this process's machine (one trainer process at a time, each
single-rank); the toy task and model are the ones of `vespo-train` (examples/toy_rl.py). Each run has its own out-dir
`<runs-dir>/<run name>/`; a finished run is skipped, a half-finished one resumes from its checkpoint, so the
same command can be repeated after an interruption. Outputs: `<results-dir>/table.md`, `summary.json`,
`staleness.png`, `async.png`, `mismatch.png`, `command.md`.

The CPU sweep committed in docs/results/cpu/ (about 25 minutes on 2 shared cores), from the repository root:
    .venv/bin/python examples/sweep.py --preset cpu
Only the table and plots again (no training; e.g. after editing the collapse rule):
    .venv/bin/python examples/sweep.py --preset cpu --report-only
The list of runs and their commands, starting nothing:
    .venv/bin/python examples/sweep.py --preset cpu --dry-run
Which runs are done, partial or new under the runs dir, and the `--only` list of the rest (device calls start
on a bare machine: pass that list so that they do not redo finished runs):
    .venv/bin/python examples/sweep.py --preset testbed --status
The GPU-sized sweeps (7 losses, N = 1..64, 2 seeds, async and mismatch; a larger model), run in slices on one
H200 through bench/run_gpu_sweep.sh (docs/results/README.md has the device commands and the verdicts):
    .venv/bin/python examples/sweep.py --preset gpu         # round 1, a+b / a-b over 0..99: nothing learned
    .venv/bin/python examples/sweep.py --preset gpu_easy    # round 2, a+b over 0..20, so the model learns;
                                                            # only seed 0 at N = 1, 16, 64 (64 partial) ran
Their reports (docs/results/gpu, docs/results/gpu_easy) from the runs brought back from the device:
    .venv/bin/python examples/sweep.py --preset gpu --report-only --runs-dir runs/sweeps/gpu \\
        --results-dir docs/results/gpu
    .venv/bin/python examples/sweep.py --preset gpu_easy --seeds 0 --staleness 1 16 64 --report-only \\
        --runs-dir runs/sweeps/gpu_easy --results-dir docs/results/gpu_easy
The issue-17 testbed (scratchpad addition with 30-300 token answers, a 4-layer 8-expert MoE from an SFT base,
32 x 8 rollouts, Adam at the lr picked by `lr_sweep`, 100 steps, 3 seeds; docs/testbed.md):
    python examples/testbed_sft.py                               # the SFT base, cached in runs/testbed/sft/hf
    .venv/bin/python examples/sweep.py --preset lr_sweep --jobs 6           # GRPO at N = 1, lr 1e-6 / 3e-6 / 1e-5
    .venv/bin/python examples/sweep.py --preset testbed --jobs 8            # 114 runs, in TESTBED_PRIORITY order
    .venv/bin/python examples/sweep.py --preset testbed --only 'n16-*' 'n1-*' --jobs 8   # a slice, in this order
    .venv/bin/python examples/sweep.py --preset cpu_smoke --runs-dir /tmp/smoke      # CI: 2 runs of 2 steps
Own sizes (anything after `--` goes to every training run, e.g. model size):
    .venv/bin/python examples/sweep.py --name mine --losses vespo grpo --staleness 1 4 --seeds 0 1 --steps 30 \\
        --extras async -- --hidden-size 128
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import shlex
import sys
from pathlib import Path

from vespo_megatron.experiments.sweep import SweepConfig, expand, ordered, run_status, run_sweep, write_report
from vespo_megatron.experiments.testbed import TINY_MODEL_FLAGS

# What the two GPU presets share: 7 losses x N in {1, 4, 16, 64} x 2 seeds, async and mismatch, 30 steps.
_GPU_SWEEP = dict(losses=("vespo", "grpo", "gspo", "sapo", "grpo+tis", "vespo_sqrt", "vespo_lin"),
                  staleness=(1, 4, 16, 64), seeds=(0, 1), extras=("async", "mismatch"), async_lag=4,
                  async_old_logprobs=("recompute", "engine"), mismatch_fold=True, steps=30, checkpoint_every=10,
                  threads=1)
_GPU_MODEL = ("--hidden-size", "128", "--num-layers", "4", "--num-experts", "8", "--moe-ffn-hidden-size", "64")

# ---- the issue-17 testbed ----------------------------------------------------------------------------------
# The SFT base every testbed run starts from (examples/testbed_sft.py writes it; relative to the repository root).
TESTBED_CHECKPOINT = "runs/testbed/sft/hf"
# The engine flags of the injected train/inference mismatch (issue 17 part 2: bf16 engine, fp8 quantise-
# dequantise of the GEMMs with per-row scales, router-logit noise). One place, so the lead can rename them.
MISMATCH_FLAGS = ("--rollout-precision", "bf16", "--rollout-fp8", "per_row", "--rollout-router-noise", "0.0")
TESTBED_LOSSES = ("vespo", "grpo+tis", "gspo", "sapo", "vespo_sqrt", "vespo_lin", "grpo")
TESTBED_SEEDS = (0, 1, 2)


def _name(label: str) -> str:
    return label.replace("+", "_")


# The order runs start in (issue 17 part 7): vespo, grpo+tis, gspo, sapo at N = 1, 16, 64 (seed by seed, so a
# budget cut leaves whole seeds); then the mismatch rows; then async; then everything else (unmatched: last).
TESTBED_PRIORITY = (*(f"n{n}-{_name(loss)}-s{seed}" for seed in TESTBED_SEEDS for n in (1, 16, 64)
                      for loss in ("vespo", "grpo+tis", "gspo", "sapo")),
                    "mismatch-*", "async_*")

# 32 prompts x 8 samples per rollout batch (the fallback from 64 x 8 "if the budget demands it"): at
# 32 x 8, 7 runs sharing one H200 make ~95 steps in 322 s (docs/results/testbed/README.md), so a device call
# of < 10 minutes can finish its runs; at 64 x 8 it could not. Micro-batches of up to 128 samples: the testbed's
# steps are bound by the host (kernel launches per micro-batch), not by the GPU, so fewer, larger micro-batches
# are faster; the loss is normalised over the whole mini-batch upstream, so the split does not change it. The
# forward-only old-log-prob pass stays at 128 samples a micro-batch when N shrinks the update's (N = 64: 2 packs,
# not 64); added after round 8, whose N = 16 runs made that pass in the update's micro-batches. The evaluation
# after the last step draws 16 samples per held-out prompt instead of 4 (--eval-final-k; after round 8): the
# final eval pass@1 a comparison reads then has half the sampling noise.
_TESTBED = dict(prompts_per_step=32, group_size=8, max_micro_batch_size=128, steps=100, checkpoint_every=10,
                threads=1, init_checkpoint=TESTBED_CHECKPOINT,
                base_flags=("--base", "testbed", "--logprob-micro-batch-size", "128", "--eval-final-k", "16"))

PRESETS = {
    # 20 runs of 30 steps (~55 s each on one shared core): five losses at N = 1 and 16, two async pairs (mu
    # recomputed / the engine's), six mismatch runs.
    "cpu": dict(name="cpu", losses=("vespo", "grpo", "gspo", "sapo", "vespo_lin"), staleness=(1, 16), seeds=(0,),
                extras=("async", "mismatch"), async_lag=4, async_old_logprobs=("recompute", "engine"),
                mismatch_fold=True, steps=30, checkpoint_every=10, threads=1),
    # One-GPU leases (bench/run_gpu_sweep.sh; docs/results/README.md has the commands): a model 8x the CPU
    # one (4 layers, hidden 128, 8 experts top-2), answers of up to 4 tokens + <eos> (a+b and a-b, 0..99).
    "gpu": dict(name="gpu", **_GPU_SWEEP, base_flags=(*_GPU_MODEL, "--max-operand", "99", "--ops", "+-",
                                                      "--sft-steps", "40", "--sft-micro-batch-size", "32")),
    # Round 2 on one GPU: the `gpu` preset with an easier task (a+b, 0..20: answers of up to 2 digits + <eos>)
    # so that the model learns at all (round 1's reward stayed < 0.015). Chosen for a non-zero reward, not to
    # make the claims appear; same model, losses, N, seeds, steps, async and mismatch settings as `gpu`. SFT
    # warm start raised from 40 to 100 steps: with 40 the reward after SFT was 0.086 / 0.043 (2 RL steps, CPU
    # check), with 100 it was 0.418 / 0.312.
    "gpu_easy": dict(name="gpu_easy", **_GPU_SWEEP, base_flags=(*_GPU_MODEL, "--max-operand", "20", "--ops", "+",
                                                                "--sft-steps", "100", "--sft-micro-batch-size", "32")),
    # Issue 17: 7 losses x N in {1, 4, 16, 64} x 3 seeds (84), async lag 4 and 8 with mu from the engine for
    # vespo and grpo+tis (12), the injected mismatch for vespo / grpo+tis / vespo+fold without and with R3 (18):
    # 114 runs of 100 steps, 32 prompts x 8 samples, from the SFT base; they start in TESTBED_PRIORITY order.
    "testbed": dict(name="testbed", **_TESTBED, losses=TESTBED_LOSSES, staleness=(1, 4, 16, 64),
                    seeds=TESTBED_SEEDS, extras=("async", "mismatch"), async_lags=(4, 8),
                    async_losses=("vespo", "grpo+tis"), async_old_logprobs=("engine",), async_staleness=1,
                    mismatch_fold=True, mismatch_staleness=1, mismatch_flags=MISMATCH_FLAGS,
                    priority=TESTBED_PRIORITY),
    # The testbed's lr, picked once: GRPO at N = 1 over 1e-6, 3e-6, 1e-5, 2 seeds (6 runs). Rule (docs/testbed.md):
    # the lr with the highest mean final eval pass@1 among those with no collapsed seed; it becomes
    # training/cli.py's TESTBED_LR for every loss.
    "lr_sweep": dict(name="lr_sweep", **_TESTBED, losses=("grpo",), staleness=(1,), seeds=(0, 1),
                     lrs=(1e-6, 3e-6, 1e-5)),
    # `examples/compare_losses.sh --preset gpu`: the headline on one GPU: vespo, grpo+tis, gspo, sapo at N = 1 and
    # 16 on the testbed, 3 seeds (24 runs), so that the report has CIs and the differences paired by seed. On one
    # H200 16 such runs at once took ~250 s (N = 1) to ~360 s (N = 16) in round 8: ~15 minutes with the SFT base
    # (an estimate, not yet timed as one command).
    "headline": dict(name="headline", **_TESTBED, losses=("vespo", "grpo+tis", "gspo", "sapo"), staleness=(1, 16),
                     seeds=TESTBED_SEEDS),
    # CI: the testbed's path end to end at toy size (2 runs x 2 steps, eval every step, a tiny model from
    # scratch; `--init-checkpoint DIR` starts them from a tiny SFT base instead).
    "cpu_smoke": dict(name="cpu_smoke", losses=("vespo", "grpo+tis"), staleness=(1,), seeds=(0,), steps=2,
                      prompts_per_step=4, group_size=2, max_micro_batch_size=8, checkpoint_every=1, threads=1,
                      base_flags=("--base", "testbed", *TINY_MODEL_FLAGS, "--levels", "3", "--eval-count", "4",
                                  "--eval-k", "2", "--eval-every", "1")),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a named sweep; flags below override it")
    p.add_argument("--name", default=None, help="sweep name (results in docs/results/<name>)")
    p.add_argument("--losses", nargs="+", default=None)
    p.add_argument("--staleness", nargs="+", type=int, default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--extras", nargs="*", default=None, help="async, mismatch")
    p.add_argument("--async-lag", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--prompts-per-step", type=int, default=None,
                   help="prompts per rollout batch (testbed: 64; 32 if the budget demands it)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (0: torch default)")
    p.add_argument("--init-checkpoint", default=None, metavar="DIR",
                   help="start every run from this HF checkpoint (an SFT base), no SFT warm start")
    p.add_argument("--runs-dir", default=None, help="default runs/sweeps/<name>")
    p.add_argument("--results-dir", default=None, help="default docs/results/<name>")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (one GPU holds many toy runs)")
    p.add_argument("--only", nargs="+", default=None, metavar="GLOB",
                   help="run only the runs whose name matches one of these globs (e.g. 'n64-*' '*-s0'), "
                        "started in the order of the globs; the report (table, plots) covers only these runs")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their commands, start nothing")
    p.add_argument("--status", action="store_true",
                   help="which runs under --runs-dir are done / partial / new (in start order), then an --only "
                        "list of the unfinished ones: the next slice for a machine that starts without them")
    p.add_argument("--report-only", action="store_true", help="write table and plots from the existing runs")
    p.add_argument("base_flags", nargs="*",
                   help="after --: flags for every training run, in place of the preset's own (--dry-run prints "
                        "them: repeat those you keep)")
    return p.parse_args(argv)


def _print_status(cfg: SweepConfig, runs_dir: Path, only) -> int:
    runs = [r for r in ordered(expand(cfg), cfg.priority) if only is None or only(r)]
    status = {r.name: run_status(r, runs_dir) for r in runs}
    for run in runs:
        print(f"{status[run.name]:8s}{run.name}")
    counts = {k: sum(v == k for v in status.values()) for k in ("done", "partial", "new")}
    print(f"# {counts['done']} done, {counts['partial']} partial, {counts['new']} new of {len(runs)} in {runs_dir}")
    left = [r.name for r in runs if status[r.name] != "done"]
    if left:
        print("--only " + " ".join(left))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    fields = dict(PRESETS[args.preset]) if args.preset else {}
    for key in ("name", "losses", "staleness", "seeds", "extras", "async_lag", "steps", "threads", "init_checkpoint",
                "prompts_per_step"):
        value = getattr(args, key)
        if value is not None:
            fields[key] = tuple(value) if isinstance(value, list) else value
    if args.base_flags:
        fields["base_flags"] = tuple(args.base_flags)
    if "name" not in fields:
        print("error: give --preset or --name", file=sys.stderr)
        return 2
    if fields.get("threads") == 0:
        fields.pop("threads")  # SweepConfig wants a positive int; the trainer's 0 means the torch default
    try:
        cfg = SweepConfig(**fields)
    except (TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs_dir = Path(args.runs_dir or Path("runs") / "sweeps" / cfg.name)
    results_dir = Path(args.results_dir or Path("docs") / "results" / cfg.name)
    if args.only:  # the given globs decide the order too
        cfg = dataclasses.replace(cfg, priority=tuple(args.only))
    only = None if not args.only else (lambda run: any(fnmatch.fnmatchcase(run.name, g) for g in args.only))
    if args.status:
        return _print_status(cfg, runs_dir, only)
    if args.dry_run:
        print(dataclasses.asdict(cfg))
        for run in ordered(expand(cfg), cfg.priority):
            if only is None or only(run):
                print(shlex.join(run.command(runs_dir)))
        return 0
    if not args.report_only:
        outcome = run_sweep(cfg, runs_dir, jobs=args.jobs, only=only)
        failed = {k: v for k, v in outcome.items() if v.startswith("failed")}
        if failed:
            print(f"failed runs: {failed}", file=sys.stderr)
    command = shlex.join(["python", "examples/sweep.py", *[a for a in argv if a != "--report-only"]])
    try:
        written = write_report(cfg, runs_dir, results_dir, command=command, only=only)  # a slice: its rows only
    except ValueError as e:  # runs of two start checkpoints
        print(f"error: {e}", file=sys.stderr)
        return 2
    (results_dir / "command.md").write_text(
        f"From the repository root:\n\n```bash\n{command}\n```\n\nTable and plots only, from existing runs:\n\n"
        f"```bash\n{command} --report-only\n```\n\nRuns (one trainer process each):\n\n```bash\n"
        + "\n".join(shlex.join(["python", *r.command(Path('runs/sweeps') / cfg.name, python='')[1:]])
                    for r in expand(cfg) if only is None or only(r))
        + "\n```\n", encoding="utf-8")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
