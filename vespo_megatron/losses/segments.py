"""Segment (per-sequence) reductions over flattened token tensors. Pure, no communication.

Shape legend: [T] tokens, [B] sequences, token_seq [T] int64 in [0, B).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vespo_megatron.base.host_checks import host_checked

__all__ = ["masked_segment_sum", "segment_count", "check_token_seq"]


def check_token_seq(token_seq: Tensor, num_seqs: int) -> None:
    """ValueError unless every entry of `token_seq` lies in [0, num_seqs) (a device read, unless the caller
    checked its host copy: `base.host_checks.checked_on_host(token_seq=True)`)."""
    if token_seq.numel() > 0 and not host_checked("token_seq"):
        lo, hi = int(token_seq.min()), int(token_seq.max())
        if lo < 0 or hi >= num_seqs:
            raise ValueError(f"LossInputs.token_seq: expected values in [0, {num_seqs}), got range [{lo}, {hi}]")


def masked_segment_sum(values: Tensor, mask: Tensor, token_seq: Tensor, num_seqs: int) -> Tensor:
    """[B] sum of `values` [T] over the masked-in tokens of each sequence.

    Masked-out positions may hold NaN or inf (padding): they are replaced by zero *before* the sum, so
    neither the value nor the gradient sees them. Differentiable in `values`.
    """
    clean = torch.where(mask, values, torch.zeros_like(values))
    out = torch.zeros(num_seqs, dtype=values.dtype, device=values.device)
    return out.index_add(0, token_seq.long(), clean)


def segment_count(mask: Tensor, token_seq: Tensor, num_seqs: int) -> Tensor:
    """[B] number of masked-in tokens of each sequence (float64: exact up to 2**53)."""
    out = torch.zeros(num_seqs, dtype=torch.float64, device=mask.device)
    return out.index_add(0, token_seq.long(), mask.to(torch.float64))
