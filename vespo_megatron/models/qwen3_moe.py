"""Qwen3-MoE (`Qwen3MoeForCausalLM`, model_type "qwen3_moe"): Qwen3-30B-A3B, Qwen3-235B-A22B.

Per-head RMSNorm on queries and keys (megatron's `qk_layernorm`), softmax router with renormalised top-k
probabilities (`norm_topk_prob=True`), no shared experts; dense SwiGLU layers where `mlp_only_layers` or
`decoder_sparse_step` say so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vespo_megatron.base.validation import ConfigError
from vespo_megatron.models.family import ModelFamily, hf_field
from vespo_megatron.models.shape import ModelShape

if TYPE_CHECKING:
    import torch

    from vespo_megatron.megatron.model_config import TinyMoEConfig

__all__ = ["Qwen3MoE"]

# Published config.json fields (Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B on the Hugging Face hub).
_QWEN3_MOE_COMMON = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936, "head_dim": 128,
    "num_key_value_heads": 4, "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "norm_topk_prob": True, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 40960, "tie_word_embeddings": False,
    "attention_bias": False, "use_sliding_window": False, "router_aux_loss_coef": 0.001, "torch_dtype": "bfloat16",
}


class Qwen3MoE(ModelFamily):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    config_class = "Qwen3MoeConfig"
    presets = {
        "qwen3-30b-a3b": {**_QWEN3_MOE_COMMON, "hidden_size": 2048, "num_hidden_layers": 48,
                          "num_attention_heads": 32, "intermediate_size": 6144, "moe_intermediate_size": 768},
        "qwen3-235b-a22b": {**_QWEN3_MOE_COMMON, "hidden_size": 4096, "num_hidden_layers": 94,
                            "num_attention_heads": 64, "intermediate_size": 12288, "moe_intermediate_size": 1536},
    }

    def num_experts(self, cfg: Any) -> int:
        # The hub's configs say "num_experts"; transformers >= 5 writes "num_local_experts".
        return int(hf_field(cfg, "num_experts") or hf_field(cfg, "num_local_experts") or 0)

    def moe_layers(self, cfg: Any) -> tuple[int, ...]:
        """transformers' `Qwen3MoeDecoderLayer`: layer i has experts iff num_experts > 0, i is not in
        `mlp_only_layers` and (i + 1) is a multiple of `decoder_sparse_step`."""
        step = hf_field(cfg, "decoder_sparse_step", 1)
        if not (isinstance(step, int) and step >= 1):
            raise ConfigError(self.config_class, "decoder_sparse_step", "an int >= 1", step)
        dense = hf_field(cfg, "mlp_only_layers", [])
        if isinstance(dense, str | bytes) or not all(isinstance(i, int) for i in dense):
            raise ConfigError(self.config_class, "mlp_only_layers", "a list of layer indices", dense)
        if self.num_experts(cfg) == 0:
            return ()
        return tuple(i for i in range(self.num_layers(cfg)) if i not in set(dense) and (i + 1) % step == 0)

    def shape(self, cfg: Any) -> ModelShape:
        moe = set(self.moe_layers(cfg))
        return ModelShape(
            **self._attention_shape(cfg),
            intermediate_size=hf_field(cfg, "intermediate_size", 0),
            moe_intermediate_size=hf_field(cfg, "moe_intermediate_size", 0),
            num_experts=self.num_experts(cfg),
            num_experts_per_tok=self.experts_per_token(cfg),
            dense_layers=tuple(i for i in range(self.num_layers(cfg)) if i not in moe),
            tie_word_embeddings=bool(hf_field(cfg, "tie_word_embeddings", False)),
            qk_norm=True,
            attention_bias=bool(hf_field(cfg, "attention_bias", False)),
        )

    def check_supported(self, cfg: Any) -> None:
        super().check_supported(cfg)
        self._need(cfg, hf_field(cfg, "norm_topk_prob", True) is True, "norm_topk_prob",
                   "True (the router renormalises the top-k probabilities)")
        self._need(cfg, not hf_field(cfg, "attention_bias", False), "attention_bias", "False")
        self._need(cfg, not hf_field(cfg, "use_sliding_window", False), "use_sliding_window", "False")

    def hf_config(self, model: TinyMoEConfig, *, torch_dtype: str = "bfloat16", **extra) -> dict:
        if not model.qk_layernorm:
            raise ConfigError("TinyMoEConfig", "qk_layernorm", "True (Qwen3-MoE normalises query / key heads)",
                              model.qk_layernorm)
        return {
            **self._common_hf_config(model, torch_dtype),
            "intermediate_size": model.ffn_hidden_size, "moe_intermediate_size": model.moe_ffn_hidden_size,
            "num_experts": model.num_experts, "norm_topk_prob": True, "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, m in enumerate(model.moe_pattern()) if not m],
            "attention_bias": False, "use_sliding_window": False, **extra,
        }

    def weight_bridge(self, cfg: Any, dtype: torch.dtype):
        from mbridge.core.parallel_states import ParallelStates
        from mbridge.models.qwen3moe import Qwen3MoEBridge

        class Qwen3MoEWithDense(Qwen3MoEBridge):
            # Dense layers (mlp_only_layers / decoder_sparse_step) use the plain MLP names, which mbridge's
            # qwen3_moe map lacks.
            _MLP_MAPPING = {
                **Qwen3MoEBridge._MLP_MAPPING,
                "mlp.linear_fc1.weight": ["model.layers.{layer_number}.mlp.gate_proj.weight",
                                          "model.layers.{layer_number}.mlp.up_proj.weight"],
                "mlp.linear_fc2.weight": ["model.layers.{layer_number}.mlp.down_proj.weight"],
            }

        # One-rank parallel states: mbridge is used for names and conversions of full tensors only.
        return Qwen3MoEWithDense(self.transformers_config(cfg), dtype=dtype, parallel_states=ParallelStates())
