"""SGLangClient against the local fake SGLang server (real HTTP on 127.0.0.1, no GPU, no SGLang install).

What these tests pin: the request body SGLang gets, decoding of its answer (log-prob triples, finish
reasons, base64 routing), retry/backoff/no-retry rules, the feature check at start, per-sample errors
carrying the sample id, weight updates and version tags, and request order under concurrency.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from vespo_megatron.rollout.engine import EngineError, Generation, GenerationRequest, RolloutEngine
from vespo_megatron.rollout.sglang.client import (
    CacheFlushRefused,
    HTTPStatusError,
    SampleError,
    SGLangClient,
    SGLangClientConfig,
)
from vespo_megatron.rollout.sglang.engine import SGLangEngine
from vespo_megatron.routing import RoutingSpec
from vespo_megatron.testing import CORRUPTIONS, FakeOutput, FakeSGLangServer, hash_policy

SPEC = RoutingSpec(num_hidden_layers=4, moe_layers=(1, 2, 3), top_k=2, num_experts=8)


def make_engine(server: FakeSGLangServer, **overrides) -> SGLangClient:
    kwargs = dict(base_url=server.url, timeout_s=5.0, max_retries=2, backoff_s=0.001, max_backoff_s=0.004,
                  routing_spec=SPEC, seed=0)
    kwargs.update(overrides)
    return SGLangClient(SGLangClientConfig(**kwargs))


def req(i: int, **kw) -> GenerationRequest:
    kw.setdefault("max_new_tokens", 6)
    return GenerationRequest(sample_id=f"s{i}", prompt_ids=(11, 12, 13 + i), **kw)


@pytest.fixture
def server():
    with FakeSGLangServer(num_hidden_layers=4, top_k=2, num_experts=8) as s:
        yield s


def test_round_trip_logprobs_and_routing(server):
    # A policy with known outputs: tokens 5, 6, 7 and log-probs -0.5, -1.0, -1.5, then EOS (7) stops.
    routing = np.arange(5 * 4 * 2, dtype=np.int32).reshape(5, 4, 2) % 8  # [P + O - 1 = 3 + 3 - 1, L, K]

    def policy(r):
        assert r.sampling_params == {"temperature": 0.7, "max_new_tokens": 4, "stop_token_ids": [7]}
        return FakeOutput(output_ids=[5, 6, 7], logprobs=[-0.5, -1.0, -1.5], finish_reason="stop", routing=routing)

    server.policy = policy
    engine = make_engine(server)
    assert isinstance(SGLangEngine(engine, None, sender=False), RolloutEngine)  # the client behind the protocol
    [gen] = engine.generate([GenerationRequest("a", (1, 2, 3), max_new_tokens=4, temperature=0.7,
                                               return_routing=True, stop_token_ids=(7,))])
    assert gen == Generation(sample_id="a", prompt_ids=(1, 2, 3), output_ids=(5, 6, 7),
                             output_logprobs=(-0.5, -1.0, -1.5), weight_version=0, finish_reason="stop",
                             routing=gen.routing)
    np.testing.assert_array_equal(gen.routing.expert_ids, routing[:, [1, 2, 3], :])  # dense layer 0 dropped
    assert gen.routing.num_prompt_tokens == 3 and gen.routing.num_output_tokens == 3

    body = server.bodies("/generate")[-1]
    assert body["input_ids"] == [1, 2, 3] and body["return_logprob"] is True
    assert body["logprob_start_len"] == -1 and body["return_routed_experts"] is True
    assert body["rid"].startswith("a-")
    # check_server ran once, first: server info, then the weight-version tag.
    paths = [p for p, _ in server.requests]
    assert paths[:3] == ["/server_info", "/update_weight_version", "/generate"]
    assert server.weight_version == "0"


def test_routing_not_asked_is_not_sent(server):
    engine = make_engine(server)
    [gen] = engine.generate([req(0)])
    assert gen.routing is None and "return_routed_experts" not in server.bodies("/generate")[-1]
    assert gen.finish_reason == "length" and len(gen.output_ids) == 6
    assert all(math.isfinite(x) and x < 0 for x in gen.output_logprobs)


def test_fake_routing_encoding_matches_sglang_layout(server):
    """The fake's routed_experts is base64 of little-endian int32 [P + O - 1, L, K], as SGLang sends; the
    engine keeps the MoE layers of exactly those rows."""
    [gen] = make_engine(server).generate([req(0, return_routing=True)])
    body = json.dumps({"input_ids": [11, 12, 13], "sampling_params": {"max_new_tokens": 6},
                       "return_routed_experts": True}).encode()
    with urllib.request.urlopen(urllib.request.Request(server.url + "/generate", data=body)) as resp:
        meta = json.loads(resp.read())["meta_info"]
    raw = np.frombuffer(base64.b64decode(meta["routed_experts"]), dtype="<i4")
    assert raw.size == (3 + 6 - 1) * 4 * 2
    np.testing.assert_array_equal(raw.reshape(8, 4, 2)[:, 1:, :], gen.routing.expert_ids)


def test_retries_then_success_after_503s(server):
    server.fail_next(2, status=503)
    engine = make_engine(server, max_retries=2)
    [gen] = engine.generate([req(0)])
    assert gen.sample_id == "s0"
    rids = [b["rid"] for b in server.bodies("/generate")]
    assert len(rids) == 3 and len(set(rids)) == 3  # a fresh rid per attempt


def test_5xx_exhausts_retries(server):
    server.fail_next(10, status=500, message="CUDA out of memory")
    engine = make_engine(server, max_retries=1)
    with pytest.raises(HTTPStatusError, match=r"after 2 attempts.*CUDA out of memory") as info:
        engine.generate([req(0)])
    assert info.value.status == 500 and not isinstance(info.value, SampleError)
    assert len(server.bodies("/generate")) == 2


def test_timeout_raises_after_max_retries_with_backoff(server):
    engine = make_engine(server, timeout_s=0.2, max_retries=2, backoff_s=0.05, max_backoff_s=0.1)
    engine.check_server()
    server.delay_next(3, seconds=2.0)
    start = time.monotonic()
    with pytest.raises(EngineError, match=r"/generate for sample 's0' failed after 3 attempts.*timeout"):
        engine.generate([req(0)])
    elapsed = time.monotonic() - start
    # 3 timeouts of 0.2 s plus backoffs of 0.025..0.05 s and 0.05..0.1 s; far below 3 x 2 s of delay (the upper
    # bound leaves a loaded CI machine room).
    assert 0.6 + 0.075 <= elapsed < 3.0
    assert len(server.bodies("/generate")) == 3
    # Each timed-out attempt was aborted on the server by its rid.
    assert sorted(server.aborted) == sorted(b["rid"] for b in server.bodies("/generate"))


def test_connection_refused_is_retried_then_engine_error():
    with FakeSGLangServer() as s:
        url = s.url  # a port that is free again once the server stops
    engine = SGLangClient(SGLangClientConfig(base_url=url, max_retries=2, backoff_s=0.001, max_backoff_s=0.002))
    with pytest.raises(EngineError, match=r"failed after 3 attempts.*connection error"):
        engine.check_server()


def test_4xx_not_retried_and_carries_server_message(server):
    server.fail_next(1, status=400, message="The input (4096 tokens) is longer than the model's context length")
    engine = make_engine(server, max_retries=3)
    with pytest.raises(HTTPStatusError, match=r"HTTP 400: The input \(4096 tokens\) is longer") as info:
        engine.generate([req(0)])
    assert info.value.status == 400
    assert len(server.bodies("/generate")) == 1


def test_missing_routing_feature_is_detected_at_start():
    with FakeSGLangServer(enable_return_routed_experts=False) as s:
        engine = make_engine(s)
        with pytest.raises(EngineError, match="was started without --enable-return-routed-experts"):
            engine.check_server()
        with pytest.raises(EngineError, match="--enable-return-routed-experts"):
            engine.generate([req(0, return_routing=True)])
        assert s.bodies("/generate") == []
        # Without a routing spec the same server is fine.
        assert make_engine(s, routing_spec=None).generate([req(0)])[0].sample_id == "s0"


def test_legacy_server_info_path_and_no_version_endpoint():
    with FakeSGLangServer(legacy_server_info=True, has_weight_version_api=False) as s:
        engine = make_engine(s)
        info = engine.check_server()
        assert info["enable_return_routed_experts"] is True
        assert [p for p, _ in s.requests][:3] == ["/server_info", "/get_server_info", "/update_weight_version"]
        # No tag was set, so a server tag of "default" is not a mismatch.
        assert engine.generate([req(0)])[0].weight_version == 0


def test_api_key_is_sent():
    with FakeSGLangServer(api_key="sekret") as s:
        with pytest.raises(HTTPStatusError, match="HTTP 401"):
            make_engine(s).check_server()
        assert make_engine(s, api_key="sekret").generate([req(0)])[0].sample_id == "s0"


@pytest.mark.parametrize("kind, message", [
    ("nan_logprob", r"log-prob nan is not a finite number"),
    ("null_logprob", r"log-prob None is not a finite number"),
    ("positive_logprob", r"log-prob 0.5 > 0"),
    ("drop_logprobs", r"lacks 'output_token_logprobs'"),
    ("drop_output_ids", r"answer lacks \['output_ids'\]"),
    ("drop_finish_reason", r"finish_reason"),
    ("drop_routing", r"expected meta_info\['routed_experts'\]"),
    ("short_logprobs", r"expected 6 entries \(completion_tokens\), got 5"),
    ("token_mismatch", r"output_token_logprobs\[0\] is for token \d+ but output_ids\[0\]"),
    ("count_mismatch", r"completion_tokens'\] = 7, expected 6"),
    ("bad_routing", r"routed_experts of sample 's1'.*expected 8 rows"),
    ("abort", r"finish_reason type 'abort'.*Abort before prefill"),
    ("stale_version", r"generated under server weight_version '0-stale', expected '0'"),
])
def test_bad_sample_is_identified_by_sample_id(server, kind, message):
    engine = make_engine(server)
    requests = [req(i, return_routing=True) for i in range(4)]
    server.corrupt(kind, prompt_ids=requests[1].prompt_ids)
    results = engine.generate_results(requests)
    assert [type(r).__name__ for r in results] == ["Generation", "SampleError", "Generation", "Generation"]
    err = results[1]
    assert isinstance(err, EngineError) and err.sample_id == "s1"
    assert err.args[0].startswith("sample 's1': ")
    assert re.search(message, str(err)), str(err)
    # The RolloutEngine method raises that sample's error.
    server.corrupt(kind, prompt_ids=requests[1].prompt_ids)
    with pytest.raises(SampleError, match=message) as info:
        engine.generate(requests)
    assert info.value.sample_id == "s1"


def test_all_corruptions_are_covered():
    covered = {p[0] for p in test_bad_sample_is_identified_by_sample_id.pytestmark[0].args[1]}
    assert covered == set(CORRUPTIONS)


def test_update_weights_sets_version_and_later_generations_carry_it(server):
    engine = make_engine(server, load_format="auto")
    before = engine.generate([req(0)])[0]
    assert before.weight_version == 0
    flushes = server.num_flushes
    engine.update_weights("/ckpt/step_3", version=3)
    assert engine.weight_version == 3 and server.weight_version == "3"
    assert server.weight_loads == [{"model_path": "/ckpt/step_3", "weight_version": "3", "flush_cache": True,
                                     "abort_all_requests": False, "load_format": "auto"}]
    assert server.num_flushes == flushes + 1  # the update's own flush, no second /flush_cache
    after = engine.generate([req(0), req(1)])
    assert [g.weight_version for g in after] == [3, 3]
    assert after[0].output_ids != before.output_ids  # the fake's tokens depend on the served version


def test_failed_weight_update_keeps_version(server):
    engine = make_engine(server)
    engine.check_server()
    server.fail_next(1, status=400, path="/update_weights_from_disk", message="Failed to get weights iterator")
    with pytest.raises(EngineError, match="Failed to get weights iterator"):
        engine.update_weights("/missing", version=1)
    assert engine.weight_version == 0 and server.weight_version == "0"
    assert engine.generate([req(0)])[0].weight_version == 0


def test_pause_and_continue(server):
    engine = make_engine(server)
    engine.pause_generation("retract")
    engine.continue_generation()
    assert server.bodies("/pause_generation") == [{"mode": "retract"}]
    assert server.bodies("/continue_generation") == [{}]
    with pytest.raises(ValueError, match="mode"):
        engine.pause_generation("later")


def test_concurrency_keeps_request_order(server):
    # Later requests answer first: request i sleeps (n - i) * 20 ms inside the policy.
    n = 8
    base = hash_policy()

    def slow_policy(r):
        time.sleep((n - (r.input_ids[-1] - 13)) * 0.02)
        return base(r)

    server.policy = slow_policy
    engine = make_engine(server, max_concurrency=n)
    requests = [req(i) for i in range(n)]
    gens = engine.generate(requests)
    assert [g.sample_id for g in gens] == [r.sample_id for r in requests]
    assert [g.prompt_ids for g in gens] == [r.prompt_ids for r in requests]
    assert server.max_in_flight > 1
    # Same answers as one at a time.
    serial = make_engine(server, max_concurrency=1).generate(requests)
    assert [g.output_ids for g in gens] == [g.output_ids for g in serial]


def test_invalid_requests_are_rejected_before_sending(server):
    engine = make_engine(server, routing_spec=None)
    with pytest.raises(ValueError, match="unique sample ids"):
        engine.generate([req(0), req(0)])
    with pytest.raises(ValueError, match="routing_spec is None"):
        engine.generate([req(0, return_routing=True)])
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([req(0, max_new_tokens=0)])
    assert engine.generate([]) == []
    assert server.requests == []


@pytest.mark.parametrize("field, value, message", [
    ("base_url", "localhost:30000", "base_url: expected 'http://host:port'"),
    ("timeout_s", 0, "timeout_s: expected > 0, got 0"),
    ("max_retries", -1, "max_retries: expected >= 0, got -1"),
    ("backoff_s", float("nan"), "backoff_s: expected a finite number"),
    ("max_backoff_s", 0.5, "max_backoff_s: expected >= 1.0, got 0.5"),
    ("max_concurrency", 0, "max_concurrency: expected >= 1, got 0"),
    ("routing_spec", "spec", "routing_spec: expected a RoutingSpec or None, got str"),
    ("api_key", "", "api_key: expected a non-empty str or None"),
    ("extra_sampling_params", {"temperature": 1.0}, r"extra_sampling_params: expected no keys"),
])
def test_config_validation_names_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        SGLangClientConfig(**{"base_url": "http://127.0.0.1:30000", field: value})


def test_backoff_is_exponential_capped_and_jittered():
    engine = SGLangClient(SGLangClientConfig(base_url="http://127.0.0.1:1", backoff_s=1.0, max_backoff_s=5.0, seed=1))
    for attempt, cap in enumerate([1.0, 2.0, 4.0, 5.0, 5.0]):
        delays = [engine._backoff(attempt) for _ in range(50)]
        assert all(cap * 0.5 <= d <= cap for d in delays)
        assert len(set(delays)) > 1


# ---------------------------------------------------------------------------- SGLang versions


@pytest.mark.parametrize("sglang_version", ["0.5.20", "0.5.23"])
def test_unknown_sampling_params_are_rejected_by_the_server(sglang_version):
    with FakeSGLangServer(sglang_version=sglang_version) as s:
        bad = SGLangClient(SGLangClientConfig(base_url=s.url, timeout_s=5.0, max_retries=0,
                                              extra_sampling_params={"seed": 1}))
        with pytest.raises(EngineError, match=r"HTTP 400.*Unexpected keyword argument 'seed'"):
            bad.generate([req(0)])
        good = SGLangClient(SGLangClientConfig(base_url=s.url, timeout_s=5.0, max_retries=0,
                                               extra_sampling_params={"sampling_seed": 1, "top_p": 1.0}))
        assert len(good.generate([req(0)])) == 1
        assert s.bodies("/generate")[-1]["sampling_params"]["sampling_seed"] == 1


@pytest.mark.parametrize("sglang_version", ["0.5.20", "0.5.23"])
def test_refused_flush_loads_weights_and_the_client_fixes_the_tag(sglang_version):
    with FakeSGLangServer(sglang_version=sglang_version) as s:
        engine = SGLangClient(SGLangClientConfig(base_url=s.url, timeout_s=5.0, max_retries=0))
        engine.check_server()
        s.refuse_flush(2)
        with pytest.raises(CacheFlushRefused, match=r"loaded the weights from '/ckpt/4' \(now tagged "
                                                    r"weight_version '4'\).*requests are still running"):
            engine.update_weights("/ckpt/4", version=4)
        assert [b["model_path"] for b in s.weight_loads] == ["/ckpt/4"]  # loaded once, not retried
        assert engine.weight_version == 4 and s.weight_version == "4"  # set by /update_weight_version
        assert s.bodies("/update_weight_version")[-1] == {"new_version": "4", "abort_all_requests": False}
        assert engine.get_weight_version() == "4"
        assert [g.weight_version for g in engine.generate([req(0), req(1)])] == [4, 4]  # no stale tag
        with pytest.raises(EngineError, match=r"refused to flush its prefix cache \(HTTP 400\): Flush cache"):
            engine.flush_cache()
        flushes = s.num_flushes
        engine.flush_cache()
        assert s.num_flushes == flushes + 1


def test_fake_server_refuses_flush_without_tagging():
    # What SGLang does, seen without the client's fix-up: 400 after loading, tag unchanged.
    with FakeSGLangServer(weight_version="1") as s:
        s.refuse_flush()
        data = json.dumps({"model_path": "/ckpt/2", "weight_version": "2"}).encode()
        request = urllib.request.Request(s.url + "/update_weights_from_disk", data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=5)
        assert e.value.code == 400 and "cache was not flushed" in json.loads(e.value.read())["message"]
        assert s.weight_version == "1" and s.weight_loads[-1]["model_path"] == "/ckpt/2"
