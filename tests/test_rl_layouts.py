"""Layout invariance of the RL step on a tiny megatron-core MoE GPT: the same global batch (mixed lengths,
packed THD and padded, several micro-batches) under DP2, TP2+SP, CP2, EP2 and PP2 gives the single
process's loss, per-sequence log W and phi, and full gradients, for vespo (rollout ratio folded), grpo (masked
IS at token level) and gspo (masked IS at sequence level): rejected tokens leave the normaliser and the sums
the same way under every layout.

The same step through megatron's DistributedDataParallel (the trainer's path) is checked for vespo too.

Tolerances (fp32 model): loss rel 1e-5, log W abs 2e-5, phi rel 1e-4, gradients rel 1e-4 / abs 1e-7.
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_distributed
from layouts import TWO_RANK_LAYOUTS

from vespo_megatron.megatron.parallel_setup import ParallelConfig

pytestmark = [pytest.mark.distributed, pytest.mark.megatron]

LAYOUTS = TWO_RANK_LAYOUTS
RUNS = [("vespo", "thd"), ("grpo", "thd"), ("gspo", "thd"), ("vespo", "padded")]
CHECKS = [*RUNS, ("vespo", "thd_ddp")]


def _model_cfg():
    from vespo_megatron.megatron.model import TinyMoEConfig

    # layer 0 MoE (4 experts, top-2), layer 1 dense
    return TinyMoEConfig(hidden_size=32, num_layers=2, moe_layer_freq=(1, 0), ffn_hidden_size=64, seq_length=64)


def _micro_batches(vocab: int):
    """4 micro-batches x 2 samples, prompts 1-5 and responses 1-9 tokens."""
    from vespo_megatron.testing.layouts import random_rl_micro_batches

    return random_rl_micro_batches(vocab, num_micro=4, per_micro=2, max_prompt=5, max_response=9)


def _step_cfg(loss):
    from vespo_megatron.losses import RolloutCorrectionConfig, make_loss_config
    from vespo_megatron.megatron.step import RLStepConfig

    corr = {
        "vespo": RolloutCorrectionConfig(mode="fold"),
        "grpo": RolloutCorrectionConfig(mode="mis", level="token", upper=1.1),
        "gspo": RolloutCorrectionConfig(mode="mis", level="sequence", upper=1.2),
    }[loss]
    return RLStepConfig(loss_name=loss, loss_config=make_loss_config(loss, rollout_correction=corr), temperature=0.9)


def _run(rank, world_size, layouts):
    from vespo_megatron.testing.layouts import run_rl_layout

    cfg = _model_cfg()
    mbs = _micro_batches(cfg.vocab_size)
    out = {
        (name, loss, batch_layout): run_rl_layout(layout, cfg, mbs, _step_cfg(loss), batch_layout=batch_layout)
        for name, layout in layouts.items()
        for loss, batch_layout in RUNS
    }
    # The trainer's path: megatron's DDP + finalize_model_grads reduce the gradients (install_rl_grad_finalizer).
    for name, layout in layouts.items():
        out[(name, "vespo", "thd_ddp")] = run_rl_layout(layout, cfg, mbs, _step_cfg("vespo"), ddp=True)
    return out


@pytest.fixture(scope="module")
def results():
    ref = run_distributed(_run, 1, {"ref": ParallelConfig()})[0]
    runs = run_distributed(_run, 2, LAYOUTS)
    return ref, runs


def test_reference_is_not_trivial(results):
    ref, _ = results
    losses = {key[1]: r.loss for key, r in ref.items() if key[2] == "thd"}
    assert len(set(losses.values())) == len(losses) == 3  # the three losses differ from each other
    assert ref[("ref", "vespo", "padded")].loss == pytest.approx(losses["vespo"], rel=1e-6)
    for r in ref.values():
        assert any(g.abs().max() > 0 for n, g in r.grads.items() if "router" in n)
        assert r.seq_log_ratio.abs().max() > 0.1
    assert ref[("ref", "vespo", "thd")].seq_phi is not None
    for loss in ("grpo", "gspo"):  # masked IS rejects some tokens / sequences, not all
        assert 0 < ref[("ref", loss, "thd")].metrics["rollout_corr/mis_masked_frac"] < 1, loss
    # The packed and the padded batch are the same samples: same per-sequence log W.
    torch.testing.assert_close(ref[("ref", "vespo", "thd")].seq_log_ratio, ref[("ref", "vespo", "padded")].seq_log_ratio,
                               rtol=0, atol=2e-5)


@pytest.mark.parametrize("loss, batch_layout", CHECKS)
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_matches_single_process(results, name, loss, batch_layout):
    ref_all, runs = results
    ref = ref_all[("ref", loss, batch_layout.replace("_ddp", ""))]
    for rank_result in runs:
        got = rank_result[(name, loss, batch_layout)]
        assert got.loss == pytest.approx(ref.loss, rel=1e-5)
        torch.testing.assert_close(got.seq_log_ratio, ref.seq_log_ratio, rtol=0, atol=2e-5)
        if ref.seq_phi is not None:
            torch.testing.assert_close(got.seq_phi, ref.seq_phi, rtol=1e-4, atol=1e-7)
        assert got.grads.keys() == ref.grads.keys()
        for pname, grad in ref.grads.items():
            torch.testing.assert_close(got.grads[pname], grad, rtol=1e-4, atol=1e-7, msg=pname)
        for key in ("num_response_tokens", "num_loss_tokens", "ratio/log_ratio_abs_mean"):
            assert got.metrics[key] == pytest.approx(ref.metrics[key], rel=1e-5), key
