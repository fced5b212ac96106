"""Contract tests on SGLang's own code: every body our client sends is parsed and validated by SGLang's request
types, SGLang's routed-experts encoder makes payloads our decoder reads bit for bit, and SGLang's own
weight-update session logic accepts the sequence of calls our sender makes.

SGLang is installed without its dependencies (``pip install --no-deps sglang==0.5.23`` plus msgspec, orjson and
pybase64; see ci/setup.sh), so ``import sglang`` is impossible (its ``__init__`` pulls CUDA torch, zmq, ...).
The tests read the installed release's files instead:

* **imported by file path** (their imports are all light): ``api/v1/api_types.py`` (the /generate JSON contract
  the server checks first, ``generate_contract_error``) and ``srt/utils/msgspec_utils.py`` (the pydantic schema
  FastAPI uses to parse msgspec request bodies).
* **executed from source with stubs** (their imports need CUDA-side packages): ``srt/managers/io_struct.py``
  (``GenerateReqInput`` and the weight-update/pause/abort request structs), ``srt/sampling/sampling_params.py``
  (``SamplingParams`` + ``verify``), ``srt/managers/scheduler_components/weight_updater.py`` (the scheduler's
  begin/end session rule) and, for the routed-experts encoding, ``BaseTopkCapturer.get_topk``
  (``srt/state_capturer/base.py``) and ``DetokenizerManager._b64_encode_per_request``
  (``srt/managers/detokenizer_manager.py``). The module's ``sglang`` / ``zmq`` imports are dropped and the
  names they bound are replaced by stubs (``typing.Any`` for types, small fakes for the scheduler's workers);
  everything the tests rely on is SGLang's own code.
"""

from __future__ import annotations

import ast
import base64
import importlib.metadata
import importlib.util
import os
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from vespo_megatron.rollout.engine import GenerationRequest
from vespo_megatron.rollout.sglang.client import SGLangClient, SGLangClientConfig
from vespo_megatron.rollout.sglang.routed_experts import routing_from_meta_info
from vespo_megatron.routing import RoutingSpec
from vespo_megatron.testing.fake_sglang import FakeSGLangServer

SGLANG_VERSION = "0.5.23"  # keep in step with ci/setup.sh


def _sglang_root() -> Path:
    spec = importlib.util.find_spec("sglang")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        message = f"sglang=={SGLANG_VERSION} is not installed (ci/setup.sh installs it with --no-deps)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message, allow_module_level=True)
    return Path(spec.submodule_search_locations[0])


ROOT = _sglang_root()


def test_pinned_release_installed():
    assert importlib.metadata.version("sglang") == SGLANG_VERSION


# ------------------------------------------------------------------------------------------------ loaders
def _load_file(rel: str, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _heavy(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in ("sglang", "zmq", "torch")


def _exec_without_imports(rel: str, name: str, stubs: dict, *, required: tuple[str, ...]) -> types.ModuleType:
    """Execute an SGLang source file as module ``name`` with its sglang/zmq/torch imports dropped; each name
    those imports bound is ``stubs[name]`` or ``typing.Any``. Top-level statements run one by one: one that
    fails on a stub is skipped unless it defines a name in ``required`` (then the error is raised)."""
    tree = ast.parse((ROOT / rel).read_text(), filename=str(ROOT / rel))
    mod = types.ModuleType(name)
    mod.__file__ = str(ROOT / rel)
    sys.modules[name] = mod  # msgspec and pydantic resolve string annotations through sys.modules
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and _heavy(node.module):
            mod.__dict__.update({a.asname or a.name: stubs.get(a.asname or a.name, typing.Any)
                                 for a in node.names})
            continue
        if isinstance(node, ast.Import) and any(_heavy(a.name) for a in node.names):
            mod.__dict__.update({(a.asname or a.name).split(".")[0]: stubs.get(a.asname or a.name, typing.Any)
                                 for a in node.names})
            continue
        code = compile(ast.Module(body=[node], type_ignores=[]), str(ROOT / rel), "exec",
                       flags=__import__("__future__").annotations.compiler_flag, dont_inherit=True)
        try:
            exec(code, mod.__dict__)
        except Exception:
            if getattr(node, "name", None) in required:
                raise
    mod.__dict__.update({k: v for k, v in stubs.items() if k not in mod.__dict__})
    missing = [n for n in required if n not in mod.__dict__]
    assert not missing, f"{rel}: {missing} not found (SGLang moved them?)"
    return mod


def _method_source(rel: str, cls: str, method: str) -> ast.FunctionDef:
    tree = ast.parse((ROOT / rel).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == method)


def _function(rel: str, cls: str, method: str, namespace: dict):
    fn = _method_source(rel, cls, method)
    fn.decorator_list = []
    ns = dict(namespace)
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(ROOT / rel), "exec"), ns)
    return ns[method]


