"""Merging metrics across micro-batches (local) and turning reduced metrics into numbers.

The cross-rank reduction of the same metrics lives in `vespo_megatron.parallel.metrics`; it uses the same
`Reduce` semantics: SUM adds, MAX/MIN take the extreme, MEAN adds sums and counts and divides last.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .types import EMPTY_EXTREME, Metric, Reduce

__all__ = ["merge_metrics", "finalize_metrics"]


def _merge_two(a: Metric, b: Metric, name: str) -> Metric:
    if a.reduce is not b.reduce:
        raise ValueError(f"metric {name!r}: reductions differ between parts ({a.reduce.value} vs {b.reduce.value})")
    if a.reduce is Reduce.SUM:
        return Metric(a.value + b.value, Reduce.SUM)
    if a.reduce is Reduce.MAX:
        return Metric(torch.maximum(a.value, b.value), Reduce.MAX)
    if a.reduce is Reduce.MIN:
        return Metric(torch.minimum(a.value, b.value), Reduce.MIN)
    assert a.count is not None and b.count is not None
    return Metric(a.value + b.value, Reduce.MEAN, a.count + b.count)


def merge_metrics(parts: Iterable[dict[str, Metric]]) -> dict[str, Metric]:
    """Merge per-micro-batch metric dicts (a key missing from a part is simply absent there)."""
    merged: dict[str, Metric] = {}
    for part in parts:
        for name, metric in part.items():
            merged[name] = metric if name not in merged else _merge_two(merged[name], metric, name)
    return merged


def finalize_metrics(metrics: dict[str, Metric]) -> dict[str, float]:
    """Numbers to log. MAX/MIN over nothing read as NaN; `rollout_corr/is_weight_ess` (E[w]^2 / E[w^2],
    in (0, 1]) is derived from the two reduced IS-weight means."""
    out: dict[str, float] = {}
    for name, metric in sorted(metrics.items()):
        value = metric.result()
        if metric.reduce in (Reduce.MAX, Reduce.MIN) and abs(value) >= EMPTY_EXTREME:
            value = float("nan")
        out[name] = value
    if "rollout_corr/is_weight_mean" in out and "rollout_corr/is_weight_sq_mean" in out:
        m1, m2 = out["rollout_corr/is_weight_mean"], out["rollout_corr/is_weight_sq_mean"]
        out["rollout_corr/is_weight_ess"] = m1 * m1 / m2 if m2 > 0 else float("nan")
    return out
