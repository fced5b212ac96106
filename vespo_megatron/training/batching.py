"""Samples -> this rank's RL micro-batches: even splits, inert fillers, and the fixed packed length.

Every rank runs the same number of micro-batches of one packed length (pipeline shapes and EP all-gather
sizes must agree), whatever rejection left: a micro-batch without samples is an inert one-token filler
whose loss mask is empty (no tokens, no loss, no gradient).
"""

from __future__ import annotations

import dataclasses

import torch

from vespo_megatron.megatron.rl_batch import RLMicroBatch, RLSample, build_rl_microbatch
from vespo_megatron.parallel.cp_split import round_up
from vespo_megatron.routing import RoutingRecord, strided_fill

__all__ = ["MicroBatcher"]


class MicroBatcher:
    """groups: this rank's ParallelGroups; longest: the longest prompt + response of the task;
    routing: (moe_layers, top_k, num_experts) when samples carry replayed routing (R3)."""

    def __init__(self, groups, *, sp: bool, longest: int, micro_batch_size: int, eos_id: int,
                 routing: tuple[tuple[int, ...], int, int] | None = None):
        self.groups = groups
        cp_mult = 2 * groups.cp_size if groups.cp_size > 1 else 1
        self.pad_multiple = cp_mult * (groups.tp_size if sp else 1)
        self.longest = round_up(longest, self.pad_multiple)
        self.packed_len = micro_batch_size * self.longest
        self.eos_id = eos_id
        self.routing = routing

    def split(self, samples: list[RLSample], num_micro: int, filler: RLSample,
              seq_len: int | None = None) -> list[RLMicroBatch]:
        """`samples` in `num_micro` micro-batches, as even as possible."""
        g = self.groups
        bounds = [round(i * len(samples) / num_micro) for i in range(num_micro + 1)]
        out = []
        for i in range(num_micro):
            part = samples[bounds[i]:bounds[i + 1]]
            mb = build_rl_microbatch(part or [filler], layout="thd", cp_size=g.cp_size, cp_rank=g.cp_rank,
                                     pad_multiple=self.pad_multiple, seq_len=seq_len or self.packed_len)
            out.append(mb if part else dataclasses.replace(mb, loss_mask=torch.zeros_like(mb.loss_mask)))
        return out

    def filler(self, prompt_ids) -> RLSample:
        """A one-token sample (never trained on: its loss mask is cleared) for micro-batches left empty."""
        routing = None
        if self.routing is not None:
            moe_layers, k, num_experts = self.routing
            ids = strided_fill(len(prompt_ids), len(moe_layers), k, num_experts)
            routing = RoutingRecord(sample_id="filler", expert_ids=ids, num_prompt_tokens=len(prompt_ids),
                                    num_output_tokens=1, moe_layers=moe_layers, num_experts=num_experts)
        return RLSample(prompt=torch.tensor(prompt_ids), response=torch.tensor([self.eos_id]),
                        old_logp=torch.zeros(1), rollout_logp=torch.zeros(1), advantage=0.0, routing=routing)
