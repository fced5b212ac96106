"""Issue 14: the semantic choices against the authors' VESPO and verl, one test per choice, each against a
float64 value written inline from the peers' formulas (docs/losses.md names these tests)."""

from __future__ import annotations

import math

import pytest
import torch
from loss_reference import RefSeq, reference_loss

from vespo_megatron.base.metric import finalize_metrics
from vespo_megatron.losses import (
    GSPOConfig,
    LossNormalizer,
    RolloutCorrectionConfig,
    build_local_inputs,
    get_policy_loss,
    make_loss_config,
)
from vespo_megatron.parallel.sequence import global_normalizer

F64 = torch.float64


def one_batch(deltas: list[list[float]], advs: list[float], rollout_gaps: list[list[float]] | None = None):
    """Packed sequences with log pi - log mu = `deltas` per token (log mu = -1) and, optionally,
    log rho = `rollout_gaps` per token (log pi_rollout = log mu - gap)."""
    token_seq = torch.cat([torch.full((len(d),), b) for b, d in enumerate(deltas)])
    old = torch.full((token_seq.numel(),), -1.0, dtype=F64)
    logp = (old + torch.tensor([x for d in deltas for x in d], dtype=F64)).requires_grad_(True)
    gaps = rollout_gaps or [[0.0] * len(d) for d in deltas]
    rollout = old - torch.tensor([x for g in gaps for x in g], dtype=F64)
    return dict(logp=logp, old_logp=old, mask=torch.ones(token_seq.numel(), dtype=torch.bool), token_seq=token_seq,
                num_seqs=len(deltas), advantages=torch.tensor(advs, dtype=F64), rollout_logp=rollout)


def authors_phi(log_w: float, c1: float, c2: float) -> float:
    """The authors' compute_policy_loss_vespo on an already summed log W: clamp +-20, W = exp, then
    lam + k * log(W.clamp(min=1e-8)) - lam * W with lam = max(c2, 1e-4)."""
    lw = max(-20.0, min(20.0, log_w))
    w = math.exp(lw)
    lam = max(c2, 1e-4)
    return math.exp(lam + c1 * math.log(max(w, 1e-8)) - lam * w)


def run(name, flat, cfg, norm=None):
    inputs = build_local_inputs(**flat, rollout_correction=cfg.rollout_correction)
    norm = norm or global_normalizer([flat["mask"]], [flat["token_seq"]], [flat["num_seqs"]],
                                     old_logps=[flat["old_logp"]], rollout_logps=[flat["rollout_logp"]],
                                     rollout_correction=cfg.rollout_correction)
    out = get_policy_loss(name)(inputs, norm, cfg)
    (grad,) = torch.autograd.grad(out.loss, flat["logp"])
    return out, grad, norm


# ---------------------------------------------------------------- 1. VESPO's clamps and floors


def test_vespo_clamps_each_token_before_the_sum():
    # One runaway token (-25): the authors clamp it to -20 before summing (log W = -20 + 7 = -13); clamping
    # only the sum would give -18, a phi e^10 times smaller.
    flat = one_batch([[-25.0, 3.5, 3.5], [0.1, -0.2]], [1.0, -1.0])
    out, _, _ = run("vespo", flat, make_loss_config("vespo"))
    expected = [authors_phi(-13.0, 2.0, 3.0), authors_phi(-0.1, 3.0, 2.0)]
    torch.testing.assert_close(out.seq_phi, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.seq_log_w, torch.tensor([-13.0, -0.1], dtype=F64), rtol=0, atol=1e-12)
    assert out.seq_phi[0] > 1e3 * authors_phi(-18.0, 2.0, 3.0) > 0
    assert finalize_metrics(out.metrics)["ratio/log_ratio_clamped_frac"] == pytest.approx(1 / 5)


