"""Held-out evaluation: pass@1 / mean@k / pass@k on the task's eval prompts, k samples each (collective)."""

from __future__ import annotations

import torch

from vespo_megatron.base.metric import Metric, finalize_metrics
from vespo_megatron.parallel.reduce_metrics import all_reduce_metrics
from vespo_megatron.rollout.engine import Generation

from .samples import EVAL_STREAM, sampling_seed

__all__ = ["evaluate"]


def evaluate(trainer, step: int, *, k: int | None = None) -> dict[str, float]:
    """k samples per prompt (None: EvalConfig.k). The prompts are split evenly over DP ranks (a remainder is
    left out: eval/num_problems says how many were used); an engine error counts as a wrong sample and in
    eval/errors."""
    ec, g, task = trainer.cfg.eval, trainer.groups, trainer.task
    k = ec.k if k is None else k
    problems = task.eval_problems()[: ec.max_problems]
    per_rank = len(problems) // g.dp_size
    if per_rank == 0:
        raise ValueError(f"EvalConfig: {len(problems)} held-out prompts cannot be split over {g.dp_size} "
                         "data-parallel ranks; hold out more (eval_count)")
    mine = problems[g.dp_rank * per_rank:(g.dp_rank + 1) * per_rank]
    requests = trainer.requests(f"eval{step}", mine, k, ec.temperature)
    gens = trainer.engine.generate(requests, seed=sampling_seed(trainer.cfg.run.seed, EVAL_STREAM, step, g.dp_rank))
    ok = [i for i, gen in enumerate(gens) if isinstance(gen, Generation)]
    scored = trainer.rewards([mine[i // k] for i in ok], [gens[i].output_ids for i in ok])
    rewards = torch.zeros(len(gens), dtype=torch.float64)
    rewards[ok] = torch.tensor(scored, dtype=torch.float64)
    rewards = rewards.view(len(mine), k)
    correct = (rewards >= 0.5).double()
    errors = len(gens) - len(ok)
    lengths = torch.tensor([float(len(gen.output_ids)) if isinstance(gen, Generation) else 0.0 for gen in gens],
                           dtype=torch.float64)
    metrics = {
        "eval/pass@1": Metric.mean(correct.mean(dim=1)),  # unbiased from k samples: c / k per prompt
        f"eval/mean@{k}": Metric.mean(rewards.reshape(-1)),
        f"eval/pass@{k}": Metric.mean(correct.amax(dim=1)),
        "eval/response_length": Metric.mean(lengths),
        "eval/errors": Metric.sum(torch.tensor(float(errors))),
        "eval/num_problems": Metric.sum(torch.tensor(float(len(mine)))),
        "eval/k": Metric.max(torch.tensor(float(k))),  # alike on every rank
    }
    return finalize_metrics(all_reduce_metrics(metrics, g.dp))
