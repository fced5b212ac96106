"""Trainer pieces without a model: config validation, sample rejection with counted reasons, advantages,
the toy task."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import types

import pytest
import torch

from vespo_megatron.base.validation import ConfigError
from vespo_megatron.losses import VespoConfig
from vespo_megatron.megatron.model import TinyMoEConfig
from vespo_megatron.megatron.parallel_setup import ParallelConfig
from vespo_megatron.rollout.engine import Generation
from vespo_megatron.training.advantages import ADVANTAGE_ESTIMATORS, grpo_advantages, resolve_advantage
from vespo_megatron.training.config import (
    AlgorithmConfig,
    EvalConfig,
    PerformanceConfig,
    RolloutConfig,
    RunConfig,
    TrainerConfig,
)
from vespo_megatron.training.samples import EVAL_STREAM, Rejections, build_samples, sampling_seed
from vespo_megatron.training.toy_task import ArithmeticTask, ArithmeticTaskConfig, CharTokenizer


def test_group_advantages_against_loop():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    groups = [0, 0, 0, 1, 1, 2, 2]
    adv = grpo_advantages(rewards, groups, eps=0.0 + 1e-12)
    for g in set(groups):
        rs = [r for r, gg in zip(rewards, groups, strict=True) if gg == g]
        mean = sum(rs) / len(rs)
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / len(rs))
        for r, a, gg in zip(rewards, adv, groups, strict=True):
            if gg == g:
                assert a == pytest.approx((r - mean) / (std + 1e-12))
    assert adv[3] == adv[4] == 0.0  # a group with no spread carries no signal


def test_dr_grpo_and_rloo_against_loops():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 1.0, 0.0, 0.25]
    groups = [0, 0, 0, 1, 1, 2, 2, 3]
    dr = ADVANTAGE_ESTIMATORS["dr_grpo"](rewards, groups, 1e-6)
    rloo = ADVANTAGE_ESTIMATORS["rloo"](rewards, groups, 1e-6)
    for i, (r, g) in enumerate(zip(rewards, groups, strict=True)):
        mates = [rr for rr, gg in zip(rewards, groups, strict=True) if gg == g]
        others = [rr for j, (rr, gg) in enumerate(zip(rewards, groups, strict=True)) if gg == g and j != i]
        assert dr[i] == pytest.approx(r - sum(mates) / len(mates))
        assert rloo[i] == pytest.approx(r - sum(others) / len(others) if others else 0.0)
    assert rloo[7] == 0.0  # a lone sample has no baseline: no signal
    # RLOO is Dr. GRPO scaled by n / (n - 1)
    assert rloo[0] == pytest.approx(dr[0] * 3 / 2)


def test_advantage_estimator_by_import_path_and_bad_names():
    assert resolve_advantage("vespo_megatron.training.advantages:rloo_advantages") is ADVANTAGE_ESTIMATORS["rloo"]
    with pytest.raises(ValueError, match=r"AlgorithmConfig.advantage: expected one of \['dr_grpo', 'grpo', 'rloo'\]"):
        AlgorithmConfig(advantage="ppo")
    with pytest.raises(ValueError, match="AlgorithmConfig.advantage: expected an importable module"):
        AlgorithmConfig(advantage="no_such_module_xyz:f")


def _gen(i, out, lps, prompt=(1, 5, 6)):
    return Generation(sample_id=f"s{i}", prompt_ids=prompt, output_ids=tuple(out), output_logprobs=tuple(lps),
                      weight_version=0, finish_reason="stop")


def test_bad_generations_are_rejected_and_counted():
    gens = [
        _gen(0, [4, 2], [-0.1, -0.2]),
        _gen(1, [], []),  # empty response
        _gen(2, [4, 2], [float("nan"), -0.2]),  # NaN log-prob from the engine
        _gen(3, [4, 999], [-0.1, -0.2]),  # token outside the vocabulary
        _gen(4, [5, 2], [-0.3, -0.1]),
        _gen(5, [5, 2], [-0.3]),  # log-prob count mismatch
    ]
    rej = Rejections()
    samples, scored = build_samples(gens, [0, 0, 0, 1, 1, 1], lambda idx, g: [float(i == 0) for i in idx], rej,
                                    vocab_size=64)
    assert rej.counts == {"empty_response": 1, "nonfinite_logprob": 1, "token_out_of_vocab": 1,
                          "logprob_count_mismatch": 1}
    assert rej.examples["empty_response"] == "s1"
    assert [s.generation.sample_id for s in scored] == ["s0", "s4"]
    assert len(samples) == 2 and samples[0].response.tolist() == [4, 2]
    for sample, gen in zip(samples, (gens[0], gens[4]), strict=True):  # each sample its own generation's values
        assert sample.prompt.tolist() == list(gen.prompt_ids) and sample.response.tolist() == list(gen.output_ids)
        want = torch.tensor(gen.output_logprobs, dtype=torch.float32)
        assert torch.equal(sample.old_logp, want) and torch.equal(sample.rollout_logp, want)
        # the trainer replaces old_logp; the engine's log-probs must not share its storage
        assert sample.old_logp.untyped_storage().data_ptr() != sample.rollout_logp.untyped_storage().data_ptr()
    # Missing routing when routing replay needs it:
    rej2 = Rejections()
    build_samples(gens[:1], [0], lambda idx, g: [1.0] * len(idx), rej2, vocab_size=64, routing=(2, 2))
    assert rej2.counts == {"missing_routing": 1}


@pytest.mark.parametrize("change, match", [
    (dict(parallel=ParallelConfig(tp=3, sp=True)), r"world size|tp"),
    (dict(rollout=RolloutConfig(prompts_per_step=3, group_size=4)), r"prompts_per_step: expected a multiple of the data-parallel size 2"),
    (dict(algorithm=AlgorithmConfig(staleness=3), rollout=RolloutConfig(prompts_per_step=16, group_size=4)),
     r"AlgorithmConfig.staleness: expected a divisor of the 32 samples per DP rank .*, got 3"),
    (dict(algorithm=AlgorithmConfig(micro_batch_size=5, staleness=1), rollout=RolloutConfig(prompts_per_step=16, group_size=4)),
     r"AlgorithmConfig.micro_batch_size: expected a divisor of the 32 samples per DP rank of a mini-batch, got 5"),
    (dict(algorithm=AlgorithmConfig(routing_replay="r2"), model=TinyMoEConfig(moe_layer_freq=(0, 0))),
     r"AlgorithmConfig.routing_replay: expected 'off' for a model without MoE layers .*, got 'r2'"),
    # found at start now, not after the model is built (warm start) or inside megatron's config
    (dict(run=RunConfig(sft_micro_batch_size=5), rollout=RolloutConfig(prompts_per_step=16, group_size=4),
          algorithm=AlgorithmConfig(micro_batch_size=4)),
     r"RunConfig.sft_micro_batch_size: expected a divisor of the 32 samples per DP rank and warm-start step, got 5"),
    (dict(algorithm=AlgorithmConfig(micro_batch_size=4, logprob_micro_batch_size=24),
          rollout=RolloutConfig(prompts_per_step=16, group_size=4)),
     r"AlgorithmConfig.logprob_micro_batch_size: expected a divisor of the 32 samples per DP rank and step, got 24"),
    (dict(algorithm=AlgorithmConfig(micro_batch_size=4, logprob_micro_batch_size=16), parallel=ParallelConfig(cp=2),
          rollout=RolloutConfig(prompts_per_step=16, group_size=4)),
     r"AlgorithmConfig.logprob_micro_batch_size: expected None \(the update's micro-batch\) under context "
     r"parallelism \(cp = 2\), got 16"),
    (dict(parallel=ParallelConfig(pp=2), model=TinyMoEConfig(num_layers=3)),
     r"TinyMoEConfig.num_layers: expected a multiple of pp x vpp = 2 \(even pipeline stages\), got 3"),
])
def test_bad_config_fails_at_start(change, match):
    cfg = TrainerConfig(**change)
    # a field's cross-check is a ConfigError (the command line names its flag); the world size is no field
    kind = ValueError if "world size" in match else ConfigError
    with pytest.raises(kind, match=match):
        cfg.validate(world_size=2)


def test_config_field_errors():
    with pytest.raises(ValueError, match=r"RolloutConfig.group_size: expected an int >= 2"):
        RolloutConfig(group_size=1)
    with pytest.raises(ValueError, match=r"AlgorithmConfig.logprob_micro_batch_size: expected an int >= 1, got 0"):
        AlgorithmConfig(logprob_micro_batch_size=0)
    with pytest.raises(ValueError, match=r"AlgorithmConfig.staleness: expected an int in \[1, 64\], got 65"):
        AlgorithmConfig(staleness=65)
    with pytest.raises(ValueError, match=r"AlgorithmConfig.loss: expected one of \[.*'vespo'.*\] or an import path"):
        AlgorithmConfig(loss="dpo")
    with pytest.raises(ValueError, match=r"AlgorithmConfig.loss_config: expected a PPOClipConfig for loss 'grpo'"):
        AlgorithmConfig(loss="grpo", loss_config=VespoConfig())
    # the loss's typed config is filled in from the name
    assert AlgorithmConfig(loss="vespo_sqrt").loss_config == VespoConfig(length_norm="sqrt")
    with pytest.raises(ValueError, match=r"PerformanceConfig.lm_head_single_pass: expected False while "
                                         r"fused_lm_head is False .*add --fused-lm-head\), got True"):
        PerformanceConfig(fused_lm_head=False, lm_head_single_pass=True)
    assert PerformanceConfig(fused_lm_head=True, lm_head_single_pass=True).lm_head_single_pass


def test_the_trainer_runs_the_fused_single_pass_by_default():
    """Round 12: the fused head's single pass is the trainer's default; --no-fused-lm-head alone gives the logits
    path, --no-lm-head-single-pass the recomputing fused head (the single-pass switch follows the fused one
    unless given)."""
    from vespo_megatron.training.cli import config_from_argv

    def head(argv):
        perf = config_from_argv(argv).perf
        return perf.fused_lm_head, perf.single_pass

    assert head([]) == (True, True)
    assert head(["--no-fused-lm-head"]) == (False, False)
    assert head(["--no-lm-head-single-pass"]) == (True, False)
    assert head(["--fused-lm-head", "--lm-head-single-pass"]) == (True, True)
    assert PerformanceConfig().single_pass and not PerformanceConfig(fused_lm_head=False).single_pass


def test_toy_task_is_deterministic_and_verifiable():
    task = ArithmeticTask(ArithmeticTaskConfig(max_operand=20, ops="+-*", seed=3))
    a, b = task.problems(5, 8), task.problems(5, 8)
    assert a == b and task.problems(6, 8) != a
    tok = CharTokenizer()
    for p in a:
        assert tok.decode(p.prompt_ids) == p.text
        assert eval(p.text[:-1]) == int(p.answer)  # noqa: S307 - digits and one operator
        assert task.reward(p, task.answer_ids(p)) == 1.0
        assert task.reward(p, task.answer_ids(p)[:-1]) == 0.0  # no <eos>
        assert len(p.prompt_ids) <= task.max_prompt_tokens
        assert len(task.answer_ids(p)) <= task.max_new_tokens
    assert tok.vocab_size % 64 == 0
    with pytest.raises(ValueError, match=r"ArithmeticTaskConfig.ops"):
        ArithmeticTaskConfig(ops="/")


def _tuple_hash_in_process(hash_seed: str, parts) -> int:
    """hash(parts) % 2**63 in a fresh interpreter (no imports: seconds less than importing the package)."""
    code = f"print(hash({parts!r}) % 2**63)"
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                              timeout=120).stdout)


def test_sampling_seeds_are_the_same_in_every_process():
    """The eval seed once hashed a str, salted per process: identical models got different eval samples in
    different runs (round 8: up to 0.07 apart in pass@1). Now every seed is the same across processes, and the
    rollouts' seed is the one they always had."""
    parts = (3, EVAL_STREAM, 40, 1)
    assert _tuple_hash_in_process("1", parts) == _tuple_hash_in_process("2", parts) == sampling_seed(*parts)
    salted = (3, "eval", 40, 1)  # what the eval seed was: a str makes the hash differ between processes
    assert _tuple_hash_in_process("1", salted) != _tuple_hash_in_process("2", salted)
    assert sampling_seed(3, 40, 1) == hash((3, 40, 1)) % (2**63)  # rollouts: unchanged
    assert sampling_seed(3, EVAL_STREAM, 40, 1) != sampling_seed(3, 40, 1)
    assert 0 <= sampling_seed(-5, 7) < 2**63
    with pytest.raises(TypeError, match="int parts"):
        sampling_seed(0, "eval", 1)


