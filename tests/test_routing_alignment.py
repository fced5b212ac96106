"""Per-rank routing alignment against plain loops: packing (THD) and padding, CP zigzag, the sequence-parallel
split, s-major router order, pipeline (virtual) stage layer selection; fills are strided, never constant.
Also the replay config checks (ValueError for setups that would silently ignore replay)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vespo_megatron.megatron.rl_batch import RLSample, build_rl_microbatch
from vespo_megatron.routing import RoutingRecord, RoutingSpec
from vespo_megatron.routing.alignment import (
    global_routing_padded,
    moe_layer_numbers,
    replay_tensors,
    sample_routing,
    stage_moe_layer_indices,
)

E, K, MOE = 16, 3, (0, 2, 3)


def _record(sid, P, R, rng, first_row=0, num_experts=E):
    n = P + R - 1 - first_row
    ids = np.array([rng.permutation(num_experts)[:K] for _ in range(n * len(MOE))]).reshape(n, len(MOE), K)
    dtype = np.uint8 if num_experts <= 256 else np.int16
    return RoutingRecord(sample_id=sid, expert_ids=ids.astype(dtype), num_prompt_tokens=P, num_output_tokens=R,
                         moe_layers=MOE, num_experts=num_experts, first_row=first_row)


def _samples(seed, n=3, first_rows=None):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        P, R = int(rng.integers(1, 7)), int(rng.integers(1, 9))
        fr = 0 if first_rows is None else min(first_rows[i], P + R - 1)
        out.append(RLSample(prompt=torch.arange(P), response=torch.arange(R), old_logp=torch.zeros(R),
                            advantage=0.0, routing=_record(i, P, R, rng, fr)))
    return out


def _fill(offset, k):
    return (offset * K + k) % E  # strided_fill's formula, written out


def _expected_id(sample: RLSample, t: int, offset: int, layer: int, k: int) -> int:
    rec = sample.routing
    row = t - rec.first_row
    if 0 <= row < rec.num_routed_rows:
        return int(rec.expert_ids[row, layer, k])
    return _fill(offset + t, k)


def _zigzag(n, cp, r):
    c = n // (2 * cp)
    return list(range(r * c, (r + 1) * c)) + list(range((2 * cp - 1 - r) * c, (2 * cp - r) * c))


def _reference_thd(samples, pad, cp, r, tp, tr, total=None):
    """Plain loop: [L_moe][router tokens of (cp rank r, tp rank tr)][K] for a packed micro-batch."""
    starts, pos = [], 0
    for s in samples:
        starts.append(pos)
        pos += -(-(s.prompt.numel() + s.response.numel()) // pad) * pad
    total = total or pos
    ends = starts[1:] + [total]
    index = []
    for st, en in zip(starts, ends, strict=True):
        index += [st + i for i in _zigzag(en - st, cp, r)]
    chunk = len(index) // tp
    mine = index[tr * chunk : (tr + 1) * chunk]
    out = np.zeros((len(MOE), len(mine), K), dtype=np.int64)
    for j, g in enumerate(mine):
        i = max(i for i, st in enumerate(starts) if st <= g)
        L = samples[i].prompt.numel() + samples[i].response.numel()
        for layer in range(len(MOE)):
            for k in range(K):
                t = g - starts[i]
                out[layer, j, k] = _expected_id(samples[i], t, starts[i], layer, k) if t < L else _fill(g, k)
    return out, index


def _reference_padded(samples, S, cp, r, tp, tr):
    index = _zigzag(S, cp, r)
    order = [(b, s) for s in index for b in range(len(samples))]  # router: s-major over [s, b]
    chunk = len(order) // tp
    mine = order[tr * chunk : (tr + 1) * chunk]
    out = np.zeros((len(MOE), len(mine), K), dtype=np.int64)
    for j, (b, s) in enumerate(mine):
        L = samples[b].prompt.numel() + samples[b].response.numel()
        for layer in range(len(MOE)):
            for k in range(K):
                out[layer, j, k] = _expected_id(samples[b], s, b * S, layer, k) if s < L else _fill(b * S + s, k)
    return out, index


@pytest.mark.parametrize("cp, tp", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)])
@pytest.mark.parametrize("first_rows", [None, (0, 2, 1)])
def test_thd_matches_plain_loop(cp, tp, first_rows):
    samples = _samples(cp * 10 + tp, first_rows=first_rows)
    pad = 2 * cp * tp
    for r in range(cp):
        mb = build_rl_microbatch(samples, layout="thd", cp_size=cp, cp_rank=r, pad_multiple=pad)
        assert mb.routed_experts.dtype == torch.uint8 and mb.routed_experts.shape[0] == len(MOE)
        for tr in range(tp):
            want, index = _reference_thd(samples, pad, cp, r, tp, tr)
            assert mb.token_index.tolist() == index
            got = replay_tensors(mb.routed_experts, range(len(MOE)), tp, tr)
            assert all(g.dtype == torch.int64 for g in got)
            np.testing.assert_array_equal(torch.stack(got).numpy(), want)


@pytest.mark.parametrize("cp, tp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_padded_matches_plain_loop_s_major(cp, tp):
    samples = _samples(7 + cp + tp, n=4)
    pad = 2 * cp
    S = -(-max(s.prompt.numel() + s.response.numel() for s in samples) // pad) * pad + pad  # extra padding
    for r in range(cp):
        mb = build_rl_microbatch(samples, layout="padded", cp_size=cp, cp_rank=r, pad_multiple=pad, seq_len=S)
        for tr in range(tp):
            want, index = _reference_padded(samples, S, cp, r, tp, tr)
            assert mb.token_index.tolist() == index
            got = torch.stack(replay_tensors(mb.routed_experts, range(len(MOE)), tp, tr)).numpy()
            np.testing.assert_array_equal(got, want)


def test_thd_seq_len_padding_and_layer_subset():
    samples = _samples(11)
    mb = build_rl_microbatch(samples, layout="thd", pad_multiple=4, seq_len=64)
    want, _ = _reference_thd(samples, 4, 1, 0, 1, 0, total=64)
    got = replay_tensors(mb.routed_experts, [2, 0], 1, 0)
    np.testing.assert_array_equal(torch.stack(got).numpy(), want[[2, 0]])


def test_fills_are_strided_not_constant():
    samples = _samples(5, n=2)
    mb = build_rl_microbatch(samples, layout="padded", pad_multiple=32, seq_len=32)
    routed = mb.routed_experts[0]  # [S * B, K], s-major
    L = [s.prompt.numel() + s.response.numel() for s in samples]
    fill_rows = [s * 2 + b for s in range(32) for b in range(2) if s >= L[b] - 1]
    fills = routed[fill_rows]
    assert len(fill_rows) > 20
    counts = torch.bincount(fills.flatten().long(), minlength=E)
    assert (counts > 0).all() and counts.max() <= counts.min() + 3  # every expert, about evenly
    assert all(len(set(row.tolist())) == K for row in fills)  # distinct ids per token, as a router's
    # The final token of each sample has no SGLang row: strided with its position as offset.
    last = sample_routing(samples[0].routing, L[0])[-1]
    assert last.tolist() == [[_fill(L[0] - 1, k) for k in range(K)]] * len(MOE)


def test_global_padded_shape_and_errors():
    samples = _samples(3)
    records = [s.routing for s in samples]
    lens = [s.prompt.numel() + s.response.numel() for s in samples]
    assert global_routing_padded(records, lens, 20).shape == (3, 20, len(MOE), K)
    with pytest.raises(ValueError, match="row_len"):
        global_routing_padded(records, lens, 2)
    with pytest.raises(ValueError, match="P \\+ O"):
        sample_routing(records[0], lens[0] + 1)
    other = _record("x", 2, 2, np.random.default_rng(0), num_experts=E + 1)
    with pytest.raises(ValueError, match="one model's routing"):
        global_routing_padded([records[0], other], [lens[0], 4], 20)
    bad = [samples[0], RLSample(prompt=torch.arange(2), response=torch.arange(2), old_logp=torch.zeros(2),
                                advantage=0.0)]
    with pytest.raises(ValueError, match="routing: expected on every sample"):
        build_rl_microbatch(bad, layout="thd")
    with pytest.raises(ValueError, match="multiple of tp=2"):
        replay_tensors(torch.zeros(len(MOE), 5, K, dtype=torch.uint8), [0], 2, 0)


def test_stage_layers_follow_megatron_numbering():
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    pattern = [1, 0, 1, 1, 0, 1, 1, 1]
    moe = moe_layer_numbers(pattern, 8)
    assert moe == (0, 2, 3, 5, 6, 7)
    assert moe_layer_numbers(2, 5) == (0, 2, 4)
    for pp, vpp in ((2, None), (2, 2), (4, None)):
        cfg = TransformerConfig(num_layers=8, hidden_size=8, num_attention_heads=2, pipeline_model_parallel_size=pp,
                                virtual_pipeline_model_parallel_size=vpp, num_moe_experts=4, moe_layer_freq=pattern,
                                use_cpu_initialization=True, pipeline_dtype=torch.float32)
        seen = []
        for rank in range(pp):
            for vp in range(vpp or 1):
                vp_stage = vp if vpp else None
                offset = get_transformer_layer_offset(cfg, vp_stage=vp_stage, pp_rank=rank)
                numbers = list(range(offset, offset + get_num_layers_to_build(cfg, vp_stage=vp_stage, pp_rank=rank)))
                got = stage_moe_layer_indices(moe, numbers, [bool(pattern[n]) for n in numbers])
                # plain loop: chunk c = vp * pp + rank of 8 / (pp * vpp) layers; MoE-axis index of its MoE layers
                per = 8 // (pp * (vpp or 1))
                c = vp * pp + rank
                want = [moe.index(n) for n in range(c * per, (c + 1) * per) if pattern[n]]
                assert got == want, (pp, vpp, rank, vp)
                seen += got
        assert sorted(seen) == list(range(len(moe)))
    with pytest.raises(ValueError, match="model layer 1 is MoE"):
        stage_moe_layer_indices(moe, [1], [True])


def _config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=4, hidden_size=8, num_attention_heads=2, num_moe_experts=8, moe_router_topk=2,
                moe_layer_freq=[1, 0, 1, 1], moe_enable_routing_replay=True, use_cpu_initialization=True)
    base.update(kw)
    return TransformerConfig(**base)


def test_replay_setup_validation():
    from vespo_megatron.routing.replay import RoutingReplayConfig, validate_replay_setup

    spec = RoutingSpec(num_hidden_layers=4, moe_layers=(0, 2, 3), top_k=2, num_experts=8)
    validate_replay_setup(_config(), "r3", spec, track_agreement=True)
    validate_replay_setup(_config(moe_router_fusion=True), "off")  # off: nothing to check
    cases = [
        (_config(moe_router_fusion=True), spec, "moe_router_fusion"),
        (_config(moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.0), spec, "sinkhorn"),
        (_config(moe_enable_routing_replay=False), spec, "moe_enable_routing_replay"),
        (_config(num_moe_experts=None, moe_router_topk=2, moe_layer_freq=1, moe_enable_routing_replay=False),
         None, "dense"),
        (_config(moe_expert_capacity_factor=1.0), spec, "capacity"),
        (_config(), RoutingSpec(num_hidden_layers=4, moe_layers=(0, 2, 3), top_k=3, num_experts=8), "top_k=2"),
        (_config(), RoutingSpec(num_hidden_layers=4, moe_layers=(0, 1, 2, 3), top_k=2, num_experts=8),
         "MoE layers"),
        (_config(), RoutingSpec(num_hidden_layers=4, moe_layers=(0, 2, 3), top_k=2, num_experts=16),
         "num_experts=8"),
    ]
    for config, s, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            validate_replay_setup(config, "r2", s)
    with pytest.raises(ValueError, match="mode"):
        RoutingReplayConfig(mode="r4")


def test_replay_setup_rejects_mcore_019_router_settings():
    """megatron-core 0.19's router settings on a stub config (0.16's TransformerConfig lacks them): the
    'quantile_balancing' load-balancing type bypasses RouterReplay; moe_router_force_biased adds a random bias."""
    import types

    from vespo_megatron.routing.replay import validate_replay_setup

    spec = RoutingSpec(num_hidden_layers=4, moe_layers=(0, 2, 3), top_k=2, num_experts=8)
    base = dict(vars(_config()), moe_router_force_biased=None)  # 0.19's defaults pass
    validate_replay_setup(types.SimpleNamespace(**base), "r3", spec, track_agreement=True)
    for balancing in ("quantile_balancing", ["aux_loss", "quantile_balancing"]):
        with pytest.raises(ValueError, match=r"moe_router_load_balancing_type: .*'quantile_balancing'.*bypasses"):
            validate_replay_setup(types.SimpleNamespace(**dict(base, moe_router_load_balancing_type=balancing)),
                                  "r2", spec)
    with pytest.raises(ValueError, match=r"moe_router_force_biased: expected None .*agreement metric.* got 1\.0"):
        validate_replay_setup(types.SimpleNamespace(**dict(base, moe_router_force_biased=1.0)), "r3", spec)
