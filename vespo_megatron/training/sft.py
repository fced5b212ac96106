"""Supervised warm start on correct answers before RL: REINFORCE with A = 1 is maximum likelihood."""

from __future__ import annotations

import math
import sys
import time

import torch

from vespo_megatron.megatron.rl_batch import RLSample
from vespo_megatron.megatron.step import RLStep, RLStepConfig, StepGroups

from .optim import clip_and_step

__all__ = ["sft_steps", "sft_warm_start", "progress_steps", "sft_lr_at"]

# The cosine ends at this share of sft_lr (not 0: the last steps still learn).
_COSINE_FLOOR = 0.1


def sft_lr_at(run, k: int) -> float:
    """The SFT lr of step k (0-based) under `run`'s schedule (RunConfig: sft_lr, sft_warmup_steps, sft_lr_decay,
    sft_decay_steps): linear warmup from sft_lr / warmup to sft_lr, then constant, or a cosine from sft_lr at the
    end of the warmup to 10 % of it at sft_decay_steps (and flat after)."""
    lr, warm = run.sft_lr, run.sft_warmup_steps
    if k < warm:
        return lr * (k + 1) / warm
    if run.sft_lr_decay == "constant":
        return lr
    end = run.sft_decay_steps or run.sft_steps
    span = max(end - warm, 1)
    progress = min(max(k - warm, 0) / span, 1.0)
    return lr * (_COSINE_FLOOR + (1 - _COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


def progress_steps(total: int, parts: int = 10) -> set[int]:
    """The 1-based steps after which the warm start reports: about every `parts`-th of the way, and the last."""
    every = max(1, total // parts)
    return {k for k in range(every, total + 1, every)} | {total}


def _token_nll(micro, outs) -> float:
    """Mean negative log-likelihood of the answer tokens this rank saw (its DP / CP share, not reduced: a
    progress indicator that costs no collective)."""
    num = den = 0.0
    for mb, out in zip(micro, outs, strict=True):
        mask = mb.loss_mask.reshape(-1).to(torch.float64)
        num -= float((out["logp"].reshape(-1).to(torch.float64) * mask).sum())
        den += float(mask.sum())
    return num / den if den else float("nan")


def sft_steps(trainer, start: int, count: int, *, on_step=None) -> None:
    """Supervised steps start .. start + count - 1 (the task's "sft" split at each step index) at the lr
    `sft_lr_at(run, k)`; the optimizer state carries over between calls. `on_step(k, micro, outs)` after each
    step (outs: the last stage's per-micro-batch outputs)."""
    cfg, g = trainer.cfg, trainer.groups
    sft_step = RLStep(RLStepConfig(loss_name="reinforce", compute_entropy=False, fused_lm_head=cfg.perf.fused_lm_head,
                                   lm_head_chunk_elements=cfg.perf.lm_head_chunk_elements,
                                   lm_head_single_pass=cfg.perf.single_pass,
                                   lm_head_whole_sequence_elements=cfg.perf.lm_head_whole_sequence_elements),
                      StepGroups(tp=g.tp, cp=g.cp))
    n = cfg.rollout.samples_per_step // g.dp_size
    sft_mb = cfg.run.sft_micro_batch_size or cfg.algorithm.micro_batch_size
    if n % sft_mb:
        raise ValueError(f"RunConfig.sft_micro_batch_size: expected a divisor of the {n} samples per DP rank "
                         f"and step, got {sft_mb}")
    for k in range(start, start + count):
        for group in trainer.optimizer.param_groups:
            group["lr"] = sft_lr_at(cfg.run, k)
        problems = trainer.task.problems(k, cfg.rollout.samples_per_step, split="sft")[g.dp_rank * n:(g.dp_rank + 1) * n]
        answers = [torch.tensor(trainer.task.answer_ids(p)) for p in problems]
        samples = [RLSample(prompt=torch.tensor(p.prompt_ids), response=a, old_logp=torch.zeros(len(a)), advantage=1.0)
                   for p, a in zip(problems, answers, strict=True)]
        micro = trainer.batcher.split(samples, n // sft_mb, samples[0], seq_len=sft_mb * trainer.batcher.longest)
        trainer.model.zero_grad_buffer()
        trainer.optimizer.zero_grad()
        normalizer = sft_step.normalizer(micro, dp_group=g.dp)
        outs, _ = trainer.schedule(sft_step.forward_step(normalizer), micro, forward_only=False)  # routes live
        clip_and_step(trainer.optimizer, cfg.algorithm.clip_grad)
        if on_step is not None:
            on_step(k, micro, outs)


def sft_warm_start(trainer) -> None:
    """`run.sft_steps` steps at `run.sft_lr` on the task's SFT split; RL then starts with fresh Adam moments."""
    cfg = trainer.cfg
    # A warm start takes minutes on a real model: the logging rank says where it is (issue 13: it printed nothing).
    report = trainer.is_log_rank
    total, t0 = cfg.run.sft_steps, time.monotonic()
    marks = progress_steps(total)
    if report:
        print(f"warm start: {total} supervised steps at lr {cfg.run.sft_lr:g} before RL", file=sys.stderr, flush=True)

    def progress(k, micro, outs):
        if report and k + 1 in marks:
            nll = f" | answer nll {_token_nll(micro, outs):.4g}" if outs else ""
            print(f"warm start {k + 1:>{len(str(total))}}/{total} {time.monotonic() - t0:.0f}s{nll}",
                  file=sys.stderr, flush=True)

    sft_steps(trainer, 0, total, on_step=progress)
    for group in trainer.optimizer.param_groups:
        group["lr"] = cfg.algorithm.lr
    for sub in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        sub.optimizer.state.clear()