def test_evaluation_seeds_its_generations_by_run_seed_step_and_rank():
    from vespo_megatron.training.evaluation import evaluate

    task = ArithmeticTask(ArithmeticTaskConfig(max_operand=9))
    seen = []

    class Engine:
        def generate(self, requests, seed):
            seen.append(seed)
            return [Generation(sample_id=r.sample_id, prompt_ids=r.prompt_ids, output_ids=(task.tok.EOS,),
                               output_logprobs=(0.0,), weight_version=0, finish_reason="stop") for r in requests]

    cfg = TrainerConfig(task=ArithmeticTaskConfig(max_operand=9), run=RunConfig(seed=7))
    groups = types.SimpleNamespace(dp_size=1, dp_rank=0, dp=None)
    from vespo_megatron.training.trainer import Trainer

    fake = types.SimpleNamespace(cfg=cfg, groups=groups, task=task, engine=Engine(),
                                 rewards=lambda problems, outs: [0.0] * len(outs))
    fake.requests = types.MethodType(Trainer.requests, fake)
    evaluate(fake, 20)
    evaluate(fake, 20)
    evaluate(fake, 30)
    assert seen == [sampling_seed(7, EVAL_STREAM, 20, 0)] * 2 + [sampling_seed(7, EVAL_STREAM, 30, 0)]


