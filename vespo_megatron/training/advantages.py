"""Advantage estimators from the rewards of each prompt's group of samples, in a registry like the losses'.

Each is `fn(rewards, groups, eps) -> advantages`, one per sample, computed over the samples of a group
that survived validation (a rejected sample leaves its group smaller, never biased by a placeholder):

- grpo: (r - mean) / (std + eps), population std (GRPO; the default).
- dr_grpo: r - mean (Dr. GRPO: no std division, which over-weights easy and hard prompts).
- rloo: r - mean of the *other* samples of the group (REINFORCE leave-one-out); 0 for a lone sample.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence

from vespo_megatron.base.imports import load_object

__all__ = ["ADVANTAGE_ESTIMATORS", "grpo_advantages", "dr_grpo_advantages", "rloo_advantages",
           "resolve_advantage"]

Estimator = Callable[[Sequence[float], Sequence[int], float], list[float]]


def _by_group(rewards: Sequence[float], groups: Sequence[int]) -> dict[int, list[float]]:
    out: dict[int, list[float]] = collections.defaultdict(list)
    for r, g in zip(rewards, groups, strict=True):
        out[g].append(r)
    return out


def grpo_advantages(rewards: Sequence[float], groups: Sequence[int], eps: float = 1e-6) -> list[float]:
    stats = {}
    for g, rs in _by_group(rewards, groups).items():
        mean = sum(rs) / len(rs)
        stats[g] = (mean, math.sqrt(sum((r - mean) ** 2 for r in rs) / len(rs)))
    return [(r - stats[g][0]) / (stats[g][1] + eps) for r, g in zip(rewards, groups, strict=True)]


def dr_grpo_advantages(rewards: Sequence[float], groups: Sequence[int], eps: float = 1e-6) -> list[float]:
    means = {g: sum(rs) / len(rs) for g, rs in _by_group(rewards, groups).items()}
    return [r - means[g] for r, g in zip(rewards, groups, strict=True)]


def rloo_advantages(rewards: Sequence[float], groups: Sequence[int], eps: float = 1e-6) -> list[float]:
    by = _by_group(rewards, groups)
    sums, counts = {g: sum(rs) for g, rs in by.items()}, {g: len(rs) for g, rs in by.items()}
    return [r - (sums[g] - r) / (counts[g] - 1) if counts[g] > 1 else 0.0
            for r, g in zip(rewards, groups, strict=True)]


ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
}


def resolve_advantage(name: str) -> Estimator:
    """A registered estimator, or one by import path 'module:function' with the same signature."""
    if name in ADVANTAGE_ESTIMATORS:
        return ADVANTAGE_ESTIMATORS[name]
    return load_object(name, what="AlgorithmConfig.advantage", known=sorted(ADVANTAGE_ESTIMATORS))
