"""Run identity: a run's directory belongs to one configuration.

`<out_dir>/<run_name>/config.json` records the config at the first start. A later start with the same
out-dir and name resumes that run only when its config matches the record, up to the fields in `MAY_DIFFER`
(how long, how often to log / checkpoint / export, timeouts: a restart may change them without making it
another experiment). Otherwise it is refused with the differing flags, so two experiments never share
checkpoints or metrics by accident; `--allow-config-change` resumes anyway and records the new config.

`<run_dir>/init_checkpoint.json` fingerprints the checkpoint the run started from (`--hf-checkpoint`, e.g. an
SFT base): the path alone says nothing, since every device call unpacks its base to the same path. A resume from
another base is refused like a config change, and a sweep report refuses to put runs of two bases in one table.

The history helpers read the run's JSONL, so the end-of-run summary covers every step of the run, not
only the steps of the process that resumed it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

__all__ = ["CONFIG_FILE", "INIT_CHECKPOINT_FILE", "MAY_DIFFER", "ConfigMismatchError", "config_record",
           "config_differences", "check_run_config", "checkpoint_fingerprint", "check_init_checkpoint",
           "read_init_checkpoint", "read_history", "reward_summary"]

CONFIG_FILE = "config.json"
INIT_CHECKPOINT_FILE = "init_checkpoint.json"
# Files up to this size are hashed whole; larger ones (a real model's shards) by their size and FINGERPRINT_BLOCKS
# evenly spaced blocks, so that fingerprinting a 60 GB checkpoint reads ~1 MiB a shard, not the shard.
FINGERPRINT_WHOLE_BYTES = 256 << 20
FINGERPRINT_BLOCKS = 16
_BLOCK = 64 << 10

# Dotted paths (fnmatch patterns) that a resumed run may change: they decide how long it runs, how it logs,
# checkpoints and exports, where the server is and how long to wait for it; not what is trained.
MAY_DIFFER = (
    "run.steps", "run.out_dir", "run.run_name", "run.allow_config_change", "run.checkpoint_every",
    "run.keep_checkpoints", "run.console", "run.wandb", "run.threads",
    "eval.every", "eval.final_k", "hf.save_every", "hf.save_final", "hf.save_dtype",
    "rollout.sglang.url", "rollout.sglang.*timeout*", "rollout.sglang.*retries*", "rollout.sglang.*backoff*",
    "rollout.sglang.*wait*", "rollout.sglang.max_concurrency", "rollout.sglang.weight_sync.master_address",
    "rollout.sglang.weight_sync.master_port", "rollout.sglang.weight_sync.*timeout*",
    "task.reward.workers", "task.reward.*timeout*", "perf.*",
    "model.batched_experts",  # how the experts are computed (same numbers up to rounding); absent from older runs
    "algorithm.logprob_micro_batch_size",  # how the old-log-prob pass is packed (the same mu); absent from older runs
    # how the embedded engine decodes (the same tokens; tests/test_decode_graphs.py, test_small_batch_moe.py)
    "rollout.embedded.cuda_graphs", "rollout.embedded.dense_moe_rows", "rollout.embedded.stop_check_every",
    "rollout.embedded.stop_read_lag",
    # the engine's kernels (the same numbers up to rounding); absent from older runs
    "rollout.embedded.compile_decode", "rollout.embedded.decode_attention",
)


class ConfigMismatchError(ValueError):
    """The run directory was started with another config; `differences` are (path, recorded, now)."""

    def __init__(self, run_dir: str, differences: list[tuple[str, object, object]], flags: Mapping[str, str]):
        self.run_dir, self.differences = run_dir, differences
        lines = [f"  {flags.get(path, path)}: this run was {_show(old)}, now {_show(new)}"
                 for path, old, new in differences]
        super().__init__(
            f"run directory {run_dir!r} holds a run started with another config ({os.path.join(run_dir, CONFIG_FILE)}):\n"
            + "\n".join(lines)
            + "\nGive this experiment its own --run-name (or --out-dir), or pass --allow-config-change to resume "
              "that run with the new config.")


_ABSENT = object()


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


def config_record(cfg) -> dict:
    """The config as JSON-able data (a torch dtype and other objects as their str), as written to config.json."""
    return json.loads(json.dumps(asdict(cfg), default=str))


def _flatten(tree, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        path = prefix + key
        if isinstance(value, dict) and value:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def config_differences(recorded: Mapping, current: Mapping, flags: Mapping[str, str] | None = None) -> list[tuple]:
    """(path, recorded, current) for every leaf that differs, outside `MAY_DIFFER`. Fields with a flag come
    first; a field only one side has (another loss's typed config, a field added since) or one without a flag
    (derived from another, like the model seed) is listed only when nothing with a flag differs, so the message
    names what the user changed."""
    old, new, flags = _flatten(dict(recorded)), _flatten(dict(current)), flags or {}
    diffs = []
    for path in sorted(old.keys() | new.keys()):
        if any(fnmatch.fnmatchcase(path, p) for p in MAY_DIFFER):
            continue
        a, b = old.get(path, _ABSENT), new.get(path, _ABSENT)
        if a != b:
            diffs.append((path, a, b))
    primary = [d for d in diffs if d[0] in flags and d[1] is not _ABSENT and d[2] is not _ABSENT]
    return primary or diffs


def check_run_config(run_dir: str, cfg, *, rank: int = 0, flags: Mapping[str, str] | None = None,
                     log=None) -> None:
    """At start: record cfg in <run_dir>/config.json when there is none, else compare with the record and
    raise ConfigMismatchError naming the differences (unless cfg.run.allow_config_change: then the new config
    replaces the record, the old one kept as config.previous.json). Every rank reads; rank 0 writes, atomically,
    so a rank reading meanwhile sees the old file or the new one, both this config. `flags` maps dotted paths to
    command-line flags for the message (default: vespo-train's); `log(message)` reports a change."""
    path = Path(run_dir) / CONFIG_FILE
    current = config_record(cfg)
    if path.is_file():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the run's recorded config ({e}); move it away to start over") from e
        if flags is None:
            from .cli import make_cli  # the flag names, only when there is something to report

            flags = {p: leaf.flag for p, leaf in make_cli().leaves.items()}
        diffs = config_differences(recorded, current, flags)
        if not diffs:
            return
        if not cfg.run.allow_config_change:
            raise ConfigMismatchError(run_dir, diffs, flags)
        if log is not None:
            log(f"--allow-config-change: resuming {run_dir!r} with a changed config ("
                + ", ".join(flags.get(p, p) for p, _, _ in diffs) + "); the old one is kept as config.previous.json")
    if rank == 0:
        _write_record(path, current)


def _write_record(path: Path, record: dict) -> None:
    """Write a run's JSON record atomically; an existing one is kept beside it as <stem>.previous.json."""
    if path.is_file():
        os.replace(path, path.with_name(f"{path.stem}.previous{path.suffix}"))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def checkpoint_fingerprint(hf_dir: str | os.PathLike) -> dict:
    """{'sha256', 'method', 'bytes', 'files'} of a Hugging Face checkpoint directory: its config.json, the
    safetensors index and every *.safetensors file, in name order, each as its name and size, then its bytes
    (whole up to FINGERPRINT_WHOLE_BYTES; else FINGERPRINT_BLOCKS blocks at evenly spaced offsets: method
    'sampled'). Two trainings of one shape differ in nearly every block (1 MiB a shard, 16 places), so
    sampling tells two bases apart."""
    root = Path(hf_dir)
    files = sorted(p for p in root.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.name in (
        "config.json", "model.safetensors.index.json")))
    if not any(p.suffix == ".safetensors" for p in files):
        raise ValueError(f"hf.load: expected a checkpoint directory with *.safetensors files, got {str(root)!r} "
                         f"(holding {sorted(p.name for p in root.iterdir())})")
    digest, method, total = hashlib.sha256(), "full", 0
    for p in files:
        size = p.stat().st_size
        total += size
        digest.update(f"{p.name}\0{size}\0".encode())
        with p.open("rb") as fh:
            if size <= FINGERPRINT_WHOLE_BYTES:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
            else:
                method = "sampled"
                for i in range(FINGERPRINT_BLOCKS):
                    fh.seek((size - _BLOCK) * i // (FINGERPRINT_BLOCKS - 1))
                    digest.update(fh.read(_BLOCK))
    return {"sha256": digest.hexdigest(), "method": method, "bytes": total, "files": [p.name for p in files]}


def read_init_checkpoint(run_dir: str | os.PathLike) -> dict | None:
    """The run's recorded start checkpoint ({'path', 'sha256', ...}), or None (no file: a run from scratch or
    one started before the record existed)."""
    path = Path(run_dir) / INIT_CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: cannot read the run's start-checkpoint record ({e})") from e


def check_init_checkpoint(run_dir: str, hf_dir: str | os.PathLike, *, rank: int = 0,
                          allow_change: bool = False, log=None) -> dict:
    """At start, with --hf-checkpoint: record the checkpoint's fingerprint in <run_dir>/init_checkpoint.json,
    or compare it with the record and raise ConfigMismatchError when the run started from another checkpoint
    (allow_change: record the new one, keep the old as init_checkpoint.previous.json). Every rank fingerprints
    (the same answer everywhere, so all raise together); rank 0 writes. Returns the current record."""
    current = {"path": str(hf_dir), **checkpoint_fingerprint(hf_dir)}
    path = Path(run_dir) / INIT_CHECKPOINT_FILE
    recorded = read_init_checkpoint(run_dir)
    if recorded is not None:
        if recorded.get("sha256") == current["sha256"]:
            return current
        diff = [("hf.load (sha256 of the checkpoint)", f"{recorded.get('path')} sha256 {recorded.get('sha256')}",
                 f"{current['path']} sha256 {current['sha256']}")]
        if not allow_change:
            raise ConfigMismatchError(run_dir, diff, {"hf.load (sha256 of the checkpoint)": "--hf-checkpoint"})
        if log is not None:
            log(f"--allow-config-change: resuming {run_dir!r} from another start checkpoint ({current['path']}, "
                f"sha256 {current['sha256'][:12]}); the old record is kept as init_checkpoint.previous.json")
    if rank == 0:
        _write_record(path, current)
    return current


def read_history(jsonl: str | os.PathLike, steps: int | None = None) -> list[dict]:
    """The run's records by step (the last record of a step wins; partial lines skipped), steps < `steps`."""
    by_step = {}
    path = Path(jsonl)
    if not path.is_file():
        return []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if steps is None or step < steps:
            by_step[step] = record
    return [by_step[s] for s in sorted(by_step)]


def reward_summary(history: list[Mapping]) -> str | None:
    """'reward: mean of the first k steps a -> last k steps b' over the whole run (k = a third, at most 10), or
    None with fewer than 2 steps of rewards."""
    rewards = [h["reward/mean"] for h in history
               if isinstance(h.get("reward/mean"), int | float) and math.isfinite(h["reward/mean"])]
    k = max(1, min(10, len(rewards) // 3))
    if len(rewards) < 2 * k:
        return None
    return (f"reward: mean of the first {k} steps {sum(rewards[:k]) / k:.3f} -> last {k} steps "
            f"{sum(rewards[-k:]) / k:.3f} ({len(rewards)} steps)")
