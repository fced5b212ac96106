"""SGLang routed-experts payloads -> RoutingRecord: wire fixtures, validation errors, fuzzing, both base64 paths.

The fixtures under tests/fixtures/sglang/ are /generate responses in SGLang's wire format, written by this
module's generator (``python tests/test_sglang_payload.py`` rewrites them; a test checks they still match).
The generator's "router" picks each token's experts from a hash of the token prefix, so, as with SGLang's
prefix cache, a later turn sees exactly the rows an earlier turn recorded for a shared prefix.
"""

from __future__ import annotations

import base64
import json
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vespo_megatron.rollout.sglang import routed_experts as sglang_payload
from vespo_megatron.rollout.sglang.routed_experts import (
    RoutingPayloadError,
    decode_routed_experts,
    routing_from_meta_info,
)
from vespo_megatron.routing import RoutingRecord, RoutingSpec, compact_dtype, strided_fill

FIXTURES = Path(__file__).parent / "fixtures" / "sglang"

# Tiny HF configs (Qwen3-MoE keys) of the fixture models.
QWEN_TINY = {"model_type": "qwen3_moe", "num_hidden_layers": 4, "num_experts": 16, "num_experts_per_tok": 4,
             "decoder_sparse_step": 1, "mlp_only_layers": []}
QWEN_TINY_DENSE0 = dict(QWEN_TINY, mlp_only_layers=[0])
QWEN3_30B_A3B = {"model_type": "qwen3_moe", "num_hidden_layers": 48, "num_experts": 128, "num_experts_per_tok": 8,
                 "decoder_sparse_step": 1, "mlp_only_layers": []}


# ----------------------------------------------------------------------------------------------------------
# Generator: a fake router and /generate responses in SGLang's wire format
# ----------------------------------------------------------------------------------------------------------
def route(tokens: list[int], spec: RoutingSpec) -> np.ndarray:
    """int32 [len(tokens), L, K]: row i depends only on tokens[: i + 1]; dense layers are zero (never written)."""
    out = np.zeros((len(tokens), spec.num_hidden_layers, spec.top_k), dtype=np.int32)
    for i in range(len(tokens)):
        prefix = np.asarray(tokens[: i + 1], dtype=np.int64).tobytes()
        for layer in spec.moe_layers:
            rng = np.random.default_rng(zlib.crc32(prefix + layer.to_bytes(2, "little")))
            out[i, layer] = rng.choice(spec.num_experts, size=spec.top_k, replace=False)
    return out


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<i4").tobytes()).decode("ascii")


def generate_response(rid: str, prompt: list[int], output: list[int], spec: RoutingSpec, *, cached_tokens=0,
                      start_len: int = 0) -> dict:
    seq = prompt + output
    rows = route(seq[:-1], spec)[start_len:]  # the last output token never went through the model
    return {
        "text": " ".join(f"t{t}" for t in output),
        "output_ids": output,
        "meta_info": {
            "id": rid,
            "finish_reason": {"type": "length", "length": len(output)},
            "prompt_tokens": len(prompt),
            "completion_tokens": len(output),
            "cached_tokens": cached_tokens,
            "routed_experts": b64(rows),
            "e2e_latency": 0.01,
        },
    }


P1, O1 = [101, 7, 42, 9, 13, 5], [88, 3, 61, 2, 77]
P2 = P1 + O1 + [102, 14, 15]  # turn 2 prompt: turn 1 prompt + answer + the next user message
O2 = [31, 32, 33, 34]


