"""CUDA graphs of the embedded engine's decode steps (`rollout.decode_graphs`), on CPU with a stand-in capture
whose replay re-runs the captured function on the static buffers: generations with graphs make the eager
engine's tokens, log-probs and R3 routing across generations of other prompts (graphs reused, positions
captured once), after a parameter moved (graphs dropped) and after a failed capture (eager from then on), and
the engine says why it cannot use graphs; a run resumes across the engine's decoding settings.

Shape legend: [B] requests, [n] new tokens of one row.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.test_embedded_engine import VOCAB, _build, _engine, _summary


def _requests(seed: int, lens: tuple[int, ...]):
    from vespo_megatron.rollout.engine import GenerationRequest

    g = torch.Generator().manual_seed(seed)
    return [GenerationRequest(sample_id=f"r{b}", prompt_ids=tuple(torch.randint(1, VOCAB - 1, (n,), generator=g).tolist()),
                              max_new_tokens=4 + 2 * b, return_routing=True) for b, n in enumerate(lens)]


def _graphs(rank, world):
    import vespo_megatron.rollout.embedded as embedded
    from vespo_megatron.compat import static_inference_context
    from vespo_megatron.megatron.parallel_setup import ParallelConfig
    from vespo_megatron.rollout.decode_graphs import DecodeGraphs

    model, groups = _build(ParallelConfig())
    batches = [(_requests(1, (3, 8, 2, 5)), 11), (_requests(2, (6, 4, 9, 7)), 12), (_requests(1, (3, 8, 2, 5)), 13),
               (_requests(3, (1, 2, 3, 4)), 14)]
    eager = _engine(model, groups, dense_moe_rows=64)
    ref = [_summary(eager.generate(reqs, seed=s)) for reqs, s in batches]

    events = []

    def capture(fn, pool):  # the stand-in: replay runs the captured function again, on the static buffers
        events.append("capture")

        def replay():
            events.append("replay")
            fn()

        return replay

    eng = _engine(model, groups, dense_moe_rows=64, cuda_graphs=True)
    # which decode steps the MoE layers would take the dispatcher in (4 experts: up to 16 rows at 64), from the model
    out = {"cpu_reason": None, "moe_reasons": [eng._moe_dispatcher_reason(n) for n in (16, 17)],
           "moe_reason_off": _engine(model, groups, dense_moe_rows=0)._moe_dispatcher_reason(1)}
    eng.generate(batches[0][0], seed=1)
    out["cpu_reason"] = eng.graph_reason  # on CPU the engine decodes eagerly and says why
    eng._graphs = DecodeGraphs(model, static_inference_context, capture=capture)
    real_reason = embedded.graph_unsupported_reason
    embedded.graph_unsupported_reason = lambda **kw: None
    try:
        got, counts = [], []
        for reqs, s in batches:
            events.clear()
            got.append(_summary(eng.generate(reqs, seed=s)))
            counts.append((events.count("capture"), events.count("replay")))
        # the temperature and the number of stop ids per row are baked into a captured sampler: other values
        # get their own graph set (and the eager results)
        hot = [dataclasses.replace(r, temperature=0.5) for r in batches[0][0]]
        stopping = [dataclasses.replace(r, stop_token_ids=(7, 9)) for r in batches[0][0]]
        out["other_keys"] = [_summary(eng.generate(reqs, seed=15)) for reqs in (hot, stopping, batches[0][0])]
        out["other_keys_ref"] = [_summary(eager.generate(reqs, seed=15)) for reqs in (hot, stopping, batches[0][0])]
        out["sets"] = len(eng._graphs._sets)
        # a moved parameter drops the graphs; the next generation captures again and still decodes right
        p = next(model.parameters())
        p.data = p.data.clone()
        events.clear()
        moved = _summary(eng.generate(batches[0][0], seed=11))
        counts.append((events.count("capture"), events.count("replay")))
        out["dropped"] = eng._graphs.dropped
        # a capture that fails (an op the model cannot capture): that generation finishes eagerly with the same
        # results, and the engine stops using graphs
        def failing(fn, pool):
            raise RuntimeError("operation not permitted when stream is capturing")

        eng._graphs = DecodeGraphs(model, static_inference_context, capture=failing)
        out["failed"] = [_summary(eng.generate(reqs, seed=s)) for reqs, s in batches[:2]]
        out["failed_reason"], out["graphs_after_failure"] = eng.graph_reason, eng._graphs
    finally:
        embedded.graph_unsupported_reason = real_reason
    out.update(ref=ref, got=got, counts=counts, moved=moved, moved_ref=ref[0])
    return out


@pytest.fixture(scope="module")
def graphs():
    return run_distributed(_graphs, 1)[0]


def _assert_same(got, ref):
    for (ids, lp, fin, routes), (ids_r, lp_r, fin_r, routes_r) in zip(got, ref, strict=True):
        assert ids == ids_r and fin == fin_r
        assert torch.equal(lp, lp_r)  # the same kernels on the same inputs: bitwise
        assert torch.equal(routes, routes_r)  # R3: the routing recorded inside the replayed step


def test_graph_replays_make_the_eager_generations(graphs):
    for got, ref in zip(graphs["got"], graphs["ref"], strict=True):
        _assert_same(got, ref)


def test_temperature_and_stop_ids_get_their_own_graphs(graphs):
    for got, ref in zip(graphs["other_keys"], graphs["other_keys_ref"], strict=True):
        _assert_same(got, ref)
    assert graphs["sets"] == 3  # the LRU keeps 3: (T = 0.5), (2 stop ids), (the first shape again)


def test_each_position_is_captured_once_per_shape(graphs):
    first, second, same_again, shorter, _ = graphs["counts"]
    assert first[0] > 0 and first[1] == 0  # everything new: run eagerly, captured
    assert second[1] > 0  # another batch of the same shape replays the positions it shares
    assert same_again == (0, first[0])  # the first batch again: nothing to capture, every step replayed
    assert shorter[1] > 0


def test_moved_parameters_drop_the_graphs(graphs):
    assert graphs["dropped"] == 1
    captured, replayed = graphs["counts"][-1]
    assert captured > 0 and replayed == 0
    _assert_same(graphs["moved"], graphs["moved_ref"])


def test_a_failed_capture_falls_back_to_eager_decoding(graphs):
    for got, ref in zip(graphs["failed"], graphs["ref"][:2], strict=True):
        _assert_same(got, ref)
    assert "capturing the decode step at position" in graphs["failed_reason"]
    assert "RuntimeError: operation not permitted" in graphs["failed_reason"]
    assert graphs["graphs_after_failure"] is None


def test_cpu_engine_decodes_eagerly_and_says_why(graphs):
    assert "CUDA graphs need a CUDA device" in graphs["cpu_reason"]


def test_the_moe_layers_say_when_a_decode_step_needs_the_dispatcher(graphs):
    at16, at17 = graphs["moe_reasons"]
    assert at16 is None
    assert "experts x rows = 4 x 17 > dense_moe_rows = 64" in at17
    assert "dense_moe_rows = 0" in graphs["moe_reason_off"]


def test_unsupported_reasons():
    from vespo_megatron.rollout.decode_graphs import context_length, graph_unsupported_reason

    ok = dict(device=torch.device("cuda"), model_parallel_size=1, router_noise=0.0, moe_reason=None,
              uses_kv_cache=True)
    assert graph_unsupported_reason(**ok) is None
    for change, words in (({"uses_kv_cache": False}, "no KV cache"), ({"model_parallel_size": 2}, "model parallelism"),
                          ({"router_noise": 0.1}, "router noise"), ({"moe_reason": "layer 1: x"}, "dispatcher"),
                          ({"device": torch.device("cpu")}, "CUDA device")):
        assert words in graph_unsupported_reason(**{**ok, **change})
    assert [context_length(n) for n in (1, 128, 129, 300)] == [128, 128, 256, 384]


def test_config_and_flag():
    from vespo_megatron.base.validation import ConfigError
    from vespo_megatron.rollout.embedded_config import EmbeddedEngineConfig
    from vespo_megatron.training.cli import config_from_argv

    assert EmbeddedEngineConfig().cuda_graphs is True  # on by default (timed and checked on an H100)
    with pytest.raises(ConfigError, match="cuda_graphs"):
        EmbeddedEngineConfig(cuda_graphs=1)
    assert config_from_argv(["--no-rollout-cuda-graphs"]).rollout.embedded.cuda_graphs is False
    assert EmbeddedEngineConfig().stop_read_lag == 2
    assert config_from_argv(["--rollout-stop-read-lag", "0"]).rollout.embedded.stop_read_lag == 0
    with pytest.raises(ConfigError, match="stop_read_lag"):
        EmbeddedEngineConfig(stop_read_lag=-1)


def test_a_run_may_resume_with_other_decoding_settings():
    """How the engine decodes is not what is trained: a run resumes across cuda_graphs / dense_moe_rows /
    stop_check_every / stop_read_lag / compile_decode / decode_attention (and across the default change, from records that lack the
    field)."""
    from vespo_megatron.training.cli import config_from_argv
    from vespo_megatron.training.run_dir import config_differences, config_record

    old = config_record(config_from_argv(["--no-rollout-cuda-graphs", "--rollout-dense-moe-rows", "0"]))
    del old["rollout"]["embedded"]["cuda_graphs"]  # a record from before the fields
    del old["rollout"]["embedded"]["stop_read_lag"]
    del old["rollout"]["embedded"]["compile_decode"]
    del old["rollout"]["embedded"]["decode_attention"]
    now = config_record(config_from_argv(["--rollout-stop-check-every", "8", "--rollout-stop-read-lag", "0",
                                          "--rollout-compile-decode", "--rollout-decode-attention", "bmm"]))
    assert config_differences(old, now) == []
    assert config_differences(old, config_record(config_from_argv(["--async-lag", "2"])))  # what is trained: refused


@pytest.mark.parametrize("lag", [0, 1, 3])
@pytest.mark.parametrize("every", [1, 2])
def test_stop_reader_reads_the_flag_of_lag_steps_ago(lag, every):
    """`StopReader.poll` against a plain loop: it stops at the first step j (counted from 0) that is a read step
    ((j + 1) % every == 0) with j >= lag and the flag of step j - lag set, or at the last position."""
    from vespo_megatron.rollout.decode_state import StopReader

    for first_done in (0, 2, 5, 40):
        last = 20
        reader = StopReader(every=every, lag=lag, last=last, device=torch.device("cpu"))
        stopped_at = None
        for j, pos in enumerate(range(3, last + 1)):
            done = torch.tensor([j >= first_done, j >= first_done])
            if reader.poll(pos, done):
                stopped_at = j
                break
        want = next((j for j in range(last - 3 + 1) if (j + 1) % every == 0 and j >= lag and j - lag >= first_done),
                    last - 3)
        assert stopped_at == min(want, last - 3), (first_done, stopped_at, want)
