"""Hugging Face Qwen3-MoE checkpoints <-> our megatron model, checked against `transformers` itself.

A tiny Qwen3-MoE (random weights, norms included, one dense layer) is saved by `transformers` as a sharded
safetensors checkpoint. Loaded under TP=2 (SP) x EP=2 on four gloo ranks, the megatron model's logits must
equal the `transformers` model's logits on the same tokens (fp32; tolerance 2e-4 absolute on logits of
magnitude ~1, which separates a correct load from any swapped or mis-split tensor by orders of magnitude);
saved back, every tensor must be bit-identical to the original. Bad checkpoints fail with clear errors.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.hf_tiny import save_random_hf

pytest.importorskip("transformers")
pytest.importorskip("mbridge")

from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402

from vespo_megatron.hf.config import check_matches_hf, load_hf_config, model_config_from_hf  # noqa: E402
from vespo_megatron.hf.safetensors_io import CheckpointReader  # noqa: E402

pytestmark = [pytest.mark.megatron]

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True, max_position_embeddings=64, tie_word_embeddings=False, decoder_sparse_step=1,
            mlp_only_layers=[1], rope_theta=10000.0, rms_norm_eps=1e-6)


def _save_tiny(path: str, seed: int = 0, **changes) -> Qwen3MoeForCausalLM:
    return save_random_hf(Qwen3MoeForCausalLM, Qwen3MoeConfig(**{**TINY, **changes}), path, seed)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf") / "tiny")
    model = _save_tiny(path)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    return path, tokens, logits


def _load_forward_save(rank, world, layout_kw, path, tokens, out_dir):
    from vespo_megatron.hf.bridge import load_hf_weights, save_hf_checkpoint
    from vespo_megatron.megatron.parallel_setup import ParallelConfig
    from vespo_megatron.testing.layouts import Batch, run_layout

    hf_cfg = load_hf_config(path)
    model_cfg = model_config_from_hf(hf_cfg, dtype=torch.float32)
    B, S = tokens.shape
    batch = Batch(tokens=tokens, position_ids=torch.arange(S).expand(B, S).clone(), labels=tokens,
                  loss_mask=torch.ones(B, S))
    loaded = {}

    def after_build(model, groups):
        loaded["n"] = load_hf_weights(model, groups, path, hf_config=hf_cfg, model_cfg=model_cfg)
        save_hf_checkpoint(model, groups, out_dir, hf_config=hf_cfg, source_dir=path, max_shard_bytes=30_000)

    res = run_layout(ParallelConfig(**layout_kw), model_cfg, batch, after_build=after_build)
    return res.logits, loaded["n"]


@pytest.mark.distributed
def test_round_trip_tp2_ep2_matches_transformers(tiny_ckpt, tmp_path):
    path, tokens, hf_logits = tiny_ckpt
    out = str(tmp_path / "saved")
    results = run_distributed(_load_forward_save, 4, dict(tp=2, sp=True, ep=2), path, tokens, out)
    logits = results[0][0]
    assert logits.shape == hf_logits.shape
    err = (logits - hf_logits).abs().max().item()
    assert err < 2e-4, f"max |megatron - transformers| logit difference {err}"
    assert hf_logits.abs().mean() > 0.3  # the tolerance is small relative to the logits
    # every rank read only its own shards; together they read everything (checked inside the load)
    assert all(n > 0 for _, n in results)

    original, saved = CheckpointReader(path), CheckpointReader(out)
    assert saved.names() == original.names()
    for name in original.names():
        assert torch.equal(saved.get(name), original.get(name)), name
    assert len(set(saved.weight_map.values())) > 1  # sharded, with an index
    assert json.load(open(os.path.join(out, "config.json"))) == load_hf_config(path)
    assert os.path.isfile(os.path.join(out, "generation_config.json"))  # side files copied
    assert not os.path.exists(out + ".tmp")


def _gather_pp(rank, world, path, layout_kw):
    from vespo_megatron.hf.bridge import gather_hf_tensors, load_hf_weights
    from vespo_megatron.megatron.model import build_gpt_model
    from vespo_megatron.megatron.parallel_setup import ParallelConfig, destroy_parallel, initialize_parallel

    hf_cfg = load_hf_config(path)
    model_cfg = model_config_from_hf(hf_cfg, dtype=torch.float32)
    layout = ParallelConfig(**layout_kw)
    groups = initialize_parallel(layout)
    try:
        model = build_gpt_model(model_cfg, layout, groups, attention_backend="reference")
        load_hf_weights(model, groups, path, hf_config=hf_cfg)
        return {n: t.clone() for n, t in gather_hf_tensors(model, groups, hf_cfg)}
    finally:
        destroy_parallel()


@pytest.mark.distributed
def test_gather_to_rank0_under_pp2_ep2(tmp_path):
    """Experts gathered over EP inside each stage, stage 1 streamed to rank 0 point to point."""
    path = str(tmp_path / "four_layers")
    _save_tiny(path, seed=1, num_hidden_layers=4, mlp_only_layers=[2])
    got = run_distributed(_gather_pp, 4, path, dict(pp=2, ep=2))
    original = CheckpointReader(path)
    assert all(g == {} for g in got[1:])
    assert sorted(got[0]) == original.names()
    for name in original.names():
        assert torch.equal(got[0][name], original.get(name)), name


def test_config_mismatch_names_the_fields(tiny_ckpt):
    path, _, _ = tiny_ckpt
    hf_cfg = load_hf_config(path)
    ok = model_config_from_hf(hf_cfg, dtype=torch.float32)
    check_matches_hf(ok, hf_cfg)
    import dataclasses

    wrong = dataclasses.replace(ok, num_query_groups=4, rotary_base=1_000_000)
    with pytest.raises(ValueError, match=r"num_query_groups: model flags 4, checkpoint 2(.|\n)*rotary_base"):
        check_matches_hf(wrong, hf_cfg)


def test_unsupported_configs_are_refused():
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        model_config_from_hf({**TINY, "model_type": "qwen3_moe", "tie_word_embeddings": True})
    with pytest.raises(ValueError, match="norm_topk_prob"):
        model_config_from_hf({**TINY, "model_type": "qwen3_moe", "norm_topk_prob": False})
    with pytest.raises(ValueError, match="rope_type"):
        model_config_from_hf({**TINY, "model_type": "qwen3_moe",
                              "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}})


def test_missing_shard_and_foreign_config(tiny_ckpt, tmp_path):
    import shutil

    path, _, _ = tiny_ckpt
    broken = str(tmp_path / "broken")
    shutil.copytree(path, broken)
    index = json.load(open(os.path.join(broken, "model.safetensors.index.json")))
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(os.path.join(broken, victim))
    with pytest.raises(FileNotFoundError, match=f"missing: \\['{victim}'\\]"):
        CheckpointReader(broken)
    cfg = json.load(open(os.path.join(broken, "config.json")))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(os.path.join(broken, "config.json"), "w"))
    with pytest.raises(ValueError, match="model_type: expected one of"):
        load_hf_config(broken)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_config(str(tmp_path / "nowhere"))


def _load_other_arch(rank, world, path):
    from vespo_megatron.hf.bridge import load_hf_weights
    from vespo_megatron.megatron.model import build_gpt_model
    from vespo_megatron.megatron.parallel_setup import ParallelConfig, destroy_parallel, initialize_parallel

    hf_cfg = load_hf_config(path)
    # a model with one layer fewer, built without the config check: the unused layer must be reported
    smaller = {**hf_cfg, "num_hidden_layers": 2, "mlp_only_layers": [1]}
    layout = ParallelConfig()
    groups = initialize_parallel(layout)
    try:
        model = build_gpt_model(model_config_from_hf(smaller, dtype=torch.float32), layout, groups,
                                attention_backend="reference")
        try:
            load_hf_weights(model, groups, path, hf_config=smaller)
        except ValueError as e:
            return str(e)
        return "loaded"
    finally:
        destroy_parallel()


@pytest.mark.distributed
def test_checkpoint_of_another_architecture_fails(tiny_ckpt):
    path, _, _ = tiny_ckpt
    (msg,) = run_distributed(_load_other_arch, 1, path)
    assert "match no model parameter" in msg and "model.layers.2." in msg


def test_a_gated_projection_split_without_stride_2_is_refused():
    from types import SimpleNamespace

    from vespo_megatron.hf.bridge import _check_split
    from vespo_megatron.megatron.model import ParamLayout

    group = SimpleNamespace(size=lambda: 2)
    ok = ParamLayout("decoder.layers.1.mlp.linear_fc1.weight", (192, 64), 0, 2, group, False)
    _check_split(ok)
    with pytest.raises(RuntimeError, match="partition stride 1; expected 2"):
        _check_split(ParamLayout("decoder.layers.1.mlp.linear_fc1.weight", (192, 64), 0, 1, group, False))
