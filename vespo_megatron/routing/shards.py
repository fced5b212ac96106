# Shape legend:
#   [N]        routed token rows of one sample (positions first_row .. first_row + N - 1)
#   [N_r]      the rows of one rank's CP share (RoutingRecord.token_positions of the shard)
#   [L_moe]    the model's MoE layers (RoutingRecord.moe_layers of a whole record)
#   [L_stage]  the MoE layers one rank replays (its pipeline stage, all virtual chunks)
#   [K]        top-k slots
"""Per-rank routing shards: each rank of a replica receives only the routing it replays.

A whole record is ``[N, L_moe, K]``; a rank replays only its pipeline stage's MoE layers (``L_stage`` of
them) at the token positions its CP rank keeps. :func:`shard_record` cuts ``[N_r, L_stage, K]`` out of a
whole record for one rank's :class:`RankPlan`; the result is itself a :class:`RoutingRecord` that says what
it holds: ``moe_layers`` = the stage's layers, ``cp_share = (cp_size, cp_rank, pad_multiple)`` = which
token positions (:func:`vespo_megatron.routing.record.cp_token_positions`). Everything here is pure (no
process groups); `vespo_megatron.rollout.replica.ReplicaEngine` does the transport.

Token share. Under CP a THD pack splits each sequence on its own: zigzag chunks of the sequence padded to
``pad_multiple`` (``2 * cp``, times ``tp`` with sequence parallelism). So the share depends on the sample's
own length only -- provided the pack pads it to exactly its own rounded length. The fixed-length pack of
`MicroBatcher` reaches its length by padding its last sequence further; with CP shards it appends an inert
tail sequence for that instead (`vespo_megatron.training.batching`), and `global_routing_thd` raises if a
sharded sample was padded otherwise.

Sequence parallelism is not cut at the source: SP splits a micro-batch's packed local tokens into ``tp``
contiguous chunks, which depends on how samples are packed, not on a sample alone. Every TP rank of one CP
rank and stage receives the same shard (the CP share) and `replay_tensors` takes its SP chunk as before.

Bytes (Qwen3-30B-A3B, 16k tokens, uint8): a whole record is ``16383 x 48 x 8`` = 6.0 MiB; under PP=4 x CP=2
a shard is ``~8192 x 12 x 8`` = 0.75 MiB, 1/8 (`bench/routing_shard_bench.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from vespo_megatron.routing.record import RoutingRecord, cp_token_positions

__all__ = ["RankPlan", "pad_multiple_for", "rank_moe_layers", "shard_generations", "shard_record"]


def pad_multiple_for(cp_size: int, tp_size: int, sequence_parallel: bool) -> int:
    """The THD pad multiple of each sequence (as `MicroBatcher`): 2*cp under CP, times tp with SP."""
    return (2 * cp_size if cp_size > 1 else 1) * (tp_size if sequence_parallel else 1)


@dataclass(frozen=True)
class RankPlan:
    """What one rank replays: ``moe_layers`` (0-based model layer numbers of its stage's MoE layers, in
    model order; the record's numbering) at the tokens CP rank ``cp_rank`` of ``cp_size`` keeps of each
    sequence padded to a multiple of ``pad_multiple``."""

    moe_layers: tuple[int, ...]
    cp_size: int = 1
    cp_rank: int = 0
    pad_multiple: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.moe_layers, tuple) or any(a >= b for a, b in zip(self.moe_layers, self.moe_layers[1:],
                                                                                 strict=False)):
            raise ValueError(f"moe_layers: expected a strictly increasing tuple, got {self.moe_layers!r}")
        cp_token_positions(0, self.cp_size, self.cp_rank, self.pad_multiple)  # validates the CP share


def shard_record(record: RoutingRecord, plan: RankPlan) -> RoutingRecord:
    """``[N_r, L_stage, K]``: the rows and layers of ``record`` (a whole record) that ``plan``'s rank replays.

    Rows: the routed positions of the CP share (all rows, ``cp_share=None``, without CP). The synthetic last
    row (``has_last_row``) is dropped under CP: the trainer fills that position itself."""
    if record.cp_share is not None:
        raise ValueError(f"record {record.sample_id!r}: expected a whole record, got a shard "
                         f"(cp_share={record.cp_share})")
    index = {n: i for i, n in enumerate(record.moe_layers)}
    missing = [n for n in plan.moe_layers if n not in index]
    if missing:
        raise ValueError(f"record {record.sample_id!r}: expected MoE layers {plan.moe_layers} (the rank's stage), "
                         f"got a record with {record.moe_layers} (missing {tuple(missing)})")
    layers = [index[n] for n in plan.moe_layers]
    ids = record.expert_ids
    if plan.cp_size == 1:
        return replace(record, expert_ids=np.ascontiguousarray(ids[:, layers, :]), moe_layers=plan.moe_layers)
    share = (plan.cp_size, plan.cp_rank, plan.pad_multiple)
    seq_len = record.num_prompt_tokens + record.num_output_tokens
    pos = cp_token_positions(seq_len, *share)
    lo = record.first_row
    pos = pos[(pos >= lo) & (pos < lo + record.num_routed_rows)]
    rows = np.ascontiguousarray(ids[pos - lo][:, layers, :])  # [N_r, L_stage, K], a new buffer
    return replace(record, expert_ids=rows, moe_layers=plan.moe_layers, has_last_row=False, cp_share=share)


def shard_generations(generations: Sequence, plan: RankPlan) -> list:
    """The generations with each whole ``routing`` record cut to ``plan`` (errors and routing-less ones as
    they are). A record that cannot be cut (layers missing) stays whole, so that every rank rejects it
    alike (`validate_generation`: routing_shape) instead of one rank failing alone."""
    out = []
    for gen in generations:
        record = getattr(gen, "routing", None)
        if record is not None:
            try:
                gen = replace(gen, routing=shard_record(record, plan))
            except ValueError:
                pass
        out.append(gen)
    return out


def rank_moe_layers(model) -> tuple[int, ...]:
    """0-based numbers of the MoE layers this rank builds (all virtual-pipeline chunks), in model order:
    the layers whose ``mlp.router`` is a megatron ``TopKRouter`` (as `RoutingReplay` finds them)."""
    from megatron.core.transformer.moe.router import TopKRouter

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    numbers = []
    for chunk in chunks:
        while not hasattr(chunk, "decoder") and hasattr(chunk, "module"):
            chunk = chunk.module
        numbers += [layer.layer_number - 1 for layer in chunk.decoder.layers
                    if isinstance(getattr(layer.mlp, "router", None), TopKRouter)]
    return tuple(sorted(numbers))
