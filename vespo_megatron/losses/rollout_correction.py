"""Rollout correction (train/inference mismatch), composable with every policy loss.

Shape legend: [T] tokens, [B] sequences. rho_t = pi_old_train(y_t) / pi_rollout(y_t), handled in log space.

    tis  token:     w_t = min(rho_t, upper)                         multiplies each token's loss (detached)
         sequence:  w_b = min(prod_t rho_t, upper)
         geometric: w_b = min(exp(mean_t log rho_t), upper)
    mis  the same ratios, but tokens (token level) or whole sequences (sequence/geometric level) whose ratio
         lies outside [lower, upper] are dropped. The drop happens when the inputs are built
         (`rollout_terms`), so here `inputs.mask` already holds the kept tokens; this module only counts them.
    fold, fold_tis (VESPO) handled in the inputs' rollout row and vespo.py: log W += the row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vespo_megatron.base.metric import Metric, Reduce, masked_metrics

from .config import RolloutCorrectionConfig
from .types import LossInputs

__all__ = ["RolloutCorrection", "rollout_correction"]


@dataclass(frozen=True)
class RolloutCorrection:
    """token_weight [T] (detached, 1 where no correction) and keep [T] (bool: tokens left in the loss)."""

    token_weight: Tensor
    keep: Tensor
    metrics: dict[str, Metric]


def _log_rho(inputs: LossInputs, level: str) -> tuple[Tensor, Tensor]:
    """(log ratio per token [T], the level's per-token log ratio [T] to threshold); masked tokens give 0."""
    assert inputs.rollout_logp is not None and inputs.seq_rollout_log_ratio is not None
    zeros = torch.zeros_like(inputs.old_logp)
    token = torch.where(inputs.mask, inputs.old_logp.detach() - inputs.rollout_logp.detach(), zeros)
    seq = inputs.token_seq.long()
    if level == "token":
        return token, token
    seq_log = inputs.seq_rollout_log_ratio.detach().to(token.dtype)
    if level == "geometric":
        seq_log = seq_log / inputs.seq_num_tokens.to(token.dtype).clamp(min=1.0)
    return token, seq_log[seq]


def _upstream(cfg: RolloutCorrectionConfig | None) -> RolloutCorrectionConfig | None:
    return cfg if cfg is not None and cfg.shapes_inputs else None


def check_inputs_built_for(inputs: LossInputs, cfg: RolloutCorrectionConfig) -> None:
    """ValueError unless the inputs were built for the same rejecting / folding correction as the loss's
    (a rejection the normaliser and the sums never saw would silently change the loss)."""
    if _upstream(inputs.rollout_correction) != _upstream(cfg):
        raise ValueError(
            f"LossInputs.rollout_correction: expected the inputs built for the loss's rollout correction "
            f"{_upstream(cfg)!r} (pass rollout_correction= to build_local_inputs / build_loss_inputs / "
            f"global_normalizer), got {_upstream(inputs.rollout_correction)!r}"
        )


def rollout_correction(inputs: LossInputs, cfg: RolloutCorrectionConfig) -> RolloutCorrection:
    check_inputs_built_for(inputs, cfg)
    ones = torch.ones_like(inputs.logp).detach()
    if cfg.mode in ("none", "fold", "fold_tis"):
        return RolloutCorrection(ones, inputs.mask, {})
    if inputs.rollout_logp is None:
        raise ValueError(
            f"LossInputs.rollout_logp: rollout_correction.mode={cfg.mode!r} needs the rollout engine's "
            "log-probs, got None"
        )
    token_log, level_log = _log_rho(inputs, cfg.level)
    mask = inputs.mask
    metrics: dict[str, Metric] = {}
    requests = [("rollout_corr/log_rho_abs_mean", token_log.abs(), Reduce.MEAN)]  # over `mask`, below
    log_upper = math.log(cfg.upper)
    if cfg.mode == "tis":
        clipped = mask & (level_log > log_upper)
        weight = torch.exp(torch.clamp(level_log, max=log_upper)).to(ones.dtype)
        weight = torch.where(mask, weight, ones)
        requests.append(("rollout_corr/tis_clip_frac", clipped, Reduce.MEAN))
        keep = mask
    else:
        # Rejected upstream: `mask` holds the kept tokens, `rejected` the dropped ones.
        assert inputs.rejected is not None
        response = mask | inputs.rejected
        keep = mask
        weight = ones
        metrics["rollout_corr/mis_masked_frac"] = Metric.mean(inputs.rejected.double(), response)
        metrics["rollout_corr/mis_masked_tokens"] = Metric.sum(inputs.rejected.double().sum())
    # Effective sample size of the raw IS ratios at this level over the loss tokens (for mis: the kept ones),
    # ESS = E[w]^2 / E[w^2] after reduction (log ratio capped at 300 so that w^2 stays finite in float64; a
    # cap that fires drives ESS to ~0).
    w = torch.exp(level_log.double().clamp(max=300.0))
    requests += [("rollout_corr/is_weight_mean", w, Reduce.MEAN), ("rollout_corr/is_weight_sq_mean", w * w, Reduce.MEAN)]
    metrics.update(masked_metrics(mask, requests))
    return RolloutCorrection(weight.detach(), keep, metrics)
