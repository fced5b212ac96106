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
]
