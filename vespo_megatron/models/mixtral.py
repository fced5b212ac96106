"""Mixtral (`MixtralForCausalLM`, model_type "mixtral"): Mixtral-8x7B, Mixtral-8x22B.

Every layer MoE, no shared experts, no QK-norm. The router takes the softmax over all experts, keeps the
top k and renormalises them, which equals the softmax over the top-k logits: megatron's softmax router
with `moe_router_pre_softmax=False`, the same as Qwen3-MoE. The expert width is `intermediate_size`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vespo_megatron.base.validation import ConfigError
from vespo_megatron.models.family import ModelFamily, hf_field
from vespo_megatron.models.shape import ModelShape

if TYPE_CHECKING:
    import torch

    from vespo_megatron.megatron.model_config import TinyMoEConfig

__all__ = ["Mixtral"]

# Published config.json fields (mistralai/Mixtral-8x7B-v0.1 on the Hugging Face hub).
_MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_act": "silu", "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "max_position_embeddings": 32768, "sliding_window": None, "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.02, "torch_dtype": "bfloat16",
}


class Mixtral(ModelFamily):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    config_class = "MixtralConfig"
    presets = {"mixtral-8x7b": _MIXTRAL_8X7B}

    def num_experts(self, cfg: Any) -> int:
        return int(hf_field(cfg, "num_local_experts", 0))

    def moe_layers(self, cfg: Any) -> tuple[int, ...]:
        return tuple(range(self.num_layers(cfg))) if self.num_experts(cfg) else ()

    def shape(self, cfg: Any) -> ModelShape:
        return ModelShape(
            **self._attention_shape(cfg),
            moe_intermediate_size=hf_field(cfg, "intermediate_size"),
            num_experts=self.num_experts(cfg),
            num_experts_per_tok=self.experts_per_token(cfg),
            tie_word_embeddings=bool(hf_field(cfg, "tie_word_embeddings", False)),
            qk_norm=False,
        )

    def check_supported(self, cfg: Any) -> None:
        super().check_supported(cfg)
        # Our attention is full causal; a window would change every logit past it.
        self._need(cfg, hf_field(cfg, "sliding_window") is None, "sliding_window", "None (full attention)")
        # transformers multiplies the router input by noise in training mode; our router has none.
        self._need(cfg, not hf_field(cfg, "router_jitter_noise", 0.0), "router_jitter_noise", "0.0")

    def hf_config(self, model: TinyMoEConfig, *, torch_dtype: str = "bfloat16", **extra) -> dict:
        if model.qk_layernorm:
            raise ConfigError("TinyMoEConfig", "qk_layernorm", "False (Mixtral has no QK-norm)", model.qk_layernorm)
        if not all(model.moe_pattern()):
            raise ConfigError("TinyMoEConfig", "moe_layer_freq", "1 (every Mixtral layer is MoE)",
                              model.moe_layer_freq)
        return {
            **self._common_hf_config(model, torch_dtype),
            "intermediate_size": model.moe_ffn_hidden_size, "num_local_experts": model.num_experts,
            "sliding_window": None, "router_jitter_noise": 0.0, **extra,
        }

    def weight_bridge(self, cfg: Any, dtype: torch.dtype):
        from mbridge.core.parallel_states import ParallelStates
        from mbridge.models.mixtral import MixtralBridge

        # One-rank parallel states: mbridge is used for names and conversions of full tensors only.
        return MixtralBridge(self.transformers_config(cfg), dtype=dtype, parallel_states=ParallelStates())
