"""SGLang resilience (issue 13): waiting for a restarting server with a deadline, re-syncing the weights it
lost, one summary line per batch instead of a line per attempt, the fake server's backlog and entry point,
and the CLI flags that reach the client."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vespo_megatron.rollout.engine import EngineError, Generation, GenerationRequest
from vespo_megatron.rollout.sglang.client import SGLangClient, SGLangClientConfig
from vespo_megatron.rollout.sglang.engine import SGLangEngine
from vespo_megatron.rollout.sglang.weight_sync import WeightSyncConfig, make_weight_sync
from vespo_megatron.testing import FakeSGLangServer, hash_policy

ROOT = Path(__file__).resolve().parents[1]
LOGGER = "vespo_megatron.rollout.sglang"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _requests(n: int, tag: str = "s") -> list[GenerationRequest]:
    return [GenerationRequest(sample_id=f"{tag}{i}", prompt_ids=(1, 2, 3 + i), max_new_tokens=4) for i in range(n)]


class _Policy:
    """A PolicyWeights stand-in for the disk weight sync: write_hf makes the directory the server 'loads'."""

    model = None

    def hf_tensors(self, dst: int = 0):
        return iter(())

    def write_hf(self, path: str) -> str:
        os.makedirs(path, exist_ok=True)
        return path


def _engine(url: str, tmp_path, *, wait_s: float = 30.0, **client_kw) -> SGLangEngine:
    client = SGLangClient(SGLangClientConfig(base_url=url, backoff_s=0.05, max_backoff_s=0.2, **client_kw))
    sync = make_weight_sync(WeightSyncConfig(), client, root=str(tmp_path / "weights"))
    return SGLangEngine(client, sync, sender=True, wait_for_server_s=wait_s)


def _attempt_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "attempt" in r.getMessage()]


# ---------------------------------------------------------------------------------------------- one line per batch

def test_retries_in_a_batch_give_one_summary_line(caplog):
    with FakeSGLangServer() as server:
        client = SGLangClient(SGLangClientConfig(base_url=server.url, backoff_s=0.01, max_backoff_s=0.02))
        client.check_server()
        # One failure for each of five distinct prompts: a plain fail_next(5) can hit the retry of a sample
        # whose first attempt already failed (the requests run concurrently), which makes the count racy.
        for i in range(5):
            server.fail_next(1, 503, match=lambda req, p=(1, 2, 3 + i): tuple(req.input_ids) == p)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger=LOGGER):
            results = client.generate_results(_requests(16))
    assert all(isinstance(r, Generation) for r in results)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "5 of 16 requests needed retries (HTTP 503 \u00d75); 0 failed" in warnings[0]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "attempt 1/4" in r.getMessage()]
    assert len(debug) == 5  # the per-sample detail is still there, at DEBUG


def test_dead_server_mid_batch_one_line_not_one_per_sample(caplog):
    port = _free_port()
    client = SGLangClient(SGLangClientConfig(base_url=f"http://127.0.0.1:{port}", backoff_s=0.01,
                                             max_backoff_s=0.02, max_concurrency=8))
    client._server_info = {}  # as if check_server had run before the server died
    with caplog.at_level(logging.INFO, logger=LOGGER), pytest.raises(EngineError, match="failed after 4 attempts"):
        client.generate_results(_requests(64))
    time.sleep(0.2)  # the requests still on the wire stop at their next retry
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not _attempt_lines(caplog)
    assert len(warnings) == 1, warnings
    assert "/generate batch failed" in warnings[0] and "connection refused" in warnings[0]


# ---------------------------------------------------------------------------------------------- the fake server

def test_fake_server_backlog_serves_many_concurrent_requests_without_resets(caplog):
    with FakeSGLangServer() as server:
        assert server._httpd.request_queue_size >= 1024
        client = SGLangClient(SGLangClientConfig(base_url=server.url, max_concurrency=128, backoff_s=0.01,
                                                 max_backoff_s=0.02))
        client.check_server()
        with caplog.at_level(logging.DEBUG, logger=LOGGER):
            for _ in range(3):
                results = client.generate_results(_requests(128))
                assert all(isinstance(r, Generation) for r in results)
    assert not [r for r in caplog.records if "attempt" in r.getMessage() or "retries" in r.getMessage()]


def test_fake_server_entry_point_serves_until_sigterm():
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "vespo_megatron.testing.fake_sglang", "--port", str(port),
                             "--vocab-size", "64"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line
        client = SGLangClient(SGLangClientConfig(base_url=f"http://127.0.0.1:{port}"))
        client.check_server()
        gens = client.generate(_requests(4))
        assert all(t < 64 for g in gens for t in g.output_ids)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "RuntimeWarning" not in err


# ---------------------------------------------------------------------------------------------- waiting, re-sync

def test_unreachable_server_deadline_is_one_clear_error(tmp_path, caplog):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with FakeSGLangServer(port=port) as server:
        engine = _engine(url, tmp_path, wait_s=1.0)
        engine.sync_weights(_Policy(), 0)
        assert server.weight_version == "0"
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger=LOGGER), pytest.raises(EngineError) as info:
        engine.generate(_requests(64), seed=0)
    assert time.monotonic() - t0 < 10
    msg = str(info.value)
    assert f"SGLang server at {url} unreachable for 1 s (last error: connection" in msg
    assert "restart it or raise --sglang-wait-for-server-s" in msg and "\n" not in msg
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "waiting up to 1 s" in warnings[0]  # no per-sample lines


def test_restarted_server_is_waited_for_and_gets_the_weights_back(tmp_path, caplog):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    first = FakeSGLangServer(hash_policy(vocab_size=64), port=port)
    first.start()
    engine = _engine(url, tmp_path)
    policy = _Policy()
    engine.sync_weights(policy, 0)
    engine.generate(_requests(8, "a"), seed=0)
    engine.sync_weights(policy, 1)
    first.stop()  # dies between steps, comes back 1.5 s later on the same port with default weights
    second = FakeSGLangServer(hash_policy(vocab_size=64), port=port)
    threading.Timer(1.5, second.start).start()
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            results = engine.generate(_requests(8, "b"), seed=0)
        assert all(isinstance(r, Generation) and r.weight_version == 1 for r in results)
        assert len(second.weight_loads) == 1 and second.weight_version == "1"  # re-synced before generating
        assert second.weight_loads[0]["model_path"].endswith("v0000001")
        assert [p for p, _ in second.requests].index("/update_weights_from_disk") < \
            [p for p, _ in second.requests].index("/generate")
    finally:
        second.stop()
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "unreachable" in text and "is back after" in text and "re-syncing the policy (weight version 1)" in text


def test_server_restarted_between_steps_is_detected_by_its_weight_tag(tmp_path):
    port = _free_port()
    first = FakeSGLangServer(port=port)
    first.start()
    engine = _engine(f"http://127.0.0.1:{port}", tmp_path)
    engine.sync_weights(_Policy(), 3)
    first.stop()
    with FakeSGLangServer(port=port) as second:  # back before the next step: never seen unreachable
        results = engine.generate(_requests(4), seed=0)
        assert second.weight_version == "3" and len(second.weight_loads) == 1
    assert all(r.weight_version == 3 for r in results)


def test_sync_weights_waits_for_a_restarting_server(tmp_path):
    port = _free_port()
    engine = _engine(f"http://127.0.0.1:{port}", tmp_path)
    server = FakeSGLangServer(port=port)
    threading.Timer(1.0, server.start).start()
    try:
        engine.sync_weights(_Policy(), 2)
        assert server.weight_version == "2"
    finally:
        time.sleep(0.1)
        server.stop()


# ---------------------------------------------------------------------------------------------- the CLI flags

def test_cli_flags_reach_the_client(tmp_path):
    from vespo_megatron.rollout.factory import EngineContext, build_engine
    from vespo_megatron.rollout.replica import Replica
    from vespo_megatron.training import cli as train_cli

    with FakeSGLangServer() as server:
        cfg = train_cli.config_from_argv([
            "--rollout-engine", "sglang", "--sglang-url", server.url, "--sglang-max-retries", "9",
            "--sglang-timeout-s", "12.5", "--sglang-backoff-s", "0.25", "--sglang-max-backoff-s", "7",
            "--sglang-wait-for-server-s", "42", "--sglang-max-concurrency", "5", "--out-dir", str(tmp_path)])
        ctx = EngineContext(model=None, groups=None, replica=Replica(group=None, source=0, rank=0), vocab_size=64,
                            eos_id=0, num_layers=2, moe_layers=(1, 2), num_experts=4, top_k=2, record_routing=False,
                            out_dir=str(tmp_path))
        engine = build_engine(cfg.rollout, ctx)
    c = engine.inner.client.config
    assert (c.max_retries, c.timeout_s, c.backoff_s, c.max_backoff_s, c.max_concurrency) == (9, 12.5, 0.25, 7, 5)
    assert engine.inner._wait_s == 42


# ---------------------------------------------------------------------------------------------- train against it

_TRAIN = ["--hidden-size", "32", "--prompts-per-step", "4", "--group-size", "4", "--micro-batch-size", "4",
          "--sft-steps", "0", "--rollout-engine", "sglang", "--threads", "1", "--sglang-backoff-s", "0.2",
          "--sglang-max-backoff-s", "1"]


def _start_fake(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "vespo_megatron.testing.fake_sglang", "--port", str(port),
                             "--vocab-size", "64", "--num-hidden-layers", "2", "--top-k", "2", "--num-experts", "4",
                             "--log-requests"], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert "listening" in proc.stdout.readline()
    return proc


def _vespo_train(args: list[str]) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("vespo-train")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "vespo_megatron.training.cli"]
    return subprocess.Popen(cmd + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))


def _records(out_dir: Path) -> list[dict]:
    import json

    files = list(out_dir.rglob("*.jsonl"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]


def _kill_after_generates(proc: subprocess.Popen, n: int) -> None:
    """SIGKILL the fake server once it has answered `n` /generate requests (one step's generation)."""
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("POST /generate 200")
        if seen >= n:
            proc.kill()
            return


@pytest.mark.megatron
def test_train_against_the_fake_server_as_documented(tmp_path):
    port = _free_port()
    server = _start_fake(port)
    try:
        train = _vespo_train([*_TRAIN, "--steps", "2", "--sglang-url", f"http://127.0.0.1:{port}",
                              "--out-dir", str(tmp_path)])
        out, err = train.communicate(timeout=300)
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert train.returncode == 0, err[-3000:]
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [0, 1]
    assert "attempt" not in err and "needed retries" not in err


@pytest.mark.megatron
def test_server_killed_and_restarted_mid_run(tmp_path):
    port = _free_port()
    server = _start_fake(port)
    killer = threading.Thread(target=_kill_after_generates, args=(server, 16), daemon=True)
    killer.start()
    train = _vespo_train([*_TRAIN, "--steps", "3", "--sglang-url", f"http://127.0.0.1:{port}",
                          "--sglang-wait-for-server-s", "120", "--out-dir", str(tmp_path)])
    killer.join(timeout=240)
    assert server.wait(timeout=10) != 0  # killed after step 0's generation
    time.sleep(2.0)
    server = _start_fake(port)  # the same port, fresh weights
    try:
        out, err = train.communicate(timeout=300)
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert train.returncode == 0, err[-3000:]
    assert [r["step"] for r in _records(tmp_path)] == [0, 1, 2]
    assert "is unreachable" in err and "is back after" in err
    assert "attempt" not in err


@pytest.mark.megatron
def test_server_that_never_comes_back_ends_with_one_line(tmp_path):
    port = _free_port()
    server = _start_fake(port)
    killer = threading.Thread(target=_kill_after_generates, args=(server, 16), daemon=True)
    killer.start()
    train = _vespo_train([*_TRAIN, "--steps", "3", "--sglang-url", f"http://127.0.0.1:{port}",
                          "--sglang-wait-for-server-s", "1", "--out-dir", str(tmp_path)])
    out, err = train.communicate(timeout=300)
    assert train.returncode == 1
    assert f"SGLang server at http://127.0.0.1:{port} unreachable for 1 s (last error: connection" in err
    assert "restart it or raise --sglang-wait-for-server-s" in err
    assert "Traceback" not in err and "attempt" not in err
