"""The production rollout engine: an SGLang server driven over its native HTTP API (stdlib ``urllib`` only).

Endpoints used (SGLang's ``http_server.py``; request fields from ``io_struct.py``):

- ``POST /generate`` with ``GenerateReqInput`` fields ``rid``, ``input_ids`` (tokens in, no tokenizer
  round trip), ``sampling_params`` (``temperature``, ``max_new_tokens``, ``stop_token_ids`` and
  ``SGLangClientConfig.extra_sampling_params``), ``return_logprob: true`` with ``logprob_start_len: -1``
  (SGLang's "output tokens only") and, for requests that ask for routing, ``return_routed_experts: true``.
  The answer is ``{"text", "output_ids", "meta_info"}``; ``meta_info`` carries ``id``, ``finish_reason``
  (``{"type": "stop" | "length" | "abort", ...}``), ``prompt_tokens``, ``completion_tokens``,
  ``output_token_logprobs`` (one ``[logprob, token_id, text-or-null]`` triple per output token),
  ``weight_version`` (SGLang >= 0.5) and ``routed_experts`` (base64 int32 ``[P + O - 1, L, K]``).
- ``GET /server_info`` (``/get_server_info`` on servers that predate the rename): the server arguments,
  read by :meth:`SGLangClient.check_server` for ``enable_return_routed_experts``.
- ``POST /update_weight_version`` ``{"new_version", "abort_all_requests"}``: tag the served weights.
- ``POST /update_weights_from_disk`` ``{"model_path", "load_format", "weight_version", "flush_cache",
  "abort_all_requests"}``; the server flushes its prefix cache itself (``flush_cache``). When it refuses the
  flush (requests still running or queued) it answers 400 *after* loading the new weights, with its tag
  unchanged: the client then tags the server itself (``/update_weight_version``) and raises
  :class:`CacheFlushRefused`. ``POST /flush_cache`` (:meth:`SGLangClient.flush_cache`) retries a flush.
- ``POST /pause_generation`` ``{"mode"}`` / ``POST /continue_generation`` (async RL), ``POST /abort_request``
  ``{"rid"}`` (best effort, after a timed-out attempt).
- Streamed weight updates (driven by :mod:`vespo_megatron.rollout.sglang.weight_sync`, each sent once, never
  retried): ``POST /init_weights_update_group``, ``POST /begin_weight_update`` ``{}`` (SGLang >= 0.5.21;
  404 on older servers), ``POST /update_weights_from_distributed`` (one per bucket), ``POST
  /end_weight_update`` ``{}``, ``POST /destroy_weights_update_group``, and ``GET /get_weight_version``
  (SGLang <= 0.5.20; newer ones answer 404) or the ``weight_version`` of ``/model_info`` /
  ``/get_model_info`` to read the tag back.

Batching: one ``/generate`` call per request, ``max_concurrency`` of them in flight from a thread pool.
SGLang's scheduler batches concurrent requests continuously, so nothing is lost against one batched
call, and every sample gets its own retries, its own timeout and its own validation.

Failures. Transport failures (connection refused or reset, a timeout, HTTP 5xx) are retried
``max_retries`` times with capped exponential backoff and jitter; an HTTP 4xx is not retried and raises
:class:`EngineError` with the server's message. A well-formed answer that the trainer cannot use (missing
fields, a log-prob count that differs from the completion-token count, token ids that disagree between
``output_ids`` and the log-prob triples, a NaN / null / positive log-prob, an aborted request, a bad
routing payload, a weight-version tag other than the expected one) is the sample's fault, not the
engine's: it becomes a :class:`SampleError` (an :class:`EngineError`) carrying ``sample_id``.
:meth:`SGLangClient.generate_results` returns a ``Generation`` or a ``SampleError`` per request so the
trainer can drop and count bad samples; :meth:`SGLangClient.generate` (the :class:`RolloutEngine`
method) raises the first ``SampleError`` instead. Engine-wide failures always raise.

Weight versions: the engine keeps its version client-side (``weight_version``) and tags the server with
the same number as a string (SGLang's tag is a free string, ``"default"`` unless set). Once the server has
accepted a tag from this engine (``check_server`` or ``update_weights``), every answer's
``meta_info["weight_version"]`` must equal it; before that, and on servers without the field, the tag is
not checked. ``update_weights`` and ``generate`` hold one lock, so a weight update never lands in the
middle of a ``generate`` call made through this engine.
"""

from __future__ import annotations

import json
import logging
import math
import random
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.client import HTTPException
from os import PathLike
from types import MappingProxyType
from typing import Any

from vespo_megatron.base.validation import check_number
from vespo_megatron.rollout.engine import EngineError, Generation, GenerationRequest, SampleError
from vespo_megatron.routing import RoutingSpec

from .routed_experts import RoutingPayloadError, routing_from_meta_info

__all__ = ["CacheFlushRefused", "SGLangClient", "SGLangClientConfig", "SampleError", "HTTPStatusError"]

logger = logging.getLogger(__name__)

