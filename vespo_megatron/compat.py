"""Everything that differs between the megatron-core versions we support (>= 0.16.1), in one place.

Other modules import megatron-core names from here when their location is version dependent, so a future
move upstream is fixed once. 0.16.1 is the oldest release with `RouterReplay` and the newest that runs on
Python 3.11; it is what CPU machines and CI install.
"""

from __future__ import annotations

from megatron.core import package_info
from packaging.version import Version

MIN_MCORE_VERSION = Version("0.16.1")
MCORE_VERSION = Version(package_info.__version__)


def check_mcore_version(version: Version = MCORE_VERSION) -> None:
    """Raise a clear error when the installed megatron-core is older than we support."""
    if version < MIN_MCORE_VERSION:
        raise ImportError(
            f"vespo_megatron needs megatron-core >= {MIN_MCORE_VERSION} (RouterReplay, "
            f"ProcessGroupCollection); found {version}. Install a newer megatron-core."
        )


check_mcore_version()

# Import locations, valid for 0.16.x. Add version branches here when upstream moves them.
from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.pipeline_parallel.schedules import get_forward_backward_func  # noqa: E402
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction  # noqa: E402
from megatron.core.utils import unwrap_model  # noqa: E402


def static_inference_context(max_batch_size: int, max_sequence_length: int):
    """megatron's static-batching KV-cache context (`Attention` allocates [S, B, groups, hn] per layer on the
    first forward that carries it). Same constructor in 0.16 and 0.19 (0.19 builds an `InferenceConfig`
    inside; both materialise only the last position's logits)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    return StaticInferenceContext(max_batch_size, max_sequence_length)


def with_experts_module(moe_spec, experts_cls, moe_layer_cls=None):
    """The MoE layer spec `moe_spec` (from megatron's local layer spec) with `experts_cls` building its routed
    experts in place of `SequentialMLP`, same submodules and constructor arguments; `moe_layer_cls` (a
    `MoELayer` subclass with the same constructor) builds the layer itself when given.

    0.16: ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=ModuleSpec(module=SequentialMLP,
    submodules=MLPSubmodules(...)))). 0.19: the same as builders, functools.partial(MoELayer,
    submodules=MoESubmodules(experts=partial(SequentialMLP, submodules=MLPSubmodules(...)))); 0.19's
    `SequentialMLP.__init__` takes a `name` keyword more, which a subclass without its own `__init__` passes on.
    """
    import dataclasses
    import functools

    from megatron.core.transformer.moe.experts import SequentialMLP

    def replaced(spec, **changes):
        if isinstance(spec, functools.partial):
            return functools.partial(spec.func, *spec.args, **{**spec.keywords, **changes})
        return dataclasses.replace(spec, **changes)

    is_partial = isinstance(moe_spec, functools.partial)
    submodules = moe_spec.keywords["submodules"] if is_partial else moe_spec.submodules
    experts = submodules.experts
    current = experts.func if isinstance(experts, functools.partial) else experts.module
    if current is not SequentialMLP:
        raise TypeError(f"with_experts_module: expected a spec whose experts are SequentialMLP, got {current!r}")
    if isinstance(experts, functools.partial):
        new_experts = functools.partial(experts_cls, *experts.args, **experts.keywords)
    else:
        new_experts = dataclasses.replace(experts, module=experts_cls)
    changes = dict(submodules=dataclasses.replace(submodules, experts=new_experts))
    if moe_layer_cls is not None:
        if is_partial:
            return functools.partial(moe_layer_cls, *moe_spec.args, **{**moe_spec.keywords, **changes})
        changes["module"] = moe_layer_cls
    return replaced(moe_spec, **changes)


def transformer_engine_available() -> bool:
    """Whether transformer-engine's torch extension imports (GPU machines only)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or an OSError/RuntimeError from a broken CUDA install
        return False
    return True


__all__ = [
    "MCORE_VERSION",
    "MIN_MCORE_VERSION",
    "PackedSeqParams",
    "ProcessGroupCollection",
    "RouterReplay",
    "RouterReplayAction",
    "check_mcore_version",
    "get_forward_backward_func",
    "static_inference_context",
    "unwrap_model",
    "transformer_engine_available",
    "with_experts_module",
]
