# Shape legend:
#   [P]  prompt tokens, [O] output tokens of one request
#   [L]  decoder layers (num_hidden_layers, dense ones included), [K] top-k experts per token
"""A local stand-in for an SGLang server: its native HTTP API, deterministic answers, injectable faults.

:class:`FakeSGLangServer` is a context manager that serves on ``127.0.0.1`` (a free port; never another
interface) from a ``ThreadingHTTPServer`` in a daemon thread, and stops when the ``with`` block ends. It
speaks the request and answer shapes of SGLang's ``/generate`` (single and batched ``input_ids``;
``meta_info`` with ``id``, ``finish_reason``, ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``,
``weight_version``, ``output_token_logprobs`` as ``[logprob, token_id, null]`` triples and, when asked and
enabled, ``routed_experts`` as base64 of little-endian int32 ``[P + O - 1, L, K]``), ``/server_info`` and
``/get_server_info``, ``/model_info`` / ``/get_model_info``, ``/get_weight_version``, ``/update_weight_version``,
``/update_weights_from_disk``, ``/flush_cache``, ``/pause_generation``, ``/continue_generation``,
``/abort_request`` and ``/health``. Error answers use SGLang's shapes (``{"error": {"message": ...}}`` for
``/generate``, ``{"success": false, "message": ...}`` for weight updates).

Versions: ``sglang_version`` (default ``"0.5.23"``) names the SGLang release whose handlers are mirrored.
From 0.5.21 (:data:`SESSION_SINCE`) ``/update_weights_from_distributed`` answers 400 outside a
``/begin_weight_update`` .. ``/end_weight_update`` session, and ``/get_weight_version`` is gone (the tag is
``/model_info``'s ``weight_version``); up to 0.5.20 the session endpoints answer 404 and ``/model_info`` does
not exist. Both: unknown ``sampling_params`` keys answer 400 (SGLang's ``SamplingParams(**kwargs)``); a
refused cache flush (:meth:`FakeSGLangServer.refuse_flush`) makes a weight update answer 400 after loading,
with the tag unchanged; ``dp_size > 1`` makes ``/init_weights_update_group`` answer 500 (SGLang's assert).

Streamed weight updates (SGLang's non-colocated RL path): ``/init_weights_update_group`` joins a process
group (gloo; NCCL too with ``device="cuda:N"``) as rank ``rank_offset`` by the same steps as SGLang's
``init_custom_process_group`` (``tcp://`` rendezvous, ``PrefixStore(group_name)``, torch's
``_new_process_group_helper``), so a trainer that can feed this server can feed SGLang's;
``/update_weights_from_distributed`` receives each named tensor by broadcast from rank 0 into
``torch.empty(shape, dtype=getattr(torch, dtype))``, keeps it in :attr:`FakeSGLangServer.received_weights`,
flushes on ``flush_cache`` and takes ``weight_version``; ``/destroy_weights_update_group`` leaves the group.
With ``expected_weights`` the received names, dtypes and shapes are checked like a model's ``load_weights``
(after receiving, as SGLang fails). The group lives in this process, so the trainer side of a test must run
in another process (torch allows one group per name per process).

What comes out is decided by a *policy*: ``policy(request: FakeRequest) -> FakeOutput``. The default,
:func:`hash_policy`, derives tokens, log-probs and routing from the prompt alone, so two runs agree.

Faults for tests (each thread-safe, counted down per matching request):
:meth:`FakeSGLangServer.fail_next` (an HTTP status such as 503 or 400), :meth:`~FakeSGLangServer.delay_next`
(sleep before answering, to trip client timeouts) and :meth:`~FakeSGLangServer.corrupt` (a malformed
answer: NaN or null log-prob, a dropped field, a token mismatch, an aborted request, ...). Starting the
server with ``enable_return_routed_experts=False`` mimics a server launched without that flag.

Not modelled: text prompts and tokenisation, streaming, real sampling, the prefix cache, top-logprobs,
multi-DP routing, ``/update_weights_from_tensor``; for streamed updates: more than one server worker (tp_size
1), ``load_format="flattened_bucket"`` and runtime weight manifests (NCCL only with ``device="cuda:N"``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

__all__ = ["CORRUPTIONS", "FakeOutput", "FakeRequest", "FakeSGLangServer", "hash_policy"]

CORRUPTIONS = (
    "nan_logprob",  # a NaN log-prob (Python json writes NaN)
    "null_logprob",  # a null log-prob (what orjson, SGLang's encoder, writes for NaN)
    "positive_logprob",  # a log-prob of +0.5
    "drop_logprobs",  # no meta_info["output_token_logprobs"]
    "drop_output_ids",  # no "output_ids"
    "drop_finish_reason",  # no meta_info["finish_reason"]
    "drop_routing",  # no meta_info["routed_experts"] although asked
    "short_logprobs",  # one log-prob triple fewer than output tokens
    "token_mismatch",  # a triple's token id differs from output_ids
    "count_mismatch",  # completion_tokens one more than len(output_ids)
    "bad_routing",  # routed_experts with one row too few
    "abort",  # finish_reason {"type": "abort"}
    "stale_version",  # meta_info["weight_version"] of another version
)


# The first SGLang release whose /update_weights_from_distributed needs a /begin_weight_update ..
# /end_weight_update session, and which dropped /get_weight_version for /model_info's weight_version.
SESSION_SINCE = (0, 5, 21)

# The API fields of SGLang's SamplingParams (python/sglang/srt/sampling/sampling_params.py, 0.5.23): any other
# sampling_params key is an unexpected keyword argument, answered 400.
SAMPLING_PARAMS = frozenset({
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "beam_width",
    "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "no_stop_trim", "stream_interval", "logit_bias", "sampling_seed",
    "custom_params", "watermark",
})

# SGLang's message when a weight update's cache flush is refused (scheduler weight_updater.py).
FLUSH_REFUSED = ("Weights were updated, but the cache was not flushed because requests are still running or "
                 "queued. Retract or finish them, then call /flush_cache.")


@dataclass(frozen=True)
class FakeRequest:
    """One (un-batched) ``/generate`` request as the server read it."""

    rid: str
    input_ids: tuple[int, ...]
    sampling_params: dict
    return_logprob: bool
    logprob_start_len: int
    return_routed_experts: bool
    weight_version: str
    model_path: str


@dataclass(frozen=True)
class FakeOutput:
    """What the policy generated: ``routing`` is int ``[P + O - 1, L, K]`` or None (then the server makes
    one from :func:`hash_routing` when routing is asked for)."""

    output_ids: Sequence[int]
    logprobs: Sequence[float]
    finish_reason: str  # "stop" | "length"
    routing: np.ndarray | None = None


def _mix(*values: int) -> int:
    return zlib.crc32(np.asarray(values, dtype=np.int64).tobytes())


def hash_routing(num_rows: int, num_layers: int, top_k: int, num_experts: int, salt: int = 0) -> np.ndarray:
    """Deterministic int32 routing ``[num_rows, L, K]`` with K distinct ids per (row, layer)."""
    rows = np.arange(num_rows, dtype=np.int64)[:, None, None]
    layers = np.arange(num_layers, dtype=np.int64)[None, :, None]
    slots = np.arange(top_k, dtype=np.int64)[None, None, :]
    base = (rows * 7 + layers * 3 + salt) % num_experts  # [N, L, 1]
    return ((base + slots) % num_experts).astype(np.int32)  # consecutive ids mod E: distinct when K <= E


def hash_policy(vocab_size: int = 1000) -> Callable[[FakeRequest], FakeOutput]:
    """Tokens and log-probs from a hash of (prompt, position, weight version); stops on ``stop_token_ids``.

    Token j = hash(prompt, j, version) mod vocab_size; its log-prob is ``-(0.05 + (hash % 400) / 100) /
    max(temperature, 0.1)``, always finite and negative.
    """

    def policy(req: FakeRequest) -> FakeOutput:
        sp = req.sampling_params
        max_new = int(sp.get("max_new_tokens", 16))
        stops = set(sp.get("stop_token_ids") or ())
        temperature = float(sp.get("temperature", 1.0))
        seed = _mix(*req.input_ids, zlib.crc32(req.weight_version.encode()))
        out, lps = [], []
        finish = "length"
        for j in range(max_new):
            h = _mix(seed, j)
            out.append(h % vocab_size)
            lps.append(-(0.05 + (h >> 8) % 400 / 100.0) / max(temperature, 0.1))
            if out[-1] in stops:
                finish = "stop"
                break
        return FakeOutput(output_ids=out, logprobs=lps, finish_reason=finish)

    return policy


@dataclass
class _Fault:
    kind: str
    remaining: int | None  # None: forever
    paths: tuple[str, ...]
    match: Callable[[FakeRequest], bool] | None = None
    status: int = 503
    message: str = ""
    seconds: float = 0.0


@dataclass
class _State:
    weight_version: str
    model_path: str
    paused: bool = False
    requests: list[tuple[str, Any]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    weight_loads: list[dict] = field(default_factory=list)
    num_flushes: int = 0
    num_generated: int = 0
    groups: dict[str, Any] = field(default_factory=dict)  # group_name -> torch ProcessGroup
    received: dict[str, Any] = field(default_factory=dict)  # name -> torch.Tensor (latest received)
    max_in_flight: int = 0
    in_flight: int = 0


class FakeSGLangServer:
    """``with FakeSGLangServer(...) as server: SGLangClientConfig(base_url=server.url, ...)``."""

    def __init__(
        self,
        policy: Callable[[FakeRequest], FakeOutput] | None = None,
        *,
        num_hidden_layers: int = 4,
        top_k: int = 2,
        num_experts: int = 8,
        enable_return_routed_experts: bool = True,
        weight_version: str = "default",
        model_path: str = "fake/model",
        api_key: str | None = None,
        legacy_server_info: bool = False,
        has_weight_version_api: bool = True,
        expected_weights: Mapping[str, tuple[str, Sequence[int]]] | None = None,
        group_timeout_s: float = 60.0,
        device: str = "cpu",
        sglang_version: str = "0.5.23",
        dp_size: int = 1,
        port: int = 0,
    ):
        """``expected_weights``: name -> (dtype name, shape) of the served model, checked on streamed updates
        (None: accept anything). ``group_timeout_s``: rendezvous and collective timeout of update groups.
        ``device``: where streamed tensors are received; ``"cuda:N"`` also allows the NCCL backend.
        ``sglang_version``: the SGLang release whose handlers are mirrored (see :data:`SESSION_SINCE`).
        ``dp_size``: the server's data-parallel size (> 1: update groups answer HTTP 500, as SGLang asserts).
        ``port``: where to listen on 127.0.0.1 (0: a free port)."""
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ValueError(f"port: expected an int in [0, 65535], got {port!r}")
        self._port = port
        parts = sglang_version.split(".") if isinstance(sglang_version, str) else []
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"sglang_version: expected 'MAJOR.MINOR.PATCH' such as '0.5.23', got {sglang_version!r}")
        self.sglang_version = tuple(int(p) for p in parts)
        if not isinstance(dp_size, int) or dp_size < 1:
            raise ValueError(f"dp_size: expected an int >= 1, got {dp_size!r}")
        self.dp_size = dp_size
        if top_k > num_experts:
            raise ValueError(f"top_k: expected <= num_experts={num_experts}, got {top_k}")
        self.policy = policy or hash_policy()
        self.num_hidden_layers, self.top_k, self.num_experts = num_hidden_layers, top_k, num_experts
        self.enable_return_routed_experts = enable_return_routed_experts
        self.api_key = api_key
        self.legacy_server_info = legacy_server_info
        self.has_weight_version_api = has_weight_version_api
        self.expected_weights = None if expected_weights is None else {
            k: (str(d), tuple(int(x) for x in shape)) for k, (d, shape) in expected_weights.items()}
        self.group_timeout_s = group_timeout_s
        self.device = device
        self._lock = threading.Lock()
        self._state = _State(weight_version=weight_version, model_path=model_path)
        self._session_open = False  # a begin_weight_update / end_weight_update session (>= 0.5.21)
        self._faults: list[_Fault] = []
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> FakeSGLangServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if self._httpd is not None:
            raise RuntimeError("FakeSGLangServer already started")
        handler = type("_Handler", (_Handler,), {"fake": self})
        self._httpd = _HTTPServer(("127.0.0.1", self._port), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-sglang", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()  # wakes handlers sleeping in delay_next
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self._httpd = None
        with self._lock:
            groups, self._state.groups = dict(self._state.groups), {}
        for pg in groups.values():
            _leave_group(pg)

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ observation

    @property
    def weight_version(self) -> str:
        with self._lock:
            return self._state.weight_version

    @property
    def requests(self) -> list[tuple[str, Any]]:
        """Every request received, as ``(path, decoded JSON body or None)``, in arrival order."""
        with self._lock:
            return list(self._state.requests)

    def bodies(self, path: str) -> list[Any]:
        return [b for p, b in self.requests if p == path]

    @property
    def aborted(self) -> list[str]:
        with self._lock:
            return list(self._state.aborted)

    @property
    def weight_loads(self) -> list[dict]:
        with self._lock:
            return list(self._state.weight_loads)

    @property
    def num_flushes(self) -> int:
        with self._lock:
            return self._state.num_flushes

    @property
    def received_weights(self) -> dict[str, Any]:
        """Tensors received by ``/update_weights_from_distributed``: name -> the latest ``torch.Tensor``."""
        with self._lock:
            return dict(self._state.received)

    @property
    def weight_update_groups(self) -> list[str]:
        """Names of the update groups this server is in now."""
        with self._lock:
            return sorted(self._state.groups)

    @property
    def has_weight_update_session(self) -> bool:
        """Whether this server mirrors SGLang >= 0.5.21 (``/begin_weight_update`` / ``/end_weight_update``)."""
        return self.sglang_version >= SESSION_SINCE

    @property
    def session_open(self) -> bool:
        """Whether a weight-update session is open now."""
        with self._lock:
            return self._session_open

    @property
    def max_in_flight(self) -> int:
        """Most ``/generate`` requests handled at the same time."""
        with self._lock:
            return self._state.max_in_flight

    # ------------------------------------------------------------------ faults

    def fail_next(self, n: int = 1, status: int = 503, *, path: str = "/generate", message: str | None = None,
                  match: Callable[[FakeRequest], bool] | None = None) -> None:
        """Answer the next ``n`` requests to ``path`` with HTTP ``status`` (``match``: only such requests)."""
        msg = message or f"injected HTTP {status}"
        self._add(_Fault("status", n, (path,), match, status=status, message=msg))

    def delay_next(self, n: int = 1, seconds: float = 1.0, *, path: str = "/generate") -> None:
        """Sleep ``seconds`` before answering the next ``n`` requests to ``path`` (``n=None``: all)."""
        self._add(_Fault("delay", n, (path,), seconds=seconds))

    def corrupt(self, kind: str, n: int | None = 1, *, prompt_ids: Sequence[int] | None = None) -> None:
        """Spoil the next ``n`` ``/generate`` answers (of prompt ``prompt_ids`` only, when given) with one of
        :data:`CORRUPTIONS`."""
        if kind not in CORRUPTIONS:
            raise ValueError(f"kind: expected one of {CORRUPTIONS}, got {kind!r}")
        match = None if prompt_ids is None else (lambda req, p=tuple(prompt_ids): req.input_ids == p)
        self._add(_Fault(kind, n, ("/generate",), match))

    def refuse_flush(self, n: int | None = 1) -> None:
        """Refuse the next ``n`` cache flushes (``None``: all), as SGLang does while requests are running or
        queued: ``/flush_cache`` answers 400, and a weight update asked to flush loads the new weights, keeps
        the old weight-version tag and answers 400 (``flush_cache_after_weight_update``)."""
        self._add(_Fault("refuse_flush", n, ("flush",)))

    def _flush(self) -> bool:
        """One cache flush; False when refused (see :meth:`refuse_flush`)."""
        if self._take("flush", ("refuse_flush",)) is not None:
            return False
        with self._lock:
            self._state.num_flushes += 1
        return True

    def _add(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _take(self, path: str, kinds: tuple[str, ...], req: FakeRequest | None = None) -> _Fault | None:
        """The first live fault of ``kinds`` for ``path`` (and ``req``), counted down by one."""
        with self._lock:
            for f in self._faults:
                if path not in f.paths or (f.kind not in kinds) or f.remaining == 0:
                    continue
                if f.match is not None and (req is None or not f.match(req)):
                    continue
                if f.remaining is not None:
                    f.remaining -= 1
                return f
        return None

    # ------------------------------------------------------------------ endpoints

    def _server_info(self) -> dict:
        with self._lock:
            version, model = self._state.weight_version, self._state.model_path
        return {"model_path": model, "enable_return_routed_experts": self.enable_return_routed_experts,
                "skip_tokenizer_init": False, "weight_version": version, "tp_size": 1, "dp_size": self.dp_size,
                "version": "fake-0.0", "internal_states": [{}]}

    def _generate_one(self, body: dict, i: int | None) -> tuple[int, Any]:
        def pick(name, default):
            value = body.get(name, default)
            return value[i] if i is not None and isinstance(value, list) else value

        input_ids = body["input_ids"][i] if i is not None else body["input_ids"]
        rid = pick("rid", None) or f"fake-{time.monotonic_ns()}"
        sampling = pick("sampling_params", None) or {}
        unknown = sorted(set(sampling) - SAMPLING_PARAMS) if isinstance(sampling, dict) else None
        if unknown is None:
            return 400, {"error": {"message": f"sampling_params: expected a JSON object, got {sampling!r}"}}
        if unknown:  # SGLang builds SamplingParams(**sampling_params), which rejects unknown keywords
            return 400, {"error": {"message": f"Unexpected keyword argument {unknown[0]!r} in sampling_params "
                                              f"(unknown keys {unknown})"}}
        with self._lock:
            version, model = self._state.weight_version, self._state.model_path
        req = FakeRequest(rid=rid, input_ids=tuple(int(t) for t in input_ids),
                          sampling_params=dict(sampling),
                          return_logprob=bool(pick("return_logprob", False)),
                          logprob_start_len=int(pick("logprob_start_len", -1)),
                          return_routed_experts=bool(body.get("return_routed_experts", False)),
                          weight_version=version, model_path=model)
        status = self._take("/generate", ("status",), req)
        if status is not None:
            return status.status, {"error": {"message": status.message}}
        out = self.policy(req)
        output_ids = [int(t) for t in out.output_ids]
        logprobs = [float(x) for x in out.logprobs]
        assert len(logprobs) == len(output_ids), "policy: one log-prob per output token"
        num_prompt, num_out = len(req.input_ids), len(output_ids)
        finish = ({"type": "stop", "matched": output_ids[-1]} if out.finish_reason == "stop" and output_ids
                  else {"type": "length", "length": num_out})
        meta: dict[str, Any] = {"id": rid, "finish_reason": finish, "prompt_tokens": num_prompt,
                                "completion_tokens": num_out, "cached_tokens": 0, "weight_version": version}
        if req.return_logprob:
            meta["input_token_logprobs"] = []
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(logprobs, output_ids, strict=True)]
        if req.return_routed_experts and self.enable_return_routed_experts:
            routing = out.routing
            if routing is None:
                routing = hash_routing(num_prompt + num_out - 1, self.num_hidden_layers, self.top_k,
                                       self.num_experts, salt=_mix(*req.input_ids) % self.num_experts)
            meta["routed_experts"] = base64.b64encode(np.ascontiguousarray(routing, dtype="<i4").tobytes()).decode()
        answer = {"text": "", "output_ids": output_ids, "meta_info": meta}
        fault = self._take("/generate", CORRUPTIONS, req)
        if fault is not None:
            _spoil(answer, fault.kind, self)
        with self._lock:
            self._state.num_generated += 1
        return 200, answer

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        """Route one request; returns (status, JSON-able body or str)."""
        with self._lock:
            self._state.requests.append((path, body))
        delay = self._take(path, ("delay",))
        if delay is not None:
            self._stopping.wait(delay.seconds)
        if path != "/generate":
            status = self._take(path, ("status",))
            if status is not None:
                key = "success" if path.startswith(_SUCCESS_SHAPED) else None
                err = {"success": False, "message": status.message} if key else {"error": {"message": status.message}}
                return status.status, err

        if path in ("/health", "/health_generate"):
            return 200, ""
        if (path == "/server_info" and not self.legacy_server_info) or path == "/get_server_info":
            return 200, self._server_info()
        new = self.has_weight_update_session  # SGLang >= 0.5.21
        if path == "/get_model_info" or (path == "/model_info" and new):
            info = self._server_info()
            return 200, {"model_path": info["model_path"], "is_generation": True,
                         "weight_version": info["weight_version"]}
        if path == "/get_weight_version" and self.has_weight_version_api and not new:
            return 200, {"weight_version": self.weight_version}
        if method != "POST" and path not in ("/flush_cache",):
            return 404, {"detail": "Not Found"}
        if path == "/generate":
            return self._generate(body)
        if path == "/update_weight_version" and self.has_weight_version_api:
            if not isinstance(body, dict) or not isinstance(body.get("new_version"), str):
                return 400, {"error": {"message": "new_version: field required (str)"}}
            with self._lock:
                self._state.weight_version = body["new_version"]
            return 200, {"success": True, "message": f"Weight version updated to {body['new_version']}",
                         "new_version": body["new_version"]}
        if path == "/update_weights_from_disk":
            if not isinstance(body, dict) or not isinstance(body.get("model_path"), str) or not body["model_path"]:
                return 400, {"error": {"message": "model_path: field required"}}
            with self._lock:
                self._state.model_path = body["model_path"]
                self._state.weight_loads.append(dict(body))
            # As SGLang: the weights are loaded first; a refused flush then fails the call, and the tokenizer
            # manager takes the new tag only on success, so the tag stays the old one.
            if body.get("flush_cache", True) and not self._flush():
                return 400, {"success": False, "message": FLUSH_REFUSED, "num_paused_requests": 0}
            message = "Succeeded to update model weights."
            if body.get("weight_version") is not None:
                with self._lock:
                    self._state.weight_version = str(body["weight_version"])
                message += f" Weight version updated to {body['weight_version']}."
            return 200, {"success": True, "message": message, "num_paused_requests": 0}
        if path in ("/begin_weight_update", "/end_weight_update") and new:
            return self._weight_update_session(path == "/begin_weight_update", body)
        if path == "/init_weights_update_group":
            return self._init_weights_update_group(body)
        if path == "/update_weights_from_distributed":
            return self._update_weights_from_distributed(body)
        if path == "/destroy_weights_update_group":
            return self._destroy_weights_update_group(body)
        if path == "/flush_cache":
            if not self._flush():
                return 400, "Flush cache failed.\n"
            return 200, "Cache flushed.\nPlease check backend logs for more details.\n"
        if path == "/pause_generation":
            with self._lock:
                self._state.paused = True
            return 200, {"message": "Generation paused successfully.", "status": "ok"}
        if path == "/continue_generation":
            with self._lock:
                self._state.paused = False
            return 200, {"message": "Generation continued successfully.", "status": "ok"}
        if path == "/abort_request":
            with self._lock:
                self._state.aborted.append(str((body or {}).get("rid")))
            return 200, ""
        return 404, {"detail": "Not Found"}

    # ------------------------------------------------------------------ streamed weight updates

    def _weight_update_session(self, begin: bool, body: Any) -> tuple[int, Any]:
        """``/begin_weight_update`` (``BeginWeightUpdateReqInput``: ``selector``, default ``"all"``) and
        ``/end_weight_update`` (``EndWeightUpdateReqInput``: no fields): SGLang >= 0.5.21."""
        if body is not None and not isinstance(body, dict):
            return 400, {"error": {"message": "expected a JSON object"}}
        if begin and (body or {}).get("selector", "all") not in ("target", "draft", "all"):
            return 400, {"success": False, "message": f"invalid selector {(body or {}).get('selector')!r}; "
                                                      f"expected 'target', 'draft', or 'all'"}
        with self._lock:
            if begin and self._session_open:
                return 400, {"success": False, "message": "a weight-update session is already open; call "
                                                          "end_weight_update() first"}
            if not begin and not self._session_open:
                return 400, {"success": False, "message": "no weight-update session is open; call "
                                                          "begin_weight_update() first"}
            self._session_open = begin
        return 200, {"success": True, "message": "Success"}

    def _init_weights_update_group(self, body: Any) -> tuple[int, Any]:
        missing = [k for k in ("master_address", "master_port", "rank_offset", "world_size")
                   if not isinstance(body, dict) or k not in body]
        if missing:
            return 400, {"error": {"message": f"{missing}: field required"}}
        if self.dp_size != 1:  # SGLang asserts this in the tokenizer manager: an internal server error
            return 500, {"error": {"message": "data-parallel replicas are not supported for update weights "
                                              "from distributed"}}
        group_name = body.get("group_name", "weight_update_group")
        backend = body.get("backend", "nccl")
        backends = ("gloo",) if self.device == "cpu" else ("gloo", "nccl")
        if backend not in backends:
            return 400, {"success": False, "message": f"Failed to initialize custom process group: backend "
                                                      f"{backend!r} on device {self.device!r} (only "
                                                      f"{backends})."}
        address = str(body["master_address"])
        host = f"[{address}]" if ":" in address else address  # IPv6 in a URL, as SGLang's NetworkAddress
        try:
            pg = _join_group_like_sglang(init_method=f"tcp://{host}:{int(body['master_port'])}",
                                         rank=int(body["rank_offset"]),  # rank_offset + tp_rank, tp_size 1
                                         world_size=int(body["world_size"]), group_name=str(group_name),
                                         backend=backend, timeout=timedelta(seconds=self.group_timeout_s))
        except Exception as e:
            return 400, {"success": False, "message": f"Failed to initialize custom process group: {e}."}
        with self._lock:
            self._state.groups[group_name] = pg
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    def _update_weights_from_distributed(self, body: Any) -> tuple[int, Any]:
        import torch
        import torch.distributed as dist

        if not isinstance(body, dict) or not all(isinstance(body.get(k), list)
                                                 for k in ("names", "dtypes", "shapes")):
            return 400, {"error": {"message": "names, dtypes, shapes: field required (lists)"}}
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        group_name = body.get("group_name", "weight_update_group")
        with self._lock:
            pg = self._state.groups.get(group_name)
            known = sorted(self._state.groups)
        if self.has_weight_update_session and not self.session_open:  # checked before receiving anything
            return 400, {"success": False, "message": "update_weights_from_distributed must run between "
                                                      "begin_weight_update() and end_weight_update()"}
        if pg is None:
            return 400, {"success": False, "message": f"Group {group_name} not in {known}. Please call "
                                                      f"`init_weights_update_group` first."}
        failed = ("Failed to update parameter online: {}. The full weights of the ModelRunner are partially "
                  "updated. Please discard the whole weights.")
        device = torch.device(self.device)
        try:  # as SGLang's model runner: allocate and receive each tensor in order, then load
            received, works = [], []
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
                    torch_dtype = getattr(torch, dtype, None)
                    if not isinstance(torch_dtype, torch.dtype):
                        raise AttributeError(f"module 'torch' has no dtype {dtype!r}")
                    tensor = torch.empty(shape, dtype=torch_dtype, device=device)
                    works.append(dist.broadcast(tensor, src=0, group=pg, async_op=True))
                    received.append((name, tensor))
                for work in works:
                    work.wait()
                received = [(name, tensor.cpu()) for name, tensor in received]  # .cpu() syncs the stream
            self._check_expected(received)
        except Exception as e:
            return 400, {"success": False, "message": failed.format(e)}
        message = "Succeeded to update parameter online."
        with self._lock:
            self._state.received.update(received)
        if body.get("flush_cache", True) and not self._flush():
            return 400, {"success": False, "message": FLUSH_REFUSED}
        with self._lock:
            if body.get("weight_version") is not None:
                self._state.weight_version = str(body["weight_version"])
                message += f" Weight version updated to {body['weight_version']}."
        return 200, {"success": True, "message": message}

    def _check_expected(self, received: list[tuple[str, Any]]) -> None:
        if self.expected_weights is None:
            return
        for name, tensor in received:
            if name not in self.expected_weights:
                raise KeyError(f"no parameter {name!r} in the model")
            dtype, shape = self.expected_weights[name]
            got = (str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
            if got != (dtype, shape):
                raise ValueError(f"{name}: received {got[0]} {list(got[1])}, the model has {dtype} "
                                 f"{list(shape)}")

    def _destroy_weights_update_group(self, body: Any) -> tuple[int, Any]:
        group_name = (body or {}).get("group_name", "weight_update_group")
        with self._lock:
            pg = self._state.groups.pop(group_name, None)
        if pg is None:
            return 400, {"success": False, "message": "The group to be destroyed does not exist."}
        _leave_group(pg)
        return 200, {"success": True, "message": "Succeeded to destroy custom process group."}

    def _generate(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or "input_ids" not in body:
            return 400, {"error": {"message": "At least one of text, input_ids, or image should be provided"}}
        ids = body["input_ids"]
        if not isinstance(ids, list) or not ids:
            return 400, {"error": {"message": "input_ids: expected a non-empty list"}}
        with self._lock:
            self._state.in_flight += 1
            self._state.max_in_flight = max(self._state.max_in_flight, self._state.in_flight)
        try:
            if isinstance(ids[0], list):  # a batch: one answer per prompt, in order
                answers = []
                for i in range(len(ids)):
                    status, answer = self._generate_one(body, i)
                    if status != 200:
                        return status, answer
                    answers.append(answer)
                return 200, answers
            return self._generate_one(body, None)
        finally:
            with self._lock:
                self._state.in_flight -= 1


_SUCCESS_SHAPED = ("/update_weights", "/init_weights_update_group", "/destroy_weights_update_group",
                   "/begin_weight_update", "/end_weight_update")


def _join_group_like_sglang(*, init_method: str, rank: int, world_size: int, group_name: str, backend: str,
                            timeout: timedelta):
    """Join a process group by the steps of SGLang's ``init_custom_process_group`` (server side, rank >= 1):
    ``tcp://`` rendezvous (rank 0 hosts the store), ``PrefixStore(group_name)``, ``_new_process_group_helper``
    with no global ranks (a stand-alone group), identity rank map for ``broadcast(src=0)``."""
    from torch.distributed import PrefixStore, rendezvous
    from torch.distributed.distributed_c10d import Backend, _new_process_group_helper, _world

    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    made = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                     timeout=timeout)
    pg = made[0] if isinstance(made, tuple) else made
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _leave_group(pg) -> None:
    import torch.distributed as dist

    try:
        dist.destroy_process_group(pg)
    except Exception:  # already gone (the peer left): nothing to release
        pass


def _spoil(answer: dict, kind: str, server: FakeSGLangServer) -> None:
    meta = answer["meta_info"]
    triples = meta.get("output_token_logprobs") or []
    if kind in ("nan_logprob", "null_logprob", "positive_logprob") and triples:
        triples[len(triples) // 2][0] = {"nan_logprob": math.nan, "null_logprob": None, "positive_logprob": 0.5}[kind]
    elif kind == "drop_logprobs":
        meta.pop("output_token_logprobs", None)
    elif kind == "drop_output_ids":
        answer.pop("output_ids", None)
    elif kind == "drop_finish_reason":
        meta.pop("finish_reason", None)
    elif kind == "drop_routing":
        meta.pop("routed_experts", None)
    elif kind == "short_logprobs" and triples:
        triples.pop()
    elif kind == "token_mismatch" and triples:
        triples[0][1] = triples[0][1] + 1
    elif kind == "count_mismatch":
        meta["completion_tokens"] += 1
    elif kind == "bad_routing" and "routed_experts" in meta:
        raw = base64.b64decode(meta["routed_experts"])
        meta["routed_experts"] = base64.b64encode(raw[: len(raw) - 4 * server.num_hidden_layers * server.top_k]).decode()
    elif kind == "abort":
        meta["finish_reason"] = {"type": "abort", "message": "Abort before prefill"}
    elif kind == "stale_version":
        meta["weight_version"] = f"{meta.get('weight_version')}-stale"


class _HTTPServer(ThreadingHTTPServer):
    """A thread per connection with a real listen backlog: socketserver's default of 5 made the kernel reset
    connections when a client opened dozens at once (64 concurrent /generate requests)."""

    request_queue_size = 1024
    daemon_threads = True
    allow_reuse_address = True  # a restarted server takes its port back at once


class _Handler(BaseHTTPRequestHandler):
    fake: FakeSGLangServer  # set on the per-server subclass
    server_version = "FakeSGLang/0"

    log_requests = False  # set by the command-line entry point's --log-requests

    def log_message(self, format, *args) -> None:  # quiet: tests read server.requests instead
        pass

    def log_request(self, code="-", size="-") -> None:
        if self.log_requests:
            print(f"{self.command} {self.path} {code}", flush=True)

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        fake = self.fake
        if fake.api_key is not None and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
            self._reply(401, {"error": {"message": "Unauthorized"}})
            return
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError as e:
            self._reply(400, {"error": {"message": f"invalid JSON body: {e}"}})
            return
        status, answer = fake.handle(method, self.path.split("?", 1)[0], body)
        self._reply(status, answer)

    def _reply(self, status: int, answer: Any) -> None:
        if isinstance(answer, str):
            data, ctype = answer.encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = json.dumps(answer).encode(), "application/json"  # NaN stays NaN (allow_nan)
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): nothing to do
            pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._serve("POST")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vespo_megatron.testing.fake_sglang --port P``: serve on 127.0.0.1:P until SIGINT/SIGTERM."""
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m vespo_megatron.testing.fake_sglang",
        description="A local stand-in for an SGLang server (deterministic answers from the prompt; no model), "
                    "for training against --rollout-engine sglang without a GPU. Serves on 127.0.0.1 only.")
    parser.add_argument("--port", type=int, default=30000, help="port on 127.0.0.1 (0: a free one; default 30000)")
    parser.add_argument("--vocab-size", type=int, default=1000,
                        help="token ids are drawn below this (at most the trainer's vocabulary; default 1000)")
    parser.add_argument("--num-hidden-layers", type=int, default=4, help="decoder layers of routed_experts")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token in routed_experts")
    parser.add_argument("--num-experts", type=int, default=8, help="experts per MoE layer")
    parser.add_argument("--no-routed-experts", action="store_true",
                        help="behave like a server started without --enable-return-routed-experts")
    parser.add_argument("--log-requests", action="store_true", help="print one line per request to stdout")
    args = parser.parse_args(argv)
    try:
        server = FakeSGLangServer(hash_policy(vocab_size=args.vocab_size), num_hidden_layers=args.num_hidden_layers,
                                  top_k=args.top_k, num_experts=args.num_experts, port=args.port,
                                  enable_return_routed_experts=not args.no_routed_experts)
        server.start()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server._httpd.RequestHandlerClass.log_requests = args.log_requests
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"fake SGLang server listening on {server.url} (Ctrl-C to stop)", flush=True)
    try:
        while not stop.wait(0.2):
            pass
    finally:
        server.stop()
    print("fake SGLang server stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
