# Shape legend:
#   [L]        one sample's input positions (prompt + response), L = P + R
#   [T]        packed tokens of a THD micro-batch (each sequence padded); [B, S] rows x row length (padded)
#   [T_local]  this CP rank's tokens in router order: THD: token_index order; padded: s-major [s_local * B]
#   [T_r]      this rank's router tokens after the sequence-parallel split: T_local / tp
#   [L_moe]    MoE layers of the model (RoutingRecord.moe_layers), [K] top-k slots
"""Per-rank slicing of rollout routing for megatron's `RouterReplay` (pure tensor code, no process groups).

Megatron's router sees, on each rank, the flattened ``[s * b]`` tokens of its local hidden states
``[s, b, h]`` (``TopKRouter.routing`` views the logits as ``[-1, num_experts]``, so the order is
s-major). The local ``s`` comes from three cuts, applied here in the same order:

1. packing / padding (:func:`global_routing_thd`, :func:`global_routing_padded`): each sample's rows go at
   its packed (THD) or row (padded) positions; rows no router produced -- the final response token,
   positions before a record's ``first_row``, and padding -- get :func:`strided_fill` ids (offset by the
   position), never one constant id;
2. the context-parallel zigzag ``token_index`` of :func:`vespo_megatron.megatron.rl_batch.build_rl_microbatch`
   (:func:`local_routing`; padded batches are then transposed to the router's s-major order);
3. the sequence-parallel split: megatron's ``scatter_to_sequence_parallel_region`` cuts the sequence dim
   into ``tp`` equal chunks and TP rank r keeps chunk r; in s-major order that is a contiguous chunk of
   ``T_local`` (:func:`sequence_parallel_shard`);

then the MoE layers that this pipeline stage (and virtual stage) builds, by megatron's global layer
numbering, dense layers skipped (:func:`stage_moe_layer_indices`). :func:`replay_tensors` returns what
``RouterReplay.set_target_indices`` takes: one ``[T_r, K]`` int64 tensor per local MoE layer.

Bytes: every rank builds routing only for the samples of its own micro-batches (which it holds anyway to
build the tokens). The micro-batch keeps ``[L_moe, T_local, K]`` in the compact dtype (1 byte per id for
<= 256 experts): ``T_local * L_moe * K`` bytes, e.g. 4096 local tokens x 48 layers x top-8 = 1.5 MiB for
Qwen3-30B-A3B. Right before the forward each rank widens only its SP chunk and its stage's layers to int64:
``T_r * L_stage * K * 8`` bytes. Nothing broadcasts a batch's routing across ranks.

Per-rank shards (`vespo_megatron.routing.shards`): a record may hold only one stage's MoE layers and one
CP rank's token rows. :func:`sample_routing` then fills the positions it lacks (other CP ranks' tokens:
never selected by this rank's ``token_index``) and :func:`global_routing_thd` checks that the pack splits
the sample as the shard assumed (its own length padded to ``pad_multiple``); the micro-batch then holds
``[L_stage, T_local, K]`` instead of ``[L_moe, T_local, K]``, identical on this rank's layers and tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from vespo_megatron.routing.record import RoutingRecord, compact_dtype, strided_fill

__all__ = [
    "global_routing_padded",
    "global_routing_thd",
    "local_routing",
    "moe_layer_numbers",
    "replay_tensors",
    "router_order_mask",
    "sample_routing",
    "sequence_parallel_shard",
    "stage_moe_layer_indices",
]


def _check_records(records: Sequence[RoutingRecord]) -> tuple[tuple[int, ...], int, int]:
    if not records:
        raise ValueError("records: expected at least one RoutingRecord, got none")
    first = records[0]
    for r in records:
        if not isinstance(r, RoutingRecord):
            raise ValueError(f"records: expected RoutingRecord items, got {type(r).__name__}")
        if (r.moe_layers, r.top_k, r.num_experts) != (first.moe_layers, first.top_k, first.num_experts):
            raise ValueError(
                f"records: expected one model's routing (moe_layers={first.moe_layers}, top_k={first.top_k}, "
                f"num_experts={first.num_experts}), got sample {r.sample_id!r} with moe_layers={r.moe_layers}, "
                f"top_k={r.top_k}, num_experts={r.num_experts}"
            )
    return first.moe_layers, first.top_k, first.num_experts


def sample_routing(record: RoutingRecord, seq_len: int, *, offset: int = 0) -> np.ndarray:
    """``[L, L_moe, K]`` compact ids for input positions ``0 .. L-1`` of one sample (L = P + R).

    Position t takes record row ``t - first_row``; positions without a row (before ``first_row``, the final
    token) take :func:`strided_fill` ids with offset ``offset + t`` (``offset``: the position's place in the
    packed / padded micro-batch, so fills of different samples do not line up).
    """
    if record.num_prompt_tokens + record.num_output_tokens != seq_len:
        raise ValueError(
            f"routing of sample {record.sample_id!r}: expected P + O = {seq_len} (the sample's prompt + response "
            f"tokens), got P={record.num_prompt_tokens} + O={record.num_output_tokens}"
        )
    num_layers, k, num_experts = len(record.moe_layers), record.top_k, record.num_experts
    if record.cp_share is not None:
        # A CP shard: every position strided-filled (the same ids, offset + t, as the whole-record path gives
        # the positions without a row), then this shard's rows at their positions. Positions of other CP
        # ranks keep fills; this rank's token_index never selects them (global_routing_thd checks the split).
        out = strided_fill(seq_len, num_layers, k, num_experts, offset=offset).copy()
        out[record.token_positions()] = record.expert_ids
        return out
    out = np.empty((seq_len, num_layers, k), dtype=compact_dtype(num_experts))
    lo, hi = record.first_row, record.first_row + record.num_routed_rows
    out[lo:hi] = record.expert_ids[: record.num_routed_rows]
    if lo > 0:
        out[:lo] = strided_fill(lo, num_layers, k, num_experts, offset=offset)
    if hi < seq_len:
        out[hi:] = strided_fill(seq_len - hi, num_layers, k, num_experts, offset=offset + hi)
    return out


def global_routing_thd(records: Sequence[RoutingRecord], seq_lens: Sequence[int], starts: Sequence[int],
                       num_tokens: int) -> Tensor:
    """``[T, L_moe, K]`` compact routing of a packed micro-batch: sample i at ``starts[i] .. + seq_lens[i]``,
    padding positions strided-filled (offset = packed position)."""
    moe_layers, k, num_experts = _check_records(records)
    if not len(records) == len(seq_lens) == len(starts):
        raise ValueError(f"records, seq_lens, starts: expected equal lengths, got {len(records)}, "
                         f"{len(seq_lens)}, {len(starts)}")
    full = strided_fill(num_tokens, len(moe_layers), k, num_experts).copy()  # padding: offset = position
    ends = [*starts[1:], num_tokens]
    for rec, n, start, end in zip(records, seq_lens, starts, ends, strict=True):
        if start + n > num_tokens:
            raise ValueError(f"starts: sample {rec.sample_id!r} ends at {start + n} > num_tokens={num_tokens}")
        if rec.cp_share is not None:
            pad_multiple = rec.cp_share[2]
            own = -(-n // pad_multiple) * pad_multiple
            if end - start != own:
                raise ValueError(
                    f"routing shard of sample {rec.sample_id!r}: expected the pack to pad it to its own length "
                    f"rounded up to pad_multiple={pad_multiple} ({own} tokens, the CP split the shard was cut "
                    f"for), got {end - start} (the pack's tail padding must not extend a sharded sample)")
        full[start : start + n] = sample_routing(rec, n, offset=start)
    return torch.from_numpy(full)


def global_routing_padded(records: Sequence[RoutingRecord], seq_lens: Sequence[int], row_len: int) -> Tensor:
    """``[B, S, L_moe, K]`` compact routing of a padded micro-batch (row i = sample i; padding strided-filled
    with offset ``i * S + s``)."""
    moe_layers, k, num_experts = _check_records(records)
    if any(r.cp_share is not None for r in records):
        raise ValueError("records: expected whole-token records with the padded layout (its CP split follows the "
                         "row length, not the sample's), got a CP shard")
    if len(records) != len(seq_lens):
        raise ValueError(f"records, seq_lens: expected equal lengths, got {len(records)}, {len(seq_lens)}")
    B = len(records)
    full = strided_fill(B * row_len, len(moe_layers), k, num_experts).copy().reshape(B, row_len, len(moe_layers), k)
    for i, (rec, n) in enumerate(zip(records, seq_lens, strict=True)):
        if n > row_len:
            raise ValueError(f"seq_lens: sample {rec.sample_id!r} has {n} tokens > row_len={row_len}")
        full[i, :n] = sample_routing(rec, n, offset=i * row_len)
    return torch.from_numpy(full)


def local_routing(full: Tensor, token_index: Tensor) -> Tensor:
    """This CP rank's routing ``[L_moe, T_local, K]`` in router order (compact dtype kept).

    full: ``[T, L_moe, K]`` (THD) -> rows ``token_index``; or ``[B, S, L_moe, K]`` (padded) -> columns
    ``token_index``, then s-major ``[s_local * B]`` as the router flattens ``[s, b]``.
    """
    if full.dim() == 3:
        local = full.index_select(0, token_index)  # [T_local, L_moe, K]
    elif full.dim() == 4:
        local = full.index_select(1, token_index).transpose(0, 1).reshape(-1, *full.shape[2:])
    else:
        raise ValueError(f"full: expected [T, L_moe, K] or [B, S, L_moe, K], got shape {tuple(full.shape)}")
    return local.permute(1, 0, 2).contiguous()


def router_order_mask(mask: Tensor) -> Tensor:
    """A per-token ``[b, s_local]`` tensor (e.g. the loss mask) flattened s-major, as the router sees it."""
    if mask.dim() != 2:
        raise ValueError(f"mask: expected [b, s_local], got shape {tuple(mask.shape)}")
    return mask.transpose(0, 1).reshape(-1)


def sequence_parallel_shard(x: Tensor, tp_size: int, tp_rank: int, dim: int = 0) -> Tensor:
    """TP rank ``tp_rank``'s contiguous chunk of ``x`` along ``dim`` (megatron's sequence-parallel scatter)."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank: expected in [0, {tp_size}), got {tp_rank}")
    n = x.shape[dim]
    if n % tp_size:
        raise ValueError(f"router tokens: expected a multiple of tp={tp_size} (sequence parallelism), got {n}")
    chunk = n // tp_size
    return x.narrow(dim, tp_rank * chunk, chunk)


