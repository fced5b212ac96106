"""Hugging Face `config.json` <-> our model config (`TinyMoEConfig`), with loud mismatches.

A checkpoint loaded into a model built from different flags is the classic silent failure: a wrong
`rope_theta` or `num_key_value_heads` still produces tensors, and sometimes of the right shape. So:
`model_config_from_hf` derives every architectural field from the checkpoint (the flags a user may still
choose are `seq_length`, `dtype`, `seed`), and `check_matches_hf` compares a model config built elsewhere
(for example from command-line flags) with the checkpoint and names every field that differs.

What a config means is its model family's business (`vespo_megatron.models`, by `model_type`): reading it,
refusing what our builder cannot represent exactly, and mapping it to `TinyMoEConfig`.
"""

from __future__ import annotations

from typing import Any

import torch

from vespo_megatron.megatron.model_config import TinyMoEConfig
from vespo_megatron.models import family_for_config, load_hf_config

__all__ = ["check_matches_hf", "load_hf_config", "model_config_from_hf"]


def model_config_from_hf(cfg: Any, *, seq_length: int | None = None, dtype: torch.dtype = torch.bfloat16,
                         seed: int = 1234) -> TinyMoEConfig:
    """Our model config for the HF config of a registered family (a dict or a `PretrainedConfig`)."""
    return family_for_config(cfg).megatron_config(cfg, seq_length=seq_length, dtype=dtype, seed=seed)


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
