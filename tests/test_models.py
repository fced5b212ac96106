"""The model-family registry (`vespo_megatron.models`) and the Qwen3-MoE family against `transformers`.

Which layers are MoE is checked against the layers transformers itself builds with experts; the megatron
config against a round trip through the family's exported config.json; the registry's errors name the
registered families. (Mixtral, the second family, is tested end to end in test_hf_mixtral.py.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vespo_megatron.models import FAMILIES, PRESETS, family_for_config, get_family, preset_config

ROOT = Path(__file__).resolve().parents[1]

QWEN_TINY = dict(model_type="qwen3_moe", vocab_size=96, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=48, moe_intermediate_size=24, num_experts=6,
                 num_experts_per_tok=2, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6)


def test_registry_keys_are_model_types_and_unknown_types_name_the_families():
    assert {name: family.model_type for name, family in FAMILIES.items()} == {"qwen3_moe": "qwen3_moe",
                                                                              "mixtral": "mixtral"}
    with pytest.raises(ValueError, match=re.escape("hf_config.model_type: expected one of the registered model "
                                                   "families ['mixtral', 'qwen3_moe'], got 'olmoe'")):
        get_family("olmoe")
    with pytest.raises(ValueError, match="model_type: .* got None"):
        family_for_config({"num_hidden_layers": 2})
    with pytest.raises(ValueError, match=r"models.preset: expected one of \['mixtral-8x7b', 'qwen3-235b-a22b', "):
        preset_config("llama-7b")


def test_presets_belong_to_their_family():
    for name, cfg in PRESETS.items():
        family = family_for_config(cfg)
        assert name in family.presets and cfg["architectures"] == [family.architecture]
        family.check_supported(cfg)  # every preset is a model we can build


@pytest.mark.parametrize("changes, expected", [
    ({}, (0, 1, 2, 3, 4, 5)),
    (dict(mlp_only_layers=[0, 4]), (1, 2, 3, 5)),
    (dict(decoder_sparse_step=2), (1, 3, 5)),
    (dict(decoder_sparse_step=3, mlp_only_layers=[5]), (2,)),
])
def test_qwen3_moe_layers_are_the_layers_transformers_builds_with_experts(changes, expected):
    pytest.importorskip("transformers")
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from vespo_megatron.routing import RoutingSpec

    cfg = {**QWEN_TINY, **changes}
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    with_experts = tuple(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))
    family = get_family("qwen3_moe")
    assert family.moe_layers(cfg) == with_experts == expected
    assert RoutingSpec.from_hf_config(cfg).moe_layers == expected
    assert tuple(i for i, m in enumerate(family.shape(cfg).moe_layers()) if m) == expected


@pytest.mark.megatron
@pytest.mark.parametrize("changes", [{}, dict(mlp_only_layers=[1, 4])])
def test_qwen3_megatron_config_round_trips_through_the_exported_config(changes):
    import torch

    from vespo_megatron.hf.config import model_config_from_hf

    family = get_family("qwen3_moe")
    model = family.megatron_config({**QWEN_TINY, **changes}, dtype=torch.float32)
    assert model.qk_layernorm and model.moe_pattern() == [int(i not in changes.get("mlp_only_layers", ()))
                                                          for i in range(6)]
    exported = family.hf_config(model)
    assert exported["model_type"] == "qwen3_moe" and exported["mlp_only_layers"] == changes.get("mlp_only_layers", [])
    assert model_config_from_hf(exported, dtype=torch.float32) == model


def test_family_specific_config_fields_live_only_in_their_family_module():
    """"Which layers are MoE" and each family's spelling of its config are written once, in its module."""
    homes = {"mlp_only_layers": "qwen3_moe.py", "decoder_sparse_step": "qwen3_moe.py", "norm_topk_prob": "qwen3_moe.py",
             "router_jitter_noise": "mixtral.py"}
    for path in (ROOT / "vespo_megatron").rglob("*.py"):
        text = path.read_text()
        for field, home in homes.items():
            if field in text:
                assert path.parent.name == "models" and path.name == home, (field, str(path))
