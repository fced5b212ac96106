"""Where the finalized numbers of each step go: console, a JSONL file, Weights & Biases.

A sink is anything with `log(step, values)` and `close()`. `MetricsLogger` fans one step's values out to its
sinks on global rank 0 only (the caller passes its rank; nothing here reads torch.distributed) and every
`log_interval` steps (`should_log` lets the caller skip the reductions on the other steps).

    logger = MetricsLogger.from_config(LoggingConfig(out_dir="runs", run_name="qwen3-vespo"),
                                       total_steps=500, run_config=asdict(cfg), rank=rank)
    for step in range(1, 501):
        ...
        if logger.should_log(step):
            logger.log(step, finalize_mismatch(reduced_metrics) | {"grad_norm": grad_norm})
    logger.close()
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO, runtime_checkable

__all__ = ["Sink", "ConsoleSink", "JsonlSink", "WandbSink", "LoggingConfig", "MetricsLogger", "DEFAULT_CONSOLE_KEYS"]

# key -> short label shown on the console (the keys present in a step are shown, in this order; where
# several keys share a label, the first present one); the underscore names are the ones
# `vespo_megatron.training.trainer` logs today
DEFAULT_CONSOLE_KEYS: dict[str, str] = {
    "loss": "loss",
    "reward/mean": "reward",
    "mismatch/kl_k3": "kl3",
    "mismatch/k3_kl": "kl3",
    "grad_norm": "gnorm",
    "grad_norm_mean": "gnorm",
    "response/length_mean": "len",
    "response_length_mean": "len",
    "entropy/token_mean": "ent",
    "entropy_mean": "ent",
    "vespo/phi_pos_mean": "phi+",
    "vespo/phi_neg_mean": "phi-",
    # held-out evaluation (on the steps that evaluate); a key ending in "*" matches every key with that
    # prefix, labelled with the label plus the rest of the key: "eval pass@1", "eval pass@4", "eval mean@4"
    "eval/pass@*": "eval pass@",
    "eval/mean@*": "eval mean@",
}

NO_DATA = "\u2013"  # shown for a NaN: the metric had no data this step (e.g. phi- with no negative advantage)

WANDB_MODES = ("offline", "online", "disabled")


@runtime_checkable
class Sink(Protocol):
    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def _to_float(name: str, value: Any) -> float:
    if hasattr(value, "item"):  # 0-d tensors and numpy scalars
        value = value.item()
    if isinstance(value, bool | int | float):
        return float(value)
    raise ValueError(f"metric {name!r}: expected a number, got {type(value).__name__}")


def format_value(value: float) -> str:
    """Compact number: 4 significant digits, scientific outside [1e-3, 1e5)."""
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.2e}"


def format_duration(seconds: float) -> str:
    """h:mm:ss, or m:ss under an hour; '?' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ConsoleSink:
    """One line per step: a progress bar, step/total, elapsed and ETA, and a few chosen values.

    On a terminal the line is redrawn in place (carriage return) and a newline ends it at the last step or on
    close; otherwise (a log file, a pipe) each step prints its own plain line without the bar.
    ETA = elapsed / steps done since the first logged step * steps left (so a resumed run estimates from its
    own pace). `keys`: a mapping key -> label or a sequence of keys (label = key); absent keys are skipped.
    """

    def __init__(
        self,
        total_steps: int,
        keys: Mapping[str, str] | Sequence[str] | None = None,
        *,
        stream: TextIO | None = None,
        is_tty: bool | None = None,
        bar_width: int = 20,
        clock=time.monotonic,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"ConsoleSink.total_steps: expected >= 1, got {total_steps}")
        self.total_steps = total_steps
        if keys is None:
            keys = DEFAULT_CONSOLE_KEYS
        self.keys = dict(keys) if isinstance(keys, Mapping) else {k: k for k in keys}
        self.stream = stream if stream is not None else sys.stdout
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)()) if is_tty is None else is_tty
        self.bar_width = bar_width
        self._clock = clock
        self._start = clock()
        self._first_step: int | None = None
        self._open_line = False

    def format_line(self, step: int, values: Mapping[str, float]) -> str:
        now = self._clock()
        if self._first_step is None:
            self._first_step = step - 1  # the step just logged counts as done
        elapsed = now - self._start
        done = step - self._first_step
        eta = elapsed / done * max(self.total_steps - step, 0) if done > 0 else math.nan
        width = len(str(self.total_steps))
        head = f"{step:>{width}}/{self.total_steps} {format_duration(elapsed)}<{format_duration(eta)}"
        if self.is_tty:
            filled = min(self.bar_width, int(self.bar_width * step / self.total_steps))
            head = f"[{'#' * filled}{'.' * (self.bar_width - filled)}] {head}"
        else:
            head = f"step {head}"
        shown: dict[str, str] = {}  # label -> text: the first present key of a label wins (aliases)
        for pattern, base_label in self.keys.items():
            if pattern.endswith("*"):
                matches = [(k, base_label + k[len(pattern) - 1:]) for k in values if k.startswith(pattern[:-1])]
            else:
                matches = [(pattern, base_label)] if pattern in values else []
            for key, label in matches:
                if label not in shown:
                    value = values[key]
                    shown[label] = f"{label} {NO_DATA if math.isnan(value) else format_value(value)}"
        return " | ".join([head, *shown.values()])

    def log(self, step: int, values: Mapping[str, float]) -> None:
        line = self.format_line(step, values)
        if self.is_tty:
            end = "\n" if step >= self.total_steps else ""
            self.stream.write(f"\r{line}\x1b[K{end}")
            self._open_line = not end
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


