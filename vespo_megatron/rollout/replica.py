"""An engine that runs on one rank of each data-parallel replica, its results handed to every rank of it.

The ranks of one replica (its TP / CP / PP / EP ranks) train on the same samples. An engine that is not
itself collective (an HTTP client) runs on the replica's first rank only; the others receive its results,
so that every rank of the replica sees the same generations and the same rewards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

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
    """`inner` generates on the replica's first rank; the generations reach every rank of the replica."""

    def __init__(self, inner: RolloutEngine, replica: Replica):
        self.inner, self.replica = inner, replica

    @property
    def weight_version(self) -> int:
        return self.inner.weight_version

    def generate(self, requests: list[GenerationRequest], *, seed: int) -> list[Generation | SampleError]:
        return self.replica.from_source(lambda: self.inner.generate(requests, seed=seed))

    def sync_weights(self, weights: PolicyWeights, version: int) -> None:
        self.inner.sync_weights(weights, version)

    def state(self) -> dict:
        return self.inner.state()

    def load_state(self, state: dict, weights: PolicyWeights) -> None:
        self.inner.load_state(state, weights)

    def close(self) -> None:
        getattr(self.inner, "close", lambda: None)()