# Each HTTP path our client calls -> SGLang's request type of that route (http_server.py).
REQUEST_TYPES = {
    "/update_weights_from_disk": "UpdateWeightFromDiskReqInput",
    "/update_weight_version": "UpdateWeightVersionReqInput",
    "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
    "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
    "/begin_weight_update": "BeginWeightUpdateReqInput",
    "/end_weight_update": "EndWeightUpdateReqInput",
    "/pause_generation": "PauseGenerationReqInput",
    "/continue_generation": "ContinueGenerationReqInput",
    "/abort_request": "AbortReq",
}


API = _load_file("api/v1/api_types.py", "_sglang_api_types")
MSGSPEC_UTILS = _load_file("srt/utils/msgspec_utils.py", "_sglang_msgspec_utils")
FIELD_VALIDATORS = _load_file("srt/utils/field_validators.py", "_sglang_field_validators")
KV_HINTS = _exec_without_imports("srt/managers/kv_hints.py", "_sglang_kv_hints", {
    "msgspec_struct_pydantic_core_schema": MSGSPEC_UTILS.msgspec_struct_pydantic_core_schema,
}, required=("KvHintsEnvelope", "decode_kv_hints_envelope"))
IO = _exec_without_imports("srt/managers/io_struct.py", "_sglang_io_struct", {
    "msgspec_struct_pydantic_core_schema": MSGSPEC_UTILS.msgspec_struct_pydantic_core_schema,
    "validate_optional_list_i64_1d_2d": FIELD_VALIDATORS.validate_optional_list_i64_1d_2d,
    "KvHintsEnvelope": KV_HINTS.KvHintsEnvelope,
    "decode_kv_hints_envelope": KV_HINTS.decode_kv_hints_envelope,
    "has_valid_data": lambda data: data is not None and (not isinstance(data, list) or any(data)),
    "np": np,
}, required=("BaseReq", "GenerateReqInput", *REQUEST_TYPES.values()))
def _no_watermark(value):
    assert value is None, "our client sends no watermark"
    return None


SAMPLING = _exec_without_imports("srt/sampling/sampling_params.py", "_sglang_sampling_params",
                                 {"normalize_watermark_request": _no_watermark},
                                 required=("SamplingParams",))


# ------------------------------------------------------------------------------------------------ requests
NO_BODY = {"/health", "/health_generate", "/server_info", "/get_server_info", "/model_info", "/get_model_info",
           "/get_weight_version", "/flush_cache"}


def _route_source(path: str) -> str:
    return (ROOT / "srt/entrypoints/http_server.py").read_text().split(f'"{path}"', 1)[1][:600]


