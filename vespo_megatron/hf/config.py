"""Hugging Face Qwen3-MoE `config.json` <-> our model config (`TinyMoEConfig`), with loud mismatches.

A checkpoint loaded into a model built from different flags is the classic silent failure: a wrong
`rope_theta` or `num_key_value_heads` still produces tensors, and sometimes of the right shape. So:
`model_config_from_hf` derives every architectural field from the checkpoint (the flags a user may still
choose are `seq_length`, `dtype`, `seed`), and `check_matches_hf` compares a model config built elsewhere
(for example from command-line flags) with the checkpoint and names every field that differs.

Architectures we cannot represent exactly are refused with the field that makes them so (tied embeddings,
`norm_topk_prob=False`, RoPE scaling, attention biases, sliding windows, a non-SiLU activation).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from vespo_megatron.megatron.model import TinyMoEConfig

__all__ = ["HFModelSpec", "check_matches_hf", "load_hf_config", "model_config_from_hf", "moe_layer_pattern"]

SUPPORTED_MODEL_TYPES = ("qwen3_moe",)


# Keys that transformers writes under another name in some versions (5.x: "num_local_experts").
_ALIASES = {"num_experts": "num_local_experts"}


def _get(cfg: Any, key: str, default=None):
    value = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
    if value is None and key in _ALIASES:
        value = cfg.get(_ALIASES[key]) if isinstance(cfg, dict) else getattr(cfg, _ALIASES[key], None)
    return default if value is None else value


def load_hf_config(path: str | os.PathLike) -> dict:
    """The checkpoint directory's `config.json` as a dict; clear errors for a missing or foreign config."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"hf checkpoint: expected a config.json in {path!r}, found none")
    with open(file) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"hf checkpoint: {file} is not valid JSON ({e})") from None
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{file}: model_type: expected one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    return cfg


def rope_theta(cfg: Any) -> float:
    """`rope_theta` from transformers 4.x (`rope_theta`) or 5.x (`rope_parameters`) configs; refuses scaling."""
    params = _get(cfg, "rope_parameters") or {}
    scaling = _get(cfg, "rope_scaling")
    rope_type = (params or {}).get("rope_type", "default")
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        raise ValueError(f"hf config rope_parameters.rope_type: expected 'default' (no RoPE scaling), got "
                         f"{rope_type if rope_type != 'default' else scaling!r}")
    theta = params.get("rope_theta", _get(cfg, "rope_theta"))
    if theta is None:
        raise ValueError("hf config rope_theta: expected a number (rope_theta or rope_parameters.rope_theta), got None")
    return float(theta)


def moe_layer_pattern(cfg: Any) -> tuple[int, ...]:
    """1 for a MoE layer, 0 for a dense one: transformers' Qwen3MoeDecoderLayer rule."""
    n = int(_get(cfg, "num_hidden_layers"))
    dense_only = set(_get(cfg, "mlp_only_layers") or [])
    step = int(_get(cfg, "decoder_sparse_step", 1) or 1)
    experts = int(_get(cfg, "num_experts", 0) or 0)
    return tuple(int(i not in dense_only and experts > 0 and (i + 1) % step == 0) for i in range(n))


def _refuse_unsupported(cfg: Any) -> None:
    def need(ok: bool, key: str, expected: str):
        if not ok:
            raise ValueError(f"hf config {key}: expected {expected}, got {_get(cfg, key)!r}")

    need(not _get(cfg, "tie_word_embeddings", False), "tie_word_embeddings", "False (Qwen3-MoE unties them)")
    need(_get(cfg, "norm_topk_prob", True) is True, "norm_topk_prob",
         "True (the router renormalises the top-k probabilities)")
    need(not _get(cfg, "attention_bias", False), "attention_bias", "False")
    need(not _get(cfg, "use_sliding_window", False), "use_sliding_window", "False")
    need(_get(cfg, "hidden_act", "silu") == "silu", "hidden_act", "'silu'")
    need(int(_get(cfg, "num_experts", 0) or 0) >= 1, "num_experts", ">= 1 (a MoE model)")


def model_config_from_hf(cfg: Any, *, seq_length: int | None = None, dtype: torch.dtype = torch.bfloat16,
                         seed: int = 1234) -> TinyMoEConfig:
    """Our model config for a Qwen3-MoE HF config (a dict or a `PretrainedConfig`)."""
    _refuse_unsupported(cfg)
    pattern = moe_layer_pattern(cfg)
    return TinyMoEConfig(
        vocab_size=int(_get(cfg, "vocab_size")),
        hidden_size=int(_get(cfg, "hidden_size")),
        num_layers=int(_get(cfg, "num_hidden_layers")),
        num_attention_heads=int(_get(cfg, "num_attention_heads")),
        num_query_groups=int(_get(cfg, "num_key_value_heads")),
        head_dim=int(_get(cfg, "head_dim") or _get(cfg, "hidden_size") // _get(cfg, "num_attention_heads")),
        ffn_hidden_size=int(_get(cfg, "intermediate_size")),
        num_experts=int(_get(cfg, "num_experts")),
        moe_router_topk=int(_get(cfg, "num_experts_per_tok")),
        moe_ffn_hidden_size=int(_get(cfg, "moe_intermediate_size")),
        moe_layer_freq=pattern if 0 in pattern else 1,
        qk_layernorm=True,
        rotary_base=rope_theta(cfg),
        seq_length=int(seq_length or _get(cfg, "max_position_embeddings")),
        layernorm_epsilon=float(_get(cfg, "rms_norm_eps")),
        dtype=dtype,
        seed=seed,
    )


# Fields that define the architecture (seq_length, dtype, seed, init and the replay flag do not).
_ARCH_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                "kv_channels", "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "qk_layernorm",
                "rotary_base", "layernorm_epsilon")


def check_matches_hf(model: TinyMoEConfig, cfg: Any, *, source: str = "hf checkpoint") -> None:
    """Raise a ValueError naming every architectural field where `model` and the HF config differ."""
    want = model_config_from_hf(cfg, seq_length=model.seq_length, dtype=model.dtype, seed=model.seed)
    diffs = [f"{f}: model flags {getattr(model, f)!r}, checkpoint {getattr(want, f)!r}"
             for f in _ARCH_FIELDS if getattr(model, f) != getattr(want, f)]
    if model.moe_pattern() != want.moe_pattern():
        diffs.append(f"moe layers: model flags {model.moe_pattern()}, checkpoint {want.moe_pattern()}")
    dense = [i for i, m in enumerate(want.moe_pattern()) if not m]
    if dense and model.ffn_hidden_size != want.ffn_hidden_size:
        diffs.append(f"ffn_hidden_size: model flags {model.ffn_hidden_size}, checkpoint {want.ffn_hidden_size}")
    if diffs:
        raise ValueError(f"{source} does not match the model flags:\n  " + "\n  ".join(diffs))


@dataclass(frozen=True)
class HFModelSpec:
    """A checkpoint directory and the model config derived from it."""

    path: str
    hf_config: dict
    model: TinyMoEConfig

    @classmethod
    def from_dir(cls, path: str | os.PathLike, **overrides) -> HFModelSpec:
        cfg = load_hf_config(path)
        return cls(path=os.fspath(path), hf_config=cfg, model=model_config_from_hf(cfg, **overrides))
