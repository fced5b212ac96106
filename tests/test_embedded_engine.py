"""The embedded engine's KV-cached path against its recompute path and an independent teacher-forced forward;
layouts (TP2+SP, EP2, PP2 cached; CP2 falls back); R3 routing recorded at decode time; lag; bf16; the fp8 /
router-noise mismatch knob (engine only).

Shape legend: [B] requests, [n] new tokens of one row, [n, L, K] recorded routing of one row.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed

VOCAB = 64


def _model_cfg():
    from vespo_megatron.megatron.model import TinyMoEConfig

    return TinyMoEConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_experts=4, moe_router_topk=2,
                         moe_ffn_hidden_size=16, seq_length=64, moe_enable_routing_replay=True)


def _requests(stops=None):
    """4 rows, prompts of 2..8 tokens, max_new 5..9; `stops[b]`: row b's stop tokens."""
    from vespo_megatron.rollout.engine import GenerationRequest

    g = torch.Generator().manual_seed(5)
    lens = (3, 8, 2, 5)
    return [GenerationRequest(sample_id=f"r{b}", prompt_ids=tuple(torch.randint(1, VOCAB, (n,), generator=g).tolist()),
                              max_new_tokens=5 + b, return_routing=True,
                              stop_token_ids=() if stops is None else tuple(stops[b]))
            for b, n in enumerate(lens)]


def _build(layout):
    from vespo_megatron.megatron.model import build_gpt_model
    from vespo_megatron.megatron.parallel_setup import initialize_parallel

    groups = initialize_parallel(layout)
    return build_gpt_model(_model_cfg(), layout, groups, attention_backend="reference"), groups


def _engine(model, groups, record=True, **cfg):
    from vespo_megatron.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig

    return EmbeddedEngine(EmbeddedEngineConfig(**cfg), model, groups, vocab_size=VOCAB, eos_id=VOCAB - 1,
                          moe_layers=(0, 1), num_experts=4, record_routing=record)


def _summary(gens):
    return [(g.output_ids, torch.tensor(g.output_logprobs, dtype=torch.float64), g.finish_reason,
             None if g.routing is None else torch.from_numpy(g.routing.expert_ids.astype("int64"))) for g in gens]


@torch.no_grad()
def _teacher_forced(model, prompt, output):
    """[n] log-probs of `output` given `prompt` from one plain fp32 forward (no cache, no schedule)."""
    ids = torch.tensor([list(prompt) + list(output)])
    logits = model(input_ids=ids, position_ids=torch.arange(ids.size(1))[None], attention_mask=None)
    logp = torch.log_softmax(logits[0, :, :VOCAB].double(), dim=-1)
    P = len(prompt)
    return logp[P - 1 : P - 1 + len(output)].gather(1, torch.tensor(output)[:, None]).squeeze(1)


def _router_hooks(model):
    """Capture every router call's top-k expert sets (sorted) in call order, per layer."""
    calls = {}

    def hook(mod, args, out):
        routing_map = out[1]  # [T, E] bool
        calls.setdefault(mod.layer_number, []).append(routing_map.nonzero()[:, 1].reshape(routing_map.size(0), -1))

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith(".mlp.router")]
    return calls, handles


# ------------------------------------------------------------------ single process


