"""Metrics that know how they reduce: the ground floor every other layer logs through.

A `Metric` is a detached scalar plus its reduction (SUM, MAX, MIN, MEAN by count). Parts of one metric, from
micro-batches or ranks, merge by that rule (`merge_metrics` here; across ranks in
`vespo_megatron.parallel.reduce_metrics`), and `finalize_metrics` turns the merged parts into numbers.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Reduce", "Metric", "EMPTY_EXTREME", "merge_metrics", "finalize_metrics"]


class Reduce(enum.Enum):
    """How a metric reduces across micro-batches and ranks."""

    SUM = "sum"
    MAX = "max"
    MIN = "min"
    MEAN = "mean"  # mean by count: `value` holds the local sum, `count` the local count


# The identity of MAX / MIN over an empty selection; finalize_metrics reads it back as NaN.
EMPTY_EXTREME = torch.finfo(torch.float64).max


def _extreme(values: Tensor, where: Tensor | None, *, largest: bool) -> Tensor:
    # (few ops: the loss path computes a dozen metrics per micro-batch, and each op is a kernel launch on CUDA)
    fill = -EMPTY_EXTREME if largest else EMPTY_EXTREME
    v = values.detach().double().reshape(-1)
    if v.numel() == 0:
        return v.new_full((), fill)
    if where is not None:
        v = torch.where(where.reshape(-1).bool(), v, fill)
    return v.max() if largest else v.min()


@dataclass(frozen=True)
class Metric:
    """A detached scalar plus how it reduces. For MEAN, `value` is a sum and `count` its count."""

    value: Tensor
    reduce: Reduce
    count: Tensor | None = None

    @staticmethod
    def sum(value: Tensor) -> Metric:
        return Metric(value.detach().double().reshape(()), Reduce.SUM)

    @staticmethod
    def max(values: Tensor, where: Tensor | None = None) -> Metric:
        """Max of `values` over the positions where `where` is true (all when None). Nothing selected gives
        -EMPTY_EXTREME, which `finalize_metrics` reads as NaN."""
        return Metric(_extreme(values, where, largest=True), Reduce.MAX)

    @staticmethod
    def min(values: Tensor, where: Tensor | None = None) -> Metric:
        """Min of `values` over `where` (all when None); nothing selected gives +EMPTY_EXTREME (NaN when read)."""
        return Metric(_extreme(values, where, largest=False), Reduce.MIN)

    @staticmethod
    def mean(values: Tensor, where: Tensor | None = None) -> Metric:
        """Mean of `values` over the positions where `where` is true (all positions when None)."""
        values = values.detach().double()
        if where is None:
            return Metric(values.sum(), Reduce.MEAN, values.new_full((), values.numel()))
        where = where.bool()
        return Metric(torch.where(where, values, 0.0).sum(), Reduce.MEAN, where.sum().double())

    def result(self) -> float:
        """The metric's value once all partial metrics are merged (NaN for an empty mean)."""
        if self.reduce is Reduce.MEAN:
            assert self.count is not None
            return float(self.value / self.count) if float(self.count) > 0 else float("nan")
        return float(self.value)


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
