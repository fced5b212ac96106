"""The tiny MoE GPTModel gives the same logits and loss gradients under every parallel layout.

Two launches: one process (the reference, plus the reference attention against a float64 loop) and two
processes running every 2-rank layout in turn (DP2, TP2+SP, CP2, EP2, PP2, padded and THD-packed).
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_distributed
from layouts import TWO_RANK_LAYOUTS

from vespo_megatron.megatron.parallel_setup import ParallelConfig

pytestmark = [pytest.mark.distributed, pytest.mark.megatron]

LAYOUTS = TWO_RANK_LAYOUTS
PACKED_LAYOUTS = {"cp2": ParallelConfig(cp=2), "tp2_sp": ParallelConfig(tp=2, sp=True), "pp2": ParallelConfig(pp=2)}


def _model_cfg():
    from vespo_megatron.megatron.model import TinyMoEConfig

    # layer 0 MoE, layer 1 dense: both kinds of MLP are exercised
    return TinyMoEConfig(hidden_size=32, num_layers=2, moe_layer_freq=(1, 0), ffn_hidden_size=64, seq_length=32)


def _batches(cfg):
    from vespo_megatron.testing.layouts import make_packed_batch, make_padded_batch

    padded = make_padded_batch(cfg.vocab_size, rows=4, seq_len=16, seed=1, pad_from=[16, 11, 7, 16])
    # pad_multiple 4 = 2*cp for CP=2, and keeps T divisible by tp=2 under SP
    packed = make_packed_batch(cfg.vocab_size, lengths=[5, 11, 8], pad_multiple=4, seed=2)
    return padded, packed


def _run_layouts(rank, world_size, layouts, packed_layouts):
    from vespo_megatron.testing.layouts import run_layout

    cfg = _model_cfg()
    padded, packed = _batches(cfg)
    out = {name: run_layout(layout, cfg, padded) for name, layout in layouts.items()}
    out.update({f"packed_{name}": run_layout(layout, cfg, packed) for name, layout in packed_layouts.items()})
    return out


def _loop_attention(q, k, v, seq_id, scale):
    """float64 per-token loop: query i attends keys j <= i of its own sequence. q [t, np, hn], k/v [t, ng, hn]."""
    t, nheads, _ = q.shape
    rep = nheads // k.shape[1]
    out = torch.zeros(t, nheads, q.shape[2], dtype=torch.float64)
    for i in range(t):
        keys = [j for j in range(i + 1) if seq_id[j] == seq_id[i]]
        for h in range(nheads):
            scores = torch.stack([q[i, h] @ k[j, h // rep] for j in keys]) * scale
            p = torch.softmax(scores, 0)
            out[i, h] = sum(p[n] * v[j, h // rep] for n, j in enumerate(keys))
    return out.reshape(t, -1)


def _reference(rank, world_size):
    from megatron.core.transformer.enums import AttnMaskType

    from vespo_megatron.megatron.model import transformer_config
    from vespo_megatron.megatron.parallel_setup import destroy_parallel, initialize_parallel
    from vespo_megatron.megatron.reference_attention import ReferenceAttention
    from vespo_megatron.parallel.cp_split import pack_sequences

    out = _run_layouts(rank, world_size, {"ref": ParallelConfig()}, {"ref": ParallelConfig()})
    # Reference attention on a THD pack vs the loop.
    layout = ParallelConfig()
    groups = initialize_parallel(layout)
    try:
        cfg = _model_cfg()
        attn = ReferenceAttention(
            transformer_config(cfg, layout), 1, AttnMaskType.causal, "self", pg_collection=groups.pg_collection
        )
        packed = pack_sequences([torch.arange(n) for n in (3, 6, 1, 5)], pad_multiple=2)
        t, heads, groups_kv, hn = packed.num_tokens, cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(t, n, hn, generator=gen) for n in (heads, groups_kv, groups_kv))
        got = attn(q, k, v, None, packed_seq_params=packed.packed_seq_params())
        expected = _loop_attention(q.double(), k.double(), v.double(), packed.seq_index, hn**-0.5)
        out["attention"] = (got, expected)
    finally:
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def results():
    ref = run_distributed(_reference, 1)[0]
    runs = run_distributed(_run_layouts, 2, LAYOUTS, PACKED_LAYOUTS)
    return ref, runs


def _assert_same(result, reference):
    assert not torch.isnan(result.logits).any(), "some logits were not gathered"
    torch.testing.assert_close(result.logits, reference.logits, rtol=1e-5, atol=1e-5)
    assert result.loss == pytest.approx(reference.loss, rel=1e-6)
    assert result.grads.keys() == reference.grads.keys()
    for name, grad in reference.grads.items():
        torch.testing.assert_close(result.grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_reference_attention_matches_float64_loop_on_packed_sequences(results):
    got, expected = results[0]["attention"]
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_reference_gradients_are_not_trivial(results):
    ref = results[0]["ref"]
    for name, grad in ref.grads.items():
        assert grad.abs().max() > 0, name
    assert any("local_experts.3." in n for n in ref.grads) and any("router" in n for n in ref.grads)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_padded_layout_matches_single_process(results, name):
    ref, runs = results
    for rank_result in runs:  # every rank returns the full result
        _assert_same(rank_result[name], ref["ref"])


@pytest.mark.parametrize("name", sorted(PACKED_LAYOUTS))
def test_packed_layout_matches_single_process(results, name):
    ref, runs = results
    for rank_result in runs:
        _assert_same(rank_result[f"packed_{name}"], ref["packed_ref"])
