"""Atomic, verified checkpoints that survive faults.

Save: every rank writes its own file into `<step>.tmp`; the ranks then exchange (size, crc32) of their files
and rank 0 writes the completion marker `complete.json` last, renames the directory into place and points
`latest` at it (write-then-rename: a run killed at any moment leaves the previous checkpoints and maybe the
new one, never half of one under a final name). Before writing, each rank checks the free space against the
state's tensor bytes; on any failure the temporary files are removed before the error is re-raised, and a
torch short-write error (`unexpected pos`) on a full disk becomes `OSError: No space left on device (...)`.
With `keep` K > 0, all but the newest K complete checkpoints are deleted after a successful save.

Load: `latest` is only a hint. The step directories are scanned newest first; a checkpoint is used when its
marker is present and this rank's file has the recorded size and checksum and loads (every rank must agree;
rank 0 lists the candidates and broadcasts them). A missing, truncated, partial or unreadable checkpoint is
skipped with a warning naming it and the reason. Backward compatible: a checkpoint written before markers
existed (no `complete.json`) is treated as intact when its rank files load.

Layout: the marker (and each rank file) records the parallel layout (tp / sp / cp / ep / etp / pp / vpp and
the world size, read from the model's megatron config). Resuming under another layout raises a
`LayoutMismatch` naming both layouts and the flags to resume with, before any state_dict is loaded: the
rank files are shards of that layout, and loading them under another gives a raw state_dict mismatch.

Contents per rank: model and optimizer state, RNG states, step, engine state (weight version and, in async
mode, the lagged weight snapshots). The data position is the step: prompts are a pure function of it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import tempfile
import zlib

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["save_checkpoint", "load_latest_checkpoint", "check_writable", "check_free_space", "state_bytes",
           "MARKER", "LayoutMismatch", "layout_of", "describe_layout"]

log = logging.getLogger(__name__)
MARKER = "complete.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# torch's messages for a write that stopped short (inline_container.cc on a full disk)
_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed writing", "file write failed")


# layout key -> megatron config attribute, default, and the CLI flag
_LAYOUT = (("tp", "tensor_model_parallel_size", 1, "--tp"), ("sp", "sequence_parallel", False, "--sp"),
           ("cp", "context_parallel_size", 1, "--cp"), ("ep", "expert_model_parallel_size", 1, "--ep"),
           ("etp", "expert_tensor_parallel_size", 1, "--etp"), ("pp", "pipeline_model_parallel_size", 1, "--pp"),
           ("vpp", "virtual_pipeline_model_parallel_size", None, "--vpp"))


def layout_of(model, world_size: int) -> dict | None:
    """The parallel layout of a (wrapped) megatron model: {"tp", "sp", "cp", "ep", "etp", "pp", "vpp",
    "world_size"}; None when no megatron config is found on it (then no layout check is made)."""
    m = model[0] if isinstance(model, list | tuple) and model else model
    for _ in range(8):  # DDP / Float16Module wrappers
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "tensor_model_parallel_size"):
            out = {key: getattr(config, attr, default) for key, attr, default, _ in _LAYOUT}
            out["etp"] = out["etp"] or 1
            out["world_size"] = world_size
            return out
        m = getattr(m, "module", None)
        if m is None:
            return None
    return None


def describe_layout(layout: dict) -> str:
    """'TP2 SP EP1 PP1 (world 2)': the sizes that matter (CP, ETP and VPP when not 1 / unset)."""
    parts = [f"TP{layout.get('tp', 1)}"] + (["SP"] if layout.get("sp") else [])
    if layout.get("cp", 1) != 1:
        parts.append(f"CP{layout['cp']}")
    parts.append(f"EP{layout.get('ep', 1)}")
    if layout.get("etp", 1) != 1:
        parts.append(f"ETP{layout['etp']}")
    parts.append(f"PP{layout.get('pp', 1)}")
    if layout.get("vpp"):
        parts.append(f"VPP{layout['vpp']}")
    return " ".join(parts) + f" (world {layout.get('world_size', '?')})"


def _layout_flags(layout: dict) -> str:
    flags = []
    for key, _, default, flag in _LAYOUT:
        value = layout.get(key, default)
        if key == "sp":
            flags += [flag] if value else []
        elif key in ("tp", "ep", "pp") or (value is not None and value != default):
            flags.append(f"{flag} {value}")
    return " ".join(flags) + f" on {layout.get('world_size', '?')} ranks"


class LayoutMismatch(ValueError):
    """The checkpoint was written under another parallel layout (or world size): raised, never skipped."""


def _check_layout(ckpt: str, saved: dict | None, saved_world: int, layout: dict | None, world_size: int) -> None:
    name = os.path.basename(ckpt)
    if saved is not None and layout is not None:
        keys = [k for k, *_ in _LAYOUT] + ["world_size"]
        if any(saved.get(k) != layout.get(k) for k in keys):
            raise LayoutMismatch(
                f"checkpoint {name} was written with {describe_layout(saved)}; this run is "
                f"{describe_layout(layout)}: resume with the same layout ({_layout_flags(saved)}), or start "
                f"another run (--run-name / --out-dir) for this layout ({ckpt})")
        return
    if saved_world != world_size:
        written = f" ({describe_layout(saved)})" if saved is not None else ""
        raise LayoutMismatch(f"checkpoint {name} was written by {saved_world} ranks{written}, this run has "
                             f"{world_size}: resume on {saved_world} ranks with the same parallel flags, or start "
                             f"another run (--run-name / --out-dir) ({ckpt})")


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def _gather(obj, world_size: int) -> list:
    """Every rank's `obj` (a collective when distributed; also the barrier of the save)."""
    if not _distributed(world_size):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def state_bytes(obj) -> int:
    """The bytes of every tensor in a nested state (dicts, lists, tuples): the size estimate of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(state_bytes(v) for v in obj)
    return 0


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_free_space(directory: str, need_bytes: int) -> None:
    """Raise `OSError(ENOSPC, "No space left on device ...")` when `directory` (or its nearest existing
    parent) has no more than `need_bytes` free."""
    free = shutil.disk_usage(_nearest_existing(directory)).free
    if free <= need_bytes:
        raise OSError(errno.ENOSPC, f"No space left on device: {directory} needs about {need_bytes} bytes, "
                                    f"{free} free")


def check_writable(out_dir: str, need_bytes: int = 0) -> None:
    """At start, before any model work: `out_dir` must be creatable and writable (probed with a real file,
    so permissions, read-only mounts and a file in the way all show) and have more than `need_bytes` free.
    Raises OSError naming the directory."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write_probe_"):
            pass
    except OSError as e:
        raise OSError(e.errno, f"out_dir {out_dir!r} is not a writable directory: {e.strerror or e}") from e
    check_free_space(out_dir, need_bytes)


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _short_write(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _SHORT_WRITE)