# Sampling-parameter keys the engine sets from each request; extra_sampling_params may not override them.
_OWN_SAMPLING_KEYS = frozenset({"temperature", "max_new_tokens", "stop_token_ids"})
# A sampled token's log-prob is <= 0; allow float32 rounding above it.
_LOGPROB_TOLERANCE = 1e-4
_FINISH_TYPES = ("stop", "length")
# Part of SGLang's message when a weight update loaded the weights but its cache flush was refused
# (python/sglang/srt/managers/scheduler_components/weight_updater.py, flush_cache_after_weight_update).
_FLUSH_REFUSED_MARK = "cache was not flushed"


class HTTPStatusError(EngineError):
    """The server answered with an HTTP error status (4xx, or 5xx after all retries)."""

    def __init__(self, message: str, status: int, server_message: str):
        super().__init__(message)
        self.status = status
        self.server_message = server_message


class CacheFlushRefused(EngineError):
    """The server loaded the new weights but refused to flush its prefix cache (requests still running or
    queued): the weights and the engine's version are the new ones, but cached prefixes computed with the old
    weights may still be reused. Call :meth:`SGLangClient.flush_cache` once the server is idle."""


class _Retryable(Exception):
    """A transport failure worth another attempt (connection error, timeout, 5xx)."""

    def __init__(self, message: str, *, status: int | None = None, server_message: str = "", timeout=False):
        super().__init__(message)
        self.status = status
        self.server_message = server_message
        self.timeout = timeout


@dataclass(frozen=True, kw_only=True)
class SGLangClientConfig:
    """Where the SGLang server is and how hard to try.

    ``timeout_s`` bounds one HTTP attempt of ``/generate`` (connect and read); ``update_timeout_s`` one
    attempt of a weight update. A failed attempt is retried ``max_retries`` times (``max_retries + 1``
    attempts in all) after ``min(max_backoff_s, backoff_s * 2**i) * U(0.5, 1)`` seconds (``i`` = 0, 1, ...;
    ``seed`` fixes the jitter). ``max_concurrency`` requests are in flight at once. ``routing_spec`` is
    needed for requests with ``return_routing``. ``initial_weight_version`` is the version of the weights the
    server was started with. ``load_format`` is passed to ``/update_weights_from_disk`` when set.
    ``extra_sampling_params`` go into every request's ``sampling_params`` (note that SGLang's log-probs
    follow temperature but not top-p / top-k truncation, so those make them differ from the sampler).
    """

    base_url: str
    timeout_s: float = 600.0
    max_retries: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    max_concurrency: int = 32
    routing_spec: RoutingSpec | None = None
    api_key: str | None = None
    initial_weight_version: int = 0
    update_timeout_s: float = 1800.0
    load_format: str | None = None
    flush_cache_after_update: bool = True
    extra_sampling_params: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self) -> None:
        url = self.base_url
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url.rstrip("/")) <= 8:
            raise ValueError(f"base_url: expected 'http://host:port' or 'https://...', got {url!r}")
        object.__setattr__(self, "base_url", url.rstrip("/"))
        check_number("SGLangClientConfig", "timeout_s", self.timeout_s, low=0, integer=False, allow_equal=False)
        check_number("SGLangClientConfig", "update_timeout_s", self.update_timeout_s, low=0, integer=False, allow_equal=False)
        check_number("SGLangClientConfig", "max_retries", self.max_retries, low=0, integer=True)
        check_number("SGLangClientConfig", "backoff_s", self.backoff_s, low=0, integer=False)
        check_number("SGLangClientConfig", "max_backoff_s", self.max_backoff_s, low=self.backoff_s, integer=False)
        check_number("SGLangClientConfig", "max_concurrency", self.max_concurrency, low=1, integer=True)
        check_number("SGLangClientConfig", "initial_weight_version", self.initial_weight_version, low=0, integer=True)
        if self.routing_spec is not None and not isinstance(self.routing_spec, RoutingSpec):
            raise ValueError(f"routing_spec: expected a RoutingSpec or None, got {type(self.routing_spec).__name__}")
        for name in ("api_key", "load_format"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name}: expected a non-empty str or None, got {value!r}")
        if not isinstance(self.flush_cache_after_update, bool):
            raise ValueError(f"flush_cache_after_update: expected a bool, got {self.flush_cache_after_update!r}")
        extra = self.extra_sampling_params
        if not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra):
            raise ValueError(f"extra_sampling_params: expected a mapping with str keys, got {extra!r}")
        clash = sorted(_OWN_SAMPLING_KEYS & set(extra))
        if clash:
            raise ValueError(f"extra_sampling_params: expected no keys the engine sets per request "
                             f"({sorted(_OWN_SAMPLING_KEYS)}), got {clash}")
        try:
            json.dumps(dict(extra), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"extra_sampling_params: expected JSON-serialisable values, got {extra!r} ({e})") from None
        object.__setattr__(self, "extra_sampling_params", MappingProxyType(dict(extra)))
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed: expected an int or None, got {self.seed!r}")


