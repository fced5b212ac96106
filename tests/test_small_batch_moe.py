"""`SmallBatchMoELayer`'s dense path computes what megatron's dispatcher path computes, with no data-dependent op.

Layer level (megatron's own `MoELayer.forward` on the same layer is the reference): outputs in float64, fp32
and under bf16 autocast, the recorded routing (`RouterReplay`), the fp8 knob's quantising hooks (their
per-expert amax must see only the routed rows), `moe_apply_probs_on_input`, and when the dispatcher path
runs instead (grad, over the row limit, a hook without a batched form, off by default). Static shapes: the
dense path's ops and every op's output shapes are the same for two different routings, and no op reads a
value to the host or sizes its output by the data (what a CUDA graph needs); megatron's path fails that
check. Engine: `dense_moe_rows` gives the same tokens, log-probs and R3 routing. Layouts: EP2 says why not.

Shape legend: [S, B, H] a layer's input, [T] = S * B tokens, [E] experts.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.dist_harness import run_distributed

pytestmark = [pytest.mark.megatron]

VOCAB = 64
# ops whose output size or value comes from tensor data: a host read (a device sync on CUDA) each
DATA_DEPENDENT = {"_local_scalar_dense", "masked_select", "nonzero", "repeat_interleave", "unique", "_unique2",
                  "unique_consecutive", "bincount", "item"}


def _cfg(**kw):
    from vespo_megatron.megatron.model_config import TinyMoEConfig

    base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_experts=8, moe_router_topk=2,
                moe_ffn_hidden_size=16, ffn_hidden_size=48, seq_length=64, moe_layer_freq=1,
                moe_enable_routing_replay=True)
    return TinyMoEConfig(**{**base, **kw})


def _build(cfg, layout=None):
    from vespo_megatron.megatron.model import build_gpt_model
    from vespo_megatron.megatron.parallel_setup import ParallelConfig, initialize_parallel

    layout = layout or ParallelConfig()
    groups = initialize_parallel(layout)
    return build_gpt_model(cfg, layout, groups, attention_backend="reference"), groups


class _OpLog(TorchDispatchMode):
    """Every dispatched op's name and output shapes, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        shapes = tuple(tuple(o.shape) for o in flat if isinstance(o, torch.Tensor))
        self.ops.append((func.overloadpacket.__name__, shapes))
        return out


def _count_dispatcher(layer):
    """Count the layer's calls of megatron's dispatcher (its dispatch_preprocess)."""
    calls = [0]
    original = layer.token_dispatcher.dispatch_preprocess

    @functools.wraps(original)
    def counted(*a, **k):
        calls[0] += 1
        return original(*a, **k)

    layer.token_dispatcher.dispatch_preprocess = counted
    return calls


def _recorded(fn):
    """(fn's result, the routing RouterReplay recorded during it: a list of [T, K] per router call)."""
    from vespo_megatron.compat import RouterReplay, RouterReplayAction

    RouterReplay.clear_global_indices()
    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    try:
        out = fn()
        return out, [r.clone() for r in RouterReplay.get_recorded_data() if r is not None]
    finally:
        RouterReplay.set_global_router_replay_action(None)
        RouterReplay.clear_global_indices()


