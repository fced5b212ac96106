"""The RL loop on real-model plumbing: a Hugging Face Qwen3-MoE checkpoint (made by `transformers` in the test)
with its tokenizer, a JSONL math dataset scored by math-verify, held-out evaluation, HF saves, and weight
sync to an SGLang-speaking server as an HF checkpoint on disk or as streamed buckets."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from dist_harness import run_distributed

pytest.importorskip("transformers")
pytest.importorskip("mbridge")
pytest.importorskip("math_verify")

pytestmark = [pytest.mark.distributed, pytest.mark.megatron]
ROOT = Path(__file__).resolve().parents[1]


def _make_checkpoint_and_data(root: Path) -> tuple[str, str]:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from vespo_megatron.data.testing_tokenizer import tiny_chat_tokenizer

    tok = tiny_chat_tokenizer()
    ckpt = str(root / "ckpt")
    vocab = -(-len(tok) // 64) * 64
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False, rope_theta=10000.0,
        eos_token_id=tok.eos_token_id)).float()
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    rows = [{"prompt": f"What is {a}+{b}?", "answer": str(a + b)} for a in range(4) for b in range(4)]
    rows.append({"prompt": "What is 1+1?"})  # no answer: skipped and counted
    rows.append({"prompt": "What is " + "1+" * 200 + "1?", "answer": "201"})  # too long: skipped and counted
    data = str(root / "prompts.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return ckpt, data


def _args(ckpt, data, out, *extra):
    return ["--hf-checkpoint", ckpt, "--prompt-data", data, "--max-prompt-tokens", "64", "--max-new-tokens", "8",
            "--eval-holdout", "4", "--prompts-per-step", "4", "--group-size", "2", "--micro-batch-size", "4",
            "--staleness", "2", "--sft-steps", "0", "--steps", "2", "--seq-length", "128", "--out-dir", out,
            "--threads", "1", "--reward-timeout", "20", *extra]


def _train_math(rank, world_size, ckpt, data, out):
    from vespo_megatron.training import cli as train_cli
    from vespo_megatron.training.trainer import Trainer

    # one SFT step: a random model answers nothing right, and RL with all-zero advantages changes nothing
    cfg = train_cli.config_from_argv(_args(ckpt, data, out, "--eval-every", "1", "--eval-k", "2",
                                                      "--save-hf-final", "--sft-steps", "1"))
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.task.close()


def test_hf_checkpoint_math_data_eval_and_save(tmp_path):
    from transformers import Qwen3MoeForCausalLM

    from vespo_megatron.hf.safetensors_io import CheckpointReader

    ckpt, data = _make_checkpoint_and_data(tmp_path)
    out = str(tmp_path / "run")
    history = run_distributed(_train_math, 1, ckpt, data, out)[0]
    assert len(history) == 2
    for values in history:
        assert values["eval/num_problems"] == 4
        assert 0 <= values["eval/pass@1"] <= values["eval/pass@2"] <= 1
        assert values["eval/mean@2"] == pytest.approx(values["eval/pass@1"])  # binary rewards
        assert values["data/skipped/missing_answer"] == 1 and values["data/skipped/prompt_too_long"] == 1
        assert torch.isfinite(torch.tensor(values["loss"]))
    from vespo_megatron.training.run_dir import checkpoint_fingerprint, read_init_checkpoint

    start = read_init_checkpoint(os.path.join(out, "toy"))  # which base this run came from, by content
    assert start["path"] == ckpt and start["sha256"] == checkpoint_fingerprint(ckpt)["sha256"]
    saved = os.path.join(out, "toy", "hf", "step_0000002")  # <out-dir>/<run-name>/hf
    original, final = CheckpointReader(ckpt), CheckpointReader(saved)
    assert final.names() == original.names()
    changed = [n for n in original.names() if not torch.equal(original.get(n).bfloat16(), final.get(n))]
    assert changed, "training changed no weight"
    assert os.path.isfile(os.path.join(saved, "tokenizer_config.json"))  # the tokenizer travels with it
    reloaded = Qwen3MoeForCausalLM.from_pretrained(saved)  # a checkpoint transformers (and SGLang) can read
    assert reloaded.config.num_hidden_layers == 2


def test_model_flags_that_disagree_with_the_checkpoint_fail_before_building(tmp_path):
    from vespo_megatron.training import cli as train_cli

    ckpt, data = _make_checkpoint_and_data(tmp_path)
    cfg = train_cli.config_from_argv(_args(ckpt, data, str(tmp_path / "run"), "--num-experts", "8", "--hidden-size", "64"))
    with pytest.raises(ValueError, match=r"hidden_size: model flags 64, checkpoint 32(.|\n)*num_experts: model "
                                         r"flags 8, checkpoint 4"):
        cfg.validate(1)
    ok = dataclasses.replace(cfg, model=train_cli.config_from_argv(_args(ckpt, data, "x")).model)
    ok.validate(1)


def _train_sglang(rank, world_size, out, mode, server_url):
    from vespo_megatron.hf.bridge import iter_hf_tensors
    from vespo_megatron.training import cli as train_cli
    from vespo_megatron.training.trainer import Trainer

    cfg = train_cli.config_from_argv([
        "--hidden-size", "32", "--prompts-per-step", "4", "--group-size", "2", "--micro-batch-size", "4",
        "--sft-steps", "0", "--steps", "2", "--rollout-engine", "sglang", "--sglang-url", server_url,
        "--weight-sync", mode, "--weight-sync-bucket-mib", "1", "--out-dir", out, "--threads", "1"])
    trainer = Trainer(cfg)
    trainer.run()
    # the trainer's final weights in HF naming (bf16 on disk; the stream sends the parameters' dtype)
    return {n: t.clone() for n, t in iter_hf_tensors(trainer.model, trainer.groups, trainer.policy.hf_config)}


@pytest.mark.parametrize("mode", ["disk", "distributed"])
def test_weight_sync_to_sglang_sends_the_trainers_hf_weights(tmp_path, mode):
    from vespo_megatron.hf.safetensors_io import CheckpointReader
    from vespo_megatron.testing import FakeSGLangServer, hash_policy

    out = str(tmp_path / "run")
    # the server lives in this process; the trainer in a spawned one (a weight-update group per process)
    with FakeSGLangServer(hash_policy(vocab_size=64), num_hidden_layers=2, top_k=2, num_experts=4) as server:
        final = run_distributed(_train_sglang, 1, out, mode, server.url)[0]
        assert "model.layers.1.mlp.experts.3.down_proj.weight" in final
        if mode == "disk":
            assert len(server.weight_loads) == 3 and server.weight_loads[-1]["weight_version"] == "2"
            got = CheckpointReader(server.weight_loads[-1]["model_path"])
            assert got.names() == sorted(final)
            for name, t in final.items():
                assert torch.equal(got.get(name), t.bfloat16()), name
            # older versions removed; under the run's own directory
            assert sorted(os.listdir(os.path.join(out, "toy", "weights"))) == ["v0000002"]
        else:
            assert sorted(server.received_weights) == sorted(final)
            for name, t in final.items():
                assert torch.equal(server.received_weights[name], t), name
            assert server.weight_version == "2"


def _toy_eval(rank, world_size, out):
    from vespo_megatron.training import cli as train_cli
    from vespo_megatron.training.trainer import Trainer

    cfg = train_cli.config_from_argv([
        "--hidden-size", "32", "--prompts-per-step", "4", "--group-size", "2", "--micro-batch-size", "4",
        "--sft-steps", "3", "--steps", "1", "--eval-every", "1", "--eval-k", "3", "--eval-max-problems", "6",
        "--out-dir", out, "--threads", "1"])
    trainer = Trainer(cfg)
    return trainer.run(), [p.text for p in trainer.task.eval_problems()][:6]


def test_toy_task_eval_metrics(tmp_path):
    (values,), problems = run_distributed(_toy_eval, 1, str(tmp_path))[0]
    assert values["eval/num_problems"] == 6 and len(set(problems)) > 1
    assert values["eval/pass@1"] <= values["eval/pass@3"]
    assert values["eval/mean@3"] == pytest.approx(values["eval/pass@1"])
    assert values["eval/errors"] == 0


def test_dry_run_plans_from_the_checkpoint(tmp_path, capsys):
    from vespo_megatron.training import cli as train_cli

    ckpt, data = _make_checkpoint_and_data(tmp_path)
    assert train_cli.main(_args(ckpt, data, str(tmp_path / "run"), "--dry-run")) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["samples_per_step"] == 8


def _train_math_tp2(rank, world_size, ckpt, data, out):
    from vespo_megatron.training import cli as train_cli
    from vespo_megatron.training.trainer import Trainer

    cfg = train_cli.config_from_argv(_args(ckpt, data, out, "--tp", "2", "--sp", "--eval-every", "1",
                                                      "--eval-k", "2", "--steps", "1", "--sft-steps", "1"))
    trainer = Trainer(cfg)
    try:
        (values,) = trainer.run()
        return trainer.task._checker is not None, values, dict(trainer.rewards.failures)
    finally:
        trainer.task.close()


def test_math_rewards_are_computed_once_per_replica(tmp_path):
    """Under TP=2 only the replica's first rank runs the checker; both ranks get its rewards (a timeout on one
    rank only would otherwise give the two TP ranks different advantages for the same samples)."""
    ckpt, data = _make_checkpoint_and_data(tmp_path)
    (started0, values0, fails0), (started1, values1, fails1) = run_distributed(
        _train_math_tp2, 2, ckpt, data, str(tmp_path / "run"))
    assert started0 and not started1
    assert fails0 == fails1 and sum(fails0.values()) > 0  # a random model's answers have no \boxed{} in them
    # logged at the end of the RL step (before that step's eval checks): the same on both ranks
    assert 0 < values0["reward/fail_total/no_answer"] == values1["reward/fail_total/no_answer"] <= fails0["no_answer"]
    assert values0["eval/pass@1"] == values1["eval/pass@1"]
