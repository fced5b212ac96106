"""RL samples -> one rank's micro-batch for megatron-core: packed (THD) or padded, split for context parallelism.

Shape legend:
    [P] prompt tokens, [R] response tokens of one sample, L = P + R
    [T] packed tokens (each sequence padded to a multiple of `pad_multiple`), [T_local] this CP rank's share
    [b, s] model input: b = 1 for packed THD, b = number of samples for padded
    [B] samples (sequences) of the micro-batch

Position t of a sequence predicts token t + 1, so the input is the whole sequence, `labels[t] = seq[t + 1]`,
and the response token y_j (at sequence position P + j) is scored at position P + j - 1: the loss mask
covers positions P - 1 .. L - 2. The shift happens on the whole sequence, before any CP split, so every
per-token tensor (labels, masks, behaviour and rollout log-probs, routing ids) is split by the same index.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from vespo_megatron.base.transfer import to_device
from vespo_megatron.compat import PackedSeqParams
from vespo_megatron.parallel.cp_split import PackedBatch, pack_sequences, round_up, zigzag_indices
from vespo_megatron.routing.alignment import global_routing_padded, global_routing_thd, local_routing
from vespo_megatron.routing.record import RoutingRecord

__all__ = ["RLSample", "RLMicroBatch", "build_rl_microbatch", "common_seq_len"]


@dataclass(frozen=True)
class RLSample:
    """One rollout: prompt [P] and response [R] token ids, the behaviour log-probs of the response [R]
    (old policy, or the engine), optional rollout-engine log-probs [R], and the sequence advantage."""

    prompt: Tensor
    response: Tensor
    old_logp: Tensor
    advantage: float
    rollout_logp: Tensor | None = None
    routing: RoutingRecord | None = None  # rollout-engine routing (R3), rows for positions 0 .. L-2

    def __post_init__(self) -> None:
        if self.prompt.dim() != 1 or self.prompt.numel() < 1:
            raise ValueError(f"RLSample.prompt: expected a non-empty 1-D tensor, got shape {tuple(self.prompt.shape)}")
        if self.response.dim() != 1 or self.response.numel() < 1:
            raise ValueError(f"RLSample.response: expected a non-empty 1-D tensor, got shape {tuple(self.response.shape)}")
        for name in ("old_logp", "rollout_logp"):
            value = getattr(self, name)
            if value is not None and value.shape != self.response.shape:
                raise ValueError(
                    f"RLSample.{name}: expected shape {tuple(self.response.shape)} (one per response token), "
                    f"got {tuple(value.shape)}"
                )


@dataclass(frozen=True)
class RLMicroBatch:
    """This rank's share of one micro-batch (see the module docstring for the alignment).

    tokens, position_ids, labels: [b, s] int64
    loss_mask:    [b, s] bool, positions whose label is a response token
    token_seq:    [b, s] int64, sample index in [0, num_seqs) (padding belongs to its row / sequence)
    old_logp, rollout_logp: [b, s] float32 aligned with labels (0 outside the loss mask)
    advantages:   [B] float32
    token_index:  [s] global position (padded layout) or packed-token index (THD) of each local token
    routed_experts: [L_moe, s * b, K] compact ids (uint8 / int16) of the samples' `routing`, in the router's
                  s-major token order, split by the same `token_index` (None when the samples have none;
                  see `vespo_megatron.routing.alignment`)
    """

    tokens: Tensor
    position_ids: Tensor
    labels: Tensor
    loss_mask: Tensor
    token_seq: Tensor
    old_logp: Tensor
    rollout_logp: Tensor | None
    advantages: Tensor
    token_index: Tensor
    packed_seq_params: PackedSeqParams | None
    num_seqs: int
    routed_experts: Tensor | None = None

    def to(self, device) -> RLMicroBatch:
        """The model-input and loss tensors on `device` (routing ids stay: the replay moves its own shard)."""
        device = torch.device(device)
        if self.tokens.device == device:
            return self
        # non-blocking from pinned memory: a micro-batch's ~10 copies would otherwise be a stream sync each
        moved = {name: to_device(getattr(self, name), device) for name in
                 ("tokens", "position_ids", "labels", "loss_mask", "token_seq", "old_logp", "advantages")}
        if self.rollout_logp is not None:
            moved["rollout_logp"] = to_device(self.rollout_logp, device)
        return replace(self, packed_seq_params=_packed_params_to(self.packed_seq_params, device), **moved)


def _packed_params_to(psp: PackedSeqParams | None, device) -> PackedSeqParams | None:
    if psp is None:
        return None
    fields = {f: getattr(psp, f) for f in psp.__dataclass_fields__}
    moved = replace(psp, **{k: to_device(v, device) for k, v in fields.items() if isinstance(v, Tensor)})
    # the host copies, for what needs the lengths on the host (the attention's pack layout): no read-back
    object.__setattr__(moved, "_vespo_host_params", psp)
    return moved


def _aligned(samples: list[RLSample]) -> dict[str, list[Tensor]]:
    """Per-sample tensors of length L, aligned with the model input positions."""
    out: dict[str, list[Tensor]] = {"tokens": [], "labels": [], "mask": [], "old": [], "rollout": []}
    for s in samples:
        P, R = s.prompt.numel(), s.response.numel()
        seq = torch.cat([s.prompt, s.response]).long()
        L = P + R
        labels = torch.cat([seq[1:], seq.new_zeros(1)])
        mask = torch.zeros(L, dtype=torch.bool)
        mask[P - 1 : L - 1] = True
        old = torch.zeros(L, dtype=torch.float32)
        old[P - 1 : L - 1] = s.old_logp.float()
        rollout = torch.zeros(L, dtype=torch.float32)
        if s.rollout_logp is not None:
            rollout[P - 1 : L - 1] = s.rollout_logp.float()
        for key, value in (("tokens", seq), ("labels", labels), ("mask", mask), ("old", old), ("rollout", rollout)):
            out[key].append(value)
    return out


def _pad_packed(packed: PackedBatch, total: int) -> PackedBatch:
    """The same pack with its last sequence's padding extended to `total` tokens."""
    extra = total - packed.num_tokens
    if extra < 0:
        raise ValueError(f"seq_len: expected >= the packed length ({packed.num_tokens} tokens), got {total}")
    if extra == 0:
        return packed
    last = packed.num_tokens - int(packed.cu_seqlens_padded[-2])
    cu_padded = packed.cu_seqlens_padded.clone()
    cu_padded[-1] += extra
    return replace(
        packed,
        tokens=torch.cat([packed.tokens, packed.tokens.new_zeros(1, extra)], dim=1),
        position_ids=torch.cat([packed.position_ids, torch.arange(last, last + extra)[None]], dim=1),
        seq_index=torch.cat([packed.seq_index, packed.seq_index.new_full((extra,), int(packed.seq_index[-1]))]),
        valid=torch.cat([packed.valid, packed.valid.new_zeros(extra)]),
        cu_seqlens_padded=cu_padded,
    )


