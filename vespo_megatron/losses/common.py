"""Pieces shared by every policy loss: the clamped token log-ratio and the final weighting/aggregation.

Shape legend: [T] tokens, [B] sequences.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vespo_megatron.base.metric import Metric, Reduce, masked_metrics

from .aggregation import aggregate
from .config import _LossConfigBase
from .rollout_correction import rollout_correction
from .rollout_terms import TOKEN_LOG_RATIO_CLAMP
from .types import LossInputs, LossNormalizer, LossOutput

__all__ = ["TOKEN_LOG_RATIO_CLAMP", "token_log_ratio", "finish", "stats_requests"]


def token_log_ratio(inputs: LossInputs, metrics: dict[str, Metric]) -> Tensor:
    """[T] log(pi/mu) per token, zero where masked out, clamped to +-20 (counted in the metrics)."""
    raw = torch.where(inputs.mask, inputs.logp - inputs.old_logp.detach(), torch.zeros_like(inputs.logp))
    clamped = raw.clamp(-TOKEN_LOG_RATIO_CLAMP, TOKEN_LOG_RATIO_CLAMP)
    metrics.update(masked_metrics(inputs.mask, [("ratio/log_ratio_clamped_frac", clamped != raw, Reduce.MEAN),
                                                 ("ratio/log_ratio_abs_mean", clamped.abs(), Reduce.MEAN),
                                                 ("ratio/log_ratio_max", clamped, Reduce.MAX)]))
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


def stats_requests(prefix: str, values: Tensor, where: Tensor | None = None) -> list[tuple]:
    """`masked_metrics` requests for mean / max / min of `values` over `where` (prefix_mean, _max, _min)."""
    return [(f"{prefix}_mean", values, Reduce.MEAN, where), (f"{prefix}_max", values, Reduce.MAX, where),
            (f"{prefix}_min", values, Reduce.MIN, where)]
