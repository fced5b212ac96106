"""Typed inputs and outputs of the policy losses.

Shape legend (all tensors are local to one rank and one micro-batch):
    [T]  response-and-prompt tokens of the micro-batch, flattened (packed THD or padded [B, S] -> [B*S]);
         under context parallelism only this rank's share of each sequence
    [B]  sequences of the micro-batch (the same B sequences on every context-parallel rank)
    token_seq [T] int64 in [0, B): which sequence each token belongs to

Sequence-level quantities ([B]) are computed *upstream* by the caller, after any context-parallel
all-reduce (see `vespo_megatron.parallel.sequence`), and global normalisers are computed once per global
batch (all micro-batches, all data-parallel ranks). The loss functions never communicate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from vespo_megatron.base.metric import Metric

from .config import RolloutCorrectionConfig
from .segments import check_token_seq

__all__ = ["LossInputs", "LossNormalizer", "LossOutput"]


@dataclass(frozen=True)
class LossNormalizer:
    """Global denominators for one optimizer step, computed once upstream.

    num_tokens: loss tokens (response tokens not rejected by masked IS) over the whole global batch (all
                micro-batches, all DP ranks).
    num_seqs:   sequences with at least one loss token over the same global batch.
    """

    num_tokens: float
    num_seqs: float

    def __post_init__(self) -> None:
        for name in ("num_tokens", "num_seqs"):
            value = float(getattr(self, name))
            if not value > 0:
                raise ValueError(f"LossNormalizer.{name}: expected a positive count, got {value}")


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch's inputs to a policy loss (local to this rank).

    logp:             [T] log pi_theta(y_t) under the current policy, with grad
    old_logp:         [T] log mu(y_t), the behaviour policy (trainer's old-log-prob pass, or the engine)
    mask:             [T] bool, tokens that count in the loss: response tokens not rejected by a masked-IS
                      rollout correction (rejection is applied when the inputs are built)
    token_seq:        [T] int64, sequence index of each token in [0, B)
    advantages:       [B] per-sequence advantages, or [T] per-token advantages
    seq_log_ratio:    [B] sum_t mask_t * clamp(logp_t - old_logp_t, -20, 20) over the *whole* sequence
                      (already all-reduced over context parallelism; 0 for a rejected sequence). GSPO with
                      gradient='sequence' requires it to carry grad; the other losses detach it.
    seq_num_tokens:   [B] loss-token count of each whole sequence (all context-parallel shards)
    rollout_logp:     [T] optional log-probs reported by the rollout engine (for rollout correction)
    seq_rollout_log_ratio: [B] optional sum over the response tokens of the rollout term of
                      `rollout_correction` (sum_t log rho_t; clamped or truncated per token for the folds)
    rejected:         [T] bool, response tokens removed by masked IS (None unless mode='mis'); for metrics
    rollout_correction: the correction the inputs were built for (None: none); a loss whose config rejects
                      or folds checks that it matches
    """

    logp: Tensor
    old_logp: Tensor
    mask: Tensor
    token_seq: Tensor
    advantages: Tensor
    seq_log_ratio: Tensor
    seq_num_tokens: Tensor
    rollout_logp: Tensor | None = None
    seq_rollout_log_ratio: Tensor | None = None
    rejected: Tensor | None = None
    rollout_correction: RolloutCorrectionConfig | None = None

    def __post_init__(self) -> None:
        num_tokens = self.logp.shape
        if self.logp.dim() != 1:
            raise ValueError(f"LossInputs.logp: expected a 1-D [T] tensor, got shape {tuple(num_tokens)}")
        for name in ("old_logp", "mask", "token_seq", "rollout_logp", "rejected"):
            value = getattr(self, name)
            if value is not None and value.shape != num_tokens:
                raise ValueError(
                    f"LossInputs.{name}: expected shape {tuple(num_tokens)} (same as logp), "
                    f"got {tuple(value.shape)}"
                )
        if self.mask.dtype != torch.bool:
            raise ValueError(f"LossInputs.mask: expected dtype torch.bool, got {self.mask.dtype}")
        if self.token_seq.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"LossInputs.token_seq: expected an integer dtype, got {self.token_seq.dtype}")
        if self.seq_log_ratio.dim() != 1:
            raise ValueError(
                f"LossInputs.seq_log_ratio: expected a 1-D [B] tensor, got shape {tuple(self.seq_log_ratio.shape)}"
            )
        num_seqs = self.seq_log_ratio.shape
        for name in ("seq_num_tokens", "seq_rollout_log_ratio"):
            value = getattr(self, name)
            if value is not None and value.shape != num_seqs:
                raise ValueError(
                    f"LossInputs.{name}: expected shape {tuple(num_seqs)} (same as seq_log_ratio), "
                    f"got {tuple(value.shape)}"
                )
        if self.advantages.shape not in (num_seqs, num_tokens):
            raise ValueError(
                f"LossInputs.advantages: expected shape [B]={tuple(num_seqs)} or [T]={tuple(num_tokens)}, "
                f"got {tuple(self.advantages.shape)}"
            )
        check_token_seq(self.token_seq, num_seqs[0])
        if (self.rollout_logp is None) != (self.seq_rollout_log_ratio is None):
            raise ValueError(
                "LossInputs.rollout_logp and LossInputs.seq_rollout_log_ratio: expected both or neither, got "
                f"rollout_logp={'set' if self.rollout_logp is not None else 'None'}, seq_rollout_log_ratio="
                f"{'set' if self.seq_rollout_log_ratio is not None else 'None'}"
            )

    @property
    def num_seqs(self) -> int:
        return self.seq_log_ratio.shape[0]

    def token_advantages(self) -> Tensor:
        """[T] advantages (broadcast from [B] when per-sequence); zero where masked out."""
        adv = self.advantages[self.token_seq] if self.advantages.shape == self.seq_log_ratio.shape else self.advantages
        return torch.where(self.mask, adv, torch.zeros_like(adv))

    def sequence_advantages(self) -> Tensor:
        """[B] advantages for sequence-level losses; per-token advantages must be constant per sequence."""
        if self.advantages.shape == self.seq_log_ratio.shape:
            return self.advantages
        adv = self.advantages.detach()
        seq = self.token_seq.long()
        big = torch.finfo(adv.dtype).max
        lo = torch.full((self.num_seqs,), big, dtype=adv.dtype, device=adv.device).scatter_reduce(
            0, seq, torch.where(self.mask, adv, torch.full_like(adv, big)), "amin"
        )
        hi = torch.full((self.num_seqs,), -big, dtype=adv.dtype, device=adv.device).scatter_reduce(
            0, seq, torch.where(self.mask, adv, torch.full_like(adv, -big)), "amax"
        )
        has_tokens = lo <= hi
        spread = torch.where(has_tokens, hi - lo, torch.zeros_like(hi))
        tol = 1e-6 * (1.0 + torch.maximum(lo.abs(), hi.abs()))
        bad = (spread > torch.where(has_tokens, tol, torch.zeros_like(tol))).nonzero().flatten()
        if bad.numel() > 0:
            b = int(bad[0])
            raise ValueError(
                "LossInputs.advantages: a sequence-level loss needs advantages constant within each sequence; "
                f"sequence {b} has values in [{float(lo[b])}, {float(hi[b])}] ({bad.numel()} such sequences)"
            )
        return torch.where(has_tokens, lo, torch.zeros_like(lo))


@dataclass(frozen=True)
class LossOutput:
    """loss: this rank's share of the globally normalised loss (shares sum to the global loss).
    metrics: name -> Metric, each with its reduction. seq_phi / seq_log_w: [B] detached, when defined."""

    loss: Tensor
    metrics: dict[str, Metric] = field(default_factory=dict)
    seq_phi: Tensor | None = None
    seq_log_w: Tensor | None = None
