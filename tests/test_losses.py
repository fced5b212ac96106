"""Policy losses against independent float64 loop references, gradient identities, properties, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_reference import RefSeq, reference_loss, reference_normalizer

from vespo_megatron.base.metric import finalize_metrics, merge_metrics
from vespo_megatron.losses import (
    GSPOConfig,
    LossInputs,
    LossNormalizer,
    RolloutCorrectionConfig,
    VespoConfig,
    build_local_inputs,
    get_policy_loss,
    make_loss_config,
    vespo_phi,
)
from vespo_megatron.parallel.sequence import global_normalizer

NAMES = ["vespo", "vespo_sqrt", "vespo_lin", "grpo", "gspo", "sapo", "reinforce"]
# Loss variants the reference covers: a name and config overrides.
VARIANTS = [(n, {}) for n in NAMES] + [("gspo", {"gradient": "sequence"})]


def make_batch(seed: int, num_seqs: int = 6, max_len: int = 9, scale: float = 0.3, pad_garbage: float = float("nan")):
    """Padded [B, S] batch flattened to [T]: random lengths, prompt tokens masked out, one all-masked
    sequence, padding filled with `pad_garbage` (NaN by default) in every log-prob tensor."""
    g = torch.Generator().manual_seed(seed)
    B, S = num_seqs, max_len
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    mask = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        prompt = int(torch.randint(0, int(lengths[b]), (1,), generator=g))
        mask[b, prompt : int(lengths[b])] = True
    mask[B - 1] = False  # an all-masked sequence
    old = -torch.rand(B, S, generator=g, dtype=torch.float64) * 3
    logp = old + scale * torch.randn(B, S, generator=g, dtype=torch.float64)
    rollout = old + 0.5 * scale * torch.randn(B, S, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    valid = torch.arange(S)[None, :] < lengths[:, None]
    for t in (old, logp, rollout):
        t[~valid] = pad_garbage
    token_seq = torch.arange(B)[:, None].expand(B, S).reshape(-1)
    logp_leaf = logp.reshape(-1).clone().requires_grad_(True)
    flat = dict(logp=logp_leaf, old_logp=old.reshape(-1), mask=mask.reshape(-1), token_seq=token_seq,
                num_seqs=B, advantages=adv, rollout_logp=rollout.reshape(-1))
    seqs = [
        RefSeq(logp=[logp_leaf[b * S + t] for t in range(S)], old=old[b].tolist(), mask=mask[b].tolist(),
               adv=float(adv[b]), rollout=rollout[b].tolist())
        for b in range(B)
    ]
    num_tokens = float(mask.sum())
    num_seq_nonempty = float((mask.sum(1) > 0).sum())
    return flat, seqs, LossNormalizer(num_tokens=num_tokens, num_seqs=num_seq_nonempty)


CORRECTIONS = [
    RolloutCorrectionConfig(),
    RolloutCorrectionConfig(mode="tis", level="token", upper=1.2),
    RolloutCorrectionConfig(mode="tis", level="sequence", upper=1.5),
    RolloutCorrectionConfig(mode="mis", level="token", upper=1.15),
    RolloutCorrectionConfig(mode="mis", level="geometric", upper=1.05, lower=0.97),
    RolloutCorrectionConfig(mode="mis", level="sequence", upper=1.5),
    RolloutCorrectionConfig(mode="fold"),
    RolloutCorrectionConfig(mode="fold_tis", upper=1.1),
]


def built(flat, cfg):
    """The library's inputs and (single-process) global normaliser for `cfg`'s rollout correction."""
    rc = cfg.rollout_correction
    inputs = build_local_inputs(**flat, rollout_correction=rc)
    norm = global_normalizer([flat["mask"]], [flat["token_seq"]], [flat["num_seqs"]], old_logps=[flat["old_logp"]],
                             rollout_logps=[flat["rollout_logp"]], rollout_correction=rc)
    return inputs, norm


# Every variant with every correction it accepts (the folds are VESPO's).
CASES = [(v, c) for v in range(len(VARIANTS)) for c in range(len(CORRECTIONS))
         if VARIANTS[v][0].startswith("vespo") or not CORRECTIONS[c].mode.startswith("fold")]


@pytest.mark.parametrize("variant, corr", CASES)
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_loss_and_grad_match_float64_loop_reference(variant, corr, aggregation):
    name, overrides = VARIANTS[variant]
    flat, seqs, _ = make_batch(seed=hash((name, aggregation, corr)) % 1000)
    cfg = make_loss_config(name, aggregation=aggregation, rollout_correction=CORRECTIONS[corr], **overrides)
    inputs, norm = built(flat, cfg)
    assert (norm.num_tokens, norm.num_seqs) == reference_normalizer(seqs, cfg.rollout_correction)
    out = get_policy_loss(name)(inputs, norm, cfg)
    ref, phis = reference_loss(name, seqs, cfg)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-14)
    (g,) = torch.autograd.grad(out.loss, flat["logp"])
    g_ref = torch.zeros_like(g)  # a reference that kept no token has no graph
    if ref.requires_grad:
        (g_ref,) = torch.autograd.grad(ref, flat["logp"], allow_unused=True)
        g_ref = torch.zeros_like(g) if g_ref is None else g_ref
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-14)
    assert torch.isfinite(g).all()
    if name.startswith("vespo"):
        torch.testing.assert_close(out.seq_phi, torch.tensor(phis, dtype=torch.float64), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("name", ["vespo", "grpo", "gspo"])
def test_fold_and_dual_clip_against_reference(name):
    flat, seqs, norm = make_batch(seed=7, scale=0.6)
    if name == "vespo":
        cfg = make_loss_config(name, rollout_correction=RolloutCorrectionConfig(mode="fold"))
    elif name == "grpo":
        cfg = make_loss_config(name, dual_clip=1.5, eps_low=0.1, eps_high=0.1)
    else:
        cfg = make_loss_config(name, eps_low=0.05, eps_high=0.05)
    out = get_policy_loss(name)(build_local_inputs(**flat, rollout_correction=cfg.rollout_correction), norm, cfg)
    ref, _ = reference_loss(name, seqs, cfg, norm.num_tokens, norm.num_seqs)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-14)


def test_vespo_gradient_identity():
    flat, _, norm = make_batch(seed=3, scale=0.5)
    inputs = build_local_inputs(**flat)
    out = get_policy_loss("vespo")(inputs, norm)
    (g,) = torch.autograd.grad(out.loss, flat["logp"])
    phi_t = out.seq_phi[flat["token_seq"]]
    adv_t = flat["advantages"][flat["token_seq"]]
    expected = torch.where(flat["mask"], -phi_t * adv_t / norm.num_tokens, torch.zeros_like(phi_t))
    torch.testing.assert_close(g, expected, rtol=1e-15, atol=0.0)
    # phi is a coefficient: no gradient flows through log W even though seq_log_ratio carries grad.
    assert inputs.seq_log_ratio.requires_grad


# ---------------------------------------------------------------- properties of phi


cs = st.floats(min_value=0.0, max_value=3.5, allow_nan=False)


@given(c1=cs, c2=cs, adv=st.floats(-5, 5, allow_nan=False))
def test_phi_of_one_is_exactly_one(c1, c2, adv):
    phi = vespo_phi(torch.zeros(1, dtype=torch.float64), torch.tensor([adv], dtype=torch.float64), (c1, c2), (c1, c2))
    assert phi.item() == 1.0


@given(c1=st.floats(0.2, 3.5), c2=st.floats(0.2, 3.5), log_w=st.floats(-15, 15))
def test_phi_peaks_at_c1_over_c2(c1, c2, log_w):
    adv = torch.ones(2, dtype=torch.float64)
    phi = vespo_phi(torch.tensor([math.log(c1 / c2), log_w], dtype=torch.float64), adv, (c1, c2), (c1, c2))
    assert phi[0] >= phi[1] * (1 - 1e-12)


@given(log_w=st.floats(-1e4, 1e4, allow_nan=False), adv=st.floats(-1e3, 1e3, allow_nan=False),
       c1=cs, c2=cs, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_phi_finite_for_extreme_inputs(log_w, adv, c1, c2, dtype):
    phi, log_phi = vespo_phi(torch.tensor([log_w, -log_w, 1e4, -1e4], dtype=dtype),
                             torch.full((4,), adv, dtype=dtype), (c1, c2), (c1, c2), return_log=True)
    assert torch.isfinite(phi).all() and torch.isfinite(log_phi).all() and (phi >= 0).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), garbage=st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30]),
       name=st.sampled_from(NAMES))
def test_garbage_in_padding_changes_nothing(seed, garbage, name):
    flat_a, _, norm = make_batch(seed, pad_garbage=0.0)
    flat_b, _, _ = make_batch(seed, pad_garbage=garbage)
    loss_fn = get_policy_loss(name)
    cfg = make_loss_config(name, rollout_correction=RolloutCorrectionConfig(mode="tis"))
    out_a = loss_fn(build_local_inputs(**flat_a), norm, cfg)
    out_b = loss_fn(build_local_inputs(**flat_b), norm, cfg)
    assert torch.isfinite(out_b.loss)
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=0, atol=0)
    (ga,) = torch.autograd.grad(out_a.loss, flat_a["logp"])
    (gb,) = torch.autograd.grad(out_b.loss, flat_b["logp"])
    assert torch.equal(ga, gb)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), name=st.sampled_from(NAMES))
def test_all_masked_sequence_contributes_zero(seed, name):
    flat, _, norm = make_batch(seed)
    loss_fn = get_policy_loss(name)
    out = loss_fn(build_local_inputs(**flat), norm)
    (g,) = torch.autograd.grad(out.loss, flat["logp"])
    S = flat["logp"].numel() // flat["num_seqs"]
    assert torch.equal(g[-S:], torch.zeros(S, dtype=g.dtype))  # the last sequence is all masked
    # Dropping that sequence entirely leaves loss and gradients unchanged.
    keep = flat["token_seq"] < flat["num_seqs"] - 1
    logp2 = flat["logp"].detach()[keep].clone().requires_grad_(True)
    flat2 = dict(flat, logp=logp2, old_logp=flat["old_logp"][keep], mask=flat["mask"][keep],
                 token_seq=flat["token_seq"][keep], num_seqs=flat["num_seqs"] - 1,
                 advantages=flat["advantages"][:-1], rollout_logp=flat["rollout_logp"][keep])
    out2 = loss_fn(build_local_inputs(**flat2), norm)
    torch.testing.assert_close(out2.loss, out.loss, rtol=1e-14, atol=1e-15)
    (g2,) = torch.autograd.grad(out2.loss, logp2)
    torch.testing.assert_close(g2, g[keep], rtol=1e-14, atol=1e-15)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), name=st.sampled_from(NAMES), perm_seed=st.integers(0, 100))
def test_permuting_sequences_permutes_nothing_else(seed, name, perm_seed):
    flat, _, norm = make_batch(seed)
    B = flat["num_seqs"]
    S = flat["logp"].numel() // B
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(perm_seed))
    tok_perm = (perm[:, None] * S + torch.arange(S)[None, :]).reshape(-1)
    logp_p = flat["logp"].detach()[tok_perm].clone().requires_grad_(True)
    flat_p = dict(flat, logp=logp_p, old_logp=flat["old_logp"][tok_perm], mask=flat["mask"][tok_perm],
                  rollout_logp=flat["rollout_logp"][tok_perm], advantages=flat["advantages"][perm])
    loss_fn = get_policy_loss(name)
    out = loss_fn(build_local_inputs(**flat), norm)
    out_p = loss_fn(build_local_inputs(**flat_p), norm)
    torch.testing.assert_close(out_p.loss, out.loss, rtol=1e-13, atol=1e-15)
    (g,) = torch.autograd.grad(out.loss, flat["logp"])
    (g_p,) = torch.autograd.grad(out_p.loss, logp_p)
    torch.testing.assert_close(g_p, g[tok_perm], rtol=1e-13, atol=1e-16)
    if out.seq_phi is not None:
        torch.testing.assert_close(out_p.seq_phi, out.seq_phi[perm], rtol=0, atol=0)


# ---------------------------------------------------------------- clamps are counted, metrics reduce


def test_log_w_clamp_is_counted_and_metrics_merge():
    flat, _, norm = make_batch(seed=11)
    flat["logp"] = (flat["logp"].detach() + 25.0).requires_grad_(True)  # log W above the clamp (20)
    out = get_policy_loss("vespo")(build_local_inputs(**flat), norm)
    values = finalize_metrics(out.metrics)
    # Each token is clamped to +20 before the sum, so only sequences of 2+ tokens exceed the log W clamp.
    lengths = flat["mask"].reshape(flat["num_seqs"], -1).sum(1)
    assert values["vespo/log_w_clamped_frac"] == pytest.approx(float((lengths > 1).sum() / (lengths > 0).sum()))
    assert 0 < values["vespo/log_w_clamped_frac"] < 1
    assert values["ratio/log_ratio_clamped_frac"] == 1.0  # every token ratio exceeds e^20 too
    assert torch.isfinite(out.loss)
    # Two micro-batches merge: sums add, means are weighted by their counts.
    merged = finalize_metrics(merge_metrics([out.metrics, out.metrics]))
    assert merged["loss"] == pytest.approx(2 * values["loss"])
    assert merged["vespo/phi_pos_mean"] == pytest.approx(values["vespo/phi_pos_mean"])
    assert merged["num_response_tokens"] == 2 * values["num_response_tokens"]


def test_mis_mask_and_tis_clip_are_counted():
    flat, _, norm = make_batch(seed=5, scale=1.0)
    mis = RolloutCorrectionConfig(mode="mis", upper=1.1)
    out = get_policy_loss("grpo")(build_local_inputs(**flat, rollout_correction=mis), norm,
                                  make_loss_config("grpo", rollout_correction=mis))
    values = finalize_metrics(out.metrics)
    rho = torch.exp(flat["old_logp"] - flat["rollout_logp"])[flat["mask"]]
    outside = (rho > 1.1) | (rho < 1 / 1.1)
    assert values["rollout_corr/mis_masked_frac"] == pytest.approx(float(outside.double().mean()))
    assert values["rollout_corr/mis_masked_tokens"] == float(outside.sum())
    assert values["num_loss_tokens"] == values["num_response_tokens"] - float(outside.sum())
    assert 0 < values["rollout_corr/is_weight_ess"] <= 1
    inputs = build_local_inputs(**flat)
    out = get_policy_loss("grpo")(inputs, norm, make_loss_config(
        "grpo", rollout_correction=RolloutCorrectionConfig(mode="tis", upper=1.1)))
    assert finalize_metrics(out.metrics)["rollout_corr/tis_clip_frac"] == pytest.approx(float((rho > 1.1).double().mean()))


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("make, match", [
    (lambda: VespoConfig(c_pos=(2.0, -1.0)), r"c_pos\[1\] \(c2\): expected a finite float >= 0, got -1.0"),
    (lambda: make_loss_config("grpo", eps_low=1.5), r"PPOClipConfig.eps_low: expected a float in \(0, 1\), got 1.5"),
    (lambda: make_loss_config("gspo", eps_high=0.0), r"GSPOConfig.eps_high"),
    (lambda: get_policy_loss("ppo2"), r"policy loss name: expected one of .* got 'ppo2'"),
    (lambda: make_loss_config("grpo", aggregation="mean"), r"aggregation: expected one of"),
    (lambda: make_loss_config("grpo", rollout_correction=RolloutCorrectionConfig(mode="fold")), r"'fold_tis' are VESPO"),
    (lambda: make_loss_config("gspo", rollout_correction=RolloutCorrectionConfig(mode="fold_tis")), r"need a VespoConfig"),
    (lambda: RolloutCorrectionConfig(mode="fold", level="sequence"), r"level: expected 'token' with mode='fold'"),
    (lambda: VespoConfig(w_floor=1.0), r"VespoConfig.w_floor: expected a float in \[0, 1\)"),
    (lambda: VespoConfig(c2_floor=-1.0), r"VespoConfig.c2_floor"),
    (lambda: GSPOConfig(gradient="mean"), r"GSPOConfig.gradient: expected one of \['token', 'sequence'\]"),
    (lambda: GSPOConfig(log_ratio_max=0.0), r"GSPOConfig.log_ratio_max"),
    (lambda: RolloutCorrectionConfig(mode="tis", upper=0.5), r"upper: expected a finite float > 1"),
    (lambda: make_loss_config("vespo_sqrt", length_norm="lin"), r"fixed to 'sqrt'"),
    (lambda: VespoConfig(c_pos=(5.0, 3.0)), r"phi must fit in float32"),
])
def test_bad_config_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs_raise():
    flat, _, norm = make_batch(seed=1)
    with pytest.raises(ValueError, match=r"LossInputs.old_logp: expected shape"):
        build_local_inputs(**dict(flat, old_logp=flat["old_logp"][:-1]))
    with pytest.raises(ValueError, match=r"LossInputs.advantages: expected shape"):
        build_local_inputs(**dict(flat, advantages=flat["advantages"][:-1]))
    with pytest.raises(ValueError, match=r"LossInputs.token_seq: expected values in \[0, 6\)"):
        build_local_inputs(**dict(flat, token_seq=flat["token_seq"] + 1))
    token_adv = torch.randn(flat["logp"].numel(), dtype=torch.float64)
    inputs = build_local_inputs(**dict(flat, advantages=token_adv))
    for name in ("vespo", "gspo"):
        with pytest.raises(ValueError, match=r"advantages constant within each sequence"):
            get_policy_loss(name)(inputs, norm)
    get_policy_loss("grpo")(inputs, norm)  # token-level losses accept per-token advantages
    no_rollout = build_local_inputs(**dict(flat, rollout_logp=None))
    with pytest.raises(ValueError, match=r"rollout_logp: rollout_correction.mode='tis' needs"):
        get_policy_loss("grpo")(no_rollout, norm, make_loss_config(
            "grpo", rollout_correction=RolloutCorrectionConfig(mode="tis")))
    with pytest.raises(ValueError, match=r"LossNormalizer.num_tokens: expected a positive count, got 0.0"):
        LossNormalizer(num_tokens=0, num_seqs=1)
    detached = LossInputs(**{**build_local_inputs(**flat).__dict__,
                             "seq_log_ratio": build_local_inputs(**flat).seq_log_ratio.detach()})
    with pytest.raises(ValueError, match=r"GSPO with gradient='sequence' differentiates through"):
        get_policy_loss("gspo")(detached, norm, GSPOConfig(gradient="sequence"))
    get_policy_loss("gspo")(detached, norm)  # the default token gradient never needs it
    # A loss that rejects or folds needs inputs built for that correction (else the normaliser and the
    # sums would not know about the rejection).
    for rc in (RolloutCorrectionConfig(mode="mis"), RolloutCorrectionConfig(mode="fold")):
        with pytest.raises(ValueError, match=r"LossInputs.rollout_correction: expected the inputs built for"):
            get_policy_loss("vespo")(build_local_inputs(**flat), norm, make_loss_config("vespo", rollout_correction=rc))
    with pytest.raises(ValueError, match=r"LossInputs.rollout_correction"):
        mis_inputs = build_local_inputs(**flat, rollout_correction=RolloutCorrectionConfig(mode="mis"))
        get_policy_loss("grpo")(mis_inputs, norm)


def test_constant_token_advantages_accepted_by_sequence_losses():
    flat, _, norm = make_batch(seed=2)
    token_adv = flat["advantages"][flat["token_seq"]].clone()
    a = get_policy_loss("vespo")(build_local_inputs(**dict(flat, advantages=token_adv)), norm)
    b = get_policy_loss("vespo")(build_local_inputs(**flat), norm)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