def test_eval_schedule_and_the_final_evaluations_sample_count():
    plain = EvalConfig(every=10, k=4)
    assert [s for s in range(100) if plain.k_at(s, 100) is not None] == list(range(9, 100, 10))
    assert {plain.k_at(s, 100) for s in range(9, 100, 10)} == {4}
    final = EvalConfig(every=10, k=4, final_k=16)
    assert [final.k_at(s, 100) for s in (8, 9, 89, 98, 99)] == [None, 4, 4, None, 16]
    # off the grid, the last step is still evaluated (the number a comparison reads), with final_k
    assert [s for s in range(25) if final.k_at(s, 25) is not None] == [9, 19, 24] and final.k_at(24, 25) == 16
    assert [s for s in range(25) if plain.k_at(s, 25) is not None] == [9, 19]
    assert EvalConfig(every=0, final_k=16).k_at(99, 100) is None  # evaluation off: no final one either
    with pytest.raises(ValueError, match="final_k"):
        EvalConfig(every=10, final_k=0)


def test_evaluation_with_k_samples_per_prompt_against_a_loop():
    """evaluate(k=...) draws k samples per prompt and scores pass@1 / pass@k per prompt (checked against plain
    Python over the generated answers), whatever EvalConfig.k says."""
    from vespo_megatron.training.evaluation import evaluate
    from vespo_megatron.training.trainer import Trainer

    task = ArithmeticTask(ArithmeticTaskConfig(max_operand=9))
    rng = random.Random(0)
    made = []

    class Engine:
        def generate(self, requests, seed):
            outs = []
            for r in requests:
                digit = task.tok.encode(str(rng.randrange(10)))
                made.append((r, tuple(digit)))
                outs.append(Generation(sample_id=r.sample_id, prompt_ids=r.prompt_ids, output_ids=(*digit, task.tok.EOS),
                                       output_logprobs=(0.0,) * (len(digit) + 1), weight_version=0, finish_reason="stop"))
            return outs

    cfg = TrainerConfig(task=ArithmeticTaskConfig(max_operand=9), eval=EvalConfig(every=1, k=2, max_problems=6))
    fake = types.SimpleNamespace(cfg=cfg, groups=types.SimpleNamespace(dp_size=1, dp_rank=0, dp=None), task=task,
                                 engine=Engine())
    problems = task.eval_problems()[:6]
    fake.rewards = lambda probs, outs: [float(task.tok.decode([t for t in o if t != task.tok.EOS]) == str(p.answer))
                                        for p, o in zip(probs, outs, strict=True)]
    fake.requests = types.MethodType(Trainer.requests, fake)
    out = evaluate(fake, 3, k=5)
    assert len(made) == 6 * 5 and out["eval/k"] == 5 and out["eval/num_problems"] == 6
    right = [[float(task.tok.decode(list(d)) == str(problems[i].answer)) for _, d in made[5 * i:5 * i + 5]]
             for i in range(6)]
    assert out["eval/pass@1"] == pytest.approx(sum(sum(r) / 5 for r in right) / 6)
    assert out["eval/pass@5"] == pytest.approx(sum(max(r) for r in right) / 6)
    assert "eval/pass@2" not in out
    assert evaluate(fake, 4)["eval/k"] == 2  # default: EvalConfig.k


