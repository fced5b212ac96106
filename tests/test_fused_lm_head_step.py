"""RLStep with `fused_lm_head=True` against the logits path on the tiny megatron MoE GPT (fp32): the same loss,
metrics, per-sequence log W / phi and full gradients (the output layer's included), under TP2 + SP, PP2 and CP2 (the fused head only on the last stage), through megatron's schedules; and the
forward-only old-log-prob pass gives the same log-probs and entropies. `lm_head_token_logprobs` (megatron's
region functions around the fused head) is checked alone under gloo TP2 with and without SP against float64.
With the single pass the old-log-prob pass runs the single pass's own forward (`lm_head_chunked_logprobs`): its
log-probs are bitwise the training pass's (TP2 + SP, over-long sequences through the recomputing tiles), it
stores no autograd graph, and it runs the training pass's GEMMs, not the recomputing head's token tiles.

Tolerances (fp32 model; the fused head only changes the order of fp32 sums): loss and metrics rel 1e-5,
log W abs 2e-5, gradients rel 1e-4 / abs 1e-7 (as tests/test_rl_layouts.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dist_harness import run_distributed
from gemm_shapes import GemmShapes

pytestmark = [pytest.mark.distributed, pytest.mark.megatron]


def _model_cfg():
    from vespo_megatron.megatron.model import TinyMoEConfig

    return TinyMoEConfig(hidden_size=32, num_layers=2, moe_layer_freq=(1, 0), ffn_hidden_size=64, seq_length=64)


def _step_cfg(fused: bool, single_pass: bool = False):
    from vespo_megatron.losses import RolloutCorrectionConfig, make_loss_config
    from vespo_megatron.megatron.step import RLStepConfig

    corr = RolloutCorrectionConfig(mode="fold")
    # lm_head_chunk_elements: 128 vocab x 6 tokens per tile -> many forward chunks, vocab tiles, token blocks;
    # single pass: 1024 elements = 8 tokens (16 on a TP2 shard): chunks of one or two whole sequences
    chunk = (1024 if single_pass else 768) if fused else None
    return RLStepConfig(loss_name="vespo", loss_config=make_loss_config("vespo", rollout_correction=corr),
                        temperature=0.9, fused_lm_head=fused, lm_head_chunk_elements=chunk,
                        lm_head_single_pass=single_pass)


MODES = {"logits": (False, False), "fused": (True, False), "single_pass": (True, True)}


def _old_logprobs(layout, model_cfg, mbs):
    """The forward-only old-log-prob pass on one model, fused first, then the logits path (which also checks
    that the fused call gave the output layer back): {fused: [(logp, entropy)] per local micro-batch}."""
    from vespo_megatron.compat import get_forward_backward_func
    from vespo_megatron.megatron.cpu_shim import cpu_device_context
    from vespo_megatron.megatron.model import build_gpt_model
    from vespo_megatron.megatron.parallel_setup import destroy_parallel, initialize_parallel
    from vespo_megatron.megatron.rl_batch import build_rl_microbatch, common_seq_len
    from vespo_megatron.megatron.step import RLStep, StepGroups

    groups = initialize_parallel(layout)
    try:
        model = build_gpt_model(model_cfg, layout, groups, attention_backend="reference")
        seq_len = common_seq_len(mbs, pad_multiple=8)
        local = [build_rl_microbatch(m, cp_size=groups.cp_size, cp_rank=groups.cp_rank, pad_multiple=8,
                                     seq_len=seq_len) for m in mbs[groups.dp_rank::groups.dp_size]]
        res = {}
        for fused in (True, False):
            step = RLStep(_step_cfg(fused), StepGroups(tp=groups.tp, cp=groups.cp))
            with torch.no_grad(), cpu_device_context():
                outs = get_forward_backward_func()(
                    forward_step_func=step.logprob_forward_step(), data_iterator=iter(local), model=[model],
                    num_microbatches=len(local), seq_length=local[0].tokens.size(1) * groups.cp_size,
                    micro_batch_size=local[0].tokens.size(0), forward_only=True)
            res[fused] = [(o["logp"].clone(), o["entropy"].clone()) for o in outs] if groups.is_last_stage else []
        assert "forward" not in vars(model.output_layer)  # the class's forward is back
        return res
    finally:
        destroy_parallel()


def _on_policy(layout, model_cfg, mbs):
    """The single pass's old-log-prob pass as the trainer runs it (eval mode, no grad), again with grad mode on
    (megatron's forward-only schedule leaves it on), then its training pass on the same weights: per local
    micro-batch (old logp, old logp with grad on, training logp), and per call of the forward-only head
    (`lm_head_chunked_logprobs`) the tensors autograd saved during it and whether its outputs require grad."""
    from vespo_megatron.compat import get_forward_backward_func
    from vespo_megatron.megatron import model as model_mod
    from vespo_megatron.megatron.cpu_shim import cpu_device_context
    from vespo_megatron.megatron.model import build_gpt_model
    from vespo_megatron.megatron.parallel_setup import destroy_parallel, initialize_parallel
    from vespo_megatron.megatron.rl_batch import build_rl_microbatch, common_seq_len
    from vespo_megatron.megatron.step import RLStep, StepGroups

    real, calls = model_mod.lm_head_chunked_logprobs, []

    def spy(*args, **kwargs):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = real(*args, **kwargs)
        calls.append((len(saved), out.logprobs.requires_grad or out.entropy.requires_grad))
        return out

    groups = initialize_parallel(layout)
    model_mod.lm_head_chunked_logprobs = spy
    try:
        model = build_gpt_model(model_cfg, layout, groups, attention_backend="reference")
        seq_len = common_seq_len(mbs, pad_multiple=8)
        local = [build_rl_microbatch(m, cp_size=groups.cp_size, cp_rank=groups.cp_rank, pad_multiple=8,
                                     seq_len=seq_len) for m in mbs[groups.dp_rank::groups.dp_size]]
        # 512 elements: 8 tokens on a TP2 shard, held whole up to 8 (the hard cap): sequences of 16 padded
        # tokens take the recomputing tiles
        cfg = dataclasses.replace(_step_cfg(True, True), lm_head_chunk_elements=512,
                                  lm_head_whole_sequence_elements=512)
        step = RLStep(cfg, StepGroups(tp=groups.tp, cp=groups.cp))
        shapes = dict(num_microbatches=len(local), seq_length=local[0].tokens.size(1) * groups.cp_size,
                      micro_batch_size=local[0].tokens.size(0))

        def old_pass():
            with cpu_device_context():
                return get_forward_backward_func()(forward_step_func=step.logprob_forward_step(),
                                                   data_iterator=iter(local), model=[model], forward_only=True,
                                                   **shapes)

        model.eval()
        with torch.no_grad():
            old = old_pass()
        with_grad = old_pass()
        model.train()
        normalizer = step.normalizer(local, dp_group=groups.dp)
        with cpu_device_context():
            train = get_forward_backward_func()(forward_step_func=step.forward_step(normalizer),
                                                data_iterator=iter(local), model=[model], forward_only=False,
                                                **shapes)
        if not groups.is_last_stage:
            return [], calls
        return [(o["logp"], g["logp"], t["logp"]) for o, g, t in zip(old, with_grad, train, strict=True)], calls
    finally:
        model_mod.lm_head_chunked_logprobs = real
        destroy_parallel()


def _run(rank, world_size):
    from vespo_megatron.megatron.parallel_setup import ParallelConfig
    from vespo_megatron.testing.layouts import random_rl_micro_batches, run_rl_layout

    cfg = _model_cfg()
    mbs = random_rl_micro_batches(cfg.vocab_size, num_micro=2, per_micro=2, max_prompt=5, max_response=9)
    # (TP2 without SP is refused for MoE models; `test_lm_head_token_logprobs_tp2` covers that mapping.)
    layouts = {"tp2_sp": ParallelConfig(tp=2, sp=True), "pp2": ParallelConfig(pp=2), "cp2": ParallelConfig(cp=2)}
    out = {}
    for name, layout in layouts.items():
        for mode, flags in MODES.items():
            out[(name, mode)] = run_rl_layout(layout, cfg, mbs, _step_cfg(*flags))
    for mode in ("logits", "single_pass"):  # megatron's DDP: the single pass adds d W into main_grad itself
        out[("dp2_ddp", mode)] = run_rl_layout(ParallelConfig(), cfg, mbs, _step_cfg(*MODES[mode]), ddp=True)
        # padded rows (b > 1) under SP: the gathered [s, b, h] states go back to [b, s, h] for whole sequences
        out[("tp2_sp_padded", mode)] = run_rl_layout(layouts["tp2_sp"], cfg, mbs, _step_cfg(*MODES[mode]),
                                                      batch_layout="padded")
    old = _old_logprobs(layouts["tp2_sp"], cfg, mbs)
    for fused in (False, True):
        out[("old_logp", fused)] = old[fused]
    out["on_policy"] = _on_policy(layouts["tp2_sp"], cfg, mbs)
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_run, 2)[0]


def _close(a, b, rtol, atol=0.0):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=atol)


@pytest.mark.parametrize(("name", "mode"), [(n, m) for n in ("tp2_sp", "pp2", "cp2") for m in ("fused", "single_pass")]
                         + [("dp2_ddp", "single_pass"), ("tp2_sp_padded", "single_pass")])
def test_fused_head_matches_logits_path(results, name, mode):
    off, on = results[(name, "logits")], results[(name, mode)]
    assert off.loss != 0.0 and any(g.abs().max() > 0 for g in off.grads.values())  # a non-trivial step
    _close(on.loss, off.loss, rtol=1e-5)
    _close(on.seq_log_ratio, off.seq_log_ratio, rtol=0.0, atol=2e-5)
    _close(on.seq_phi, off.seq_phi, rtol=1e-4, atol=1e-7)
    assert set(on.metrics) == set(off.metrics) and "entropy_mean" in on.metrics
    for key in off.metrics:
        _close(on.metrics[key], off.metrics[key], rtol=1e-5, atol=1e-7)
    assert set(on.grads) == set(off.grads)
    head = [k for k in off.grads if k.endswith("output_layer.weight")]
    assert head and off.grads[head[0]].abs().max() > 0  # the output layer's gradient is compared too
    for key, g in off.grads.items():
        torch.testing.assert_close(on.grads[key], g, rtol=1e-4, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")


def test_old_logprob_pass_matches(results):
    off, on = results[("old_logp", False)], results[("old_logp", True)]
    assert len(off) == len(on) == 2
    for (lp0, h0), (lp1, h1) in zip(off, on, strict=True):
        assert lp1.shape == lp0.shape
        torch.testing.assert_close(lp1, lp0, rtol=0.0, atol=2e-5)
        torch.testing.assert_close(h1, h0, rtol=0.0, atol=2e-5)


def test_single_pass_old_logprob_pass_is_the_training_pass_bitwise(results):
    """TP2 + SP, the single pass: the old-log-prob pass (no grad, and with grad mode on) gives bitwise the
    training pass's log-probs on the same weights (pi / pi_old exactly 1 on policy), through the forward-only
    head of the single pass (called once per micro-batch and pass), which saves nothing for backward; and they
    agree with the logits path's old-log-prob pass."""
    per_mb, calls = results["on_policy"]
    assert len(per_mb) == 2 and len(calls) == 4 and all(c == (0, False) for c in calls), calls
    for (old, with_grad, train), (logits_lp, _) in zip(per_mb, results[("old_logp", False)], strict=True):
        assert not old.requires_grad and not with_grad.requires_grad
        assert torch.equal(old, train) and torch.equal(with_grad, train)
        torch.testing.assert_close(old, logits_lp, rtol=0.0, atol=2e-5)




def test_old_logprob_head_runs_the_training_pass_gemms(monkeypatch):
    """RLStep with the single pass on a model's `LMHeadInput` (no TP, bf16): every GEMM of the old-log-prob head
    (`forward_only_logprobs`) is, in order and shape, one of the training pass's forward GEMMs (those run inside
    its forward, `_forward_chunks`, between the chunks' losses and gradients), and its log-probs are bitwise the
    training pass's; the recomputing head (the old-log-prob pass before) runs token tiles of other row counts.
    Sequences of 5-22 tokens against a 14-token budget, held whole up to 20: a chunk of two sequences, one held
    whole over the budget and one (22 tokens) through the recomputing tiles."""
    import vespo_megatron.parallel.fused_lm_head_loss as flhl
    from vespo_megatron.megatron.model import LMHeadInput, lm_head_token_logprobs
    from vespo_megatron.megatron.rl_batch import build_rl_microbatch
    from vespo_megatron.megatron.step import RLStep, StepGroups, sequence_token_counts
    from vespo_megatron.testing.layouts import random_rl_micro_batches

    v, h, elements, whole = 500, 24, 14 * 500, 20 * 500
    batch = build_rl_microbatch(random_rl_micro_batches(v, num_micro=1, per_micro=10, max_prompt=6, max_response=20,
                                                        seed=3)[0])
    seq_tokens = sequence_token_counts(batch.token_seq, batch.num_seqs)
    assert seq_tokens == [14, 8, 5, 8, 16, 10, 11, 22, 9, 20]
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(*batch.labels.shape, h, generator=g).to(torch.bfloat16)
    weight = (torch.randn(v, h, generator=g) * (3.0 / h**0.5)).to(torch.bfloat16)
    cfg = dataclasses.replace(_step_cfg(True, True), lm_head_chunk_elements=elements,
                              lm_head_whole_sequence_elements=whole)
    step = RLStep(cfg, StepGroups())

    def head():
        return LMHeadInput(hidden=hidden.clone().requires_grad_(), weight=weight.clone().requires_grad_(),
                           sequence_parallel=False)

    training, real = GemmShapes(), flhl._forward_chunks

    def recorded_forward(*args):  # the training pass's forward: its GEMMs recorded, not its gradients'
        chunks = real(*args)
        while True:
            with training:
                chunk = next(chunks, None)
            if chunk is None:
                return
            yield chunk

    with monkeypatch.context() as m:
        m.setattr(flhl, "_forward_chunks", recorded_forward)
        loss, _, reported = step.loss_func(batch, step.normalizer([batch]), head(), seq_tokens)
    assert loss.requires_grad and len(training.shapes) == 9 + 1  # 9 chunks, the 22-token one in 2 tiles
    old, recomputing = GemmShapes(), GemmShapes()
    with torch.no_grad():
        with old:
            lp = step.forward_only_logprobs(head(), batch, seq_tokens)
        with recomputing:
            lm_head_token_logprobs(head(), batch.labels, tp_group=None, temperature=0.9, compute_entropy=True,
                                   chunk_elements=elements)
    assert old.shapes == training.shapes
    assert recomputing.shapes != training.shapes
    assert lp.logprobs.shape == batch.labels.shape and torch.equal(lp.logprobs, reported["logp"])


def test_config_rejects_non_bool():
    from vespo_megatron.megatron.step import RLStepConfig

    with pytest.raises(ValueError, match=r"RLStepConfig.fused_lm_head: expected a bool, got 1"):
        RLStepConfig(fused_lm_head=1)
    assert dataclasses.replace(RLStepConfig(), fused_lm_head=True).fused_lm_head
    with pytest.raises(ValueError, match=r"RLStepConfig.lm_head_single_pass: expected fused_lm_head=True"):
        RLStepConfig(lm_head_single_pass=True)
    with pytest.raises(ValueError, match=r"RLStepConfig.lm_head_single_pass: expected a bool, got 'yes'"):
        RLStepConfig(fused_lm_head=True, lm_head_single_pass="yes")


def _head_worker(rank, world_size, hidden, weight, labels, glp, gh):
    import torch.distributed as dist

    from vespo_megatron.megatron.cpu_shim import cpu_device_context, install_cpu_shim
    from vespo_megatron.megatron.model import LMHeadInput, lm_head_token_logprobs

    install_cpu_shim()  # megatron's mappings allocate on "the current CUDA device"
    group = dist.new_group([0, 1])
    v_local = weight.shape[0] // world_size
    out = {}
    for sp in (False, True):
        s_local = hidden.shape[1] // world_size
        mine = hidden[:, rank * s_local : (rank + 1) * s_local] if sp else hidden  # [b, s_local, h]
        h = mine.clone().requires_grad_()
        w = weight[rank * v_local : (rank + 1) * v_local].clone().requires_grad_()
        with cpu_device_context():
            lp = lm_head_token_logprobs(LMHeadInput(hidden=h, weight=w, sequence_parallel=sp), labels,
                                        tp_group=group, temperature=0.8, compute_entropy=True, chunk_elements=40)
            ((lp.logprobs * glp).sum() + (lp.entropy * gh).sum()).backward()
        out[sp] = (lp.logprobs.detach(), lp.entropy.detach(), h.grad, w.grad)
    return out


def test_lm_head_token_logprobs_tp2():
    g = torch.Generator().manual_seed(3)
    b, s, h, v = 2, 6, 8, 40
    hidden, weight = torch.randn(b, s, h, generator=g), torch.randn(v, h, generator=g)
    labels = torch.randint(0, v, (b, s), generator=g)
    glp, gh = torch.randn(b, s, generator=g), torch.randn(b, s, generator=g)
    res = run_distributed(_head_worker, 2, hidden, weight, labels, glp, gh)

    x, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp = torch.log_softmax(x @ w.t() / 0.8, -1)
    ref_lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ref_h = -(logp.exp() * logp).sum(-1)
    ref_dx, ref_dw = torch.autograd.grad((ref_lp * glp).sum() + (ref_h * gh).sum(), (x, w))
    tol = dict(rtol=0.0, atol=2e-5)
    for sp in (False, True):
        for rank, per_rank in enumerate(res):
            lp, ent, dx, dw = per_rank[sp]
            assert lp.shape == (b, s)
            torch.testing.assert_close(lp.double(), ref_lp.detach(), **tol)
            torch.testing.assert_close(ent.double(), ref_h.detach(), **tol)
            want = ref_dx[:, rank * s // 2 : (rank + 1) * s // 2] if sp else ref_dx
            torch.testing.assert_close(dx.double(), want, **tol)  # summed over TP by megatron's mappings
            torch.testing.assert_close(dw.double(), ref_dw[rank * v // 2 : (rank + 1) * v // 2], **tol)


def _toy_history(rank, world_size, out_dir, mode):
    from vespo_megatron.training import cli as train_cli
    from vespo_megatron.training.trainer import Trainer

    fused, single_pass = MODES[mode]
    flags = ["--hidden-size", "32", "--prompts-per-step", "4", "--group-size", "4", "--micro-batch-size", "8",
             "--staleness", "2", "--sft-steps", "3", "--steps", "3", "--checkpoint-every", "0", "--threads", "1",
             "--out-dir", out_dir, "--run-name", mode, "--fused-lm-head" if fused else "--no-fused-lm-head"]
    if single_pass:
        flags += ["--lm-head-single-pass", "--lm-head-chunk-elements", "4096"]  # several chunks per micro-batch
    else:
        flags += ["--no-lm-head-single-pass"]  # (the default follows --fused-lm-head)
    trainer = Trainer(train_cli.config_from_argv(flags))
    # the flags reach the loss head
    assert (trainer.step_fn.cfg.fused_lm_head, trainer.step_fn.cfg.lm_head_single_pass) == (fused, single_pass)
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in trainer.run()]


def test_toy_run_metrics_identical_with_fusion_on_and_off(tmp_path):
    """The trainer with --fused-lm-head, and with --lm-head-single-pass (megatron's DDP: d W into main_grad),
    logs the same numbers as the logits path (warm start and RL steps)."""
    off = run_distributed(_toy_history, 1, str(tmp_path), "logits")[0]
    for mode in ("fused", "single_pass"):
        on = run_distributed(_toy_history, 1, str(tmp_path), mode)[0]
        assert len(off) == len(on) == 3
        for a, b in zip(off, on, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9, nan_ok=True), (mode, key)
