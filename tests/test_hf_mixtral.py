"""The second model family, Mixtral, end to end against `transformers` itself.

A tiny `MixtralForCausalLM` (random weights, norms included) is saved by `transformers` as a sharded
safetensors checkpoint. Everything the package knows about it comes from `vespo_megatron.models.mixtral`:
loaded under TP=2 (SP) and under EP=2 on two gloo ranks, the megatron model's logits must equal the
`transformers` model's logits (fp32; 2e-4 absolute on logits of magnitude ~1, as for Qwen3-MoE in
test_hf_bridge.py); saved back, every tensor must be bit-identical. The routing spec, the MoE layers and
the planner's parameter count come from the family and are checked against the transformers model.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.hf_tiny import save_random_hf

pytest.importorskip("transformers")
pytest.importorskip("mbridge")

from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

from vespo_megatron.hf.config import check_matches_hf, load_hf_config, model_config_from_hf  # noqa: E402
from vespo_megatron.hf.safetensors_io import CheckpointReader  # noqa: E402

pytestmark = [pytest.mark.megatron]

# rope_theta and rms_norm_eps left at Mixtral's defaults (1e6 via transformers 5's rope_parameters, 1e-5).
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=64, tie_word_embeddings=False)


def _save_tiny(path: str, seed: int = 0, **changes) -> MixtralForCausalLM:
    return save_random_hf(MixtralForCausalLM, MixtralConfig(**{**TINY, **changes}), path, seed)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf") / "tiny_mixtral")
    model = _save_tiny(path)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    return path, tokens, logits, sum(p.numel() for p in model.parameters())


def _load_forward_save(rank, world, layouts, path, tokens, out_root):
    from vespo_megatron.hf.bridge import load_hf_weights, save_hf_checkpoint
    from vespo_megatron.megatron.parallel_setup import ParallelConfig
    from vespo_megatron.testing.layouts import Batch, run_layout

    hf_cfg = load_hf_config(path)
    model_cfg = model_config_from_hf(hf_cfg, dtype=torch.float32)
    B, S = tokens.shape
    batch = Batch(tokens=tokens, position_ids=torch.arange(S).expand(B, S).clone(), labels=tokens,
                  loss_mask=torch.ones(B, S))
    out = {}
    for name, layout_kw in layouts.items():
        def after_build(model, groups, name=name):
            load_hf_weights(model, groups, path, hf_config=hf_cfg, model_cfg=model_cfg)
            save_hf_checkpoint(model, groups, os.path.join(out_root, name), hf_config=hf_cfg, source_dir=path,
                               max_shard_bytes=30_000)

        out[name] = run_layout(ParallelConfig(**layout_kw), model_cfg, batch, after_build=after_build).logits
    return out


@pytest.mark.distributed
def test_mixtral_tp2_sp_and_ep2_match_transformers_and_round_trip(tiny_ckpt, tmp_path):
    path, tokens, hf_logits, _ = tiny_ckpt
    layouts = {"tp2_sp": dict(tp=2, sp=True), "ep2": dict(ep=2)}
    results = run_distributed(_load_forward_save, 2, layouts, path, tokens, str(tmp_path))
    assert hf_logits.abs().mean() > 0.3  # the tolerance is small relative to the logits
    original = CheckpointReader(path)
    for name in layouts:
        logits = results[0][name]
        assert logits.shape == hf_logits.shape
        err = (logits - hf_logits).abs().max().item()
        assert err < 2e-4, f"{name}: max |megatron - transformers| logit difference {err}"
        saved = CheckpointReader(str(tmp_path / name))
        assert saved.names() == original.names(), name
        for tensor in original.names():
            assert torch.equal(saved.get(tensor), original.get(tensor)), (name, tensor)
        assert json.load(open(tmp_path / name / "config.json")) == load_hf_config(path)


def test_mixtral_facts_come_from_its_family(tiny_ckpt):
    from vespo_megatron.models import ModelShape, family_for_config
    from vespo_megatron.planning import count_params
    from vespo_megatron.routing import RoutingSpec

    path, _, _, hf_numel = tiny_ckpt
    hf_cfg = load_hf_config(path)
    family = family_for_config(hf_cfg)
    assert family.model_type == "mixtral"

    reference = MixtralForCausalLM(MixtralConfig(**TINY))
    moe_in_transformers = tuple(i for i, layer in enumerate(reference.model.layers) if hasattr(layer.mlp, "experts"))
    spec = RoutingSpec.from_hf_config(hf_cfg)
    assert spec.moe_layers == family.moe_layers(hf_cfg) == moe_in_transformers == (0, 1)
    assert (spec.num_hidden_layers, spec.top_k, spec.num_experts) == (2, 2, 4)

    model_cfg = model_config_from_hf(hf_cfg, dtype=torch.float32)
    assert model_cfg.moe_pattern() == [1, 1] and model_cfg.qk_layernorm is False
    assert (model_cfg.rotary_base, model_cfg.layernorm_epsilon) == (1e6, 1e-5)  # Mixtral's defaults, read back
    assert (model_cfg.moe_ffn_hidden_size, model_cfg.num_experts, model_cfg.moe_router_topk) == (32, 4, 2)

    # the planner's count of the checkpoint's config equals the transformers model's parameters
    assert count_params(ModelShape.from_hf_json(os.path.join(path, "config.json"))).total == hf_numel

    # exporting a model built from these flags gives a Mixtral config that maps back to the same flags
    exported = family.hf_config(model_cfg)
    assert exported["architectures"] == ["MixtralForCausalLM"]
    assert model_config_from_hf(exported, dtype=torch.float32) == model_cfg
    assert MixtralConfig(**exported).num_local_experts == 4  # transformers reads what we write


def test_mixtral_flags_mismatch_and_unsupported_configs(tiny_ckpt):
    from vespo_megatron.megatron.model import TinyMoEConfig
    from vespo_megatron.models import get_family

    path, _, _, _ = tiny_ckpt
    hf_cfg = load_hf_config(path)
    qwen_like = dataclasses.replace(model_config_from_hf(hf_cfg, dtype=torch.float32), qk_layernorm=True)
    with pytest.raises(ValueError, match="qk_layernorm: model flags True, checkpoint False"):
        check_matches_hf(qwen_like, hf_cfg)
    for key, value in (("sliding_window", 4096), ("tie_word_embeddings", True), ("router_jitter_noise", 0.1),
                       ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0})):
        with pytest.raises(ValueError, match=f"MixtralConfig.{key}"):
            model_config_from_hf({**hf_cfg, key: value})
    with pytest.raises(ValueError, match="TinyMoEConfig.moe_layer_freq: expected 1 "):
        get_family("mixtral").hf_config(TinyMoEConfig(qk_layernorm=False, num_layers=2, moe_layer_freq=(1, 0)))