def fixture_set() -> dict[str, dict]:
    qwen, dense0 = RoutingSpec.from_hf_config(QWEN_TINY), RoutingSpec.from_hf_config(QWEN_TINY_DENSE0)
    return {
        "models.json": {"qwen_tiny": QWEN_TINY, "qwen_tiny_dense0": QWEN_TINY_DENSE0,
                        "files": {"single_turn.json": "qwen_tiny", "multi_turn_1.json": "qwen_tiny",
                                  "multi_turn_2.json": "qwen_tiny", "dense_layers.json": "qwen_tiny_dense0"}},
        "single_turn.json": generate_response("req-single", [1, 2, 3, 4, 5, 6, 7], [50, 51, 52, 53, 2], qwen),
        "multi_turn_1.json": generate_response("req-turn1", P1, O1, qwen),
        # The prefix cache holds turn 1's KV up to (not including) its last answer token.
        "multi_turn_2.json": generate_response("req-turn2", P2, O2, qwen, cached_tokens=len(P1) + len(O1) - 1),
        "dense_layers.json": generate_response("req-dense", [9, 8, 7, 6], [1, 2, 3], dense0),
    }


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def spec_of(name: str) -> RoutingSpec:
    models = load("models.json")
    return RoutingSpec.from_hf_config(models[models["files"][name]])


def decode(payload, spec, p, o, **kw) -> RoutingRecord:
    return decode_routed_experts(payload, spec=spec, sample_id="s", num_prompt_tokens=p, num_output_tokens=o, **kw)


# ----------------------------------------------------------------------------------------------------------
# Fixtures in SGLang's wire format
# ----------------------------------------------------------------------------------------------------------
def test_fixture_files_match_generator():
    for name, content in fixture_set().items():
        assert load(name) == content, f"{name} is stale: run python tests/test_sglang_payload.py"
        assert (FIXTURES / name).stat().st_size < 8192


def test_single_turn_fixture():
    resp, spec = load("single_turn.json"), spec_of("single_turn.json")
    meta = resp["meta_info"]
    rec = routing_from_meta_info(meta, spec=spec)
    p, o = meta["prompt_tokens"], meta["completion_tokens"]
    assert rec.sample_id == "req-single" and (rec.num_prompt_tokens, rec.num_output_tokens) == (p, o)
    assert rec.expert_ids.shape == (p + o - 1, 4, 4) and rec.expert_ids.dtype == np.uint8
    assert rec.nbytes == (p + o - 1) * 4 * 4 and not rec.has_last_row
    # Same numbers as SGLang's documented one-liner, narrowed.
    want = np.frombuffer(base64.b64decode(meta["routed_experts"]), dtype=np.int32).reshape(-1, 4, 4)
    np.testing.assert_array_equal(rec.expert_ids, want)
    tokens = resp["output_ids"]
    assert tokens[-1] == 2  # the last output token ...
    seq_rows = route([1, 2, 3, 4, 5, 6, 7] + tokens[:-1], spec)  # ... has no row
    np.testing.assert_array_equal(rec.expert_ids, seq_rows)
    ids64 = rec.to_int64()
    assert ids64.dtype == torch.int64 and torch.equal(ids64, torch.from_numpy(want.astype(np.int64)))
    layers = rec.per_layer_int64()
    assert len(layers) == 4 and all(t.shape == (p + o - 1, 4) and t.is_contiguous() for t in layers)
    assert torch.equal(layers[2], ids64[:, 2])


def test_multi_turn_prefix_rows_equal_first_turn():
    spec = spec_of("multi_turn_1.json")
    m1, m2 = load("multi_turn_1.json")["meta_info"], load("multi_turn_2.json")["meta_info"]
    r1, r2 = routing_from_meta_info(m1, spec=spec), routing_from_meta_info(m2, spec=spec)
    n1 = r1.num_rows
    assert n1 == m1["prompt_tokens"] + m1["completion_tokens"] - 1
    assert r2.num_rows == m2["prompt_tokens"] + m2["completion_tokens"] - 1 > n1
    np.testing.assert_array_equal(r2.expert_ids[:n1], r1.expert_ids)  # the prefix routing turn 1 recorded
    # Turn 1's last answer token got its first real row in turn 2; it differs from turn 1's synthetic fill.
    assert not np.array_equal(r2.expert_ids[n1], r1.with_last_row().expert_ids[n1])