@pytest.mark.parametrize("w_floor", [1e-8, 0.0])
def test_vespo_w_floor_acts_on_the_c1_term_only(w_floor):
    # log W = -19.5 lies between the floor log(1e-8) = -18.42 and the clamp -20.
    flat = one_batch([[-6.5, -6.5, -6.5]], [1.0])
    out, grad, _ = run("vespo", flat, make_loss_config("vespo", w_floor=w_floor))
    w = math.exp(-19.5)
    if w_floor:
        expected = authors_phi(-19.5, 2.0, 3.0)
        assert finalize_metrics(out.metrics)["vespo/w_floored_frac"] == 1.0
    else:
        expected = w**2 * math.exp(3.0 * (1 - w))
        assert finalize_metrics(out.metrics)["vespo/w_floored_frac"] == 0.0
    assert out.seq_phi.item() == pytest.approx(expected, rel=1e-12)
    # d loss / d log pi_t = -phi * A / N_tokens (token_mean), phi detached
    torch.testing.assert_close(grad, torch.full((3,), -expected / 3, dtype=F64), rtol=1e-12, atol=0)


def test_vespo_c2_floor():
    flat = one_batch([[0.3, 0.4]], [1.0])
    w = math.exp(0.7)
    out, _, _ = run("vespo", flat, make_loss_config("vespo", c_pos=(2.0, 0.0)))
    assert out.seq_phi.item() == pytest.approx(authors_phi(0.7, 2.0, 0.0), rel=1e-12)
    assert out.seq_phi.item() == pytest.approx(w**2 * math.exp(1e-4 * (1 - w)), rel=1e-12)
    out, _, _ = run("vespo", flat, make_loss_config("vespo", c_pos=(2.0, 0.0), c2_floor=0.0))
    assert out.seq_phi.item() == pytest.approx(w**2, rel=1e-12)  # the pure power


# ---------------------------------------------------------------- 2. rejected tokens are invisible

MIS = {
    "token": RolloutCorrectionConfig(mode="mis", level="token", upper=1.5),
    "sequence": RolloutCorrectionConfig(mode="mis", level="sequence", upper=1.5),
    "geometric": RolloutCorrectionConfig(mode="mis", level="geometric", upper=1.2),
}
GAPS = [[0.1, 0.9, -0.1, 0.0], [0.05, -0.05, 0.1], [-0.9, -0.9, 0.2], [0.0, 0.1]]  # log rho per token
DELTAS = [[0.2, -0.3, 0.1, 0.15], [0.3, 0.1, -0.2], [0.2, -0.1, 0.2], [-0.2, 0.1]]  # no PPO clip fires
REJECTED = {  # by hand from GAPS: |log rho| > log 1.5 = 0.405 per token; |sum| > 0.405 (sequences 0 and 2);
    "token": [1, 7, 8],  # |mean| > log 1.2 = 0.182 (sequences 0 and 2)
    "sequence": [0, 1, 2, 3, 7, 8, 9],
    "geometric": [0, 1, 2, 3, 7, 8, 9],
}


@pytest.mark.parametrize("level", sorted(MIS))
@pytest.mark.parametrize("name, overrides", [("vespo", {}), ("gspo", {}), ("gspo", {"gradient": "sequence"}),
                                             ("grpo", {}), ("sapo", {}), ("reinforce", {})])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_rejected_tokens_leave_loss_normaliser_sums_and_gradients(level, name, overrides, aggregation):
    rc = MIS[level]
    cfg = make_loss_config(name, rollout_correction=rc, aggregation=aggregation, **overrides)
    if name == "gspo":
        cfg = make_loss_config(name, rollout_correction=rc, aggregation=aggregation, eps_low=0.5, eps_high=0.5,
                               **overrides)
    flat = one_batch(DELTAS, [1.0, -0.5, 0.7, -1.2], GAPS)
    out, grad, norm = run(name, flat, cfg)
    rejected = REJECTED[level]
    kept = [t for t in range(12) if t not in rejected]
    assert norm.num_tokens == len(kept)
    assert norm.num_seqs == len({int(flat["token_seq"][t]) for t in kept})
    assert (grad[rejected] == 0).all() and (grad[kept] != 0).all()
    # Moving a rejected token's log pi changes nothing at all (verl and slime #657: it is not in log W, s or |y|).
    moved = dict(flat, logp=(flat["logp"].detach() + torch.isin(torch.arange(12), torch.tensor(rejected)) * 7.0)
                 .requires_grad_(True))
    out2, grad2, _ = run(name, moved, cfg, norm)
    torch.testing.assert_close(out2.loss, out.loss, rtol=1e-14, atol=1e-16)
    torch.testing.assert_close(grad2, grad, rtol=1e-13, atol=1e-16)
    # The loop reference (written from verl's rejection semantics) agrees.
    seqs, start = [], 0
    for b, d in enumerate(DELTAS):
        idx = range(start, start + len(d))
        seqs.append(RefSeq(logp=[flat["logp"][t] for t in idx], old=[-1.0] * len(d), mask=[True] * len(d),
                           adv=float(flat["advantages"][b]), rollout=[-1.0 - g for g in GAPS[b]]))
        start += len(d)
    ref, _ = reference_loss(name, seqs, cfg)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-15)
    (g_ref,) = torch.autograd.grad(ref, flat["logp"])
    torch.testing.assert_close(grad, g_ref, rtol=1e-10, atol=1e-15)
    values = finalize_metrics(out.metrics)
    assert values["rollout_corr/mis_masked_tokens"] == len(rejected)
    assert values["num_loss_tokens"] == len(kept) and values["num_response_tokens"] == 12


