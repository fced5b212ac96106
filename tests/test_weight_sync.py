"""Streamed, versioned weight sync (``weight_sync.py``) against the fake SGLang server.

The fake server joins the update group by SGLang's own steps (rendezvous, ``PrefixStore(group_name)``,
``_new_process_group_helper``) in this process; the trainer side runs in another process (torch allows one
group per name per process) and opens the group its own way, so the end-to-end tests check that the two
meet. What they pin: bitwise-equal tensors of several dtypes and shapes over several buckets, the version
visible through ``/get_weight_version`` and on later generations, one flush, the per-bucket request bodies,
and the error paths (a server refusing a bucket before receiving it, or failing to load it after).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import socket
import time
import traceback
import urllib.request
import uuid

import pytest
import torch
from dist_harness import START_METHOD
from hypothesis import given, settings
from hypothesis import strategies as st

from vespo_megatron.rollout.engine import EngineError, GenerationRequest
from vespo_megatron.rollout.sglang.client import SGLangClient, SGLangClientConfig
from vespo_megatron.rollout.sglang.weight_sync import (
    DistributedWeightSender,
    WeightSyncConfig,
    bucketize,
    dtype_name,
)
from vespo_megatron.testing import FakeSGLangServer

BUCKET_BYTES = 4096

# name, shape, dtype; with 4096-byte buckets: [embed, layernorm, q_proj] [experts: 8192 B, alone]
# [bias (0-dim), norm] [lm_head: exactly one bucket]
SPECS = [
    ("model.embed_tokens.weight", (64, 16), torch.bfloat16),
    ("model.layers.0.input_layernorm.weight", (16,), torch.float32),
    ("model.layers.0.self_attn.q_proj.weight", (32, 16), torch.bfloat16),
    ("model.layers.0.mlp.experts.w", (4, 32, 16), torch.float32),
    ("model.layers.0.mlp.gate.e_score_correction_bias", (), torch.float32),
    ("model.norm.weight", (16,), torch.bfloat16),
    ("lm_head.weight", (64, 16), torch.float32),
]
EXPECTED_BUCKETS = [SPECS[0:3], SPECS[3:4], SPECS[4:6], SPECS[6:7]]


def make_tensors(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(name, torch.randn(shape, generator=g).to(dtype)) for name, shape, dtype in SPECS]


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- trainer side (own process)


def _sync_config(port: int, group_name: str, backend: str) -> WeightSyncConfig:
    return WeightSyncConfig(mode="distributed", bucket_bytes=BUCKET_BYTES, master_port=port,
                            group_name=group_name, backend=backend, init_timeout_s=30.0,
                            bucket_timeout_s=30.0)


def _scenario_sync(engine: SGLangClient, cfg: WeightSyncConfig) -> dict:
    with DistributedWeightSender(engine, cfg) as sender:
        stats = sender.send(iter(make_tensors(0)), version=7)  # an iterator, as the HF converter yields
        gen = engine.generate([GenerationRequest(sample_id="after", prompt_ids=(1, 2, 3), max_new_tokens=4)])
    return {"stats": stats, "engine_version": engine.weight_version, "gen_version": gen[0].weight_version}


def _scenario_refused(engine: SGLangClient, cfg: WeightSyncConfig) -> dict:
    # 1. the server refuses to join: open() fails at once, not after init_timeout_s
    start = time.monotonic()
    with pytest.raises(EngineError) as join:
        DistributedWeightSender(engine, cfg).open()
    join_s = time.monotonic() - start
    # 2. it joins, then refuses the first bucket before receiving it
    cfg = dataclasses.replace(cfg, master_port=0, group_name=cfg.group_name + "-2")
    with DistributedWeightSender(engine, cfg) as sender:
        start = time.monotonic()
        with pytest.raises(EngineError) as first:
            sender.send(make_tensors(0), version=7)
        bucket_s = time.monotonic() - start
        with pytest.raises(EngineError) as again:
            sender.send(make_tensors(0), version=7)
    return {"join": str(join.value), "join_s": join_s, "first": str(first.value), "bucket_s": bucket_s,
            "again": str(again.value), "engine_version": engine.weight_version}


def _scenario_load_error(engine: SGLangClient, cfg: WeightSyncConfig) -> dict:
    with DistributedWeightSender(engine, cfg) as sender:
        with pytest.raises(EngineError) as bad:
            sender.send(make_tensors(0), version=7)  # the server has lm_head with another shape
        stats = sender.send([(n, t) for n, t in make_tensors(1) if n != "lm_head.weight"], version=8)
    return {"bad": str(bad.value), "stats": stats, "engine_version": engine.weight_version}


def _scenario_two_syncs(engine: SGLangClient, cfg: WeightSyncConfig) -> dict:
    with DistributedWeightSender(engine, cfg) as sender:
        sender.send(make_tensors(0), version=5)
        stats = sender.send(make_tensors(1), version=6)
    return {"stats": stats, "engine_version": engine.weight_version}


SCENARIOS = {"two_syncs": _scenario_two_syncs, "sync": _scenario_sync, "refused": _scenario_refused, "load_error": _scenario_load_error}


def _trainer(url: str, scenario: str, port: int, group_name: str, backend: str, with_default_group: bool,
             out) -> None:
    try:
        torch.set_num_threads(1)
        extra = {}
        if backend == "nccl":  # the trainer on cuda:0, the fake server on cuda:1
            torch.cuda.set_device(0)
            extra = {"device_id": torch.device("cuda", 0)}  # bound: the helper would split from this group
        if with_default_group:  # the trainer's own world (of one here): the update group must not need it
            torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                                 rank=0, world_size=1, **extra)
        engine = SGLangClient(SGLangClientConfig(base_url=url, timeout_s=10.0, max_retries=0))
        engine.check_server()  # as at trainer start: tags the server with version 0
        out.put(("ok", SCENARIOS[scenario](engine, _sync_config(port, group_name, backend))))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def run_trainer(server: FakeSGLangServer, scenario: str, *, backend: str = "gloo",
                with_default_group: bool = False) -> dict:
    ctx = mp.get_context(START_METHOD)  # a fresh process from the harness's forkserver (torch preloaded)
    out = ctx.Queue()
    proc = ctx.Process(target=_trainer, daemon=True,
                       args=(server.url, scenario, free_port(), f"test-{uuid.uuid4().hex[:8]}", backend,
                             with_default_group, out))
    proc.start()
    try:
        status, value = out.get(timeout=60)
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    assert status == "ok", value
    return value


# ---------------------------------------------------------------------------- end to end


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL sync needs two CUDA devices")


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=TWO_GPUS)])
@pytest.mark.parametrize("with_default_group", [False, True], ids=["no-default-group", "default-group"])
def test_sync_end_to_end(backend, with_default_group):
    device = "cpu" if backend == "gloo" else "cuda:1"
    with FakeSGLangServer(group_timeout_s=30.0, device=device) as server:
        result = run_trainer(server, "sync", backend=backend, with_default_group=with_default_group)

        sent = make_tensors(0)
        received = server.received_weights
        assert list(received) == [n for n, _ in sent]
        for name, tensor in sent:
            got = received[name]
            assert (got.dtype, got.shape) == (tensor.dtype, tensor.shape), name
            assert bits(got) == bits(tensor), name

        bodies = server.bodies("/update_weights_from_distributed")
        assert [b["names"] for b in bodies] == [[n for n, _, _ in bucket] for bucket in EXPECTED_BUCKETS]
        assert [b["dtypes"] for b in bodies] == [[dtype_name(d) for *_, d in b] for b in EXPECTED_BUCKETS]
        assert [b["shapes"] for b in bodies] == [[list(s) for _, s, _ in b] for b in EXPECTED_BUCKETS]
        assert [b["flush_cache"] for b in bodies] == [False, False, False, True]
        assert [b.get("weight_version") for b in bodies] == [None, None, None, "7"]
        assert all(b["group_name"] == bodies[0]["group_name"] for b in bodies)
        assert server.num_flushes == 1

        init = server.bodies("/init_weights_update_group")
        assert len(init) == 1 and init[0]["rank_offset"] == 1 and init[0]["world_size"] == 2
        assert init[0]["backend"] == backend and init[0]["group_name"] == bodies[0]["group_name"]
        assert server.bodies("/destroy_weights_update_group") == [{"group_name": bodies[0]["group_name"]}]
        assert server.weight_update_groups == []  # closed on both sides

        with urllib.request.urlopen(server.url + "/model_info", timeout=5) as resp:
            assert json.loads(resp.read())["weight_version"] == "7"
        # SGLang >= 0.5.21: the buckets ran inside one begin/end session (the fake answers 400 outside one)
        paths = [p for p, _ in server.requests if p.endswith(("_weight_update", "_from_distributed"))]
        assert paths[:6] == ["/begin_weight_update"] + ["/update_weights_from_distributed"] * 4 + [
            "/end_weight_update"], paths
        assert not server.session_open
        assert result["engine_version"] == 7 and result["gen_version"] == 7  # later generations carry it
        stats = result["stats"]
        assert (stats.version, stats.num_buckets, stats.num_tensors) == (7, 4, len(SPECS))
        assert stats.num_bytes == sum(t.numel() * t.element_size() for _, t in sent)
        assert stats.seconds > 0


@pytest.mark.distributed
def test_server_refusing_fails_fast_and_a_refused_bucket_breaks_the_group():
    with FakeSGLangServer(group_timeout_s=30.0) as server:
        server.fail_next(1, 400, path="/init_weights_update_group", message="group name taken")
        # Answers before joining the broadcast, like SGLang failing to allocate (e.g. an unknown dtype).
        server.fail_next(1, 400, path="/update_weights_from_distributed", message="cannot allocate bucket")
        result = run_trainer(server, "refused")
        assert "refused to join" in result["join"] and "group name taken" in result["join"]
        assert "cannot allocate bucket" in result["first"]
        assert result["join_s"] < 10 and result["bucket_s"] < 10  # not the 30 s timeouts
        assert "unusable" in result["again"] and "close()" in result["again"]
        assert result["engine_version"] == 0
        assert server.weight_version == "0" and server.received_weights == {} and server.num_flushes == 0
        assert server.weight_update_groups == []


@pytest.mark.distributed
def test_load_error_after_receiving_keeps_the_group():
    expected = {name: (dtype_name(dtype), shape) for name, shape, dtype in SPECS}
    expected["lm_head.weight"] = ("float32", (32, 16))
    with FakeSGLangServer(group_timeout_s=30.0, expected_weights=expected) as server:
        result = run_trainer(server, "load_error")
        # SGLang's message, with the server's reason, reaches the trainer
        assert "Failed to update parameter online" in result["bad"] and "lm_head.weight" in result["bad"]
        assert "partially updated" in result["bad"]
        # the group survived: the next sync (without the mismatched tensor) went through, tagged 8
        assert result["stats"].num_buckets == 3 and result["engine_version"] == 8
        assert server.weight_version == "8"
        for name, tensor in make_tensors(1)[:-1]:
            assert bits(server.received_weights[name]) == bits(tensor), name


# ---------------------------------------------------------------------------- bucketize


def _fake(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), max_size=30), bucket_bytes=st.integers(1, 256))
def test_bucketize_properties(sizes, bucket_bytes):
    items = [(f"t{i}", _fake(n)) for i, n in enumerate(sizes)]
    buckets = list(bucketize(iter(items), bucket_bytes))
    assert [name for b in buckets for name, _ in b] == [name for name, _ in items]  # order, nothing lost
    for i, b in enumerate(buckets):
        assert b, "no empty bucket"
        total = sum(t.numel() for _, t in b)
        assert total <= bucket_bytes or len(b) == 1  # only a single oversized tensor exceeds the budget
        if i + 1 < len(buckets):  # greedy: the next tensor did not fit
            assert total + buckets[i + 1][0][1].numel() > bucket_bytes


def test_bucketize_oversized_tensor_goes_alone_and_dtypes_count_bytes():
    items = [("a", torch.zeros(10, dtype=torch.float32)), ("big", torch.zeros(100, dtype=torch.bfloat16)),
             ("b", torch.zeros(5, dtype=torch.bfloat16)), ("c", torch.zeros(10, dtype=torch.float32))]
    assert [[n for n, _ in b] for b in bucketize(items, 50)] == [["a"], ["big"], ["b", "c"]]
    assert list(bucketize([], 10)) == []


def test_bucketize_rejects_bad_items_and_sizes():
    with pytest.raises(TypeError, match=r"named_tensors\[1\]"):
        list(bucketize([("a", torch.zeros(1)), ("b", [1.0])], 100))
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(bucketize([], 0))


def test_dtype_name_is_what_sglang_resolves():
    for dtype in (torch.bfloat16, torch.float32, torch.float16, torch.float8_e4m3fn, torch.int64):
        assert getattr(torch, dtype_name(dtype)) is dtype
    assert dtype_name(torch.bfloat16) == "bfloat16"


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, field", [
    (dict(mode="nfs"), "mode"),
    (dict(backend="mpi"), "backend"),
    (dict(bucket_bytes=0), "bucket_bytes"),
    (dict(bucket_bytes=1.5), "bucket_bytes"),
    (dict(master_port=70000), "master_port"),
    (dict(master_port=-1), "master_port"),
    (dict(rank_offset=0), "rank_offset"),
    (dict(server_ranks=0), "server_ranks"),
    (dict(master_address=""), "master_address"),
    (dict(group_name=" "), "group_name"),
    (dict(init_timeout_s=0), "init_timeout_s"),
    (dict(bucket_timeout_s=float("nan")), "bucket_timeout_s"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^WeightSyncConfig\.{field}: expected .*, got "):
        WeightSyncConfig(**kwargs)


def test_config_defaults_and_sender_needs_distributed_mode():
    cfg = WeightSyncConfig()
    assert (cfg.mode, cfg.bucket_bytes, cfg.backend) == ("disk", 512 * 1024**2, "auto")
    assert cfg.resolved_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    engine = SGLangClient(SGLangClientConfig(base_url="http://127.0.0.1:9"))
    with pytest.raises(ValueError, match="config.mode: expected 'distributed'"):
        DistributedWeightSender(engine, cfg)


# ---------------------------------------------------------------------------- engine calls, no group


def test_engine_calls_are_sent_once_and_carry_the_servers_message():
    with FakeSGLangServer(sglang_version="0.5.20") as server:  # no session needed there
        engine = SGLangClient(SGLangClientConfig(base_url=server.url, timeout_s=5.0, max_retries=3,
                                                 backoff_s=0.001))
        with pytest.raises(EngineError, match="Group nope not in"):
            engine.update_weights_from_distributed(["w"], ["float32"], [[2]], group_name="nope", version=3)
        with pytest.raises(EngineError, match="backend 'nccl' on device 'cpu'"):
            engine.init_weights_update_group(master_address="127.0.0.1", master_port=free_port(),
                                              rank_offset=1, world_size=2, group_name="g", backend="nccl")
        with pytest.raises(EngineError, match="does not exist"):
            engine.destroy_weights_update_group("nope")
        server.fail_next(1, 503, path="/update_weights_from_distributed")
        with pytest.raises(EngineError, match="not retried"):
            engine.update_weights_from_distributed(["w"], ["float32"], [[2]], group_name="nope")
        assert len(server.bodies("/update_weights_from_distributed")) == 2  # one per call: no retry
        assert engine.weight_version == 0  # no failed call moved the version
        assert engine.get_weight_version() == "default"
        with pytest.raises(ValueError, match="equal non-zero lengths"):
            engine.update_weights_from_distributed(["a", "b"], ["float32"], [[1]])
    with FakeSGLangServer(sglang_version="0.5.20", has_weight_version_api=False, weight_version="3") as server:
        # no /get_weight_version and no /model_info: the tag comes from /get_model_info
        engine = SGLangClient(SGLangClientConfig(base_url=server.url, timeout_s=5.0))
        assert engine.get_weight_version() == "3"
        assert [p for p, _ in server.requests] == ["/get_weight_version", "/model_info", "/get_model_info"]
    with FakeSGLangServer(weight_version="4") as server:  # SGLang >= 0.5.21 removed /get_weight_version
        engine = SGLangClient(SGLangClientConfig(base_url=server.url, timeout_s=5.0))
        assert engine.get_weight_version() == "4"
        assert [p for p, _ in server.requests] == ["/get_weight_version", "/model_info"]


# ---------------------------------------------------------------------------- SGLang versions and guards


@pytest.mark.distributed
def test_old_server_without_sessions_is_asked_once_then_synced_without_one():
    with FakeSGLangServer(group_timeout_s=30.0, sglang_version="0.5.20") as server:
        result = run_trainer(server, "two_syncs")
        assert result["engine_version"] == 6 and server.weight_version == "6"
        assert result["stats"].num_buckets == 4
        assert len(server.bodies("/begin_weight_update")) == 1  # 404 once, remembered
        assert server.bodies("/end_weight_update") == []
        for name, tensor in make_tensors(1):
            assert bits(server.received_weights[name]) == bits(tensor), name


def test_bucket_outside_a_session_is_refused_on_new_servers_only():
    with FakeSGLangServer() as server:
        engine = SGLangClient(SGLangClientConfig(base_url=server.url, timeout_s=5.0))
        with pytest.raises(EngineError, match="must run between begin_weight_update"):
            engine.update_weights_from_distributed(["w"], ["float32"], [[2]], group_name="nope", version=3)
        with pytest.raises(EngineError, match="no weight-update session is open"):
            engine.end_weight_update()
        assert engine.begin_weight_update() is True and server.session_open
        with pytest.raises(EngineError, match="already open"):
            engine.begin_weight_update()
        with pytest.raises(EngineError, match="Group nope not in"):  # inside a session: on to the group check
            engine.update_weights_from_distributed(["w"], ["float32"], [[2]], group_name="nope", version=3)
        engine.end_weight_update()
        assert not server.session_open
        assert server.bodies("/begin_weight_update")[0] == {} and server.bodies("/end_weight_update")[-1] == {}
    with FakeSGLangServer(sglang_version="0.5.20") as server:
        engine = SGLangClient(SGLangClientConfig(base_url=server.url, timeout_s=5.0))
        assert engine.begin_weight_update() is False
        with pytest.raises(EngineError, match="HTTP 404"):
            engine.end_weight_update()


def test_data_parallel_server_is_refused_before_opening_the_group():
    with FakeSGLangServer(dp_size=2) as server:
        engine = SGLangClient(SGLangClientConfig(base_url=server.url, timeout_s=5.0, max_retries=0))
        cfg = _sync_config(free_port(), "g", "gloo")
        for config in (cfg, dataclasses.replace(cfg, server_ranks=1)):
            with pytest.raises(EngineError, match=r"dp_size=2, expected dp_size=1"):
                DistributedWeightSender(engine, config).open()
        assert server.bodies("/init_weights_update_group") == []
        with pytest.raises(EngineError, match="HTTP 500.*data-parallel replicas are not supported"):
            engine.init_weights_update_group(master_address="127.0.0.1", master_port=free_port(),
                                              rank_offset=1, world_size=2, group_name="g", backend="gloo")


def test_fake_server_version_is_validated():
    with pytest.raises(ValueError, match="sglang_version"):
        FakeSGLangServer(sglang_version="0.5")
    with pytest.raises(ValueError, match="dp_size"):
        FakeSGLangServer(dp_size=0)