def validate_body(path: str, body) -> object:
    """Parse ``body`` as SGLang's FastAPI route does and return SGLang's request object; also reject keys
    the server would silently ignore (its schemas drop unknown keys, so a misspelt field is lost)."""
    import pydantic

    if path == "/generate":
        assert API.GenerateRequest.from_json_value(body) is not None  # the server's contract check (400)
        req = pydantic.TypeAdapter(IO.GenerateReqInput).validate_python(body)  # FastAPI's parse
        known = set(IO.GenerateReqInput.__dataclass_fields__)
        assert set(body) <= known, sorted(set(body) - known)
        req.normalize_batch_and_arguments()
        for params in req.sampling_params if isinstance(req.sampling_params, list) else [req.sampling_params]:
            sp = SAMPLING.SamplingParams(**params)  # as the tokenizer manager: unknown keys raise TypeError
            sp.verify(vocab_size=1000)
        return req
    cls_name = REQUEST_TYPES[path]
    assert cls_name in _route_source(path), f"SGLang's {path} route no longer takes {cls_name}"
    cls = getattr(IO, cls_name)
    req = pydantic.TypeAdapter(cls).validate_python(body if body is not None else {})
    assert isinstance(req, cls)
    known = {f.name for f in __import__("msgspec").structs.fields(cls)}
    assert set(body or {}) <= known, f"{path}: keys SGLang ignores: {sorted(set(body or {}) - known)}"
    return req


def validate_all(requests: list[tuple[str, object]]) -> set[str]:
    seen = set()
    for path, body in requests:
        if path in NO_BODY:
            continue
        validate_body(path, body)
        seen.add(path)
    return seen


def _client(server: FakeSGLangServer, **kw) -> SGLangClient:
    spec = RoutingSpec(num_hidden_layers=server.num_hidden_layers, moe_layers=tuple(range(server.num_hidden_layers)),
                       top_k=server.top_k, num_experts=server.num_experts)
    return SGLangClient(SGLangClientConfig(base_url=server.url, timeout_s=10.0, routing_spec=spec, **kw))


def test_generate_bodies_validate(tmp_path):
    with FakeSGLangServer() as server:
        client = _client(server, extra_sampling_params={"top_p": 0.9}, seed=3)
        client.generate([GenerationRequest(sample_id="a", prompt_ids=(1, 2, 3), max_new_tokens=4),
                         GenerationRequest(sample_id="b", prompt_ids=(4, 5), max_new_tokens=3, temperature=0.7,
                                           return_routing=True, stop_token_ids=(2,))])
        client.pause_generation()
        client.continue_generation()
        client._abort_quietly("some-rid")
        client.update_weights(tmp_path, version=1)
        seen = validate_all(server.requests)
    assert {"/generate", "/pause_generation", "/continue_generation", "/abort_request", "/update_weight_version",
            "/update_weights_from_disk"} <= seen, seen


def test_validator_rejects_what_sglang_rejects():
    good = {"rid": "x", "input_ids": [1, 2], "sampling_params": {"temperature": 1.0, "max_new_tokens": 2}}
    validate_body("/generate", good)
    with pytest.raises(API.JsonContractError, match="unknown field `max_tokens`"):  # the route's 400
        validate_body("/generate", dict(good, sampling_params={"max_tokens": 2}))
    with pytest.raises(TypeError, match="(?i)unexpected keyword"):  # and the tokenizer manager's
        SAMPLING.SamplingParams(max_tokens=2)
    with pytest.raises(API.JsonContractError):
        validate_body("/generate", dict(good, input_ids="12"))
    with pytest.raises(ValueError):  # SamplingParams.verify
        validate_body("/generate", dict(good, sampling_params={"temperature": -1.0}))
    with pytest.raises(AssertionError, match="ignores"):
        validate_body("/update_weights_from_distributed", {"names": [], "dtypes": [], "shapes": [],
                                                           "version": "3"})
    import pydantic
    with pytest.raises(pydantic.ValidationError):
        validate_body("/init_weights_update_group", {"master_address": "h", "master_port": 1})


# ------------------------------------------------------------------------------------------------ sessions
W_REL = "srt/managers/scheduler_components/weight_updater.py"


