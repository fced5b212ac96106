"""Turn per-token losses into this rank's share of the globally normalised loss.

Shape legend: [T] tokens, [B] sequences. The normaliser is global (whole step, all DP ranks) and comes
from the caller, so shares computed on any split of the batch (micro-batches, DP, CP) add up to the loss of
the whole batch computed in one process:

    token_mean          sum_t m_t l_t / N_tokens                           (default, as the VESPO authors)
    seq_mean_token_sum  sum_t m_t l_t / N_seqs
    seq_mean_token_mean sum_t m_t l_t / |y_b(t)| / N_seqs                  (|y_b| over the whole sequence)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .types import LossInputs, LossNormalizer

__all__ = ["aggregate", "token_weights"]


def token_weights(inputs: LossInputs, mode: str, normalizer: LossNormalizer) -> Tensor:
    """[T] the factor each token's loss is multiplied by (zero where masked out); float64."""
    mask = inputs.mask.to(torch.float64)
    if mode == "token_mean":
        return mask / normalizer.num_tokens
    if mode == "seq_mean_token_sum":
        return mask / normalizer.num_seqs
    if mode == "seq_mean_token_mean":
        seq_len = inputs.seq_num_tokens.to(torch.float64)[inputs.token_seq.long()]
        return torch.where(inputs.mask, 1.0 / seq_len.clamp(min=1.0), torch.zeros_like(seq_len)) / normalizer.num_seqs
    raise ValueError(f"aggregation: expected token_mean, seq_mean_token_sum or seq_mean_token_mean, got {mode!r}")


def aggregate(token_loss: Tensor, inputs: LossInputs, mode: str, normalizer: LossNormalizer) -> Tensor:
    """Scalar share of the global loss. `token_loss` [T] may hold anything (NaN too) where masked out."""
    weights = token_weights(inputs, mode, normalizer).to(token_loss.dtype)
    clean = torch.where(inputs.mask, token_loss, torch.zeros_like(token_loss))
    return (clean * weights).sum()
