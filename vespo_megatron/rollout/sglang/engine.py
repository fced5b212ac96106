"""SGLang as a rollout engine: the HTTP client plus the weight-sync strategy chosen once.

Only the sending rank (the trainer's rank 0, which also runs the server's process-group side of a streamed
sync) holds a client that updates weights; every rank takes part in exporting the weights (a collective).
Generation runs on the first rank of each data-parallel replica (`vespo_megatron.rollout.replica`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from vespo_megatron.base.validation import ConfigError, check_float, check_int
from vespo_megatron.rollout.engine import Generation, GenerationRequest, PolicyWeights, SampleError

from .client import SGLangClient
from .weight_sync import WeightSyncConfig

__all__ = ["SGLangEngineConfig", "SGLangEngine"]


@dataclass(frozen=True, kw_only=True)
class SGLangEngineConfig:
    """url: the server (``http://host:port``). timeout_s bounds one ``/generate`` attempt; a failed attempt
    is retried max_retries times with capped exponential backoff (backoff_s .. max_backoff_s).
    max_concurrency requests are in flight at once. weight_sync: how new weights reach the server."""

    url: str | None = None
    timeout_s: float = 600.0
    max_retries: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    max_concurrency: int = 32
    update_timeout_s: float = 1800.0
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)

    def __post_init__(self) -> None:
        c = "SGLangEngineConfig"
        if self.url is not None and not (isinstance(self.url, str) and self.url.startswith(("http://", "https://"))):
            raise ConfigError(c, "url", "'http://host:port' or 'https://...'", self.url)
        for name in ("timeout_s", "update_timeout_s", "max_backoff_s"):
            check_float(c, name, getattr(self, name), positive=True)
        check_float(c, "backoff_s", self.backoff_s, nonnegative=True)
        check_int(c, "max_retries", self.max_retries, low=0)
        check_int(c, "max_concurrency", self.max_concurrency, low=1)


class SGLangEngine:
    """A `RolloutEngine` over one SGLang server. `client` is this rank's client (None on ranks that neither
    generate nor send weights); `sender` says whether this rank pushes the weights."""

    def __init__(self, client: SGLangClient | None, weight_sync, *, sender: bool):
        self.client = client
        self._sync = weight_sync
        self._sender = sender
        self._version = client.weight_version if client is not None else 0

    @property
    def weight_version(self) -> int:
        return self._version

    def generate(self, requests: list[GenerationRequest], *, seed: int) -> list[Generation | SampleError]:
        # SGLang samples with its own seeds; `seed` is not sent (answers would then depend on its batching).
        return self.client.generate_results(requests)

    def sync_weights(self, weights: PolicyWeights, version: int) -> None:
        self._sync.sync(weights, version)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # the server holds the new weights before any replica generates again
        self._version = version
        if self.client is not None and not self._sender:
            self.client.note_weight_version(version)  # the sender tagged the server

    def state(self) -> dict:
        return {"version": self._version}

    def load_state(self, state: dict, weights: PolicyWeights) -> None:
        self.sync_weights(weights, state["version"])  # the server may hold anything by now

    def close(self) -> None:
        self._sync.close()