def _single(rank, world):
    from vespo_megatron.megatron.parallel_setup import ParallelConfig

    model, groups = _build(ParallelConfig())
    out = {}
    # 1. rows stop at different steps: each row's stop token is a token it samples mid-way without stops
    free = _engine(model, groups).generate(_requests(), seed=11)
    stops = [[g.output_ids[min(b + 1, len(g.output_ids) - 1)]] for b, g in enumerate(free)]
    reqs = _requests(stops)
    kv_engine = _engine(model, groups)
    calls, handles = _router_hooks(model)
    out["kv"] = _summary(kv_engine.generate(reqs, seed=11))
    for h in handles:
        h.remove()
    out["router_calls"] = calls
    out["prompt_lens"] = [len(r.prompt_ids) for r in reqs]
    # the host checks "all rows stopped?" every 3 / 64 steps: the same generations, more forwards at the end
    for every in (3, 64):
        calls_k, handles = _router_hooks(model)
        out[f"kv_every{every}"] = _summary(_engine(model, groups, stop_check_every=every).generate(reqs, seed=11))
        for h in handles:
            h.remove()
        out[f"forwards_every{every}"] = len(calls_k[min(calls_k)])
    out["forwards_every1"] = len(calls[min(calls)])
    # the flag read 2 steps late (what CUDA does by default, stop_read_lag): forced here on CPU
    import vespo_megatron.rollout.embedded as embedded

    class LateReader(embedded.StopReader):
        def __init__(self, **kw):
            super().__init__(**{**kw, "lag": 2})

    real, embedded.StopReader = embedded.StopReader, LateReader
    try:
        calls_k, handles = _router_hooks(model)
        out["kv_lag2"] = _summary(_engine(model, groups).generate(reqs, seed=11))
        for h in handles:
            h.remove()
        out["forwards_lag2"] = len(calls_k[min(calls_k)])
    finally:
        embedded.StopReader = real
    P = out["prompt_lens"]
    out["forward_cap"] = max(P) + max(r.max_new_tokens for r in reqs) - min(P)  # positions p_min .. S - 1
    out["recompute"] = _summary(_engine(model, groups, kv_cache=False).generate(reqs, seed=11))
    from vespo_megatron.megatron import reference_attention as ra

    ra.FUSED_KERNELS = True  # the CUDA path on CPU: mask-free prefill, decode steps with GQA unrepeated
    try:
        out["kv_fused"] = _summary(_engine(model, groups).generate(reqs, seed=11))
        out["kv_fused_bmm"] = _summary(_engine(model, groups, decode_attention="bmm").generate(reqs, seed=11))
        out["decode_kernel_after"] = ra.DECODE_KERNEL  # the engine's choice lasts only while it generates
    finally:
        ra.FUSED_KERNELS = None
    out["teacher"] = [_teacher_forced(model, r.prompt_ids, g[0]) for r, g in zip(reqs, out["kv"], strict=True)]
    out["uses_cache"] = (kv_engine.uses_kv_cache, _engine(model, groups, kv_cache=False).recompute_reason)
    # 2. bf16: a mismatch against fp32, on the same path
    out["bf16"] = _summary(_engine(model, groups, precision="bf16").generate(reqs, seed=11))
    out["bf16_teacher"] = [_teacher_forced(model, r.prompt_ids, g[0]) for r, g in zip(reqs, out["bf16"], strict=True)]
    # 3. lag 1: sampling with the weights of one sync ago
    from types import SimpleNamespace

    lag = _engine(model, groups, lag=1)
    lag.sync_weights(SimpleNamespace(model=model), 1)
    before = _summary(_engine(model, groups).generate(reqs, seed=11))
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lag.sync_weights(SimpleNamespace(model=model), 2)
    perturbed = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    out["lag"] = (before, _summary(lag.generate(reqs, seed=11)), _summary(_engine(model, groups).generate(reqs, seed=11)),
                  lag.weight_version)
    out["lag_restored"] = all(torch.equal(perturbed[k], v) for k, v in model.state_dict().items() if k in perturbed)
    model.load_state_dict(state, strict=False)
    return out


@pytest.fixture(scope="module")
def single():
    return run_distributed(_single, 1)[0]


def test_kv_cache_matches_recompute_per_row(single):
    """Same tokens and log-probs (fp32 tolerance) as the recompute path, rows of prompt lengths 2..8 stopping
    at different steps; both match an independent teacher-forced forward."""
    assert single["uses_cache"] == (True, "kv_cache=False")
    lengths = [len(k[0]) for k in single["kv"]]
    assert len(set(lengths)) >= 3, lengths  # rows stopped at different steps
    assert any(k[2] == "length" for k in single["kv"]) or len(set(lengths)) == 4
    for (ids, lp, reason, route), (ids_r, lp_r, reason_r, route_r), teacher in zip(
            single["kv"], single["recompute"], single["teacher"], strict=True):
        assert ids == ids_r and reason == reason_r
        torch.testing.assert_close(lp, lp_r, atol=1e-5, rtol=0)
        torch.testing.assert_close(lp, teacher, atol=1e-5, rtol=0)
        assert torch.equal(route, route_r)  # fp32: decode-time routing equals the full recompute's


def test_stop_check_every_k_steps_gives_the_same_generations(single):
    """Reading `done` every 3 or 64 steps instead of every step: the same tokens, log-probs, finish reasons and
    R3 routing, bit for bit (stopped rows ride along unchanged); the extra forwards run after the last row
    stopped, and never past the last position a row can fill."""
    for every in (3, 64):
        for a, b in zip(single["kv"], single[f"kv_every{every}"], strict=True):
            assert a[0] == b[0] and a[2] == b[2] and torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])
    f1, f3, f64 = single["forwards_every1"], single["forwards_every3"], single["forwards_every64"]
    assert f1 <= f3 < f1 + 3 and f1 < f64 <= single["forward_cap"]