class JsonlSink:
    """One JSON object per line, `{"step": ..., "time": <unix seconds>, **values}`, flushed per line.

    Non-finite values are written as null (strict JSON). The file is opened in append mode; with
    `resume_from_step`, lines whose step is >= it (written after the checkpoint being resumed) are dropped
    first, as is a partial last line left by a crash, so the resumed run continues the same file cleanly.
    `resume_from_step=0` (a fresh start) never drops records: an old file with records is moved aside.
    """

    def __init__(self, path: str | os.PathLike, resume_from_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_step == 0 and self._has_records():
            self._move_aside()  # a fresh start over an old file: keep it whole (never truncate to 0 lines)
        elif resume_from_step is not None and self.path.exists():
            self._truncate(resume_from_step)
        elif self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
            if needs_newline:  # a crash mid-line: do not glue the next record onto it
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write("\n")
        self._file: TextIO | None = open(self.path, "a", encoding="utf-8")

    def _has_records(self) -> bool:
        if not self.path.is_file():
            return False
        with open(self.path, encoding="utf-8", errors="replace") as f:
            return any(line.strip() for line in f)

    def _move_aside(self) -> None:
        """Rename the old file to `<name>.jsonl.<n>.old` (the first free n) and say so on stderr."""
        n = 1
        while (aside := self.path.with_name(f"{self.path.name}.{n}.old")).exists():
            n += 1
        os.replace(self.path, aside)
        print(f"note: {self.path} held records of an earlier start of this run but the run starts from step 0 "
              f"(no checkpoint to resume from); the old records were moved to {aside}", file=sys.stderr, flush=True)

    def _truncate(self, resume_from_step: int) -> None:
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    step = int(record["step"])
                except (ValueError, KeyError, TypeError):
                    continue  # partial or foreign line
                if step < resume_from_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        assert self._file is not None, "JsonlSink.log after close"
        for reserved in ("step", "time"):
            if reserved in values:
                raise ValueError(f"JsonlSink: metric name {reserved!r} is reserved")
        record = {"step": int(step), "time": time.time()}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def resolve_wandb_mode(mode: str | None) -> str:
    """`mode` if given, else the user's WANDB_MODE if it is one we know, else "offline"."""
    if mode is None:
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        mode = env if env in WANDB_MODES else "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb mode: expected one of {WANDB_MODES}, got {mode!r}")
    return mode


class WandbSink:
    """Weights & Biases, offline unless asked otherwise (`mode="online"` or WANDB_MODE=online).

    Offline runs land in `<dir>/wandb/offline-run-*`; upload them later with `wandb sync`.
    """

    def __init__(
        self,
        project: str,
        run_name: str,
        config: Mapping[str, Any] | None = None,
        *,
        dir: str | os.PathLike | None = None,
        mode: str | None = None,
        run_id: str | None = None,
    ) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                "WandbSink needs the wandb package: pip install 'vespo-megatron[wandb]' (or disable wandb logging)"
            ) from e
        self.mode = resolve_wandb_mode(mode)
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = dict(
            project=project, name=run_name, config=dict(config or {}), mode=self.mode,
            dir=None if dir is None else str(dir),
        )
        if run_id is not None:
            kwargs.update(id=run_id, resume="allow")
        self.run = wandb.init(**kwargs)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=int(step))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


