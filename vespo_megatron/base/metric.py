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

__all__ = ["Reduce", "Metric", "EMPTY_EXTREME", "masked_metrics", "merge_metrics", "finalize_metrics"]


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


_GROUP_REDUCES = (Reduce.MEAN, Reduce.MAX, Reduce.MIN)


def masked_metrics(where: Tensor | None, requests: Iterable[tuple]) -> dict[str, Metric]:
    """{name: Metric} for several requests (name, values, MEAN / MAX / MIN[, where]) of as many values each,
    over the selection `where` (all positions when None; a request's own fourth item overrides it), in a fixed
    handful of ops whatever their number: the distinct (values, selection) pairs are stacked [k, n] once, and
    each reduction asked for runs once over all rows. The loss path logs a dozen or more metrics per call, and
    the single-pass head calls the loss per chunk; one at a time they cost ~5 ops each (3 kernel launches),
    about half of a loss call's ops. Same values as `Metric.mean` / `max` / `min` one at a time (a row's sum may
    round in its last bit where a 1-D sum would not)."""
    reqs = [(r[0], r[1], r[2], r[3] if len(r) > 3 else where) for r in requests]
    if not reqs:
        return {}
    n = reqs[0][1].numel()
    for name, values, reduce, sel in reqs:
        if reduce not in _GROUP_REDUCES:
            raise ValueError(f"masked_metrics: {name!r}: expected a reduction in {[r.value for r in _GROUP_REDUCES]}, "
                             f"got {reduce.value!r}")
        if values.numel() != n or (sel is not None and sel.numel() != n):
            raise ValueError(f"masked_metrics: {name!r}: expected {n} values (and a selection of as many), got "
                             f"{values.numel()} values, a selection of {None if sel is None else sel.numel()}")
    if n == 0:  # empty: the one-at-a-time rules (an empty max reads as NaN)
        single = {Reduce.MEAN: Metric.mean, Reduce.MAX: Metric.max, Reduce.MIN: Metric.min}
        return {name: single[reduce](values, sel) for name, values, reduce, sel in reqs}
    rows: dict[tuple[int, int], int] = {}  # (id(values), id(selection)) -> row: stacked once, reduced as asked
    pairs = []
    for _, values, _, sel in reqs:
        key = (id(values), id(sel))
        if key not in rows:
            rows[key] = len(pairs)
            pairs.append((values, sel))
    with torch.no_grad():  # (no detach op per tensor: each op is host time in a launch-bound loss call)
        stacked = torch.stack([v if v.dim() == 1 else v.reshape(-1) for v, _ in pairs]).double()  # [k, n]
    selections = {id(sel): sel for _, sel in pairs}
    if len(selections) == 1:  # the common case: one selection for all, broadcast over the rows
        (sel,) = selections.values()
        w = None if sel is None else sel.reshape(1, -1).bool()  # [1, n]
        count = (stacked.new_full((), n) if w is None else w.sum().double()).expand(len(pairs))
    else:
        flat = {key: torch.ones(n, dtype=torch.bool, device=stacked.device) if sel is None else sel.reshape(-1).bool()
                for key, sel in selections.items()}
        w = torch.stack([flat[id(sel)] for _, sel in pairs])  # [k, n]
        count = w.sum(dim=1).double()
    kinds = {reduce for _, _, reduce, _ in reqs}
    out: dict[Reduce, tuple[Tensor, ...]] = {}
    if Reduce.MEAN in kinds:
        out[Reduce.MEAN] = (stacked if w is None else torch.where(w, stacked, 0.0)).sum(dim=1).unbind()
        counts = count.unbind()
    if Reduce.MAX in kinds:
        out[Reduce.MAX] = (stacked if w is None else torch.where(w, stacked, -EMPTY_EXTREME)).amax(dim=1).unbind()
    if Reduce.MIN in kinds:
        out[Reduce.MIN] = (stacked if w is None else torch.where(w, stacked, EMPTY_EXTREME)).amin(dim=1).unbind()
    result = {}
    for name, values, reduce, sel in reqs:
        row = rows[(id(values), id(sel))]
        result[name] = Metric(out[reduce][row], reduce, counts[row] if reduce is Reduce.MEAN else None)
    return result


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
