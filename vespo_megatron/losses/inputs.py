"""Building `LossInputs` in one process (no context parallelism): sequence sums computed locally.

Distributed callers use `vespo_megatron.parallel.sequence.build_loss_inputs`, which all-reduces the same
[B] sums over the context-parallel group.
"""

from __future__ import annotations

from torch import Tensor

from .segments import check_token_seq, masked_segment_sum, segment_count
from .types import LossInputs

__all__ = ["build_local_inputs"]


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
    for name, value in (("old_logp", old_logp), ("mask", mask), ("token_seq", token_seq), ("rollout_logp", rollout_logp)):
        if value is not None and value.shape != logp.shape:
            raise ValueError(
                f"LossInputs.{name}: expected shape {tuple(logp.shape)} (same as logp), got {tuple(value.shape)}"
            )
    check_token_seq(token_seq, num_seqs)
    mask = mask.bool()
    seq_log_ratio = masked_segment_sum(logp - old_logp.detach(), mask, token_seq, num_seqs)
    seq_rollout = None
    if rollout_logp is not None:
        seq_rollout = masked_segment_sum(old_logp.detach() - rollout_logp.detach(), mask, token_seq, num_seqs)
    return LossInputs(
        logp=logp, old_logp=old_logp, mask=mask, token_seq=token_seq, advantages=advantages,
        seq_log_ratio=seq_log_ratio, seq_num_tokens=segment_count(mask, token_seq, num_seqs),
        rollout_logp=rollout_logp, seq_rollout_log_ratio=seq_rollout,
    )