class _BatchFailures:
    """The failed attempts of one :meth:`SGLangClient.generate_results` batch, summarised in one line."""

    def __init__(self):
        self._lock = threading.Lock()
        self._retried: set[str] = set()  # requests that needed at least one retry
        self._kinds: dict[str, int] = {}
        self.failed = 0
        self.stop = threading.Event()

    @property
    def retried(self) -> int:
        return len(self._retried)

    def note_retry(self, what: str, e: _Retryable) -> None:
        kind = _failure_kind(e)
        with self._lock:
            self._retried.add(what)
            self._kinds[kind] = self._kinds.get(kind, 0) + 1

    def note_failed(self) -> None:
        with self._lock:
            self.failed += 1

    def summary(self, total: int) -> str:
        with self._lock:
            kinds = ", ".join(f"{k} \u00d7{n}" for k, n in sorted(self._kinds.items(), key=lambda kv: -kv[1]))
            return (f"{len(self._retried)} of {total} requests needed retries" + (f" ({kinds})" if kinds else "")
                    + f"; {self.failed} failed")


def _failure_kind(e: _Retryable) -> str:
    """A short name for a failed attempt's cause: 'timeout', 'HTTP 503', 'connection reset', ..."""
    if e.timeout:
        return "timeout"
    if e.status is not None:
        return f"HTTP {e.status}"
    text = str(e).lower()
    for needle, kind in (("reset", "connection reset"), ("refused", "connection refused"),
                         ("remotedisconnected", "connection closed"), ("broken pipe", "broken pipe")):
        if needle in text:
            return kind
    return "connection error"