def moe_layer_numbers(moe_layer_freq: int | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """0-based global numbers of the MoE layers from megatron's ``moe_layer_freq`` (int N: every N-th layer
    from layer 0; list: 1 = MoE, 0 = dense)."""
    if isinstance(moe_layer_freq, int):
        return tuple(i for i in range(num_layers) if i % moe_layer_freq == 0)
    pattern = list(moe_layer_freq)
    if len(pattern) != num_layers:
        raise ValueError(f"moe_layer_freq: expected {num_layers} entries, got {len(pattern)}")
    return tuple(i for i, m in enumerate(pattern) if m)


def stage_moe_layer_indices(record_moe_layers: Sequence[int], stage_layer_numbers: Sequence[int],
                            stage_is_moe: Sequence[bool]) -> list[int]:
    """Indices into the record's MoE-layer axis for this stage's MoE layers, in build order.

    stage_layer_numbers: 0-based global numbers of the layers this (virtual) stage builds (megatron's
    ``layer_number - 1``); stage_is_moe: which of them are MoE. A MoE layer absent from the record raises.
    """
    if len(stage_layer_numbers) != len(stage_is_moe):
        raise ValueError("stage_layer_numbers, stage_is_moe: expected equal lengths")
    position = {n: i for i, n in enumerate(record_moe_layers)}
    out = []
    for n, is_moe in zip(stage_layer_numbers, stage_is_moe, strict=True):
        if not is_moe:
            continue
        if n not in position:
            raise ValueError(f"routing: model layer {n} is MoE but the routing has MoE layers {tuple(record_moe_layers)}")
        out.append(position[n])
    return out


def replay_tensors(local: Tensor, layer_indices: Sequence[int], tp_size: int = 1, tp_rank: int = 0,
                   device: torch.device | str | None = None) -> list[Tensor]:
    """``RouterReplay`` targets of this rank: ``[T_r, K]`` int64 for each of ``layer_indices`` (into the
    MoE axis of ``local [L_moe, T_local, K]``), after the sequence-parallel split."""
    if local.dim() != 3:
        raise ValueError(f"local: expected [L_moe, T_local, K], got shape {tuple(local.shape)}")
    shard = sequence_parallel_shard(local, tp_size, tp_rank, dim=1)
    return [shard[i].to(device=device, dtype=torch.int64) for i in layer_indices]
