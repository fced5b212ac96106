"""The CP all-reduce of the [B] sequence sums and the DP-global normaliser, in 4 real gloo processes
(DP=2 x CP=2), against the single-process loss and gradient of the whole batch and against the float64 loop
reference (tests/loss_reference.py), masked IS at token, sequence and geometric level included."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_distributed
from loss_reference import RefSeq, reference_loss, reference_normalizer

from vespo_megatron.base.metric import finalize_metrics, merge_metrics
from vespo_megatron.losses import (
    LossNormalizer,
    RolloutCorrectionConfig,
    build_local_inputs,
    get_policy_loss,
    make_loss_config,
)
from vespo_megatron.parallel.reduce_metrics import all_reduce_metrics
from vespo_megatron.parallel.sequence import build_loss_inputs, global_normalizer

pytestmark = pytest.mark.distributed

CP, DP, MICRO = 2, 2, 2
_TIS = RolloutCorrectionConfig(mode="tis", upper=1.3)
# case -> (loss name, config overrides)
CASES = {
    "vespo": ("vespo", dict(rollout_correction=RolloutCorrectionConfig(mode="fold"))),
    "vespo_fold_tis": ("vespo", dict(rollout_correction=RolloutCorrectionConfig(mode="fold_tis", upper=1.1))),
    "vespo_sqrt": ("vespo_sqrt", dict(rollout_correction=_TIS)),
    "grpo": ("grpo", dict(rollout_correction=_TIS)),
    "gspo": ("gspo", dict(rollout_correction=_TIS)),
    "gspo_seq_grad": ("gspo", dict(rollout_correction=_TIS, gradient="sequence")),
    "sapo": ("sapo", dict(rollout_correction=_TIS)),
    "vespo_mis_token": ("vespo", dict(rollout_correction=RolloutCorrectionConfig(mode="mis", upper=1.2),
                                      aggregation="seq_mean_token_mean")),
    "gspo_mis_seq": ("gspo", dict(rollout_correction=RolloutCorrectionConfig(mode="mis", level="sequence", upper=1.4),
                                  gradient="sequence", eps_low=0.2, eps_high=0.2)),
    "grpo_mis_geo": ("grpo", dict(rollout_correction=RolloutCorrectionConfig(mode="mis", level="geometric", upper=1.1),
                                  aggregation="seq_mean_token_mean")),
}
LOSSES = list(CASES)


def whole_batch(seed: int = 0, num_seqs: int = 16):
    """Packed tokens of `num_seqs` sequences: per-token tensors [T] and a token -> sequence map."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (num_seqs,), generator=g)
    token_seq = torch.repeat_interleave(torch.arange(num_seqs), lengths)
    T = int(lengths.sum())
    mask = torch.rand(T, generator=g) > 0.25
    mask[token_seq == 3] = False  # one sequence without response tokens
    old = -torch.rand(T, generator=g, dtype=torch.float64) * 2
    logp = old + 0.4 * torch.randn(T, generator=g, dtype=torch.float64)
    rollout = old + 0.2 * torch.randn(T, generator=g, dtype=torch.float64)
    adv = torch.randn(num_seqs, generator=g, dtype=torch.float64)
    # Which CP rank holds each token: any assignment must give the same result (zigzag is one of them).
    owner = torch.randint(0, CP, (T,), generator=g)
    return dict(token_seq=token_seq, mask=mask, old=old, logp=logp, rollout=rollout, adv=adv, owner=owner)


def micro_batches(batch):
    """Sequences split into DP x MICRO micro-batches of consecutive sequences."""
    B = batch["adv"].numel()
    per = B // (DP * MICRO)
    return [list(range(k * per, (k + 1) * per)) for k in range(DP * MICRO)]


def _config(case):
    name, overrides = CASES[case]
    return make_loss_config(name, **overrides)


def reference(case: str):
    """The single process (library) and the float64 loop reference of the whole batch."""
    batch = whole_batch()
    B = batch["adv"].numel()
    cfg = _config(case)
    rc = cfg.rollout_correction
    logp = batch["logp"].clone().requires_grad_(True)
    inputs = build_local_inputs(logp=logp, old_logp=batch["old"], mask=batch["mask"], token_seq=batch["token_seq"],
                                num_seqs=B, advantages=batch["adv"], rollout_logp=batch["rollout"],
                                rollout_correction=rc)
    seqs = []
    for b in range(B):
        idx = (batch["token_seq"] == b).nonzero().flatten().tolist()
        seqs.append(RefSeq(logp=[logp[t] for t in idx], old=batch["old"][idx].tolist(),
                           mask=batch["mask"][idx].tolist(), adv=float(batch["adv"][b]),
                           rollout=batch["rollout"][idx].tolist()))
    num_tokens, num_seqs = reference_normalizer(seqs, rc)
    norm = LossNormalizer(num_tokens=num_tokens, num_seqs=num_seqs)
    out = get_policy_loss(CASES[case][0])(inputs, norm, cfg)
    (grad,) = torch.autograd.grad(out.loss, logp)
    loop, _ = reference_loss(CASES[case][0], seqs, cfg)
    (loop_grad,) = torch.autograd.grad(loop, logp)
    return dict(loss=out.loss.detach(), grad=grad, metrics=finalize_metrics(out.metrics), seq_phi=out.seq_phi,
                norm=(num_tokens, num_seqs), loop=loop.detach(), loop_grad=loop_grad)


