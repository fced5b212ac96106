"""The rollout-engine interface: what the trainer asks of SGLang (over HTTP) or the embedded engine.

A request carries token ids in; a generation carries sampled token ids, their log-probs under the engine's
sampling distribution (temperature applied), the weight version that produced them and, when asked,
the routed experts (R3). Engines raise `EngineError` with a clear message for anything the trainer cannot
use (a server without a needed feature, a timeout after all retries, a malformed answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vespo_megatron.routing import RoutingRecord

__all__ = ["EngineError", "GenerationRequest", "Generation", "RolloutEngine"]


class EngineError(RuntimeError):
    """The rollout engine could not serve a request (after retries) or lacks a needed feature."""


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
class RolloutEngine(Protocol):
    @property
    def weight_version(self) -> int: ...

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        """One generation per request, in request order."""
        ...

    def update_weights(self, source, version: int) -> None:
        """Load new policy weights (engine-specific `source`) and tag later generations with `version`."""
        ...