def test_start_len_returns_only_new_rows():
    # routed_experts_start_len = the rows already collected in turn 1: turn 2's response carries only the rest.
    spec = spec_of("multi_turn_2.json")
    full = routing_from_meta_info(load("multi_turn_2.json")["meta_info"], spec=spec)
    start = len(P1) + len(O1) - 1
    meta = generate_response("req-turn2", P2, O2, spec, start_len=start)["meta_info"]
    rec = routing_from_meta_info(meta, spec=spec, start_len=start)
    assert rec.first_row == start and rec.num_rows == full.num_rows - start
    np.testing.assert_array_equal(rec.expert_ids, full.expert_ids[start:])
    assert rec.with_last_row().expert_ids.shape[0] == len(P2) + len(O2) - start
    # A forgotten start_len is caught by the row count.
    with pytest.raises(RoutingPayloadError, match=rf"expected {full.num_rows} rows .* = {rec.num_rows} rows"):
        routing_from_meta_info(meta, spec=spec)


def test_dense_layers_dropped():
    resp, spec = load("dense_layers.json"), spec_of("dense_layers.json")
    assert spec.moe_layers == (1, 2, 3) and spec.num_hidden_layers == 4
    meta = resp["meta_info"]
    raw = np.frombuffer(base64.b64decode(meta["routed_experts"]), dtype=np.int32).reshape(-1, 4, 4)
    assert (raw[:, 0] == 0).all()  # SGLang's zero-filled slots of the dense layer
    rec = routing_from_meta_info(meta, spec=spec)
    assert rec.moe_layers == (1, 2, 3) and rec.expert_ids.shape == (raw.shape[0], 3, 4)
    np.testing.assert_array_equal(rec.expert_ids, raw[:, 1:])


# ----------------------------------------------------------------------------------------------------------
# RoutingSpec, compact dtype, strided fill, record
# ----------------------------------------------------------------------------------------------------------
def test_spec_from_hf_configs():
    s = RoutingSpec.from_hf_config(QWEN3_30B_A3B)
    assert (s.num_hidden_layers, s.moe_layers, s.top_k, s.num_experts) == (48, tuple(range(48)), 8, 128)
    assert s.all_moe and s.dtype == np.uint8
    s = RoutingSpec.from_hf_config(dict(QWEN_TINY, num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert s.moe_layers == (1, 5)
    s = RoutingSpec.from_hf_config({"model_type": "mixtral", "num_hidden_layers": 3, "num_local_experts": 300,
                                     "num_experts_per_tok": 2})
    assert s.moe_layers == (0, 1, 2) and s.dtype == np.int16


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_hidden_layers=0, moe_layers=(0,), top_k=1, num_experts=2), "num_hidden_layers"),
    (dict(num_hidden_layers=2, moe_layers=(), top_k=1, num_experts=2), "moe_layers"),
    (dict(num_hidden_layers=2, moe_layers=(1, 0), top_k=1, num_experts=2), "moe_layers"),
    (dict(num_hidden_layers=2, moe_layers=(2,), top_k=1, num_experts=2), "moe_layers"),
    (dict(num_hidden_layers=2, moe_layers=[0], top_k=1, num_experts=2), "moe_layers"),
    (dict(num_hidden_layers=2, moe_layers=(0,), top_k=3, num_experts=2), "top_k"),
    (dict(num_hidden_layers=2, moe_layers=(0,), top_k=0, num_experts=2), "top_k"),
    (dict(num_hidden_layers=2, moe_layers=(0,), top_k=1, num_experts=32769), "num_experts"),
    (dict(num_hidden_layers=2, moe_layers=(0,), top_k=1, num_experts=True), "num_experts"),
])
def test_spec_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: expected .* got"):
        RoutingSpec(**kwargs)