def common_seq_len(micro_batches: list[list[RLSample]], *, layout: str = "thd", pad_multiple: int = 1) -> int:
    """One `seq_len` that fits every micro-batch (the longest row for padded, the longest pack for THD):
    pipeline stages need fixed activation shapes and gloo's all-gather (EP on CPU) needs equal sizes."""
    lengths = [[s.prompt.numel() + s.response.numel() for s in mb] for mb in micro_batches]
    if layout == "padded":
        return max(max(mb) for mb in lengths)
    return max(sum(round_up(n, pad_multiple) for n in mb) for mb in lengths)


def build_rl_microbatch(
    samples: list[RLSample],
    *,
    layout: Literal["thd", "padded"] = "thd",
    cp_size: int = 1,
    cp_rank: int = 0,
    pad_multiple: int = 1,
    seq_len: int | None = None,
) -> RLMicroBatch:
    """Build this CP rank's share of a micro-batch from whole samples.

    pad_multiple: each sequence (THD) or the row length (padded) is padded to a multiple of it; it must be a
        multiple of 2 * cp_size, times the TP size when sequence parallelism splits the tokens.
    seq_len: the row length (padded layout; default: the longest sample, rounded up), or the total packed
        length (THD; default: as packed). A longer THD pack pads its last sequence: pipeline stages exchange
        fixed-shape activations, and gloo's all-gather (EP on CPU) needs equal sizes on every rank.
    """
    if not samples:
        raise ValueError("samples: expected at least one RLSample, got none")
    if layout not in ("thd", "padded"):
        raise ValueError(f"layout: expected 'thd' or 'padded', got {layout!r}")
    if cp_size > 1 and pad_multiple % (2 * cp_size) != 0:
        raise ValueError(f"pad_multiple: expected a multiple of 2*cp_size={2 * cp_size}, got {pad_multiple}")
    with_rollout = [s.rollout_logp is not None for s in samples]
    if any(with_rollout) and not all(with_rollout):
        raise ValueError("RLSample.rollout_logp: expected on every sample of a micro-batch or on none")
    with_routing = [s.routing is not None for s in samples]
    if any(with_routing) and not all(with_routing):
        raise ValueError("RLSample.routing: expected on every sample of a micro-batch or on none")
    records = [s.routing for s in samples] if all(with_routing) else None
    lengths = [s.prompt.numel() + s.response.numel() for s in samples]
    al = _aligned(samples)
    B = len(samples)
    advantages = torch.tensor([float(s.advantage) for s in samples], dtype=torch.float32)

    if layout == "thd":
        packed = pack_sequences(al["tokens"], pad_multiple=pad_multiple)
        if seq_len is not None:
            packed = _pad_packed(packed, round_up(seq_len, pad_multiple))
        starts = packed.cu_seqlens_padded[:-1].tolist()

        def place(values: list[Tensor], fill=0) -> Tensor:
            full = torch.full((packed.num_tokens,), fill, dtype=values[0].dtype)
            for start, v in zip(starts, values, strict=True):
                full[start : start + v.numel()] = v
            return full

        index = packed.cp_index(cp_size, cp_rank) if cp_size > 1 else torch.arange(packed.num_tokens)
        flat = {
            "tokens": packed.tokens[0], "position_ids": packed.position_ids[0], "token_seq": packed.seq_index,
            "labels": place(al["labels"]), "loss_mask": place(al["mask"], False),
            "old_logp": place(al["old"]), "rollout_logp": place(al["rollout"]),
        }
        local = {k: v.index_select(0, index).unsqueeze(0) for k, v in flat.items()}
        psp = packed.packed_seq_params()
        if records is not None:
            routed = local_routing(global_routing_thd(records, lengths, starts, packed.num_tokens), index)
    else:
        longest = max(t.numel() for t in al["tokens"])
        S = round_up(longest if seq_len is None else seq_len, pad_multiple)
        if S < longest:
            raise ValueError(f"seq_len: expected >= the longest sample ({longest} tokens), got {seq_len}")

        def rows(values: list[Tensor], fill=0) -> Tensor:
            full = torch.full((B, S), fill, dtype=values[0].dtype)
            for i, v in enumerate(values):
                full[i, : v.numel()] = v
            return full

        index = zigzag_indices(S, cp_size, cp_rank) if cp_size > 1 else torch.arange(S)
        full = {
            "tokens": rows(al["tokens"]), "position_ids": torch.arange(S).expand(B, S).clone(),
            "token_seq": torch.arange(B)[:, None].expand(B, S).clone(),
            "labels": rows(al["labels"]), "loss_mask": rows(al["mask"], False),
            "old_logp": rows(al["old"]), "rollout_logp": rows(al["rollout"]),
        }
        local = {k: v.index_select(1, index) for k, v in full.items()}
        psp = None
        if records is not None:
            routed = local_routing(global_routing_padded(records, lengths, S), index)
    return RLMicroBatch(
        tokens=local["tokens"], position_ids=local["position_ids"], labels=local["labels"],
        loss_mask=local["loss_mask"], token_seq=local["token_seq"], old_logp=local["old_logp"],
        rollout_logp=local["rollout_logp"] if all(with_rollout) else None, advantages=advantages,
        token_index=index, packed_seq_params=psp, num_seqs=B, routed_experts=routed if records is not None else None,
    )
