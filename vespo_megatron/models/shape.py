"""`ModelShape`: the sizes of a MoE decoder that set its parameters and activations, family-neutral.

A model family (`vespo_megatron.models`) fills one from its `config.json`; the memory planner counts
parameters and activations from it, and the family's megatron config is built from it. The fields use
Hugging Face's names; which layers have routed experts is stated explicitly (`dense_layers`), so each
family's rule for it stays in the family's module.
Pure Python: the planner imports it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from vespo_megatron.base.validation import ConfigError, check_int

__all__ = ["ModelShape"]


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """A decoder of RMSNorm, attention (GQA, RoPE) and either a SwiGLU MLP or routed SwiGLU experts per layer.

    Layer i has routed experts iff ``num_experts > 0`` and ``i not in dense_layers``; every other layer has
    a dense SwiGLU MLP of width ``intermediate_size``. ``num_experts = 0``: a dense model.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    intermediate_size: int = 0  # dense-layer MLP width (unused when every layer is MoE)
    moe_intermediate_size: int = 0  # one expert's width
    num_experts: int = 0
    num_experts_per_tok: int = 0
    dense_layers: tuple[int, ...] = ()  # 0-based layers with a dense MLP instead of experts
    tie_word_embeddings: bool = False
    qk_norm: bool = True  # RMSNorm on every query / key head (weights of size head_dim), as in Qwen3
    attention_bias: bool = False

    def __post_init__(self):
        c = "ModelShape"
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads"):
            check_int(c, name, getattr(self, name), low=1)
        for name in ("intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok"):
            check_int(c, name, getattr(self, name), low=0)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(c, "hidden_size", f"a multiple of num_attention_heads={self.num_attention_heads} "
                                  "when head_dim is None", self.hidden_size)
        else:
            check_int(c, "head_dim", self.head_dim, low=1)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(c, "num_key_value_heads", f"a divisor of num_attention_heads={self.num_attention_heads}",
                              self.num_key_value_heads)
        if not isinstance(self.dense_layers, tuple):
            raise ConfigError(c, "dense_layers", "a tuple of layer indices", self.dense_layers)
        for i in self.dense_layers:
            if not (isinstance(i, int) and 0 <= i < self.num_hidden_layers):
                raise ConfigError(c, "dense_layers", f"indices in [0, {self.num_hidden_layers})", self.dense_layers)
        if self.num_experts > 0:
            check_int(c, "moe_intermediate_size", self.moe_intermediate_size, low=1)
            check_int(c, "num_experts_per_tok", self.num_experts_per_tok, low=1, high=self.num_experts)
        if any(not m for m in self.moe_layers()):
            check_int(c, "intermediate_size", self.intermediate_size, low=1)

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def moe_layers(self) -> tuple[bool, ...]:
        """Per layer: True for routed experts, False for a dense MLP."""
        return tuple(self.num_experts > 0 and i not in self.dense_layers for i in range(self.num_hidden_layers))

    @classmethod
    def from_hf_config(cls, config) -> ModelShape:
        """The shape of a registered family's config (a ``config.json`` dict or a transformers config)."""
        # Imported here: the registry imports the families, which import this module.
        from vespo_megatron.models import family_for_config

        return family_for_config(config).shape(config)

    @classmethod
    def from_hf_json(cls, path) -> ModelShape:
        from vespo_megatron.models import load_hf_config

        return cls.from_hf_config(load_hf_config(path))
