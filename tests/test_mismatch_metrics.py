"""Mismatch metrics against float64 loop references; identities; reduction across split "ranks"."""

from __future__ import annotations

import math

import pytest
import torch

from vespo_megatron.base.metric import Metric, Reduce, finalize_metrics, merge_metrics
from vespo_megatron.metrics import (
    derive_mismatch,
    entropy_metrics,
    finalize_mismatch,
    mismatch_metrics,
    response_stats,
    staleness_histogram,
)


def make_batch(seed: int, num_seqs: int = 6, num_tokens: int = 80, spread: float = 0.3):
    """Random log-probs with a mask, NaN/inf padding where masked out, and one sequence without tokens."""
    g = torch.Generator().manual_seed(seed)
    token_seq = torch.sort(torch.randint(0, num_seqs - 1, (num_tokens,), generator=g)).values  # seq B-1 empty
    mask = torch.rand(num_tokens, generator=g) < 0.75
    rollout = -torch.rand(num_tokens, generator=g, dtype=torch.float64) * 3
    train = rollout + spread * torch.randn(num_tokens, generator=g, dtype=torch.float64)
    train = torch.where(mask, train, torch.full_like(train, float("nan")))
    rollout = torch.where(mask, rollout, torch.full_like(rollout, float("-inf")))
    return train.float(), rollout.float(), mask, token_seq, num_seqs


def reference(train, rollout, mask, token_seq, num_seqs, cap=300.0):
    """Plain Python float64 loops over the masked tokens and the non-empty sequences."""
    toks = [(float(train[i]), float(rollout[i]), int(token_seq[i])) for i in range(len(mask)) if bool(mask[i])]
    n = len(toks)
    ds = [t - r for t, r, _ in toks]
    seq_sum = [0.0] * num_seqs
    seq_cnt = [0] * num_seqs
    for (_, _, b), d in zip(toks, ds, strict=True):
        seq_sum[b] += d
        seq_cnt[b] += 1
    seqs = [seq_sum[b] for b in range(num_seqs) if seq_cnt[b] > 0]
    m = len(seqs)
    rho = [math.exp(min(d, cap)) for d in ds]
    w = [math.exp(min(s, cap)) for s in seqs]
    out = {
        "log_ratio_abs_mean": sum(abs(d) for d in ds) / n,
        "log_ratio_abs_max": max(abs(d) for d in ds),
        "kl_k1": sum(r - t for t, r, _ in toks) / n,
        "kl_k3": sum(math.exp(min(d, cap)) - min(d, cap) - 1 for d in ds) / n,
        "train_nll_mean": sum(-t for t, _, _ in toks) / n,
        "rollout_nll_mean": sum(-r for _, r, _ in toks) / n,
        "chi2_token": sum(x * x - 1 for x in rho) / n,
        "token_is_weight_mean": sum(rho) / n,
        "token_is_weight_sq_mean": sum(x * x for x in rho) / n,
        "token_log_ratio_capped_frac": sum(d > cap for d in ds) / n,
        "seq_log_ratio_abs_mean": sum(abs(s) for s in seqs) / m,
        "seq_log_ratio_abs_max": max(abs(s) for s in seqs),
        "chi2_seq": sum(x * x - 1 for x in w) / m,
        "seq_is_weight_mean": sum(w) / m,
        "seq_is_weight_sq_mean": sum(x * x for x in w) / m,
        "seq_log_ratio_capped_frac": sum(s > cap for s in seqs) / m,
    }
    out["train_ppl"] = math.exp(out["train_nll_mean"])
    out["rollout_ppl"] = math.exp(out["rollout_nll_mean"])
    out["ppl_ratio"] = out["train_ppl"] / out["rollout_ppl"]
    out["token_is_weight_ess"] = out["token_is_weight_mean"] ** 2 / out["token_is_weight_sq_mean"]
    out["seq_is_weight_ess"] = out["seq_is_weight_mean"] ** 2 / out["seq_is_weight_sq_mean"]
    return {f"mismatch/{k}": v for k, v in out.items()}


def assert_close(got: dict[str, float], want: dict[str, float], rel=1e-9):
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=rel, abs=1e-12), k


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spread", [0.05, 0.5])
def test_against_loop_reference(seed, spread):
    train, rollout, mask, token_seq, num_seqs = make_batch(seed, spread=spread)
    got = finalize_mismatch(mismatch_metrics(train, rollout, mask, token_seq, num_seqs))
    assert_close(got, reference(train, rollout, mask, token_seq, num_seqs))


def test_reductions_declared():
    train, rollout, mask, token_seq, num_seqs = make_batch(0)
    metrics = mismatch_metrics(train, rollout, mask, token_seq, num_seqs)
    for name, m in metrics.items():
        want = Reduce.MAX if name.endswith("_max") else Reduce.MEAN
        assert m.reduce is want, name
        assert m.value.dtype == torch.float64


