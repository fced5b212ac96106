"""Supervised warm start on correct answers before RL: REINFORCE with A = 1 is maximum likelihood."""

from __future__ import annotations

import torch

from vespo_megatron.megatron.rl_batch import RLSample
from vespo_megatron.megatron.step import RLStep, RLStepConfig, StepGroups

from .optim import clip_and_step

__all__ = ["sft_warm_start"]


def sft_warm_start(trainer) -> None:
    """`run.sft_steps` steps at `run.sft_lr` on the task's SFT split; RL then starts with fresh Adam moments."""
    cfg, g = trainer.cfg, trainer.groups
    sft_step = RLStep(RLStepConfig(loss_name="reinforce", compute_entropy=False), StepGroups(tp=g.tp, cp=g.cp))
    for group in trainer.optimizer.param_groups:
        group["lr"] = cfg.run.sft_lr
    n = cfg.rollout.samples_per_step // g.dp_size
    sft_mb = cfg.run.sft_micro_batch_size or cfg.algorithm.micro_batch_size
    if n % sft_mb:
        raise ValueError(f"RunConfig.sft_micro_batch_size: expected a divisor of the {n} samples per DP rank "
                         f"and step, got {sft_mb}")
    for k in range(cfg.run.sft_steps):
        problems = trainer.task.problems(k, cfg.rollout.samples_per_step, split="sft")[g.dp_rank * n:(g.dp_rank + 1) * n]
        answers = [torch.tensor(trainer.task.answer_ids(p)) for p in problems]
        samples = [RLSample(prompt=torch.tensor(p.prompt_ids), response=a, old_logp=torch.zeros(len(a)), advantage=1.0)
                   for p, a in zip(problems, answers, strict=True)]
        micro = trainer.batcher.split(samples, n // sft_mb, samples[0], seq_len=sft_mb * trainer.batcher.longest)
        trainer.model.zero_grad_buffer()
        trainer.optimizer.zero_grad()
        normalizer = sft_step.normalizer(micro, dp_group=g.dp)
        trainer.schedule(sft_step.forward_step(normalizer), micro, forward_only=False)  # routes live
        clip_and_step(trainer.optimizer, cfg.algorithm.clip_grad)
    for group in trainer.optimizer.param_groups:
        group["lr"] = cfg.algorithm.lr
    for sub in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        sub.optimizer.state.clear()
