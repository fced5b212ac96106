"""The rollout-engine protocol: all the trainer asks of SGLang (over HTTP) or the embedded engine.

A request carries token ids in; a generation carries sampled token ids, their log-probs under the engine's
sampling distribution (temperature applied), the weight version that produced them and, when asked, the
routed experts (R3). A sample the engine could not serve comes back as a `SampleError` in its place (the
trainer drops and counts it); anything that stops the whole batch raises `EngineError`.

The trainer never asks which engine it holds: it calls `generate`, `sync_weights` after every step with a
`PolicyWeights` view of its model (each engine reads what it needs: the live model, HF tensors, or an HF
checkpoint on disk), and `state` / `load_state` with its checkpoints. `vespo_megatron.rollout.factory`
builds the engine named in the config.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from vespo_megatron.routing import RoutingRecord

__all__ = ["EngineError", "SampleError", "GenerationRequest", "Generation", "PolicyWeights", "RolloutEngine"]


class EngineError(RuntimeError):
    """The rollout engine could not serve a request (after retries) or lacks a needed feature."""


class SampleError(EngineError):
    """One sample's answer cannot be used (malformed, NaN log-prob, aborted); the batch is otherwise fine."""

    def __init__(self, sample_id: str, message: str):
        super().__init__(f"sample {sample_id!r}: {message}")
        self.sample_id = sample_id
        self.reason = message

    def __reduce__(self):  # travels between ranks (pickled by broadcast_object_list)
        return (SampleError, (self.sample_id, self.reason))


@dataclass(frozen=True)
class GenerationRequest:
    sample_id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 1.0
    return_routing: bool = False
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Generation:
    """output_logprobs[j] = log p_engine(output_ids[j] | prefix) at the request's temperature."""

    sample_id: str
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    output_logprobs: tuple[float, ...]
    weight_version: int
    finish_reason: str  # "stop" | "length"
    routing: RoutingRecord | None = None


@runtime_checkable
class PolicyWeights(Protocol):
    """The trainer's current policy as engines read it. The two export methods are collective: every rank
    of the trainer calls them together (each holds a shard)."""

    @property
    def model(self) -> torch.nn.Module:
        """The (DDP-wrapped) training model itself, for an engine in the same processes."""
        ...

    def hf_tensors(self, dst: int = 0) -> Iterable[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) pairs, complete on rank `dst` (other ranks iterate to drive the gathers)."""
        ...

    def write_hf(self, path: str) -> str:
        """Write the policy as a Hugging Face checkpoint directory at `path`; returns `path`."""
        ...


@runtime_checkable
class RolloutEngine(Protocol):
    @property
    def weight_version(self) -> int:
        """The version of the weights the next generation uses."""
        ...

    def generate(self, requests: list[GenerationRequest], *, seed: int) -> list[Generation | SampleError]:
        """One result per request, in request order. Called on every rank of the trainer with the same
        requests for one data-parallel replica; `seed` fixes the sampling where the engine honours it."""
        ...

    def sync_weights(self, weights: PolicyWeights, version: int) -> None:
        """Serve `weights` from now on and tag later generations with `version` (collective)."""
        ...

    def state(self) -> dict[str, Any]:
        """What a checkpoint must keep to resume the engine exactly."""
        ...

    def load_state(self, state: dict[str, Any], weights: PolicyWeights) -> None:
        """Resume from `state()`; `weights` are the restored policy (collective)."""
        ...
