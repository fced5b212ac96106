"""`BatchedSequentialMLP` computes what megatron's per-expert `SequentialMLP` loop computes.

Module level (the parent's `forward` on the same module is the reference): outputs and gradients (input,
probs, every expert's fc1 / fc2 weight) for random expert loads with empty experts and zero tokens, in fp32,
float64 and bf16; `moe_apply_probs_on_input`, GLU clamp / offset; hooks (a plain hook falls back to the loop,
the fp8 knob's hooks run batched). Whole model: the same GPTModel built with `batched_experts` True / False
gives the same state dict, logits and gradients on a padded and a packed batch. Engine: the same tokens with
either experts module, with and without the fp8 knob. Layouts: EP2 and TP2+SP (expert-TP 1) take the batched
path (tests/test_megatron_model.py and tests/test_rl_layouts.py then cover them against one process).

Shape legend: [T] permuted tokens, [E] local experts, [H] hidden.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.dist_harness import run_distributed

pytestmark = [pytest.mark.megatron]

VOCAB = 64
LOADS = ([3, 0, 5, 1, 0, 7, 2, 4], [0] * 8, [0, 0, 9, 0, 0, 0, 0, 0], [1] * 8, "random")


def _cfg(**kw):
    from vespo_megatron.megatron.model_config import TinyMoEConfig

    base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_experts=8, moe_router_topk=2,
                moe_ffn_hidden_size=16, ffn_hidden_size=48, seq_length=64, moe_layer_freq=(1, 0))
    return TinyMoEConfig(**{**base, **kw})


def _build(cfg, layout=None):
    from vespo_megatron.megatron.model import build_gpt_model
    from vespo_megatron.megatron.parallel_setup import ParallelConfig, initialize_parallel

    layout = layout or ParallelConfig()
    groups = initialize_parallel(layout)
    return build_gpt_model(cfg, layout, groups, attention_backend="reference"), groups


def _count_parent_calls():
    """Wrap `SequentialMLP.forward` (the per-expert loop) with a call counter; returns (counter, original)."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    original = SequentialMLP.forward
    calls = [0]

    @functools.wraps(original)
    def counted(self, *args):
        calls[0] += 1
        return original(self, *args)

    SequentialMLP.forward = counted
    return calls, original


def _run_both(experts, parent_forward, counts, dtype, probs_dtype, seed):
    """(batched outputs and grads, parent-loop outputs and grads) for one random input of load `counts`."""
    g = torch.Generator().manual_seed(seed)
    T, H = sum(counts), experts.local_experts[0].linear_fc1.weight.shape[1]
    x0 = torch.randn(T, H, generator=g, dtype=torch.float64).to(dtype)
    p0 = torch.rand(T, generator=g, dtype=torch.float64).to(probs_dtype)
    dout = torch.randn(T, H, generator=g, dtype=torch.float64).to(dtype)
    tpe = torch.tensor(counts)
    results = []
    for fwd in (experts.forward, functools.partial(parent_forward, experts)):
        experts.zero_grad(set_to_none=True)
        x, p = x0.clone().requires_grad_(), p0.clone().requires_grad_()
        out, bias = fwd(x, tpe, p)
        assert bias is None
        (out.float() * dout.float()).sum().backward()
        grads = {"x": x.grad, "probs": p.grad}
        for i, e in enumerate(experts.local_experts):
            grads[f"{i}.fc1"] = e.linear_fc1.weight.grad
            grads[f"{i}.fc2"] = e.linear_fc2.weight.grad
        results.append((out.detach(), grads))
    with torch.no_grad():  # inference: the batched path stacks only the experts that got tokens
        results.append(experts.forward(x0, tpe, p0)[0])
    return results


