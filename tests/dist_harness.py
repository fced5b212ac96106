"""Run a function in several real torch.distributed (gloo) processes on CPU and collect what each returns.

`run_distributed(fn, world_size, *args)` starts `world_size` processes, initialises the default gloo group
on a free loopback port, calls `fn(rank, world_size, *args)` and returns the list of per-rank results
(anything `torch.save` can write). An exception in any rank fails the caller with that rank's traceback.
`fn` must be a module-level function (it is pickled by reference).

The ranks are fresh processes forked from a multiprocessing forkserver, never from the pytest process
(whose process groups, patches and threads they must not inherit). The forkserver is started once per
session and imports the heavy third-party modules first (`PRELOAD`: torch, megatron-core, transformers'
MoE models), so a launch costs a fork instead of seconds of imports per rank. Nothing of this project is
preloaded: each rank imports `vespo_megatron` (and applies its patches) itself, as a spawned one did. Each
rank gets the caller's current environment, as with spawn.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# VESPO_TEST_START_METHOD=spawn: the old way, every rank a fresh interpreter (to rule the forkserver out)
START_METHOD = os.environ.get("VESPO_TEST_START_METHOD", "forkserver")
PRELOAD = (
    "torch", "torch.distributed",
    "megatron.core", "megatron.core.models.gpt", "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.pipeline_parallel.schedules", "megatron.core.optimizer", "megatron.core.distributed",
    "megatron.core.transformer.moe.experts", "megatron.core.transformer.moe.router",
    "megatron.core.inference.contexts",
    "transformers", "transformers.models.qwen3_moe.modeling_qwen3_moe",
    "transformers.models.mixtral.modeling_mixtral", "safetensors.torch",
)
multiprocessing.set_forkserver_preload(list(PRELOAD))  # before the forkserver's first start; then ignored


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir, env, fn, args):
    os.environ.clear()
    os.environ.update(env)  # the caller's environment now, not the forkserver's at its start
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker,
            args=(world_size, _free_port(), out_dir, dict(os.environ), fn, args),
            nprocs=world_size,
            join=True,
            start_method=START_METHOD,
        )
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)
        ]
