"""Reduce loss metrics across ranks, each by its own rule (see `vespo_megatron.losses.Reduce`).

One collective per reduction kind: SUM and MEAN (sums and counts) travel in one float64 SUM all-reduce,
MAX and MIN in one MAX all-reduce (MIN as the max of negatives). Every rank of `group` must hold the same
metric names (the losses always emit the same set for a given config).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vespo_megatron.base.metric import Metric, Reduce
from vespo_megatron.parallel.sequence import comm_device

__all__ = ["all_reduce_metrics"]


def all_reduce_metrics(metrics: dict[str, Metric], group=None) -> dict[str, Metric]:
    """The metrics of all ranks in `group` merged; None or a group of size 1 returns them unchanged."""
    if group is None or dist.get_world_size(group) == 1:
        return dict(metrics)
    names = sorted(metrics)
    sums, extremes = [], []
    for name in names:
        m = metrics[name]
        if m.reduce is Reduce.SUM:
            sums.append(m.value)
        elif m.reduce is Reduce.MEAN:
            sums.extend([m.value, m.count])
        elif m.reduce is Reduce.MAX:
            extremes.append(m.value)
        else:
            extremes.append(-m.value)
    device = comm_device(group)  # metrics may come from several devices (loss on GPU, rollout stats on CPU)
    sum_buf = torch.stack([v.to(device) for v in sums]).double() if sums else torch.zeros(0, dtype=torch.float64, device=device)
    ext_buf = (torch.stack([v.to(device) for v in extremes]).double() if extremes
               else torch.zeros(0, dtype=torch.float64, device=device))
    dist.all_reduce(sum_buf, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(ext_buf, op=dist.ReduceOp.MAX, group=group)
    out: dict[str, Metric] = {}
    i = j = 0
    for name in names:
        m = metrics[name]
        if m.reduce is Reduce.SUM:
            out[name] = Metric(sum_buf[i], Reduce.SUM)
            i += 1
        elif m.reduce is Reduce.MEAN:
            out[name] = Metric(sum_buf[i], Reduce.MEAN, sum_buf[i + 1])
            i += 2
        elif m.reduce is Reduce.MAX:
            out[name] = Metric(ext_buf[j], Reduce.MAX)
            j += 1
        else:
            out[name] = Metric(-ext_buf[j], Reduce.MIN)
            j += 1
    return out