def test_lm_head_whole_sequence_elements_is_checked_and_reaches_the_head(monkeypatch):
    """--lm-head-whole-sequence-elements: only with the single pass, at least the chunk; the training step hands
    it to the single-pass head (`fused_lm_head_loss`'s whole_sequence_elements)."""
    import torch

    import vespo_megatron.parallel.fused_lm_head_loss as flhl
    from vespo_megatron.megatron.model import LMHeadInput, lm_head_loss

    with pytest.raises(ValueError, match=r"PerformanceConfig.lm_head_whole_sequence_elements: expected None unless "
                                         r"lm_head_single_pass .*, got 1024"):
        PerformanceConfig(fused_lm_head=True, lm_head_single_pass=False, lm_head_whole_sequence_elements=1024)
    with pytest.raises(ValueError, match=r"PerformanceConfig.lm_head_whole_sequence_elements: expected an int >= "
                                         r"lm_head_chunk_elements \(2048\), got 1024"):
        PerformanceConfig(fused_lm_head=True, lm_head_single_pass=True, lm_head_chunk_elements=2048,
                          lm_head_whole_sequence_elements=1024)
    assert PerformanceConfig(fused_lm_head=True, lm_head_single_pass=True,
                             lm_head_whole_sequence_elements=2**30).lm_head_whole_sequence_elements == 2**30
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        return "out"

    monkeypatch.setattr(flhl, "fused_lm_head_loss", fake)
    head = LMHeadInput(hidden=torch.zeros(1, 4, 8), weight=torch.zeros(16, 8), sequence_parallel=False)
    assert lm_head_loss(head, torch.zeros(1, 4, dtype=torch.long), None, [4], tp_group=None, temperature=1.0,
                        compute_entropy=False, chunk_elements=64, whole_sequence_elements=96) == "out"
    assert seen["whole_sequence_elements"] == 96 and seen["chunk_elements"] == 64