def _worker(rank, world_size, names):
    cp_rank, dp_rank = rank % CP, rank // CP
    cp_groups = [dist.new_group([d * CP + c for c in range(CP)]) for d in range(DP)]
    dp_groups = [dist.new_group([d * CP + c for d in range(DP)]) for c in range(CP)]
    cp_group, dp_group = cp_groups[dp_rank], dp_groups[cp_rank]

    reduced_shapes = []
    real_all_reduce = dist.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        reduced_shapes.append(tuple(tensor.shape))
        return real_all_reduce(tensor, *args, **kwargs)

    batch = whole_batch()
    mbs = micro_batches(batch)[dp_rank * MICRO : (dp_rank + 1) * MICRO]
    local = []
    for seqs in mbs:
        keep = torch.isin(batch["token_seq"], torch.tensor(seqs)) & (batch["owner"] == cp_rank)
        token_seq = batch["token_seq"][keep] - seqs[0]
        local.append(dict(keep=keep, token_seq=token_seq, num_seqs=len(seqs),
                          mask=batch["mask"][keep], adv=batch["adv"][seqs[0] : seqs[-1] + 1]))
    results = {}
    for case in names:
        name, cfg = CASES[case][0], _config(case)
        rc = cfg.rollout_correction
        norm = global_normalizer([m["mask"] for m in local], [m["token_seq"] for m in local],
                                 [m["num_seqs"] for m in local], cp_group=cp_group, dp_group=dp_group,
                                 old_logps=[batch["old"][m["keep"]] for m in local],
                                 rollout_logps=[batch["rollout"][m["keep"]] for m in local], rollout_correction=rc)
        dist.all_reduce = recording_all_reduce
        reduced_shapes.clear()
        logp = batch["logp"].clone().requires_grad_(True)
        total, parts, phis = 0.0, [], []
        for m in local:
            inputs = build_loss_inputs(
                logp=logp[m["keep"]], old_logp=batch["old"][m["keep"]], mask=m["mask"], token_seq=m["token_seq"],
                num_seqs=m["num_seqs"], advantages=m["adv"], rollout_logp=batch["rollout"][m["keep"]],
                rollout_correction=rc, cp_group=cp_group,
                differentiable_seq_log_ratio=get_policy_loss(name).seq_grad(cfg),
            )
            out = get_policy_loss(name)(inputs, norm, cfg)
            total = total + out.loss
            parts.append(out.metrics)
            phis.append(out.seq_phi)
        total.backward()
        dist.all_reduce = real_all_reduce
        metrics = all_reduce_metrics(merge_metrics(parts), dist.group.WORLD)
        results[case] = dict(loss=total.detach(), grad=logp.grad, shapes=list(reduced_shapes), norm=norm,
                             metrics=finalize_metrics(metrics), phis=phis, mbs=mbs)
    return results


def test_cp_dp_split_matches_single_process():
    results = run_distributed(_worker, CP * DP, LOSSES)
    batch = whole_batch()
    B = batch["adv"].numel()
    T = batch["token_seq"].numel()
    for case in LOSSES:
        ref = reference(case)
        # The library's single process is the loop reference (float64, written from the formulas).
        torch.testing.assert_close(ref["loss"], ref["loop"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ref["grad"], ref["loop_grad"], rtol=1e-10, atol=1e-14)
        for r in results:  # every rank: the normaliser of the kept tokens of the whole step
            assert (r[case]["norm"].num_tokens, r[case]["norm"].num_seqs) == ref["norm"], case
        total = sum(r[case]["loss"] for r in results)
        torch.testing.assert_close(total, ref["loop"], rtol=1e-12, atol=1e-14)
        # Each token's gradient lives on the one rank that holds it; the others have zero there.
        g = sum(r[case]["grad"] for r in results)
        torch.testing.assert_close(g, ref["loop_grad"], rtol=1e-10, atol=1e-14)
        # Reduced metrics match the single process wherever they are layout-independent.
        for key in ("loss", "num_response_tokens", "num_loss_tokens", "ratio/log_ratio_abs_mean",
                    "rollout_corr/is_weight_ess", "rollout_corr/mis_masked_frac"):
            if key in ref["metrics"]:
                assert results[0][case]["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-9), (case, key)
        if ref["seq_phi"] is not None:
            for r in results:
                for mb, phi in zip(r[case]["mbs"], r[case]["phis"], strict=True):
                    torch.testing.assert_close(phi, ref["seq_phi"][mb], rtol=1e-12, atol=0)
        # The only collectives on the loss path are [3, B_micro] sequence vectors and the metric buffers:
        # never a token tensor. A backward collective only where the gradient flows through log W.
        backward = get_policy_loss(CASES[case][0]).seq_grad(_config(case))
        for r in results:
            seq_vectors = [s for s in r[case]["shapes"] if s == (3, B // (DP * MICRO))]
            assert len(seq_vectors) == (2 * MICRO if backward else MICRO), (case, r[case]["shapes"])
            assert all(s[-1] != T and (len(s) == 1 or s == (3, B // (DP * MICRO))) for s in r[case]["shapes"])
    # The masked-IS cases reject something, and not everything.
    for case in ("vespo_mis_token", "gspo_mis_seq", "grpo_mis_geo"):
        assert 0 < results[0][case]["metrics"]["rollout_corr/mis_masked_frac"] < 1, case
    counts = torch.zeros(B).index_add(0, batch["token_seq"], batch["mask"].float())
    assert reference("grpo")["norm"] == (float(batch["mask"].sum()), float((counts > 0).sum()))