@dataclass(kw_only=True)
class LoggingConfig:
    """Where a run's metrics go. Files: `<out_dir>/<run_name>.jsonl`; wandb runs under `<out_dir>/wandb/`.

    wandb_mode: None follows WANDB_MODE (default offline); "disabled" keeps the wandb API but logs nothing.
    log_interval: log every this many steps (and always the last one).
    """

    out_dir: str = "runs"
    run_name: str = "run"
    console: bool = True
    jsonl: bool = True
    wandb: bool = False
    wandb_mode: str | None = None
    wandb_project: str = "vespo-megatron"
    log_interval: int = 1

    def __post_init__(self) -> None:
        if not str(self.out_dir):
            raise ValueError("LoggingConfig.out_dir: expected a directory, got an empty string")
        name = self.run_name
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"LoggingConfig.run_name: expected a non-empty file name without '/', got {name!r}")
        for flag in ("console", "jsonl", "wandb"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"LoggingConfig.{flag}: expected a bool, got {getattr(self, flag)!r}")
        if self.wandb_mode is not None and self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"LoggingConfig.wandb_mode: expected None or one of {WANDB_MODES}, got {self.wandb_mode!r}")
        if not isinstance(self.wandb_project, str) or not self.wandb_project:
            raise ValueError(f"LoggingConfig.wandb_project: expected a non-empty string, got {self.wandb_project!r}")
        if isinstance(self.log_interval, bool) or not isinstance(self.log_interval, int) or self.log_interval < 1:
            raise ValueError(f"LoggingConfig.log_interval: expected an int >= 1, got {self.log_interval!r}")

    @property
    def jsonl_path(self) -> Path:
        return Path(self.out_dir) / f"{self.run_name}.jsonl"


class MetricsLogger:
    """Sends each logged step's values to every sink, on global rank 0 only; other ranks hold no sinks."""

    def __init__(self, sinks: Sequence[Sink], *, rank: int = 0, log_interval: int = 1, total_steps: int | None = None):
        if log_interval < 1:
            raise ValueError(f"MetricsLogger.log_interval: expected >= 1, got {log_interval}")
        self.rank = rank
        self.sinks: list[Sink] = list(sinks) if rank == 0 else []
        self.log_interval = log_interval
        self.total_steps = total_steps

    @classmethod
    def from_config(
        cls,
        cfg: LoggingConfig,
        total_steps: int,
        run_config: Mapping[str, Any] | None = None,
        *,
        rank: int = 0,
        resume_from_step: int | None = None,
        stream: TextIO | None = None,
    ) -> MetricsLogger:
        """Build the sinks `cfg` asks for (only on rank 0: other ranks open no files and no wandb run).
        `resume_from_step`: the first step the resumed run will log (earlier JSONL lines are kept)."""
        sinks: list[Sink] = []
        if rank == 0:
            if cfg.console:
                sinks.append(ConsoleSink(total_steps, stream=stream))
            if cfg.jsonl:
                sinks.append(JsonlSink(cfg.jsonl_path, resume_from_step=resume_from_step))
            if cfg.wandb:
                sinks.append(WandbSink(cfg.wandb_project, cfg.run_name, run_config, dir=cfg.out_dir, mode=cfg.wandb_mode))
        return cls(sinks, rank=rank, log_interval=cfg.log_interval, total_steps=total_steps)

    def should_log(self, step: int) -> bool:
        """Whether `log(step, ...)` will write anything (rank 0, on the interval or the last step)."""
        if self.rank != 0:
            return False
        return step % self.log_interval == 0 or (self.total_steps is not None and step >= self.total_steps)

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.should_log(step):
            return
        clean = {str(k): _to_float(str(k), v) for k, v in values.items()}
        for sink in self.sinks:
            sink.log(step, clean)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
