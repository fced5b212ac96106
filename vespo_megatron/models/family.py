"""`ModelFamily`: everything the package knows about one Hugging Face MoE architecture, in one class.

A family reads its architecture's `config.json` (a dict, or a transformers `PretrainedConfig`) and answers
every question the other modules ask about it:

- which decoder layers are MoE, how many experts, top-k (`moe_layers`, `num_experts`, `experts_per_token`:
  the routing spec, `vespo_megatron.routing.RoutingSpec.from_hf_config`);
- its sizes (`shape`: the memory planner's parameter counts, `vespo_megatron.planning`);
- the megatron config our builder takes (`megatron_config`), after refusing what the builder cannot
  represent exactly (`check_supported`), and the inverse for exporting a model built from flags
  (`hf_config`);
- the name map and tensor conversions between our megatron parameters and its checkpoint tensors
  (`weight_bridge`, used by `vespo_megatron.hf.bridge`);
- published configs by name (`presets`).

A new family is one module with one subclass, plus its entry (and import) in `vespo_megatron.models.FAMILIES`.

Module-level imports stay pure Python: the planner and the routing spec read families without torch or
megatron, which are imported only by the methods that build megatron or mbridge objects.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from vespo_megatron.base.validation import ConfigError
from vespo_megatron.models.shape import ModelShape

if TYPE_CHECKING:
    import torch

    from vespo_megatron.megatron.model_config import TinyMoEConfig

__all__ = ["ModelFamily", "hf_field", "rope_theta"]


def hf_field(cfg: Any, key: str, default=None):
    """`cfg[key]` of a config.json dict or attribute of a transformers config; `default` when absent or None."""
    value = cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)
    return default if value is None else value


def rope_theta(owner: str, cfg: Any) -> float:
    """The RoPE base of transformers 4.x (`rope_theta`) or 5.x (`rope_parameters`) configs; refuses scaling,
    which our megatron builder does not apply."""
    params = hf_field(cfg, "rope_parameters") or {}
    scaling = hf_field(cfg, "rope_scaling")
    rope_type = params.get("rope_type", "default")
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        raise ConfigError(owner, "rope_parameters.rope_type", "'default' (no RoPE scaling)",
                          rope_type if rope_type != "default" else scaling)
    theta = params.get("rope_theta", hf_field(cfg, "rope_theta"))
    if theta is None:
        raise ConfigError(owner, "rope_theta", "a number (rope_theta or rope_parameters.rope_theta)", None)
    return float(theta)


class ModelFamily(ABC):
    """One Hugging Face architecture (keyed by its `model_type`); see the module docstring.

    Every family here is a decoder our megatron builder (`vespo_megatron.megatron.model`) represents exactly:
    RMSNorm, GQA attention with RoPE, SwiGLU MLPs and experts, no biases, untied embeddings, a softmax
    router whose top-k probabilities are renormalised. A family states how its config spells that and
    refuses configs that leave it.
    """

    model_type: ClassVar[str]  # config.json "model_type", the registry key
    architecture: ClassVar[str]  # config.json "architectures"[0]
    config_class: ClassVar[str]  # the transformers config class (mbridge wants one; names errors)
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}  # name -> published config.json fields

    # --- what the family's config.json says -------------------------------------------------------------

    @abstractmethod
    def moe_layers(self, cfg: Any) -> tuple[int, ...]:
        """0-based indices of the decoder layers with routed experts (the family's one rule for it)."""

    @abstractmethod
    def num_experts(self, cfg: Any) -> int:
        """Routed experts per MoE layer."""

    def experts_per_token(self, cfg: Any) -> int:
        return int(hf_field(cfg, "num_experts_per_tok", 0))

    def num_layers(self, cfg: Any) -> int:
        return int(hf_field(cfg, "num_hidden_layers"))

    @abstractmethod
    def shape(self, cfg: Any) -> ModelShape:
        """The sizes of any config of this family, including variants the builder refuses (the planner
        answers "what if" questions about them too)."""

    def _attention_shape(self, cfg: Any) -> dict:
        """The ModelShape fields every family reads the same way (embedding and attention)."""
        return dict(
            vocab_size=hf_field(cfg, "vocab_size"),
            hidden_size=hf_field(cfg, "hidden_size"),
            num_hidden_layers=self.num_layers(cfg),
            num_attention_heads=hf_field(cfg, "num_attention_heads"),
            num_key_value_heads=hf_field(cfg, "num_key_value_heads") or hf_field(cfg, "num_attention_heads"),
            head_dim=hf_field(cfg, "head_dim"),
        )

    def check_supported(self, cfg: Any) -> None:
        """Raise a `ConfigError` for the first field our megatron builder cannot represent exactly.

        Shared checks here; families add their own fields (and call this)."""
        self._need(cfg, not hf_field(cfg, "tie_word_embeddings", False), "tie_word_embeddings",
                   "False (the builder unties the embedding and the output layer)")
        self._need(cfg, hf_field(cfg, "hidden_act", "silu") == "silu", "hidden_act", "'silu' (SwiGLU)")
        self._need(cfg, self.num_experts(cfg) >= 1, "num_experts", ">= 1 (a MoE model)")
        rope_theta(self.config_class, cfg)

    def _need(self, cfg: Any, ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ConfigError(self.config_class, key, expected, hf_field(cfg, key))

    # --- megatron and checkpoints -----------------------------------------------------------------------

    def megatron_config(self, cfg: Any, *, seq_length: int | None = None, dtype: torch.dtype | None = None,
                        seed: int = 1234) -> TinyMoEConfig:
        """Our builder's config for `cfg`: every architectural field from the checkpoint; `seq_length`
        (default: max_position_embeddings), `dtype` (default bf16) and `seed` are the caller's."""
        import torch

        from vespo_megatron.megatron.model_config import TinyMoEConfig

        self.check_supported(cfg)
        s = self.shape(cfg)
        pattern = s.moe_layers()
        return TinyMoEConfig(
            vocab_size=s.vocab_size,
            hidden_size=s.hidden_size,
            num_layers=s.num_hidden_layers,
            num_attention_heads=s.num_attention_heads,
            num_query_groups=s.num_key_value_heads,
            head_dim=s.kv_channels,
            # Width of the dense layers; a model without any still needs a valid number (it builds none).
            ffn_hidden_size=s.intermediate_size or s.moe_intermediate_size,
            num_experts=s.num_experts,
            moe_router_topk=s.num_experts_per_tok,
            moe_ffn_hidden_size=s.moe_intermediate_size,
            moe_layer_freq=1 if all(pattern) else tuple(int(m) for m in pattern),
            qk_layernorm=s.qk_norm,
            rotary_base=rope_theta(self.config_class, cfg),
            seq_length=int(seq_length or hf_field(cfg, "max_position_embeddings")),
            layernorm_epsilon=float(hf_field(cfg, "rms_norm_eps")),
            dtype=dtype or torch.bfloat16,
            seed=seed,
        )

    @abstractmethod
    def hf_config(self, model: TinyMoEConfig, *, torch_dtype: str = "bfloat16", **extra) -> dict:
        """A `config.json` of this family for a model built from our flags (toy runs exported for SGLang /
        evaluation); a `ConfigError` when the family cannot express `model`."""

    def _common_hf_config(self, model: TinyMoEConfig, torch_dtype: str) -> dict:
        return {
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": model.vocab_size, "hidden_size": model.hidden_size, "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.num_attention_heads, "num_key_value_heads": model.num_query_groups,
            "head_dim": model.kv_channels, "num_experts_per_tok": model.moe_router_topk,
            "max_position_embeddings": model.seq_length, "rms_norm_eps": model.layernorm_epsilon,
            "rope_theta": float(model.rotary_base), "hidden_act": "silu", "tie_word_embeddings": False,
            "router_aux_loss_coef": model.moe_aux_loss_coeff, "torch_dtype": torch_dtype,
        }

    @abstractmethod
    def weight_bridge(self, cfg: Any, dtype: torch.dtype):
        """An mbridge bridge for this family (name map and tensor conversions of full tensors); see
        `vespo_megatron.hf.bridge.HFBridge` for the three methods used."""

    def transformers_config(self, cfg: Any):
        """`cfg` as the transformers config class, with `head_dim` filled in: mbridge reads
        `getattr(config, "head_dim", default)`, which returns None where transformers stores None."""
        import transformers

        fields = dict(cfg) if isinstance(cfg, Mapping) else cfg.to_dict()
        fields["head_dim"] = self.shape(cfg).kv_channels
        return getattr(transformers, self.config_class).from_dict(fields)
