"""Sweeps of the toy training run (`vespo-train`) for the paper's stability claims: staleness N, fully asynchronous rollouts,
MoE train/inference mismatch with and without routing replay.

A `SweepConfig` expands (`expand`) into named `Run`s, each one subprocess of the toy trainer with its own
run directory `<runs_dir>/<run name>/` (the trainer's `--out-dir <runs_dir> --run-name <name>`: checkpoints,
JSONL and the run's train.log live there).
`run_sweep` runs them one at a time and skips the finished ones; `summarize` reads their JSONL and decides
collapse; `write_report` writes the markdown table and the per-setting plots.

Collapse (also in docs/results/README.md), over the reward series r_0..r_{T-1} of a run with W = max(2, T // 5):
  * non-finite: some step's loss, grad norm or reward is NaN / inf (or missing);
  * reward drop: final = mean of the last W rewards; best = max over all W-step windows of their mean;
    collapsed when final < (1 - drop_frac) * best and best - final >= min_drop (default: 50 %, 0.1 absolute);
  * length blow-up: the mean response length over the last W steps is >= 90 % of the longest response the run
    ever produced (the generation cap, as far as the log shows) while the final reward is below 0.05.
A run with fewer logged steps than asked is reported as partial and is not judged.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vespo_megatron.base.validation import ConfigError
from vespo_megatron.metrics.plot import DEFAULT_PANELS, read_jsonl
from vespo_megatron.training.run_dir import read_init_checkpoint

__all__ = ["SweepConfig", "Run", "RunSummary", "CollapseRule", "SpikeRule", "expand", "ordered", "run_status",
           "run_sweep",
           "summarize", "markdown_table", "plot_settings", "write_report"]

LOSSES = ("vespo", "vespo_sqrt", "vespo_lin", "grpo", "gspo", "sapo", "reinforce", "grpo+tis")
# Sweep labels that are a loss plus a rollout correction (`vespo-train` flags).
_LOSS_FLAGS = {"grpo+tis": ("--loss", "grpo", "--rollout-correction", "tis")}
EXTRAS = ("async", "mismatch")
# Flags the sweep sets itself; base_flags may not carry them.
_OWNED_FLAGS = ("--loss", "--staleness", "--micro-batch-size", "--seed", "--steps", "--out-dir", "--run-name",
                "--checkpoint-every", "--keep-checkpoints", "--no-console", "--threads", "--prompts-per-step",
                "--group-size", "--async-lag", "--rollout-precision", "--routing-replay", "--rollout-correction")
# Each run is one trainer process: `vespo-train`, run as a module of the installed package.
TRAIN_MODULE = "vespo_megatron.training.cli"



@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """What to run. Every (staleness N, loss, seed) is one run; `extras` add settings:
    "async": `async_losses` with `--async-lag async_lag` at N = `async_staleness`, once per `async_old_logprobs`
    (recompute: mu is the trainer's forward at the current weights, so the lag is invisible to the ratio at
    N = 1; engine: mu is the lagged engine's log-probs);
    "mismatch": a bf16 rollout engine against the fp32 trainer, for vespo and grpo + TIS, routing replay off
    and r3 (at N = `mismatch_staleness`); with `mismatch_fold` also vespo with the engine ratio folded into
    log W (`--rollout-correction fold`), off and r3; `mismatch_flags` are the engine flags that make the mismatch.
    `async_lags`: several lags; `lrs`: an lr axis (the lr sweep); `priority`: the order runs start in (name
    globs, first match wins, unmatched runs last, `expand` order within a glob); `init_checkpoint`: an SFT base
    (`--hf-checkpoint DIR --sft-steps 0` on every run).
    Rollouts per step (`prompts_per_step * group_size`) stay fixed across N; the micro-batch is the largest
    divisor of the mini-batch not above `max_micro_batch_size`."""

    name: str
    losses: tuple[str, ...] = ("vespo", "grpo", "gspo", "sapo", "vespo_lin")
    staleness: tuple[int, ...] = (1, 8)
    seeds: tuple[int, ...] = (0,)
    extras: tuple[str, ...] = ()
    async_lag: int = 4
    async_losses: tuple[str, ...] = ("vespo", "grpo")
    async_staleness: int = 1
    async_old_logprobs: tuple[str, ...] = ("recompute",)
    mismatch_fold: bool = False
    mismatch_staleness: int = 1
    mismatch_flags: tuple[str, ...] = ("--rollout-precision", "bf16")
    async_lags: tuple[int, ...] = ()  # several lags (settings async_lag<k>); empty: (async_lag,)
    lrs: tuple[float, ...] = ()  # an lr axis for the staleness rows (settings n<N>_lr<lr>); empty: no --lr
    priority: tuple[str, ...] = ()  # run-name globs: runs start in this order (see `ordered`)
    init_checkpoint: str | None = None  # every run starts from this HF checkpoint (--hf-checkpoint, no SFT)
    steps: int = 20
    prompts_per_step: int = 32
    group_size: int = 8
    max_micro_batch_size: int = 32
    checkpoint_every: int = 5
    # A run resumes from its newest checkpoint only; older ones just fill the disk (round 9: 19 runs of 100
    # steps keeping all ten, twice on one machine, filled its 64 GiB and killed the N = 64 runs).
    keep_checkpoints: int = 1
    threads: int = 1
    base_flags: tuple[str, ...] = ()

    def __post_init__(self):
        if not (isinstance(self.name, str) and self.name and os.sep not in self.name and self.name not in (".", "..")):
            raise ConfigError("SweepConfig", "name", "a non-empty directory name", self.name)
        for fname in ("losses", "async_losses"):
            values = getattr(self, fname)
            if not (isinstance(values, tuple) and all(v in LOSSES for v in values)
                    and len(set(values)) == len(values)):
                raise ConfigError("SweepConfig", fname, f"a tuple of distinct losses from {LOSSES}", values)
        if not self.losses:
            raise ConfigError("SweepConfig", "losses", "at least one loss", self.losses)
        for fname in ("staleness", "seeds"):
            values = getattr(self, fname)
            if not (isinstance(values, tuple) and values and all(isinstance(v, int) for v in values)
                    and len(set(values)) == len(values)):
                raise ConfigError("SweepConfig", fname, "a non-empty tuple of distinct ints", values)
        if not all(1 <= n <= 64 for n in self.staleness):
            raise ConfigError("SweepConfig", "staleness", "values in [1, 64]", self.staleness)
        if not (isinstance(self.extras, tuple) and all(e in EXTRAS for e in self.extras)
                and len(set(self.extras)) == len(self.extras)):
            raise ConfigError("SweepConfig", "extras", f"a tuple of distinct settings from {EXTRAS}", self.extras)
        if not (isinstance(self.async_old_logprobs, tuple) and self.async_old_logprobs
                and set(self.async_old_logprobs) <= {"recompute", "engine"}
                and len(set(self.async_old_logprobs)) == len(self.async_old_logprobs)):
            raise ConfigError("SweepConfig", "async_old_logprobs", "a non-empty tuple from ('recompute', 'engine')",
                       self.async_old_logprobs)
        for fname, kind in (("mismatch_flags", str), ("priority", str)):
            values = getattr(self, fname)
            if not (isinstance(values, tuple) and all(isinstance(v, kind) for v in values)):
                raise ConfigError("SweepConfig", fname, "a tuple of str", values)
        if not (isinstance(self.async_lags, tuple) and all(isinstance(v, int) and v >= 1 for v in self.async_lags)
                and len(set(self.async_lags)) == len(self.async_lags)):
            raise ConfigError("SweepConfig", "async_lags", "a tuple of distinct ints >= 1", self.async_lags)
        if not (isinstance(self.lrs, tuple) and all(isinstance(v, float) and 0 < v < 1 for v in self.lrs)
                and len(set(self.lrs)) == len(self.lrs)):
            raise ConfigError("SweepConfig", "lrs", "a tuple of distinct floats in (0, 1)", self.lrs)
        if self.init_checkpoint is not None and not (isinstance(self.init_checkpoint, str) and self.init_checkpoint):
            raise ConfigError("SweepConfig", "init_checkpoint", "None or a directory", self.init_checkpoint)
        if not isinstance(self.mismatch_fold, bool):
            raise ConfigError("SweepConfig", "mismatch_fold", "a bool", self.mismatch_fold)
        if "async" in self.extras and not self.async_losses:
            raise ConfigError("SweepConfig", "async_losses", "at least one loss with extras 'async'", self.async_losses)
        for fname in ("async_lag", "async_staleness", "mismatch_staleness", "steps", "prompts_per_step",
                      "group_size", "max_micro_batch_size", "checkpoint_every", "keep_checkpoints", "threads"):
            value = getattr(self, fname)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigError("SweepConfig", fname, "a positive int", value)
        for fname in ("async_staleness", "mismatch_staleness"):
            self.micro_batch_size(getattr(self, fname), field_name=fname)
        for n in self.staleness:
            self.micro_batch_size(n, field_name="staleness")
        if not (isinstance(self.base_flags, tuple) and all(isinstance(f, str) for f in self.base_flags)):
            raise ConfigError("SweepConfig", "base_flags", "a tuple of str", self.base_flags)
        owned_flags = (*_OWNED_FLAGS, *(("--lr",) if self.lrs else ()),
                       *(("--hf-checkpoint", "--sft-steps") if self.init_checkpoint else ()))
        owned = [f for f in self.base_flags if f.split("=")[0] in owned_flags]
        if owned:
            raise ConfigError("SweepConfig", "base_flags", f"no flag the sweep sets itself ({', '.join(owned_flags)})",
                              owned)

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    def micro_batch_size(self, n: int, *, field_name: str = "staleness") -> int:
        """Largest divisor of the mini-batch (samples_per_step / n) that is <= max_micro_batch_size."""
        if self.samples_per_step % n:
            raise ConfigError("SweepConfig", field_name, f"N dividing the {self.samples_per_step} rollouts per step", n)
        mini = self.samples_per_step // n
        return max(d for d in range(1, min(mini, self.max_micro_batch_size) + 1) if mini % d == 0)


@dataclass(frozen=True)
class Run:
    """One trainer process. `setting` groups runs into one plot panel (e.g. "n8", "async_lag4", "mismatch");
    `label` is its line in that panel (e.g. "grpo+tis+r3"); `flags` are `vespo-train` flags (no out-dir / name)."""

    name: str
    setting: str
    label: str
    seed: int
    steps: int
    flags: tuple[str, ...]

    def out_dir(self, runs_dir: str | os.PathLike) -> Path:
        """The run's own directory, as the trainer makes it: <runs_dir>/<name>."""
        return Path(runs_dir) / self.name

    def jsonl(self, runs_dir: str | os.PathLike) -> Path:
        return self.out_dir(runs_dir) / f"{self.name}.jsonl"

    def command(self, runs_dir: str | os.PathLike, *, python: str = sys.executable) -> list[str]:
        return [python, "-m", TRAIN_MODULE, *self.flags, "--out-dir", str(runs_dir), "--run-name", self.name]


def _run(cfg: SweepConfig, setting: str, label: str, seed: int, n: int, flags: Sequence[str]) -> Run:
    name = f"{setting}-{label.replace('+', '_')}-s{seed}"
    common = ["--staleness", str(n), "--micro-batch-size", str(cfg.micro_batch_size(n)), "--seed", str(seed),
              "--steps", str(cfg.steps), "--prompts-per-step", str(cfg.prompts_per_step),
              "--group-size", str(cfg.group_size), "--checkpoint-every", str(cfg.checkpoint_every),
              "--keep-checkpoints", str(cfg.keep_checkpoints), "--threads", str(cfg.threads), "--no-console"]
    if cfg.init_checkpoint:
        common += ["--hf-checkpoint", cfg.init_checkpoint, "--sft-steps", "0"]
    return Run(name, setting, label, seed, cfg.steps, (*flags, *common, *cfg.base_flags))


def expand(cfg: SweepConfig) -> list[Run]:
    """The runs of a sweep in a fixed order (staleness by N, then async, then mismatch); names are unique."""
    runs = []
    for n in cfg.staleness:
        for lr in cfg.lrs or (None,):
            setting, lr_flags = (f"n{n}", []) if lr is None else (f"n{n}_lr{lr:g}", ["--lr", repr(lr)])
            for loss in cfg.losses:
                for seed in cfg.seeds:
                    runs.append(_run(cfg, setting, loss, seed, n,
                                     [*_LOSS_FLAGS.get(loss, ("--loss", loss)), *lr_flags]))
    if "async" in cfg.extras:
        for lag in cfg.async_lags or (cfg.async_lag,):
            for old in cfg.async_old_logprobs:
                setting = f"async_lag{lag}" + ("" if old == "recompute" else f"_{old}")
                for loss in cfg.async_losses:
                    for seed in cfg.seeds:
                        runs.append(_run(cfg, setting, loss, seed, cfg.async_staleness,
                                         [*_LOSS_FLAGS.get(loss, ("--loss", loss)), "--async-lag", str(lag),
                                          "--old-logprobs", old]))
    if "mismatch" in cfg.extras:
        variants = (("vespo", ["--loss", "vespo"]),
                    ("grpo+tis", ["--loss", "grpo", "--rollout-correction", "tis"]))
        if cfg.mismatch_fold:
            variants += (("vespo+fold", ["--loss", "vespo", "--rollout-correction", "fold"]),)
        for label, flags in variants:
            for replay in ("off", "r3"):
                for seed in cfg.seeds:
                    runs.append(_run(cfg, "mismatch", label + ("" if replay == "off" else "+r3"), seed,
                                     cfg.mismatch_staleness,
                                     [*flags, *cfg.mismatch_flags, "--routing-replay", replay]))
    names = [r.name for r in runs]
    assert len(set(names)) == len(names), names
    return runs


def ordered(runs: Sequence[Run], globs: Sequence[str]) -> list[Run]:
    """`runs` by the first glob their name matches (fnmatch), unmatched ones last; stable within a glob."""
    def rank(run: Run) -> int:
        return next((i for i, g in enumerate(globs) if fnmatch.fnmatchcase(run.name, g)), len(globs))

    return sorted(runs, key=rank)


def run_status(run: Run, runs_dir: str | os.PathLike) -> str:
    """"done" (the JSONL has every step), "partial" (some) or "new" (none)."""
    path = run.jsonl(runs_dir)
    steps = {r["step"] for r in read_jsonl(path)} if path.is_file() else set()
    if steps >= set(range(run.steps)):
        return "done"
    return "partial" if steps else "new"


def _subprocess_runner(cmd: list[str], log_path: Path) -> int:
    with open(log_path, "a", encoding="utf-8") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def run_sweep(cfg: SweepConfig, runs_dir: str | os.PathLike, *,
              runner: Callable[[list[str], Path], int] = _subprocess_runner,
              python: str = sys.executable, log: Callable[[str], None] = print, jobs: int = 1,
              only: Callable[[Run], bool] | None = None, oom_retry: bool = True) -> dict[str, str]:
    """Run every unfinished run (`jobs` at a time); returns name -> "skipped" | "ok" | "failed (rc N)".
    A partial run is started again with the same command: the trainer resumes from its checkpoint.
    `only(run)` selects a subset (a GPU lease runs a slice of the sweep). `runner(cmd, log_path) ->
    returncode` is the process launcher (tests pass a fake). Runs start in `cfg.priority` order.
    With `oom_retry`, the runs that failed out of device memory (their log's new lines say so: too many runs
    on one GPU, e.g. an H200's count on an H100) start once more after the others, half as many at a time,
    resuming from their checkpoints."""
    if not (isinstance(jobs, int) and jobs >= 1):
        raise ValueError(f"jobs: expected an int >= 1, got {jobs!r}")
    outcome = {}
    runs = [r for r in ordered(expand(cfg), cfg.priority) if only is None or only(r)]
    todo = []
    for i, run in enumerate(runs):
        status = run_status(run, runs_dir)
        if status == "done":
            outcome[run.name] = "skipped"
            log(f"[{i + 1}/{len(runs)}] {run.name}: done, skipped")
        else:
            todo.append((i, run, status))

    def one(item) -> tuple[str, int, bool]:
        i, run, status = item
        out = run.out_dir(runs_dir)
        out.mkdir(parents=True, exist_ok=True)
        cmd = run.command(runs_dir, python=python)
        log(f"[{i + 1}/{len(runs)}] {run.name}: {'resuming' if status == 'partial' else 'starting'}: "
            f"{shlex.join(cmd)}")
        log_path = out / "train.log"
        offset = log_path.stat().st_size if log_path.is_file() else 0
        rc = runner(cmd, log_path)
        oom = bool(rc) and _out_of_memory(log_path, offset)
        if rc:
            log(f"  {run.name} failed with rc {rc}{' (out of device memory)' if oom else ''}; see {log_path}")
        return run.name, rc, oom

    def run_all(items, workers) -> list:
        with ThreadPoolExecutor(max_workers=workers) as pool:  # threads only wait on subprocesses
            results = list(pool.map(one, items))
        for name, rc, _ in results:
            outcome[name] = "ok" if rc == 0 else f"failed (rc {rc})"
        return [item for item, (_, _, oom) in zip(items, results, strict=True) if oom]

    again = run_all(todo, jobs)
    if again and oom_retry:
        workers = max(1, jobs // 2)
        log(f"{len(again)} runs ran out of device memory with {jobs} at a time: once more, {workers} at a time")
        run_all([(i, run, run_status(run, runs_dir)) for i, run, _ in again], workers)
    return outcome


# How a process that found no device memory dies: torch's allocator, cuBLAS creating its handle, NCCL allocating
# its buffers (round 12: 20 runs starting at once on an H100 died all three ways).
OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "Failed to CUDA calloc")


def _out_of_memory(log_path: Path, offset: int) -> bool:
    """Whether the log's lines after `offset` (this attempt's) say the process ran out of device memory."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return False
    return any(marker in text for marker in OOM_MARKERS)


@dataclass(frozen=True)
class CollapseRule:
    """See the module docstring. `window`: W; 0 means max(2, steps // 5)."""

    window: int = 0
    drop_frac: float = 0.5
    min_drop: float = 0.1
    length_frac: float = 0.9
    length_reward: float = 0.05

    def window_for(self, steps: int) -> int:
        return self.window if self.window > 0 else max(2, steps // 5)


@dataclass(frozen=True)
class SpikeRule:
    """A grad-norm spike: a step whose grad norm is > `factor` x the median of the previous `window` steps'
    (counted from the step with at least `min_history` previous ones)."""

    factor: float = 5.0
    window: int = 20
    min_history: int = 5

    def count(self, norms: Sequence[float]) -> int:
        spikes = 0
        for i in range(self.min_history, len(norms)):
            history = [v for v in norms[max(0, i - self.window):i] if math.isfinite(v)]
            if len(history) >= self.min_history and norms[i] > self.factor * statistics.median(history):
                spikes += 1
        return spikes


@dataclass(frozen=True)
class RunSummary:
    name: str
    setting: str
    label: str
    seed: int
    steps_done: int
    steps: int
    final_reward: float  # mean over the last W steps (nan without records)
    best_reward: float  # best W-step window mean
    final: dict[str, float] = field(default_factory=dict)  # other metrics, mean over the last W steps
    collapsed: bool = False
    reason: str = ""  # why collapsed, or "partial" / "missing"
    final_eval: float = math.nan  # held-out pass@1 at the last evaluation (nan: none logged)
    best_eval: float = math.nan  # the best evaluation's pass@1
    grad_spikes: int = 0  # steps flagged by SpikeRule
    base: str | None = None  # sha256 of the checkpoint the run started from (init_checkpoint.json); None: unrecorded


def _value(record: dict, candidates: Sequence[str]) -> float | None:
    for key in candidates:
        v = record.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
    return None


_PANELS = {p.name: p.series[0][1] for p in DEFAULT_PANELS}
_LOSS_KEYS = ("loss",)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def judge(records: list[dict], rule: CollapseRule = CollapseRule(), *, steps: int | None = None) -> tuple[bool, str]:
    """(collapsed, reason) for one run's records (see the module docstring)."""
    if not records:
        return False, "missing"
    for r in records:
        for what, keys in (("loss", _LOSS_KEYS), ("grad norm", _PANELS["grad_norm"]), ("reward", _PANELS["reward"])):
            v = _value(r, keys)
            if v is None or not math.isfinite(v):
                return True, f"non-finite {what} at step {r['step']}"
    rewards = [_value(r, _PANELS["reward"]) for r in records]
    w = min(rule.window_for(steps or len(records)), len(rewards))
    windows = [_mean(rewards[i:i + w]) for i in range(len(rewards) - w + 1)]
    final, best = windows[-1], max(windows)
    if final < (1 - rule.drop_frac) * best and best - final >= rule.min_drop:
        return True, f"reward drop {best:.3f} -> {final:.3f}"
    lengths = [_value(r, _PANELS["response_length"]) for r in records]
    caps = [_value(r, ("response/length_max",)) for r in records]
    caps = [c for c in caps if c is not None]
    if caps and all(v is not None for v in lengths[-w:]):
        tail = _mean(lengths[-w:])
        if tail >= rule.length_frac * max(caps) and final < rule.length_reward:
            return True, f"length at cap ({tail:.2f} of {max(caps):.0f}) with reward {final:.3f}"
    return False, ""


EVAL_KEY = "eval/pass@1"


def summarize(cfg: SweepConfig, runs_dir: str | os.PathLike, rule: CollapseRule = CollapseRule(),
              spikes: SpikeRule = SpikeRule(), only: Callable[[Run], bool] | None = None) -> list[RunSummary]:
    """One summary per run of the sweep, in `expand` order (with `only`: the runs it accepts, the slice that
    `--only` names). Only a run's first `cfg.steps` steps are read: a
    report with fewer steps than the runs made (`--steps H --report-only`) compares every run at the common
    horizon H, e.g. runs that a device call cut at different steps."""
    out = []
    for run in (r for r in expand(cfg) if only is None or only(r)):
        path = run.jsonl(runs_dir)
        records = [r for r in read_jsonl(path) if r["step"] < run.steps] if path.is_file() else []
        w = min(rule.window_for(run.steps), max(len(records), 1))
        rewards = [_value(r, _PANELS["reward"]) for r in records]
        rewards = [v for v in rewards if v is not None]
        tail = records[-w:]
        final = {}
        for name in ("response_length", "kl", "grad_norm", "entropy"):
            vals = [v for v in (_value(r, _PANELS[name]) for r in tail) if v is not None]
            final[name] = _mean(vals)
        best = max((_mean(rewards[i:i + w]) for i in range(len(rewards) - w + 1)), default=math.nan)
        done = len(records)
        if done < run.steps:
            collapsed, reason = judge(records, rule, steps=run.steps) if records else (False, "missing")
            if not collapsed and records:
                reason = "partial"
        else:
            collapsed, reason = judge(records, rule, steps=run.steps)
        evals = [v for v in (_value(r, (EVAL_KEY,)) for r in records) if v is not None]
        norms = [v for v in (_value(r, _PANELS["grad_norm"]) for r in records) if v is not None]
        out.append(RunSummary(run.name, run.setting, run.label, run.seed, done, run.steps,
                              _mean(rewards[-w:]), best, final, collapsed, reason,
                              final_eval=evals[-1] if evals else math.nan,
                              best_eval=max(evals) if evals else math.nan, grad_spikes=spikes.count(norms),
                              base=(read_init_checkpoint(path.parent) or {}).get("sha256")))
    return out


def base_line(summaries: Sequence[RunSummary]) -> str:
    """The report's line on the start checkpoint, or ValueError when its runs started from different ones: their
    rewards and pass rates measure different models, and a paired difference between them means nothing."""
    recorded = [s for s in summaries if s.steps_done]
    bases: dict[str, list[str]] = {}
    for s in recorded:
        if s.base is not None:
            bases.setdefault(s.base, []).append(s.name)
    if len(bases) > 1:
        groups = "; ".join(f"sha256 {sha[:12]}: {len(names)} runs ({', '.join(names[:4])}"
                           + (", ..." if len(names) > 4 else "") + ")" for sha, names in bases.items())
        raise ValueError(f"runs from {len(bases)} different start checkpoints ({groups}): report each apart "
                         "(--only, or its own --runs-dir)")
    if not bases:
        return "Start checkpoint: not recorded (runs from before init_checkpoint.json, or without --init-checkpoint)."
    (sha, names), = bases.items()
    unrecorded = len(recorded) - len(names)
    return (f"Start checkpoint: sha256 {sha[:16]} ({len(names)} runs"
            + (f"; {unrecorded} recorded none" if unrecorded else "") + ").")


# Student t quantiles t_{0.975, df} for df = 1..30 (larger df: the normal's 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % t confidence interval of the mean) over seeds; one value: (v, nan)."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return values[0], math.nan
    n = len(values)
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return statistics.fmean(values), t * statistics.stdev(values) / math.sqrt(n)


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    """mean ± 95 % CI half-width over seeds (one seed: the value)."""
    mean, half = mean_ci95(values)
    if not math.isfinite(mean):
        return "-"
    if not math.isfinite(half):
        return f"{mean:.{digits}g}" if abs(mean) < 1e-2 else f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


TABLE_COLUMNS = ("setting", "loss", "seeds", "steps", "final reward", "best reward", "final eval pass@1",
                 "best eval pass@1", "length", "KL k3", "grad norm", "grad spikes", "entropy", "collapsed", "notes")


def markdown_table(summaries: Sequence[RunSummary]) -> str:
    """One row per (setting, label): held-out pass@1 (last and best evaluation), final / best reward and the
    other final-window metrics as mean ± 95 % CI over seeds, grad-norm spikes (total over seeds), collapsed
    seeds / judged seeds, and the reasons. A seed without a run record (a slice of a sweep, or a seed added for
    some settings only) counts nowhere: "seeds" says "3 of 4" and "steps" is the least over recorded seeds."""
    groups: dict[tuple[str, str], list[RunSummary]] = {}
    for s in summaries:
        groups.setdefault((s.setting, s.label), []).append(s)
    header = TABLE_COLUMNS
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (setting, label), group in groups.items():
        done = [s for s in group if s.reason not in ("partial", "missing")]
        recorded = [s for s in group if s.reason != "missing"]
        steps = f"{min((s.steps_done for s in recorded), default=0)}/{group[0].steps}"
        seeds = str(len(group)) if len(recorded) == len(group) else f"{len(recorded)} of {len(group)}"
        notes = "; ".join(sorted({f"s{s.seed}: {s.reason}" for s in group if s.reason}))
        lines.append("| " + " | ".join([
            setting, label, seeds, steps, _fmt([s.final_reward for s in group]),
            _fmt([s.best_reward for s in group]), _fmt([s.final_eval for s in group]),
            _fmt([s.best_eval for s in group]), _fmt([s.final["response_length"] for s in group], 2),
            _fmt([s.final["kl"] for s in group]), _fmt([s.final["grad_norm"] for s in group]),
            str(sum(s.grad_spikes for s in group)), _fmt([s.final["entropy"] for s in group]),
            f"{sum(s.collapsed for s in done)}/{len(done)}" if done else "-", notes or ""]) + " |")
    return "\n".join(lines) + "\n"


_PLOT_ROWS = (("reward", "reward"), ("eval", "eval pass@1"), ("response_length", "response length"),
              ("kl", "KL k3 (train vs rollout)"), ("grad_norm", "grad norm"), ("entropy", "entropy"))
_PANELS["eval"] = (EVAL_KEY,)


def _is_staleness(setting: str) -> bool:
    return setting[:1] == "n" and setting[1:2].isdigit()


def plot_settings(cfg: SweepConfig, runs_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  only: Callable[[Run], bool] | None = None) -> list[Path]:
    """Paper-style figures: `staleness.png` (one column per N, rows reward / length / KL k3 / grad norm /
    entropy, one line per loss; the mean over seeds with the min-max band), and one figure per extra setting.
    A setting with no run record yet gets no column (a figure with none is not written); a column with fewer
    records than runs says so in its title ("2/3 runs"). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in expand(cfg) if only is None or only(r)]
    # Partial sweeps (a budget cut, a slice per device call) leave settings without records: no empty columns.
    recorded = {r.name for r in runs if r.jsonl(runs_dir).is_file()}
    with_data = [s for s in dict.fromkeys(r.setting for r in runs)
                 if any(r.name in recorded for r in runs if r.setting == s)]
    figures = {"staleness": [s for s in with_data if _is_staleness(s)]}
    for setting in (s for s in with_data if not _is_staleness(s)):
        figures.setdefault(setting.split("_")[0], []).append(setting)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fig_name, settings in ((k, v) for k, v in figures.items() if v):
        # One color per loss for the whole figure (not the axes' own cycle, which shifts when a column lacks a
        # loss), and a legend of every loss drawn in any column.
        shown = [r for r in runs if r.setting in settings and r.name in recorded]
        colors = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(r.label for r in shown))}
        legend: dict[str, object] = {}
        fig, axes = plt.subplots(len(_PLOT_ROWS), len(settings), figsize=(3.6 * len(settings) + 1.2, 13),
                                 squeeze=False, sharex=True)
        for col, setting in enumerate(settings):
            by_label: dict[str, list[list[dict]]] = {}
            for run in (r for r in runs if r.setting == setting):
                path = run.jsonl(runs_dir)
                by_label.setdefault(run.label, []).append(read_jsonl(path) if path.is_file() else [])
            for row, (panel, title) in enumerate(_PLOT_ROWS):
                ax = axes[row][col]
                for label, seed_records in by_label.items():
                    per_step: dict[int, list[float]] = {}
                    for records in seed_records:
                        for r in records:
                            v = _value(r, _PANELS[panel])
                            if v is not None and math.isfinite(v):
                                per_step.setdefault(r["step"], []).append(v)
                    if not per_step:
                        continue
                    xs = sorted(per_step)
                    line, = ax.plot(xs, [_mean(per_step[x]) for x in xs], label=label, linewidth=1.3,
                                    color=colors[label])
                    legend.setdefault(label, line)
                    if len(seed_records) > 1:
                        ax.fill_between(xs, [min(per_step[x]) for x in xs], [max(per_step[x]) for x in xs],
                                        color=line.get_color(), alpha=0.15)
                if panel in ("kl", "grad_norm") and ax.has_data():
                    ax.set_yscale("log")
                ax.grid(True, alpha=0.3)
                if row == 0:
                    heading = setting.replace("n", "N = ", 1) if _is_staleness(setting) else setting
                    of_setting = [r for r in runs if r.setting == setting]
                    done = sum(r.name in recorded for r in of_setting)
                    ax.set_title(heading if done == len(of_setting) else f"{heading} ({done}/{len(of_setting)} runs)")
                if col == 0:
                    ax.set_ylabel(title)
                if row == len(_PLOT_ROWS) - 1:
                    ax.set_xlabel("step")
        labels = [label for label in colors if label in legend]
        handles = [legend[label] for label in labels]
        legend_rows = 0
        if handles:  # as many columns as the figure's width holds (~1.6 in per entry), rows below
            ncol = max(1, min(len(labels), int(fig.get_figwidth() / 1.6)))
            legend_rows = -(-len(labels) // ncol)
            fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9)
        fig.tight_layout(rect=(0, 0.01 + 0.025 * legend_rows, 1, 1))
        path = out / f"{fig_name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def write_report(cfg: SweepConfig, runs_dir: str | os.PathLike, results_dir: str | os.PathLike, *,
                 command: str, rule: CollapseRule = CollapseRule(), spikes: SpikeRule = SpikeRule(),
                 plots: bool = True, only: Callable[[Run], bool] | None = None) -> list[Path]:
    """Write `<results_dir>/table.md` (with the command and the collapse rule), `summary.json` and the plots;
    with `only`, of that slice of the sweep (the table has no rows of runs outside it)."""
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = summarize(cfg, runs_dir, rule, spikes, only=only)
    base = base_line(summaries)  # raises before anything is written when the runs mix start checkpoints
    w = rule.window_for(cfg.steps)
    text = (f"# Sweep `{cfg.name}`\n\nCommand (from the repository root):\n\n```bash\n{command}\n```\n\n"
            f"Final = mean over the last {w} steps; best = best {w}-step window. Collapsed: non-finite loss / "
            f"grad norm / reward, or final < {1 - rule.drop_frac:.0%} of best with a drop >= {rule.min_drop}, or "
            f"mean length >= {rule.length_frac:.0%} of the longest response with final reward < "
            f"{rule.length_reward} (docs/results/README.md). Eval pass@1: held-out, at the last evaluation (final) "
            f"and the best one. Grad spikes: steps with grad norm > {spikes.factor:g}x the median of the previous "
            f"{spikes.window}, summed over seeds. Values: mean ± 95 % CI half-width over seeds (Student t; one "
            f"seed: the value). {base}\n\n"
            + markdown_table(summaries))
    from .paired import DEFAULT_REFERENCE, paired_table  # paired.py imports this module

    paired = paired_table(summaries)
    if paired:
        text += (f"\nPaired by seed: each loss minus {DEFAULT_REFERENCE} at the same seed (the two share their "
                 "rollout sampling seeds), mean ± 95 % CI over the seeds where both finished "
                 "(`experiments/paired.py`).\n\n" + paired)
    table = out / "table.md"
    table.write_text(text, encoding="utf-8")
    summary = out / "summary.json"
    summary.write_text(json.dumps([s.__dict__ for s in summaries], indent=1, default=str) + "\n", encoding="utf-8")
    written = [table, summary]
    if plots:
        written += plot_settings(cfg, runs_dir, out, only=only)
    return written
