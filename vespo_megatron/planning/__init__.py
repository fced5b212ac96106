"""Planning a run before launching it: per-GPU memory of a MoE model (any family of `vespo_megatron.models`)
under a megatron-core layout (`vespo_megatron.planning.memory`; CLI: `examples/memory_plan.py`). Pure Python:
no torch, no megatron."""

from .memory import (
    PRESETS,
    Layout,
    MemoryPlan,
    ModelShape,
    RunSetup,
    check_layout,
    count_params,
    minimal_gpus,
    plan_memory,
    rank_params,
    search_layouts,
)

__all__ = ["PRESETS", "Layout", "MemoryPlan", "ModelShape", "RunSetup", "check_layout", "count_params",
           "minimal_gpus", "plan_memory", "rank_params", "search_layouts"]
