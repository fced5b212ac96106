"""Model-parallel layout (`ParallelConfig`) and the process groups it creates (`ParallelGroups`).

`initialize_parallel(cfg)` calls megatron's `parallel_state.initialize_model_parallel` (which needs an
initialised default `torch.distributed` group) and returns every group our code needs in one frozen
dataclass, so that the rest of vespo_megatron receives groups as arguments instead of reading megatron's
globals. Layout order is megatron's default "tp-cp-ep-dp-pp".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import parallel_state

from vespo_megatron.compat import ProcessGroupCollection
from vespo_megatron.megatron.parallel_config import ParallelConfig


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups of one rank, and its rank/size in each. Pass this (or single groups) explicitly."""

    config: ParallelConfig
    world_size: int
    rank: int
    tp: dist.ProcessGroup
    cp: dist.ProcessGroup
    dp: dist.ProcessGroup  # data parallel, without CP
    dp_cp: dist.ProcessGroup  # data x context parallel: dense-parameter gradients are reduced here
    ep: dist.ProcessGroup
    expt_tp: dist.ProcessGroup
    expt_dp: dist.ProcessGroup  # expert-parameter gradients are reduced here
    pp: dist.ProcessGroup
    tp_cp: dist.ProcessGroup
    mp: dist.ProcessGroup  # model parallel (tp x pp)
    pg_collection: ProcessGroupCollection  # the same groups in megatron's container

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp)

    @property
    def tp_size(self) -> int:
        return dist.get_world_size(self.tp)

    @property
    def cp_rank(self) -> int:
        return dist.get_rank(self.cp)

    @property
    def cp_size(self) -> int:
        return dist.get_world_size(self.cp)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp)

    @property
    def dp_size(self) -> int:
        return dist.get_world_size(self.dp)

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.ep)

    @property
    def ep_size(self) -> int:
        return dist.get_world_size(self.ep)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pp)

    @property
    def pp_size(self) -> int:
        return dist.get_world_size(self.pp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def initialize_parallel(cfg: ParallelConfig) -> ParallelGroups:
    """Create megatron's model-parallel groups for `cfg` and return them explicitly.

    Needs `torch.distributed` initialised (any backend; gloo on CPU). Call `destroy_parallel()` before
    initialising a different layout in the same process.
    """
    if not dist.is_initialized():
        raise RuntimeError("initialize_parallel: torch.distributed is not initialised")
    world_size = dist.get_world_size()
    cfg.validate_world_size(world_size)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        virtual_pipeline_model_parallel_size=cfg.vpp,
        context_parallel_size=cfg.cp,
        expert_model_parallel_size=cfg.ep,
        expert_tensor_parallel_size=cfg.etp,
    )
    ps = parallel_state
    return ParallelGroups(
        config=cfg,
        world_size=world_size,
        rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_group(),
        cp=ps.get_context_parallel_group(),
        dp=ps.get_data_parallel_group(),
        dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
        ep=ps.get_expert_model_parallel_group(),
        expt_tp=ps.get_expert_tensor_parallel_group(),
        expt_dp=ps.get_expert_data_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        tp_cp=ps.get_tensor_and_context_parallel_group(),
        mp=ps.get_model_parallel_group(),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )


def destroy_parallel() -> None:
    """Destroy megatron's model-parallel groups (the default torch.distributed group stays)."""
    parallel_state.destroy_model_parallel()


def replace(cfg: ParallelConfig, **changes) -> ParallelConfig:
    """A copy of `cfg` with `changes` applied (validated again)."""
    return dataclasses.replace(cfg, **changes)
