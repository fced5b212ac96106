"""The CP all-reduce of the [B] sequence sums and the DP-global normaliser, in 4 real gloo processes
(DP=2 x CP=2), against the single-process loss and gradient of the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_distributed

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

LOSSES = ["vespo", "vespo_sqrt", "grpo", "gspo", "sapo"]
CP, DP, MICRO = 2, 2, 2


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


def _config(name):
    corr = RolloutCorrectionConfig(mode="fold") if name == "vespo" else RolloutCorrectionConfig(mode="tis", upper=1.3)
    return make_loss_config(name, rollout_correction=corr)


def reference(name: str):
    batch = whole_batch()
    B = batch["adv"].numel()
    logp = batch["logp"].clone().requires_grad_(True)
    inputs = build_local_inputs(logp=logp, old_logp=batch["old"], mask=batch["mask"], token_seq=batch["token_seq"],
                                num_seqs=B, advantages=batch["adv"], rollout_logp=batch["rollout"])
    counts = torch.zeros(B).index_add(0, batch["token_seq"], batch["mask"].float())
    norm = LossNormalizer(num_tokens=float(batch["mask"].sum()), num_seqs=float((counts > 0).sum()))
    out = get_policy_loss(name)(inputs, norm, _config(name))
    (grad,) = torch.autograd.grad(out.loss, logp)
    return out.loss.detach(), grad, finalize_metrics(out.metrics), out.seq_phi


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
    norm = global_normalizer([m["mask"] for m in local], [m["token_seq"] for m in local],
                             [m["num_seqs"] for m in local], cp_group=cp_group, dp_group=dp_group)
    results = {"norm": (norm.num_tokens, norm.num_seqs)}
    for name in names:
        dist.all_reduce = recording_all_reduce
        reduced_shapes.clear()
        logp = batch["logp"].clone().requires_grad_(True)
        total, parts, phis = 0.0, [], []
        for m in local:
            inputs = build_loss_inputs(
                logp=logp[m["keep"]], old_logp=batch["old"][m["keep"]], mask=m["mask"], token_seq=m["token_seq"],
                num_seqs=m["num_seqs"], advantages=m["adv"], rollout_logp=batch["rollout"][m["keep"]],
                cp_group=cp_group, differentiable_seq_log_ratio=(name == "gspo"),
            )
            out = get_policy_loss(name)(inputs, norm, _config(name))
            total = total + out.loss
            parts.append(out.metrics)
            phis.append(out.seq_phi)
        total.backward()
        dist.all_reduce = real_all_reduce
        metrics = all_reduce_metrics(merge_metrics(parts), dist.group.WORLD)
        results[name] = dict(loss=total.detach(), grad=logp.grad, shapes=list(reduced_shapes),
                             metrics=finalize_metrics(metrics), phis=phis, mbs=mbs)
    return results


def test_cp_dp_split_matches_single_process():
    results = run_distributed(_worker, CP * DP, LOSSES)
    batch = whole_batch()
    B = batch["adv"].numel()
    T = batch["token_seq"].numel()
    for name in LOSSES:
        loss, grad, metrics, seq_phi = reference(name)
        total = sum(r[name]["loss"] for r in results)
        torch.testing.assert_close(total, loss, rtol=1e-12, atol=1e-14)
        # Each token's gradient lives on the one rank that holds it; the others have zero there.
        g = sum(r[name]["grad"] for r in results)
        torch.testing.assert_close(g, grad, rtol=1e-10, atol=1e-14)
        # Reduced metrics match the single process wherever they are layout-independent.
        for key in ("loss", "num_response_tokens", "ratio/log_ratio_abs_mean", "rollout_corr/is_weight_ess"):
            if key in metrics:
                assert results[0][name]["metrics"][key] == pytest.approx(metrics[key], rel=1e-9), (name, key)
        if seq_phi is not None:
            for r in results:
                for mb, phi in zip(r[name]["mbs"], r[name]["phis"], strict=True):
                    torch.testing.assert_close(phi, seq_phi[mb], rtol=1e-12, atol=0)
        # The only collectives on the loss path are [3, B_micro] sequence vectors and the metric buffers:
        # never a token tensor.
        for r in results:
            seq_vectors = [s for s in r[name]["shapes"] if s == (3, B // (DP * MICRO))]
            assert len(seq_vectors) == (2 * MICRO if name == "gspo" else MICRO), (name, r[name]["shapes"])
            assert all(s[-1] != T and (len(s) == 1 or s == (3, B // (DP * MICRO))) for s in r[name]["shapes"])
    counts = torch.zeros(B).index_add(0, batch["token_seq"], batch["mask"].float())
    for r in results:
        assert r["norm"] == (float(batch["mask"].sum()), float((counts > 0).sum()))
