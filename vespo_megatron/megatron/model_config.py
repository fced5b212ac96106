"""`TinyMoEConfig`: the model's shape, without megatron-core.

Kept apart from `model.py` (which builds the megatron-core model) so that the command line can parse and
validate a run's flags without importing megatron-core (seconds, and its import-time warnings): the
config tree of `TrainerConfig` imports this module, and only the trainer imports `model.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vespo_megatron.base.validation import ConfigError
from vespo_megatron.routing.alignment import moe_layer_numbers

__all__ = ["TinyMoEConfig"]


@dataclass(frozen=True, kw_only=True)
class TinyMoEConfig:
    vocab_size: int = 128
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    ffn_hidden_size: int = 128  # dense layers
    num_experts: int = 4
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int = 32
    moe_layer_freq: int | tuple[int, ...] = 1  # int N: every N-th layer is MoE; tuple: 1=MoE, 0=dense
    moe_aux_loss_coeff: float = 0.0
    moe_enable_routing_replay: bool = False
    recompute: bool = False  # full activation recomputation, one layer at a time (memory for compute)
    # Local (non-transformer-engine) spec: all local experts in batched GEMMs (`BatchedSequentialMLP`) instead
    # of megatron's per-expert loop; same parameters and checkpoints, the same numbers up to GEMM rounding.
    batched_experts: bool = True
    qk_layernorm: bool = True
    rotary_base: int = 10000
    seq_length: int = 64  # max sequence length (RoPE table)
    layernorm_epsilon: float = 1e-6
    init_method_std: float = 0.02
    dtype: torch.dtype = torch.float32
    seed: int = 1234

    def __post_init__(self):
        def need(cond: bool, field: str, expected: str, actual):
            if not cond:
                raise ConfigError("TinyMoEConfig", field, expected, actual)

        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "seq_length"):
            need(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        need(self.num_attention_heads % self.num_query_groups == 0, "num_query_groups",
             f"a divisor of num_attention_heads={self.num_attention_heads}", self.num_query_groups)
        if self.head_dim is None:
            need(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                 f"a multiple of num_attention_heads={self.num_attention_heads}", self.hidden_size)
        need(self.moe_router_topk <= self.num_experts, "moe_router_topk",
             f"<= num_experts={self.num_experts}", self.moe_router_topk)
        if isinstance(self.moe_layer_freq, tuple):
            need(len(self.moe_layer_freq) == self.num_layers, "moe_layer_freq",
                 f"a tuple of length num_layers={self.num_layers}", self.moe_layer_freq)
            need(set(self.moe_layer_freq) <= {0, 1}, "moe_layer_freq", "entries 0 or 1", self.moe_layer_freq)
        else:
            need(self.moe_layer_freq >= 1, "moe_layer_freq", ">= 1", self.moe_layer_freq)
        need(isinstance(self.batched_experts, bool), "batched_experts", "a bool", self.batched_experts)
        need(self.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64), "dtype",
             "a floating dtype", self.dtype)

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def moe_pattern(self) -> list[int]:
        """Per layer: 1 for MoE, 0 for dense (megatron's `moe_layer_freq` list form)."""
        moe = set(moe_layer_numbers(self.moe_layer_freq, self.num_layers))
        return [int(i in moe) for i in range(self.num_layers)]