def test_everything_rejected_gives_zero_loss_and_gradient():
    rc = RolloutCorrectionConfig(mode="mis", level="token", upper=1.01)
    flat = one_batch([[0.1, 0.2]], [1.0], [[0.5, -0.5]])
    out, grad, norm = run("vespo", flat, make_loss_config("vespo", rollout_correction=rc))
    assert out.loss.item() == 0.0 and (grad == 0).all()
    assert finalize_metrics(out.metrics)["rollout_corr/mis_masked_frac"] == 1.0


# ---------------------------------------------------------------- 3. GSPO and per-token weights


def test_gspo_token_gradient_gives_each_token_its_own_weight():
    # One sequence, token-level TIS with different weights; eps wide enough that nothing clips.
    deltas, gaps, adv = [[0.05, -0.02, 0.03]], [[0.3, -0.2, 1.0]], [-0.8]
    rc = RolloutCorrectionConfig(mode="tis", level="token", upper=2.0)
    w = [min(math.exp(g), 2.0) for g in gaps[0]]
    s = math.exp(sum(deltas[0]) / 3)
    n, A = 3, adv[0]
    # seq_mean_token_mean over one sequence: token weight 1/n; d(-s A w_t)/d log pi_t = -A w_t s (own, verl)
    # versus -A s mean(w) when the gradient flows through s = exp(mean_u delta_u): sum_u w_u / n * s / n.
    own = [-A * s * w_t / n for w_t in w]
    mean_w = sum(w) / n
    through_s = [-A * s * mean_w / n] * 3
    for gradient, expected in (("token", own), ("sequence", through_s)):
        cfg = make_loss_config("gspo", rollout_correction=rc, eps_low=0.5, eps_high=0.5, gradient=gradient)
        out, grad, _ = run("gspo", one_batch(deltas, adv, gaps), cfg)
        torch.testing.assert_close(grad, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)
        assert out.loss.item() == pytest.approx(-s * A * sum(w) / n, rel=1e-12)  # same value either way


@pytest.mark.parametrize("rc", [RolloutCorrectionConfig(), RolloutCorrectionConfig(mode="tis", level="sequence")])
def test_gspo_gradient_forms_agree_when_weights_are_constant_per_sequence(rc):
    flat = one_batch(DELTAS, [1.0, -0.5, 0.7, -1.2], GAPS)
    a, ga, _ = run("gspo", flat, make_loss_config("gspo", rollout_correction=rc, eps_low=0.05, eps_high=0.05))
    b, gb, _ = run("gspo", flat, make_loss_config("gspo", rollout_correction=rc, eps_low=0.05, eps_high=0.05,
                                                  gradient="sequence"))
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-16)
    assert ga.abs().max() > 0


# ---------------------------------------------------------------- 4. what the fold adds to log W


