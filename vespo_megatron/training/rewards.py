"""The task, its rewards, and the per-step rollout numbers.

Math-checker rewards are computed once per data-parallel replica, in one batch (the checker's worker pool):
a check that times out on one rank and not on another would give the replica's TP / CP / PP ranks different
advantages for the same samples. Toy rewards are exact and cheap, computed on every rank.
"""

from __future__ import annotations

import collections

import torch

from vespo_megatron.base.metric import Metric
from vespo_megatron.data.math_reward import FAILURE_REASONS
from vespo_megatron.data.math_task import MathTask, MathTaskConfig
from vespo_megatron.metrics.mismatch import response_stats, staleness_histogram
from vespo_megatron.rollout.replica import Replica

from .reasoning_task import ReasoningTask, ReasoningTaskConfig
from .toy_task import ArithmeticTask

__all__ = ["make_task", "RewardScorer", "rollout_metrics", "task_counters"]


def make_task(cfg):
    """The toy arithmetic task, the scratchpad-addition task (the testbed's), or a prompt dataset scored by the
    math checker (HF tokenizer from a local dir)."""
    if isinstance(cfg.task, MathTaskConfig):
        from transformers import AutoTokenizer

        return MathTask(cfg.task, AutoTokenizer.from_pretrained(cfg.hf.tokenizer or cfg.hf.load))
    if isinstance(cfg.task, ReasoningTaskConfig):
        return ReasoningTask(cfg.task)
    return ArithmeticTask(cfg.task)


class RewardScorer:
    """`scorer(problems, outputs)`: the reward of each (problem, output ids); counts checker failures."""

    def __init__(self, task, replica: Replica):
        self.task, self.replica = task, replica
        self.failures: collections.Counter = collections.Counter()  # math checker failures, per reason

    def __call__(self, problems, outputs) -> list[float]:
        if not isinstance(self.task, MathTask):
            return [self.task.reward(p, o) for p, o in zip(problems, outputs, strict=True)]
        results = self.replica.from_source(lambda: self.task.score_many(problems, outputs))
        self.failures.update(r.reason for r in results if r.reason in FAILURE_REASONS)
        return [r.reward for r in results]


def rollout_metrics(scored, step: int, *, max_lag: int, rejected: int) -> dict[str, Metric]:
    """Per-sample rollout statistics of one step (rewards, lengths, staleness, rejections)."""
    rewards = torch.tensor([s.reward for s in scored], dtype=torch.float64)
    lengths = torch.tensor([len(s.generation.output_ids) for s in scored], dtype=torch.float64)
    lags = torch.tensor([step - s.generation.weight_version for s in scored], dtype=torch.long)
    return {**response_stats(lengths, rewards, binary=True),
            **staleness_histogram(lags, max_lag=max_lag),
            "rollout/rejected": Metric.sum(torch.tensor(float(rejected)))}


def task_counters(rejections, rewards: RewardScorer, task) -> dict[str, float]:
    """This rank's running totals: rejected samples by reason; for a dataset task, checker outcomes and the
    dataset rows skipped."""
    values = {f"rollout/rejected_total/{reason}": float(n) for reason, n in rejections.counts.items()}
    if isinstance(task, MathTask):
        values.update({f"reward/fail_total/{k}": float(rewards.failures[k]) for k in FAILURE_REASONS})
        values.update({f"data/skipped/{k}": float(v) for k, v in task.skipped.items()})
    return values