class _Runner:
    def __init__(self, log):
        self.weight_updater = self
        self.log = log

    def begin_weight_update(self):
        self.log.append("begin")

    def end_weight_update(self, run_post_load):
        self.log.append("end")

    def receive_weights_from_distributed(self, **kw):
        return kw["names"]

    def load_weights_from_distributed(self, weights):
        self.log.append(("load", tuple(weights)))
        return True, "Succeeded to update parameter online."


class _TpWorker:
    def __init__(self, log):
        self.model_runner = _Runner(log)

    def weight_update_runners(self):
        return [("target", self.model_runner)]

    def init_weights_update_group(self, req):
        return True, "ok"

    def destroy_weights_update_group(self, req):
        return True, "ok"


def sglang_weight_updater():
    """SGLang's SchedulerWeightUpdaterManager (scheduler side of the weight-update routes), run on fakes."""
    mod = _exec_without_imports(W_REL, "_sglang_weight_updater", {
        **{n: getattr(IO, n) for n in dir(IO) if n.endswith(("ReqInput", "ReqOutput"))},
        "torch": types.SimpleNamespace(distributed=types.SimpleNamespace(barrier=lambda group=None: None)),
        "get_parallel": lambda: types.SimpleNamespace(tp_group=types.SimpleNamespace(cpu_group=None)),
    }, required=("SchedulerWeightUpdaterManager",))
    log = []
    versions = []
    manager = mod.SchedulerWeightUpdaterManager(
        tp_worker=_TpWorker(log), draft_worker=None, memory_saver_adapter=None,
        flush_cache=lambda empty_cache=False: True, is_fully_idle=lambda **kw: True,
        scheduler=types.SimpleNamespace(record_weight_version_change=lambda new_version: versions.append(
            new_version)))
    return manager, log, versions


SESSION_PATHS = ("/init_weights_update_group", "/begin_weight_update", "/update_weights_from_distributed",
                 "/end_weight_update", "/destroy_weights_update_group")


def replay_on_sglang(requests) -> list[tuple[str, bool, str]]:
    """Feed the weight-update calls, in order, to SGLang's own scheduler logic; (path, success, message)."""
    manager, _, versions = sglang_weight_updater()
    out = []
    for path, body in requests:
        if path not in SESSION_PATHS:
            continue
        req = validate_body(path, body)
        answer = getattr(manager, path.lstrip("/"))(req)
        out.append((path, answer.success, answer.message))
    return out


def test_sglang_session_rule_is_what_the_fake_mirrors():
    # SGLang's code: a bucket outside begin/end is refused, with the message our fake server returns.
    source = (ROOT / W_REL).read_text()
    assert "if self._session is None:" in source
    refused = replay_on_sglang([("/update_weights_from_distributed", {"names": ["w"], "dtypes": ["float32"],
                                                                       "shapes": [[1]]})])
    assert refused == [("/update_weights_from_distributed", False, "update_weights_from_distributed must run "
                        "between begin_weight_update() and end_weight_update()")]
    fake = Path(sys.modules[FakeSGLangServer.__module__].__file__).read_text()
    assert '"update_weights_from_distributed must run between "' in fake
    assert '"begin_weight_update() and end_weight_update()"' in fake
    answers = replay_on_sglang([("/begin_weight_update", {}), ("/begin_weight_update", {}),
                                ("/end_weight_update", {}), ("/end_weight_update", {})])
    assert [ok for _, ok, _ in answers] == [True, False, True, False]


@pytest.mark.distributed
def test_weight_sync_sequence_accepted_by_sglang():
    """The distributed sync our sender makes (trainer process, gloo) is a valid sequence for SGLang's own
    session logic: fails if DistributedWeightSender.send stops opening/closing the session."""
    from tests.test_weight_sync import run_trainer

    with FakeSGLangServer(group_timeout_s=30.0) as server:
        run_trainer(server, "sync", backend="gloo")
        requests = server.requests
    seen = validate_all(requests)
    assert set(SESSION_PATHS) <= seen, seen
    answers = replay_on_sglang(requests)
    assert all(ok for _, ok, _ in answers), answers
    paths = [p for p, _, _ in answers]
    assert paths.index("/begin_weight_update") < paths.index("/update_weights_from_distributed")
    assert paths[-2:] == ["/end_weight_update", "/destroy_weights_update_group"]
    # The same calls without the session are refused by SGLang.
    bare = [(p, b) for p, b in requests if p not in ("/begin_weight_update", "/end_weight_update")]
    assert not all(ok for _, ok, _ in replay_on_sglang(bare))


