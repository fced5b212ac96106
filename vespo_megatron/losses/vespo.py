"""VESPO (arXiv 2602.10693): variational sequence-level soft policy optimisation.

Shape legend: [T] tokens, [B] sequences, token_seq [T] -> [0, B).

    log W_b = sum_t m_t clamp(log pi - log mu, +-20)    whole sequence, no length normalisation; each token
                                                        clamped before the sum (the authors' numerics; the
                                                        caller all-reduces the sum over context parallelism)
              [+ sum_t m_t log rho_t]                   fold / fold_tis: W = pi_theta / pi_rollout
    log W   = clamp(log W, +-20)
    log phi = c1 * max(log W, log 1e-8) + c2 * (1 - W)  (c1, c2) = c_pos if A_b >= 0 else c_neg, c2 >= 1e-4
                                                        (the authors' floors); phi(1) = 1
    phi     = exp(log phi), detached
    loss    = -sum_t m_t * phi_b * A_b * log pi_t   aggregated with the global normaliser

so d loss / d log pi_t = -phi_b * A_b * m_t * weight_t (weight_t = 1 / N_tokens for token_mean).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vespo_megatron.base.metric import Metric, Reduce, masked_metrics

from .common import finish, stats_requests, token_log_ratio
from .config import FOLD_MODES, VespoConfig
from .rollout_terms import FOLD_TIS_FLOOR, TOKEN_LOG_RATIO_CLAMP
from .types import LossInputs, LossNormalizer, LossOutput

__all__ = ["vespo_phi", "vespo_loss"]


def vespo_phi(
    seq_log_ratio: Tensor,
    seq_advantage: Tensor,
    c_pos: tuple[float, float] = (2.0, 3.0),
    c_neg: tuple[float, float] = (3.0, 2.0),
    *,
    log_w_clamp: float = 20.0,
    w_floor: float = 1e-8,
    c2_floor: float = 1e-4,
    return_log: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """[B] detached phi(W) for sequence log-weights `seq_log_ratio` [B] and advantages [B].

    Computed in float64 log space, exponentiated last, with the authors' numerics: log W clamped to
    +-log_w_clamp, the c1 term taken of max(W, w_floor), c2 raised to c2_floor (0 turns a floor off); any
    finite input gives a finite phi. Returns phi (and log phi when `return_log`) in the dtype of
    `seq_log_ratio`.
    """
    if seq_log_ratio.shape != seq_advantage.shape:
        raise ValueError(
            f"vespo_phi: seq_advantage must have the shape of seq_log_ratio {tuple(seq_log_ratio.shape)}, "
            f"got {tuple(seq_advantage.shape)}"
        )
    if not log_w_clamp > 0:
        raise ValueError(f"vespo_phi: log_w_clamp must be positive, got {log_w_clamp}")
    log_w = seq_log_ratio.detach().double().clamp(-log_w_clamp, log_w_clamp)
    positive = seq_advantage.detach() >= 0
    # (one float64 tensor and a python scalar per where: the scalar stays float64, as a second full_like would;
    # the c2 floor is applied to the scalars, the same as clamping the result)
    c1 = torch.where(positive, torch.full_like(log_w, c_pos[0]), c_neg[0])
    c2 = torch.where(positive, torch.full_like(log_w, max(c_pos[1], c2_floor)), max(c_neg[1], c2_floor))
    # The floor acts on the c1 term only (authors: log(W.clamp(min=1e-8))); 1 - W uses the clamped W.
    log_w_c1 = log_w.clamp(min=math.log(w_floor)) if w_floor > 0 else log_w
    log_phi = c1 * log_w_c1 - c2 * torch.expm1(log_w)  # 1 - W = -(e^{log W} - 1), exact near W = 1
    out_dtype = seq_log_ratio.dtype if seq_log_ratio.is_floating_point() else torch.float32
    phi = torch.exp(log_phi).to(out_dtype)
    return (phi, log_phi.to(out_dtype)) if return_log else phi


def vespo_loss(inputs: LossInputs, normalizer: LossNormalizer, cfg: VespoConfig | None = None) -> LossOutput:
    cfg = cfg or VespoConfig()
    metrics: dict[str, Metric] = {}
    token_log_ratio(inputs, metrics)  # metrics only: VESPO's weight is sequence-level
    adv = inputs.sequence_advantages()
    seq_len = inputs.seq_num_tokens.to(torch.float64)
    log_w = inputs.seq_log_ratio.detach().to(torch.float64)
    rc = cfg.rollout_correction
    if rc.mode in FOLD_MODES:
        if inputs.seq_rollout_log_ratio is None or inputs.rollout_logp is None:
            raise ValueError(f"LossInputs.rollout_logp: rollout_correction.mode={rc.mode!r} needs it, got None")
        # The row was clamped / truncated per token when the inputs were built (checked in finish()).
        log_w = log_w + inputs.seq_rollout_log_ratio.detach().to(torch.float64)
        log_rho = (inputs.old_logp.detach() - inputs.rollout_logp.detach()).double()
        if rc.mode == "fold":
            cut = log_rho.abs() > TOKEN_LOG_RATIO_CLAMP
        else:
            cut = (log_rho > math.log(rc.upper)) | (log_rho < math.log(FOLD_TIS_FLOOR))
        metrics["rollout_corr/fold_clamped_frac"] = Metric.mean((cut & inputs.mask).double(), inputs.mask)
    if cfg.length_norm == "sqrt":
        log_w = log_w / seq_len.clamp(min=1.0).sqrt()
    elif cfg.length_norm == "lin":
        log_w = log_w / seq_len.clamp(min=1.0)
    phi = vespo_phi(log_w, adv, cfg.c_pos, cfg.c_neg, log_w_clamp=cfg.log_w_clamp, w_floor=cfg.w_floor,
                    c2_floor=cfg.c2_floor)

    has_tokens = seq_len > 0
    pos, neg = has_tokens & (adv >= 0), has_tokens & (adv < 0)
    floored = log_w.clamp(-cfg.log_w_clamp, cfg.log_w_clamp) < (math.log(cfg.w_floor) if cfg.w_floor > 0 else -math.inf)
    metrics.update(masked_metrics(has_tokens, [  # one stacked reduction for all the sequence-level metrics
        *stats_requests("vespo/phi_pos", phi, pos), *stats_requests("vespo/phi_neg", phi, neg),
        *stats_requests("vespo/log_w_pos", log_w, pos), *stats_requests("vespo/log_w_neg", log_w, neg),
        ("vespo/log_w_clamped_frac", log_w.abs() > cfg.log_w_clamp, Reduce.MEAN),
        ("vespo/w_floored_frac", floored, Reduce.MEAN)]))

    seq = inputs.token_seq.long()
    coeff = (phi * adv.to(phi.dtype))[seq].to(inputs.logp.dtype)
    logp = torch.where(inputs.mask, inputs.logp, torch.zeros_like(inputs.logp))
    return finish(-coeff * logp, inputs, cfg, normalizer, metrics, seq_phi=phi.detach(), seq_log_w=log_w.detach())