def test_a_late_stop_flag_gives_the_same_generations(single):
    """The host reading "all rows stopped?" 2 steps late (CUDA's default, `stop_read_lag`): the same generations
    bit for bit, and exactly 2 more forwards (the last row stopped before the last position a row can fill)."""
    for a, b in zip(single["kv"], single["kv_lag2"], strict=True):
        assert a[0] == b[0] and a[2] == b[2] and torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])
    f1 = single["forwards_every1"]
    assert f1 + 2 <= single["forward_cap"]  # the check below can see the lag
    assert single["forwards_lag2"] == f1 + 2


@pytest.mark.parametrize("fused", ["kv_fused", "kv_fused_bmm"])
def test_kv_cache_on_the_fused_attention_path_matches(single, fused):
    """The fused attention path (what CUDA takes; its decode step attends the K/V groups unrepeated, with SDPA or,
    decode_attention="bmm", batched matmuls) makes the same tokens, routing and log-probs (fp32 tolerance) as the
    reference path of the same cached engine."""
    for (ids, lp, reason, route), (ids_f, lp_f, reason_f, route_f) in zip(single["kv"], single[fused],
                                                                          strict=True):
        assert ids == ids_f and reason == reason_f and torch.equal(route, route_f)
        torch.testing.assert_close(lp_f, lp, atol=1e-5, rtol=0)
    assert single["decode_kernel_after"] == "sdpa"


def test_r3_routing_is_the_decode_time_routing(single):
    """The recorded routing is what the cached forwards used: the prefill routed the first min(prompt)
    positions of every row, then decode step i routed position min(prompt) + i - 1 of every row. Rebuilt from
    the router calls themselves (forward hooks), never from a recompute."""
    calls, P = single["router_calls"], single["prompt_lens"]
    B, p_min = len(P), min(P)
    for li, layer in enumerate(sorted(calls)):
        steps = calls[layer]
        prefill = steps[0].reshape(p_min, B, -1)  # s-major
        by_pos = [prefill[s] for s in range(p_min)] + [c.reshape(B, -1) for c in steps[1:]]
        for b, (ids, _, _, route) in enumerate(single["kv"]):
            n = P[b] + len(ids) - 1  # every token but the last was processed
            assert route.shape[0] == n
            expected = torch.stack([by_pos[s][b] for s in range(n)]).sort(-1).values
            assert torch.equal(route[:, li].sort(-1).values, expected)


def test_bf16_still_a_mismatch(single):
    diffs = torch.cat([(g[1] - t).abs() for g, t in zip(single["bf16"], single["bf16_teacher"], strict=True)])
    assert 0 < float(diffs.max()) < 0.2


def test_lag_samples_with_old_weights(single):
    before, lagged, current, version = single["lag"]
    assert version == 1
    assert [g[0] for g in lagged] == [g[0] for g in before]
    for a, b in zip(lagged, before, strict=True):
        torch.testing.assert_close(a[1], b[1], atol=1e-6, rtol=0)
    assert [g[0] for g in current] != [g[0] for g in before]
    assert single["lag_restored"]


# ------------------------------------------------------------------ layouts (2 ranks)


def _layouts(rank, world):
    from vespo_megatron.megatron.parallel_setup import ParallelConfig, destroy_parallel

    out = {}
    for name, layout in (("tp2_sp", ParallelConfig(tp=2, sp=True)), ("ep2", ParallelConfig(ep=2)),
                         ("pp2", ParallelConfig(pp=2)), ("cp2", ParallelConfig(cp=2))):
        model, groups = _build(layout)
        eng = _engine(model, groups, record=False)
        out[name] = (eng.uses_kv_cache, eng.recompute_reason, _summary(eng.generate(_requests(), seed=11)),
                     model.config.sequence_parallel)
        if name != "cp2":  # the host-read-free decode options under the layout (dense MoE: not under EP)
            fast = _engine(model, groups, record=False, dense_moe_rows=64, stop_check_every=3)
            moe = [m.mlp for m in model.decoder.layers if hasattr(m.mlp, "dense_reason")]
            out[f"{name}_fast"] = (_summary(fast.generate(_requests(), seed=11)), [m.dense_reason() for m in moe])
        destroy_parallel()
    return out


def _single_plain(rank, world):
    from vespo_megatron.megatron.parallel_setup import ParallelConfig

    model, groups = _build(ParallelConfig())
    return _summary(_engine(model, groups, record=False).generate(_requests(), seed=11))