# ------------------------------------------------------------------------------------------------ routed experts
def sglang_encode_routed_experts(host_buffer: torch.Tensor, slots: torch.Tensor, seqlen: int,
                                 start_len: int = 0) -> str:
    """meta_info["routed_experts"] as SGLang makes it: ``BaseTopkCapturer.get_topk`` reads the request's token
    slots from the host capture buffer (rows start_len .. seqlen - 2), the detokenizer base64-encodes them."""
    import pybase64

    get_topk = _function("srt/state_capturer/base.py", "BaseTopkCapturer", "get_topk", {"torch": torch})
    encode = _function("srt/managers/detokenizer_manager.py", "DetokenizerManager", "_b64_encode_per_request",
                       {"pybase64": pybase64, "Optional": typing.Optional, "List": list,
                        "torch": torch})
    capturer = types.SimpleNamespace(host_cache=types.SimpleNamespace(buffer=host_buffer))
    pool = types.SimpleNamespace(req_to_token=slots[None, :])
    rows = get_topk(capturer, 0, seqlen, pool, start_len=start_len)
    return encode([rows])[0]


def test_routed_experts_capture_module_and_helper():
    rel = "srt/state_capturer/routed_experts.py"  # moved from srt/layers/moe/routed_experts_capturer.py
    assert (ROOT / rel).exists() and not (ROOT / "srt/layers/moe/routed_experts_capturer.py").exists()
    src = (ROOT / "srt/state_capturer/base.py").read_text()
    assert "dtype=torch.int32" in src  # the host capture buffer the rows come from


@pytest.mark.parametrize("start_len", [0, 5])
def test_sglang_encoded_payload_decodes_bit_for_bit(start_len):
    num_layers, k, num_experts, p, o = 4, 3, 16, 7, 5
    rng = np.random.default_rng(0)
    pool_size = 64
    host = np.stack([np.stack([rng.choice(num_experts, k, replace=False) for _ in range(num_layers)])
                     for _ in range(pool_size)]).astype(np.int32)  # [slots, L, K]
    host[:, 1] = 0  # a dense layer: SGLang's zero-filled slots
    slots = torch.from_numpy(rng.permutation(pool_size)[: p + o].astype(np.int64))
    payload = sglang_encode_routed_experts(torch.from_numpy(host), slots, p + o, start_len)
    spec = RoutingSpec(num_hidden_layers=num_layers, moe_layers=(0, 2, 3), top_k=k, num_experts=num_experts)
    meta = {"id": "r", "prompt_tokens": p, "completion_tokens": o, "routed_experts": payload}
    rec = routing_from_meta_info(meta, spec=spec, start_len=start_len)
    want = host[slots.numpy()[start_len: p + o - 1]]
    np.testing.assert_array_equal(rec.expert_ids, want[:, [0, 2, 3]])
    raw = np.frombuffer(base64.b64decode(payload), dtype="<i4").reshape(-1, num_layers, k)
    assert raw.tobytes() == want.tobytes()  # bit for bit
    # and SGLang's own client-side helper reads the same ids
    import pybase64

    tree = ast.parse((ROOT / "srt/state_capturer/routed_experts.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "extract_routed_experts_from_meta_info")
    ns = {"np": np, "pybase64": pybase64}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "routed_experts.py", "exec"), ns)
    flat = ns["extract_routed_experts_from_meta_info"]({"meta_info": meta})  # SGLang's own client helper
    np.testing.assert_array_equal(flat.reshape(-1, num_layers, k)[:, [0, 2, 3]], rec.expert_ids)