def _layer_level(rank, world):
    from vespo_megatron.megatron.parallel_setup import destroy_parallel
    from vespo_megatron.megatron.small_batch_moe import SmallBatchMoELayer, dense_small_batches
    from vespo_megatron.rollout.mismatch import engine_mismatch

    model, _ = _build(_cfg())
    model.eval()
    layer = model.decoder.layers[0].mlp
    assert isinstance(layer, SmallBatchMoELayer) and layer.dense_reason() is None
    calls = _count_dispatcher(layer)
    g = torch.Generator().manual_seed(3)
    h32 = torch.randn(3, 4, 32, generator=g)  # [S, B, H]: 12 tokens, 96 expert rows
    out = {"default_limit": layer.dense_rows_limit}

    def both(h, tag, ctx=None):
        """(dispatcher output, dense output, their recorded routing, dispatcher calls of the dense run)."""
        with torch.no_grad():
            ref, ref_routes = _recorded(lambda: layer(h)[0])
            with dense_small_batches(model, 96) as layers:
                assert layer in layers and layer.dense_rows_limit == 96
                before = calls[0]
                dense, dense_routes = _recorded(lambda: layer(h))
                out[f"{tag}_calls"] = calls[0] - before
            assert layer.dense_rows_limit == 0  # reset on exit
        out[tag] = (ref, dense[0], dense[1], ref_routes, dense_routes)

    both(h32, "fp32")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        both(h32, "bf16")
    for mode in ("per_tensor", "per_row"):
        with engine_mismatch(model, fp8=mode):
            both(h32, f"fp8_{mode}")
    c = layer.experts.config
    c.moe_apply_probs_on_input = True
    both(h32, "apply_probs_on_input")
    c.moe_apply_probs_on_input = False

    # static shapes: two routings, one op sequence; megatron's path for contrast
    h_other = torch.randn(3, 4, 32, generator=g) * 3
    for name, limit in (("dense", 96), ("dispatcher", 0)):
        logs = []
        for h in (h32, h_other):
            with torch.no_grad(), dense_small_batches(model, limit), _OpLog() as log:
                layer(h)
            logs.append(log.ops)
        out[f"ops_{name}"] = logs

    # the dispatcher path runs instead: grad, over the limit, a hook without a batched form
    with dense_small_batches(model, 96):
        before = calls[0]
        layer(h32.clone().requires_grad_())
        out["grad_calls"] = calls[0] - before
        with torch.no_grad():
            before = calls[0]
            _, routes = _recorded(lambda: layer(torch.randn(4, 4, 32, generator=g)))  # 128 rows > 96
            out["over_limit"] = (calls[0] - before, len(routes))
            hook = layer.experts.local_experts[1].linear_fc1.register_forward_pre_hook(lambda m, a: (a[0] * 2,))
            before = calls[0]
            _, routes = _recorded(lambda: layer(h32))
            out["plain_hook"] = (calls[0] - before, len(routes))  # routed once, not twice
            hook.remove()

    # float64: the same computation without rounding noise
    model.double()
    both(h32.double(), "fp64")
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def layer_level():
    return run_distributed(_layer_level, 1)[0]


@pytest.mark.parametrize("tag, rtol, atol", [("fp64", 1e-12, 1e-14), ("fp32", 1e-5, 1e-6), ("bf16", 0.02, 0.02),
                                             ("fp8_per_tensor", 1e-5, 1e-6), ("fp8_per_row", 1e-5, 1e-6),
                                             ("apply_probs_on_input", 1e-5, 1e-6)])
def test_dense_path_equals_the_dispatcher_path(layer_level, tag, rtol, atol):
    """Same output (fp32: GEMM rounding; bf16: a few bf16 ulps) and the same recorded routing, with megatron's
    dispatcher never called. With the fp8 knob, a per-tensor scale that saw the unrouted tokens' rows would
    quantise on another grid (errors ~1e-2): the masked rows keep it to rounding."""
    ref, dense, bias, ref_routes, dense_routes = layer_level[tag]
    assert bias is None and layer_level[f"{tag}_calls"] == 0
    assert dense.shape == ref.shape and dense.dtype == ref.dtype
    torch.testing.assert_close(dense, ref, rtol=rtol, atol=atol)
    assert float(ref.abs().max()) > 0
    assert len(ref_routes) == len(dense_routes) == 1
    assert torch.equal(ref_routes[0], dense_routes[0])


def test_knob_moves_the_output(layer_level):
    """The fp8 comparison above is not vacuous: the knob changes the layer's output on either path."""
    base = layer_level["fp32"][1]
    for mode in ("per_tensor", "per_row"):
        assert float((layer_level[f"fp8_{mode}"][1] - base).abs().max()) > 1e-2 * float(base.abs().max())


def test_dense_path_has_static_shapes_and_no_host_reads(layer_level):
    dense_a, dense_b = layer_level["ops_dense"]
    assert dense_a == dense_b  # op for op, output shapes included, whatever the routing
    assert not {name for name, _ in dense_a} & DATA_DEPENDENT
    disp_a, disp_b = layer_level["ops_dispatcher"]
    assert {name for name, _ in disp_a} & DATA_DEPENDENT  # megatron's path reads counts
    assert len(dense_a) < len(disp_a)


def test_dispatcher_path_where_dense_does_not_apply(layer_level):
    assert layer_level["default_limit"] == 0  # off unless asked for
    assert layer_level["grad_calls"] == 1
    assert layer_level["over_limit"] == (1, 1)
    assert layer_level["plain_hook"] == (1, 1)


# ------------------------------------------------------------------ engine


