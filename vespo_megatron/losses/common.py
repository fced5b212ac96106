"""Pieces shared by every policy loss: the clamped token log-ratio and the final weighting/aggregation.

Shape legend: [T] tokens, [B] sequences.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vespo_megatron.base.metric import Metric

from .aggregation import aggregate
from .config import _LossConfigBase
from .rollout_correction import rollout_correction
from .rollout_terms import TOKEN_LOG_RATIO_CLAMP
from .types import LossInputs, LossNormalizer, LossOutput

__all__ = ["TOKEN_LOG_RATIO_CLAMP", "token_log_ratio", "finish", "sequence_stats"]


def token_log_ratio(inputs: LossInputs, metrics: dict[str, Metric]) -> Tensor:
    """[T] log(pi/mu) per token, zero where masked out, clamped to +-20 (counted in the metrics)."""
    raw = torch.where(inputs.mask, inputs.logp - inputs.old_logp.detach(), torch.zeros_like(inputs.logp))
    clamped = raw.clamp(-TOKEN_LOG_RATIO_CLAMP, TOKEN_LOG_RATIO_CLAMP)
    metrics["ratio/log_ratio_clamped_frac"] = Metric.mean((clamped != raw).double(), inputs.mask)
    metrics["ratio/log_ratio_abs_mean"] = Metric.mean(clamped.abs(), inputs.mask)
    metrics["ratio/log_ratio_max"] = Metric.max(clamped, inputs.mask)
    return clamped


def finish(
    token_loss: Tensor,
    inputs: LossInputs,
    cfg: _LossConfigBase,
    normalizer: LossNormalizer,
    metrics: dict[str, Metric],
    **extra: Tensor,
) -> LossOutput:
    """Apply rollout correction (weights / masks), aggregate with the global normaliser, add the loss metric."""
    corr = rollout_correction(inputs, cfg.rollout_correction)
    metrics.update(corr.metrics)
    weighted = torch.where(corr.keep, token_loss * corr.token_weight.to(token_loss.dtype), torch.zeros_like(token_loss))
    loss = aggregate(weighted, inputs, cfg.aggregation, normalizer)
    metrics["loss"] = Metric.sum(loss)
    response = inputs.mask if inputs.rejected is None else inputs.mask | inputs.rejected
    metrics["num_response_tokens"] = Metric.sum(response.double().sum())
    metrics["num_loss_tokens"] = Metric.sum(inputs.mask.double().sum())
    return LossOutput(loss=loss, metrics=metrics, **extra)


def sequence_stats(prefix: str, values: Tensor, where: Tensor, metrics: dict[str, Metric]) -> None:
    """mean / max / min of a [B] tensor over the sequences in `where`."""
    metrics[f"{prefix}_mean"] = Metric.mean(values, where)
    metrics[f"{prefix}_max"] = Metric.max(values, where)
    metrics[f"{prefix}_min"] = Metric.min(values, where)