def _server_message(raw: bytes) -> str:
    """The human-readable part of an SGLang error body (JSON ``message`` / ``error.message`` / ``detail``)."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text[:2000]
    if isinstance(body, Mapping):
        err = body.get("error")
        if isinstance(err, Mapping) and "message" in err:
            return str(err["message"])
        for key in ("message", "detail", "error"):
            if body.get(key):
                return str(body[key])
    return text[:2000]


class SGLangClient:
    """The HTTP client of one SGLang server (``SGLangClientConfig.base_url``)."""

    def __init__(self, config: SGLangClientConfig):
        if not isinstance(config, SGLangClientConfig):
            raise TypeError(f"config: expected an SGLangClientConfig, got {type(config).__name__}")
        self.config = config
        self._version = config.initial_weight_version
        self._server_tag: str | None = None  # the weight_version string the server took from us, if any
        self._server_info: dict | None = None
        self._busy = threading.RLock()  # held by generate and update_weights: they never interleave
        self._rng = random.Random(config.seed)
        self._rng_lock = threading.Lock()

    # ------------------------------------------------------------------ public API

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def server_info(self) -> dict | None:
        """The server's ``/server_info`` answer from :meth:`check_server` (None before it ran)."""
        return self._server_info

    def check_server(self) -> dict:
        """Read the server's arguments; fail clearly when a needed feature is off; tag the served weights.

        Raises :class:`EngineError` when the server is unreachable after all retries, or when
        ``routing_spec`` is set and the server was started without ``--enable-return-routed-experts``.
        Then sets the server's weight-version tag to ``str(weight_version)`` (``/update_weight_version``;
        servers without that endpoint keep their tag and answers are not checked against it).
        """
        info = self._get_json("/server_info", fallback="/get_server_info")
        if not isinstance(info, Mapping):
            raise EngineError(f"SGLang server at {self.config.base_url}: /server_info answered "
                              f"{type(info).__name__}, expected a JSON object of server arguments")
        if self.config.routing_spec is not None and not info.get("enable_return_routed_experts", False):
            raise EngineError(
                f"SGLang server at {self.config.base_url} was started without --enable-return-routed-experts; "
                f"routing replay (R3) needs it: restart the server with that flag, or set routing_spec=None and "
                f"do not ask for routing")
        with self._busy:
            tag = str(self._version)
            try:
                self._post("/update_weight_version", {"new_version": tag, "abort_all_requests": False},
                           timeout=self.config.timeout_s)
                self._server_tag = tag
            except HTTPStatusError as e:
                if e.status not in (404, 405):
                    raise
                logger.warning("SGLang server at %s has no /update_weight_version; answers' weight_version "
                               "tags are not checked until update_weights sets one", self.config.base_url)
            self._server_info = dict(info)
        return self._server_info

    def reachable(self) -> str | None:
        """One probe of the server (``GET /health``, one attempt, short timeout): None when it answers (any
        HTTP status but 5xx counts: the server is up), else the reason it did not."""
        try:
            self._send_once("GET", self.config.base_url + "/health", None, min(10.0, self.config.timeout_s))
        except HTTPStatusError:
            return None  # 4xx: up, just without /health
        except _Retryable as e:
            return str(e)
        return None

    def wait_for_server(self, deadline_s: float) -> float | None:
        """Return at once (None) when the server answers; else poll it (``/health``, capped exponential backoff
        between ``backoff_s`` and ``max_backoff_s``) until it answers, and return how many seconds it was
        away. Logs one line when the wait starts and one when the server is back. Raises
        :class:`EngineError` when it is still unreachable after ``deadline_s`` seconds (0: do not wait)."""
        error = self.reachable()
        if error is None:
            return None
        url = self.config.base_url
        start = time.monotonic()
        if deadline_s > 0:
            logger.warning("SGLang server at %s is unreachable (%s); waiting up to %g s for it to come back "
                           "(--sglang-wait-for-server-s)", url, error, deadline_s)
        attempt = 0
        while True:
            left = deadline_s - (time.monotonic() - start)
            if left <= 0:
                raise EngineError(f"SGLang server at {url} unreachable for {time.monotonic() - start:.0f} s "
                                  f"(last error: {error}); restart it or raise --sglang-wait-for-server-s "
                                  f"(now {deadline_s:g})")
            time.sleep(min(left, max(0.2, self._backoff(attempt))))
            attempt += 1
            error = self.reachable()
            if error is None:
                away = time.monotonic() - start
                logger.warning("SGLang server at %s is back after %.1f s", url, away)
                return away

    def lost_weights(self) -> bool:
        """Whether the server no longer serves the weights this client tagged it with (it restarted): its
        weight-version tag differs from the last one it accepted from us. False when nothing was tagged yet
        or the server does not report a tag."""
        if self._server_tag is None:
            return False
        tag = self.get_weight_version()
        if tag is None or tag == self._server_tag:
            return False
        logger.warning("SGLang server at %s serves weight_version %r, expected %r: it restarted and lost the "
                       "trainer's weights", self.config.base_url, tag, self._server_tag)
        return True

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        """One generation per request, in request order; raises the first bad sample's :class:`SampleError`."""
        results = self.generate_results(requests)
        bad = [r for r in results if isinstance(r, SampleError)]
        if bad:
            first = bad[0]
            more = f" ({len(bad) - 1} more bad samples in this batch)" if len(bad) > 1 else ""
            raise SampleError(first.sample_id, first.reason + more) from first
        return results

    def generate_results(self, requests: Sequence[GenerationRequest]) -> list[Generation | SampleError]:
        """A :class:`Generation` or a :class:`SampleError` per request, in request order.

        Raises :class:`EngineError` (not a ``SampleError``) when the server cannot be reached or keeps
        failing after all retries, or answers a request with a 4xx; ``ValueError`` for invalid requests
        (duplicate sample ids, an empty prompt, routing asked without ``routing_spec``).
        """
        requests = list(requests)
        self._validate_requests(requests)
        if not requests:
            return []
        if self._server_info is None:
            self.check_server()
        with self._busy:
            version = self._version
            batch = _BatchFailures()
            try:
                if len(requests) == 1 or self.config.max_concurrency == 1:
                    results = [self._generate_one(r, version, batch) for r in requests]
                else:
                    num_workers = min(self.config.max_concurrency, len(requests))
                    pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="sglang-generate")
                    futures = [pool.submit(self._generate_one, r, version, batch) for r in requests]
                    try:
                        results = [f.result() for f in futures]
                    except BaseException:
                        # Fail fast: queued requests are dropped; the ones on the wire stop at their next
                        # retry (batch.stop) and finish in the background.
                        batch.stop.set()
                        pool.shutdown(wait=False, cancel_futures=True)
                        raise
                    pool.shutdown(wait=True)
            except EngineError:
                batch.failed = max(batch.failed, 1)
                logger.warning("SGLang server at %s: /generate batch failed: %s", self.config.base_url,
                               batch.summary(len(requests)))
                raise
            if batch.retried:
                logger.warning("SGLang server at %s: %s", self.config.base_url, batch.summary(len(requests)))
            return results

    def update_weights(self, source: str | PathLike, version: int) -> None:
        """Load the checkpoint at ``source`` (a path the *server* can read) and tag it ``version``.

        ``POST /update_weights_from_disk`` with ``weight_version=str(version)`` and ``flush_cache`` (the
        prefix cache holds KV of the old weights; the server flushes it in the same call) unless
        ``flush_cache_after_update`` is off. Later generations carry ``version``. Raises
        :class:`EngineError` with the server's message on failure; the engine's version is then unchanged.

        A refused flush: SGLang answers 400 after loading the new weights and keeps its old tag. Then this
        tags the server ``str(version)`` with ``/update_weight_version``, moves the engine's version to
        ``version`` (the served weights are the new ones), and raises :class:`CacheFlushRefused`; so no
        stale tag makes every later sample fail the version check.
        """
        if not isinstance(source, str | PathLike) or not str(source):
            raise ValueError(f"source: expected a checkpoint path (str or os.PathLike), got {source!r}")
        check_number("SGLangClient", "version", version, low=0, integer=True)
        body = {"model_path": str(source), "weight_version": str(version),
                "flush_cache": self.config.flush_cache_after_update, "abort_all_requests": False}
        if self.config.load_format is not None:
            body["load_format"] = self.config.load_format
        with self._busy:
            try:
                answer = self._post("/update_weights_from_disk", body, timeout=self.config.update_timeout_s)
            except HTTPStatusError as e:
                if _FLUSH_REFUSED_MARK in e.server_message:
                    self._after_refused_flush(str(source), version, e.server_message)
                raise
            if isinstance(answer, Mapping) and answer.get("success") is False:
                message = str(answer.get("message", ""))
                if _FLUSH_REFUSED_MARK in message:
                    self._after_refused_flush(str(source), version, message)
                raise EngineError(f"SGLang server at {self.config.base_url} failed to load weights from "
                                  f"{str(source)!r}: {message}")
            self._version = version
            self._server_tag = str(version)

    def _after_refused_flush(self, source: str, version: int, server_message: str) -> None:
        """The weights at ``source`` are loaded but the server kept its old tag: set the tag, then raise."""
        tag = str(version)
        where = f"SGLang server at {self.config.base_url}"
        try:
            self._post("/update_weight_version", {"new_version": tag, "abort_all_requests": False},
                       timeout=self.config.timeout_s)
        except EngineError as e:
            # The served weights are new but the tag could not be set: stop checking tags rather than
            # reject every later sample for a tag the server will never report.
            self._version = version
            self._server_tag = None
            raise CacheFlushRefused(
                f"{where} loaded the weights from {source!r} but refused to flush its prefix cache "
                f"({server_message}); setting its weight_version to {tag!r} then failed ({e}): answers' "
                f"weight_version tags are no longer checked. Call flush_cache() once the server is idle"
            ) from None
        self._version = version
        self._server_tag = tag
        raise CacheFlushRefused(
            f"{where} loaded the weights from {source!r} (now tagged weight_version {tag!r}) but refused to "
            f"flush its prefix cache: {server_message} Expected the flush to succeed; until flush_cache() "
            f"succeeds, cached prefixes computed with the old weights may be reused")

    def flush_cache(self) -> None:
        """``POST /flush_cache``; raises :class:`EngineError` when the server refuses (HTTP 400: requests are
        still running or queued)."""
        try:
            self._post("/flush_cache", None, timeout=self.config.timeout_s)
        except HTTPStatusError as e:
            raise EngineError(f"SGLang server at {self.config.base_url} refused to flush its prefix cache "
                              f"(HTTP {e.status}): {e.server_message.strip()}") from None

    def note_weight_version(self, version: int) -> None:
        """Another client (the trainer's sending rank) tagged the server with `version`: answers now carry it."""
        with self._busy:
            self._version = version
            self._server_tag = str(version)

    def pause_generation(self, mode: str = "abort") -> None:
        """``POST /pause_generation``: ``"abort"`` returns in-flight requests, ``"retract"`` re-queues them
        (KV recomputed later), ``"in_place"`` keeps them and their KV (then ``/flush_cache`` fails)."""
        if mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"mode: expected 'abort', 'retract' or 'in_place', got {mode!r}")
        self._post("/pause_generation", {"mode": mode}, timeout=self.config.timeout_s)

    def continue_generation(self) -> None:
        """``POST /continue_generation``: resume after :meth:`pause_generation`."""
        self._post("/continue_generation", {}, timeout=self.config.timeout_s)

    # ------------------------------------------------------------------ streamed weight updates
    # The calls SGLang offers for a separate (non-colocated) server;
    # :mod:`vespo_megatron.rollout.sglang.weight_sync` drives them. Each is sent once, never retried: a repeated
    # join or bucket would leave the server waiting in a collective the trainer has already left.

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the engine's lock: no ``generate`` or ``update_weights`` of this engine runs meanwhile (they
        take the same lock), e.g. across all the buckets of one streamed update."""
        with self._busy:
            yield

    def get_weight_version(self) -> str | None:
        """The server's weight-version tag; None on servers that do not report one.

        ``GET /get_weight_version``; where that answers 404 (SGLang >= 0.5.21 removed it), the
        ``weight_version`` field of ``/model_info``, then of ``/get_model_info`` (older servers).
        """
        for path in ("/get_weight_version", "/model_info", "/get_model_info"):
            try:
                answer = self._request("GET", path, None, timeout=self.config.timeout_s, what=path)
            except HTTPStatusError as e:
                if e.status in (404, 405):
                    continue
                raise
            if not isinstance(answer, Mapping):
                raise EngineError(f"SGLang server at {self.config.base_url}: {path} answered "
                                  f"{str(answer)[:200]!r}, expected a JSON object")
            tag = answer.get("weight_version")
            return None if tag is None else str(tag)
        return None

    def begin_weight_update(self, *, timeout: float | None = None) -> bool:
        """``POST /begin_weight_update`` ``{}`` (``BeginWeightUpdateReqInput``; its ``selector`` defaults to
        ``"all"``): open the weight-update session that SGLang >= 0.5.21 requires around
        ``/update_weights_from_distributed``. Returns False when the server has no such endpoint (HTTP 404:
        SGLang <= 0.5.20); raises :class:`EngineError` with the server's message on any other failure (e.g.
        a session is already open)."""
        try:
            self._post_once("/begin_weight_update", {}, timeout=timeout or self.config.timeout_s)
        except HTTPStatusError as e:
            if e.status == 404:
                return False
            raise
        return True

    def end_weight_update(self, *, timeout: float | None = None) -> str:
        """``POST /end_weight_update`` ``{}`` (``EndWeightUpdateReqInput`` has no fields): close the session
        :meth:`begin_weight_update` opened. Returns the server's message; raises :class:`EngineError`."""
        return self._post_once("/end_weight_update", {}, timeout=timeout or self.config.update_timeout_s)

    def init_weights_update_group(self, *, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str, backend: str = "nccl",
                                  timeout: float | None = None) -> str:
        """``POST /init_weights_update_group``: the server's workers join a process group as ranks
        ``rank_offset + tp_rank`` of ``world_size``, rendezvous at ``tcp://master_address:master_port``.

        Blocks until they have joined, so the trainer's rank 0 must be joining at the same time (call this
        from another thread). Returns the server's message; raises :class:`EngineError` on failure.
        """
        if not isinstance(master_address, str) or not master_address:
            raise ValueError(f"master_address: expected a non-empty str, got {master_address!r}")
        check_number("init_weights_update_group", "master_port", master_port, low=1, integer=True)
        check_number("init_weights_update_group", "rank_offset", rank_offset, low=1, integer=True)
        check_number("init_weights_update_group", "world_size", world_size, low=rank_offset + 1, integer=True)
        body = {"master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
                "world_size": world_size, "group_name": group_name, "backend": backend}
        return self._post_once("/init_weights_update_group", body,
                               timeout=timeout or self.config.update_timeout_s)

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                        shapes: Sequence[Sequence[int]], *,
                                        group_name: str = "weight_update_group", version: int | None = None,
                                        flush_cache: bool = False, timeout: float | None = None) -> str:
        """``POST /update_weights_from_distributed`` for one bucket: the server receives each tensor, in
        order, by broadcast from rank 0 of ``group_name``, then loads them.

        ``dtypes`` are torch attribute names (``"bfloat16"``). ``version`` (set on the last bucket only) tags
        the server's weights ``str(version)`` once this bucket has loaded, and becomes the engine's
        ``weight_version``; ``flush_cache`` flushes the prefix cache after it. Blocks until the server has
        received and loaded the bucket, so the broadcasts must run meanwhile (call this from another thread).
        Returns the server's message; raises :class:`EngineError` with the server's message on failure.
        """
        names, dtypes, shapes = list(names), list(dtypes), [list(s) for s in shapes]
        if not (len(names) == len(dtypes) == len(shapes)) or not names:
            raise ValueError(f"names, dtypes, shapes: expected equal non-zero lengths, got {len(names)}, "
                             f"{len(dtypes)}, {len(shapes)}")
        for field_name, values in (("names", names), ("dtypes", dtypes)):
            if not all(isinstance(v, str) and v for v in values):
                raise ValueError(f"{field_name}: expected non-empty strings, got {values[:5]!r}...")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for s in shapes for d in s):
            raise ValueError(f"shapes: expected lists of ints >= 0, got {shapes[:5]!r}...")
        if version is not None:
            check_number("SGLangClient", "version", version, low=0, integer=True)
        body = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
                "flush_cache": bool(flush_cache)}
        if version is not None:
            body["weight_version"] = str(version)
        message = self._post_once("/update_weights_from_distributed", body,
                                  timeout=timeout or self.config.update_timeout_s)
        if version is not None:
            # Plain assignments: the caller holds exclusive() (from whichever thread) across the update.
            self._version = version
            self._server_tag = str(version)
        return message

    def destroy_weights_update_group(self, group_name: str = "weight_update_group", *,
                                     timeout: float | None = None) -> str:
        """``POST /destroy_weights_update_group``; returns the server's message, raises on failure."""
        return self._post_once("/destroy_weights_update_group", {"group_name": group_name},
                               timeout=timeout or self.config.timeout_s)

    def _post_once(self, path: str, body: dict, *, timeout: float) -> str:
        """One POST, no retry; an answer with ``success: false`` raises :class:`EngineError`."""
        try:
            answer = self._send_once("POST", self.config.base_url + path, body, timeout)
        except _Retryable as e:
            message = f"SGLang server at {self.config.base_url}: {path} failed (not retried): {e}"
            if e.status is not None:
                raise HTTPStatusError(message, e.status, e.server_message) from None
            raise EngineError(message) from None
        if isinstance(answer, Mapping) and answer.get("success") is False:
            raise EngineError(f"SGLang server at {self.config.base_url}: {path} failed: "
                              f"{answer.get('message', '')}")
        return str(answer.get("message", "")) if isinstance(answer, Mapping) else str(answer or "")

    # ------------------------------------------------------------------ one request

    def _validate_requests(self, requests: list[GenerationRequest]) -> None:
        seen = set()
        for i, r in enumerate(requests):
            if not isinstance(r, GenerationRequest):
                raise ValueError(f"requests[{i}]: expected a GenerationRequest, got {type(r).__name__}")
            if r.sample_id in seen:
                raise ValueError(f"requests[{i}].sample_id: expected unique sample ids, got {r.sample_id!r} twice")
            seen.add(r.sample_id)
            if not r.prompt_ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                           for t in r.prompt_ids):
                raise ValueError(f"requests[{i}].prompt_ids: expected a non-empty tuple of token ids >= 0, "
                                 f"got {r.prompt_ids!r}")
            check_number("GenerationRequest", f"max_new_tokens (requests[{i}])", r.max_new_tokens, low=1, integer=True)
            check_number("GenerationRequest", f"temperature (requests[{i}])", r.temperature, low=0, integer=False)
            if r.return_routing and self.config.routing_spec is None:
                raise ValueError(f"requests[{i}].return_routing: routing asked for sample {r.sample_id!r} but "
                                 f"SGLangClientConfig.routing_spec is None")

    def _payload(self, r: GenerationRequest, rid: str) -> dict:
        sampling = dict(self.config.extra_sampling_params)
        sampling.update(temperature=float(r.temperature), max_new_tokens=int(r.max_new_tokens))
        if r.stop_token_ids:
            sampling["stop_token_ids"] = [int(t) for t in r.stop_token_ids]
        payload = {
            "rid": rid,
            "input_ids": [int(t) for t in r.prompt_ids],
            "sampling_params": sampling,
            "return_logprob": True,
            "logprob_start_len": -1,  # log-probs of output tokens only
            "stream": False,
        }
        if r.return_routing:
            payload["return_routed_experts"] = True
        return payload

    def _generate_one(self, r: GenerationRequest, version: int,
                      batch: _BatchFailures | None = None) -> Generation | SampleError:
        def make_payload() -> dict:
            return self._payload(r, rid=f"{r.sample_id}-{uuid.uuid4().hex[:12]}")

        try:
            answer = self._request("POST", "/generate", make_payload, timeout=self.config.timeout_s,
                                   what=f"/generate for sample {r.sample_id!r}", batch=batch)
        except EngineError:
            if batch is not None:
                batch.note_failed()
            raise
        try:
            return self._parse(r, answer, version)
        except SampleError as e:
            return e

    def _parse(self, r: GenerationRequest, answer, version: int) -> Generation:
        sid = r.sample_id
        if isinstance(answer, list) and len(answer) == 1:
            answer = answer[0]
        if not isinstance(answer, Mapping):
            raise SampleError(sid, f"expected a JSON object from /generate, got {type(answer).__name__}")
        if "output_ids" not in answer or "meta_info" not in answer:
            missing = [k for k in ("output_ids", "meta_info") if k not in answer]
            raise SampleError(sid, f"answer lacks {missing} (got keys {sorted(answer)})")
        meta = answer["meta_info"]
        if not isinstance(meta, Mapping):
            raise SampleError(sid, f"meta_info: expected a JSON object, got {type(meta).__name__}")
        output_ids = answer["output_ids"]
        if not isinstance(output_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in output_ids):
            raise SampleError(sid, f"output_ids: expected a list of ints, got {str(output_ids)[:200]}")

        finish = meta.get("finish_reason")
        if not isinstance(finish, Mapping) or "type" not in finish:
            raise SampleError(sid, f"meta_info['finish_reason']: expected {{'type': ...}}, got {finish!r}")
        if finish["type"] not in _FINISH_TYPES:
            detail = finish.get("message", "")
            raise SampleError(sid, f"finish_reason type {finish['type']!r} (expected 'stop' or 'length')"
                                   + (f": {detail}" if detail else ""))

        num_out = len(output_ids)
        for key, want in (("completion_tokens", num_out), ("prompt_tokens", len(r.prompt_ids))):
            got = meta.get(key)
            if got is None:
                raise SampleError(sid, f"meta_info lacks {key!r}")
            if got != want:
                raise SampleError(sid, f"meta_info[{key!r}] = {got!r}, expected {want}")
        if num_out > r.max_new_tokens:
            raise SampleError(sid, f"{num_out} output tokens, more than max_new_tokens={r.max_new_tokens}")

        triples = meta.get("output_token_logprobs")
        if triples is None:
            raise SampleError(sid, "meta_info lacks 'output_token_logprobs' (sent return_logprob=true)")
        if not isinstance(triples, list) or len(triples) != num_out:
            got = len(triples) if isinstance(triples, list) else type(triples).__name__
            raise SampleError(sid, f"output_token_logprobs: expected {num_out} entries (completion_tokens), got {got}")
        logprobs = []
        for j, (entry, token) in enumerate(zip(triples, output_ids, strict=True)):
            if not isinstance(entry, list | tuple) or len(entry) < 2:
                raise SampleError(sid, f"output_token_logprobs[{j}]: expected [logprob, token_id, text], got {entry!r}")
            lp, tok = entry[0], entry[1]
            if tok != token:
                raise SampleError(sid, f"output_token_logprobs[{j}] is for token {tok!r} but output_ids[{j}] = "
                                       f"{token}")
            if lp is None or not isinstance(lp, int | float) or isinstance(lp, bool) or not math.isfinite(lp):
                raise SampleError(sid, f"output_token_logprobs[{j}]: log-prob {lp!r} is not a finite number "
                                       f"(SGLang sends NaN as null)")
            if lp > _LOGPROB_TOLERANCE:
                raise SampleError(sid, f"output_token_logprobs[{j}]: log-prob {lp!r} > 0")
            logprobs.append(min(float(lp), 0.0))

        tag = meta.get("weight_version")
        if self._server_tag is not None and tag is not None and str(tag) != self._server_tag:
            raise SampleError(sid, f"generated under server weight_version {tag!r}, expected {self._server_tag!r} "
                                   f"(engine version {version})")

        routing = None
        if r.return_routing:
            try:
                routing = routing_from_meta_info(meta, spec=self.config.routing_spec, sample_id=sid,
                                                 num_prompt_tokens=len(r.prompt_ids), num_output_tokens=num_out)
            except RoutingPayloadError as e:
                raise SampleError(sid, str(e)) from None
        return Generation(sample_id=sid, prompt_ids=tuple(r.prompt_ids), output_ids=tuple(output_ids),
                          output_logprobs=tuple(logprobs), weight_version=version, finish_reason=finish["type"],
                          routing=routing)

    # ------------------------------------------------------------------ HTTP

    def _backoff(self, attempt: int) -> float:
        cap = min(self.config.max_backoff_s, self.config.backoff_s * (2.0 ** attempt))
        with self._rng_lock:
            return cap * self._rng.uniform(0.5, 1.0)

    def _get_json(self, path: str, *, fallback: str | None = None):
        try:
            return self._request("GET", path, None, timeout=self.config.timeout_s, what=path)
        except HTTPStatusError as e:
            if fallback is None or e.status != 404:
                raise
        return self._request("GET", fallback, None, timeout=self.config.timeout_s, what=fallback)

    def _post(self, path: str, body, *, timeout: float):
        return self._request("POST", path, (lambda: body) if body is not None else None, timeout=timeout, what=path)

    def _request(self, method: str, path: str, make_body, *, timeout: float, what: str,
                 batch: _BatchFailures | None = None):
        """Send with retries; return the decoded JSON answer (or the text of a non-JSON 200 answer).

        With ``batch`` (one request of a :meth:`generate_results` batch) each failed attempt is logged at
        DEBUG and counted in ``batch``, which the caller summarises in one line; retries stop early once
        ``batch.stop`` is set (another request of the batch has failed for good)."""
        url = self.config.base_url + path
        attempts = self.config.max_retries + 1
        last: _Retryable | None = None
        for attempt in range(attempts):
            if attempt:
                delay = self._backoff(attempt - 1)
                if batch is not None:
                    if batch.stop.wait(delay):
                        break
                else:
                    time.sleep(delay)
            body = make_body() if make_body is not None else None
            try:
                return self._send_once(method, url, body, timeout)
            except _Retryable as e:
                last = e
                if batch is not None:
                    batch.note_retry(what, e)
                    logger.debug("%s: attempt %d/%d failed: %s", what, attempt + 1, attempts, e)
                else:
                    logger.warning("%s: attempt %d/%d failed: %s", what, attempt + 1, attempts, e)
                if e.timeout and isinstance(body, Mapping) and "rid" in body:
                    self._abort_quietly(body["rid"])
        if last is None:  # stopped before the first attempt
            raise EngineError(f"SGLang server at {self.config.base_url}: {what} abandoned (its batch failed)")
        message = (f"SGLang server at {self.config.base_url}: {what} failed after {attempts} attempts "
                   f"(max_retries={self.config.max_retries}); last error: {last}")
        if last.status is not None:
            raise HTTPStatusError(message, last.status, last.server_message)
        raise EngineError(message)

    def _send_once(self, method: str, url: str, body, timeout: float):
        data = None
        headers = {"Accept": "application/json"}
        if body is not None:
            data = json.dumps(body, allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
        if self.config.api_key is not None:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                msg = _server_message(e.read())
            except (OSError, HTTPException):
                msg = ""
            finally:
                e.close()
            if e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {msg}", status=e.code, server_message=msg) from None
            raise HTTPStatusError(f"SGLang server at {self.config.base_url}: {method} {url} -> HTTP {e.code}: {msg}",
                                  e.code, msg) from None
        except urllib.error.URLError as e:
            is_timeout = isinstance(e.reason, TimeoutError | socket.timeout)
            raise _Retryable(f"{'timeout' if is_timeout else 'connection error'}: {e.reason}",
                             timeout=is_timeout) from None
        except TimeoutError as e:  # socket.timeout is TimeoutError (3.10+): read timed out
            raise _Retryable(f"timeout after {timeout} s: {e}", timeout=True) from None
        except (ConnectionError, HTTPException, OSError) as e:
            raise _Retryable(f"connection error: {type(e).__name__}: {e}") from None
        text = raw.decode("utf-8", errors="replace")
        try:
            return json.loads(text) if text.strip() else None
        except ValueError:
            return text

    def _abort_quietly(self, rid: str) -> None:
        """Ask the server to drop a request whose attempt timed out (best effort, one try, short timeout)."""
        try:
            self._send_once("POST", self.config.base_url + "/abort_request", {"rid": rid},
                            min(5.0, self.config.timeout_s))
        except (EngineError, _Retryable) as e:
            logger.debug("abort_request for %s failed: %s", rid, e)