def test_fold_raw_versus_authors_truncated_fold():
    deltas, gaps = [[0.1, -0.2, 0.05], [0.1, 0.1]], [[0.2, 1.5, -0.4], [0.3, -0.1]]
    flat = one_batch(deltas, [1.0, -1.0], gaps)
    raw, _, _ = run("vespo", flat, make_loss_config("vespo", rollout_correction=RolloutCorrectionConfig(mode="fold")))
    tis, _, _ = run("vespo", flat, make_loss_config(
        "vespo", rollout_correction=RolloutCorrectionConfig(mode="fold_tis", upper=2.0)))
    log_c = math.log(2.0)
    log_w_raw = [sum(d) + sum(g) for d, g in zip(deltas, gaps, strict=True)]  # W = pi / pi_rollout
    log_w_tis = [sum(d) + sum(min(x, log_c) for x in g) for d, g in zip(deltas, gaps, strict=True)]
    torch.testing.assert_close(raw.seq_log_w, torch.tensor(log_w_raw, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(tis.seq_log_w, torch.tensor(log_w_tis, dtype=F64), rtol=0, atol=1e-12)
    assert log_w_raw[0] != pytest.approx(log_w_tis[0]) and log_w_raw[1] == pytest.approx(log_w_tis[1])
    expected = [authors_phi(lw, *c) for lw, c in zip(log_w_tis, [(2.0, 3.0), (3.0, 2.0)], strict=True)]
    torch.testing.assert_close(tis.seq_phi, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)
    assert finalize_metrics(tis.metrics)["rollout_corr/fold_clamped_frac"] == pytest.approx(1 / 5)
    assert finalize_metrics(raw.metrics)["rollout_corr/fold_clamped_frac"] == 0.0


def test_fold_tis_floors_tiny_weights_like_the_authors():
    flat = one_batch([[0.0, 0.0]], [1.0], [[-25.0, 0.1]])  # rho = e^-25 < 1e-8
    out, _, _ = run("vespo", flat, make_loss_config(
        "vespo", rollout_correction=RolloutCorrectionConfig(mode="fold_tis")))
    assert out.seq_log_w.item() == pytest.approx(math.log(1e-8) + 0.1, abs=1e-12)


# ---------------------------------------------------------------- 5. GSPO's clamp


@pytest.mark.parametrize("gradient", ["token", "sequence"])
def test_gspo_log_ratio_clamped_above_at_10(gradient):
    # A < 0 and s far above 1 + eps: the unclipped branch -s A is active. log s = 12 is clamped to 10 (verl),
    # which stops its gradient; log s = 9 is not.
    flat = one_batch([[12.0, 12.0], [9.0, 9.0], [-30.0, -30.0]], [-1.0, -1.0, 1.0])
    out, grad, norm = run("gspo", flat, make_loss_config("gspo", gradient=gradient))
    assert norm.num_seqs == 3
    # seq_mean_token_mean: loss = sum_b l_b / 3; the third sequence: log s = -20 (tokens clamped at -20),
    # A > 0, s < 1 - eps: -min(s A, clip(s) A) = -s A.
    expected = (math.exp(10.0) + math.exp(9.0) - math.exp(-20.0)) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert (grad[:2] == 0).all()
    torch.testing.assert_close(grad[2:4], torch.full((2,), math.exp(9.0) / 2 / 3, dtype=F64), rtol=1e-12, atol=0)
    assert finalize_metrics(out.metrics)["gspo/log_ratio_clamped_frac"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="GSPOConfig.log_ratio_max"):
        GSPOConfig(log_ratio_max=-1.0)


def test_normalizer_without_rejection_is_unchanged():
    flat = one_batch(DELTAS, [1.0, -0.5, 0.7, -1.2], GAPS)
    plain = global_normalizer([flat["mask"]], [flat["token_seq"]], [4])
    tis = global_normalizer([flat["mask"]], [flat["token_seq"]], [4], old_logps=[flat["old_logp"]],
                            rollout_logps=[flat["rollout_logp"]], rollout_correction=RolloutCorrectionConfig(mode="tis"))
    assert plain == tis == LossNormalizer(num_tokens=12.0, num_seqs=4.0)
