"""The embedded engine's decode steps through torch.compile (`rollout.compiled_decode`, `compile_decode`), on CPU:
the compiled engine makes the eager engine's tokens and R3 routing (log-probs up to fp32 rounding) with its
steps inside (stand-in) CUDA graphs, and bf16 stays a mismatch; megatron's forward is one dynamo graph (no graph break) and later positions
and later generations of the same shape compile nothing; the engine says when it cannot compile.

Shape legend: [B] requests, [n] new tokens of one row.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.test_decode_graphs import _requests
from tests.test_embedded_engine import _build, _engine, _summary


def _compiled(rank, world):
    import torch._dynamo as dynamo

    import vespo_megatron.rollout.embedded as embedded
    from vespo_megatron.compat import static_inference_context
    from vespo_megatron.megatron.parallel_setup import ParallelConfig
    from vespo_megatron.rollout.decode_graphs import DecodeGraphs

    model, groups = _build(ParallelConfig())
    # prompts of at least 2 tokens: dynamo specialises a size of 1, and a first decode step at offset 1 would
    # compile once more (the testbed's prompts have 9-15 tokens)
    batches = [(_requests(1, (3, 8, 2, 5)), 11), (_requests(2, (6, 4, 9, 7)), 12), (_requests(3, (2, 5, 3, 4)), 14)]
    eager = _engine(model, groups, dense_moe_rows=64)
    ref = [_summary(eager.generate(reqs, seed=s)) for reqs, s in batches]

    def capture(fn, pool):  # the stand-in: replay runs the captured function again, on the static buffers
        return fn

    eng = _engine(model, groups, dense_moe_rows=64, compile_decode=True)
    eng._graphs = DecodeGraphs(model, static_inference_context, capture=capture)
    real_reason = embedded.graph_unsupported_reason
    embedded.graph_unsupported_reason = lambda **kw: None
    dynamo.reset()
    dynamo.utils.counters.clear()
    try:
        got, graphs_after = [], []
        for reqs, s in batches:
            got.append(_summary(eng.generate(reqs, seed=s)))
            graphs_after.append(dynamo.utils.counters["stats"]["unique_graphs"])
    finally:
        embedded.graph_unsupported_reason = real_reason
    breaks = dict(dynamo.utils.counters["graph_break"])
    # bf16 autocast around the compiled step: the mismatch against the fp32 engine stays
    reqs, s = batches[0]
    bf16 = [_summary(_engine(model, groups, dense_moe_rows=64, precision="bf16", **kw).generate(reqs, seed=s))
            for kw in ({}, {"compile_decode": True})]
    return dict(ref=ref, got=got, graphs_after=graphs_after, calls=eng._compiled.calls, breaks=breaks,
                reason=eng.compile_reason, graph_reason=eng.graph_reason, bf16=bf16)


@pytest.fixture(scope="module")
def compiled():
    return run_distributed(_compiled, 1)[0]


def test_compiled_steps_make_the_eager_generations(compiled):
    for got, ref in zip(compiled["got"], compiled["ref"], strict=True):
        for (ids, lp, fin, routes), (ids_r, lp_r, fin_r, routes_r) in zip(got, ref, strict=True):
            assert ids == ids_r and fin == fin_r
            assert torch.equal(routes, routes_r)  # R3: the routing recorded inside the compiled step
            torch.testing.assert_close(lp, lp_r, rtol=0, atol=1e-5)  # fused kernels round differently
    assert compiled["reason"] is None and compiled["graph_reason"] is None
    assert compiled["calls"] > 0  # the (stand-in) graphs captured the compiled forward


def test_one_compile_serves_every_position_and_later_generations(compiled):
    first, *later = compiled["graphs_after"]
    assert first == 1, compiled["breaks"]  # megatron's forward is one graph: the polyfills removed both breaks
    assert not compiled["breaks"]
    assert later == [first] * len(later)  # other prompts, positions and cache offsets: no recompile


def test_bf16_stays_a_mismatch_when_compiled(compiled):
    """precision="bf16" under the compiled step: log-probs off the fp32 engine's by a bf16-sized amount (the fused
    kernels keep intermediates in fp32, so not the eager bf16 engine's numbers), not by fp32 rounding."""
    fp32 = compiled["ref"][0]
    eager_bf16, compiled_bf16 = compiled["bf16"]
    for bf16 in (eager_bf16, compiled_bf16):
        gaps = [float((lp[:n] - ref_lp[:n]).abs().max()) for (ids, lp, _, _), (ids_r, ref_lp, _, _) in
                zip(bf16, fp32, strict=True) if (n := min(len(ids), len(ids_r)))]
        assert max(gaps) > 1e-4  # fp32 rounding is ~1e-6 (test_compiled_steps_make_the_eager_generations)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(eager_bf16, compiled_bf16, strict=True))


def test_compile_reasons():
    from vespo_megatron.rollout.compiled_decode import compile_unsupported_reason
    from vespo_megatron.rollout.embedded_config import EmbeddedEngineConfig
    from vespo_megatron.training.cli import config_from_argv

    ok = dict(model_parallel_size=1, fp8="off", router_noise=0.0)
    assert compile_unsupported_reason(**ok) is None
    for change, words in (({"model_parallel_size": 2}, "model parallelism of 2 ranks"), ({"fp8": "per_row"}, "fp8"),
                          ({"router_noise": 0.1}, "router noise")):
        assert words in compile_unsupported_reason(**{**ok, **change})
    assert EmbeddedEngineConfig().compile_decode is False
    assert config_from_argv(["--rollout-compile-decode"]).rollout.embedded.compile_decode is True
    with pytest.raises(ValueError, match="compile_decode"):
        EmbeddedEngineConfig(compile_decode=1)


def _stand_ins(rank, world):
    from megatron.core import utils

    from vespo_megatron.megatron.parallel_setup import ParallelConfig
    from vespo_megatron.rollout.compiled_decode import tp_group_if_none, viewless_in_inference

    _build(ParallelConfig())
    groups = [(tp_group_if_none(None, is_expert=e), utils.get_tensor_model_parallel_group_if_none(None, is_expert=e))
              for e in (False, True)]
    marker = object()
    x = torch.arange(6.0).view(2, 3)[0]  # a view
    return dict(same=[a is b and a is not None for a, b in groups], passthrough=tp_group_if_none(marker) is marker,
                viewless=viewless_in_inference(x, True, True) is x and torch.equal(utils.make_viewless_tensor(x, True, True), x))


def test_the_stand_ins_agree_with_megatron():
    """The functions dynamo traces in place of megatron's (compiled_decode._register_polyfills) give what
    megatron's own give."""
    out = run_distributed(_stand_ins, 1)[0]
    assert out["same"] == [True, True] and out["passthrough"] and out["viewless"]