def _module_level(rank, world):
    from vespo_megatron.megatron.batched_experts import BatchedSequentialMLP
    from vespo_megatron.megatron.parallel_setup import destroy_parallel
    from vespo_megatron.rollout.mismatch import _QuantInput

    calls, parent_forward = _count_parent_calls()
    out = {}
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        model, _ = _build(_cfg(dtype=dtype))
        experts = model.decoder.layers[0].mlp.experts
        out[f"type_{dtype}"] = (type(experts) is BatchedSequentialMLP, experts.unbatched_reason())
        gen = torch.Generator().manual_seed(3)
        for k, load in enumerate(LOADS):
            counts = torch.randint(0, 12, (8,), generator=gen).tolist() if load == "random" else load
            for probs_dtype in {torch.float32, dtype}:
                before = calls[0]
                res = _run_both(experts, parent_forward, counts, dtype, probs_dtype, seed=k)
                out[(str(dtype), str(probs_dtype), k)] = (res, calls[0] - before)
        if dtype == torch.float32:
            c = experts.config  # the experts' own (deep-copied) config: ffn width differs from the dense one
            assert c is not model.config
            for name, change in (("apply_probs_on_input", dict(moe_apply_probs_on_input=True, moe_router_topk=1)),
                                 ("clamp_offset", dict(activation_func_clamp_value=0.05, glu_linear_offset=0.5))):
                saved = {f: getattr(c, f) for f in change}
                for f, v in change.items():
                    setattr(c, f, v)
                before = calls[0]
                res = _run_both(experts, parent_forward, LOADS[0], dtype, dtype, seed=7)
                out[name] = (res, calls[0] - before)
                for f, v in saved.items():
                    setattr(c, f, v)
            # hooks: a plain pre-hook on one expert sends the call to the loop; the fp8 knob's hooks run batched
            h = experts.local_experts[2].linear_fc1.register_forward_pre_hook(lambda m, a: (a[0] * 2.0,))
            before = calls[0]
            out["plain_hook"] = (experts.unbatched_reason(), _run_both(experts, parent_forward, LOADS[0], dtype,
                                                                       dtype, seed=8), calls[0] - before)
            h.remove()
            for mode in ("per_tensor", "per_row"):
                hook = _QuantInput(mode)
                handles = [getattr(e, n).register_forward_pre_hook(hook) for e in experts.local_experts
                           for n in ("linear_fc1", "linear_fc2")]
                before = calls[0]
                res = _run_both(experts, parent_forward, LOADS[0], dtype, dtype, seed=9)
                out[f"fp8_{mode}"] = (experts.unbatched_reason(), res, calls[0] - before)
                for handle in handles:
                    handle.remove()
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def module_level():
    return run_distributed(_module_level, 1)[0]


def _assert_same(res, rtol, atol, max_differing=1.0):
    """Outputs and gradients close; `max_differing`: the largest share of elements allowed to differ at all
    (bf16: a handful of 1-ulp roundings, where the same computation in another dtype would change many)."""
    (out_b, grads_b), (out_s, grads_s), out_no_grad = res
    assert grads_b.keys() == grads_s.keys()
    pairs = {"out": (out_b, out_s), "out without grad": (out_no_grad, out_s)}
    for name, (a, b) in {**pairs, **{n: (grads_b[n], g) for n, g in grads_s.items()}}.items():
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)
        if a.numel():
            assert float((a != b).float().mean()) <= max_differing, name


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.float64", "torch.bfloat16"])
def test_module_matches_sequential_loop(module_level, dtype):
    """Random loads (empty experts, all tokens on one expert, zero tokens): outputs (with and without grad: the
    latter stacks only the experts that got tokens) and every gradient equal
    the parent's loop (fp32 1e-6 relative, float64 1e-12; bf16: 1 ulp at most, 99% of the elements equal); probs
    in fp32 or the input's dtype (MLP.forward multiplies in the promoted dtype, then rounds). The batched path ran: the loop was never called."""
    assert module_level[f"type_{dtype}"] == (True, None)
    tol = {"torch.float32": (1e-6, 1e-7, 1.0), "torch.float64": (1e-12, 1e-14, 1.0),
           "torch.bfloat16": (2**-7, 1e-3, 0.01)}[dtype]
    cases = [(k, v) for k, v in module_level.items() if isinstance(k, tuple) and k[0] == dtype]
    assert len(cases) >= len(LOADS)
    for key, (res, parent_calls) in cases:
        assert parent_calls == 0, key  # the reference calls the unwrapped loop; the batched module never did
        _assert_same(res, *tol)
        if sum(LOADS[key[2]] if key[2] < len(LOADS) - 1 else [1]):
            assert float(res[0][0].abs().max()) > 0, key


def test_zero_tokens_and_empty_experts_give_zero_gradients(module_level):
    res, _ = module_level[("torch.float32", "torch.float32", 1)]  # all experts empty
    out, grads = res[0]
    assert out.shape == (0, 32) and res[2].shape == (0, 32)
    assert all(float(g.abs().max()) == 0 for n, g in grads.items() if n not in ("x", "probs"))
    res, _ = module_level[("torch.float32", "torch.float32", 0)]  # experts 1 and 4 empty
    grads = res[0][1]
    assert float(grads["1.fc1"].abs().max()) == 0 and float(grads["4.fc2"].abs().max()) == 0
    assert float(grads["0.fc1"].abs().max()) > 0 and float(grads["5.fc2"].abs().max()) > 0


