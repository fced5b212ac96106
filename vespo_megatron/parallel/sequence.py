"""Sequence-level reductions across ranks: the context-parallel all-reduce of the [B] sums and the global
loss normaliser over data parallelism. The one place the policy losses' inputs meet torch.distributed.

Shape legend: [T] this rank's tokens (its context-parallel share of every sequence), [B] sequences of the
micro-batch (the same B on every CP rank), [K, B] K stacked per-sequence quantities.

Communication cost (per micro-batch): one all-reduce of a float64 [3, B] tensor over the CP group forward
(24 * B bytes: log W, token count, rollout row) and, when a loss differentiates through log W (GSPO with
gradient='sequence'), one float64 [3, B] all-reduce backward. The alternative, all-gathering token log-probs,
moves 4 * T * cp bytes and more. The normaliser costs one [n_micro * B] all-reduce over CP ([2, n_micro * B]
with masked IS, whose sequence-level rejection needs each sequence's sum of log rho) and one 2-element
all-reduce over DP per optimizer step.

Masked IS (rollout_correction.mode='mis') is applied here, before the loss: the same kept tokens enter the
normaliser, the [B] sums and the loss (see `vespo_megatron.losses.rollout_terms`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from vespo_megatron.losses import LossInputs, LossNormalizer, RolloutCorrectionConfig
from vespo_megatron.losses.inputs import inputs_from_sums, loss_sums
from vespo_megatron.losses.rollout_terms import rollout_token_term, sequence_keep, token_keep
from vespo_megatron.losses.segments import masked_segment_sum, segment_count

__all__ = ["all_reduce_sum", "build_loss_inputs", "global_normalizer", "comm_device"]


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def comm_device(group=None) -> torch.device:
    """The device a collective over `group` needs its tensors on (NCCL: the current GPU; gloo: the CPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _AllReduceSum(torch.autograd.Function):
    """out = sum over ranks of x. Every rank's loss uses `out`, and the global objective is the sum of the
    ranks' losses, so d objective / d x_r = sum over ranks of d loss_r / d out: backward all-reduces too."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(x: Tensor, group, *, differentiable: bool) -> Tensor:
    """Sum `x` over `group` (None or size 1: identity). Differentiable only when asked: a detached value
    (VESPO's phi) needs no backward collective."""
    if _group_size(group) == 1:
        return x if differentiable else x.detach()
    device = comm_device(group)
    if differentiable and x.requires_grad:
        return _AllReduceSum.apply(x.to(device), group).to(x.device)
    out = x.detach().to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out.to(x.device)


def build_loss_inputs(
    *,
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    token_seq: Tensor,
    num_seqs: int,
    advantages: Tensor,
    rollout_logp: Tensor | None = None,
    rollout_correction: RolloutCorrectionConfig | None = None,
    cp_group=None,
    differentiable_seq_log_ratio: bool = True,
) -> LossInputs:
    """LossInputs for this rank's tokens [T], with the [B] sequence sums completed over `cp_group` and the
    rejection of a masked-IS `rollout_correction` applied (pass the loss config's correction).

    The three [B] sums (log W, kept-token count, rollout row) travel in one float64 [3, B] all-reduce. Set
    `differentiable_seq_log_ratio=False` for losses that only need log W's value (VESPO, GSPO's default
    token gradient): the backward pass then has no collective at all.
    """
    local = loss_sums(logp=logp, old_logp=old_logp, mask=mask, token_seq=token_seq, num_seqs=num_seqs,
                      rollout_logp=rollout_logp, rollout_correction=rollout_correction)
    if not differentiable_seq_log_ratio:
        local = local.detach()
    total = all_reduce_sum(local, cp_group, differentiable=differentiable_seq_log_ratio)
    return inputs_from_sums(total, logp=logp, old_logp=old_logp, mask=mask, token_seq=token_seq,
                            advantages=advantages, rollout_logp=rollout_logp, rollout_correction=rollout_correction)


def global_normalizer(
    masks: Sequence[Tensor],
    token_seqs: Sequence[Tensor],
    num_seqs: Sequence[int],
    *,
    cp_group=None,
    dp_group=None,
    old_logps: Sequence[Tensor] | None = None,
    rollout_logps: Sequence[Tensor | None] | None = None,
    rollout_correction: RolloutCorrectionConfig | None = None,
) -> LossNormalizer:
    """The normaliser of one optimizer step, from the response masks of all its micro-batches on this rank.

    num_tokens: loss tokens summed over micro-batches, CP ranks (each holds a share of every sequence) and
                DP ranks. With a masked-IS `rollout_correction` (then `old_logps` and `rollout_logps` are
                needed, one per micro-batch) only the kept tokens count, as in the loss.
    num_seqs:   sequences with at least one loss token anywhere in the sequence (counts completed over CP
                first, so a sequence whose response lies on one CP rank counts once), summed over DP.
    Every rank of the DP x CP grid gets the same numbers.
    """
    if not (len(masks) == len(token_seqs) == len(num_seqs)):
        raise ValueError(
            f"global_normalizer: masks, token_seqs and num_seqs need one entry per micro-batch, got "
            f"{len(masks)}, {len(token_seqs)}, {len(num_seqs)}"
        )
    rejects = rollout_correction is not None and rollout_correction.mode == "mis"
    if rejects and (old_logps is None or rollout_logps is None or len(old_logps) != len(masks)
                    or len(rollout_logps) != len(masks)):
        raise ValueError("global_normalizer: rollout_correction.mode='mis' needs old_logps and rollout_logps, one "
                         f"per micro-batch ({len(masks)}), got {old_logps is not None and len(old_logps)} and "
                         f"{rollout_logps is not None and len(rollout_logps)}")
    rows = []
    for i, (m, s, n) in enumerate(zip(masks, token_seqs, num_seqs, strict=True)):
        m = m.bool()
        if not rejects:
            rows.append(segment_count(m, s, n)[None])
            continue
        old, rollout = old_logps[i], rollout_logps[i]
        keep = token_keep(m, old, rollout, rollout_correction)
        log_rho = rollout_token_term(m, old, rollout, rollout_correction)
        rows.append(torch.stack([segment_count(keep, s, n), masked_segment_sum(log_rho, m, s, n)]))
    per_seq = torch.cat(rows, dim=1) if rows else torch.zeros(1, 0, dtype=torch.float64)
    per_seq = all_reduce_sum(per_seq, cp_group, differentiable=False)
    counts = per_seq[0]
    if rejects:  # sequence/geometric rejection needs the whole sequence's sum of log rho (row 1)
        counts = torch.where(sequence_keep(per_seq[1], counts, rollout_correction), counts, torch.zeros_like(counts))
    totals = torch.stack([counts.sum(), (counts > 0).sum().double()])
    totals = all_reduce_sum(totals, dp_group, differentiable=False)
    if rejects:
        # A step whose every token was rejected has loss 0 and zero gradients with any positive denominator;
        # 1 keeps the step running and LossNormalizer's check for steps without response tokens at all.
        totals = totals.clamp(min=1.0)
    return LossNormalizer(num_tokens=float(totals[0]), num_seqs=float(totals[1]))
