"""The RL loop with the SGLang engine over HTTP (against the local test server that speaks SGLang's wire
format), including R3 routing replay from SGLang's routed-experts payloads and weight sync per step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from dist_harness import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.megatron]
ROOT = Path(__file__).resolve().parents[1]


def _train(rank, world_size, out_dir):
    from vespo_megatron.testing import FakeSGLangServer, hash_policy
    from vespo_megatron.training import cli as train_cli
    from vespo_megatron.training.trainer import Trainer

    with FakeSGLangServer(hash_policy(vocab_size=64), num_hidden_layers=2, top_k=2, num_experts=4) as server:
        cfg = train_cli.config_from_argv([
            "--hidden-size", "32", "--prompts-per-step", "4", "--group-size", "4", "--micro-batch-size", "4",
            "--staleness", "2", "--sft-steps", "0", "--steps", "2", "--rollout-engine", "sglang",
            "--sglang-url", server.url, "--routing-replay", "r3", "--rollout-correction", "tis",
            "--out-dir", out_dir, "--threads", "1"])
        trainer = Trainer(cfg)
        history = trainer.run()
        return history, len(server.weight_loads), len(server.bodies("/generate")), dict(trainer.rejections.counts)


def test_loop_with_sglang_engine_and_r3(tmp_path):
    history, loads, generates, rejected = run_distributed(_train, 1, str(tmp_path))[0]
    assert len(history) == 2
    assert loads == 3  # the initial weights and one sync per step
    assert generates >= 2 * 16
    for step, values in enumerate(history):
        assert math.isfinite(values["loss"])
        assert values["weight_version"] == step + 1
        assert 0 <= values["routing/agree_exact"] <= 1  # the server's routing was replayed
        assert values["staleness/max"] == 0
    # The hash policy is not the trainer's model: a real mismatch that the metrics see.
    assert history[0]["mismatch/kl_k3"] > 0
    assert sum(rejected.values()) == sum(v["rollout/rejected"] for v in history)