def _write_rank_file(tmp: str, path: str, state: dict) -> tuple[int, int]:
    need = state_bytes(state)
    check_free_space(tmp, need)
    try:
        torch.save(state, path + ".part")
        with open(path + ".part", "rb+") as f:
            os.fsync(f.fileno())
        os.replace(path + ".part", path)
    except BaseException as e:
        _remove(path + ".part")
        if _short_write(e):
            free = shutil.disk_usage(_nearest_existing(tmp)).free
            if free <= need:
                raise OSError(errno.ENOSPC, f"No space left on device ({tmp}: torch.save stopped short, needs "
                                            f"about {need} bytes, {free} free): {e}") from e
        raise
    return os.path.getsize(path), _crc32(path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_write(path: str, text: str) -> None:
    with open(path + ".part", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".part", path)


def save_checkpoint(ckpt_dir: str, step: int, *, model, optimizer, extra: dict, rank: int, world_size: int,
                    keep: int = 0) -> str:
    """Write `<ckpt_dir>/step_<step>` (collective); with `keep` > 0 then delete all but the newest `keep`
    complete checkpoints. Returns the checkpoint's directory."""
    final = os.path.join(ckpt_dir, f"step_{step:07d}")
    tmp = final + ".tmp"
    name = f"rank{rank:05d}.pt"
    error = None
    if rank == 0:
        try:
            os.makedirs(ckpt_dir, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as e:
            error = e
    setup = _gather(None if error is None else str(error), world_size)  # the barrier: the directory exists
    if setup[0] is not None:
        if error is not None:
            raise error
        raise RuntimeError(f"checkpoint {final}: rank 0 could not create {tmp}: {setup[0]}")
    result: tuple = ()
    layout = layout_of(model, world_size)
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": _rng_state(), "extra": extra, "world_size": world_size, "layout": layout}
    try:
        result = _write_rank_file(tmp, os.path.join(tmp, name), state)
    except BaseException as e:  # noqa: BLE001 - re-raised below, after every rank knows
        error = e
    # Every rank reaches this gather, failed or not: nobody hangs in a barrier, everybody cleans up.
    reports = _gather((result, None if error is None else f"{type(error).__name__}: {error}"), world_size)
    failed = [(r, msg) for r, (_, msg) in enumerate(reports) if msg is not None]
    if failed:
        shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise RuntimeError(f"checkpoint {final}: rank {failed[0][0]} failed to write: {failed[0][1]}")
    if rank == 0:
        marker = {"step": step, "world_size": world_size, "layout": layout,
                  "files": {f"rank{r:05d}.pt": {"size": size, "crc32": crc} for r, ((size, crc), _) in
                            enumerate(reports)}}
        try:
            _fsync_write(os.path.join(tmp, MARKER), json.dumps(marker, indent=1) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_write(os.path.join(ckpt_dir, "latest"), os.path.basename(final) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if keep > 0:
            _prune(ckpt_dir, keep, final)
    _gather(None, world_size)
    return final


def _step_dirs(ckpt_dir: str) -> list[str]:
    """The step directories under `ckpt_dir`, newest first (temporary `.tmp` ones excluded)."""
    try:
        names = os.listdir(ckpt_dir)
    except FileNotFoundError:
        return []
    steps = [(int(m.group(1)), n) for n in names if (m := _STEP_DIR.match(n)) and
             os.path.isdir(os.path.join(ckpt_dir, n))]
    return [n for _, n in sorted(steps, reverse=True)]


def _prune(ckpt_dir: str, keep: int, just_written: str) -> None:
    complete = [n for n in _step_dirs(ckpt_dir) if os.path.exists(os.path.join(ckpt_dir, n, MARKER))]
    for n in complete[keep:]:
        path = os.path.join(ckpt_dir, n)
        if os.path.abspath(path) != os.path.abspath(just_written):
            shutil.rmtree(path, ignore_errors=True)


def _read_rank_file(ckpt: str, rank: int, world_size: int, layout: dict | None = None) -> dict:
    """This rank's state of checkpoint directory `ckpt`, verified; raises ValueError saying what is wrong
    (OSError / torch's errors for unreadable files pass through), `LayoutMismatch` when it was written under
    another layout than `layout` (or another world size)."""
    name = f"rank{rank:05d}.pt"
    path = os.path.join(ckpt, name)
    marker_path = os.path.join(ckpt, MARKER)
    if os.path.exists(marker_path):
        with open(marker_path) as f:
            marker = json.load(f)
        _check_layout(ckpt, marker.get("layout"), marker["world_size"], layout, world_size)
        entry = marker["files"][name]
        if not os.path.exists(path):
            raise ValueError(f"{name} is missing")
        size = os.path.getsize(path)
        if size != entry["size"]:
            raise ValueError(f"{name} has {size} bytes, the marker says {entry['size']} (truncated?)")
        if _crc32(path) != entry["crc32"]:
            raise ValueError(f"{name}: checksum differs from the marker's (corrupted)")
    elif not os.path.exists(path):
        raise ValueError(f"no {MARKER} and no {name} (partial checkpoint)")
    state = torch.load(path, weights_only=False)
    _check_layout(ckpt, state.get("layout"), state["world_size"], layout, world_size)
    return state


def _latest_hint(ckpt_dir: str, candidates: list[str]) -> None:
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(latest):
        if candidates:
            log.warning("checkpoint: %s is missing; scanning the step directories", latest)
        return
    with open(latest) as f:
        name = f.read().strip()
    if not name:
        log.warning("checkpoint: %s is empty; scanning the step directories", latest)
    elif name not in candidates:
        log.warning("checkpoint: %s names %s, which does not exist; scanning the step directories", latest, name)


def load_latest_checkpoint(ckpt_dir: str, *, model, optimizer, rank: int, world_size: int) -> dict | None:
    """Restore the newest intact checkpoint; returns {"step", "extra", "path"} or None when there is none.
    Damaged ones (missing / truncated / unreadable files, no marker and no loadable file) are skipped with a
    warning; a checkpoint without marker (written before markers existed) counts as intact if it loads."""
    candidates = _step_dirs(ckpt_dir) if rank == 0 else None
    if _distributed(world_size):
        box = [candidates]
        dist.broadcast_object_list(box, src=0)
        candidates = box[0]
    if rank == 0:
        _latest_hint(ckpt_dir, candidates)
    layout = layout_of(model, world_size)
    for name in candidates:
        ckpt = os.path.join(ckpt_dir, name)
        state, reason = None, None
        try:
            state = _read_rank_file(ckpt, rank, world_size, layout)
        except LayoutMismatch as e:
            reason = ("mismatch", str(e))
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped, and said so
            reason = ("damaged", f"rank {rank}: {type(e).__name__}: {e}")
        reasons = [r for r in _gather(reason, world_size) if r is not None]
        if any(kind == "mismatch" for kind, _ in reasons):
            raise LayoutMismatch(next(msg for kind, msg in reasons if kind == "mismatch"))
        if reasons:
            if rank == 0:
                log.warning("checkpoint %s is damaged, skipped (falling back to an older one): %s", ckpt,
                            "; ".join(msg for _, msg in reasons))
            continue
        if not os.path.exists(os.path.join(ckpt, MARKER)) and rank == 0:
            log.info("checkpoint %s has no %s (written before markers); its files load, using it", ckpt, MARKER)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        return {"step": state["step"], "extra": state["extra"], "path": ckpt}
    if candidates and rank == 0:
        log.warning("checkpoint: no intact checkpoint among %s under %s; starting fresh", candidates, ckpt_dir)
    return None
