"""Baseline policy losses: GRPO/PPO token clip, GSPO, SAPO, REINFORCE.

Shape legend: [T] tokens, [B] sequences, token_seq [T] -> [0, B). Each loss returns this rank's share of
the globally normalised loss (see aggregation.py) and its metrics.
"""

from __future__ import annotations

import torch

from vespo_megatron.base.metric import Metric, Reduce, masked_metrics

from .common import finish, stats_requests, token_log_ratio
from .config import GSPOConfig, PPOClipConfig, ReinforceConfig, SAPOConfig
from .types import LossInputs, LossNormalizer, LossOutput

__all__ = ["grpo_loss", "gspo_loss", "sapo_loss", "reinforce_loss"]


def grpo_loss(inputs: LossInputs, normalizer: LossNormalizer, cfg: PPOClipConfig | None = None) -> LossOutput:
    """l_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A), r_t = pi/mu per token; optional dual clip
    bounds negative-advantage losses by dual_clip * |A|."""
    cfg = cfg or PPOClipConfig()
    metrics: dict[str, Metric] = {}
    ratio = torch.exp(token_log_ratio(inputs, metrics))
    adv = inputs.token_advantages().to(ratio.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    mask = inputs.mask
    # (masked_metrics selects `mask`: the fractions need no `mask &` of their own)
    requests = [("grpo/clip_frac_high", (adv > 0) & (ratio > 1.0 + cfg.eps_high), Reduce.MEAN),
                ("grpo/clip_frac_low", (adv < 0) & (ratio < 1.0 - cfg.eps_low), Reduce.MEAN)]
    if cfg.dual_clip is not None:
        bound = -cfg.dual_clip * adv  # positive where adv < 0
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        requests.append(("grpo/dual_clip_frac", dual, Reduce.MEAN))
    metrics.update(masked_metrics(mask, requests))
    return finish(loss, inputs, cfg, normalizer, metrics)


def gspo_loss(inputs: LossInputs, normalizer: LossNormalizer, cfg: GSPOConfig | None = None) -> LossOutput:
    """s_b = exp(log W_b / |y_b|) over the kept tokens, log s clamped from above at `log_ratio_max`;
    l = -min(s A, clip(s) A), carried by every loss token of sequence b and aggregated like the token losses
    (default seq_mean_token_mean).

    gradient='token' (verl): token t's copy is evaluated at s_t = sg[s_b] * exp(log pi_t - sg[log pi_t]),
    equal to s_b in value, so token t's gradient is its own (times its own correction weight).
    gradient='sequence': the copies are evaluated at s_b itself and the gradient flows through
    `seq_log_ratio` (which the caller all-reduces with an autograd-aware collective under CP)."""
    cfg = cfg or GSPOConfig()
    metrics: dict[str, Metric] = {}
    token_log_ratio(inputs, metrics)
    if cfg.gradient == "sequence" and not inputs.seq_log_ratio.requires_grad and inputs.logp.requires_grad:
        raise ValueError(
            "LossInputs.seq_log_ratio: GSPO with gradient='sequence' differentiates through the sequence "
            "log-ratio; expected a tensor that requires grad (build it with the autograd-aware reduction), got "
            "a detached tensor"
        )
    adv = inputs.sequence_advantages()
    seq = inputs.token_seq.long()
    seq_len = inputs.seq_num_tokens.to(inputs.seq_log_ratio.dtype).clamp(min=1.0)
    raw = inputs.seq_log_ratio / seq_len  # [B]
    if cfg.gradient == "token":
        logp = torch.where(inputs.mask, inputs.logp, torch.zeros_like(inputs.logp))  # no NaN from padding
        log_s = (logp - logp.detach()).to(raw.dtype) + raw.detach()[seq]  # [T], value log s_b
    else:
        log_s = raw[seq]  # [T], gradient through s_b
    log_s = log_s.clamp(max=cfg.log_ratio_max)
    s = torch.exp(log_s)
    a = adv.to(s.dtype)[seq]
    token_loss = -torch.minimum(s * a, s.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * a)
    s_b = torch.exp(raw.detach().clamp(max=cfg.log_ratio_max))
    a_b = adv.to(s_b.dtype)
    has_tokens = inputs.seq_num_tokens > 0
    clip = ((a_b > 0) & (s_b > 1.0 + cfg.eps_high)) | ((a_b < 0) & (s_b < 1.0 - cfg.eps_low))
    metrics.update(masked_metrics(has_tokens, [
        ("gspo/seq_clip_frac", clip, Reduce.MEAN),
        ("gspo/log_ratio_clamped_frac", raw.detach() > cfg.log_ratio_max, Reduce.MEAN),
        *stats_requests("gspo/seq_ratio", s_b)]))
    return finish(token_loss.to(inputs.logp.dtype), inputs, cfg, normalizer, metrics)


def sapo_loss(inputs: LossInputs, normalizer: LossNormalizer, cfg: SAPOConfig | None = None) -> LossOutput:
    """l_t = -f(r_t) A, f(r) = sigmoid(tau (r - 1)) * 4 / tau, tau = tau_pos (A > 0) or tau_neg (A <= 0);
    f'(1) = 1, so on-policy SAPO has the REINFORCE gradient, and the gate decays smoothly off-policy."""
    cfg = cfg or SAPOConfig()
    metrics: dict[str, Metric] = {}
    ratio = torch.exp(token_log_ratio(inputs, metrics))
    adv = inputs.token_advantages().to(ratio.dtype)
    tau = torch.where(adv > 0, torch.full_like(ratio, cfg.tau_pos), torch.full_like(ratio, cfg.tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
    # d gate / d log r = 4 sigma (1 - sigma) r: the soft trust region's effective gradient scale.
    sig = torch.sigmoid(tau * (ratio - 1.0))
    metrics["sapo/grad_scale_mean"] = Metric.mean((4.0 * sig * (1.0 - sig) * ratio).detach(), inputs.mask)
    return finish(-gate * adv, inputs, cfg, normalizer, metrics)


def reinforce_loss(inputs: LossInputs, normalizer: LossNormalizer, cfg: ReinforceConfig | None = None) -> LossOutput:
    """l_t = -A log pi_t."""
    cfg = cfg or ReinforceConfig()
    metrics: dict[str, Metric] = {}
    token_log_ratio(inputs, metrics)
    logp = torch.where(inputs.mask, inputs.logp, torch.zeros_like(inputs.logp))
    adv = inputs.token_advantages().to(logp.dtype)
    return finish(-adv * logp, inputs, cfg, normalizer, metrics)
