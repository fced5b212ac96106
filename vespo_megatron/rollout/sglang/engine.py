"""SGLang as a rollout engine: the HTTP client plus the weight-sync strategy chosen once.

Only the sending rank (the trainer's rank 0, which also runs the server's process-group side of a streamed
sync) holds a client that updates weights; every rank takes part in exporting the weights (a collective).
Generation runs on the first rank of each data-parallel replica (`vespo_megatron.rollout.replica`).

A server that goes away between steps (a crash, a restart) is waited for, up to ``wait_for_server_s``:
before each generation (`prepare_generate`, collective: `ReplicaEngine` calls it on every rank) and before
each weight sync. A server that comes back has lost the trainer's weights (or answers with another weight
tag than the one it took from us): the engine then pushes the policy view it last synced, under the same
version, before anything is generated. The trainer does nothing engine-specific for this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.distributed as dist

from vespo_megatron.base.validation import ConfigError, check_float, check_int
from vespo_megatron.rollout.engine import (
    EngineError,
    Generation,
    GenerationRequest,
    PolicyWeights,
    SampleError,
)

from .client import SGLangClient
from .weight_sync import WeightSyncConfig

__all__ = ["SGLangEngineConfig", "SGLangEngine"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SGLangEngineConfig:
    """url: the server (``http://host:port``). timeout_s bounds one ``/generate`` attempt; a failed attempt
    is retried max_retries times with capped exponential backoff (backoff_s .. max_backoff_s).
    max_concurrency requests are in flight at once. weight_sync: how new weights reach the server.
    wait_for_server_s: before a step's generation and before a weight sync, an unreachable server is waited
    for this long (polling /health) before the run fails; 0 fails at once."""

    url: str | None = None
    timeout_s: float = 600.0
    max_retries: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    max_concurrency: int = 32
    update_timeout_s: float = 1800.0
    wait_for_server_s: float = 600.0
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)

    def __post_init__(self) -> None:
        c = "SGLangEngineConfig"
        if self.url is not None and not (isinstance(self.url, str) and self.url.startswith(("http://", "https://"))):
            raise ConfigError(c, "url", "'http://host:port' or 'https://...'", self.url)
        for name in ("timeout_s", "update_timeout_s", "max_backoff_s"):
            check_float(c, name, getattr(self, name), positive=True)
        check_float(c, "backoff_s", self.backoff_s, nonnegative=True)
        check_float(c, "wait_for_server_s", self.wait_for_server_s, nonnegative=True)
        check_int(c, "max_retries", self.max_retries, low=0)
        check_int(c, "max_concurrency", self.max_concurrency, low=1)


class SGLangEngine:
    """A `RolloutEngine` over one SGLang server. `client` is this rank's client (None on ranks that neither
    generate nor send weights); `sender` says whether this rank pushes the weights. `wait_for_server_s`: how
    long an unreachable server is waited for between steps."""

    def __init__(self, client: SGLangClient | None, weight_sync, *, sender: bool, wait_for_server_s: float = 600.0):
        self.client = client
        self._sync = weight_sync
        self._sender = sender
        self._wait_s = wait_for_server_s
        self._version = client.weight_version if client is not None else 0
        self._weights: PolicyWeights | None = None  # the view last synced: re-sent to a restarted server
        self._prepared = False

    @property
    def weight_version(self) -> int:
        return self._version

    def prepare_generate(self) -> None:
        """Before a generation (collective: every rank calls it together). The sender waits for an unreachable
        server (up to `wait_for_server_s`, else `EngineError`) and checks that it still serves our weights;
        when it came back from a restart, every rank re-syncs the last synced policy under the same version."""
        resync = False
        if self._sender and self.client is not None and self._weights is not None:
            away = self.client.wait_for_server(self._wait_s)
            resync = away is not None or self.client.lost_weights()
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [resync]
            dist.broadcast_object_list(box, src=0)
            resync = box[0]
        if resync:
            if self._sender:
                logger.warning("re-syncing the policy (weight version %d) to the restarted SGLang server at %s",
                               self._version, self.client.config.base_url)
            self.sync_weights(self._weights, self._version)
        self._prepared = True

    def generate(self, requests: list[GenerationRequest], *, seed: int) -> list[Generation | SampleError]:
        # SGLang samples with its own seeds; `seed` is not sent (answers would then depend on its batching).
        if not self._prepared and not (dist.is_initialized() and dist.get_world_size() > 1):
            self.prepare_generate()  # used directly, outside a ReplicaEngine (one process)
        self._prepared = False
        try:
            return self.client.generate_results(requests)
        except SampleError:
            raise
        except EngineError as e:
            # The server died during this batch. In a one-process run the engine can wait for it, re-sync and
            # retry the batch once; with several ranks the re-sync is collective, so the error stands.
            if (dist.is_initialized() and dist.get_world_size() > 1) or getattr(e, "status", 500) < 500 \
                    or self.client.reachable() is None:
                raise
            self.prepare_generate()
            self._prepared = False
            return self.client.generate_results(requests)

    def sync_weights(self, weights: PolicyWeights, version: int) -> None:
        self._weights = weights
        if self._sender and self.client is not None:
            self.client.wait_for_server(self._wait_s)
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
