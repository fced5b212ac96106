"""An engine that runs on one rank of each data-parallel replica, its results handed to every rank of it.

The ranks of one replica (its TP / CP / PP / EP ranks) train on the same samples. An engine that is not
itself collective (an HTTP client) runs on the replica's first rank only; the others receive its results,
so that every rank of the replica sees the same generations and the same rewards.

Routing (R3) is not broadcast whole: given each rank's :class:`~vespo_megatron.routing.shards.RankPlan`
(its stage's MoE layers and its CP share), the first rank cuts every rank's shard of every routing record
and scatters them, one list of generations per rank (`dist.scatter_object_list`): a rank receives only the
routing rows and layers it replays (`vespo_megatron.routing.shards`). The other fields are the same on
every rank. Without plans (or on a one-rank replica) the generations are broadcast whole, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

from vespo_megatron.routing.shards import RankPlan, shard_generations

from .engine import Generation, GenerationRequest, PolicyWeights, RolloutEngine, SampleError

__all__ = ["Replica", "replica_of", "ReplicaEngine"]

T = TypeVar("T")


@dataclass(frozen=True)
class Replica:
    """This rank's data-parallel replica: its process group (None in a one-process run) and first rank."""

    group: Any
    source: int
    rank: int

    @property
    def is_source(self) -> bool:
        return self.rank == self.source

    def from_source(self, compute: Callable[[], T]) -> T:
        """`compute()` run on the replica's first rank, its result on every rank of the replica."""
        if self.group is None or dist.get_world_size(self.group) == 1:
            return compute()
        out = [compute() if self.is_source else None]
        dist.broadcast_object_list(out, src=self.source, group=self.group)
        return out[0]

    def gather_plans(self, plan: RankPlan) -> list[RankPlan] | None:
        """Every rank's plan, in the replica group's rank order (collective over the replica); None in a
        one-process run."""
        if self.group is None or dist.get_world_size(self.group) == 1:
            return None
        plans: list[RankPlan | None] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(plans, plan, group=self.group)
        return plans

    def scatter_from_source(self, compute: Callable[[], T], split: Callable[[T], list[T]]) -> T:
        """`compute()` run on the replica's first rank; `split(result)[i]` (one per rank of the replica group,
        in group rank order) is what the group's i-th rank receives."""
        if self.group is None or dist.get_world_size(self.group) == 1:
            return split(compute())[0]
        parts = split(compute()) if self.is_source else None
        out: list = [None]
        dist.scatter_object_list(out, parts, src=self.source, group=self.group)
        return out[0]


def replica_of(dp_rank: int, dp_size: int) -> Replica:
    """The replica of this rank (collective: every rank calls it once, in the same order)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return Replica(group=None, source=0, rank=0)
    world = dist.get_world_size()
    everyone: list[int | None] = [None] * world
    dist.all_gather_object(everyone, dp_rank)
    groups = [dist.new_group([r for r, d in enumerate(everyone) if d == dp]) for dp in range(dp_size)]
    source = min(r for r, d in enumerate(everyone) if d == dp_rank)
    return Replica(group=groups[dp_rank], source=source, rank=dist.get_rank())


class ReplicaEngine:
    """`inner` generates on the replica's first rank; the generations reach every rank of the replica.

    plan: this rank's routing plan (stage MoE layers, CP share); given on every rank (the constructor then
    gathers them over the replica: collective), each rank receives only its routing shard."""

    def __init__(self, inner: RolloutEngine, replica: Replica, plan: RankPlan | None = None):
        self.inner, self.replica = inner, replica
        self.plans = replica.gather_plans(plan) if plan is not None else None

    @property
    def weight_version(self) -> int:
        return self.inner.weight_version

    def generate(self, requests: list[GenerationRequest], *, seed: int) -> list[Generation | SampleError]:
        prepare = getattr(self.inner, "prepare_generate", None)
        if prepare is not None:  # collective on every rank, e.g. waiting for a restarted server and re-syncing
            prepare()
        compute = lambda: self.inner.generate(requests, seed=seed)  # noqa: E731
        if self.plans is None:
            return self.replica.from_source(compute)
        return self.replica.scatter_from_source(compute, lambda gens: [shard_generations(gens, p) for p in self.plans])

    def sync_weights(self, weights: PolicyWeights, version: int) -> None:
        self.inner.sync_weights(weights, version)

    def state(self) -> dict:
        return self.inner.state()

    def load_state(self, state: dict, weights: PolicyWeights) -> None:
        self.inner.load_state(state, weights)

    def close(self) -> None:
        getattr(self.inner, "close", lambda: None)()