@pytest.mark.parametrize("name", ["apply_probs_on_input", "clamp_offset"])
def test_module_config_variants(module_level, name):
    res, parent_calls = module_level[name]
    assert parent_calls == 0
    _assert_same(res, 1e-6, 1e-7)


def test_plain_hook_falls_back_to_the_loop(module_level):
    reason, res, parent_calls = module_level["plain_hook"]
    assert "hooks" in reason
    assert parent_calls == 2  # both calls of the batched module (with and without grad) ran the loop
    _assert_same(res, 0, 0)  # both ran the same loop


@pytest.mark.parametrize("mode", ["per_tensor", "per_row"])
def test_fp8_knob_hooks_run_batched(module_level, mode):
    """`engine_mismatch`'s input quantisation on every expert's fc1 / fc2: batched (one scale per expert), the
    same numbers as the hooks called per expert by the loop."""
    reason, res, parent_calls = module_level[f"fp8_{mode}"]
    assert reason is None and parent_calls == 0
    _assert_same(res, 1e-5, 1e-6)


# ------------------------------------------------------------------ whole model


def _whole_model(rank, world):
    from vespo_megatron.megatron.model import build_gpt_model
    from vespo_megatron.megatron.parallel_setup import ParallelConfig, destroy_parallel, initialize_parallel
    from vespo_megatron.testing.layouts import make_packed_batch, make_padded_batch, run_layout

    calls, _ = _count_parent_calls()
    padded = make_padded_batch(VOCAB, rows=4, seq_len=16, seed=1, pad_from=[16, 11, 7, 16])
    packed = make_packed_batch(VOCAB, lengths=[5, 11, 8], pad_multiple=4, seed=2)
    out = {}
    for batched in (True, False):
        cfg = _cfg(batched_experts=batched)
        groups = initialize_parallel(ParallelConfig())
        model = build_gpt_model(cfg, ParallelConfig(), groups, attention_backend="reference")
        out[f"state_{batched}"] = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        out[f"params_{batched}"] = [n for n, _ in model.named_parameters()]
        destroy_parallel()
        before = calls[0]
        out[batched] = (run_layout(ParallelConfig(), cfg, padded), run_layout(ParallelConfig(), cfg, packed))
        out[f"calls_{batched}"] = calls[0] - before
    return out


def test_whole_model_batched_equals_sequential():
    """Same state dict (names and values), logits and loss gradients (rtol 1e-5) on a padded and a packed
    (THD) batch; the batched model never ran megatron's loop."""
    out = run_distributed(_whole_model, 1)[0]
    assert out["params_True"] == out["params_False"]
    assert any(".experts.local_experts.7.linear_fc2.weight" in n for n in out["params_True"])
    assert out["state_True"].keys() == out["state_False"].keys()
    for k, v in out["state_False"].items():
        assert torch.equal(out["state_True"][k], v), k
    assert out["calls_True"] == 0 and out["calls_False"] > 0
    for batched, plain in zip(out[True], out[False], strict=True):
        torch.testing.assert_close(batched.logits, plain.logits, rtol=1e-5, atol=1e-6)
        assert batched.loss == pytest.approx(plain.loss, rel=1e-6)
        assert batched.grads.keys() == plain.grads.keys()
        for name, grad in plain.grads.items():
            torch.testing.assert_close(batched.grads[name], grad, rtol=1e-5, atol=1e-8, msg=name)
        assert any(float(g.abs().max()) > 0 for n, g in plain.grads.items() if "local_experts" in n)


# ------------------------------------------------------------------ engine


def _engine_tokens(rank, world):
    from vespo_megatron.megatron.parallel_setup import destroy_parallel
    from vespo_megatron.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
    from vespo_megatron.rollout.engine import GenerationRequest

    calls, _ = _count_parent_calls()
    g = torch.Generator().manual_seed(5)
    reqs = [GenerationRequest(sample_id=f"r{b}", prompt_ids=tuple(torch.randint(1, VOCAB, (n,), generator=g).tolist()),
                              max_new_tokens=8) for b, n in enumerate((3, 8, 2, 5))]
    out = {}
    for batched in (True, False):
        model, groups = _build(_cfg(batched_experts=batched, moe_layer_freq=1, num_experts=4))
        before = calls[0]
        for fp8 in ("off", "per_tensor", "per_row"):
            eng = EmbeddedEngine(EmbeddedEngineConfig(fp8=fp8), model, groups, vocab_size=VOCAB, eos_id=VOCAB - 1,
                                 moe_layers=(0, 1), num_experts=4, record_routing=False)
            gens = eng.generate(reqs, seed=11)
            out[(batched, fp8)] = [(x.output_ids, torch.tensor(x.output_logprobs, dtype=torch.float64)) for x in gens]
        out[f"calls_{batched}"] = calls[0] - before
        out[f"hooks_{batched}"] = sum(len(m._forward_pre_hooks) for m in model.modules())
        destroy_parallel()
    return out


