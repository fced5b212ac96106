"""Independent float64 references for the policy losses: plain Python loops over sequences and tokens.

Written from the formulas (vespo.md, the baseline papers) and the peers' published semantics, not from the
library: phi is computed directly as max(W, 1e-8)**c1 * exp(c2 * (1 - W)), ratios with math.exp,
aggregation by explicit sums. The semantics each reference pins, with its source:

- VESPO (the authors' `compute_policy_loss_vespo`): token log-ratios clamped to +-20 before the sum; log W
  clamped to +-20; the c1 term of max(W, 1e-8); c2 at least 1e-4; phi detached.
  fold: + sum_t clamp(log rho_t, +-20) (W = pi / pi_rollout); fold_tis: + sum_t log max(min(rho_t, C), 1e-8)
  (the authors fold verl's truncated token TIS weight).
- masked IS (verl's rollout rejection, which rewrites response_mask): rejected tokens leave the loss, the
  normaliser (global token / sequence counts), |y| in seq_mean_token_mean, log W and GSPO's s; the rejection
  statistic itself is over all response tokens.
- GSPO (verl's `compute_policy_loss_gspo`, the GSPO paper's GSPO-token): token t carries
  s_t = sg[s] * pi_t / sg[pi_t], log s clamped from above at 10, times its own correction weight;
  gradient='sequence' differentiates s itself instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RefSeq:
    logp: list  # list of 0-d float64 tensors (requires grad) or floats
    old: list[float]
    mask: list[bool]
    adv: float
    rollout: list[float] | None = None


def _clamp(x, lo, hi):
    return max(lo, min(hi, x))


def _bounds(rc) -> tuple[float, float]:
    return (1.0 / rc.upper if rc.lower is None else rc.lower), rc.upper


def kept_tokens(seq: RefSeq, rc) -> list[int]:
    """Response tokens left after masked IS (all of them for any other mode)."""
    idx = [t for t in range(len(seq.mask)) if seq.mask[t]]
    if rc.mode != "mis":
        return idx
    lower, upper = _bounds(rc)
    if rc.level == "token":
        return [t for t in idx if lower <= math.exp(seq.old[t] - seq.rollout[t]) <= upper]
    log_rho = sum(seq.old[t] - seq.rollout[t] for t in idx)
    if rc.level == "geometric":
        log_rho /= max(len(idx), 1)
    return idx if lower <= math.exp(log_rho) <= upper else []


def reference_normalizer(seqs: list[RefSeq], rc) -> tuple[float, float]:
    """(loss tokens, sequences with at least one loss token) after masked IS."""
    kept = [kept_tokens(s, rc) for s in seqs]
    num_tokens, num_seqs = float(sum(len(k) for k in kept)), float(sum(1 for k in kept if k))
    if rc.mode == "mis":  # everything rejected: any positive denominator gives 0
        num_tokens, num_seqs = max(num_tokens, 1.0), max(num_seqs, 1.0)
    return num_tokens, num_seqs


def _tis_weight(seq: RefSeq, t: int, idx: list[int], rc) -> float:
    if rc.mode != "tis":
        return 1.0
    if rc.level == "token":
        log_rho = seq.old[t] - seq.rollout[t]
    else:
        log_rho = sum(seq.old[i] - seq.rollout[i] for i in idx)
        if rc.level == "geometric":
            log_rho /= max(len(idx), 1)
    return min(math.exp(log_rho), rc.upper)


def _token_weight(n_kept: int, mode: str, num_tokens: float, num_seqs: float) -> float:
    if mode == "token_mean":
        return 1.0 / num_tokens
    if mode == "seq_mean_token_sum":
        return 1.0 / num_seqs
    return 1.0 / max(n_kept, 1) / num_seqs


def _vespo_phi(seq: RefSeq, kept: list[int], idx: list[int], cfg) -> float:
    log_w = sum(_clamp(float(seq.logp[t].detach()) - seq.old[t], -20.0, 20.0) for t in kept)
    rc = cfg.rollout_correction
    if rc.mode == "fold":
        log_w += sum(_clamp(seq.old[t] - seq.rollout[t], -20.0, 20.0) for t in idx)
    elif rc.mode == "fold_tis":
        log_w += sum(math.log(max(min(math.exp(seq.old[t] - seq.rollout[t]), rc.upper), 1e-8)) for t in idx)
    n = len(kept)
    if cfg.length_norm == "sqrt" and n:
        log_w /= math.sqrt(n)
    elif cfg.length_norm == "lin" and n:
        log_w /= n
    log_w = _clamp(log_w, -cfg.log_w_clamp, cfg.log_w_clamp)
    c1, c2 = cfg.c_pos if seq.adv >= 0 else cfg.c_neg
    c2 = max(c2, cfg.c2_floor)
    W = math.exp(log_w)
    return max(W, cfg.w_floor) ** c1 * math.exp(c2 * (1.0 - W))


def reference_loss(name: str, seqs: list[RefSeq], cfg, num_tokens: float | None = None,
                   num_seqs: float | None = None):
    """(loss, phis) of the whole batch; the normaliser defaults to `reference_normalizer`."""
    rc = cfg.rollout_correction
    if num_tokens is None or num_seqs is None:
        num_tokens, num_seqs = reference_normalizer(seqs, rc)
    total = torch.zeros((), dtype=torch.float64)
    phis = []
    for seq in seqs:
        idx = [t for t in range(len(seq.mask)) if seq.mask[t]]
        kept = kept_tokens(seq, rc)
        n = len(kept)
        A = seq.adv
        if name.startswith("vespo"):
            phi = _vespo_phi(seq, kept, idx, cfg)
            phis.append(phi)
        elif name == "gspo" and n:
            log_s = sum(torch.clamp(seq.logp[t] - seq.old[t], -20.0, 20.0) for t in kept) / n
        for t in kept:
            lp = seq.logp[t]
            if name.startswith("vespo"):
                term = -phi * A * lp
            elif name == "grpo":
                r = torch.exp(lp - seq.old[t])
                term = -torch.minimum(r * A, torch.clamp(r, 1 - cfg.eps_low, 1 + cfg.eps_high) * A)
                if cfg.dual_clip is not None and A < 0:
                    term = torch.minimum(term, torch.tensor(-cfg.dual_clip * A, dtype=torch.float64))
            elif name == "gspo":
                if cfg.gradient == "token":
                    log_st = log_s.detach() + lp - lp.detach()  # sg[s] * pi_t / sg[pi_t]
                else:
                    log_st = log_s
                s = torch.exp(torch.clamp(log_st, max=cfg.log_ratio_max))
                term = -torch.minimum(s * A, torch.clamp(s, 1 - cfg.eps_low, 1 + cfg.eps_high) * A)
            elif name == "sapo":
                r = torch.exp(lp - seq.old[t])
                tau = cfg.tau_pos if A > 0 else cfg.tau_neg
                term = -torch.sigmoid(tau * (r - 1.0)) * 4.0 / tau * A
            elif name == "reinforce":
                term = -A * lp
            else:
                raise AssertionError(name)
            w = _tis_weight(seq, t, idx, rc)
            total = total + term * w * _token_weight(n, cfg.aggregation, num_tokens, num_seqs)
    return total, phis
