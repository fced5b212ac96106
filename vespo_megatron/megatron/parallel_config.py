"""`ParallelConfig`: the model-parallel layout, without megatron-core or process groups.

Kept apart from `parallel_setup.py` (which creates megatron's groups) so that the command line can check a
layout against a world size before importing megatron-core or starting any process group.
"""

from __future__ import annotations

from dataclasses import dataclass

from vespo_megatron.base.validation import ConfigError

__all__ = ["ParallelConfig"]


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Sizes of each parallel dimension. The data-parallel size is what the world size leaves over."""

    tp: int = 1
    sp: bool = False  # sequence parallelism (requires tp > 1; required for MoE with tp > 1)
    cp: int = 1
    ep: int = 1
    etp: int = 1  # expert tensor parallelism; keep 1 on CPU (gloo cannot all-gather uneven sizes)
    pp: int = 1
    vpp: int | None = None  # virtual pipeline stages per rank (interleaved schedule)

    def __post_init__(self):
        for name in ("tp", "cp", "ep", "etp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError("ParallelConfig", name, "an int >= 1", value)
        if self.sp and self.tp == 1:
            raise ConfigError("ParallelConfig", "sp", "False with tp=1 (sequence parallelism needs tp > 1)", True)
        if self.vpp is not None:
            if not isinstance(self.vpp, int) or self.vpp < 1:
                raise ConfigError("ParallelConfig", "vpp", "None or an int >= 1", self.vpp)
            if self.pp == 1:
                raise ConfigError("ParallelConfig", "pp", f"> 1 with vpp={self.vpp}", self.pp)

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.cp * self.pp

    def data_parallel_size(self, world_size: int) -> int:
        """The DP size for `world_size` ranks; raises ValueError if the layout does not fit."""
        self.validate_world_size(world_size)
        return world_size // self.model_parallel_size

    def validate_world_size(self, world_size: int) -> None:
        if world_size % self.model_parallel_size != 0:
            raise ValueError(
                f"world_size: expected a multiple of tp*cp*pp={self.model_parallel_size}, got {world_size}"
            )
        expert_block = self.etp * self.ep * self.pp
        if world_size % expert_block != 0:
            raise ValueError(
                f"world_size: expected a multiple of etp*ep*pp={expert_block}, got {world_size}"
            )

    def validate_for_moe(self, num_experts: int) -> None:
        """Checks that only matter for a mixture-of-experts model with `num_experts` experts."""
        if self.tp > 1 and not self.sp:
            raise ConfigError("ParallelConfig", "sp", f"True for MoE with tp={self.tp}", False)
        if num_experts % self.ep != 0:
            raise ConfigError("ParallelConfig", "ep", f"a divisor of num_experts={num_experts}", self.ep)