def test_spec_from_hf_config_errors():
    with pytest.raises(ValueError, match="top_k: expected an int >= 1, got 0"):
        RoutingSpec.from_hf_config({"model_type": "qwen3_moe", "num_hidden_layers": 2, "num_experts": 4})
    # only what hf/ can load: a DeepSeek-V3 config has no family
    with pytest.raises(ValueError, match=r"model_type: expected one of the registered model families \['mixtral', "
                                         r"'qwen3_moe'\], got 'deepseek_v3'"):
        RoutingSpec.from_hf_config({"model_type": "deepseek_v3", "num_hidden_layers": 2, "n_routed_experts": 4,
                                    "num_experts_per_tok": 2})


def test_compact_dtype_boundaries():
    assert compact_dtype(1) == np.uint8 and compact_dtype(256) == np.uint8
    assert compact_dtype(257) == np.int16 and compact_dtype(32768) == np.int16
    for bad in (0, 32769, 2.0):
        with pytest.raises(ValueError, match="num_experts"):
            compact_dtype(bad)


def test_int16_record_for_many_experts():
    spec = RoutingSpec(num_hidden_layers=2, moe_layers=(0, 1), top_k=3, num_experts=32768)
    ids = np.array([[[0, 32767, 256], [255, 1, 32766]]] * 4, dtype=np.int32)  # [4, 2, 3]
    rec = decode(b64(ids), spec, 3, 2)
    assert rec.expert_ids.dtype == np.int16 and rec.nbytes == ids.size * 2
    np.testing.assert_array_equal(rec.to_int64().numpy(), ids)


def test_strided_fill_formula_and_balance():
    n, num_layers, k, e, off = 37, 3, 8, 24, 5
    fill = strided_fill(n, num_layers, k, e, offset=off)
    assert fill.shape == (n, num_layers, k) and fill.dtype == np.uint8
    r, slot = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
    np.testing.assert_array_equal(fill[:, 1], ((off + r) * k + slot) % e)
    assert all(len(set(row)) == k for row in fill[:, 0].tolist())  # distinct within a token, like a router
    counts = np.bincount(fill[:, 0].ravel(), minlength=e)
    assert counts.max() - counts.min() <= 1  # spread over every expert (a constant id would put 37 on one)
    assert strided_fill(2, 1, 2, 300).dtype == np.int16 and strided_fill(0, 1, 1, 2).shape == (0, 1, 1)
    with pytest.raises(ValueError, match="top_k"):
        strided_fill(1, 1, 5, 4)
    with pytest.raises(ValueError, match="offset"):
        strided_fill(1, 1, 1, 4, offset=-1)


def test_with_last_row_appends_strided_row():
    spec = spec_of("single_turn.json")
    rec = routing_from_meta_info(load("single_turn.json")["meta_info"], spec=spec)
    full = rec.with_last_row()
    assert full.has_last_row and full.num_rows == rec.num_prompt_tokens + rec.num_output_tokens
    np.testing.assert_array_equal(full.expert_ids[:-1], rec.expert_ids)
    np.testing.assert_array_equal(full.expert_ids[-1:], strided_fill(1, 4, 4, 16, offset=rec.num_rows))
    assert full.with_last_row() is full and full.to_int64().shape == (full.num_rows, 4, 4)


def test_record_is_read_only_and_validated():
    rec = decode(b64(strided_fill(4, 2, 2, 8)), RoutingSpec(2, (0, 1), 2, 8), 3, 2)
    with pytest.raises(ValueError, match="read-only"):
        rec.expert_ids[0, 0, 0] = 1
    ok = dict(sample_id=0, num_prompt_tokens=3, num_output_tokens=2, moe_layers=(0, 1), num_experts=8)
    with pytest.raises(ValueError, match="expert_ids: expected a 3-d numpy array"):
        RoutingRecord(expert_ids=np.zeros((4, 2, 2), np.int32), **ok)
    with pytest.raises(ValueError, match="expected 4 rows"):
        RoutingRecord(expert_ids=np.zeros((5, 2, 2), np.uint8), **ok)
    with pytest.raises(ValueError, match="MoE layers"):
        RoutingRecord(expert_ids=np.zeros((4, 3, 2), np.uint8), **ok)