def test_identical_policies():
    train, _, mask, token_seq, num_seqs = make_batch(3)
    got = finalize_mismatch(mismatch_metrics(train, train.clone(), mask, token_seq, num_seqs))
    for key in ("kl_k1", "kl_k3", "chi2_token", "chi2_seq", "log_ratio_abs_mean", "log_ratio_abs_max",
                "seq_log_ratio_abs_max", "token_log_ratio_capped_frac"):
        assert got[f"mismatch/{key}"] == 0.0, key
    for key in ("token_is_weight_ess", "seq_is_weight_ess", "ppl_ratio", "token_is_weight_mean"):
        assert got[f"mismatch/{key}"] == 1.0, key
    assert got["mismatch/train_ppl"] == got["mismatch/rollout_ppl"] > 1.0


def test_kl_estimates_are_positive_and_agree_in_expectation():
    """Tokens drawn from a 'rollout' categorical, evaluated under a nearby 'train' one: k1 and k3 both
    estimate KL(rollout || train) computed exactly from the two distributions."""
    g = torch.Generator().manual_seed(7)
    logits_r = torch.randn(16, generator=g, dtype=torch.float64)
    logits_t = logits_r + 0.3 * torch.randn(16, generator=g, dtype=torch.float64)
    lp_r, lp_t = logits_r.log_softmax(0), logits_t.log_softmax(0)
    exact = float((lp_r.exp() * (lp_r - lp_t)).sum())
    y = torch.multinomial(lp_r.exp(), 200_000, replacement=True, generator=g)
    mask = torch.ones_like(y, dtype=torch.bool)
    got = finalize_mismatch(mismatch_metrics(lp_t[y], lp_r[y], mask, torch.zeros_like(y), 1))
    assert got["mismatch/kl_k3"] == pytest.approx(exact, rel=0.05)
    assert got["mismatch/kl_k1"] == pytest.approx(exact, rel=0.05)
    assert got["mismatch/token_is_weight_mean"] == pytest.approx(1.0, abs=0.01)  # E_rollout[rho] = 1


def test_split_across_ranks_then_merge_equals_unsplit():
    """Two data-parallel ranks (different sequences) and, for each, two context-parallel shards of the same
    sequences given the whole-sequence sums: merge_metrics + finalize equals the unsplit computation."""
    train, rollout, mask, token_seq, num_seqs = make_batch(4, num_tokens=120)
    full = finalize_mismatch(mismatch_metrics(train, rollout, mask, token_seq, num_seqs))

    parts = []
    for dp_seqs in (range(0, 3), range(3, num_seqs)):
        sel = torch.tensor([int(s) in dp_seqs for s in token_seq])
        t, r, m, ts = train[sel], rollout[sel], mask[sel], token_seq[sel] - dp_seqs[0]
        b = len(dp_seqs)
        d = torch.where(m, t.double() - r.double(), torch.zeros(len(t), dtype=torch.float64))
        seq_log_ratio = torch.zeros(b, dtype=torch.float64).index_add(0, ts, d)
        seq_num_tokens = torch.zeros(b, dtype=torch.float64).index_add(0, ts, m.double())
        shard = torch.arange(len(t)) % 2  # a CP-like interleaved split of every sequence
        for cp in (0, 1):
            on = shard == cp
            parts.append(mismatch_metrics(t[on], r[on], m[on], ts[on], b,
                                          seq_log_ratio=seq_log_ratio, seq_num_tokens=seq_num_tokens))
    merged = finalize_mismatch(merge_metrics(parts))
    assert_close(merged, full, rel=1e-12)


def test_sequence_metrics_use_given_sums():
    """With whole-sequence sums given, a CP shard's sequence metrics are those of the whole sequence, not of
    the shard; without them the local (shard) sums are used."""
    train, rollout, mask, token_seq, num_seqs = make_batch(5)
    seq_log_ratio = torch.linspace(-1.0, 2.0, num_seqs, dtype=torch.float64)
    seq_num_tokens = torch.tensor([3.0, 0.0, 5.0, 1.0, 2.0, 4.0], dtype=torch.float64)
    got = finalize_mismatch(mismatch_metrics(train, rollout, mask, token_seq, num_seqs,
                                             seq_log_ratio=seq_log_ratio, seq_num_tokens=seq_num_tokens))
    keep = seq_num_tokens > 0
    s = seq_log_ratio[keep]
    w = s.exp()
    assert got["mismatch/seq_log_ratio_abs_mean"] == pytest.approx(float(s.abs().mean()), rel=1e-12)
    assert got["mismatch/seq_log_ratio_abs_max"] == pytest.approx(2.0, rel=1e-12)
    assert got["mismatch/chi2_seq"] == pytest.approx(float((w * w - 1).mean()), rel=1e-12)
    assert got["mismatch/seq_is_weight_ess"] == pytest.approx(float(w.mean() ** 2 / (w * w).mean()), rel=1e-12)
    # token metrics are unaffected by the sequence sums
    local = finalize_mismatch(mismatch_metrics(train, rollout, mask, token_seq, num_seqs))
    assert got["mismatch/kl_k3"] == local["mismatch/kl_k3"]
    assert got["mismatch/chi2_seq"] != local["mismatch/chi2_seq"]
    with pytest.raises(ValueError, match="seq_num_tokens"):
        mismatch_metrics(train, rollout, mask, token_seq, num_seqs, seq_log_ratio=seq_log_ratio)


