"""Samples -> this rank's RL micro-batches: even splits, inert fillers, and the fixed packed length.

Every rank runs the same number of micro-batches of one packed length (pipeline shapes and EP all-gather
sizes must agree), whatever rejection left: a micro-batch without samples is an inert one-token filler
whose loss mask is empty (no tokens, no loss, no gradient).

The fixed packed length is reached by padding the pack's last sequence further, except when the samples
carry per-rank CP routing shards (`vespo_megatron.routing.shards`): a shard holds the CP share of its
sample padded to its own length, and a longer padding would move the zigzag split. Those packs end with an
inert two-token tail sequence instead (loss mask cleared, strided routing), which takes the extra padding.
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
        total = round_up(seq_len or self.packed_len, self.pad_multiple)
        for i in range(num_micro):
            part = samples[bounds[i]:bounds[i + 1]]
            tail = self._tail(part, total)
            mb = build_rl_microbatch(part + tail if part else [filler], layout="thd", cp_size=g.cp_size,
                                     cp_rank=g.cp_rank, pad_multiple=self.pad_multiple, seq_len=total)
            if not part:
                mb = dataclasses.replace(mb, loss_mask=torch.zeros_like(mb.loss_mask))
            elif tail:  # the tail is the last sequence: no loss on it
                mb = dataclasses.replace(mb, loss_mask=mb.loss_mask & (mb.token_seq != len(part)))
            out.append(mb)
        return out

    def _tail(self, part: list[RLSample], total: int) -> list[RLSample]:
        """[] or one inert tail sample taking the pack's extra padding, when `part` carries CP shards."""
        records = [s.routing for s in part if s.routing is not None]
        if not records or all(r.cp_share is None for r in records):
            return []
        own = sum(round_up(s.prompt.numel() + s.response.numel(), self.pad_multiple) for s in part)
        if own >= total:  # nothing to extend (or too long: build_rl_microbatch says so)
            return []
        r = records[0]  # the tail's routing has the shards' layers, whole tokens (1 routed row)
        ids = strided_fill(1, len(r.moe_layers), r.top_k, r.num_experts)
        routing = RoutingRecord(sample_id="tail", expert_ids=ids, num_prompt_tokens=1, num_output_tokens=1,
                                moe_layers=r.moe_layers, num_experts=r.num_experts)
        eos = torch.tensor([self.eos_id])
        rollout = torch.zeros(1) if part[0].rollout_logp is not None else None
        return [RLSample(prompt=eos, response=eos, old_logp=torch.zeros(1), rollout_logp=rollout,
                         advantage=0.0, routing=routing)]

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