# ----------------------------------------------------------------------------------------------------------
# Errors: each names the sample and what was expected
# ----------------------------------------------------------------------------------------------------------
SPEC = RoutingSpec(num_hidden_layers=3, moe_layers=(0, 2), top_k=2, num_experts=8)  # layer 1 dense


def valid_ids(rows=4) -> np.ndarray:
    ids = np.zeros((rows, 3, 2), np.int32)
    ids[:, [0, 2]] = strided_fill(rows, 2, 2, 8)
    return ids


def bad(ids_fn) -> str:
    ids = valid_ids()
    ids_fn(ids)
    return b64(ids)


@pytest.mark.parametrize("payload, pattern", [
    (b64(valid_ids())[:-1] + "*", "expected base64"),
    (b64(valid_ids())[:-4] + "QUJ", "expected padded base64"),
    ("QUJD====", "at most 2 trailing|expected base64"),  # stdlib accepts the bytes, pybase64 does not
    (b64(valid_ids())[:-2] + "=A", "expected base64"),
    (b64(valid_ids()).encode() + b"\n" * 4, "expected base64"),
    ("QUJDé" + "===", "expected base64"),
    (base64.b64encode(b"x" * 97).decode(), "whole number of int32 ids, got 97 bytes"),
    (b64(valid_ids(5)), r"expected 4 rows \(P=3 \+ O=2 - 1 - start_len=0\) .* got 30 ids = 5 rows"),
    (b64(valid_ids(4).ravel()[:20]), r"got 20 ids = 3 rows \+ 2 ids"),
    (bad(lambda a: a.__setitem__((2, 2, 1), 8)), r"\[0, 8\), got 8 at layer 2, row 2 \(token position\), slot 1"),
    (bad(lambda a: a.__setitem__((1, 0, 0), -1)), r"got -1 at layer 0, row 1 \(token position\), slot 0"),
    (bad(lambda a: a.__setitem__((3, 2), [5, 5])), r"distinct expert ids .* got \[5, 5\] at layer 2, row 3"),
    (12345, "expected a base64 str or bytes, got int"),
    (["QUJD"], "expected a base64 str or bytes, got list"),
])
def test_malformed_payload_errors(payload, pattern):
    with pytest.raises(RoutingPayloadError, match=pattern) as info:
        decode_routed_experts(payload, spec=SPEC, sample_id="rollout-7", num_prompt_tokens=3, num_output_tokens=2)
    assert "sample 'rollout-7'" in str(info.value) and info.value.sample_id == "rollout-7"


def test_excess_padding_rejected_on_stdlib_path():
    payload = b64(valid_ids())
    assert payload.endswith("=") is False and base64.b64decode(payload + "====", validate=True)  # stdlib: fine
    with pytest.raises(RoutingPayloadError, match="at most 2 trailing '='"):
        decode(payload + "====", SPEC, 3, 2, backend="stdlib")


@pytest.mark.parametrize("chunk", [1, 3, 1 << 16])
def test_duplicate_located_across_distinctness_chunks(monkeypatch, chunk):
    monkeypatch.setattr(sglang_payload, "_DISTINCT_CHUNK", chunk)
    ids = np.zeros((9, 3, 2), np.int32)
    ids[:, [0, 2]] = strided_fill(9, 2, 2, 8)
    decode(b64(ids), SPEC, 6, 4)  # valid at every chunk size
    ids[7, 2] = [3, 3]
    with pytest.raises(RoutingPayloadError, match=r"got \[3, 3\] at layer 2, row 7 "):
        decode(b64(ids), SPEC, 6, 4)


