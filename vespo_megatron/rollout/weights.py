"""The trainer's policy as rollout engines read it (`PolicyWeights`): the live model, or its Hugging Face
tensors and checkpoints exported through `vespo_megatron.hf.bridge` (collective over the trainer)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from vespo_megatron.hf.bridge import gather_hf_tensors, save_hf_checkpoint

__all__ = ["MegatronPolicyWeights"]


@dataclass(frozen=True)
class MegatronPolicyWeights:
    """model: the (DDP-wrapped) megatron model; groups: its ParallelGroups; hf_config: the config exported
    checkpoints carry; source_dir: the HF checkpoint the run started from (its tokenizer and extra files are
    copied along), save_dtype: the stored dtype of exported checkpoints."""

    model: torch.nn.Module
    groups: object
    hf_config: dict
    source_dir: str | None = None
    save_dtype: torch.dtype = torch.bfloat16

    def hf_tensors(self, dst: int = 0) -> Iterable[tuple[str, torch.Tensor]]:
        return gather_hf_tensors(self.model, self.groups, self.hf_config, dst=dst)

    def write_hf(self, path: str) -> str:
        save_hf_checkpoint(self.model, self.groups, path, hf_config=self.hf_config, source_dir=self.source_dir,
                           dtype=self.save_dtype)
        return path