def test_engine_tokens_equal_with_batched_experts():
    """Generation (KV-cached) gives the same tokens and log-probs with either experts module, without and with
    the fp8 knob; the knob moves the log-probs the same way on both (it is not skipped by the batched path)."""
    out = run_distributed(_engine_tokens, 1)[0]
    assert out["calls_True"] == 0 and out["calls_False"] > 0
    assert out["hooks_True"] == 0 and out["hooks_False"] == 0
    for fp8 in ("off", "per_tensor", "per_row"):
        for (ids_b, lp_b), (ids_s, lp_s) in zip(out[(True, fp8)], out[(False, fp8)], strict=True):
            assert ids_b == ids_s, fp8
            torch.testing.assert_close(lp_b, lp_s, atol=1e-5, rtol=0)
    for fp8 in ("per_tensor", "per_row"):
        for batched in (True, False):
            moved = max(float((a[1][: len(b[1])] - b[1][: len(a[1])]).abs().max())
                        for a, b in zip(out[(batched, fp8)], out[(batched, "off")], strict=True))
            assert moved > 1e-4, (batched, fp8)


# ------------------------------------------------------------------ layouts


def _layout_reasons(rank, world):
    from vespo_megatron.megatron.parallel_setup import ParallelConfig, destroy_parallel

    out = {}
    for name, layout in (("ep2", ParallelConfig(ep=2)), ("tp2_sp", ParallelConfig(tp=2, sp=True))):
        model, _ = _build(_cfg(), layout)
        experts = model.decoder.layers[0].mlp.experts
        out[name] = (type(experts).__name__, experts.num_local_experts, experts.unbatched_reason())
        destroy_parallel()
    return out


@pytest.mark.distributed
def test_ep2_and_tp2_sp_take_the_batched_path():
    for rank in run_distributed(_layout_reasons, 2):
        assert rank["ep2"] == ("BatchedSequentialMLP", 4, None)
        assert rank["tp2_sp"] == ("BatchedSequentialMLP", 8, None)


# ------------------------------------------------------------------ config, spec, CLI


def test_config_switch_validated():
    from vespo_megatron.base.validation import ConfigError

    assert _cfg().batched_experts is True
    with pytest.raises(ConfigError, match="batched_experts"):
        _cfg(batched_experts=1)


def test_with_experts_module_handles_both_spec_forms():
    """0.16's ModuleSpec form and 0.19's functools.partial builders."""
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from vespo_megatron.compat import with_experts_module
    from vespo_megatron.megatron.batched_experts import BatchedSequentialMLP

    mlp = MLPSubmodules(linear_fc1="fc1", linear_fc2="fc2")
    spec = ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=ModuleSpec(module=SequentialMLP, submodules=mlp)))
    new = with_experts_module(spec, BatchedSequentialMLP)
    assert new.module is MoELayer and new.submodules.experts.module is BatchedSequentialMLP
    assert new.submodules.experts.submodules is mlp and spec.submodules.experts.module is SequentialMLP
    built = functools.partial(MoELayer, submodules=MoESubmodules(experts=functools.partial(SequentialMLP, submodules=mlp)))
    new = with_experts_module(built, BatchedSequentialMLP)
    assert new.func is MoELayer and new.keywords["submodules"].experts.func is BatchedSequentialMLP
    assert new.keywords["submodules"].experts.keywords == {"submodules": mlp}
    with pytest.raises(TypeError, match="SequentialMLP"):
        with_experts_module(new, BatchedSequentialMLP)


def test_cli_flag():
    from vespo_megatron.training.cli import config_from_argv, make_cli

    assert config_from_argv([]).model.batched_experts is True
    assert config_from_argv(["--no-batched-experts"]).model.batched_experts is False
    help_text = make_cli().build_parser().format_help()
    assert "--batched-experts" in help_text and "per-expert loop" in help_text


def test_resume_ignores_the_switch():
    """Runs recorded before the switch existed, or started with the other experts module, still resume."""
    from vespo_megatron.training.cli import config_from_argv
    from vespo_megatron.training.run_dir import config_differences, config_record

    now = config_record(config_from_argv([]))
    older = {**now, "model": {k: v for k, v in now["model"].items() if k != "batched_experts"}}
    assert config_differences(older, now) == []
    assert config_differences(now, config_record(config_from_argv(["--no-batched-experts"]))) == []
    assert config_differences(now, config_record(config_from_argv(["--no-recompute", "--hidden-size", "32"])))