def _engine(rank, world):
    from vespo_megatron.megatron.parallel_setup import destroy_parallel
    from vespo_megatron.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
    from vespo_megatron.rollout.engine import GenerationRequest

    g = torch.Generator().manual_seed(5)
    reqs = [GenerationRequest(sample_id=f"r{b}", prompt_ids=tuple(torch.randint(1, VOCAB, (n,), generator=g).tolist()),
                              max_new_tokens=8, return_routing=True) for b, n in enumerate((3, 8, 2, 5))]
    model, groups = _build(_cfg(num_experts=4))
    layers = [m.mlp for m in model.decoder.layers]
    calls = [_count_dispatcher(m) for m in layers]
    out = {}
    for rows in (0, 64):
        for fp8 in ("off", "per_row"):
            eng = EmbeddedEngine(EmbeddedEngineConfig(fp8=fp8, dense_moe_rows=rows), model, groups, vocab_size=VOCAB,
                                 eos_id=VOCAB - 1, moe_layers=(0, 1), num_experts=4, record_routing=True)
            before = sum(c[0] for c in calls)
            gens = eng.generate(reqs, seed=11)
            out[(rows, fp8)] = [(x.output_ids, torch.tensor(x.output_logprobs, dtype=torch.float64),
                                 torch.from_numpy(x.routing.expert_ids.astype("int64"))) for x in gens]
            out[f"calls_{rows}_{fp8}"] = sum(c[0] for c in calls) - before
    destroy_parallel()
    return out


def test_engine_same_tokens_logprobs_and_routing():
    """Decode steps (4 rows x 4 experts = 16 rows) and the prefill (4 x 2 tokens x 4 = 32 rows) take the dense
    path at dense_moe_rows=64 (no dispatcher call at all); tokens, log-probs (1e-5) and the recorded R3 routing
    equal the dispatcher's, with and without the fp8 knob."""
    out = run_distributed(_engine, 1)[0]
    assert out["calls_64_off"] == 0 and out["calls_64_per_row"] == 0
    assert out["calls_0_off"] > 0
    for fp8 in ("off", "per_row"):
        for (ids, lp, route), (ids_d, lp_d, route_d) in zip(out[(0, fp8)], out[(64, fp8)], strict=True):
            assert ids == ids_d and torch.equal(route, route_d)
            torch.testing.assert_close(lp_d, lp, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ layouts, config, spec


def _ep2_reason(rank, world):
    from vespo_megatron.megatron.parallel_setup import ParallelConfig, destroy_parallel

    model, _ = _build(_cfg(), ParallelConfig(ep=2))
    reason = model.decoder.layers[0].mlp.dense_reason()
    destroy_parallel()
    return reason


@pytest.mark.distributed
def test_ep2_keeps_the_dispatcher():
    for reason in run_distributed(_ep2_reason, 2):
        assert "expert parallelism" in reason


def test_config_and_context_validation():
    from vespo_megatron.base.validation import ConfigError
    from vespo_megatron.megatron.small_batch_moe import dense_small_batches
    from vespo_megatron.rollout.embedded_config import EmbeddedEngineConfig
    from vespo_megatron.training.cli import config_from_argv

    assert EmbeddedEngineConfig().dense_moe_rows == 8192  # on by default (timed on an H100)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="dense_moe_rows"):
            EmbeddedEngineConfig(dense_moe_rows=bad)
    with pytest.raises(ValueError, match="limit: expected an int >= 0, got -2"):
        with dense_small_batches(torch.nn.Linear(2, 2), -2):
            pass
    assert config_from_argv(["--rollout-dense-moe-rows", "8192"]).rollout.embedded.dense_moe_rows == 8192


def test_with_experts_module_replaces_the_layer_in_both_spec_forms():
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from vespo_megatron.compat import with_experts_module
    from vespo_megatron.megatron.batched_experts import BatchedSequentialMLP
    from vespo_megatron.megatron.small_batch_moe import SmallBatchMoELayer

    mlp = MLPSubmodules(linear_fc1="fc1", linear_fc2="fc2")
    spec = ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=ModuleSpec(module=SequentialMLP, submodules=mlp)),
                      params={"x": 1})
    new = with_experts_module(spec, BatchedSequentialMLP, SmallBatchMoELayer)
    assert new.module is SmallBatchMoELayer and new.params == {"x": 1}
    assert new.submodules.experts.module is BatchedSequentialMLP and spec.module is MoELayer
    built = functools.partial(MoELayer, 7, submodules=MoESubmodules(experts=functools.partial(SequentialMLP,
                                                                                               submodules=mlp)))
    new = with_experts_module(built, BatchedSequentialMLP, SmallBatchMoELayer)
    assert new.func is SmallBatchMoELayer and new.args == (7,)
    assert new.keywords["submodules"].experts.func is BatchedSequentialMLP
