"""Process-group start for the example scripts: torchrun's environment when present (NCCL on GPUs, gloo on
CPU), otherwise a single process with an in-memory store, so `python examples/x.py` works too (no port: many
single-process runs started at once, as a sweep does, cannot collide on one)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_distributed"]


def init_distributed() -> tuple[int, int]:
    """(rank, world_size), with the default process group initialised."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()
