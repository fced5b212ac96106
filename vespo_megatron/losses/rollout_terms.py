"""What a rollout correction changes in the loss *inputs*, before any loss runs. Pure, no communication.

Shape legend: [T] tokens, [B] sequences. log rho_t = log pi_old_train(y_t) - log pi_rollout(y_t).

Masked IS (mis) depends only on the behaviour and engine log-probs, both known before the step, so the
rejection is decided upstream: the loss, the global normaliser, the per-sequence sums (log W, |y|) and the
gradients then all see the same kept tokens, as in verl (which rewrites `response_mask`). A token-level
decision is local to the token; a sequence/geometric decision needs the whole sequence's sum of log rho,
which the caller completes over context parallelism first (`sequence_keep` takes the reduced sums).

The rollout row of the per-sequence sums is, per mode:
    none, tis, mis   sum_t log rho_t                              (sequence/geometric TIS and MIS statistics)
    fold             sum_t clamp(log rho_t, -20, 20)              (W = pi_theta / pi_rollout)
    fold_tis         sum_t max(min(log rho_t, log upper), log 1e-8)   (the authors' code: verl's TIS weight)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import RolloutCorrectionConfig

__all__ = ["TOKEN_LOG_RATIO_CLAMP", "FOLD_TIS_FLOOR", "token_keep", "rollout_token_term", "sequence_keep"]

# exp(20) ~ 4.9e8: beyond it a token ratio only produces inf/NaN. The authors', TRL's, Liger's and verl's
# clamp. Clamped tokens are counted in `ratio/log_ratio_clamped_frac`.
TOKEN_LOG_RATIO_CLAMP = 20.0
# The authors take log(rollout_is_weights.clamp(min=1e-8)) before folding.
FOLD_TIS_FLOOR = 1e-8


def _log_rho(mask: Tensor, old_logp: Tensor, rollout_logp: Tensor) -> Tensor:
    """[T] float64 log rho, zero outside `mask` (padding may hold NaN)."""
    raw = old_logp.detach().double() - rollout_logp.detach().double()
    return torch.where(mask, raw, torch.zeros_like(raw))


def _outside(log_stat: Tensor, cfg: RolloutCorrectionConfig) -> Tensor:
    lower = cfg.effective_lower
    log_lower = math.log(lower) if lower > 0 else -math.inf
    return (log_stat > math.log(cfg.upper)) | (log_stat < log_lower)


def token_keep(mask: Tensor, old_logp: Tensor, rollout_logp: Tensor | None,
               cfg: RolloutCorrectionConfig | None) -> Tensor:
    """[T] bool: `mask` minus the tokens a token-level MIS rejects (just `mask` for anything else)."""
    mask = mask.bool()
    if cfg is None or cfg.mode != "mis" or cfg.level != "token":
        return mask
    if rollout_logp is None:
        raise ValueError("LossInputs.rollout_logp: rollout_correction.mode='mis' needs the rollout engine's log-probs, got None")
    return mask & ~_outside(_log_rho(mask, old_logp, rollout_logp), cfg)


def rollout_token_term(mask: Tensor, old_logp: Tensor, rollout_logp: Tensor | None,
                       cfg: RolloutCorrectionConfig | None) -> Tensor:
    """[T] float64 per-token term of the rollout row (zeros without `rollout_logp`); see the module doc."""
    if rollout_logp is None:
        if cfg is not None and cfg.mode != "none":
            raise ValueError(f"LossInputs.rollout_logp: rollout_correction.mode={cfg.mode!r} needs the rollout engine's "
                             "log-probs, got None")
        return torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
    log_rho = _log_rho(mask.bool(), old_logp, rollout_logp)
    if cfg is not None and cfg.mode == "fold":
        return log_rho.clamp(-TOKEN_LOG_RATIO_CLAMP, TOKEN_LOG_RATIO_CLAMP)
    if cfg is not None and cfg.mode == "fold_tis":
        return log_rho.clamp(math.log(FOLD_TIS_FLOOR), math.log(cfg.upper))
    return log_rho


def sequence_keep(seq_rollout_log_ratio: Tensor, seq_num_tokens: Tensor,
                  cfg: RolloutCorrectionConfig | None) -> Tensor:
    """[B] bool: False for the sequences a sequence/geometric MIS rejects. Takes whole-sequence sums
    (completed over CP): sum_t log rho_t and the response-token count."""
    keep = torch.ones(seq_rollout_log_ratio.shape, dtype=torch.bool, device=seq_rollout_log_ratio.device)
    if cfg is None or cfg.mode != "mis" or cfg.level == "token":
        return keep
    stat = seq_rollout_log_ratio.double()
    if cfg.level == "geometric":
        stat = stat / seq_num_tokens.double().clamp(min=1.0)
    return keep & ~_outside(stat, cfg)
