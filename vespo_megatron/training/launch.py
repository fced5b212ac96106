"""Process-group start for the example scripts: torchrun's environment when present (NCCL on GPUs, gloo on
CPU), otherwise a single process on a free loopback port, so `python examples/x.py` works too."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

__all__ = ["init_distributed"]


def init_distributed() -> tuple[int, int]:
    """(rank, world_size), with the default process group initialised."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()
