"""`masked_metrics`: several metrics over one selection in a fixed number of ops, the same values as
`Metric.mean` / `max` / `min` one at a time (the reference), empty selections and empty tensors as those rules
say, and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vespo_megatron.base.metric import EMPTY_EXTREME, Metric, Reduce, finalize_metrics, masked_metrics

ONE_AT_A_TIME = {Reduce.MEAN: Metric.mean, Reduce.MAX: Metric.max, Reduce.MIN: Metric.min}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _requests(n: int, seed: int, k: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)  # fp32
    y = torch.randn(n, generator=g, dtype=torch.float64) * 1e3
    flag = torch.rand(n, generator=g) > 0.5  # bool
    reqs = [("x_mean", x, Reduce.MEAN), ("x_max", x, Reduce.MAX), ("x_min", x, Reduce.MIN),
            ("y_mean", y, Reduce.MEAN), ("y_min", y, Reduce.MIN), ("flag_frac", flag, Reduce.MEAN)]
    for i in range(k):
        reqs.append((f"extra{i}", torch.randn(n, generator=g).abs(), Reduce.MAX))
    return reqs


def _assert_same(got: dict, reqs, where):
    assert list(got) == [name for name, _, _ in reqs]
    for name, values, reduce in reqs:
        ref = ONE_AT_A_TIME[reduce](values, where)
        m = got[name]
        assert m.reduce is reduce and m.value.dtype == torch.float64 and m.value.shape == ()
        if reduce is Reduce.MEAN:
            assert torch.equal(m.count, ref.count)
            torch.testing.assert_close(m.value, ref.value, rtol=1e-15, atol=1e-12)  # a sum's last bit may differ
        else:
            assert m.count is None and torch.equal(m.value, ref.value)  # max / min: exact


@pytest.mark.parametrize("kind", ["mask", "none", "all_false", "float_mask", "own"])
def test_equals_one_metric_at_a_time(kind):
    n = 37
    reqs = _requests(n, seed=1)
    g = torch.Generator().manual_seed(2)
    where = {"mask": torch.rand(n, generator=g) > 0.3, "none": None, "all_false": torch.zeros(n, dtype=torch.bool),
             "float_mask": (torch.rand(n, generator=g) > 0.3).float(), "own": None}[kind]
    if kind == "own":  # a selection per request (fourth item), None among them: rows with their own masks
        masks = [torch.rand(n, generator=g) > 0.5 for _ in range(3)] + [None]
        reqs = [(*r, masks[i % 4]) for i, r in enumerate(reqs)]
        got = masked_metrics(torch.zeros(n, dtype=torch.bool), reqs)  # every request overrides it
        for name, values, reduce, sel in reqs:
            _assert_same({name: got[name]}, [(name, values, reduce)], sel)
        return
    got = masked_metrics(where, reqs)
    _assert_same(got, reqs, where)
    if kind == "all_false":  # nothing selected: the extremes read as NaN, the means as NaN (0 / 0)
        out = finalize_metrics(got)
        assert all(v != v for v in out.values())
        assert float(got["x_max"].value) == -EMPTY_EXTREME and float(got["y_min"].value) == EMPTY_EXTREME


def test_nan_propagates_as_one_at_a_time():
    x = torch.tensor([1.0, float("nan"), 3.0])
    got = masked_metrics(torch.tensor([True, True, False]), [("m", x, Reduce.MAX), ("s", x, Reduce.MEAN)])
    assert got["m"].value.isnan() and got["s"].value.isnan()
    got = masked_metrics(torch.tensor([True, False, True]), [("m", x, Reduce.MAX), ("s", x, Reduce.MEAN)])
    assert float(got["m"].value) == 3.0 and float(got["s"].value) == 4.0


def test_empty_tensors_follow_the_single_rules():
    empty = torch.zeros(0)
    reqs = [("a", empty, Reduce.MEAN), ("b", empty, Reduce.MAX), ("c", empty, Reduce.MIN)]
    _assert_same(masked_metrics(torch.zeros(0, dtype=torch.bool), reqs), reqs, torch.zeros(0, dtype=torch.bool))
    assert masked_metrics(None, []) == {}


def test_op_count_does_not_grow_with_the_number_of_metrics():
    counts = {}
    for k in (2, 30):
        reqs = _requests(64, seed=3, k=k)
        where = torch.rand(64, generator=torch.Generator().manual_seed(4)) > 0.5
        with _Ops() as ops:
            masked_metrics(where, reqs)
        counts[k] = ops.count
        with _Ops() as single:
            for _, values, reduce in reqs:
                ONE_AT_A_TIME[reduce](values, where)
        counts[f"single{k}"] = single.count
    # only the stack's per-tensor views grow with k (detach, reshape, unsqueeze: no kernel); one at a time,
    # every metric costs ~5 ops, 3 of them kernels
    assert counts[30] - counts[2] <= 3 * 28
    assert counts["single30"] - counts["single2"] >= 5 * 28
    assert counts[30] < counts["single30"] / 2


def test_errors_name_the_metric():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match=r"'bad': expected a reduction in \['mean', 'max', 'min'\], got 'sum'"):
        masked_metrics(None, [("bad", x, Reduce.SUM)])
    with pytest.raises(ValueError, match=r"'y': expected 4 values .* got 3 values"):
        masked_metrics(None, [("x", x, Reduce.MEAN), ("y", torch.zeros(3), Reduce.MAX)])
    with pytest.raises(ValueError, match=r"'x': expected 4 values .* a selection of 5"):
        masked_metrics(torch.ones(5, dtype=torch.bool), [("x", x, Reduce.MEAN)])