def test_dense_layer_content_is_ignored():
    ids = valid_ids()
    ids[:, 1] = [-5, 99]  # garbage in the dense layer's slots: never read
    rec = decode(b64(ids), SPEC, 3, 2)
    np.testing.assert_array_equal(rec.expert_ids, valid_ids()[:, [0, 2]])


def test_meta_info_errors_and_overrides():
    meta = {"id": "r1", "prompt_tokens": 3, "completion_tokens": 2, "routed_experts": b64(valid_ids())}
    with pytest.raises(RoutingPayloadError, match=r"sample 'r1'.*--enable-return-routed-experts"):
        routing_from_meta_info({k: v for k, v in meta.items() if k != "routed_experts"}, spec=SPEC)
    with pytest.raises(RoutingPayloadError, match="meta_info\\['completion_tokens'\\]"):
        routing_from_meta_info({k: v for k, v in meta.items() if k != "completion_tokens"}, spec=SPEC)
    with pytest.raises(RoutingPayloadError, match="num_prompt_tokens: expected an int >= 1"):
        routing_from_meta_info(dict(meta, prompt_tokens="3"), spec=SPEC)
    with pytest.raises(RoutingPayloadError, match="meta_info: expected a mapping"):
        routing_from_meta_info(None, spec=SPEC, sample_id=5)
    with pytest.raises(RoutingPayloadError, match="wire dtype"):
        routing_from_meta_info(dict(meta, routed_experts_dtype="float32"), spec=SPEC)
    rec = routing_from_meta_info(meta, spec=SPEC, sample_id=("batch", 3), num_output_tokens=2)
    assert rec.sample_id == ("batch", 3)
    # Optional narrower wire dtype advertised by the sender (proposed upstream): honoured when present.
    narrow = dict(meta, routed_experts=base64.b64encode(valid_ids().astype(np.uint8).tobytes()).decode(),
                  routed_experts_dtype="uint8")
    np.testing.assert_array_equal(routing_from_meta_info(narrow, spec=SPEC).expert_ids, rec.expert_ids)


# ----------------------------------------------------------------------------------------------------------
# Base64 paths: pybase64 when installed (what SGLang uses), stdlib otherwise
# ----------------------------------------------------------------------------------------------------------
def test_backend_selection_with_fake_pybase64(monkeypatch):
    calls = []

    def fake_b64decode(data, validate=False):
        calls.append(validate)
        return base64.b64decode(data, validate=validate)

    monkeypatch.setattr(sglang_payload, "_load_pybase64", lambda: types.SimpleNamespace(b64decode=fake_b64decode))
    assert sglang_payload.b64_backend() == "pybase64"
    rec = decode(b64(valid_ids()), SPEC, 3, 2)
    assert calls == [True]  # strict decoding on the pybase64 path too
    np.testing.assert_array_equal(rec.expert_ids, valid_ids()[:, [0, 2]])
    decode(b64(valid_ids()), SPEC, 3, 2, backend="stdlib")
    assert calls == [True]

    monkeypatch.setattr(sglang_payload, "_load_pybase64", lambda: None)
    assert sglang_payload.b64_backend() == "stdlib"
    with pytest.raises(ValueError, match="pybase64 package is not installed"):
        decode(b64(valid_ids()), SPEC, 3, 2, backend="pybase64")
    with pytest.raises(ValueError, match="backend"):
        decode(b64(valid_ids()), SPEC, 3, 2, backend="fast")


def test_real_pybase64_matches_stdlib():
    pytest.importorskip("pybase64")
    payload = load("multi_turn_2.json")["meta_info"]["routed_experts"]
    spec = spec_of("multi_turn_2.json")
    a, b = (decode(payload, spec, 14, 4, backend=be) for be in ("pybase64", "stdlib"))
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    for broken in (payload[:-1] + "!", payload[:-4] + "A===", payload[:8] + "\n" + payload[9:]):
        for be in ("pybase64", "stdlib"):
            with pytest.raises(RoutingPayloadError):
                decode(broken, spec, 14, 4, backend=be)


