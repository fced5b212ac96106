"""Training/rollout mismatch metrics and per-batch statistics, as pure functions returning `Metric`s.

Shape legend (local to one rank and one micro-batch, as in `vespo_megatron.losses.types`):
    [T]  tokens of the micro-batch, flattened; under context parallelism only this rank's share
    [B]  sequences of the micro-batch (the same B sequences on every context-parallel rank)
    token_seq [T] int64 in [0, B): which sequence each token belongs to

Conventions. d_t = log p_train(y_t) - log p_rollout(y_t) is the per-token log importance ratio and
rho_t = exp(d_t) = p_train / p_rollout the token IS weight; a sequence's log weight is S_b = sum_t d_t over its
response tokens and W_b = exp(S_b) its IS weight. Tokens are sampled from the rollout policy, so the KL
estimates below estimate KL(rollout || train) = E_{y ~ rollout}[log p_rollout(y) - log p_train(y)].

Every metric says how it reduces (`Reduce`); merge micro-batches with `merge_metrics`, ranks with
`all_reduce_metrics` (over data x context parallelism), turn into numbers with `finalize_metrics` and add the
derived values (perplexities, ESS) with `derive_mismatch` -- `finalize_mismatch` does the last two.
Token metrics are MEANs over the response tokens (`mask`), so each context-parallel rank adds its share.
Sequence metrics are MEANs over the sequences with at least one response token: every context-parallel rank
holds the same B sequences and, given the whole-sequence sums, contributes the same values, so the mean is
unchanged by the replication (counts are therefore reported as fractions, never as SUMs).

Masked-out positions may hold NaN or inf (padding): they are replaced before any arithmetic. Everything is
computed in float64 on detached tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from vespo_megatron.base.metric import Metric, finalize_metrics
from vespo_megatron.losses import masked_segment_sum, segment_count
from vespo_megatron.losses.segments import check_token_seq

__all__ = [
    "LOG_RATIO_CAP",
    "mismatch_metrics",
    "derive_mismatch",
    "finalize_mismatch",
    "staleness_histogram",
    "response_stats",
    "entropy_metrics",
]

# exp(2 * 300) ~ 1e260: squares of capped weights, and sums of many of them, stay finite in float64.
LOG_RATIO_CAP = 300.0


def mismatch_metrics(
    train_logp: Tensor,
    rollout_logp: Tensor,
    mask: Tensor,
    token_seq: Tensor,
    num_seqs: int,
    *,
    seq_log_ratio: Tensor | None = None,
    seq_num_tokens: Tensor | None = None,
    log_ratio_cap: float = LOG_RATIO_CAP,
    prefix: str = "mismatch",
) -> dict[str, Metric]:
    """Mismatch between the trainer's and the rollout engine's log-probs of the sampled tokens.

    train_logp:     [T] log p_train(y_t) (the trainer's, e.g. the old-log-prob pass), detached here
    rollout_logp:   [T] log p_rollout(y_t) reported by the engine
    mask:           [T] bool, the response tokens that count in the loss
    token_seq:      [T] sequence index of each token, in [0, num_seqs)
    seq_log_ratio:  [B] optional S_b = sum_t mask_t * (train_logp_t - rollout_logp_t) over the *whole*
                    sequence (already all-reduced over context parallelism)
    seq_num_tokens: [B] optional response-token count of each whole sequence; required with seq_log_ratio.
                    When both are absent they are computed from this rank's tokens, which is only right
                    without context parallelism.

    Metrics (name under `prefix`/, reduction):
        log_ratio_abs_mean       MEAN  mean_t |d_t|
        log_ratio_abs_max        MAX   max_t |d_t|
        kl_k1                    MEAN  mean_t (-d_t)                      KL(rollout || train), unbiased, noisy
        kl_k3                    MEAN  mean_t (exp(d_t) - d_t - 1)        KL(rollout || train), unbiased, >= 0
        train_nll_mean           MEAN  mean_t (-log p_train)              -> train_ppl in derive_mismatch
        rollout_nll_mean         MEAN  mean_t (-log p_rollout)            -> rollout_ppl, ppl_ratio
        chi2_token               MEAN  mean_t (rho_t^2 - 1)
        token_is_weight_mean     MEAN  mean_t rho_t                       -> token_is_weight_ess
        token_is_weight_sq_mean  MEAN  mean_t rho_t^2
        token_log_ratio_capped_frac MEAN  fraction of tokens with d_t > log_ratio_cap
        seq_log_ratio_abs_mean   MEAN  mean_b |S_b|
        seq_log_ratio_abs_max    MAX   max_b |S_b|
        chi2_seq                 MEAN  mean_b (W_b^2 - 1)
        seq_is_weight_mean       MEAN  mean_b W_b                         -> seq_is_weight_ess
        seq_is_weight_sq_mean    MEAN  mean_b W_b^2
        seq_log_ratio_capped_frac MEAN fraction of sequences with S_b > log_ratio_cap

    The exponentials (k3, chi2, IS weights) use min(d, log_ratio_cap) and min(S, log_ratio_cap) so they stay
    finite; the capped fractions say when that happened (the affected means are then lower bounds).
    Non-finite log-probs at masked-in tokens (an engine reporting -inf) are not hidden: the uncapped metrics
    (|d|, k1, the NLLs) then read inf or NaN.
    """
    if train_logp.dim() != 1:
        raise ValueError(f"mismatch_metrics: train_logp must be 1-D [T], got shape {tuple(train_logp.shape)}")
    for name, value in (("rollout_logp", rollout_logp), ("mask", mask), ("token_seq", token_seq)):
        if value.shape != train_logp.shape:
            raise ValueError(
                f"mismatch_metrics: {name} must have the shape of train_logp {tuple(train_logp.shape)}, "
                f"got {tuple(value.shape)}"
            )
    if mask.dtype != torch.bool:
        raise ValueError(f"mismatch_metrics: mask must be torch.bool, got {mask.dtype}")
    if (seq_log_ratio is None) != (seq_num_tokens is None):
        raise ValueError("mismatch_metrics: pass both seq_log_ratio and seq_num_tokens, or neither")
    if not log_ratio_cap > 0:
        raise ValueError(f"mismatch_metrics: log_ratio_cap must be positive, got {log_ratio_cap}")
    check_token_seq(token_seq, num_seqs)

    zeros = torch.zeros(train_logp.shape, dtype=torch.float64, device=train_logp.device)
    lp_train = torch.where(mask, train_logp.detach().double(), zeros)
    lp_rollout = torch.where(mask, rollout_logp.detach().double(), zeros)
    d = lp_train - lp_rollout  # 0 where masked out
    d_cap = d.clamp(max=log_ratio_cap)

    if seq_log_ratio is None:
        seq_d = masked_segment_sum(d, mask, token_seq, num_seqs)
        seq_len = segment_count(mask, token_seq, num_seqs)
    else:
        assert seq_num_tokens is not None
        for name, value in (("seq_log_ratio", seq_log_ratio), ("seq_num_tokens", seq_num_tokens)):
            if value.shape != (num_seqs,):
                raise ValueError(f"mismatch_metrics: {name} must have shape [B]=({num_seqs},), got {tuple(value.shape)}")
        seq_len = seq_num_tokens.detach().double()
        seq_d = seq_log_ratio.detach().double()
    has_tokens = seq_len > 0
    seq_d = torch.where(has_tokens, seq_d, torch.zeros_like(seq_d))
    seq_d_cap = seq_d.clamp(max=log_ratio_cap)

    rho = torch.exp(d_cap)
    w = torch.exp(seq_d_cap)
    p = f"{prefix}/"
    return {
        p + "log_ratio_abs_mean": Metric.mean(d.abs(), mask),
        p + "log_ratio_abs_max": Metric.max(d.abs(), mask),
        p + "kl_k1": Metric.mean(-d, mask),
        p + "kl_k3": Metric.mean(torch.expm1(d_cap) - d_cap, mask),
        p + "train_nll_mean": Metric.mean(-lp_train, mask),
        p + "rollout_nll_mean": Metric.mean(-lp_rollout, mask),
        p + "chi2_token": Metric.mean(torch.expm1(2.0 * d_cap), mask),
        p + "token_is_weight_mean": Metric.mean(rho, mask),
        p + "token_is_weight_sq_mean": Metric.mean(rho * rho, mask),
        p + "token_log_ratio_capped_frac": Metric.mean((d > log_ratio_cap).double(), mask),
        p + "seq_log_ratio_abs_mean": Metric.mean(seq_d.abs(), has_tokens),
        p + "seq_log_ratio_abs_max": Metric.max(seq_d.abs(), has_tokens),
        p + "chi2_seq": Metric.mean(torch.expm1(2.0 * seq_d_cap), has_tokens),
        p + "seq_is_weight_mean": Metric.mean(w, has_tokens),
        p + "seq_is_weight_sq_mean": Metric.mean(w * w, has_tokens),
        p + "seq_log_ratio_capped_frac": Metric.mean((seq_d > log_ratio_cap).double(), has_tokens),
    }


def _exp(x: float) -> float:
    """exp that overflows to inf (math.exp raises) and keeps NaN."""
    if math.isnan(x):
        return x
    return math.exp(x) if x < 709.0 else math.inf


def _ess(m1: float, m2: float) -> float:
    return m1 * m1 / m2 if m2 > 0 else math.nan


def derive_mismatch(values: Mapping[str, float], prefix: str = "mismatch") -> dict[str, float]:
    """`values` (reduced, finalized numbers) plus the values derived from reduced means:

        train_ppl   = exp(train_nll_mean)        rollout_ppl = exp(rollout_nll_mean)
        ppl_ratio   = train_ppl / rollout_ppl = exp(train_nll_mean - rollout_nll_mean)
        token_is_weight_ess = E[rho]^2 / E[rho^2],  seq_is_weight_ess = E[W]^2 / E[W^2]   (in (0, 1])

    Keys whose inputs are absent are not added.
    """
    out = dict(values)
    p = f"{prefix}/"
    train, rollout = values.get(p + "train_nll_mean"), values.get(p + "rollout_nll_mean")
    if train is not None:
        out[p + "train_ppl"] = _exp(train)
    if rollout is not None:
        out[p + "rollout_ppl"] = _exp(rollout)
    if train is not None and rollout is not None:
        out[p + "ppl_ratio"] = _exp(train - rollout)
    for level in ("token", "seq"):
        m1, m2 = values.get(f"{p}{level}_is_weight_mean"), values.get(f"{p}{level}_is_weight_sq_mean")
        if m1 is not None and m2 is not None:
            out[f"{p}{level}_is_weight_ess"] = _ess(m1, m2)
    return out


def finalize_mismatch(metrics: Mapping[str, Metric], prefix: str = "mismatch") -> dict[str, float]:
    """`finalize_metrics` followed by `derive_mismatch`: the numbers to log."""
    return derive_mismatch(finalize_metrics(dict(metrics)), prefix=prefix)


def staleness_histogram(versions_lag: Tensor, *, max_lag: int = 4, prefix: str = "staleness") -> dict[str, Metric]:
    """How many policy versions behind the trainer each sample was generated.

    versions_lag: [B] integer lag of each sequence (0 = generated by the current weights).
    Metrics: `lag_{k}` for k < max_lag and `lag_{max_lag}_plus` (SUM counts; always the same names, so every
    rank reduces the same set), `mean` (MEAN) and `max` (MAX).

    SUM counts add over every rank that calls this: call it once per sequence (for example on context-parallel
    rank 0 of each data-parallel rank, or once on the driver for the global batch).
    """
    if max_lag < 1:
        raise ValueError(f"staleness_histogram: max_lag must be >= 1, got {max_lag}")
    if versions_lag.dim() != 1:
        raise ValueError(f"staleness_histogram: versions_lag must be 1-D [B], got shape {tuple(versions_lag.shape)}")
    if versions_lag.is_floating_point() or versions_lag.is_complex():
        raise ValueError(f"staleness_histogram: versions_lag must be an integer tensor, got {versions_lag.dtype}")
    lag = versions_lag.detach().long()
    if lag.numel() > 0 and int(lag.min()) < 0:
        raise ValueError(f"staleness_histogram: lags must be >= 0, got min {int(lag.min())}")
    counts = torch.bincount(lag.clamp(max=max_lag), minlength=max_lag + 1).double()
    p = f"{prefix}/"
    out = {f"{p}lag_{k}": Metric.sum(counts[k]) for k in range(max_lag)}
    out[f"{p}lag_{max_lag}_plus"] = Metric.sum(counts[max_lag])
    out[p + "mean"] = Metric.mean(lag.double())
    out[p + "max"] = Metric.max(lag.double())
    return out


def response_stats(lengths: Tensor, rewards: Tensor | None = None, *, binary: bool | None = None) -> dict[str, Metric]:
    """Response lengths and rewards of a batch of sequences.

    lengths: [B] response lengths (tokens); rewards: [B] optional scalar rewards.
    Metrics: `response/length_mean` (MEAN), `response/length_max` (MAX), `response/length_min` (MIN),
    `reward/mean` (MEAN), `reward/max`, `reward/min`, and `reward/frac_correct` (MEAN of reward == 1) when the
    rewards are binary. `binary=None` detects it from this batch (all rewards in {0, 1}); pass True/False when
    several ranks reduce together, so that all emit the same names. NaN rewards are ValueErrors.
    All are MEAN/MAX/MIN, so calling it on every context-parallel rank of a sequence does not change them.
    """
    if lengths.dim() != 1:
        raise ValueError(f"response_stats: lengths must be 1-D [B], got shape {tuple(lengths.shape)}")
    n = lengths.detach().double()
    out = {
        "response/length_mean": Metric.mean(n),
        "response/length_max": Metric.max(n),
        "response/length_min": Metric.min(n),
    }
    if rewards is None:
        return out
    if rewards.shape != lengths.shape:
        raise ValueError(
            f"response_stats: rewards must have the shape of lengths {tuple(lengths.shape)}, got {tuple(rewards.shape)}"
        )
    r = rewards.detach().double()
    if bool(torch.isnan(r).any()):
        raise ValueError("response_stats: rewards contain NaN")
    is_binary = bool(((r == 0) | (r == 1)).all())
    if binary is None:
        binary = is_binary
    elif binary and not is_binary:
        raise ValueError("response_stats: binary=True but some rewards are not in {0, 1}")
    out["reward/mean"] = Metric.mean(r)
    out["reward/max"] = Metric.max(r)
    out["reward/min"] = Metric.min(r)
    if binary:
        out["reward/frac_correct"] = Metric.mean((r == 1).double())
    return out


def entropy_metrics(entropy: Tensor, mask: Tensor) -> dict[str, Metric]:
    """`entropy/token_mean` (MEAN) and `entropy/token_max` (MAX) of per-token entropies [T] over `mask`
    (e.g. the `entropy` of `vespo_megatron.parallel.vocab_parallel`'s output)."""
    if entropy.shape != mask.shape:
        raise ValueError(
            f"entropy_metrics: entropy and mask must have the same shape, got {tuple(entropy.shape)} and "
            f"{tuple(mask.shape)}"
        )
    h = entropy.detach().double()
    h = torch.where(mask, h, torch.zeros_like(h))
    return {"entropy/token_mean": Metric.mean(h, mask), "entropy/token_max": Metric.max(h, mask)}
