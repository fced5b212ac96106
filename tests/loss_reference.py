"""Independent float64 references for the policy losses: plain Python loops over sequences and tokens.

Written from the formulas (vespo.md, the baseline papers), not from the library: phi is computed directly
as W**c1 * exp(c2 * (1 - W)), ratios with math.exp, aggregation by explicit sums.
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


def _n(seq: RefSeq) -> int:
    return sum(seq.mask)


def _rollout_weight(seq: RefSeq, t: int, rc) -> tuple[float, bool]:
    """(weight, keep) of token t under the rollout correction config `rc`."""
    if rc.mode in ("none", "fold"):
        return 1.0, True
    if rc.level == "token":
        log_rho = seq.old[t] - seq.rollout[t]
    else:
        log_rho = sum(seq.old[i] - seq.rollout[i] for i in range(len(seq.mask)) if seq.mask[i])
        if rc.level == "geometric":
            log_rho /= max(_n(seq), 1)
    if rc.mode == "tis":
        return min(math.exp(log_rho), rc.upper), True
    lower = 1.0 / rc.upper if rc.lower is None else rc.lower
    rho = math.exp(log_rho)
    return 1.0, lower <= rho <= rc.upper


def _token_weight(seq: RefSeq, mode: str, num_tokens: float, num_seqs: float) -> float:
    if mode == "token_mean":
        return 1.0 / num_tokens
    if mode == "seq_mean_token_sum":
        return 1.0 / num_seqs
    return 1.0 / max(_n(seq), 1) / num_seqs


def reference_loss(name: str, seqs: list[RefSeq], cfg, num_tokens: float, num_seqs: float):
    total = torch.zeros((), dtype=torch.float64)
    phis = []
    for seq in seqs:
        idx = [t for t in range(len(seq.mask)) if seq.mask[t]]
        n = len(idx)
        A = seq.adv
        seq_term = None
        if name.startswith("vespo"):
            log_w = sum(float(seq.logp[t].detach()) - seq.old[t] for t in idx)
            if cfg.rollout_correction.mode == "fold":
                log_w += sum(seq.old[t] - seq.rollout[t] for t in idx)
            if cfg.length_norm == "sqrt" and n:
                log_w /= math.sqrt(n)
            elif cfg.length_norm == "lin" and n:
                log_w /= n
            log_w = max(-cfg.log_w_clamp, min(cfg.log_w_clamp, log_w))
            c1, c2 = cfg.c_pos if A >= 0 else cfg.c_neg
            W = math.exp(log_w)
            phi = W**c1 * math.exp(c2 * (1.0 - W))
            phis.append(phi)
        elif name == "gspo":
            if n:
                log_s = sum(seq.logp[t] - seq.old[t] for t in idx) / n
                s = torch.exp(log_s)
                s_clip = torch.clamp(s, 1 - cfg.eps_low, 1 + cfg.eps_high)
                seq_term = -torch.minimum(s * A, s_clip * A)
        for t in idx:
            lp = seq.logp[t]
            if name.startswith("vespo"):
                term = -phi * A * lp
            elif name == "grpo":
                r = torch.exp(lp - seq.old[t])
                term = -torch.minimum(r * A, torch.clamp(r, 1 - cfg.eps_low, 1 + cfg.eps_high) * A)
                if cfg.dual_clip is not None and A < 0:
                    term = torch.minimum(term, torch.tensor(-cfg.dual_clip * A, dtype=torch.float64))
            elif name == "gspo":
                term = seq_term
            elif name == "sapo":
                r = torch.exp(lp - seq.old[t])
                tau = cfg.tau_pos if A > 0 else cfg.tau_neg
                term = -torch.sigmoid(tau * (r - 1.0)) * 4.0 / tau * A
            elif name == "reinforce":
                term = -A * lp
            else:
                raise AssertionError(name)
            w, keep = _rollout_weight(seq, t, cfg.rollout_correction)
            if keep:
                total = total + term * w * _token_weight(seq, cfg.aggregation, num_tokens, num_seqs)
    return total, phis
