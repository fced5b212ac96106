"""The memory plan (`vespo_megatron.planning.memory`) against independent references.

Parameter counts: transformers' `Qwen3MoeForCausalLM` and `MixtralForCausalLM` (tiny ones on CPU,
Qwen3-30B-A3B / 235B-A22B / Mixtral-8x7B on the meta device) and the published totals; per-rank counts: the local shards of megatron-core models built in
two gloo processes (TP2+SP, EP2, PP2, CP2). Activations: Korthikanti et al. 2022's per-layer formula and
its scaling laws. Static memory: ZeRO-1 conservation. Plus validation errors and the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vespo_megatron.planning.memory import (
    GIB,
    PRESETS,
    Layout,
    ModelShape,
    RunSetup,
    check_layout,
    count_params,
    layer_bytes_per_token,
    plan_memory,
    rank_params,
    search_layouts,
)

ROOT = Path(__file__).resolve().parents[1]
QWEN3_30B = PRESETS["qwen3-30b-a3b"]
SETUP = RunSetup(micro_batch_tokens=32768, seq_length=4096, micro_batches_per_step=8, routing_replay="r2")


# --- parameter counts vs transformers ------------------------------------------------------------------

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=48, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2)
TINY_VARIANTS = {
    "all_moe": {},
    "mlp_only_layers": dict(mlp_only_layers=[0, 2]),
    "sparse_step_2": dict(decoder_sparse_step=2),
    "tied_embeddings": dict(tie_word_embeddings=True, mlp_only_layers=[3]),
    "attention_bias": dict(attention_bias=True),
}


def _hf_groups(model) -> dict[str, int]:
    """numel of transformers' parameters grouped by what they are (by name)."""
    groups = dict.fromkeys(("embedding", "output_layer", "attention", "norms", "router", "experts", "dense_mlp"), 0)
    rules = [(r"embed_tokens", "embedding"), (r"lm_head", "output_layer"), (r"self_attn\.[qkvo]_proj", "attention"),
             (r"norm", "norms"), (r"mlp\.experts\.", "experts"), (r"mlp\.gate\.", "router"),
             (r"mlp\.(gate|up|down)_proj", "dense_mlp")]
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        group = next(g for pattern, g in rules if re.search(pattern, name))
        groups[group] += p.numel()
    return groups


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_param_counts_match_transformers_model(variant):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**TINY, **TINY_VARIANTS[variant])
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config)
    shape = ModelShape.from_hf_config(config.to_dict())
    counts = count_params(shape)
    hf = _hf_groups(model)
    assert counts.total == sum(p.numel() for p in model.parameters())
    for group, numel in hf.items():
        assert getattr(counts, group) == numel, group
    # active: all but the experts a token is not routed to (k of E per MoE layer)
    k, e = config.num_experts_per_tok, config.num_experts
    assert counts.active == counts.total - hf["experts"] + hf["experts"] * k // e
    if variant == "mlp_only_layers":
        assert shape.moe_layers() == (False, True, False, True) and hf["dense_mlp"] > 0
    if variant == "sparse_step_2":
        assert shape.moe_layers() == (False, True, False, True)


MIXTRAL_TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2)


