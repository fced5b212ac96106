"""Building `LossInputs` in one process (no context parallelism): sequence sums computed locally.

Shape legend: [T] tokens, [B] sequences, [3, B] the stacked per-sequence sums.

Distributed callers use `vespo_megatron.parallel.sequence.build_loss_inputs`, which all-reduces the same
[3, B] sums (`loss_sums`) over the context-parallel group before `inputs_from_sums`:

    row 0  sum over kept tokens of clamp(log pi - log mu, -20, 20)   log W (the authors' per-token clamp)
    row 1  number of kept tokens                                     |y| for the divisors (token-level MIS
                                                                     removed; a rejected sequence is zeroed
                                                                     after the reduction)
    row 2  sum over response tokens of the rollout term              see `rollout_terms`
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import RolloutCorrectionConfig
from .rollout_terms import TOKEN_LOG_RATIO_CLAMP, rollout_token_term, sequence_keep, token_keep
from .segments import check_token_seq, masked_segment_sum, segment_count
from .types import LossInputs

__all__ = ["build_local_inputs", "sequence_sums", "loss_sums", "inputs_from_sums"]


def _check_shapes(logp: Tensor, **tensors: Tensor | None) -> None:
    for name, value in tensors.items():
        if value is not None and value.shape != logp.shape:
            raise ValueError(
                f"LossInputs.{name}: expected shape {tuple(logp.shape)} (same as logp), got {tuple(value.shape)}"
            )


def sequence_sums(
    *, logp: Tensor, old_logp: Tensor, mask: Tensor, token_seq: Tensor, num_seqs: int,
    rollout_logp: Tensor | None = None,
) -> Tensor:
    """[3, B] float64 raw per-sequence sums over this process's tokens: sum of (logp - old_logp) (keeps the
    graph to `logp`; no clamp), the response-token count, and the rollout log-ratio sum (zeros without
    `rollout_logp`). For mismatch metrics; the losses' inputs come from `loss_sums`. Validates shapes."""
    _check_shapes(logp, old_logp=old_logp, mask=mask, token_seq=token_seq, rollout_logp=rollout_logp)
    check_token_seq(token_seq, num_seqs)
    mask = mask.bool()
    log_ratio = masked_segment_sum(logp.double() - old_logp.detach().double(), mask, token_seq, num_seqs)
    rollout = torch.zeros_like(log_ratio.detach())
    if rollout_logp is not None:
        rollout = masked_segment_sum(old_logp.detach().double() - rollout_logp.detach().double(), mask, token_seq,
                                     num_seqs)
    return torch.stack([log_ratio, segment_count(mask, token_seq, num_seqs), rollout])


def loss_sums(
    *, logp: Tensor, old_logp: Tensor, mask: Tensor, token_seq: Tensor, num_seqs: int,
    rollout_logp: Tensor | None = None, rollout_correction: RolloutCorrectionConfig | None = None,
) -> Tensor:
    """[3, B] float64 per-sequence sums of the loss inputs over this process's tokens (see the module doc);
    row 0 keeps the graph to `logp`. Validates shapes."""
    _check_shapes(logp, old_logp=old_logp, mask=mask, token_seq=token_seq, rollout_logp=rollout_logp)
    check_token_seq(token_seq, num_seqs)
    mask = mask.bool()
    keep = token_keep(mask, old_logp, rollout_logp, rollout_correction)
    # Clamp before the sum (the authors' numerics): one runaway token cannot decide log W alone.
    log_ratio = (logp.double() - old_logp.detach().double()).clamp(-TOKEN_LOG_RATIO_CLAMP, TOKEN_LOG_RATIO_CLAMP)
    log_w = masked_segment_sum(log_ratio, keep, token_seq, num_seqs)
    rollout = masked_segment_sum(rollout_token_term(mask, old_logp, rollout_logp, rollout_correction), mask,
                                 token_seq, num_seqs)
    return torch.stack([log_w, segment_count(keep, token_seq, num_seqs), rollout])


def inputs_from_sums(
    sums: Tensor, *, logp: Tensor, old_logp: Tensor, mask: Tensor, token_seq: Tensor, advantages: Tensor,
    rollout_logp: Tensor | None = None, rollout_correction: RolloutCorrectionConfig | None = None,
) -> LossInputs:
    """LossInputs from [3, B] sums of whole sequences (`loss_sums`, completed over CP by the caller), with the
    rejection of a masked-IS `rollout_correction` applied: `mask` keeps only the accepted tokens."""
    mask = mask.bool()
    seq_keep = sequence_keep(sums[2].detach(), sums[1].detach(), rollout_correction)
    keep = token_keep(mask, old_logp, rollout_logp, rollout_correction) & seq_keep[token_seq.long()]
    zero = torch.zeros_like(sums[0])
    return LossInputs(
        logp=logp, old_logp=old_logp, mask=keep, token_seq=token_seq, advantages=advantages,
        seq_log_ratio=torch.where(seq_keep, sums[0], zero),
        seq_num_tokens=torch.where(seq_keep, sums[1], zero).detach(), rollout_logp=rollout_logp,
        seq_rollout_log_ratio=sums[2].detach() if rollout_logp is not None else None,
        rejected=mask & ~keep if rollout_correction is not None and rollout_correction.mode == "mis" else None,
        rollout_correction=rollout_correction,
    )


def build_local_inputs(
    *,
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    token_seq: Tensor,
    num_seqs: int,
    advantages: Tensor,
    rollout_logp: Tensor | None = None,
    rollout_correction: RolloutCorrectionConfig | None = None,
) -> LossInputs:
    """LossInputs for tokens [T] of `num_seqs` whole sequences; `seq_log_ratio` keeps the graph to `logp`.
    Pass the loss config's `rollout_correction` when it rejects (mis) or folds (fold, fold_tis)."""
    sums = loss_sums(logp=logp, old_logp=old_logp, mask=mask, token_seq=token_seq, num_seqs=num_seqs,
                     rollout_logp=rollout_logp, rollout_correction=rollout_correction)
    return inputs_from_sums(sums, logp=logp, old_logp=old_logp, mask=mask, token_seq=token_seq,
                            advantages=advantages, rollout_logp=rollout_logp, rollout_correction=rollout_correction)
