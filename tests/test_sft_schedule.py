"""The SFT lr schedule: values written out from its definition, config validation naming the field, and the
supervised steps really running at the scheduled lr (a tiny trainer, the optimizer's lr read at each step)."""

from __future__ import annotations

import math

import pytest
from dist_harness import run_distributed

from vespo_megatron.base.validation import ConfigError
from vespo_megatron.training.config import RunConfig
from vespo_megatron.training.sft import sft_lr_at


def test_constant_with_warmup():
    run = RunConfig(sft_lr=1e-3, sft_warmup_steps=4)
    assert [sft_lr_at(run, k) for k in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert [sft_lr_at(RunConfig(sft_lr=2e-3), k) for k in (0, 50)] == [2e-3, 2e-3]  # the default: constant


def test_cosine_after_warmup_ends_at_a_tenth():
    run = RunConfig(sft_lr=1e-3, sft_warmup_steps=4, sft_lr_decay="cosine", sft_decay_steps=14)
    # after the warmup, progress p = (k - 4) / 10: lr = 1e-3 * (0.1 + 0.9 * (1 + cos(pi p)) / 2)
    for k, p in [(4, 0.0), (6, 0.2), (9, 0.5), (13, 0.9), (14, 1.0), (40, 1.0)]:
        assert sft_lr_at(run, k) == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * p))))
    assert sft_lr_at(run, 9) == pytest.approx(5.5e-4) and sft_lr_at(run, 14) == pytest.approx(1e-4)
    # without sft_decay_steps the cosine ends at sft_steps
    assert sft_lr_at(RunConfig(sft_lr=1e-3, sft_steps=10, sft_lr_decay="cosine"), 10) == pytest.approx(1e-4)


@pytest.mark.parametrize("field,value", [("sft_lr_decay", "linear"), ("sft_warmup_steps", -1),
                                         ("sft_decay_steps", 0)])
def test_bad_schedule_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        RunConfig(**{field: value})


def _lrs(rank, world_size, out_dir):
    from vespo_megatron.megatron.parallel_setup import destroy_parallel
    from vespo_megatron.training import cli as train_cli
    from vespo_megatron.training.sft import sft_steps
    from vespo_megatron.training.trainer import Trainer

    cfg = train_cli.config_from_argv([
        "--hidden-size", "32", "--num-experts", "4", "--moe-ffn-hidden-size", "32", "--prompts-per-step", "4",
        "--group-size", "2", "--micro-batch-size", "4", "--threads", "1", "--sft-steps", "0", "--sft-lr", "1e-3",
        "--sft-warmup-steps", "2", "--sft-lr-decay", "cosine", "--sft-decay-steps", "4", "--no-console",
        "--out-dir", out_dir])
    trainer = Trainer(cfg)
    try:
        seen = []
        sft_steps(trainer, 0, 5, on_step=lambda k, micro, outs: seen.append(trainer.optimizer.param_groups[0]["lr"]))
        return seen, [sft_lr_at(cfg.run, k) for k in range(5)]
    finally:
        destroy_parallel()


@pytest.mark.distributed
@pytest.mark.megatron
def test_supervised_steps_run_at_the_scheduled_lr(tmp_path):
    seen, expected = run_distributed(_lrs, 1, str(tmp_path))[0]
    assert seen == pytest.approx(expected)
    assert seen == pytest.approx([5e-4, 1e-3, 1e-3, 5.5e-4, 1e-4])
