"""Building `LossInputs` in one process (no context parallelism): sequence sums computed locally.

Distributed callers use `vespo_megatron.parallel.sequence.build_loss_inputs`, which all-reduces the same
[B] sums over the context-parallel group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .segments import check_token_seq, masked_segment_sum, segment_count
from .types import LossInputs

__all__ = ["build_local_inputs", "sequence_sums", "inputs_from_sums"]


def sequence_sums(
    *, logp: Tensor, old_logp: Tensor, mask: Tensor, token_seq: Tensor, num_seqs: int,
    rollout_logp: Tensor | None = None,
) -> Tensor:
    """[3, B] float64 per-sequence sums over this process's tokens: log W (keeps the graph to `logp`), the
    response-token count, and the rollout log-ratio sum (zeros without `rollout_logp`). Validates shapes."""
    for name, value in (("old_logp", old_logp), ("mask", mask), ("token_seq", token_seq), ("rollout_logp", rollout_logp)):
        if value is not None and value.shape != logp.shape:
            raise ValueError(
                f"LossInputs.{name}: expected shape {tuple(logp.shape)} (same as logp), got {tuple(value.shape)}"
            )
    check_token_seq(token_seq, num_seqs)
    mask = mask.bool()
    log_ratio = masked_segment_sum(logp.double() - old_logp.detach().double(), mask, token_seq, num_seqs)
    rollout = torch.zeros_like(log_ratio.detach())
    if rollout_logp is not None:
        rollout = masked_segment_sum(old_logp.detach().double() - rollout_logp.detach().double(), mask, token_seq,
                                     num_seqs)
    return torch.stack([log_ratio, segment_count(mask, token_seq, num_seqs), rollout])


def inputs_from_sums(
    sums: Tensor, *, logp: Tensor, old_logp: Tensor, mask: Tensor, token_seq: Tensor, advantages: Tensor,
    rollout_logp: Tensor | None = None,
) -> LossInputs:
    """LossInputs from [3, B] sums of whole sequences (`sequence_sums`, completed over CP by the caller)."""
    return LossInputs(
        logp=logp, old_logp=old_logp, mask=mask.bool(), token_seq=token_seq, advantages=advantages,
        seq_log_ratio=sums[0], seq_num_tokens=sums[1].detach(), rollout_logp=rollout_logp,
        seq_rollout_log_ratio=sums[2].detach() if rollout_logp is not None else None,
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
) -> LossInputs:
    """LossInputs for tokens [T] of `num_seqs` whole sequences; `seq_log_ratio` keeps the graph to `logp`."""
    sums = sequence_sums(logp=logp, old_logp=old_logp, mask=mask, token_seq=token_seq, num_seqs=num_seqs,
                         rollout_logp=rollout_logp)
    return inputs_from_sums(sums, logp=logp, old_logp=old_logp, mask=mask, token_seq=token_seq,
                            advantages=advantages, rollout_logp=rollout_logp)