def test_matches_sglang_own_helper():
    """SGLang's ``extract_routed_experts_from_meta_info`` (``sglang/srt/state_capturer/routed_experts.py`` since
    it moved from ``srt/layers/moe/routed_experts_capturer.py``), taken from the installed release's source:
    importing the module needs CUDA-side packages (see tests/test_sglang_contract.py)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("sglang")
    if spec is None:
        pytest.skip("sglang is not installed (ci/setup.sh installs it with --no-deps)")
    pybase64 = pytest.importorskip("pybase64")
    path = Path(spec.submodule_search_locations[0]) / "srt/state_capturer/routed_experts.py"
    fn = next(n for n in ast.parse(path.read_text()).body
              if isinstance(n, ast.FunctionDef) and n.name == "extract_routed_experts_from_meta_info")
    ns = {"np": np, "pybase64": pybase64}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), ns)
    resp, spec = load("single_turn.json"), spec_of("single_turn.json")
    flat = ns["extract_routed_experts_from_meta_info"](resp)
    rec = routing_from_meta_info(resp["meta_info"], spec=spec)
    np.testing.assert_array_equal(rec.expert_ids, np.asarray(flat).reshape(-1, 4, 4))


# ----------------------------------------------------------------------------------------------------------
# Fuzzing: any payload gives a valid record or RoutingPayloadError, on every base64 path
# ----------------------------------------------------------------------------------------------------------
def _backends() -> list[str]:
    return ["stdlib"] + (["pybase64"] if sglang_payload._load_pybase64() is not None else [])


def _outcome(payload, backend, p=3, o=2):
    try:
        rec = decode(payload, SPEC, p, o, backend=backend)
    except RoutingPayloadError:
        return None
    assert rec.expert_ids.shape == (p + o - 1, 2, 2) and rec.expert_ids.dtype == np.uint8
    assert rec.expert_ids.size == 0 or int(rec.expert_ids.max()) < 8
    assert (rec.expert_ids[..., 0] != rec.expert_ids[..., 1]).all()
    return rec.expert_ids


def _check_all_backends(payload, p=3, o=2):
    results = [_outcome(payload, be, p, o) for be in _backends()]
    for r in results[1:]:  # the paths agree: both reject, or both decode to the same ids
        assert (r is None) == (results[0] is None)
        if r is not None:
            np.testing.assert_array_equal(r, results[0])


VALID = b64(valid_ids())
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.one_of(st.binary(max_size=80), st.text(max_size=80),
                 st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", max_size=80),
                 st.integers(), st.none(), st.lists(st.integers(), max_size=3)))
def test_fuzz_random_payloads(payload):
    _check_all_backends(payload)


@FUZZ
@given(st.integers(0, len(VALID)), st.integers(0, len(VALID)), st.integers(1, 4), st.integers(0, 4))
def test_fuzz_truncations_and_token_counts(start, stop, p, o):
    _check_all_backends(VALID[start:stop], p, o)
    _check_all_backends(VALID.encode()[:stop], p, o)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 7)), min_size=1, max_size=4),
       st.booleans())
def test_fuzz_bit_flips(flips, in_raw):
    if in_raw:  # flip bits of the decoded ids (valid base64 of wrong / right values)
        raw = bytearray(base64.b64decode(VALID))
        for pos, bit in flips:
            raw[pos % len(raw)] ^= 1 << bit
        payload = base64.b64encode(bytes(raw))
    else:  # flip bits of the base64 text itself
        payload = bytearray(VALID.encode())
        for pos, bit in flips:
            payload[pos] ^= 1 << bit
        payload = bytes(payload)
    _check_all_backends(payload)


if __name__ == "__main__":
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name, content in fixture_set().items():
        (FIXTURES / name).write_text(json.dumps(content, indent=1) + "\n")
        print(f"wrote {FIXTURES / name}")
