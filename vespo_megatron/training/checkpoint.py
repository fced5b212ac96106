"""Atomic checkpoints: every rank writes its own file into a temporary directory that rank 0 renames into
place once all ranks are done, then points `latest` at it (write-then-rename, so a run killed at any moment
leaves either the previous checkpoint or the new one, never half of one).

Contents per rank: model and optimizer state, RNG states, step, engine state (weight version and, in async
mode, the lagged weight snapshots). The data position is the step: prompts are a pure function of it.
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["save_checkpoint", "load_latest_checkpoint"]


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(ckpt_dir: str, step: int, *, model, optimizer, extra: dict, rank: int, world_size: int) -> str:
    final = os.path.join(ckpt_dir, f"step_{step:07d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    if world_size > 1:
        dist.barrier()
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": _rng_state(), "extra": extra, "world_size": world_size}
    path = os.path.join(tmp, f"rank{rank:05d}.pt")
    torch.save(state, path + ".part")
    os.replace(path + ".part", path)
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = os.path.join(ckpt_dir, "latest.tmp")
        with open(latest_tmp, "w") as f:
            f.write(os.path.basename(final) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest_tmp, os.path.join(ckpt_dir, "latest"))
    if world_size > 1:
        dist.barrier()
    return final


def load_latest_checkpoint(ckpt_dir: str, *, model, optimizer, rank: int, world_size: int) -> dict | None:
    """Restore the newest complete checkpoint; returns {"step", "extra"} or None when there is none."""
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(latest):
        return None
    with open(latest) as f:
        name = f.read().strip()
    path = os.path.join(ckpt_dir, name, f"rank{rank:05d}.pt")
    state = torch.load(path, weights_only=False)
    if state["world_size"] != world_size:
        raise ValueError(f"checkpoint {path}: written by {state['world_size']} ranks, this run has {world_size}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}