def test_cap_keeps_values_finite_and_counts():
    """A sequence log ratio of 2000 would overflow exp(2 S); it is capped and counted."""
    train = torch.tensor([0.0, -1.0, -2.0], dtype=torch.float64)
    rollout = torch.tensor([-1000.0, -1.0, -float("inf")], dtype=torch.float64)
    mask = torch.tensor([True, True, True])
    token_seq = torch.tensor([0, 1, 1])
    seq_log_ratio = torch.tensor([2000.0, 1.0], dtype=torch.float64)
    seq_num_tokens = torch.tensor([1.0, 2.0], dtype=torch.float64)
    got = finalize_mismatch(mismatch_metrics(train, rollout, mask, token_seq, 2,
                                             seq_log_ratio=seq_log_ratio, seq_num_tokens=seq_num_tokens))
    for key in ("kl_k3", "chi2_token", "chi2_seq", "token_is_weight_ess", "seq_is_weight_ess"):
        assert math.isfinite(got[f"mismatch/{key}"]), key
    assert got["mismatch/token_log_ratio_capped_frac"] == pytest.approx(2 / 3)
    assert got["mismatch/seq_log_ratio_capped_frac"] == pytest.approx(1 / 2)
    # the raw |d| is not capped: an infinite one surfaces (finalize_metrics reads an infinite MAX as NaN)
    assert not math.isfinite(got["mismatch/log_ratio_abs_max"])
    assert got["mismatch/kl_k1"] == -math.inf


def test_empty_mask_reads_nan():
    train, rollout, mask, token_seq, num_seqs = make_batch(6)
    got = finalize_mismatch(mismatch_metrics(train, rollout, torch.zeros_like(mask), token_seq, num_seqs))
    assert all(math.isnan(v) for v in got.values()), got


def test_derive_mismatch_only_adds_what_it_can():
    assert derive_mismatch({"x": 1.0}) == {"x": 1.0}
    out = derive_mismatch({"mismatch/train_nll_mean": 800.0, "mismatch/rollout_nll_mean": 799.0})
    assert out["mismatch/train_ppl"] == math.inf and out["mismatch/ppl_ratio"] == pytest.approx(math.e)


def test_staleness_histogram():
    lag = torch.tensor([0, 0, 1, 3, 7, 2, 0, 9])
    got = finalize_metrics(staleness_histogram(lag, max_lag=4))
    assert got == {"staleness/lag_0": 3.0, "staleness/lag_1": 1.0, "staleness/lag_2": 1.0, "staleness/lag_3": 1.0,
                   "staleness/lag_4_plus": 2.0, "staleness/mean": 22 / 8, "staleness/max": 9.0}
    # two ranks merge to the same result
    parts = [staleness_histogram(lag[:3], max_lag=4), staleness_histogram(lag[3:], max_lag=4)]
    assert finalize_metrics(merge_metrics(parts)) == got
    assert staleness_histogram(lag)["staleness/lag_0"].reduce is Reduce.SUM
    with pytest.raises(ValueError, match="lags must be >= 0"):
        staleness_histogram(torch.tensor([-1]))


def test_response_stats():
    lengths = torch.tensor([10, 20, 5, 65])
    got = finalize_metrics(response_stats(lengths, torch.tensor([1.0, 0.0, 1.0, 1.0])))
    assert got["response/length_mean"] == 25.0
    assert (got["response/length_max"], got["response/length_min"]) == (65.0, 5.0)
    assert got["reward/mean"] == 0.75 and got["reward/frac_correct"] == 0.75
    assert "reward/frac_correct" not in response_stats(lengths, torch.tensor([0.5, 0.0, 1.0, 1.0]))
    assert "reward/frac_correct" in response_stats(lengths[:1], torch.tensor([0.0]), binary=True)
    with pytest.raises(ValueError, match="binary=True"):
        response_stats(lengths, torch.tensor([0.5, 0.0, 1.0, 1.0]), binary=True)
    assert set(response_stats(lengths)) == {"response/length_mean", "response/length_max", "response/length_min"}


def test_entropy_metrics_ignore_masked_nan():
    h = torch.tensor([0.5, float("nan"), 1.5, 9.0])
    mask = torch.tensor([True, False, True, False])
    got = finalize_metrics(entropy_metrics(h, mask))
    assert got == {"entropy/token_mean": 1.0, "entropy/token_max": 1.5}
    assert isinstance(entropy_metrics(h, mask)["entropy/token_mean"], Metric)