@pytest.mark.parametrize("changes", [{}, dict(head_dim=None, num_key_value_heads=4)])
def test_mixtral_param_counts_match_transformers_model(changes):
    """Mixtral's family counts no QK-norm, no dense layers and `intermediate_size` as the expert width."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**{**MIXTRAL_TINY, **changes})
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    shape = ModelShape.from_hf_config(config.to_dict())
    counts = count_params(shape)
    assert counts.total == sum(p.numel() for p in model.parameters())
    hf = _hf_groups(model)
    for group, numel in hf.items():
        assert getattr(counts, group) == numel, group
    assert hf["experts"] > 0 and hf["dense_mlp"] == 0 and shape.moe_layers() == (True, True, True)


def _meta_numel(shape_kwargs: dict) -> int:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**shape_kwargs))
    return sum(p.numel() for p in model.parameters())


HF_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok")


def test_qwen3_30b_a3b_totals_match_published_and_transformers():
    counts = count_params(QWEN3_30B)
    assert counts.total == _meta_numel({f: getattr(QWEN3_30B, f) for f in HF_FIELDS})
    # Model card of Qwen/Qwen3-30B-A3B: 30.5B in total, 29.9B non-embedding, 3.3B activated.
    assert abs(counts.total - 30.5e9) / 30.5e9 < 0.01
    assert abs(counts.non_embedding - 29.9e9) / 29.9e9 < 0.01
    # Counting the embedding and output layer as active gives 3.353B; the card's "3.3B" is that number
    # truncated to one decimal (1.6% below it), so the check is the truncation plus 2%.
    assert math.floor(counts.active / 1e8) == 33
    assert abs(counts.active - 3.3e9) / 3.3e9 < 0.02


def test_mixtral_8x7b_totals_match_published_and_transformers():
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from vespo_megatron.models import preset_config

    counts = count_params(PRESETS["mixtral-8x7b"])
    with torch.device("meta"):
        model = MixtralForCausalLM(MixtralConfig(**preset_config("mixtral-8x7b")))
    assert counts.total == sum(p.numel() for p in model.parameters())
    # Mistral AI's announcement of Mixtral 8x7B: 46.7B total parameters, 12.9B used per token.
    assert abs(counts.total - 46.7e9) / 46.7e9 < 0.005
    assert abs(counts.active - 12.9e9) / 12.9e9 < 0.005


def test_qwen3_235b_a22b_totals_match_published_and_transformers():
    shape = PRESETS["qwen3-235b-a22b"]
    counts = count_params(shape)
    assert counts.total == _meta_numel({f: getattr(shape, f) for f in HF_FIELDS})
    assert abs(counts.total - 235e9) / 235e9 < 0.01
    assert abs(counts.active - 22e9) / 22e9 < 0.015


# Qwen/Qwen3-30B-A3B config.json as published on the Hugging Face hub (transformers 4.51 field names).
QWEN3_30B_HUB_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_preset_equals_the_hub_config():
    assert ModelShape.from_hf_config(QWEN3_30B_HUB_CONFIG) == QWEN3_30B


def test_hf_json_round_trip(tmp_path):
    from transformers import Qwen3MoeConfig

    path = tmp_path / "config.json"
    Qwen3MoeConfig(**{f: getattr(QWEN3_30B, f) for f in HF_FIELDS}).to_json_file(path)
    assert ModelShape.from_hf_json(path) == QWEN3_30B


# --- per-rank counts vs megatron-core shards (two gloo processes) --------------------------------------

MEGATRON_LAYOUTS = {"tp2_sp": dict(tp=2, sp=True), "ep2": dict(ep=2), "pp2": dict(pp=2), "cp2": dict(cp=2)}


def _tiny_megatron_cfg():
    from vespo_megatron.megatron.model import TinyMoEConfig

    # layer 0 MoE, layer 1 dense; head_dim != hidden / heads
    return TinyMoEConfig(hidden_size=32, num_layers=2, moe_layer_freq=(1, 0), ffn_hidden_size=64, head_dim=16,
                         seq_length=32)


def _shape_of(cfg) -> ModelShape:
    """TinyMoEConfig (megatron names) -> ModelShape (Hugging Face names)."""
    return ModelShape(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                      num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
                      head_dim=cfg.kv_channels, intermediate_size=cfg.ffn_hidden_size,
                      moe_intermediate_size=cfg.moe_ffn_hidden_size, num_experts=cfg.num_experts,
                      num_experts_per_tok=cfg.moe_router_topk,
                      dense_layers=tuple(i for i, moe in enumerate(cfg.moe_pattern()) if not moe),
                      tie_word_embeddings=False, qk_norm=cfg.qk_layernorm)


def _local_numels(rank, world_size, layouts):
    from vespo_megatron.megatron.model import build_gpt_model
    from vespo_megatron.megatron.parallel_setup import ParallelConfig, destroy_parallel, initialize_parallel

    out = {}
    for name, sizes in layouts.items():
        layout = ParallelConfig(**sizes)
        groups = initialize_parallel(layout)
        try:
            model = build_gpt_model(_tiny_megatron_cfg(), layout, groups, attention_backend="reference")
            params = dict(model.named_parameters())
            out[name] = {
                "pp_rank": groups.pp_rank,
                "dense": sum(p.numel() for n, p in params.items() if ".mlp.experts." not in n),
                "expert": sum(p.numel() for n, p in params.items() if ".mlp.experts." in n),
                "embedding": sum(p.numel() for n, p in params.items() if n.startswith("embedding.")),
                "output_layer": sum(p.numel() for n, p in params.items() if n.startswith("output_layer.")),
                "router": sum(p.numel() for n, p in params.items() if ".mlp.router." in n),
            }
        finally:
            destroy_parallel()
    return out


@pytest.mark.distributed
@pytest.mark.megatron
def test_rank_params_match_megatron_local_shards():
    from dist_harness import run_distributed

    results = run_distributed(_local_numels, 2, MEGATRON_LAYOUTS)
    shape = _shape_of(_tiny_megatron_cfg())
    for name, sizes in MEGATRON_LAYOUTS.items():
        sizes = {k: v for k, v in sizes.items() if k != "sp"}
        layout = Layout.from_gpus(2, **sizes)
        stages = set()
        for rank_result in results:
            got = rank_result[name]
            expected = rank_params(shape, layout, got["pp_rank"])
            stages.add(got["pp_rank"])
            assert (got["dense"], got["expert"]) == (expected.dense, expected.expert), (name, got, expected)
            for part in ("embedding", "output_layer", "router"):
                assert got[part] == expected.parts[part], (name, part)
        assert stages == set(range(layout.pp))
    # the layouts really split something: TP halves attention, EP halves experts, PP splits the layers
    full = rank_params(shape, Layout(), 0)
    assert results[0]["tp2_sp"]["dense"] < full.dense and results[0]["ep2"]["expert"] == full.expert // 2


# --- static memory ---------------------------------------------------------------------------------------


def test_distributed_optimizer_spreads_adam_state_over_the_world():
    # TP1 PP1: nothing is replicated inside a model replica, so the sharded Adam state of all ranks adds up
    # to 12 B per parameter of the model (ZeRO-1), and every rank holds 1/world of it.
    layout = Layout.from_gpus(16, ep=8)
    plan = plan_memory(QWEN3_30B, layout, SETUP)
    total = count_params(QWEN3_30B).total
    assert plan.stages[0].optimizer * 16 == pytest.approx(12 * total, rel=1e-9)
    replicated = plan_memory(QWEN3_30B, layout, dataclasses.replace(SETUP, distributed_optimizer=False))
    params = replicated.stages[0].params.total
    assert replicated.stages[0].optimizer == 12 * params
    assert replicated.stages[0].weights == 2 * params and replicated.stages[0].grads == 4 * params
    fp32 = plan_memory(QWEN3_30B, layout, dataclasses.replace(SETUP, params_dtype="fp32", distributed_optimizer=False))
    assert fp32.stages[0].optimizer == 8 * params and fp32.stages[0].weights == 4 * params


def test_example_layout_groups_and_params():
    layout = Layout.from_gpus(128, tp=4, ep=8)
    assert (layout.dp, layout.dp_cp, layout.expert_dp) == (32, 32, 16)
    p = rank_params(QWEN3_30B, layout, 0)
    assert p.expert == 48 * 16 * 3 * 2048 * 768  # 16 whole experts per EP rank, every layer
    assert p.parts["embedding"] == p.parts["output_layer"] == 151936 * 2048 // 4
    assert p.parts["router"] == 48 * 128 * 2048  # replicated over TP


def test_pipeline_stages_hold_embedding_first_and_output_last():
    layout = Layout.from_gpus(8, ep=2, pp=4)
    stages = [rank_params(QWEN3_30B, layout, s) for s in range(4)]
    assert [s.parts["embedding"] > 0 for s in stages] == [True, False, False, False]
    assert [s.parts["output_layer"] > 0 for s in stages] == [False, False, False, True]
    tied = dataclasses.replace(QWEN3_30B, tie_word_embeddings=True)
    assert rank_params(tied, Layout(), 0).parts["output_layer"] == 0
    assert rank_params(tied, layout, 3).parts["output_layer"] == 151936 * 2048  # the last stage's copy


# --- activations ---------------------------------------------------------------------------------------


def test_attention_and_norm_activations_follow_korthikanti():
    # Korthikanti et al. 2022, section 4.1: attention 11sbh + 5as^2b, two layernorms 4sbh (16-bit). Without
    # dropout (mask sbh, probability mask as^2b and dropout output 2as^2b go): 10sbh + 2as^2b.
    h, a, s = 256, 8, 512
    mha = ModelShape(vocab_size=64, hidden_size=h, num_hidden_layers=1, num_attention_heads=a,
                     num_key_value_heads=a, intermediate_size=4 * h, qk_norm=False)
    setup = RunSetup(micro_batch_tokens=s, seq_length=s, attention="unfused")
    per_token = layer_bytes_per_token(mha, Layout(), setup, is_moe=False)
    norms = per_token["input_norm"] + per_token["pre_mlp_norm"]
    attention = sum(v for k, v in per_token.items() if k not in ("input_norm", "pre_mlp_norm")
                    and not k.startswith("mlp"))
    assert norms == 4 * h
    assert attention == 10 * h + 2 * a * s


def test_activation_scaling_laws():
    base = plan_memory(QWEN3_30B, Layout.from_gpus(8, ep=8), SETUP).stages[0]
    # sequence + tensor parallelism divides every saved activation (logits included) by tp
    tp4 = plan_memory(QWEN3_30B, Layout.from_gpus(32, tp=4, ep=8), SETUP).stages[0]
    for name, v in base.activation_parts.items():
        if name != "logits":  # the fp32 log-prob chunk is a fixed 128 MiB
            assert tp4.activation_parts[name] * 4 == v, name
    # routed tokens per rank do not depend on EP (uniform routing)
    ep1 = plan_memory(QWEN3_30B, Layout.from_gpus(8), SETUP).stages[0]
    assert ep1.activation_parts["experts"] == base.activation_parts["experts"]
    # 1F1B: the first of pp stages holds pp micro-batches of L/pp layers = as many layer activations as pp=1
    pp4 = plan_memory(QWEN3_30B, Layout.from_gpus(32, ep=8, pp=4), SETUP)
    assert [s.in_flight for s in pp4.stages] == [4, 3, 2, 1]
    layers = [k for k in base.activation_parts if k not in ("logits", "output_layer_inputs")]
    assert sum(pp4.stages[0].activation_parts[k] for k in layers) == sum(base.activation_parts[k] for k in layers)
    # full recomputation keeps each layer's input (2sbh/t, Korthikanti section 4.2.3) and one live layer
    tokens_sp = SETUP.micro_batch_tokens // 4
    per_layer = sum(layer_bytes_per_token(QWEN3_30B, Layout.from_gpus(32, tp=4, ep=8), SETUP, True).values())
    expected = (48 + 2) * 2 * 2048 * tokens_sp + max(per_layer * tokens_sp, tp4.logits)  # + final norm, output input
    assert tp4.activations["full_recompute"] == expected
    # CP halves the tokens a rank holds
    cp2 = plan_memory(QWEN3_30B, Layout.from_gpus(16, cp=2, ep=8), SETUP).stages[0]
    assert cp2.activation_parts["experts"] * 2 == base.activation_parts["experts"]


def test_loss_head_fused_or_logits():
    """The last stage's loss head: the logits path holds [T/cp, V/tp] logits and their gradient; the fused
    single pass (the trainer's default) one chunk of 2**29.25 logits (a sequence up to twice that, at most 2**30,
    held whole), d W in fp32 and d hidden. Reference numbers from the shapes, computed here."""
    lay = Layout.from_gpus(32, tp=4, ep=8)
    v, h, b = QWEN3_30B.vocab_size // 4, QWEN3_30B.hidden_size, 2
    stats = 9 * 4
    for tokens, seq in ((32768, 4096), (32768, 32768), (8192, 8192), (2048, 512)):
        setup = dataclasses.replace(SETUP, micro_batch_tokens=tokens, seq_length=seq)
        logits = plan_memory(QWEN3_30B, lay, dataclasses.replace(setup, loss_head="logits")).stages[0].logits
        chunk_rows = min(tokens, (1 << 25) // v)
        assert logits == 2 * tokens * v * b + chunk_rows * v * 4 + tokens * stats
        fused = plan_memory(QWEN3_30B, lay, setup).stages[0].logits  # the default
        tile = int(2**29.25) // v  # tokens of one chunk at V/4
        rows = min(tokens, tile if seq <= tile else min(seq, 2**30 // v))
        assert fused == rows * v * b + v * h * 4 + tokens * h * b + tokens * stats, (tokens, seq)
        assert fused < logits or tokens <= tile
    # the bench's shape (TP = 1, V = 151936, 32k tokens of 4096): 2.29 GiB here; bench/README measured 2.45 GiB
    one = plan_memory(QWEN3_30B, Layout.from_gpus(8, ep=8), SETUP).stages[0].logits / GIB
    assert 2.2 < one < 2.5
    with pytest.raises(ValueError, match=r"RunSetup.loss_head: expected one of \('fused', 'logits'\), got 'chunked'"):
        dataclasses.replace(SETUP, loss_head="chunked")


def test_planner_plans_with_the_heads_chunk_defaults_and_without_torch():
    """The planner takes the single pass's chunk and whole-sequence defaults from the head's own plan module
    (`parallel/head_chunk_plan.py`), and importing it (with that module) loads no torch."""
    from vespo_megatron.parallel import fused_lm_head_loss as head
    from vespo_megatron.planning import memory

    assert memory.DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS is head.DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS
    assert memory.default_whole_sequence_elements is head.default_whole_sequence_elements
    out = subprocess.run([sys.executable, "-c", "import sys; import vespo_megatron.planning; "
                          "print('torch' in sys.modules)"], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out


def test_routing_replay_ids_and_fits():
    layout = Layout.from_gpus(128, tp=4, ep=8)
    plan = plan_memory(QWEN3_30B, layout, SETUP)
    # R2: int64 top-8 ids of 32768 / 4 router tokens per MoE layer (48) for 8 micro-batches
    assert plan.stages[0].rl_extras["routing_replay_ids"] == 8 * 8192 * 48 * 8 * 8
    off = plan_memory(QWEN3_30B, layout, dataclasses.replace(SETUP, routing_replay="off"))
    assert "routing_replay_ids" not in off.stages[0].rl_extras
    for gib in (40, 80, 141):
        for rc in (False, True):
            assert plan.fits(gib, rc) == (plan.peak(rc) <= gib * GIB * 0.9)
    assert plan.peak(True) < plan.peak(False)


# --- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, message", [
    (lambda: check_layout(QWEN3_30B, Layout(ep=3, dp=3)), "num_experts: expected a multiple of ep=3, got 128"),
    (lambda: check_layout(QWEN3_30B, Layout(tp=3)), "num_attention_heads: expected a multiple of tp=3, got 32"),
    (lambda: check_layout(QWEN3_30B, Layout(tp=8)), "num_key_value_heads: expected a multiple of tp=8, got 4"),
    (lambda: check_layout(QWEN3_30B, Layout(pp=5)), "num_hidden_layers: expected a multiple of pp=5"),
    (lambda: check_layout(QWEN3_30B, Layout(etp=5, dp=5)), "moe_intermediate_size: expected a multiple of etp=5"),
    (lambda: Layout.from_gpus(100, tp=4, pp=2), "Layout.gpus: expected a multiple of tp\\*cp\\*pp=8, got 100"),
    (lambda: Layout.from_gpus(12, tp=4, ep=8), "Layout.gpus: expected a multiple of etp\\*ep\\*pp=8, got 12"),
    (lambda: Layout(tp=0), "Layout.tp: expected an int >= 1, got 0"),
    (lambda: Layout(tp=2, ep=4), "Layout.world: expected a multiple of etp\\*ep\\*pp=4"),
    (lambda: plan_memory(QWEN3_30B, Layout(tp=4, cp=2), dataclasses.replace(SETUP, micro_batch_tokens=4100)),
     "micro_batch_tokens: expected a multiple of 16"),
    (lambda: dataclasses.replace(QWEN3_30B, num_experts_per_tok=200),
     "num_experts_per_tok: expected an int in \\[1, 128\\], got 200"),
    (lambda: dataclasses.replace(QWEN3_30B, num_key_value_heads=5), "num_key_value_heads: expected a divisor"),
    (lambda: dataclasses.replace(QWEN3_30B, dense_layers=(48,)), "dense_layers: expected indices"),
    (lambda: dataclasses.replace(SETUP, headroom=1.5), "RunSetup.headroom: expected a fraction"),
    (lambda: dataclasses.replace(SETUP, seq_length=65536), "RunSetup.seq_length: expected <= micro_batch_tokens"),
    (lambda: dataclasses.replace(SETUP, params_dtype="fp16"), "RunSetup.params_dtype: expected one of"),
])
def test_validation_errors_name_field_expected_and_actual(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_search_skips_invalid_layouts_and_sorts():
    plans, skipped = search_layouts(QWEN3_30B, SETUP, 128)
    assert skipped == {"ModelShape.num_key_value_heads": 36}  # tp=8 > 4 KV heads
    assert len(plans) == 108
    peaks = [p.peak(False) for p in plans]
    assert peaks == sorted(peaks)


# --- CLI -------------------------------------------------------------------------------------------------


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "examples" / "memory_plan.py"), *args], cwd=cwd,
                          check=True, capture_output=True, text=True, timeout=120)


def test_cli_writes_markdown_with_command_and_json(tmp_path):
    from transformers import Qwen3MoeConfig

    config = tmp_path / "config.json"
    Qwen3MoeConfig(**{f: getattr(QWEN3_30B, f) for f in HF_FIELDS}).to_json_file(config)
    out = tmp_path / "plan.memory.md"
    args = ["--hf-config", str(config), "--tp", "4", "--ep", "8", "--dp", "32", "--micro-batch-tokens", "32768",
            "--seq-length", "4096", "--gpu-memory-gib", "80", "141", "--out", str(out)]
    result = _cli(*args)
    text = out.read_text()
    assert "python examples/memory_plan.py " + " ".join(args) in text
    assert "| TP4 CP1 EP8 ETP1 PP1 DP32 | 128 |" in result.stdout
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["command"] in text
    plan = data["plan"]
    assert plan["param_counts"]["total"] == count_params(QWEN3_30B).total
    assert plan["layout"]["expert_dp"] == 16 and set(plan["fits"]) == {"80GiB", "141GiB"}


def test_cli_rejects_bad_layout():
    with pytest.raises(subprocess.CalledProcessError) as err:
        _cli("--preset", "qwen3-30b-a3b", "--ep", "3", "--dp", "3")
    assert "num_experts: expected a multiple of ep=3, got 128" in err.value.stderr


def test_committed_example_plan_is_up_to_date(tmp_path):
    committed = ROOT / "examples" / "qwen3_30b_a3b.memory.md"
    text = committed.read_text()
    command = re.search(r"```bash\n(python examples/memory_plan\.py .*)\n```", text).group(1)
    args = command.split()[2:]
    i = args.index("--out")
    out = tmp_path / "plan.md"
    args[i + 1] = str(out)
    _cli(*args)
    assert out.read_text().replace(str(out), "examples/qwen3_30b_a3b.memory.md") == text