def test_layouts_match_single_process():
    """TP2+SP, EP2 and PP2 decode with the KV cache (CP2 falls back) and make the single process's tokens, also
    with the dense MoE decode (taken under TP2 and PP2, not under EP2) and the stop check every 3 steps."""
    ref = run_distributed(_single_plain, 1)[0]
    ranks = run_distributed(_layouts, 2)
    for name in ("tp2_sp", "ep2", "pp2", "cp2"):
        for r in ranks:
            cached, reason, gens, sp_after = r[name]
            assert cached == (name != "cp2"), (name, reason)
            if name == "cp2":
                assert "context parallelism" in reason
            if name == "tp2_sp":
                assert sp_after  # sequence parallelism restored for the trainer
            for (ids, lp, _, _), (ids_r, lp_r, _, _) in zip(gens, ref, strict=True):
                assert ids == ids_r, name
                torch.testing.assert_close(lp, lp_r, atol=1e-5, rtol=0)
            if name == "cp2":
                continue
            fast, reasons = r[f"{name}_fast"]
            assert reasons and all((x is not None) == (name == "ep2") for x in reasons), (name, reasons)
            for (ids, lp, _, _), (ids_r, lp_r, _, _) in zip(fast, ref, strict=True):
                assert ids == ids_r, name
                torch.testing.assert_close(lp, lp_r, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ mismatch knob


def test_fp8_per_row_beats_per_tensor_on_rows_of_different_scales():
    from vespo_megatron.rollout.mismatch import fp8_fake_quant

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g, dtype=torch.float64) * torch.logspace(-3, 2, 16, dtype=torch.float64)[:, None]
    err = {m: ((fp8_fake_quant(x, m) - x).norm(dim=1) / x.norm(dim=1)) for m in ("per_tensor", "per_row")}
    assert float(err["per_row"].max()) < 0.05  # e4m3: 3 mantissa bits, ~3% relative per element at worst
    assert float(err["per_row"].mean()) < float(err["per_tensor"].mean())
    # the smallest row (1e-5 of the largest) falls into e4m3 subnormals under one tensor-wide scale
    assert float(err["per_tensor"][0]) > 5 * float(err["per_row"][0])
    assert torch.equal(fp8_fake_quant(x, "off"), x)


def _knob(rank, world):
    from vespo_megatron.megatron.parallel_setup import ParallelConfig

    model, groups = _build(ParallelConfig())
    reqs = _requests()
    ids = torch.tensor([list(reqs[1].prompt_ids)])
    pos = torch.arange(ids.size(1))[None]
    with torch.no_grad():
        train_before = model(input_ids=ids, position_ids=pos, attention_mask=None)
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    plain = _summary(_engine(model, groups).generate(reqs, seed=11))
    knobs = {}
    for fp8, noise in (("per_tensor", 0.0), ("per_row", 0.0), ("off", 1.0)):
        gens = _summary(_engine(model, groups, fp8=fp8, router_noise=noise).generate(reqs, seed=11))
        teacher = [_teacher_forced(model, r.prompt_ids, g[0]) for r, g in zip(reqs, gens, strict=True)]
        knobs[(fp8, noise)] = (gens, teacher)
    with torch.no_grad():
        train_after = model(input_ids=ids, position_ids=pos, attention_mask=None)
    same_state = all(torch.equal(state[k], v) for k, v in model.state_dict().items() if k in state)
    hooks_left = sum(len(m._forward_pre_hooks) for m in model.modules())
    gating_left = sum("gating" in vars(m) for m in model.modules())
    return plain, knobs, torch.equal(train_before, train_after), same_state, hooks_left, gating_left


def test_knob_changes_only_the_engine():
    plain, knobs, train_same, state_same, hooks_left, gating_left = run_distributed(_knob, 1)[0]
    assert train_same and state_same and hooks_left == 0 and gating_left == 0
    for key, (gens, teacher) in knobs.items():
        diff = torch.cat([(g[1] - t).abs() for g, t in zip(gens, teacher, strict=True)])
        assert float(diff.max()) > 1e-4, key  # the engine's log-probs moved away from the trainer's
    P = [len(r.prompt_ids) for r in _requests()]  # prompt positions: the same tokens with and without noise
    route_plain = torch.cat([g[3][:p] for g, p in zip(plain, P, strict=True)])
    route_noisy = torch.cat([g[3][:p] for g, p in zip(knobs[("off", 1.0)][0], P, strict=True)])
    assert not torch.equal(route_plain, route_noisy)  # router noise flips experts


def test_config_validation_names_the_field():
    from vespo_megatron.rollout.embedded import EmbeddedEngineConfig

    with pytest.raises(ValueError, match="EmbeddedEngineConfig.fp8"):
        EmbeddedEngineConfig(fp8="e5m2")
    with pytest.raises(ValueError, match="EmbeddedEngineConfig.router_noise"):
        EmbeddedEngineConfig(router_noise=-0.1)
    with pytest.raises(ValueError, match="EmbeddedEngineConfig.kv_cache"):
        EmbeddedEngineConfig(kv_cache="yes")
    with pytest.raises(ValueError, match="EmbeddedEngineConfig.stop_check_every"):
        EmbeddedEngineConfig(stop_check_every=0)
